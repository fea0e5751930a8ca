"""The MPS classifier's DMRG sweeps (lotus_rt.mps) against independent references.

Environments against a dense contraction of the whole MPS (numpy.einsum over every site), the
bond-tensor gradient and Gram product against torch autograd (float64), the SVD split against
the bond tensor it came from, batch tiling against the untiled sweep, the real-space sweep's
segments against each other (no handle written by one is touched by the other), a failing
codelet, and bad input (one ValueError before any task). Each test draws fresh random inputs.
"""
from __future__ import annotations

import copy
import string

import numpy as np
import pytest

import lotus_rt
from lotus_rt.mps import MPSClassifier, codelets, features, inference
from lotus_rt.mps import state as state_mod
from lotus_rt.mps.environments import Environments, TiledData, submit_initial, submit_left, submit_right, tile_ranges

D_LOCAL = features.LOCAL_DIM


# ---------------------------------------------------------------------------------- dense references

def dense_block(tensors: list[np.ndarray]) -> np.ndarray:
    """Contract consecutive site tensors (a, s, b) into W[a, s_0, ..., s_k, b] with numpy.einsum."""
    letters = iter(string.ascii_letters)
    bonds = [next(letters) for _ in range(len(tensors) + 1)]
    phys = [next(letters) for _ in tensors]
    terms = [bonds[k] + phys[k] + bonds[k + 1] for k in range(len(tensors))]
    return np.einsum(",".join(terms) + "->" + bonds[0] + "".join(phys) + bonds[-1], *tensors)


def product_states(feats: np.ndarray) -> np.ndarray:
    """(n, d^k): each sample's phi(x_0) (x) ... (x) phi(x_{k-1}), feats (n, k, d)."""
    out = feats[:, 0]
    for j in range(1, feats.shape[1]):
        out = (out[:, :, None] * feats[:, j, None, :]).reshape(len(feats), -1)
    return out


def normalized(rows: np.ndarray) -> np.ndarray:
    flat = rows.reshape(rows.shape[0], -1)
    return (flat / np.linalg.norm(flat, axis=1, keepdims=True)).reshape(rows.shape)


def random_state(rng, n_sites: int, dim: int, labels: int, center: int, dtype=np.float64) -> state_mod.MPSState:
    """A random MPS with generic (non-orthonormal) sites at the initial ranks."""
    st = state_mod.random(n_sites, dim, D_LOCAL, labels, center, rng.integers(1 << 30), dtype)
    for j in range(n_sites):
        rl, rr = st.ranks[j], st.ranks[j + 1]
        st.sites[j, :rl, :, :rr] = rng.standard_normal((rl, D_LOCAL, rr))
    st.center[:st.ranks[center], :, :st.ranks[center + 1]] = rng.standard_normal(
        (st.ranks[center], D_LOCAL, st.ranks[center + 1], labels))
    return st


# ---------------------------------------------------------------------------------- environments

