"""Joint factorization of layer groups: the stacked decompositions (against tensorly where it has
the same operation, exact at full rank, masked fits), stable CP, the group layers (offloaded vs
torch eager in float64, outputs and every gradient; vs the dense reconstruction), tensorize_group
on small models and the whole-model grouping."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lotus_rt
from lotus_rt import decompose as D
from lotus_rt.decompose import group as G
from lotus_rt.nn.group import GroupConv2d, GroupLinear, SharedNetwork, Slot, same_shape_groups, tensorize_group

tl = pytest.importorskip("tensorly", reason="tensorly is the reference for the stacked decompositions")
from tensorly.decomposition import parafac, tensor_train  # noqa: E402
from tensorly.decomposition import tucker as tl_tucker  # noqa: E402

DT = torch.float64
FORMATS = ("tucker", "tt", "cp")


@pytest.fixture(params=["off", "on"])
def fuse(request, lotus_env):
    """Each test using it runs once as task DAGs (LOTUS_FUSE=off) and once fused (on)."""
    lotus_env(LOTUS_FUSE=request.param)
    return request.param


# ----------------------------------------------------------------------------- decompositions


def _low_rank_tucker(rng, shape, ranks, noise=0.0):
    core = rng.standard_normal(ranks)
    factors = [np.linalg.qr(rng.standard_normal((n, r)))[0] for n, r in zip(shape, ranks)]
    t = D.reconstruct_tucker(core, factors)
    return t + noise * np.linalg.norm(t) / np.sqrt(t.size) * rng.standard_normal(shape)


def test_reconstructions_match_tensorly(rng):
    core, factors = rng.standard_normal((2, 3, 4)), [rng.standard_normal((n, r)) for n, r in ((4, 2), (5, 3), (6, 4))]
    np.testing.assert_allclose(D.reconstruct_tucker(core, factors), tl.tucker_to_tensor((core, factors)), atol=1e-12)
    cores = [rng.standard_normal(s) for s in ((1, 4, 3), (3, 5, 2), (2, 6, 1))]
    np.testing.assert_allclose(D.reconstruct_tt(cores), tl.tt_to_tensor(cores), atol=1e-12)
    cp = [rng.standard_normal((n, 3)) for n in (4, 5, 6)]
    np.testing.assert_allclose(D.reconstruct_cp(cp), tl.cp_to_tensor((np.ones(3), cp)), atol=1e-12)


def test_masked_tucker_is_tucker_without_a_mask_and_fits_a_mask_as_well_as_tensorly(rng):
    x = _low_rank_tucker(rng, (3, 8, 6, 3, 3), (2, 4, 3, 2, 2), noise=0.1)
    ranks = (2, 4, 3, 2, 2)
    core, factors = D.masked_tucker(x, ranks)
    reference = D.tucker(x, ranks)
    np.testing.assert_allclose(D.reconstruct_tucker(core, factors), D.reconstruct_tucker(*reference), atol=1e-12)
    mask = rng.random(x.shape) < 0.7
    core, factors = D.masked_tucker(x, ranks, mask=mask, em_iter_max=50, em_tol=1e-6)
    for f in factors:
        np.testing.assert_allclose(f.T @ f, np.eye(f.shape[1]), atol=1e-10)
    ours = D.masked_error(D.reconstruct_tucker(core, factors), x, mask)
    theirs = D.masked_error(tl.tucker_to_tensor(tl_tucker(x, rank=list(ranks), mask=mask, n_iter_max=200)), x, mask)
    assert ours <= theirs + 1e-3 and ours < D.masked_error(D.reconstruct_tucker(*reference), x, mask)


def test_masked_tt_without_a_mask_equals_tensorly_tensor_train(rng):
    x = rng.standard_normal((3, 8, 6, 5, 5))
    assert D.tt_max_ranks(x.shape) == [3, 24, 25, 5]
    assert D.relative_error(D.reconstruct_tt(D.masked_tt(x, D.tt_max_ranks(x.shape))), x) < 1e-12
    ranks = [3, 5, 4, 3]
    cores = D.masked_tt(x, ranks)
    assert [c.shape for c in cores] == [(1, 3, 3), (3, 8, 5), (5, 6, 4), (4, 5, 3), (3, 5, 1)]
    theirs = tl.tt_to_tensor(tensor_train(x, [1, *ranks, 1]))
    assert D.relative_error(D.reconstruct_tt(cores), theirs) < 1e-8


@pytest.mark.filterwarnings("ignore:Trying to compute SVD")  # tensorly, rank 6 > a mode size
def test_cp_on_a_stacked_tensor_matches_tensorly_parafac(rng):
    exact = D.reconstruct_cp([rng.standard_normal((n, 3)) for n in (3, 6, 5, 3, 3)])
    weights, factors = D.masked_cp(exact, 3, ridge=0.0)
    assert D.relative_error(D.reconstruct_cp(factors, weights), exact) < 1e-6
    assert D.relative_error(tl.cp_to_tensor(parafac(exact, 3, n_iter_max=500, tol=1e-12)), exact) < 1e-4
    noisy = rng.standard_normal((3, 6, 5, 3, 3))
    weights, factors = D.masked_cp(noisy, 6)
    ours = D.relative_error(D.reconstruct_cp(factors, weights), noisy)
    theirs = D.relative_error(tl.cp_to_tensor(parafac(noisy, 6, n_iter_max=500, tol=1e-10, init="svd")), noisy)
    assert ours <= theirs * 1.05, (ours, theirs)


def test_stack_kernels_centres_smaller_kernels_and_masks_them(rng):
    kernels = [rng.standard_normal((4, 1, 5, 5)), rng.standard_normal((6, 4, 3, 3))]
    stacked, mask, offsets = D.stack_kernels(kernels)
    assert stacked.shape == (2, 6, 4, 5, 5) and offsets == [(0, 0, 0, 0), (0, 0, 1, 1)]
    np.testing.assert_array_equal(stacked[1, :, :, 1:4, 1:4], kernels[1])
    assert mask.sum() == sum(k.size for k in kernels) and not stacked[~mask].any()
    assert mask[0, :4, :1].all() and not mask[1, :, :, 0].any()


@pytest.mark.parametrize("fit", ["tucker", "tt"])
def test_masked_fits_ignore_the_padding(rng, fit):
    kernels = [_low_rank_tucker(rng, (6, 6, 3, 3), (2, 2, 3, 3)), _low_rank_tucker(rng, (4, 2, 3, 3), (2, 2, 3, 3))]
    stacked, mask, _ = D.stack_kernels(kernels)
    if fit == "tucker":
        full = D.reconstruct_tucker(*D.masked_tucker(stacked, stacked.shape, mask=mask))
        small = lambda m: D.reconstruct_tucker(*D.masked_tucker(stacked, (2, 3, 3, 3, 3), mask=m))  # noqa: E731
    else:
        full = D.reconstruct_tt(D.masked_tt(stacked, D.tt_max_ranks(stacked.shape), mask=mask))
        small = lambda m: D.reconstruct_tt(D.masked_tt(stacked, 4, mask=m))  # noqa: E731
    assert D.masked_error(full, stacked, mask) < 1e-12  # full rank: exact on the layers' entries
    # Tucker: imputing the padding fits the layers' entries better than fitting the zeros. TT-SVD
    # over (L, O, I, KH, KW): the padding is whole zero rows of the unfoldings, which a truncated
    # SVD keeps at zero, so the zeros cost no rank and the imputation changes nothing.
    margin = 1e-3 if fit == "tucker" else -1e-12
    assert D.masked_error(small(mask), stacked, mask) <= D.masked_error(small(None), stacked, mask) - margin


def test_cp_sensitivity_is_the_expected_squared_perturbation(rng):
    factors = [rng.standard_normal((n, 3)) for n in (4, 3, 5)]
    sigma, samples = 1e-5, 4000
    base = D.reconstruct_cp(factors)
    total = sum(np.sum((D.reconstruct_cp([f + sigma * rng.standard_normal(f.shape) for f in factors]) - base) ** 2)
                for _ in range(samples))
    assert abs(total / samples / sigma ** 2 / D.cp_sensitivity(factors) - 1) < 0.05


def test_cp_correction_keeps_the_error_and_lowers_the_sensitivity(rng):
    w = rng.standard_normal((24, 16, 3, 3))
    weights, factors = D.cp_als(w, 24, ridge=0.0, n_iter_max=300)
    plain = [factors[0] * weights] + factors[1:]
    error = np.linalg.norm(D.reconstruct_cp(plain) - w)
    corrected = D.cp_correct(w, factors, weights)
    assert np.linalg.norm(D.reconstruct_cp(corrected) - w) <= error * (1 + 1e-9)
    rescaled = D.cp_sensitivity(G._balance(plain))  # the best the component scales alone can do
    assert D.cp_sensitivity(corrected) < 0.7 * rescaled < D.cp_sensitivity(plain)
    stable = D.cp_stable(w, 24, n_iter_max=300)
    assert [f.shape for f in stable] == [(24, 24), (16, 24), (3, 24), (3, 24)]
    assert D.cp_sensitivity(stable) <= D.cp_sensitivity(corrected) * 1.01


def test_group_rank_helpers_and_their_errors():
    shape = (3, 64, 64, 3, 3)
    ranks = D.group_tucker_ranks(shape, 0.2, full_modes=(0, 3, 4))
    assert ranks[0] == 3 and ranks[3:] == (3, 3) and G._tucker_params(shape, ranks) <= 0.2 * np.prod(shape)
    assert D.group_tucker_ranks(shape, 8, full_modes=(0,)) == (3, 8, 8, 3, 3)
    assert D.tt_max_ranks(shape) == [3, 192, 9, 3] and D.group_tt_ranks(shape, 100) == (3, 100, 9, 3)
    assert D.group_cp_rank(shape, 0.1, dense_params=27400) == 20 and D.group_cp_rank(shape, 0.001) == 1
    for bad in (0, 1.5, "x", (1, 2)):
        with pytest.raises(ValueError, match="rank"):
            D.group_tucker_ranks(shape, bad)
    with pytest.raises(ValueError, match="do not fit"):
        D.group_tt_ranks(shape, [1, 2, 3, 100])
    with pytest.raises(ValueError, match="mask"):
        D.masked_tt(np.ones((2, 3)), 1, mask=np.ones((3, 2), bool))


# ----------------------------------------------------------------------------- group layers


def _shared(fmt: str) -> SharedNetwork:
    """Two conv slots (a 5x5 and a centred 3x3) and a linear one in a (3, 6, 4, 5, 5) network."""
    slots = [Slot(0, 4, 2, (5, 5)), Slot(1, 6, 4, (3, 3), (1, 1)), Slot(2, 5, 4, (2, 2))]
    ranks = {"tucker": (2, 3, 3, 4, 3), "tt": [3, 4, 4, 3], "cp": 3}[fmt]  # R_I = 3: slot 0 (2 channels) skips the pre
    torch.manual_seed(1)
    return SharedNetwork(fmt, (3, 6, 4, 5, 5), ranks, slots, dtype=DT)


def _views(shared: SharedNetwork):
    return [GroupConv2d(shared, 0, padding=2), GroupConv2d(shared, 1, stride=2, padding=1, bias=False),
            GroupLinear(shared, 2)]


def _run(views, inputs):
    total = 0
    for view, x in zip(views, inputs):
        total = total + (view(x) ** 2).sum()
    return total


@pytest.mark.parametrize("fmt", FORMATS)
def test_offloaded_group_layers_match_torch_eager_outputs_and_every_gradient(fmt, fuse):
    shared = _shared(fmt)
    eager, twin = _views(shared), _views(copy.deepcopy(shared))  # the same factors, twice
    for a, b in zip(eager, twin):
        if a.bias is not None:
            b.bias.data.copy_(a.bias.data)
        b.offloaded = True
    inputs = [torch.randn(3, 2, 7, 7, dtype=DT), torch.randn(3, 4, 8, 8, dtype=DT), torch.randn(3, 16, dtype=DT)]
    for a, b, x in zip(eager, twin, inputs):
        assert torch.allclose(a(x), b(x), rtol=1e-10, atol=1e-12)
    _run(eager, inputs).backward()
    _run(twin, inputs).backward()
    names = [n for n, _ in shared.named_parameters()]
    assert set(names) >= {"layer", "out", "inp", "height", "width"}
    for (name, p), q in zip(shared.named_parameters(), twin[0].shared.parameters()):
        assert p.grad is not None and p.grad.abs().max() > 0, name
        assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-12), name
    for a, b in zip(eager, twin):
        if a.bias is not None:
            assert torch.allclose(a.bias.grad, b.bias.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fmt", FORMATS)
def test_group_layers_equal_convolutions_with_the_numpy_reconstruction(fmt):
    shared = _shared(fmt)
    p = {n: t.detach().numpy() for n, t in shared.named_parameters()}
    if fmt == "tucker":
        full = D.reconstruct_tucker(p["core"], [p[n] for n in ("layer", "out", "inp", "height", "width")])
    elif fmt == "tt":
        full = D.reconstruct_tt([p["layer"][None], p["out"], p["inp"], p["height"], p["width"][:, :, None]])
    else:
        full = D.reconstruct_cp([p[n] for n in ("layer", "out", "inp", "height", "width")])
    views = _views(shared)
    x = torch.randn(2, 4, 8, 8, dtype=DT)
    weight = torch.from_numpy(full[1, :6, :4, 1:4, 1:4].copy())
    for offloaded in (False, True):
        views[1].offloaded = offloaded
        assert torch.allclose(views[1](x), F.conv2d(x, weight, stride=2, padding=1), rtol=1e-10, atol=1e-12)
    xl = torch.randn(2, 16, dtype=DT)
    linear_weight = torch.from_numpy(full[2, :5, :4, :2, :2].reshape(5, 16).copy())
    assert torch.allclose(views[2](xl), F.linear(xl, linear_weight, views[2].bias), rtol=1e-10, atol=1e-12)
    assert torch.allclose(shared.stacked(), torch.from_numpy(full), atol=1e-12)


def test_gradcheck_of_an_offloaded_group_layer():
    torch.manual_seed(2)
    shared = SharedNetwork("tucker", (2, 3, 3, 3, 3), (1, 2, 2, 2, 2), [Slot(0, 2, 3, (3, 3)), Slot(1, 3, 1, (1, 1), (1, 1))],
                           dtype=DT)
    for view, shape in ((GroupConv2d(shared, 0, stride=2, padding=1), (2, 3, 4, 4)), (GroupConv2d(shared, 1), (2, 1, 3, 3))):
        view.offloaded = True
        x = torch.randn(shape, dtype=DT, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, *p: view(x), (x, *view.parameters()), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- tensorize_group


def _small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 12), nn.ReLU(),
        nn.Linear(12, 3)).double()


def test_tensorize_group_at_full_rank_reproduces_the_model_and_shares_one_network():
    model, x = _small_model(), torch.randn(3, 2, 8, 8, dtype=DT)
    reference = model(x)
    tensorize_group(model, ["0", "2", "4"], format="tucker", rank=(3, 6, 6, 5, 5), verbose=False)
    tensorize_group(model, ["7", "9"], format="tt", rank=D.tt_max_ranks((2, 12, 12, 4, 4)), example_input=x,
                    verbose=False)
    assert torch.allclose(model(x), reference, rtol=1e-9, atol=1e-11)
    assert model[0].shared is model[2].shared is model[4].shared and model[7].shared is model[9].shared
    assert model[7].in_channels == 6 and model[7].geometry.kernel == (4, 4)  # (6, 4, 4) from the Flatten
    groups = model.lotus_groups
    assert [g.layers for g in groups] == [["0", "2", "4"], ["7", "9"]]
    assert all(err < 1e-10 for g in groups for err in g.errors.values())
    counted = sum(p.numel() for p in model.parameters())  # shared factors counted once
    assert counted == sum(g.params_after for g in groups)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensorize_group_compresses_offloads_and_trains(fmt):
    model, x = _small_model(), torch.randn(16, 2, 8, 8, dtype=DT)
    y = torch.randint(0, 3, (16,))
    dense_params = sum(p.numel() for p in model.parameters())
    tensorize_group(model, ["0", "2", "4", "7", "9"], format=fmt, rank=0.6,
                    example_input=x, verbose=False)
    assert sum(p.numel() for p in model.parameters()) < dense_params
    twin = copy.deepcopy(model)
    lotus_rt.offload(model)
    # the group layers run as their own task DAGs, the layers between them in whole-model regions
    assert all(model[k].offloaded for k in (0, 2, 4, 7, 9))
    assert {"0", "2", "4", "7", "9", "1", "6"} <= set(lotus_rt.nn.offloaded_layers(model))
    assert torch.allclose(model(x), twin(x), rtol=1e-10, atol=1e-12)
    if fmt != "tucker":  # one short training run is enough: the formats' gradients are checked above
        return
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]


def test_stable_cp_group_has_lower_sensitivity_than_plain():
    sens = {}
    for stable in (False, True):
        model = _small_model()
        tensorize_group(model, ["2", "4"], format="cp", rank=12, stable=stable, verbose=False)
        sens[stable] = D.cp_sensitivity([getattr(model[2].shared, n).detach().numpy()
                                         for n in ("layer", "out", "inp", "height", "width")])
    assert sens[True] < sens[False]


def test_resnet20_stages_group_by_shape():
    from lotus_rt.nn.models import resnet20
    model = resnet20(1)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
             and n.startswith("layer2.")]
    groups = same_shape_groups(model, convs)
    assert groups == [["layer2.0.conv1"], ["layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2", "layer2.2.conv1",
                                           "layer2.2.conv2"]]
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    reference = model(x)
    tensorize_group(model, groups[1], format="tucker", rank=(5, 32, 32, 3, 3), verbose=False)
    lotus_rt.offload(model)
    assert torch.allclose(model(x), reference, rtol=1e-4, atol=1e-5)  # float32, full rank


def test_bad_group_input_is_one_clear_error_before_any_change():
    model = _small_model()
    cases = [
        (dict(layers=["0", "nope"]), "no layer named 'nope'"),
        (dict(layers=["0", "1"]), "is a ReLU"),
        (dict(layers=["0", "0"]), "named twice"),
        (dict(layers="0"), "non-empty list"),
        (dict(layers=["0"], format="svd"), "format='svd' is not valid"),
        (dict(layers=["0"], format="tucker", stable=True), "needs format='cp'"),
        (dict(layers=["0", "2"], rank=(1, 2)), "rank"),
        (dict(layers=["7"], linear_views={"7": (5, 4, 4)}), "does not match"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            tensorize_group(model, verbose=False, **kwargs)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in (model[0], model[2], model[7]))
    shared = _shared("tucker")
    with pytest.raises(ValueError, match="GroupConv2d: expected an input"):
        GroupConv2d(shared, 1)(torch.randn(2, 3, 8, 8, dtype=DT))
    with pytest.raises(ValueError, match="does not fit"):
        SharedNetwork("tucker", (1, 4, 4, 3, 3), 2, [Slot(0, 5, 4, (3, 3))])
