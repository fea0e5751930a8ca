"""The whole model as one task graph: an offloaded model trains exactly as torch does.

Every test runs a reference model in torch eager and a deep copy offloaded by lotus_rt (captured
with torch.fx, lowered to task graphs over batch tiles, replayed as step plans), with the same
inputs and the same random draws, and compares outputs, losses, every parameter gradient and
batch norm's running statistics: to 1e-10 in float64 and 1e-5 in float32 (relative to each
tensor's largest value). Models: the MNIST demo CNN (dense and tensorized), a ResNet-style net
(batch norm, identity and projection shortcuts, dropout, GELU, concatenation, adaptive pooling)
and small random graphs drawn by hypothesis.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lotus_rt
from lotus_rt.demo import small_alexnet
from lotus_rt.nn.convert import offloaded_layers

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
FLOOR = {torch.float64: 1e-4, torch.float32: 1e-2}


class Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU, conv-BN, shortcut (identity or 1x1 conv + BN), add, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.GELU()
        self.block1, self.block2 = Block(8, 8, 1), Block(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.block2(self.block1(self.act(self.stem(x))))
        a = torch.flatten(self.pool(x), 1)
        b = torch.flatten(F.avg_pool2d(x, 8), 1)
        return self.fc(self.drop(torch.cat([a, b], dim=1)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest value; a tensor that is zero in
    exact arithmetic (a bias before batch norm has no gradient) holds rounding noise, so the
    scale is at least FLOOR."""
    floor = FLOOR[a.dtype] if a.dtype in FLOOR else 0.0
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / max(float(a.abs().max()), floor, 1e-30))


def _train_side_by_side(reference: nn.Module, x_shape, dtype, steps: int, seed: int = 0, lr: float = 0.05):
    """Train ``reference`` and an offloaded deep copy on the same batches with the same random
    draws; returns the worst relative difference over outputs, losses, gradients and buffers."""
    model = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything here must be captured: no part left in torch
        lotus_rt.offload(model)
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m in (reference, model)]
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for step in range(steps):
        x = torch.randn(x_shape, generator=gen, dtype=dtype)
        y = torch.randint(0, 10, (x_shape[0],), generator=gen)
        seen = []
        for m, opt in zip((reference, model), opts):
            torch.manual_seed(1000 + step)  # the same dropout masks on both sides
            opt.zero_grad()
            out = m(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            opt.step()
            seen.append([out.detach(), loss.detach()] + [p.grad.clone() for p in m.parameters()]
                        + [b.clone() for b in m.buffers()])
        worst = max([worst] + [_rel(a, b) for a, b in zip(*seen)])
    return model, worst


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tensorized", [False, True])
def test_the_demo_model_trains_as_in_torch(dtype, tensorized):
    torch.manual_seed(0)
    reference = small_alexnet().to(dtype)
    if tensorized:
        lotus_rt.tensorize(reference, rank=0.3, skip={"11"}, verbose=False)
    model, worst = _train_side_by_side(reference, (10, 1, 28, 28), dtype, steps=3)
    assert worst < TOL[dtype], worst
    assert offloaded_layers(model)[:4] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_resnet_with_batch_norm_skips_dropout_and_concatenation_trains_as_in_torch(dtype):
    torch.manual_seed(1)
    model, worst = _train_side_by_side(ResNetish().to(dtype), (6, 3, 16, 16), dtype, steps=3)
    assert worst < TOL[dtype], worst
    model.eval()  # eval: running statistics, no dropout; and no graph kept under no_grad
    reference = copy.deepcopy(model)
    reference.__class__ = ResNetish
    reference.__dict__.pop("_lotus_whole", None)
    x = torch.randn(5, 3, 16, 16, dtype=dtype)
    with torch.no_grad():
        got, want = model(x), reference(x)
    assert not got.requires_grad and _rel(want, got) < TOL[dtype]


def test_batch_norm_running_statistics_and_counter_follow_torch():
    torch.manual_seed(2)
    reference = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 6 * 6, 10)).double()
    model, worst = _train_side_by_side(reference, (9, 2, 8, 8), torch.float64, steps=4)
    assert worst < 1e-10
    bn = model[1]
    assert int(bn.num_batches_tracked) == 4 == int(reference[1].num_batches_tracked)
    torch.testing.assert_close(bn.running_var, reference[1].running_var, rtol=1e-12, atol=0)