def test_environments_match_a_dense_contraction(rt, rng):
    n_sites, dim, labels, center, n = 7, 3, 4, 3, 9
    st = random_state(rng, n_sites, dim, labels, center)
    pixels = rng.random((n, n_sites))
    feats = features.site_major(pixels, "cos-sin")
    data = TiledData(rt, feats, rng.integers(0, labels, n), ntiles=2)
    envs = Environments(rt, data, dim, labels, np.float64, labelled_cuts=([center + 1], [center]))
    sites = [rt.register(st.sites[j]) for j in range(n_sites)]
    center_h = rt.register(st.center)
    submit_initial(rt, data, envs, sites, center)
    # label-carrying environments through the centre, in both directions
    submit_left(rt, data, envs.main[center], center_h, envs.labelled_left[center + 1], center, "t")
    submit_right(rt, data, envs.main[center + 1], center_h, envs.labelled_right[center], center, "t")
    rt.wait()
    for h in sites + [center_h] + data.handles() + envs.handles():
        h.unregister()

    dense = [s[:st.ranks[j], :, :st.ranks[j + 1]] for j, s in enumerate(st.sites)]
    x = features.sample_major(pixels, "cos-sin")
    for k in range(1, center + 1):          # left environment of cut k: sites 0..k-1
        w = dense_block(dense[:k]).reshape(-1, st.ranks[k])         # (d^k, r_k), left bond of rank 1
        ref = normalized(product_states(x[:, :k]) @ w)
        np.testing.assert_allclose(envs.array[k, :, 0, :st.ranks[k]], ref, atol=1e-12)
        assert not envs.array[k, :, 0, st.ranks[k]:].any()
    for k in range(center + 1, n_sites):    # right environment of cut k: sites k..N-1
        w = dense_block(dense[k:]).reshape(st.ranks[k], -1)
        ref = normalized(product_states(x[:, k:]) @ w.T)
        np.testing.assert_allclose(envs.array[k, :, 0, :st.ranks[k]], ref, atol=1e-12)
    c = st.center[:st.ranks[center], :, :st.ranks[center + 1]]
    lab_left = np.einsum("na,ns,asbl->nlb", envs.array[center, :, 0, :st.ranks[center]], x[:, center], c)
    lab_right = np.einsum("nb,ns,asbl->nla", envs.array[center + 1, :, 0, :st.ranks[center + 1]], x[:, center], c)
    got_left, got_right = envs.labelled_array[0], envs.labelled_array[1]
    np.testing.assert_allclose(got_left[:, :, :st.ranks[center + 1]], normalized(lab_left), atol=1e-12)
    np.testing.assert_allclose(got_right[:, :, :st.ranks[center]], normalized(lab_right), atol=1e-12)


def test_scores_match_the_whole_mps_up_to_a_positive_factor(rt, rng):
    n_sites, dim, labels, center, n = 6, 4, 3, 2, 11
    st = random_state(rng, n_sites, dim, labels, center)
    pixels = rng.random((n, n_sites))
    got = inference.scores(rt, st, pixels, "linear", ntiles=3)
    dense = st.dense_sites()
    c = dense[center]
    left, right = dense_block(dense[:center]), dense_block(dense[center + 1:])
    whole = np.einsum("xa,asbl,bz->xszl", left.reshape(-1, left.shape[-1]), c, right.reshape(right.shape[0], -1))
    ref = product_states(features.sample_major(pixels, "linear")) @ whole.reshape(-1, labels)
    ratio = got / ref
    assert np.all(ratio > 0)
    np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones((1, labels)), rtol=1e-10)


# ---------------------------------------------------------------------------------- bond tensor

LABEL_PLACES = {"bond": (1, 4, 1), "left env": (4, 1, 1), "right env": (1, 1, 4),
                "bond + right env": (1, 4, 4), "left env + bond": (4, 4, 1)}


