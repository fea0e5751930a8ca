"""lotus_rt.decompose: Tucker-2 (HOSVD + HOOI), CP-ALS, TT-SVD, rank helpers and EVBMF.

Every input is drawn fresh from a seeded generator (never zeros or ones); the assertions compare
against independent computations (SVDs done here, manual einsums of the documented layouts).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from lotus_rt import decompose as D


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _orthonormal(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((n, r)))[0]


def _assert_orthonormal(columns: np.ndarray, atol: float = 1e-10) -> None:
    np.testing.assert_allclose(columns.T @ columns, np.eye(columns.shape[1]), atol=atol)


def _tucker_tensor(rng, shape, r_in, r_out, noise):
    """Exactly Tucker-2 rank (r_in, r_out) tensor plus Gaussian noise of relative size ``noise``."""
    o, i, kh, kw = shape
    clean = D.reconstruct_tucker2(rng.standard_normal((r_out, r_in, kh, kw)),
                                  _orthonormal(rng, i, r_in), _orthonormal(rng, o, r_out))
    n = rng.standard_normal(shape)
    n *= noise * np.linalg.norm(clean) / np.linalg.norm(n)
    return clean + n, clean


# ----------------------------------------------------------------------------- Tucker-2

def test_tucker2_full_rank_reproduces_the_weight():
    w = _rng(0).standard_normal((7, 5, 3, 3))
    core, first, last = D.tucker2(w, (5, 7))
    assert core.shape == (7, 5, 3, 3) and first.shape == (5, 5) and last.shape == (7, 7)
    assert D.relative_error(D.reconstruct_tucker2(core, first, last), w) < 1e-10


def test_tucker2_full_rank_with_more_channels_than_unfolding_columns():
    """1x1 conv with O > I: the mode-0 unfolding has fewer columns than R_out = O."""
    w = _rng(1).standard_normal((9, 4, 1, 1))
    core, first, last = D.tucker2(w, 100)
    assert (first.shape, last.shape) == ((4, 4), (9, 9))
    _assert_orthonormal(last)
    assert D.relative_error(D.reconstruct_tucker2(core, first, last), w) < 1e-10


def _hosvd_error(w: np.ndarray, r_in: int, r_out: int) -> float:
    u0 = np.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)[0][:, :r_out]
    u1 = np.linalg.svd(np.moveaxis(w, 1, 0).reshape(w.shape[1], -1), full_matrices=False)[0][:, :r_in]
    core = np.einsum("oihw,os,ir->srhw", w, u0, u1)
    approx = np.einsum("srhw,os,ir->oihw", core, u0, u1)
    return float(np.linalg.norm(approx - w) / np.linalg.norm(w))


def test_tucker2_low_rank_is_no_worse_than_hosvd_and_orthonormal():
    w = _rng(2).standard_normal((12, 10, 3, 3))
    r_in, r_out = 4, 5
    hosvd = _hosvd_error(w, r_in, r_out)
    core, first, last = D.tucker2(w, (r_in, r_out))
    assert core.shape == (r_out, r_in, 3, 3) and first.shape == (10, r_in) and last.shape == (12, r_out)
    _assert_orthonormal(first)
    _assert_orthonormal(last)
    err = D.relative_error(D.reconstruct_tucker2(core, first, last), w)
    assert err <= hosvd + 1e-12
    assert err < hosvd - 1e-4  # on a random tensor HOOI does improve on its HOSVD start
    # no HOOI sweep: exactly the HOSVD truncation computed here
    core0, first0, last0 = D.tucker2(w, (r_in, r_out), n_iter_max=0)
    assert D.relative_error(D.reconstruct_tucker2(core0, first0, last0), w) == pytest.approx(hosvd, rel=1e-9)
    # the core is the projection of W on the factors
    np.testing.assert_allclose(core, np.einsum("oihw,os,ir->srhw", w, last, first), atol=1e-12)


def test_tucker2_recovers_a_low_rank_tensor_to_the_noise_level():
    noise = 1e-6
    w, clean = _tucker_tensor(_rng(3), (16, 12, 3, 3), r_in=3, r_out=5, noise=noise)
    core, first, last = D.tucker2(w, (3, 5))
    approx = D.reconstruct_tucker2(core, first, last)
    assert D.relative_error(approx, w) <= noise * 1.01
    assert D.relative_error(approx, clean) <= noise  # the fit removes noise outside the subspaces
    # a rank too small is far off
    c2, f2, l2 = D.tucker2(w, (2, 5))
    assert D.relative_error(D.reconstruct_tucker2(c2, f2, l2), w) > 1e-2


def test_tucker2_accepts_every_rank_form():
    w, _ = _tucker_tensor(_rng(4), (10, 8, 3, 3), r_in=3, r_out=4, noise=1e-3)
    assert D.tucker2(w, 3)[0].shape == (3, 3, 3, 3)
    r_in, r_out = D.tucker2_ranks(w.shape, 0.3)
    assert D.tucker2(w, 0.3)[0].shape == (r_out, r_in, 3, 3)
    assert D.tucker2(w, "vbmf")[0].shape[:2] == D.tucker2_ranks(w, "vbmf")[::-1]


# ----------------------------------------------------------------------------- CP

def _cp_tensor(rng, shape, rank):
    factors = [rng.standard_normal((n, rank)) for n in shape]
    return D.reconstruct_cp(factors), factors


def test_cp_recovers_a_rank_3_tensor():
    w, _ = _cp_tensor(_rng(5), (8, 6, 3, 3), 3)
    factors = D.cp(w, 3)
    assert [f.shape for f in factors] == [(8, 3), (6, 3), (3, 3), (3, 3)]
    assert D.relative_error(D.reconstruct_cp(factors), w) < 1e-3
    for f in factors[1:]:  # the weights are absorbed in A_o
        np.testing.assert_allclose(np.linalg.norm(f, axis=0), 1.0, rtol=1e-12)


def test_cp_fit_improves_with_rank():
    w = _rng(6).standard_normal((8, 6, 3, 3))
    errors = [D.relative_error(D.reconstruct_cp(D.cp(w, r)), w) for r in (1, 2, 4, 8, 16)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > 0.5 and errors[-1] < errors[0] - 0.3


def test_cp_als_general_n_way():
    rng = _rng(7)
    t, _ = _cp_tensor(rng, (5, 4, 6), 2)
    weights, factors = D.cp_als(t, 2)
    assert weights.shape == (2,) and weights[0] >= weights[1] > 0
    for f in factors:
        np.testing.assert_allclose(np.linalg.norm(f, axis=0), 1.0, rtol=1e-12)
    assert D.relative_error(D.reconstruct_cp(factors, weights), t) < 1e-4
    m = rng.standard_normal((6, 3)) @ rng.standard_normal((3, 9))  # 2-way: a rank-3 matrix
    weights, factors = D.cp_als(m, 3)
    assert D.relative_error(D.reconstruct_cp(factors, weights), m) < 1e-4


def test_cp_rank_above_mode_sizes_and_seed():
    """rank > kh, kw: the HOSVD start is padded with seeded random columns."""
    w = _rng(8).standard_normal((6, 5, 2, 2))
    a = D.cp(w, 7, n_iter_max=30, seed=3)
    b = D.cp(w, 7, n_iter_max=30, seed=3)
    c = D.cp(w, 7, n_iter_max=30, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.allclose(x, y) for x, y in zip(a, c))
    assert all(np.all(np.isfinite(f)) for f in a)


def test_cp_ridge_keeps_a_degenerate_problem_bounded():
    """a⊗a⊗b + a⊗b⊗a + b⊗a⊗a has rank 3 but border rank 2: rank-2 ALS components diverge."""
    a, b = _orthonormal(_rng(9), 5, 2).T
    t = (np.einsum("i,j,k->ijk", a, a, b) + np.einsum("i,j,k->ijk", a, b, a)
         + np.einsum("i,j,k->ijk", b, a, a))
    free_short = D.cp_als(t, 2, ridge=0.0, n_iter_max=200, tol=0.0)[0]
    free_long = D.cp_als(t, 2, ridge=0.0, n_iter_max=1500, tol=0.0)[0]
    ridge_short = D.cp_als(t, 2, ridge=1e-3, n_iter_max=200, tol=0.0)[0]
    ridge_long = D.cp_als(t, 2, ridge=1e-3, n_iter_max=1500, tol=0.0)[0]
    assert free_long.max() > 1.3 * free_short.max()  # without a ridge the weights keep growing
    assert ridge_long.max() < 1.01 * ridge_short.max() < free_long.max()
    assert np.all(np.isfinite(ridge_long))


# ----------------------------------------------------------------------------- TT-matrix

IN_SHAPE, OUT_SHAPE = (2, 3, 4), (3, 2, 2)


def _manual_tt_dense(cores):
    """W[o, i] from the documented layout G_k[r_{k-1}, i_k, o_k, r_k], by one explicit einsum."""
    full = np.einsum("aiob,bjpc,ckqd->opqijk", *cores)  # a = d = 0 (size 1)
    return full.reshape(math.prod(OUT_SHAPE), math.prod(IN_SHAPE))


def _random_tt(rng, ranks):
    r = [1, *ranks, 1]
    return [rng.standard_normal((r[k], IN_SHAPE[k], OUT_SHAPE[k], r[k + 1])) for k in range(3)]


def test_tt_full_rank_is_exact():
    w = _rng(10).standard_normal((math.prod(OUT_SHAPE), math.prod(IN_SHAPE)))
    cores = D.tt_matrix(w, IN_SHAPE, OUT_SHAPE, 1000)
    # maximal ranks: min(6, 24) = 6, min(36, 8) = 8
    assert [c.shape for c in cores] == [(1, 2, 3, 6), (6, 3, 2, 8), (8, 4, 2, 1)]
    assert D.relative_error(D.reconstruct_tt_matrix(cores, IN_SHAPE, OUT_SHAPE), w) < 1e-12


def test_tt_recovers_known_ranks_exactly():
    cores_true = _random_tt(_rng(11), (2, 3))
    w = _manual_tt_dense(cores_true)
    cores = D.tt_matrix(w, IN_SHAPE, OUT_SHAPE, [2, 3])
    assert [c.shape for c in cores] == [(1, 2, 3, 2), (2, 3, 2, 3), (3, 4, 2, 1)]
    assert D.relative_error(D.reconstruct_tt_matrix(cores, IN_SHAPE, OUT_SHAPE), w) < 1e-12
    too_small = D.tt_matrix(w, IN_SHAPE, OUT_SHAPE, [2, 2])
    assert D.relative_error(D.reconstruct_tt_matrix(too_small, IN_SHAPE, OUT_SHAPE), w) > 1e-3


def test_tt_layout_matches_the_documented_einsum():
    rng = _rng(12)
    cores = _random_tt(rng, (3, 2))
    w = D.reconstruct_tt_matrix(cores, IN_SHAPE, OUT_SHAPE)
    np.testing.assert_allclose(w, _manual_tt_dense(cores), atol=1e-12)
    # the layer's forward: y[b, o1..od] = sum x[b, i1..id] prod_k G_k[r_{k-1}, i_k, o_k, r_k] = x @ W.T
    x = rng.standard_normal((5, math.prod(IN_SHAPE)))
    y = np.einsum("zijk,aiob,bjpc,ckqd->zopq", x.reshape((5,) + IN_SHAPE), *cores)
    np.testing.assert_allclose(y.reshape(5, -1), x @ w.T, atol=1e-12)
    # and the decomposition of that weight is read back by the same einsum
    back = D.tt_matrix(w, IN_SHAPE, OUT_SHAPE, [3, 2])
    np.testing.assert_allclose(_manual_tt_dense(back), w, atol=1e-11)


def test_tt_single_core_and_unit_modes():
    w = _rng(13).standard_normal((3, 4))
    cores = D.tt_matrix(w, (4,), (3,), 5)
    assert [c.shape for c in cores] == [(1, 4, 3, 1)]
    np.testing.assert_allclose(D.reconstruct_tt_matrix(cores, (4,), (3,)), w, atol=1e-14)
    w = _rng(14).standard_normal((6, 8))
    cores = D.tt_matrix(w, (8, 1), (3, 2), 100)
    assert D.relative_error(D.reconstruct_tt_matrix(cores, (8, 1), (3, 2)), w) < 1e-12


def test_tt_reconstruct_rejects_mismatched_cores():
    cores = _random_tt(_rng(15), (2, 3))
    with pytest.raises(ValueError, match="core shapes"):
        D.reconstruct_tt_matrix(cores, (2, 3, 4), (3, 2, 3))
    with pytest.raises(ValueError, match="not"):
        D.tt_matrix(np.ones((5, 5)) + _rng(16).standard_normal((5, 5)), IN_SHAPE, OUT_SHAPE, 2)


# ----------------------------------------------------------------------------- rank helpers

def _tucker2_params(shape, r_in, r_out):
    o, i, kh, kw = shape
    return i * r_in + r_in * r_out * kh * kw + r_out * o


def test_tucker2_ranks_int_and_pair():
    assert D.tucker2_ranks((16, 8, 3, 3), 4) == (4, 4)
    assert D.tucker2_ranks((16, 8, 3, 3), 12) == (8, 12)
    assert D.tucker2_ranks((16, 8, 3, 3), (5, 9)) == (5, 9)
    assert D.tucker2_ranks([16, 8, 3, 3], [5, 9]) == (5, 9)


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (128, 128, 3, 3), (10, 200, 5, 5), (48, 16, 1, 1)])
@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.6, 1.0])
def test_tucker2_ranks_fraction_within_budget_and_maximal(shape, fraction):
    o, i = shape[:2]
    budget = fraction * math.prod(shape)
    r_in, r_out = D.tucker2_ranks(shape, fraction)
    assert 1 <= r_in <= i and 1 <= r_out <= o
    if _tucker2_params(shape, 1, 1) > budget:  # below the smallest Tucker-2: ranks (1, 1)
        assert (r_in, r_out) == (1, 1)
        return
    assert _tucker2_params(shape, r_in, r_out) <= budget
    # maximal: one more on either rank breaks the budget or the channel count
    assert r_in == i or _tucker2_params(shape, r_in + 1, r_out) > budget
    assert r_out == o or _tucker2_params(shape, r_in, r_out + 1) > budget
    assert _tucker2_params(shape, r_in, r_out) > 0.75 * budget or (r_in, r_out) == (i, o)
    assert abs(r_in / i - r_out / o) <= 2.0 / min(i, o) + 1e-12  # proportional to the channels


def test_tucker2_ranks_vbmf_recovers_the_ranks():
    w, _ = _tucker_tensor(_rng(17), (32, 24, 3, 3), r_in=5, r_out=7, noise=0.05)
    r_in, r_out = D.tucker2_ranks(w, "vbmf")
    assert abs(r_in - 5) <= 1 and abs(r_out - 7) <= 1
    with pytest.raises(ValueError, match="needs the weight"):
        D.tucker2_ranks(w.shape, "vbmf")


@pytest.mark.parametrize("l, m, rank", [(32, 288, 5), (64, 576, 9), (20, 30, 4), (300, 40, 6)])
def test_vbmf_rank_recovers_low_rank_plus_noise(l, m, rank):
    rng = _rng(l + m)
    sigma = 0.1
    strengths = np.linspace(3.0, 1.5, rank) * 3 * sigma * math.sqrt(max(l, m))
    signal = _orthonormal(rng, l, rank) * strengths @ _orthonormal(rng, m, rank).T
    y = signal + sigma * rng.standard_normal((l, m))
    assert abs(D.vbmf_rank(y) - rank) <= 1
    assert abs(D.vbmf_rank(y, sigma2=sigma ** 2) - rank) <= 1
    assert D.vbmf_noise_variance(y) == pytest.approx(sigma ** 2, rel=0.1)
    assert D.vbmf_noise_variance(y.T) == pytest.approx(D.vbmf_noise_variance(y), rel=1e-6)
    # pure noise: nothing (or almost nothing) is signal
    assert D.vbmf_rank(sigma * rng.standard_normal((l, m))) <= 1
    # noiseless low rank: the numerical rank
    assert D.vbmf_rank(signal) == rank


def test_evb_tau_solves_the_threshold_equation():
    """tau(x) is the larger root of x = (1 + tau)(1 + alpha / tau) (Nakajima et al. 2013)."""
    alpha = 0.3
    x = np.array([3.0, 5.0, 40.0])
    tau = D._evb_tau(x, alpha)
    np.testing.assert_allclose((1 + tau) * (1 + alpha / tau), x, rtol=1e-12)
    assert np.all(tau > math.sqrt(alpha))


def test_cp_rank_forms():
    shape = (64, 32, 3, 3)
    assert D.cp_rank(shape, 7) == 7
    assert D.cp_rank(shape, 5000) == 5000  # CP ranks may exceed the sizes
    for fraction in (0.01, 0.1, 0.5, 1.0):
        r = D.cp_rank(shape, fraction)
        budget = fraction * math.prod(shape)
        assert r * sum(shape) <= budget < (r + 1) * sum(shape)
    assert D.cp_rank((2, 2, 1, 1), 0.01) == 1  # at least 1


def _tt_params(ranks):
    r = [1, *ranks, 1]
    return sum(r[k] * IN_SHAPE[k] * OUT_SHAPE[k] * r[k + 1] for k in range(3))


def test_tt_ranks_forms():
    assert D.tt_ranks(IN_SHAPE, OUT_SHAPE, 4) == (4, 4)
    assert D.tt_ranks(IN_SHAPE, OUT_SHAPE, 7) == (6, 7)  # capped: maximal ranks (6, 8)
    assert D.tt_ranks(IN_SHAPE, OUT_SHAPE, [6, 8]) == (6, 8)
    assert D.tt_ranks((4,), (3,), 0.5) == ()
    dense = math.prod(IN_SHAPE) * math.prod(OUT_SHAPE)
    for fraction in (0.1, 0.2, 0.4, 0.7, 1.0):
        ranks = D.tt_ranks(IN_SHAPE, OUT_SHAPE, fraction)
        uniform = max(ranks)
        assert ranks == tuple(min(uniform, m) for m in (6, 8))
        assert _tt_params(ranks) <= fraction * dense
        assert _tt_params(tuple(min(uniform + 1, m) for m in (6, 8))) > fraction * dense
    assert D.tt_ranks(IN_SHAPE, OUT_SHAPE, 1e-4) == (1, 1)  # at least 1
    assert D.tt_ranks(IN_SHAPE, OUT_SHAPE, 1.0) == (5, 5)  # maximal ranks (6, 8) cost more than dense


@pytest.mark.parametrize("call, match", [
    (lambda: D.tucker2_ranks((8, 6, 3, 3), 0), ">= 1"),
    (lambda: D.tucker2_ranks((8, 6, 3, 3), -2), ">= 1"),
    (lambda: D.tucker2_ranks((8, 6, 3, 3), 0.0), r"outside \(0, 1\]"),
    (lambda: D.tucker2_ranks((8, 6, 3, 3), 1.5), r"outside \(0, 1\]"),
    (lambda: D.tucker2_ranks((8, 6, 3, 3), (7, 8)), "out of range"),
    (lambda: D.tucker2_ranks((8, 6, 3, 3), (0, 3)), "out of range"),
    (lambda: D.tucker2_ranks((8, 6, 3, 3), "svd"), "unknown rank"),
    (lambda: D.tucker2_ranks((8, 6, 3, 3), True), "invalid rank"),
    (lambda: D.tucker2_ranks((8, 6, 3, 3), None), "invalid rank"),
    (lambda: D.tucker2_ranks((8, 6, 3), 2), "4 positive sizes"),
    (lambda: D.cp_rank((8, 6, 3, 3), 0), ">= 1"),
    (lambda: D.cp_rank((8, 6, 3, 3), 2.0), r"outside \(0, 1\]"),
    (lambda: D.cp_rank((8, 6, 3, 3), "vbmf"), "invalid rank"),
    (lambda: D.cp_rank((8, 6, 3, 3), [2, 3]), "invalid rank"),
    (lambda: D.tt_ranks(IN_SHAPE, OUT_SHAPE, 0), ">= 1"),
    (lambda: D.tt_ranks(IN_SHAPE, OUT_SHAPE, -0.5), r"outside \(0, 1\]"),
    (lambda: D.tt_ranks(IN_SHAPE, OUT_SHAPE, [2]), r"\(d-1\) expected"),
    (lambda: D.tt_ranks(IN_SHAPE, OUT_SHAPE, [7, 2]), "out of range"),
    (lambda: D.tt_ranks(IN_SHAPE, OUT_SHAPE, [2, 0]), "out of range"),
    (lambda: D.tt_ranks(IN_SHAPE, OUT_SHAPE, "auto"), "invalid rank"),
    (lambda: D.tt_ranks((2, 3), (3,), 2), "same length"),
])
def test_invalid_ranks_raise_value_error_naming_valid_forms(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    if "sizes" not in match and "same length" not in match:
        assert "valid ranks" in str(info.value)


def test_invalid_inputs():
    rng = _rng(18)
    bad = rng.standard_normal((4, 3, 3, 3))
    bad[1, 2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        D.tucker2(bad, 2)
    with pytest.raises(ValueError, match="4-D"):
        D.cp(rng.standard_normal((4, 3, 3)), 2)
    with pytest.raises(ValueError, match="shapes"):
        D.relative_error(rng.standard_normal(3), rng.standard_normal(4))
    with pytest.raises(ValueError, match="rank must be an int"):
        D.cp_als(rng.standard_normal((3, 3, 3)), 0)


# ----------------------------------------------------------------------------- dtypes

def test_float32_in_float32_out():
    rng = _rng(19)
    w = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
    core, first, last = D.tucker2(w, (3, 4))
    assert core.dtype == first.dtype == last.dtype == np.float32
    assert D.reconstruct_tucker2(core, first, last).dtype == np.float32
    factors = D.cp(w, 3, n_iter_max=20)
    assert all(f.dtype == np.float32 for f in factors)
    assert D.reconstruct_cp(factors).dtype == np.float32
    weights, factors = D.cp_als(w, 2, n_iter_max=5)
    assert weights.dtype == np.float32 and all(f.dtype == np.float32 for f in factors)
    lin = rng.standard_normal((12, 24)).astype(np.float32)
    cores = D.tt_matrix(lin, (2, 3, 4), (3, 2, 2), 3)
    assert all(c.dtype == np.float32 for c in cores)
    assert D.reconstruct_tt_matrix(cores, (2, 3, 4), (3, 2, 2)).dtype == np.float32
    # full rank in float32: exact to float32 precision
    full = D.tt_matrix(lin, (2, 3, 4), (3, 2, 2), 100)
    assert D.relative_error(D.reconstruct_tt_matrix(full, (2, 3, 4), (3, 2, 2)), lin) < 1e-5
    # integer input computes and returns float64
    assert D.tucker2(rng.integers(1, 9, size=(4, 3, 2, 2)), 2)[0].dtype == np.float64


def test_relative_error():
    rng = _rng(20)
    exact = rng.standard_normal((4, 5))
    noise = rng.standard_normal((4, 5))
    assert D.relative_error(exact + noise, exact) == pytest.approx(np.linalg.norm(noise) / np.linalg.norm(exact))
    assert D.relative_error(exact, exact) == 0.0


def test_tt_matrix_vbmf_recovers_the_tt_ranks():
    """A TT-matrix weight of ranks (3, 2) plus noise: EVBMF on each TT-SVD cut finds them."""
    rng = _rng(23)
    ins, outs = (4, 6, 5), (6, 4, 5)
    cores = [rng.standard_normal(shape) for shape in ((1, 4, 6, 3), (3, 6, 4, 2), (2, 5, 5, 1))]
    clean = D.reconstruct_tt_matrix(cores, ins, outs)
    w = clean + 0.01 * np.abs(clean).mean() * rng.standard_normal(clean.shape)
    found = D.tt_matrix(w, ins, outs, "vbmf")
    assert [c.shape[3] for c in found[:-1]] == [3, 2]
    assert D.relative_error(D.reconstruct_tt_matrix(found, ins, outs), clean) < 0.05
    with pytest.raises(ValueError, match="needs the weight"):
        D.tt_ranks(ins, outs, "vbmf")


# ----------------------------------------------------------------------------- Tucker, N-way

def _project_all(t, factors, modes):
    for f, m in zip(factors, modes):
        t = np.moveaxis(np.tensordot(f.T, t, axes=(1, m)), 0, m)
    return t


@pytest.mark.parametrize("shape, ranks, modes", [
    ((6, 7, 8), (3, 4, 5), None),
    ((5, 6, 4, 3), (2, 3), (1, 3)),
    ((5, 6, 4, 3), (2, 3), (-1, 0)),
    ((4, 5, 3, 2, 3), 2, (0, 2, 4)),
    ((9, 4), (3,), (0,)),
])
def test_tucker_any_modes_shapes_orthonormal_and_projection(shape, ranks, modes):
    t = _rng(30).standard_normal(shape)
    core, factors = D.tucker(t, ranks, modes=modes)
    chosen = [m % len(shape) for m in (modes if modes is not None else range(len(shape)))]
    want = D.tucker_ranks(shape, ranks, chosen)
    assert [f.shape for f in factors] == [(shape[m], r) for m, r in zip(chosen, want)]
    assert core.shape == tuple(want[chosen.index(m)] if m in chosen else d for m, d in enumerate(shape))
    for f in factors:
        _assert_orthonormal(f)
    np.testing.assert_allclose(core, _project_all(t, factors, chosen), atol=1e-12)  # core = projection
    approx = D.reconstruct_tucker(core, factors, chosen)
    hosvd_core, hosvd_factors = D.tucker(t, ranks, modes=modes, n_iter_max=0)
    hosvd = D.relative_error(D.reconstruct_tucker(hosvd_core, hosvd_factors, chosen), t)
    assert D.relative_error(approx, t) <= hosvd + 1e-12


def test_tucker_recovers_an_exact_tucker_tensor_on_some_modes():
    rng = _rng(31)
    core = rng.standard_normal((7, 2, 5, 3))
    u1, u3 = _orthonormal(rng, 9, 2), _orthonormal(rng, 8, 3)
    t = D.reconstruct_tucker(core, [u1, u3], (1, 3))
    assert t.shape == (7, 9, 5, 8)
    got_core, (f1, f3) = D.tucker(t, (2, 3), modes=(1, 3))
    assert D.relative_error(D.reconstruct_tucker(got_core, [f1, f3], (1, 3)), t) < 1e-12
    np.testing.assert_allclose(f1 @ f1.T, u1 @ u1.T, atol=1e-10)  # the same subspace
    # a full Tucker (all modes) of the same tensor at its multilinear ranks
    c, fs = D.tucker(t, [7, 2, 5, 3])
    assert D.relative_error(D.reconstruct_tucker(c, fs), t) < 1e-12


def test_tucker_stops_on_its_relative_tolerance(monkeypatch):
    """tol is on the change of the relative error between sweeps (tensorly's rule): a looser tol
    runs fewer sweeps and its error is within tol of the converged one."""
    import importlib
    hooi = importlib.import_module("lotus_rt.decompose.hooi")
    t = _rng(32).standard_normal((20, 30, 40))
    calls = []
    real = hooi._leading_left
    monkeypatch.setattr(hooi, "_leading_left", lambda m, r: calls.append(1) or real(m, r))
    results = {}
    for tol in (1e-2, 1e-4, 0.0):
        calls.clear()
        core, factors = D.tucker(t, (4, 5), modes=(0, 1), tol=tol, n_iter_max=200)
        results[tol] = (len(calls) // 2 - 1, D.relative_error(D.reconstruct_tucker(core, factors, (0, 1)), t))
    assert results[1e-2][0] < results[1e-4][0] < results[0.0][0], results  # sweeps
    assert results[0.0][1] <= results[1e-4][1] <= results[1e-2][1] <= results[0.0][1] + 1e-2
    assert results[1e-4][1] - results[0.0][1] < 1e-3


@pytest.mark.parametrize("call, match", [
    (lambda: D.tucker(np.ones((3, 4)), 2, modes=(0, 0)), "distinct"),
    (lambda: D.tucker(np.ones((3, 4)), 2, modes=(2,)), "distinct modes of a 2-way"),
    (lambda: D.tucker(np.ones((3, 4)), (2, 5)), "out of range"),
    (lambda: D.tucker(np.ones((3, 4)), (2,)), "invalid rank"),
    (lambda: D.tucker(np.ones((3, 4)), 2, tol=-1.0), "tol"),
    (lambda: D.tt(np.ones((3, 4, 5)), [2]), "invalid ranks"),
    (lambda: D.cp_als(np.ones((3, 4)), 2, ridge=-1.0), "ridge"),
])
def test_invalid_tucker_tt_cp_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_tt_of_an_n_way_tensor():
    rng = _rng(33)
    cores = [rng.standard_normal(s) for s in ((1, 4, 2), (2, 5, 3), (3, 6, 2), (2, 3, 1))]
    t = D.reconstruct_tt(cores)
    np.testing.assert_allclose(t, np.einsum("aib,bjc,ckd,dle->ijkl", *cores)[...], atol=1e-12)
    got = D.tt(t, [2, 3, 2])
    assert [c.shape for c in got] == [c.shape for c in cores]
    assert D.relative_error(D.reconstruct_tt(got), t) < 1e-12
    assert D.relative_error(D.reconstruct_tt(D.tt(t, 1)), t) > 1e-3


# ----------------------------------------------------------------------------- CP: the vanishing ridge

@pytest.mark.parametrize("shape", [(20, 30, 40), (10, 12, 14), (8, 6, 3, 3)])
def test_cp_reaches_1e_8_on_exactly_low_rank_data(shape):
    """The ridge vanishes with the error: rank-5 data are fitted to 1e-8 and better, even with a
    ridge 1000x the default (a fixed ridge of 1e-6 used to stop at ~1e-6)."""
    t, _ = _cp_tensor(_rng(34), shape, 5)
    for ridge in (1e-6, 1e-3):
        weights, factors = D.cp_als(t, 5, ridge=ridge)
        assert D.relative_error(D.reconstruct_cp(factors, weights), t) < 1e-8, (shape, ridge)


# ----------------------------------------------------------------------------- against tensorly

def _tensorly():
    tl = pytest.importorskip("tensorly", reason="tensorly is a dev extra (pip install -e .[dev])")
    import warnings
    warnings.filterwarnings("ignore", message="Trying to compute SVD")
    from tensorly import decomposition
    return tl, decomposition


def _kinds():
    rng = _rng(35)
    conv = rng.standard_normal((32, 16, 3, 3)) * np.geomspace(1, 0.02, 32)[:, None, None, None]
    core = rng.standard_normal((4, 5, 6))
    tucker_exact = D.reconstruct_tucker(core, [_orthonormal(rng, n, r) for n, r in ((12, 4), (14, 5), (16, 6))])
    cp_exact, _ = _cp_tensor(rng, (12, 14, 16), 5)
    return {"conv": conv, "random": rng.standard_normal((12, 14, 16)), "tucker-exact": tucker_exact,
            "cp-exact": cp_exact}


def _at_least_as_good(ours: float, theirs: float) -> bool:
    """Equal or better, up to round-off (1e-12) and one part in 1e6."""
    return ours <= theirs * (1 + 1e-6) + 1e-12


@pytest.mark.parametrize("kind", ["conv", "random", "tucker-exact", "cp-exact"])
def test_tucker_is_as_accurate_as_tensorly(kind):
    tl, decomposition = _tensorly()
    t = _kinds()[kind]
    ranks = [min(d, r) for d, r in zip(t.shape, (4, 5, 6, 3))]
    core, factors = decomposition.tucker(t, rank=ranks, tol=1e-4)
    theirs = D.relative_error(tl.tucker_to_tensor((core, factors)), t)
    c, fs = D.tucker(t, ranks)
    assert _at_least_as_good(D.relative_error(D.reconstruct_tucker(c, fs), t), theirs)
    (core, factors), _ = decomposition.partial_tucker(t, rank=ranks[:2], modes=[0, 1], tol=1e-4)
    theirs = D.relative_error(tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1]), t)
    c, fs = D.tucker(t, ranks[:2], modes=(0, 1))
    assert _at_least_as_good(D.relative_error(D.reconstruct_tucker(c, fs, (0, 1)), t), theirs)


@pytest.mark.parametrize("kind", ["conv", "random", "cp-exact"])
def test_cp_is_as_accurate_as_tensorly(kind):
    """Same budget and stopping rule as tensorly's parafac defaults (100 sweeps, tol 1e-8); ranks
    within every mode size, so that neither start is padded with random columns."""
    tl, decomposition = _tensorly()
    t = _kinds()[kind]
    rank = min(5, *t.shape)
    theirs = D.relative_error(tl.cp_to_tensor(decomposition.parafac(t, rank, init="svd")), t)
    weights, factors = D.cp_als(t, rank, n_iter_max=100, tol=1e-8)
    ours = D.relative_error(D.reconstruct_cp(factors, weights), t)
    assert _at_least_as_good(ours, theirs) or ours < 1e-10, (ours, theirs)


@pytest.mark.parametrize("kind", ["conv", "random", "tucker-exact"])
def test_tt_is_as_accurate_as_tensorly(kind):
    tl, decomposition = _tensorly()
    t = _kinds()[kind]
    ranks = [1] + [min(3, *t.shape)] * (t.ndim - 1) + [1]
    theirs = D.relative_error(tl.tt_to_tensor(decomposition.tensor_train(t, ranks)), t)
    assert _at_least_as_good(D.relative_error(D.reconstruct_tt(D.tt(t, ranks[1:-1])), t), theirs)
