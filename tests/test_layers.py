"""Tensorized layers and offload: forward against dense references, gradcheck in float64,
whole-model offload equivalence, and a short training run that lowers the loss."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lotus_rt
from lotus_rt import decompose

torch.manual_seed(0)
D = torch.float64


def _layers():
    return [
        (lambda: lotus_rt.TuckerConv2d(4, 6, 3, ranks=(2, 3), stride=2, padding=1, dtype=D), (2, 4, 7, 7)),
        (lambda: lotus_rt.TuckerConv2d(3, 5, (3, 2), ranks=2, dilation=(2, 1), bias=False, dtype=D), (2, 3, 8, 6)),
        (lambda: lotus_rt.CPConv2d(4, 6, 3, rank=3, padding=1, dilation=2, dtype=D), (2, 4, 7, 7)),
        (lambda: lotus_rt.TTLinear((2, 3), (3, 2), 2, dtype=D), (3, 6)),
        (lambda: lotus_rt.TTLinear((2, 2, 3), (3, 1, 2), [2, 3], bias=False, dtype=D), (4, 12)),
    ]


@pytest.fixture(params=["off", "on"])
def fuse(request, lotus_env):
    """Each test using it runs once as task DAGs (LOTUS_FUSE=off) and once fused (on)."""
    lotus_env(LOTUS_FUSE=request.param)
    return request.param


def _dense_weight(layer) -> torch.Tensor:
    if isinstance(layer, lotus_rt.TuckerConv2d):
        return torch.from_numpy(decompose.reconstruct_tucker2(*(p.detach().numpy() for p in (layer.core, layer.first, layer.last))))
    if isinstance(layer, lotus_rt.CPConv2d):
        return torch.from_numpy(decompose.reconstruct_cp([p.detach().numpy() for p in
                                                          (layer.factor_out, layer.factor_in, layer.factor_h, layer.factor_w)]))
    return torch.from_numpy(decompose.reconstruct_tt_matrix([c.detach().numpy() for c in layer.cores],
                                                            layer.in_shape, layer.out_shape))


@pytest.mark.parametrize("make, shape", _layers())
@pytest.mark.parametrize("offloaded", [False, True])
def test_forward_equals_the_reconstructed_dense_layer(make, shape, offloaded, fuse):
    layer = make()
    layer.offloaded = offloaded
    x = torch.randn(shape, dtype=D)
    weight = _dense_weight(layer)
    if isinstance(layer, lotus_rt.TTLinear):
        ref = F.linear(x, weight, layer.bias)
    else:
        g = layer.geometry
        ref = F.conv2d(x, weight, layer.bias, stride=g.stride, padding=g.padding, dilation=g.dilation)
    assert torch.allclose(layer(x), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make, shape", _layers())
def test_gradcheck_offloaded(make, shape, fuse):
    layer = make()
    lotus_rt.offload(layer)
    x = torch.randn(shape, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: layer(x), (x, *layer.parameters()), eps=1e-6, atol=1e-6)


def _model():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
        lotus_rt.TuckerConv2d(4, 6, 3, ranks=(3, 3), padding=1), nn.ReLU(),
        lotus_rt.CPConv2d(6, 4, 3, rank=4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        lotus_rt.TTLinear((4, 4, 4), (2, 2, 3), 3), nn.ReLU(), nn.Linear(12, 3)).double()


def test_offloaded_model_matches_torch_outputs_and_gradients(fuse):
    model = _model()
    twin = _model()
    twin.load_state_dict(model.state_dict())
    lotus_rt.offload(twin)
    assert len(lotus_rt.nn.offloaded_layers(twin)) == 10  # the whole model: activations and flatten too
    assert len(lotus_rt.nn.offloaded_layers(lotus_rt.offload(_model(), whole_model=False))) == 5
    x = torch.randn(3, 2, 8, 8, dtype=D)
    y, y2 = model(x), twin(x)
    assert torch.allclose(y, y2, rtol=1e-10, atol=1e-12)
    y.square().sum().backward()
    y2.square().sum().backward()
    for (name, p), p2 in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p.grad, p2.grad, rtol=1e-9, atol=1e-11), name
    assert set(twin.state_dict()) == set(model.state_dict())


def test_short_training_run_lowers_the_loss(fuse):
    torch.manual_seed(1)
    model = lotus_rt.offload(_model().float())
    x = torch.randn(32, 2, 8, 8)
    target = torch.randint(0, 3, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_from_conv_and_from_linear_at_full_rank_reproduce_the_dense_layer():
    conv = nn.Conv2d(5, 7, 3, padding=1).double()
    x = torch.randn(2, 5, 6, 6, dtype=D)
    tucker = lotus_rt.TuckerConv2d.from_conv(conv, ranks=(5, 7))
    assert tucker.reconstruction_error < 1e-8
    assert torch.allclose(lotus_rt.offload(tucker)(x), conv(x), atol=1e-8)
    linear = nn.Linear(12, 6).double()
    tt = lotus_rt.TTLinear.from_linear(linear, (2, 2, 3), (1, 2, 3), ranks=100)
    xl = torch.randn(4, 12, dtype=D)
    assert torch.allclose(lotus_rt.offload(tt)(xl), linear(xl), atol=1e-8)
    low = lotus_rt.TuckerConv2d.from_conv(conv, ranks=(2, 2))
    assert 0.0 < low.reconstruction_error < 1.0


def test_tensorize_reports_layers_and_keeps_first_conv():
    model = _model()
    dense = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 24))
    lotus_rt.tensorize(dense, rank=0.3, verbose=False)
    kinds = [type(m).__name__ for m in dense]
    assert kinds[0] == "Conv2d" and kinds[2] == "TuckerConv2d" and kinds[4] == "TTLinear"
    assert all(r.params_after < r.params_before for r in dense.lotus_report)
    with pytest.raises(ValueError, match="conv="):
        lotus_rt.tensorize(model, conv="svd")


def test_bad_input_is_a_clear_error():
    layer = lotus_rt.offload(lotus_rt.TuckerConv2d(4, 6, 3, ranks=2))
    with pytest.raises(ValueError, match="expected an input of 4 dimensions with 4"):
        layer(torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match="float32 or float64"):
        layer(torch.randn(2, 4, 8, 8).half())
    # a tensor off the host (the meta device stands in for CUDA here) is refused by name
    with pytest.raises(ValueError, match="is on meta: offloaded layers take CPU tensors"):
        layer(torch.randn(2, 4, 8, 8, device="meta"))
    with pytest.raises(ValueError, match="operand 1 is on meta"):
        lotus_rt.einsum("ij,jk->ik", torch.randn(2, 3), torch.randn(3, 4, device="meta"))
    with pytest.raises(ValueError):
        lotus_rt.TuckerConv2d(4, 6, 3, ranks=0)
    with pytest.raises(ValueError, match="same length"):
        lotus_rt.TTLinear((2, 3), (6,), 2)
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="grouped"):
        lotus_rt.TuckerConv2d.from_conv(grouped, ranks=2)
    with pytest.warns(RuntimeWarning, match="stay in torch"):  # one layer at a time: grouped stays in torch
        lotus_rt.offload(nn.Sequential(copy.deepcopy(grouped)), whole_model=False)
    whole = lotus_rt.offload(nn.Sequential(grouped))  # the whole-model graph runs it with torch's kernel
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(whole(x), F.conv2d(x, grouped.weight, grouped.bias, groups=2))


def test_from_conv_with_vbmf_ranks():
    conv = nn.Conv2d(16, 24, 3)
    layer = lotus_rt.TuckerConv2d.from_conv(conv, ranks="vbmf")
    r_in, r_out = layer.ranks
    assert 1 <= r_in <= 16 and 1 <= r_out <= 24
    assert layer.reconstruction_error < 1.0


@pytest.mark.parametrize("make, shape", _layers())
def test_batch_tiles_give_the_same_outputs_and_gradients(make, shape, lotus_env, fuse):
    """LOTUS_TILE=1 cuts the batch into one-sample tiles (independent task chains, or one fused
    task per tile; parameter gradients summed from per-tile partials): same results as one tile."""
    layer = lotus_rt.offload(make())
    x = torch.randn(shape, dtype=D, requires_grad=True)
    results = []
    for rows in ("1000", "1"):
        lotus_env(LOTUS_TILE=rows)
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        y.backward(torch.ones_like(y) + y.detach())
        results.append([y.detach(), x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_batch_tiles_follow_the_work_and_lotus_tile():
    from lotus_rt.layers import tiles
    assert tiles.batch_tiles(8, 1e9, 2, rows=3) == [(0, 3), (3, 6), (6, 8)]
    # too little work for each worker to get a task's worth: one tile
    assert tiles.batch_tiles(8, 1.5 * tiles.SPLIT_FLOPS, 2) == [(0, 8)]
    # less than TILE_FLOPS, but a task's worth per worker: one tile per worker
    assert tiles.batch_tiles(8, 2.5 * tiles.SPLIT_FLOPS, 2) == [(0, 4), (4, 8)]
    assert tiles.batch_tiles(9, 3.5 * tiles.SPLIT_FLOPS, 3) == [(0, 3), (3, 6), (6, 9)]
    # fused layers (a tile is one task) split at a lower bar
    assert tiles.batch_tiles(8, 0.6 * tiles.SPLIT_FLOPS, 2, split_flops=tiles.FUSED_SPLIT_FLOPS) \
        == [(0, 4), (4, 8)]
    assert tiles.batch_tiles(8, 1.2 * tiles.FUSED_SPLIT_FLOPS, 2,
                                  split_flops=tiles.FUSED_SPLIT_FLOPS) == [(0, 8)]
    # enough work for one tile is still cut into one tile per worker
    assert tiles.batch_tiles(256, 1.2 * tiles.TILE_FLOPS, 2) == [(0, 128), (128, 256)]
    # lots of work: at most MAX_TILES_PER_WORKER per worker, never more tiles than samples
    cut = tiles.batch_tiles(256, 1000 * tiles.TILE_FLOPS, 2)
    assert len(cut) == 2 * tiles.MAX_TILES_PER_WORKER
    assert cut[0][0] == 0 and cut[-1][1] == 256 and all(a[1] == b[0] for a, b in zip(cut, cut[1:]))
    assert len(tiles.batch_tiles(3, 1000 * tiles.TILE_FLOPS, 2)) == 3
    assert tiles.batch_tiles(1, 1000 * tiles.TILE_FLOPS, 2) == [(0, 1)]


@pytest.mark.parametrize("make, shape", _layers())
def test_fused_tiles_with_frozen_parameters(make, shape, lotus_env):
    """Fused, one-sample tiles, the input and the first parameter without gradients: the other
    gradients equal torch's on the same factors, and the frozen ones stay None."""
    lotus_env(LOTUS_FUSE="on")
    lotus_env(LOTUS_TILE="1")
    reference = make()
    layer = lotus_rt.offload(copy.deepcopy(reference))
    for module in (reference, layer):
        next(module.parameters()).requires_grad_(False)
    x = torch.randn(shape, dtype=D)
    weights = torch.randn_like(reference(x))
    grads = []
    for module in (reference, layer):
        (module(x) * weights).sum().backward()
        grads.append([p.grad for p in module.parameters()])
    assert grads[1][0] is None and grads[0][0] is None
    for a, b in zip(grads[0][1:], grads[1][1:]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("stride, padding, dilation", [
    (1, 0, 1), (2, 1, 1), ((1, 2), (2, 0), (2, 1)),
    (3, 1, 1),                 # stride larger than the kernel's height reach
    (1, (4, 3), 1),            # padding wider than the kernel: some offsets see only padding
    ((2, 1), (3, 1), (2, 3)),  # everything at once
    # stride 1 and output size == input size: the flat-shift path
    (1, 1, 1), (1, 1, (1, 2)), (1, (2, 1), 2),
])
@pytest.mark.parametrize("kernel", [(3, 2), (3, 3)])
def test_unfold_matches_torch_and_fold_is_its_adjoint(kernel, stride, padding, dilation, rng):
    from lotus_rt import layers
    from lotus_rt.kernels import conv as conv_kernels
    geometry = layers.ConvGeometry(kernel, *((v, v) if isinstance(v, int) else v
                                                 for v in (stride, padding, dilation)))
    x = rng.standard_normal((2, 3, 7, 8))
    cols = np.full(layers.unfolded_shape(x.shape, geometry), np.nan)  # every element must be written
    conv_kernels.unfold_cpu(x, cols, **geometry.kwargs())
    c, kh, kw, n, ho, wo = cols.shape
    reference = F.unfold(torch.from_numpy(x), kernel, dilation=geometry.dilation, padding=geometry.padding,
                         stride=geometry.stride).numpy()  # (n, c*kh*kw, ho*wo)
    assert np.allclose(cols.transpose(3, 0, 1, 2, 4, 5).reshape(n, c * kh * kw, ho * wo), reference)
    g = rng.standard_normal(cols.shape)
    folded = np.full_like(x, np.nan)
    conv_kernels.fold_cpu(g, folded, **geometry.kwargs())
    assert np.isclose(np.vdot(cols, g), np.vdot(x, folded))


def test_flat_shift_path_is_taken_exactly_for_same_size_stride_one_geometries():
    from lotus_rt.kernels import conv as conv_kernels

    def flat(kernel, stride, padding, dilation, hw=(7, 8)):
        out_hw = tuple(conv_kernels.output_size(n, k, s, p, d)
                       for n, k, s, p, d in zip(hw, kernel, stride, padding, dilation))
        return conv_kernels._flat_shifts(hw, out_hw, kernel, stride, padding, dilation) is not None

    assert flat((3, 3), (1, 1), (1, 1), (1, 1))           # the layers' 3x3 "same" convolution
    assert flat((3, 2), (1, 1), (1, 1), (1, 2))
    assert flat((3, 3), (1, 1), (2, 1), (2, 1))
    assert not flat((3, 3), (1, 1), (0, 0), (1, 1))       # "valid": the image shrinks
    assert not flat((3, 3), (2, 2), (1, 1), (1, 1))       # strided
    assert not flat((3, 3), (1, 1), (2, 2), (1, 1))       # the image grows


def test_tensorize_with_vbmf_ranks_handles_convolutions_and_linears():
    model = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 24))
    x = torch.randn(2, 2, 8, 8)
    lotus_rt.tensorize(model, rank="vbmf", verbose=False)
    assert [r.kind for r in model.lotus_report] == ["TuckerConv2d", "TTLinear"]
    assert model(x).shape == (2, 24)