@pytest.mark.parametrize("place", list(LABEL_PLACES))
def test_bond_gradient_and_gram_product_match_torch_autograd(rt, rng, place):
    torch = pytest.importorskip("torch")
    le, lb, lr = LABEL_PLACES[place]
    n, dim, labels, ntiles = 13, 3, 4, 3
    left, right = rng.standard_normal((n, le, dim)), rng.standard_normal((n, lr, dim))
    phi1, phi2 = rng.random((n, D_LOCAL)), rng.random((n, D_LOCAL))
    bond, vec = (rng.standard_normal((dim, D_LOCAL, D_LOCAL, dim, lb)) for _ in range(2))
    y = rng.integers(0, labels, n)
    tiles = tile_ranges(n, ntiles)
    grads = [np.zeros(bond.size + 2) for _ in tiles]
    hvs = [np.zeros(bond.size) for _ in tiles]
    shared = [rt.register(bond), rt.register(vec)]
    handles, outs = list(shared), []
    for (a, b), g, hv in zip(tiles, grads, hvs):
        parts = [rt.register(np.ascontiguousarray(arr[a:b])) for arr in (left, phi1, phi2, right)]
        lab, hg, hh = rt.register(y[a:b].copy()), rt.register(g), rt.register(hv)
        rt.submit(codelets.BOND_GRAD, *[(h, "R") for h in parts], (shared[0], "R"), (lab, "R"), (hg, "W"))
        rt.submit(codelets.BOND_HV, *[(h, "R") for h in parts], (shared[1], "R"), (hh, "W"))
        handles += parts + [lab, hg, hh]
        outs.append((hg, hh))
    for k in (0, 1):  # a two-level sum tree: tile 1 into tile 0, then tile 2 into tile 0
        rt.submit(codelets.ADD, (outs[1][k], "R"), (outs[0][k], "RW"))
        rt.submit(codelets.ADD, (outs[2][k], "R"), (outs[0][k], "RW"))
    rt.wait()
    for h in handles:
        h.unregister()
    grad, hv = grads[0], hvs[0]

    wide = {"left": np.broadcast_to(left, (n, labels, dim)), "right": np.broadcast_to(right, (n, labels, dim)),
            "phi1": phi1, "phi2": phi2}
    t = {k: torch.tensor(np.array(v), dtype=torch.float64) for k, v in wide.items()}
    b = torch.tensor(bond, requires_grad=True)
    v = torch.tensor(vec, requires_grad=True)

    def scores(w):
        wl = w.expand(*w.shape[:4], labels)
        return torch.einsum("nla,ns,nt,astbl,nlb->nl", t["left"], t["phi1"], t["phi2"], wl, t["right"])

    f = scores(b)
    err = f - torch.nn.functional.one_hot(torch.tensor(y), labels).double()
    (0.5 * (err ** 2).sum()).backward()
    (0.5 * (scores(v) ** 2).sum()).backward()   # its gradient is H v = sum_n Phi_n <Phi_n, v>
    np.testing.assert_allclose(grad[:-2].reshape(bond.shape), b.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(hv.reshape(vec.shape), v.grad.numpy(), rtol=1e-10, atol=1e-10)
    assert grad[-2] == pytest.approx(float((err ** 2).sum().detach()), rel=1e-12)
    assert grad[-1] == int((f.argmax(1).numpy() == y).sum())


@pytest.mark.parametrize("direction", ["right", "left"])
def test_matrix_split_is_the_best_truncation_of_a_rectangular_bond(rt, rng, direction):
    rows, cols, rank = 24, 7, 5
    m = (rng.standard_normal((rows, rank)) * np.geomspace(1, 1e-3, rank)) @ rng.standard_normal((rank, cols))
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    for max_rank, cutoff, kept_expected in ((9, 0.0, rank), (3, 0.0, 3), (9, 1e-5, None)):
        cap = min(max_rank, rows, cols)
        left, right, info = np.zeros((rows, cap)), np.zeros((cap, cols)), np.zeros(3)
        hs = [rt.register(a) for a in (m, left, right, info)]
        rt.submit(codelets.SPLIT_MATRIX, (hs[0], "R"), (hs[1], "W"), (hs[2], "W"), (hs[3], "W"),
                  direction=direction, max_rank=max_rank, cutoff=cutoff)
        rt.wait()
        for h in hs:
            h.unregister()
        k = int(info[0])
        if kept_expected is None:   # the smallest rank within the cutoff, found from numpy's values
            kept_expected = next(j for j in range(1, rank + 1) if (s[j:] ** 2).sum() <= 1e-5 * (s ** 2).sum())
        assert k == kept_expected and not left[:, k:].any() and not right[k:].any()
        best = (u[:, :k] * s[:k]) @ vt[:k]               # Eckart-Young: the best rank-k approximation
        np.testing.assert_allclose(left @ right, best, atol=1e-12)
        orthonormal = left[:, :k] if direction == "right" else right[:k].T
        np.testing.assert_allclose(orthonormal.T @ orthonormal, np.eye(k), atol=1e-12)
        assert info[1] == pytest.approx((s[k:] ** 2).sum() / (s ** 2).sum(), rel=1e-8, abs=1e-14)


@pytest.mark.parametrize("direction", ["right", "left"])
def test_svd_split_reproduces_the_bond_within_its_truncation(rt, rng, direction):
    dim, labels, rank = 6, 3, 5
    # a bond tensor of known rank across the cut, padded to the capacity dim
    a = rng.standard_normal((4 * D_LOCAL if direction == "right" else 4 * D_LOCAL * labels, rank))
    b = rng.standard_normal((rank, 4 * D_LOCAL * labels if direction == "right" else 4 * D_LOCAL))
    bond = np.zeros((dim, D_LOCAL, D_LOCAL, dim, labels))
    core = (a * np.geomspace(1, 1e-3, rank)) @ b
    if direction == "right":
        bond[:4, :, :, :4, :] = core.reshape(4, D_LOCAL, D_LOCAL, 4, labels)
    else:
        bond[:4, :, :, :4, :] = core.reshape(4, D_LOCAL, labels, D_LOCAL, 4).transpose(0, 1, 3, 4, 2)
    for max_rank, cutoff in ((dim, 0.0), (3, 0.0), (dim, 1e-7)):
        site = np.zeros((dim, D_LOCAL, dim))
        center = np.zeros((dim, D_LOCAL, dim, labels))
        info, back = np.zeros(3), np.zeros_like(bond)
        outs = (site, center) if direction == "right" else (center, site)
        hs = [rt.register(arr) for arr in (bond, *outs, info, back)]
        rt.submit(codelets.SPLIT, (hs[0], "R"), (hs[1], "W"), (hs[2], "W"), (hs[3], "W"),
                  direction=direction, max_rank=max_rank, cutoff=cutoff)
        rt.submit(codelets.MERGE, (hs[1], "R"), (hs[2], "R"), (hs[4], "W"),
                  center="right" if direction == "right" else "left")
        rt.wait()
        for h in hs:
            h.unregister()
        kept = int(info[0])
        s = np.linalg.svd(core, compute_uv=False)
        expected = rank if cutoff == 0.0 and max_rank >= rank else min(max_rank, int(np.argmax(
            np.append(np.cumsum((s ** 2)[::-1])[::-1], 0) <= cutoff * (s ** 2).sum())))
        assert kept == expected
        discarded = float(((bond - back) ** 2).sum() / (bond ** 2).sum())
        assert discarded == pytest.approx(info[1], rel=1e-8, abs=1e-14)
        assert info[1] == pytest.approx((s[kept:] ** 2).sum() / (s ** 2).sum(), rel=1e-8, abs=1e-14)
        if kept == rank:
            np.testing.assert_allclose(back, bond, atol=1e-12)
        iso = site.reshape(dim * D_LOCAL, dim) if direction == "right" else site.reshape(dim, -1).T
        np.testing.assert_allclose(iso.T @ iso, np.diag([1.0] * kept + [0.0] * (dim - kept)), atol=1e-12)


def test_label_copy_keeps_the_model(rt, rng):
    """The real-space fork: centre (x) label_copy(site), joined element-wise in l, is the
    serial bond tensor centre (x) site."""
    dim, labels = 4, 3
    c0, site = rng.standard_normal((dim, D_LOCAL, dim, labels)), rng.standard_normal((dim, D_LOCAL, dim))
    c1 = np.zeros((dim, D_LOCAL, dim, labels))
    both, plain = np.zeros((dim, 2, 2, dim, labels)), np.zeros((dim, 2, 2, dim, labels))
    hs = [rt.register(a) for a in (c0, site, c1, both, plain)]
    rt.submit(codelets.LABEL_COPY, (hs[1], "R"), (hs[2], "W"))
    rt.submit(codelets.MERGE, (hs[0], "R"), (hs[2], "R"), (hs[3], "W"), center="both")
    rt.submit(codelets.MERGE, (hs[0], "R"), (hs[1], "R"), (hs[4], "W"), center="left")
    rt.wait()
    for h in hs:
        h.unregister()
    np.testing.assert_allclose(both, np.einsum("ascl,ctb->astbl", c0, site), atol=1e-12)
    np.testing.assert_allclose(both, plain, atol=1e-12)


# ---------------------------------------------------------------------------------- sweeps

def toy_problem(rng, n: int = 160, n_sites: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Three classes told apart by the mean brightness of three groups of pixels."""
    y = rng.integers(0, 3, n)
    x = rng.random((n, n_sites)) * 0.3
    for k in range(3):
        x[y == k, k::3] += 0.6
    return np.clip(x, 0, 1), y


def test_batch_tiles_give_the_serial_sweeps_results(inline_rt, rng):
    x, y = toy_problem(rng)
    kw = dict(n_labels=3, sweeps=2, dtype="float64", seed=3, runtime=inline_rt, reg=1e-4)
    serial = MPSClassifier(10, 4, sweep="serial", **kw).fit(x, y)
    batch = MPSClassifier(10, 4, sweep="batch", ntiles=3, **kw).fit(x, y)
    a, b = serial.decision_function(x), batch.decision_function(x)
    np.testing.assert_allclose(a / np.linalg.norm(a, axis=1, keepdims=True),
                               b / np.linalg.norm(b, axis=1, keepdims=True), atol=1e-8)
    assert [h.bond_train_accuracy for h in serial.history_] == [h.bond_train_accuracy for h in batch.history_]
    assert serial.state_.ranks == batch.state_.ranks
    assert serial.score(x, y) > 0.9


class RecordingRuntime:
    """Passes everything to a runtime and records (task name, [(handle, mode)]) of each submit."""

    def __init__(self, rt):
        self._rt, self.log = rt, []

    def submit(self, codelet, *accesses, **kwargs):
        self.log.append((kwargs.get("name") or codelet.name, accesses))
        return self._rt.submit(codelet, *accesses, **kwargs)

    def __getattr__(self, name):
        return getattr(self._rt, name)


def test_realspace_segments_are_independent_task_graphs(inline_rt, rng, monkeypatch):
    """No handle one segment writes is read or written by the other, so StarPU may run them
    side by side; with tiles, the real-space sweep does the same math as without."""
    x, y = toy_problem(rng)
    rec = RecordingRuntime(inline_rt)
    kw = dict(n_labels=3, sweeps=2, dtype="float64", seed=5, reg=1e-4, sweep="realspace")
    clf = MPSClassifier(10, 4, runtime=inline_rt, **kw)
    monkeypatch.setattr(clf, "_rt", lambda: rec)
    clf.fit(x, y)
    touched = {"left": {}, "right": {}}
    for name, accesses in rec.log:
        seg = name.split(".")[0]
        if seg in touched:
            for handle, mode in accesses:
                touched[seg].setdefault(id(handle), set()).add(mode)
    assert touched["left"] and touched["right"]
    for a, b in (("left", "right"), ("right", "left")):
        written = {h for h, modes in touched[a].items() if modes - {"R"}}
        assert not written & set(touched[b]), f"the {a} segment writes a handle the {b} segment uses"
    tiled = MPSClassifier(10, 4, runtime=inline_rt, ntiles=2, **kw).fit(x, y)
    p, q = clf.decision_function(x), tiled.decision_function(x)
    np.testing.assert_allclose(p / np.linalg.norm(p, axis=1, keepdims=True),
                               q / np.linalg.norm(q, axis=1, keepdims=True), atol=1e-8)
    serial = MPSClassifier(10, 4, runtime=inline_rt, n_labels=3, sweeps=2, dtype="float64", seed=5, reg=1e-4)
    assert clf.score(x, y) >= serial.fit(x, y).score(x, y) - 0.05 and clf.score(x, y) > 0.9


def test_fit_on_starpu_learns_8x8_digits(starpu_rt):
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order] / 16.0, y[order]
    clf = MPSClassifier(64, 8, sweeps=2, sweep="realspace", reg=1e-3, seed=1)
    clf.fit(x[360:1200], y[360:1200], x_val=x[:360], y_val=y[:360])
    assert clf.history_[-1].val_accuracy > 0.85
    assert clf.score(x[:360], y[:360]) == pytest.approx(clf.history_[-1].val_accuracy)
    assert all(1 <= r <= 8 for r in clf.state_.ranks)


# ---------------------------------------------------------------------------------- failures

def test_a_failing_codelet_is_a_codelet_error_and_the_runtime_stays_usable(rt, rng, monkeypatch):
    x, y = toy_problem(rng, n=40, n_sites=6)
    kw = dict(n_labels=3, sweeps=1, runtime=rt, sweep="realspace")

    def broken(*args, **kwargs):
        raise FloatingPointError("injected")

    monkeypatch.setattr(codelets.SPLIT, "cpu", broken)
    with pytest.raises(lotus_rt.CodeletError, match="injected") as info:
        MPSClassifier(6, 3, **kw).fit(x, y)
    assert info.value.codelet == "mps_svd_split"
    monkeypatch.undo()
    clf = MPSClassifier(6, 3, **kw).fit(x, y)
    assert clf.predict(x).shape == (40,)


BAD_INPUT = [
    (dict(bond_dim=0), None, "bond_dim=0"),
    (dict(bond_dim=2.5), None, "bond_dim=2.5"),
    (dict(feature_map="rbf"), None, "feature_map='rbf'"),
    (dict(sweep="tree"), None, "sweep='tree'"),
    (dict(n_sites=3, sweep="realspace"), None, "n_sites >= 4"),
    (dict(solver="adam"), None, "solver='adam'"),
    (dict(reg=-1.0), None, "reg=-1.0"),
    (dict(cutoff=1.0), None, "cutoff=1.0"),
    ({}, lambda x, y: (x[:, :5], y), "5 values per sample"),
    ({}, lambda x, y: (x[0], y), "shape"),
    ({}, lambda x, y: (x, np.where(y == 0, 3, y)), "outside 0..2"),
    ({}, lambda x, y: (x, y[:-1]), "labels"),
    ({}, lambda x, y: (x, y + 0.5), "integer"),
    ({}, lambda x, y: (x * 255, y), r"\[0, 1\]"),
    ({}, lambda x, y: (np.where(x > 0.5, np.nan, x), y), "NaN"),
]


@pytest.mark.parametrize("params, mangle, message", BAD_INPUT)
def test_bad_input_is_one_value_error_before_any_task(rt, rng, params, mangle, message):
    x, y = toy_problem(rng, n=30, n_sites=6)
    before = sum(s.tasks for s in rt.stats())
    registered = {id(h) for h in rt._live if h.registered}  # other tests' models may hold theirs
    with pytest.raises(ValueError, match=message):
        kw = dict(n_sites=6, bond_dim=3, n_labels=3, runtime=rt) | params
        clf = MPSClassifier(**kw)
        clf.fit(*(mangle(x, y) if mangle else (x, y)))
    assert sum(s.tasks for s in rt.stats()) == before
    assert not [h for h in rt._live if h.registered and id(h) not in registered]


def test_predict_before_fit_and_bad_validation_set(rt, rng):
    x, y = toy_problem(rng, n=30, n_sites=6)
    clf = MPSClassifier(6, 3, n_labels=3, runtime=rt)
    with pytest.raises(ValueError, match="not fitted"):
        clf.predict(x)
    with pytest.raises(ValueError, match="x_val and y_val"):
        clf.fit(x, y, x_val=x)


# ---------------------------------------------------------------------------------- torch peer, TT DMRG

def test_torch_peer_scores_match_the_runtime_inference(rt, rng):
    torch = pytest.importorskip("torch")
    from lotus_rt.nn.mps_torch import TorchMPS
    n_sites, dim, labels = 9, 5, 3
    model = TorchMPS(n_sites, dim, n_labels=labels, init_std=0.5, dtype=torch.float64, seed=int(rng.integers(1000)))
    pixels = rng.random((12, n_sites))
    with torch.no_grad():
        ours = model(model.phi(pixels)).numpy()
    st = state_mod.MPSState(model.sites.detach().numpy().copy(), model.center.detach().numpy().copy(),
                            model.center_site, [1] + [dim] * (n_sites - 1) + [1])
    ref = inference.scores(rt, st, pixels, "cos-sin", ntiles=2)
    np.testing.assert_allclose(ours / np.linalg.norm(ours, axis=1, keepdims=True),
                               ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-10)


@pytest.mark.parametrize("bond", [0, 1, 2])
def test_tt_bond_gradient_matches_torch_autograd(bond):
    torch = pytest.importorskip("torch")
    from lotus_rt import tn
    from lotus_rt.nn.dmrg import bond_gradient_equation
    torch.manual_seed(bond)
    in_shape, out_shape, d = (2, 3, 2, 2), (3, 2, 2, 2), 4
    layer = lotus_rt.TTLinear(in_shape, out_shape, 3, dtype=torch.float64)
    x, w = torch.randn(6, 24, dtype=torch.float64), torch.randn(6, 24, dtype=torch.float64)
    cores = [c.detach() for c in layer.cores]
    merged = torch.einsum("aiob,bjpc->aiojpc", cores[bond], cores[bond + 1]).requires_grad_()
    parts = cores[:bond] + [merged] + cores[bond + 2:]
    weight = parts[0]
    for p in parts[1:]:   # dense weight, in/out interleaved, built up from the left
        weight = torch.tensordot(weight, p, dims=([weight.dim() - 1], [0]))
    weight = weight.reshape([1] + [n for pair in zip(in_shape, out_shape) for n in pair] + [1])
    perm = [1 + 2 * j for j in range(d)] + [2 + 2 * j for j in range(d)]
    dense = weight[0, ..., 0].permute([p - 1 for p in perm]).reshape(24, 24)
    ((x @ dense) * w).sum().backward()
    ops = [c.numpy()[0] if j == 0 else c.numpy()[..., 0] if j == d - 1 else c.numpy()
           for j, c in enumerate(cores) if j not in (bond, bond + 1)]
    grad = tn.einsum(bond_gradient_equation(d, bond), x.numpy().reshape((6,) + in_shape).copy(),
                     w.numpy().reshape((6,) + out_shape).copy(), *[np.ascontiguousarray(o) for o in ops])
    np.testing.assert_allclose(grad.reshape(merged.shape), merged.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_dmrg_optimizer_fits_a_tt_layer_and_adapts_ranks():
    torch = pytest.importorskip("torch")
    from lotus_rt.nn.dmrg import DMRGOptimizer, make_optimizer
    torch.manual_seed(0)
    teacher = lotus_rt.TTLinear((4, 4, 4), (2, 4, 2), 3, bias=False, dtype=torch.float64)
    student = lotus_rt.TTLinear((4, 4, 4), (2, 4, 2), 2, bias=False, dtype=torch.float64)
    x = torch.randn(256, 64, dtype=torch.float64)
    with torch.no_grad():
        target, before = teacher(x), student(x)
    opt = DMRGOptimizer(student, lr=0.5, max_rank=6, cutoff=0.0)
    with torch.no_grad():   # building the optimiser canonicalises the cores: same function
        torch.testing.assert_close(student(x), before)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = ((student(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.05 * losses[0]
    assert max(student.ranks) == 6 and student.ranks[0] == student.ranks[-1] == 1   # grew to the cap
    assert [tuple(c.shape[::3]) for c in student.cores] == list(zip(student.ranks[:-1], student.ranks[1:]))
    small = DMRGOptimizer(student, lr=0.5, max_rank=2)
    for _ in range(4):
        small.zero_grad()
        ((student(x) - target) ** 2).mean().backward()
        small.step()
    assert max(student.ranks) == 2   # truncated by the SVD split
    model = torch.nn.Sequential(torch.nn.Linear(3, 64), student)
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        make_optimizer("sgd", model, lr=0.1)
    with pytest.raises(ValueError, match="TTLinear"):
        make_optimizer("dmrg", torch.nn.Linear(3, 3), lr=0.1)
    combined = make_optimizer("dmrg", model, lr=0.1)
    assert combined.others is not None and combined.layers == [student]


def _dmrg_net(torch):
    return torch.nn.Sequential(torch.nn.Linear(12, 64), torch.nn.ReLU(),
                               lotus_rt.TTLinear((4, 4, 4), (2, 4, 2), 2, dtype=torch.float64),
                               torch.nn.ReLU(), torch.nn.Linear(16, 3)).double()


def test_dmrg_on_a_whole_offloaded_model_matches_torch_and_keeps_the_graph():
    torch = pytest.importorskip("torch")
    from lotus_rt.nn.convert import offloaded_layers
    from lotus_rt.nn.dmrg import make_optimizer
    torch.manual_seed(1)
    reference = _dmrg_net(torch)
    offloaded = lotus_rt.offload(copy.deepcopy(reference))
    assert "2" in offloaded_layers(offloaded)  # the TT layer starts inside the graph
    x, y = torch.randn(40, 12, dtype=torch.float64), torch.randint(0, 3, (40,))
    runs = []
    for model in (reference, offloaded):
        opt = make_optimizer("dmrg", model, lr=0.2, max_rank=5, cutoff=0.0)
        losses, ranks = [], []
        for _ in range(6):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            ranks.append(model[2].ranks)
        runs.append((losses, ranks, model))
    (ref_losses, ref_ranks, _), (losses, ranks, _) = runs
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-10)
    assert ranks == ref_ranks and max(ranks[-1]) > 2   # the ranks grew, the same way in both
    assert losses[-1] < losses[0]
    for a, b in zip(reference.parameters(), offloaded.parameters()):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-9, atol=1e-12)
    whole = offloaded.__dict__["_lotus_whole"]
    assert set(whole.region_modules()) == {"0", "1", "3", "4"} and not whole.kept  # the TT layer between regions
    assert offloaded[2].offloaded                                                  # as its own task DAG


def test_dmrg_optimizer_built_after_a_whole_offload_says_how_to_build_it():
    torch = pytest.importorskip("torch")
    from lotus_rt.nn.dmrg import DMRGOptimizer
    model = lotus_rt.offload(_dmrg_net(torch))
    opt = DMRGOptimizer(model[2], lr=0.1)
    opt.zero_grad()
    model(torch.randn(8, 12, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match="make_optimizer"):
        opt.step()


def test_cli_prints_one_line_per_sweep_off_a_terminal(run_py, describe_proc):
    args = ["mps", "--size", "7", "--train", "300", "--test", "100", "--bond-dim", "3", "--sweeps", "2",
            "--shifts", "4"]
    proc = run_py("import sys; from lotus_rt import cli; sys.exit(cli.main(sys.argv[1:]))", args=args, timeout=120)
    assert proc.returncode == 0, describe_proc(proc)
    lines = proc.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines if ln.startswith("sweep ")] == ["sweep 1/2", "sweep 2/2"]
    assert any(ln.startswith("test accuracy ") for ln in lines) and "bond/s" not in proc.stdout + proc.stderr
    assert "300 training / 100 test images (0 of them shifted by one pixel)" in proc.stdout  # originals first
    bad = run_py("import sys; from lotus_rt import cli; sys.exit(cli.main(sys.argv[1:]))",
                 args=["mps", "--bond-dim", "0"], timeout=60)
    assert bad.returncode == 2 and "bond_dim=0 must be an integer >= 1" in bad.stderr