def test_the_optimizer_and_state_dict_see_the_same_parameters():
    torch.manual_seed(3)
    model = lotus_rt.offload(small_alexnet())
    names = [n for n, _ in model.named_parameters()]
    assert list(model.state_dict()) == list(small_alexnet().state_dict())
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    before = model.state_dict()["0.weight"].clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(before, model.state_dict()["0.weight"]) and len(names) == 10
    fresh = small_alexnet()
    fresh.load_state_dict(model.state_dict())  # the keys and shapes of an ordinary model


def test_two_forwards_before_one_backward_keep_their_own_buffers():
    torch.manual_seed(4)
    reference = small_alexnet().double()
    model = lotus_rt.offload(copy.deepcopy(reference))
    xs = [torch.randn(4, 1, 28, 28, dtype=torch.float64) for _ in range(2)]
    for m in (reference, model):
        losses = [m(x).square().sum() for x in xs]
        (losses[0] + 2 * losses[1]).backward()
    for p, q in zip(reference.parameters(), model.parameters()):
        assert _rel(p.grad, q.grad) < 1e-10


def test_a_kept_loss_does_not_keep_buffers_and_retain_graph_works_until_the_next_forward():
    torch.manual_seed(10)
    model = lotus_rt.offload(small_alexnet().double())
    x, y = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.arange(4)
    losses = []
    for _ in range(3):  # the losses (and their autograd graphs) stay alive
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss)
    (runner,) = model._lotus_whole.runners.values()
    assert [len(pool.free) for pool in runner.pools.values()] == [1]  # one program, reused
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)  # no forward in between: its buffers are still the ones it saved
    F.cross_entropy(model(x), y)
    with pytest.raises(RuntimeError, match="second backward through an offloaded region"):
        loss.backward()


def test_the_input_gradient_flows_back():
    torch.manual_seed(5)
    reference = ResNetish().double().eval()
    model = lotus_rt.offload(copy.deepcopy(reference))
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    grads = []
    for m in (reference, model):
        x.grad = None
        m(x).sum().backward()
        grads.append(x.grad.clone())
    assert _rel(*grads) < 1e-10


def test_an_op_lotus_rt_does_not_lower_runs_in_torch_and_is_named_once():
    class WithSigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.fc(torch.flatten(torch.sigmoid(self.conv(x)), 1))

    torch.manual_seed(6)
    reference = WithSigmoid().double()
    model = copy.deepcopy(reference)
    with pytest.warns(RuntimeWarning, match="run in torch: function sigmoid") as caught:
        lotus_rt.offload(model)
    assert len(caught) == 1
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    for m in (reference, model):
        m(x).sum().backward()
    for p, q in zip(reference.parameters(), model.parameters()):
        assert _rel(p.grad, q.grad) < 1e-10
    assert offloaded_layers(model) == ["conv", "fc"]


def test_a_failing_task_surfaces_and_the_next_step_works(monkeypatch):
    from lotus_rt.graph import codelets
    torch.manual_seed(7)
    reference = small_alexnet().double()
    model = lotus_rt.offload(copy.deepcopy(reference))
    x, y = torch.randn(8, 1, 28, 28, dtype=torch.float64), torch.arange(8) % 10
    F.cross_entropy(model(x), y).backward()  # recorded and replayed once
    model.zero_grad()
    body = codelets.MAXPOOL_DX.cpu

    def failing(*arrays, **kwargs):
        raise FloatingPointError("injected")

    monkeypatch.setattr(codelets.MAXPOOL_DX, "cpu", failing)
    with pytest.raises(lotus_rt.CodeletError, match="maxpool_dx") as info:
        F.cross_entropy(model(x), y).backward()
    assert isinstance(info.value.__cause__, FloatingPointError)
    monkeypatch.setattr(codelets.MAXPOOL_DX, "cpu", body)
    for m in (reference, model):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
    for p, q in zip(reference.parameters(), model.parameters()):
        assert _rel(p.grad, q.grad) < 1e-10