@pytest.mark.parametrize("mode, fused", [("on", True), ("off", False), ("auto", True)])
def test_fuse_setting_decides_between_one_task_and_a_dag(mode, fused, lotus_env):
    lotus_env(LOTUS_FUSE=mode)
    layer = lotus_rt.offload(lotus_rt.CPConv2d(4, 6, 3, rank=3, padding=1, dtype=D), whole_model=False)
    x = torch.randn(2, 4, 7, 7, dtype=D, requires_grad=True)
    rt = lotus_rt.runtime()
    rt.trace(clear=True)
    layer(x).sum().backward()
    names = [r.name for r in rt.trace()]
    if rt.engine == "starpu":  # the inline engine keeps no trace
        if fused:
            assert names == ["layer_forward", "layer_backward"], names
        else:
            assert "layer_forward" not in names and "conv_unfold" in names and "conv_fold" in names, names


@pytest.mark.parametrize("mode, codelet_name", [("off", "FOLD"), ("off", "BIAS_GRAD"), ("on", "FUSED_BACKWARD"),
                                                ("on", "FUSED_FORWARD")])
def test_a_failing_layer_task_surfaces_and_the_layer_still_works(mode, codelet_name, monkeypatch, lotus_env):
    """One tile's task raises: the layer call raises CodeletError naming it (no hang), the other
    tiles' tasks are waited for, and the same layer then trains correctly on the same runtime."""
    from lotus_rt.errors import CodeletError
    from lotus_rt.layers import codelets
    lotus_env(LOTUS_FUSE=mode)
    lotus_env(LOTUS_TILE="1")
    reference = lotus_rt.TuckerConv2d(3, 4, 3, ranks=(2, 3), padding=1, dtype=D)
    layer = lotus_rt.offload(copy.deepcopy(reference), whole_model=False)
    x = torch.randn(3, 3, 6, 6, dtype=D, requires_grad=True)
    codelet = getattr(codelets, codelet_name)
    body, calls = codelet.cpu, []

    def fails_on_the_second_tile(*arrays, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("injected failure")
        return body(*arrays, **kwargs)

    monkeypatch.setattr(codelet, "cpu", fails_on_the_second_tile)
    with pytest.raises(CodeletError, match=codelet.name) as caught:
        layer(x).sum().backward()
    assert isinstance(caught.value.__cause__, FloatingPointError)
    monkeypatch.setattr(codelet, "cpu", body)
    layer.zero_grad()
    grads = []
    for module in (reference, layer):
        x.grad = None
        (module(x) * torch.arange(4 * 36, dtype=D).reshape(4, 6, 6)).sum().backward()
        grads.append([x.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