def test_cuda_tensors_on_a_runtime_without_cuda_workers_are_one_clear_error():
    if any(kind == "cuda" for kind, _ in lotus_rt.runtime().workers):
        pytest.skip("this runtime has a CUDA worker")

    class FakeCuda(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

    model = lotus_rt.offload(small_alexnet())
    x = torch.randn(2, 1, 28, 28).as_subclass(FakeCuda)
    with pytest.raises(ValueError, match="CUDA device but the runtime has no CUDA worker"):
        model(x)


def test_a_step_is_replayed_not_submitted_again():
    torch.manual_seed(8)
    model = lotus_rt.offload(small_alexnet())
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    rt = lotus_rt.runtime()
    F.cross_entropy(model(x), y).backward()
    (runner,) = model._lotus_whole.runners.values()
    (pool,) = runner.pools.values()
    (program,) = pool.free
    forward_plan, backward_plan = program._forward, program._backward
    rt.stats(reset=True)
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
    (again,) = pool.free
    assert again is program and program._forward is forward_plan and forward_plan.runs == 3
    assert backward_plan.runs == 3
    assert sum(s.tasks for s in rt.stats()) == 2 * sum(program.ntasks)


# ---------------------------------------------------------------------- random graphs

@st.composite
def small_nets(draw):
    """A chain of conv / batch norm / activation / pooling, with optional skips and concatenations."""
    layers, channels, size = [], 2, 8
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv_bn", "skip", "cat", "pool"]))
        act = draw(st.sampled_from(["relu", "gelu", "none"]))
        if kind == "pool" and size < 4:
            kind = "conv"
        out = draw(st.integers(1, 4))
        layers.append((kind, act, channels, out))
        channels = {"skip": channels, "cat": channels + out, "pool": channels}.get(kind, out)
        size = size // 2 if kind == "pool" else size
    return layers, channels * size * size


class RandomNet(nn.Module):
    def __init__(self, spec):
        super().__init__()
        layers, features = spec
        self.kinds = [(k, a) for k, a, _, _ in layers]
        self.layers = nn.ModuleList()
        for kind, _, c_in, out in layers:
            if kind == "conv":
                self.layers.append(nn.Conv2d(c_in, out, 3, padding=1))
            elif kind == "conv_bn":
                self.layers.append(nn.Sequential(nn.Conv2d(c_in, out, 3, padding=1, bias=False), nn.BatchNorm2d(out)))
            elif kind == "skip":
                self.layers.append(nn.Conv2d(c_in, c_in, 1))
            elif kind == "cat":
                self.layers.append(nn.Conv2d(c_in, out, 3, padding=1))
            else:
                self.layers.append(nn.MaxPool2d(2))
        self.fc = nn.Linear(features, 10)

    def forward(self, x):
        for (kind, act), layer in zip(self.kinds, self.layers):
            y = layer(x)
            y = F.relu(y) if act == "relu" else F.gelu(y) if act == "gelu" else y
            x = x + y if kind == "skip" else torch.cat([x, y], 1) if kind == "cat" else y
        return self.fc(torch.flatten(x, 1))


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(spec=small_nets(), batch=st.integers(1, 7))
def test_random_small_graphs_train_as_in_torch(spec, batch):
    torch.manual_seed(9)
    _, worst = _train_side_by_side(RandomNet(spec).double(), (batch, 2, 8, 8), torch.float64, steps=2)
    assert worst < 1e-10, (spec, batch, worst)


def test_batch_norm_cores_run_as_torchscript_without_the_gil():
    """The cores are compiled (a compile error would fall back to the Python function silently);
    the GIL-free path is what lets two workers' batch-norm tiles run at once."""
    from lotus_rt.kernels import torch_ops
    cores = [torch_ops._bn_partial_core, torch_ops._bn_normalize_core, torch_ops._bn_backward_partial_core,
             torch_ops._bn_backward_input_core]
    assert all(isinstance(core, torch.jit.ScriptFunction) for core in cores)
