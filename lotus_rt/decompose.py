"""Tensor decompositions of dense weights, to build tensorized layers from trained dense ones.

Pure NumPy: every decomposition works in float64 and returns arrays of the input's dtype
(float64 for non-float input). Three decompositions, each with its rank helper and its
``reconstruct_*`` inverse:

- ``tucker2(W, ranks)`` -- Tucker-2 of a convolution weight W (O, I, kh, kw) over its two channel
  modes (Kim et al. 2016): ``W ~ core x_0 last x_1 first``, i.e.
  ``W[o, i, h, w] = sum_{s, r} last[o, s] first[i, r] core[s, r, h, w]`` with ``first`` (I, R_in),
  ``last`` (O, R_out) of orthonormal columns and ``core`` (R_out, R_in, kh, kw). HOSVD (leading left
  singular vectors of the mode-0 and mode-1 unfoldings) then HOOI sweeps until the fit
  ``||core|| / ||W||`` stops improving. Ranks are always the pair ``(R_in, R_out)``.
- ``cp(W, rank)`` / ``cp_als(T, rank)`` -- CP by alternating least squares with a small ridge
  (Tikhonov) term in every solve, against the diverging components of degenerate CP (the concern
  of Phan et al. 2020); HOSVD initialisation padded with seeded random columns.
  ``W[o, i, h, w] = sum_r A_o[o, r] A_i[i, r] A_h[h, r] A_w[w, r]``, the weights absorbed in A_o.
- ``tt_matrix(W, in_shape, out_shape, ranks)`` -- TT-SVD of a Linear weight W (out, in) into a
  TT-matrix (MPO). Core layout: ``G_k`` has shape ``(r_{k-1}, in_k, out_k, r_k)``, r_0 = r_d = 1,
  and, with ``o = ravel_multi_index((o_1..o_d), out_shape)`` and
  ``i = ravel_multi_index((i_1..i_d), in_shape)`` (C order, as ``reshape`` does)::

      W[o, i] = sum_{r_1..r_{d-1}} prod_k G_k[r_{k-1}, i_k, o_k, r_k]
      y[b, o_1..o_d] = sum_{i, r} x[b, i_1..i_d] prod_k G_k[r_{k-1}, i_k, o_k, r_k]   (y = x @ W.T)

  W is permuted to (i_1, o_1, i_2, o_2, ...) order and split by sequential truncated SVDs.

Rank helpers turn a user's rank into concrete ranks: ``tucker2_ranks`` (int, fraction of the dense
parameter count, an (R_in, R_out) pair, or "vbmf": Empirical Variational Bayesian Matrix
Factorization of the unfoldings, Nakajima et al. 2013), ``cp_rank`` (int or fraction) and
``tt_ranks`` (int, fraction or a list of the d-1 internal ranks). An int counts as a rank, a float
in (0, 1] as the fraction of the dense layer's parameters to keep; anything else is a ValueError.

Example::

    >>> import numpy as np
    >>> from lotus_rt import decompose
    >>> w = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float32)
    >>> core, first, last = decompose.tucker2(w, (8, 16))          # full ranks: exact
    >>> core.shape, first.shape, last.shape, core.dtype
    ((16, 8, 3, 3), (8, 8), (16, 16), dtype('float32'))
    >>> decompose.relative_error(decompose.reconstruct_tucker2(core, first, last), w) < 1e-5
    True
    >>> lin = np.random.default_rng(1).standard_normal((6, 8))     # Linear weight (out, in)
    >>> cores = decompose.tt_matrix(lin, in_shape=(2, 4), out_shape=(3, 2), ranks=4)
    >>> [c.shape for c in cores]                                   # (r_{k-1}, in_k, out_k, r_k)
    [(1, 2, 3, 4), (4, 4, 2, 1)]
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import numpy as np

__all__ = [
    "tucker2", "cp", "cp_als", "tt_matrix",
    "tucker2_ranks", "cp_rank", "tt_ranks", "vbmf_rank", "vbmf_noise_variance",
    "reconstruct_tucker2", "reconstruct_cp", "reconstruct_tt_matrix", "relative_error",
]

RankSpec = Union[int, float, str, Sequence[int]]

_TUCKER2_FORMS = ("an int >= 1 (both ranks, capped by the channel counts), a float in (0, 1] "
                  "(fraction of the dense parameter count), a pair (R_in, R_out) with "
                  "1 <= R_in <= I and 1 <= R_out <= O, or 'vbmf'")
_CP_FORMS = "an int >= 1 or a float in (0, 1] (fraction of the dense parameter count)"
_TT_FORMS = ("an int >= 1 (every internal rank, capped by the unfoldings), a float in (0, 1] "
             "(fraction of the dense parameter count), or a list of the d-1 internal ranks, "
             "each between 1 and the unfolding's maximal rank")


# --------------------------------------------------------------------------- input handling

def _as_float64(array, ndim: int | None, name: str) -> tuple[np.ndarray, np.dtype]:
    """The array in float64 and the dtype results are returned in (float input keeps its own)."""
    a = np.asarray(array)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got shape {a.shape}")
    out_dtype = a.dtype if np.issubdtype(a.dtype, np.floating) else np.dtype(np.float64)
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: the array contains NaN or infinite values")
    return a, out_dtype


def _result_dtype(arrays: Sequence[np.ndarray]) -> np.dtype:
    dtype = np.result_type(*[np.asarray(a).dtype for a in arrays])
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_fraction_type(value) -> bool:
    return isinstance(value, numbers.Real) and not _is_int(value) and not isinstance(value, (bool, np.bool_))


def _check_fraction(value, name: str, forms: str) -> float:
    fraction = float(value)
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"{name}: the fraction {value!r} is outside (0, 1]; valid ranks: {forms}")
    return fraction


def _check_positive_int(value, name: str, forms: str) -> int:
    if int(value) < 1:
        raise ValueError(f"{name}: rank {value!r} must be >= 1; valid ranks: {forms}")
    return int(value)


def _is_sequence(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, str)


def _weight_shape(weight_or_shape, ndim: int, name: str) -> tuple[tuple[int, ...], np.ndarray | None]:
    """(shape, weight or None) from either a shape or an array (numpy, torch, ...)."""
    if isinstance(weight_or_shape, tuple) or (isinstance(weight_or_shape, list)
                                              and all(_is_int(d) for d in weight_or_shape)):
        shape, weight = tuple(int(d) for d in weight_or_shape), None
    else:
        weight = np.asarray(weight_or_shape)
        shape = weight.shape
    if len(shape) != ndim or min(shape) < 1:
        raise ValueError(f"{name}: expected a shape of {ndim} positive sizes, got {shape}")
    return shape, weight


# --------------------------------------------------------------------------- linear algebra

def _unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    """Mode-n unfolding: mode ``mode`` as rows, the others (in order, C order) as columns."""
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def _mode_dot(tensor: np.ndarray, matrix: np.ndarray, mode: int) -> np.ndarray:
    """``tensor x_mode matrix``: contract the tensor's axis ``mode`` with the matrix's columns."""
    return np.moveaxis(np.tensordot(matrix, tensor, axes=(1, mode)), 0, mode)


def _fix_signs(columns: np.ndarray) -> np.ndarray:
    """Flip columns so that each one's largest-magnitude entry is positive (deterministic output)."""
    idx = np.argmax(np.abs(columns), axis=0)
    signs = np.sign(columns[idx, np.arange(columns.shape[1])])
    signs[signs == 0] = 1.0
    return columns * signs


def _leading_left(matrix: np.ndarray, rank: int) -> np.ndarray:
    """The ``rank`` leading left singular vectors (orthonormal even when rank > the column count)."""
    full = rank > min(matrix.shape)
    u = np.linalg.svd(matrix, full_matrices=full)[0]
    return _fix_signs(u[:, :rank])


# --------------------------------------------------------------------------- Tucker-2

def tucker2_core(weight: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Core ``W x_0 last^T x_1 first^T`` (R_out, R_in, kh, kw) for orthonormal factors."""
    return _mode_dot(_mode_dot(weight, last.T, 0), first.T, 1)


def _hooi_step(weight: np.ndarray, first: np.ndarray, r_out: int, r_in: int) -> tuple[np.ndarray, np.ndarray]:
    """One HOOI sweep: ``last`` from W projected on ``first``, then ``first`` from W projected on ``last``."""
    last = _leading_left(_unfold(_mode_dot(weight, first.T, 1), 0), r_out)
    first = _leading_left(_unfold(_mode_dot(weight, last.T, 0), 1), r_in)
    return first, last


def tucker2(weight, ranks: RankSpec, n_iter_max: int = 50,
            tol: float = 1e-8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tucker-2 of a convolution weight (O, I, kh, kw) over its channel modes (HOSVD + HOOI).

    ``ranks`` is any form ``tucker2_ranks`` accepts; a pair is (R_in, R_out). Returns
    ``(core, first, last)``: core (R_out, R_in, kh, kw), first (I, R_in) and last (O, R_out), both
    with orthonormal columns, such that
    ``W[o, i, h, w] ~ sum_{s, r} last[o, s] first[i, r] core[s, r, h, w]`` (``reconstruct_tucker2``). HOOI stops when the fit ``||core|| / ||W||`` changes by less than
    ``tol`` (relative) or after ``n_iter_max`` sweeps (0: HOSVD only).
    """
    w, dtype = _as_float64(weight, 4, "tucker2")
    r_in, r_out = tucker2_ranks(w, ranks)
    last = _leading_left(_unfold(w, 0), r_out)
    first = _leading_left(_unfold(w, 1), r_in)
    norm = np.linalg.norm(w)
    fit = np.linalg.norm(tucker2_core(w, first, last)) / norm if norm > 0 else 1.0
    for _ in range(n_iter_max):
        new_first, new_last = _hooi_step(w, first, r_out, r_in)
        new_fit = np.linalg.norm(tucker2_core(w, new_first, new_last)) / norm if norm > 0 else 1.0
        if new_fit < fit:  # HOOI is monotone; only rounding can make it step back
            break
        first, last, change, fit = new_first, new_last, new_fit - fit, new_fit
        if change <= tol * max(fit, np.finfo(float).tiny):
            break
    core = tucker2_core(w, first, last)
    return core.astype(dtype), first.astype(dtype), last.astype(dtype)


def reconstruct_tucker2(core, first, last) -> np.ndarray:
    """Dense (O, I, kh, kw) weight ``sum_{s,r} last[o, s] first[i, r] core[s, r, h, w]``."""
    dtype = _result_dtype([core, first, last])
    c, f, l = (np.asarray(a, dtype=np.float64) for a in (core, first, last))
    if c.ndim != 4 or f.ndim != 2 or l.ndim != 2 or c.shape[0] != l.shape[1] or c.shape[1] != f.shape[1]:
        raise ValueError(f"reconstruct_tucker2: shapes core {c.shape}, first {f.shape}, last {l.shape} do "
                         "not fit core (R_out, R_in, kh, kw), first (I, R_in), last (O, R_out)")
    return np.einsum("srhw,os,ir->oihw", c, l, f, optimize=True).astype(dtype)


def _tucker2_params(shape: tuple[int, ...], r_in: int, r_out: int) -> int:
    o, i, kh, kw = shape
    return i * r_in + r_in * r_out * kh * kw + r_out * o


def _tucker2_fraction_ranks(shape: tuple[int, ...], fraction: float) -> tuple[int, int]:
    """Largest (R_in, R_out) with R_out/O ~ R_in/I whose parameter count fits the budget."""
    o, i, kh, kw = shape
    budget = fraction * o * i * kh * kw
    # s (I^2 + O^2) + s^2 I O kh kw = budget, with R_in = s I and R_out = s O
    a, b = i * o * kh * kw, i * i + o * o
    s = (-b + math.sqrt(b * b + 4.0 * a * budget)) / (2.0 * a)
    r_in, r_out = max(1, min(i, int(s * i))), max(1, min(o, int(s * o)))
    while _tucker2_params(shape, r_in, r_out) > budget and (r_in > 1 or r_out > 1):
        if r_in / i >= r_out / o and r_in > 1:
            r_in -= 1
        elif r_out > 1:
            r_out -= 1
        else:
            r_in -= 1
    return _tucker2_grow(shape, budget, r_in, r_out)


def _tucker2_grow(shape: tuple[int, ...], budget: float, r_in: int, r_out: int) -> tuple[int, int]:
    """Add 1 to the relatively smaller rank (else the other) while the budget allows."""
    o, i = shape[0], shape[1]
    while True:
        order = ("in", "out") if r_in / i <= r_out / o else ("out", "in")
        for which in order:
            cand = (r_in + 1, r_out) if which == "in" else (r_in, r_out + 1)
            if cand[0] <= i and cand[1] <= o and _tucker2_params(shape, *cand) <= budget:
                r_in, r_out = cand
                break
        else:
            return r_in, r_out


def tucker2_ranks(weight_or_shape, rank: RankSpec) -> tuple[int, int]:
    """(R_in, R_out) for a Tucker-2 of a weight of shape (O, I, kh, kw).

    ``rank``: an int (both ranks, each capped by its channel count); a float in (0, 1], the
    fraction of the dense parameter count O*I*kh*kw that I*R_in + R_in*R_out*kh*kw + R_out*O may
    use, with R_in/I ~ R_out/O (the largest such ranks within the budget; at least 1 each); a pair
    (R_in, R_out); or "vbmf", which needs the weight itself (not just its shape): EVBMF of the
    mode-1 and mode-0 unfoldings picks R_in and R_out (see ``vbmf_rank``).
    """
    shape, weight = _weight_shape(weight_or_shape, 4, "tucker2_ranks")
    o, i = shape[0], shape[1]
    if isinstance(rank, str):
        if rank.lower() != "vbmf":
            raise ValueError(f"tucker2_ranks: unknown rank {rank!r}; valid ranks: {_TUCKER2_FORMS}")
        if weight is None:
            raise ValueError("tucker2_ranks: rank 'vbmf' needs the weight array, not only its shape")
        w, _ = _as_float64(weight, 4, "tucker2_ranks")
        return max(1, min(i, vbmf_rank(_unfold(w, 1)))), max(1, min(o, vbmf_rank(_unfold(w, 0))))
    if _is_int(rank):
        r = _check_positive_int(rank, "tucker2_ranks", _TUCKER2_FORMS)
        return min(r, i), min(r, o)
    if _is_fraction_type(rank):
        return _tucker2_fraction_ranks(shape, _check_fraction(rank, "tucker2_ranks", _TUCKER2_FORMS))
    if _is_sequence(rank) and len(rank) == 2 and all(_is_int(r) for r in rank):
        r_in, r_out = int(rank[0]), int(rank[1])
        if not (1 <= r_in <= i and 1 <= r_out <= o):
            raise ValueError(f"tucker2_ranks: ranks (R_in, R_out) = {tuple(rank)} out of range for "
                             f"I={i}, O={o}; valid ranks: {_TUCKER2_FORMS}")
        return r_in, r_out
    raise ValueError(f"tucker2_ranks: invalid rank {rank!r}; valid ranks: {_TUCKER2_FORMS}")


# --------------------------------------------------------------------------- EVBMF

def _evb_tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """Solution tau of x = (1 + tau)(1 + alpha / tau), the larger root."""
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _evb_objective(sigma2: float, s: np.ndarray, m: int, alpha: float, xubar: float) -> float:
    """EVB free energy as a function of the noise variance (Nakajima et al. 2013), full SVD (H = L)."""
    x = s ** 2 / (m * sigma2)
    z1, z2 = x[x > xubar], x[x <= xubar]
    tau_z1 = _evb_tau(z1, alpha)
    return float(np.sum(z2 - np.log(z2)) + np.sum(z1 - tau_z1) + np.sum(np.log((tau_z1 + 1) / z1))
                 + alpha * np.sum(np.log(tau_z1 / alpha + 1)))


def _minimize_bounded(func, lo: float, hi: float, grid: int = 200, iters: int = 80) -> float:
    """Minimise a 1-D function on [lo, hi]: log-spaced grid, then golden-section around the best."""
    xs = np.geomspace(lo, hi, grid)
    k = int(np.argmin([func(x) for x in xs]))
    a, b = np.log(xs[max(k - 1, 0)]), np.log(xs[min(k + 1, grid - 1)])
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = func(math.exp(c)), func(math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = func(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = func(math.exp(d))
    best = math.exp((a + b) / 2)
    return best if func(best) <= func(xs[k]) else float(xs[k])


def _evb_noise_variance(s: np.ndarray, l: int, m: int, xubar: float) -> float:
    """Noise variance minimising the EVB free energy between the paper's lower and upper bounds."""
    alpha = l / m
    eh_ub = int(min(math.ceil(l / (1 + alpha)) - 1, l)) - 1
    upper = float(np.sum(s ** 2)) / (l * m)
    lower = max(s[eh_ub + 1] ** 2 / (m * xubar), float(np.mean(s[eh_ub + 1:] ** 2)) / m)
    if not lower < upper:
        return upper
    return _minimize_bounded(lambda v: _evb_objective(v, s, m, alpha, xubar), lower, upper)


def _evb_spectrum(matrix, name: str) -> tuple[np.ndarray, int, int, float]:
    """Singular values of the matrix (made L <= M), L, M and the threshold factor (1 + tau)(1 + alpha / tau)."""
    y, _ = _as_float64(matrix, 2, name)
    l, m = sorted(y.shape)
    s = np.linalg.svd(y, compute_uv=False)
    alpha = l / m
    tau_bar = 2.5129 * math.sqrt(alpha)
    return s, l, m, (1 + tau_bar) * (1 + alpha / tau_bar)


def vbmf_noise_variance(matrix) -> float:
    """Noise variance (per entry) of a noisy low-rank matrix that minimises the EVB free energy.

    The search runs between the bounds of Nakajima et al. (2013): the mean energy per entry above,
    and what the trailing singular values (beyond the largest rank EVBMF can keep) imply below.
    """
    s, l, m, xubar = _evb_spectrum(matrix, "vbmf_noise_variance")
    return _evb_noise_variance(s, l, m, xubar)


def vbmf_rank(matrix, sigma2: float | None = None) -> int:
    """Rank chosen by analytic Empirical VBMF (Nakajima et al. 2013) for a noisy low-rank matrix.

    Singular values above ``sqrt(M * sigma2 * (1 + tau)(1 + alpha / tau))`` are kept (L <= M the
    matrix's sizes, alpha = L / M, tau = 2.5129 sqrt(alpha)); the noise variance ``sigma2``, when
    not given, is ``vbmf_noise_variance(matrix)``. A numerically rank-deficient matrix (no noise)
    gets its numerical rank. May return 0 (all noise).
    """
    s, l, m, xubar = _evb_spectrum(matrix, "vbmf_rank")
    if s[0] == 0:
        return 0
    numerical_rank = int(np.sum(s > s[0] * m * np.finfo(np.float64).eps))
    if numerical_rank < l and sigma2 is None:
        return numerical_rank
    if sigma2 is None:
        sigma2 = _evb_noise_variance(s, l, m, xubar)
    return int(np.sum(s > math.sqrt(m * sigma2 * xubar)))


# --------------------------------------------------------------------------- CP

def _khatri_rao_free_mttkrp_paths(shape: tuple[int, ...], rank: int) -> list[tuple[str, list]]:
    """Per mode, the einsum equation and contraction path of the MTTKRP X_(n) (kr of the others)."""
    letters = "abcdefghijklmnopqrstuvwxy"
    if len(shape) > len(letters):
        raise ValueError(f"cp_als: at most {len(letters)} modes are supported, got {len(shape)}")
    modes = letters[:len(shape)]
    plans = []
    dummy = [np.empty(shape)] + [np.empty((d, rank)) for d in shape]
    for n in range(len(shape)):
        others = [k for k in range(len(shape)) if k != n]
        eq = modes + "," + ",".join(modes[k] + "z" for k in others) + "->" + modes[n] + "z"
        path = np.einsum_path(eq, dummy[0], *[dummy[1 + k] for k in others], optimize="greedy")[0]
        plans.append((eq, path))
    return plans


def _mttkrp(x: np.ndarray, factors: list[np.ndarray], n: int, plan: tuple[str, list]) -> np.ndarray:
    eq, path = plan
    return np.einsum(eq, x, *[f for k, f in enumerate(factors) if k != n], optimize=path)


def _cp_init(x: np.ndarray, rank: int, rng: np.random.Generator) -> list[np.ndarray]:
    """HOSVD start: leading left singular vectors of each unfolding, padded with random unit columns."""
    factors = []
    for n in range(x.ndim):
        u = np.linalg.svd(_unfold(x, n), full_matrices=False)[0][:, :rank]
        if u.shape[1] < rank:
            extra = rng.standard_normal((x.shape[n], rank - u.shape[1]))
            u = np.concatenate([u, extra / np.linalg.norm(extra, axis=0)], axis=1)
        factors.append(_fix_signs(u))
    return factors


def _hadamard_grams(grams: list[np.ndarray], skip: int | None) -> np.ndarray:
    out = np.ones_like(grams[0])
    for k, g in enumerate(grams):
        if k != skip:
            out = out * g
    return out


def _ridge_solve(gram: np.ndarray, rhs: np.ndarray, ridge: float) -> np.ndarray:
    """``rhs @ (gram + lam I)^-1`` with ``lam = ridge * trace(gram) / R`` (scale-free Tikhonov term)."""
    r = gram.shape[0]
    lam = ridge * max(np.trace(gram) / r, np.finfo(np.float64).tiny)
    return np.linalg.solve(gram + lam * np.eye(r), rhs.T).T


def _normalize_columns(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(a, axis=0)
    safe = np.where(norms > 0, norms, 1.0)
    return a / safe, norms


def _cp_error(norm_x: float, mttkrp_last: np.ndarray, factor_last: np.ndarray,
              weights: np.ndarray, grams: list[np.ndarray]) -> float:
    """Relative error ||X - model|| / ||X|| from the last MTTKRP and the factor Gram matrices."""
    inner = float(np.sum(mttkrp_last * factor_last * weights))
    model_sq = float(weights @ _hadamard_grams(grams, None) @ weights)
    return math.sqrt(max(norm_x ** 2 - 2 * inner + model_sq, 0.0)) / norm_x


def cp_als(tensor, rank: int, n_iter_max: int = 500, tol: float = 1e-10, ridge: float = 1e-6,
           seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """CP decomposition of an N-way tensor (N >= 2) by ridge-regularised alternating least squares.

    Returns ``(weights, factors)``: weights (R,) in decreasing order and one factor (I_n, R) of unit
    columns per mode, such that ``T ~ sum_r weights[r] * outer(factors[0][:, r], ..., factors[-1][:, r])``.
    Each ALS solve adds ``ridge * trace(V) / R`` to the diagonal of its R x R normal matrix V.
    Stops when the relative error changes by less than ``tol`` between sweeps, or after
    ``n_iter_max`` sweeps. ``seed`` drives the random columns that pad the HOSVD start when
    ``rank`` exceeds a mode's size.
    """
    x, dtype = _as_float64(tensor, None, "cp_als")
    if x.ndim < 2:
        raise ValueError(f"cp_als: expected a tensor of at least 2 modes, got shape {x.shape}")
    if not _is_int(rank) or rank < 1:
        raise ValueError(f"cp_als: rank must be an int >= 1, got {rank!r}")
    rank = int(rank)
    norm_x = float(np.linalg.norm(x))
    factors = _cp_init(x, rank, np.random.default_rng(seed))
    weights = np.ones(rank)
    if norm_x == 0:
        return np.zeros(rank, dtype=dtype), [f.astype(dtype) for f in factors]
    plans = _khatri_rao_free_mttkrp_paths(x.shape, rank)
    grams = [f.T @ f for f in factors]
    error = None
    for _ in range(n_iter_max):
        for n in range(x.ndim):
            m = _mttkrp(x, factors, n, plans[n])
            factors[n], weights = _normalize_columns(_ridge_solve(_hadamard_grams(grams, n), m, ridge))
            grams[n] = factors[n].T @ factors[n]
        new_error = _cp_error(norm_x, m, factors[-1], weights, grams)
        converged = error is not None and abs(error - new_error) < tol
        error = new_error
        if converged or error < 1e-14:
            break
    order = np.argsort(-weights, kind="stable")
    return weights[order].astype(dtype), [f[:, order].astype(dtype) for f in factors]


def cp(weight, rank: int | float, n_iter_max: int = 500, tol: float = 1e-10, ridge: float = 1e-6,
       seed: int = 0) -> list[np.ndarray]:
    """CP of a convolution weight (O, I, kh, kw): ``[A_o, A_i, A_h, A_w]``, each (size, R).

    ``W[o, i, h, w] ~ sum_r A_o[o, r] A_i[i, r] A_h[h, r] A_w[w, r]``: the CP weights are absorbed in
    A_o; A_i, A_h, A_w have unit columns. ``rank`` is any form ``cp_rank`` accepts; the other
    arguments go to ``cp_als``.
    """
    w, dtype = _as_float64(weight, 4, "cp")
    r = cp_rank(w.shape, rank)
    weights, factors = cp_als(w, r, n_iter_max=n_iter_max, tol=tol, ridge=ridge, seed=seed)
    first = factors[0].astype(np.float64) * weights.astype(np.float64)
    return [first.astype(dtype)] + [f.astype(dtype) for f in factors[1:]]


def reconstruct_cp(factors: Sequence[np.ndarray], weights=None) -> np.ndarray:
    """Dense tensor ``sum_r weights[r] * outer(factors[0][:, r], factors[1][:, r], ...)``."""
    arrays = [np.asarray(f) for f in factors] + ([] if weights is None else [np.asarray(weights)])
    dtype = _result_dtype(arrays)
    fs = [np.asarray(f, dtype=np.float64) for f in factors]
    if not fs or any(f.ndim != 2 or f.shape[1] != fs[0].shape[1] for f in fs) or len(fs) > 25:
        raise ValueError(f"reconstruct_cp: expected 1 to 25 factors (size, R) of one R, got "
                         f"{[f.shape for f in fs]}")
    if weights is not None:
        fs[0] = fs[0] * np.asarray(weights, dtype=np.float64)
    letters = "abcdefghijklmnopqrstuvwxy"[:len(fs)]
    eq = ",".join(c + "z" for c in letters) + "->" + letters
    return np.einsum(eq, *fs, optimize=True).astype(dtype)


def cp_rank(weight_shape, rank: int | float) -> int:
    """CP rank for a weight of shape (O, I, kh, kw).

    ``rank``: an int (used as is; CP ranks may exceed the sizes), or a float in (0, 1], the fraction
    of the dense parameter count O*I*kh*kw that the CP's R*(O + I + kh + kw) may use (at least 1).
    """
    shape, _ = _weight_shape(weight_shape, 4, "cp_rank")
    if _is_int(rank):
        return _check_positive_int(rank, "cp_rank", _CP_FORMS)
    if _is_fraction_type(rank):
        fraction = _check_fraction(rank, "cp_rank", _CP_FORMS)
        return max(1, int(fraction * math.prod(shape) // sum(shape)))
    raise ValueError(f"cp_rank: invalid rank {rank!r}; valid ranks: {_CP_FORMS}")


# --------------------------------------------------------------------------- TT-matrix

def _check_tt_shapes(in_shape, out_shape, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ins, outs = tuple(int(d) for d in in_shape), tuple(int(d) for d in out_shape)
    if not ins or len(ins) != len(outs) or min(ins + outs) < 1:
        raise ValueError(f"{name}: in_shape {tuple(in_shape)} and out_shape {tuple(out_shape)} must be "
                         "non-empty, of the same length, with positive factors")
    return ins, outs


def _tt_max_ranks(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[int]:
    """Maximal internal ranks: min(prod of the (i_j o_j) left of the cut, prod right of it)."""
    sizes = [i * o for i, o in zip(in_shape, out_shape)]
    return [min(math.prod(sizes[:k + 1]), math.prod(sizes[k + 1:])) for k in range(len(sizes) - 1)]


def _tt_params(in_shape: tuple[int, ...], out_shape: tuple[int, ...], internal: Sequence[int]) -> int:
    r = [1, *internal, 1]
    return sum(r[k] * in_shape[k] * out_shape[k] * r[k + 1] for k in range(len(in_shape)))


def tt_ranks(in_shape: Sequence[int], out_shape: Sequence[int], rank: RankSpec) -> tuple[int, ...]:
    """The d-1 internal TT-matrix ranks (r_1..r_{d-1}; r_0 = r_d = 1 are not included).

    ``rank``: an int (every internal rank, each capped by the maximal rank of its unfolding); a
    float in (0, 1], the fraction of the dense parameter count prod(in)*prod(out) to keep (the
    largest uniform rank, capped likewise, whose TT parameter count fits the budget; at least 1);
    or a list of d-1 ints, each between 1 and its unfolding's maximal rank.
    """
    ins, outs = _check_tt_shapes(in_shape, out_shape, "tt_ranks")
    max_ranks = _tt_max_ranks(ins, outs)
    if _is_int(rank):
        r = _check_positive_int(rank, "tt_ranks", _TT_FORMS)
        return tuple(min(r, m) for m in max_ranks)
    if _is_fraction_type(rank):
        budget = _check_fraction(rank, "tt_ranks", _TT_FORMS) * math.prod(ins) * math.prod(outs)
        return _tt_fraction_ranks(ins, outs, max_ranks, budget)
    if _is_sequence(rank) and all(_is_int(r) for r in rank):
        if len(rank) != len(max_ranks):
            raise ValueError(f"tt_ranks: {len(rank)} ranks given, {len(max_ranks)} (d-1) expected; "
                             f"valid ranks: {_TT_FORMS}")
        bad = [(k, int(r), m) for k, (r, m) in enumerate(zip(rank, max_ranks)) if not 1 <= r <= m]
        if bad:
            raise ValueError(f"tt_ranks: ranks {list(rank)} out of range at (index, rank, max) {bad}; "
                             f"maximal ranks {max_ranks}; valid ranks: {_TT_FORMS}")
        return tuple(int(r) for r in rank)
    if isinstance(rank, str) and rank == "vbmf":
        raise ValueError("tt_ranks: rank 'vbmf' needs the weight itself; pass it to tt_matrix "
                         "(or TTLinear.from_linear), which picks each cut's rank during the TT-SVD")
    raise ValueError(f"tt_ranks: invalid rank {rank!r}; valid ranks: {_TT_FORMS}")


def _tt_fraction_ranks(ins, outs, max_ranks: list[int], budget: float) -> tuple[int, ...]:
    """Largest uniform rank (capped per cut) whose parameter count is within the budget (min 1)."""
    capped = lambda r: tuple(min(r, m) for m in max_ranks)  # noqa: E731
    lo, hi = 1, max(max_ranks, default=1)
    while lo < hi:  # the parameter count grows with r: bisect for the last r within budget
        mid = (lo + hi + 1) // 2
        if _tt_params(ins, outs, capped(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return capped(lo)


def _interleave_in_out(weight: np.ndarray, ins: tuple[int, ...], outs: tuple[int, ...]) -> np.ndarray:
    """(prod out, prod in) -> tensor of axes (i_1, o_1, i_2, o_2, ..., i_d, o_d)."""
    d = len(ins)
    t = weight.reshape(outs + ins)
    return t.transpose([ax for k in range(d) for ax in (d + k, k)])


def tt_matrix(weight, in_shape: Sequence[int], out_shape: Sequence[int], ranks: RankSpec) -> list[np.ndarray]:
    """TT-SVD of a Linear weight (prod(out_shape), prod(in_shape)) into TT-matrix cores.

    Core k has shape (r_{k-1}, in_k, out_k, r_k), r_0 = r_d = 1, and
    ``W[o, i] = sum_r prod_k G_k[r_{k-1}, i_k, o_k, r_k]`` with o, i the C-order flat indices of
    (o_1..o_d) and (i_1..i_d) (see the module docstring). ``ranks`` is any form ``tt_ranks``
    accepts, or "vbmf": each cut's rank chosen by EVBMF (``vbmf_rank``, at least 1) on the matrix
    that step of the sweep factorizes. A rank beyond what a cut's SVD can give (a list rank above
    r_{k-1} * in_k * out_k) is lowered to it, so the core shapes tell the ranks used. Exact at the
    maximal ranks.
    """
    w, dtype = _as_float64(weight, 2, "tt_matrix")
    ins, outs = _check_tt_shapes(in_shape, out_shape, "tt_matrix")
    if w.shape != (math.prod(outs), math.prod(ins)):
        raise ValueError(f"tt_matrix: weight of shape {w.shape} is not (prod(out_shape), prod(in_shape)) = "
                         f"({math.prod(outs)}, {math.prod(ins)})")
    vbmf = isinstance(ranks, str) and ranks == "vbmf"
    internal = None if vbmf else tt_ranks(ins, outs, ranks)
    rest, r_prev, cores = _interleave_in_out(w, ins, outs).reshape(1, -1), 1, []
    for k in range(len(ins) - 1):
        unfolding = rest.reshape(r_prev * ins[k] * outs[k], -1)
        u, s, vt = np.linalg.svd(unfolding, full_matrices=False)
        # "vbmf": each cut's rank is EVBMF's on the matrix this sweep step factorizes
        r = max(1, min(vbmf_rank(unfolding), s.size)) if vbmf else min(internal[k], s.size)
        cores.append(u[:, :r].reshape(r_prev, ins[k], outs[k], r))
        rest, r_prev = s[:r, None] * vt[:r], r
    cores.append(rest.reshape(r_prev, ins[-1], outs[-1], 1))
    return [c.astype(dtype) for c in cores]


def reconstruct_tt_matrix(cores: Sequence[np.ndarray], in_shape: Sequence[int],
                          out_shape: Sequence[int]) -> np.ndarray:
    """Dense (prod(out_shape), prod(in_shape)) weight of TT-matrix cores (r_{k-1}, in_k, out_k, r_k)."""
    ins, outs = _check_tt_shapes(in_shape, out_shape, "reconstruct_tt_matrix")
    dtype = _result_dtype(list(cores))
    cs = [np.asarray(c, dtype=np.float64) for c in cores]
    expected = [(ins[k], outs[k]) for k in range(len(ins))]
    ok = (len(cs) == len(ins) and all(c.ndim == 4 for c in cs) and cs[0].shape[0] == 1 and cs[-1].shape[3] == 1
          and all(c.shape[1:3] == e for c, e in zip(cs, expected))
          and all(cs[k].shape[3] == cs[k + 1].shape[0] for k in range(len(cs) - 1)))
    if not ok:
        raise ValueError(f"reconstruct_tt_matrix: core shapes {[c.shape for c in cs]} do not fit "
                         f"(r_(k-1), in_k, out_k, r_k) for in_shape {ins}, out_shape {outs}, r_0 = r_d = 1")
    full = cs[0].reshape(-1, cs[0].shape[3])
    for c in cs[1:]:
        full = (full @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[3])
    d = len(ins)
    t = full.reshape([n for k in range(d) for n in (ins[k], outs[k])])
    t = t.transpose([2 * k + 1 for k in range(d)] + [2 * k for k in range(d)])
    return t.reshape(math.prod(outs), math.prod(ins)).astype(dtype)


# --------------------------------------------------------------------------- errors

def relative_error(approx, exact) -> float:
    """``||approx - exact||_F / ||exact||_F`` in float64 (0 when both are zero, inf when only exact is)."""
    a, e = np.asarray(approx, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"relative_error: shapes {a.shape} and {e.shape} differ")
    diff, norm = float(np.linalg.norm(a - e)), float(np.linalg.norm(e))
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / norm


# --------------------------------------------------------------------------- groups of layers
#
# A group of layers is factorized as one tensor: their kernels stacked along a leading "layer"
# mode (``stack_kernels``, zero padded to a common shape when they differ, with a mask of the
# entries that belong to a layer). Three N-way formats represent it, each with a ``mask=``
# variant that fits only the masked entries (EM imputation: the entries outside the mask are
# refilled with the current reconstruction between sweeps, so the padding costs no rank):
#
# - ``tucker(T, ranks)``: HOSVD + HOOI on every mode, ``T ~ core x_0 U_0 x_1 U_1 ...``
#   (``reconstruct_tucker``); for a stacked conv group (L, O, I, kh, kw) this is T-Net's shared
#   channel and kernel factors with a core over the layer mode (Kossaifi et al. 2019).
# - ``tt(T, ranks)``: TT-SVD, cores (r_{k-1}, n_k, r_k), r_0 = r_N = 1 (Oseledets 2011;
#   ``reconstruct_tt``).
# - ``cp_als`` (above) on the stacked tensor, and ``cp_stable`` / ``cp_correct``: the CP of
#   minimal sensitivity at the error of the ALS result (Phan et al., ECCV 2020), against the
#   diverging, mutually cancelling components that plain CP-ALS shows at high compression.

def stack_kernels(kernels: Sequence[np.ndarray], centered: Sequence[int] = (2, 3)
                  ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, ...]]]:
    """Stack tensors of one order along a new leading mode, zero padded to their common shape.

    Returns ``(stacked, mask, offsets)``: ``stacked`` (L, *max_shape) in float64, ``mask`` (bool,
    same shape) True on each layer's own entries, ``offsets[l]`` the start of layer l's block on
    every mode: 0, except on the ``centered`` modes (of the unstacked tensors; by default the
    kernel modes of (O, I, kh, kw) weights), where the block is centered, ``(max - size) // 2``:
    a 3x3 kernel sits in the middle of a 5x5 one. ``block(offsets[l], shapes[l])`` slices it out.
    """
    arrays = [_as_float64(k, None, "stack_kernels")[0] for k in kernels]
    if not arrays:
        raise ValueError("stack_kernels: expected at least one tensor")
    ndim = arrays[0].ndim
    if any(a.ndim != ndim for a in arrays):
        raise ValueError(f"stack_kernels: tensors must have one order, got shapes {[a.shape for a in arrays]}")
    if any(not 0 <= c < ndim for c in centered):
        raise ValueError(f"stack_kernels: centered modes {tuple(centered)} outside 0..{ndim - 1}")
    shape = tuple(max(a.shape[m] for a in arrays) for m in range(ndim))
    stacked = np.zeros((len(arrays),) + shape)
    mask = np.zeros(stacked.shape, dtype=bool)
    offsets = []
    for l, a in enumerate(arrays):
        offset = tuple((shape[m] - a.shape[m]) // 2 if m in centered else 0 for m in range(ndim))
        stacked[(l,) + block(offset, a.shape)] = a
        mask[(l,) + block(offset, a.shape)] = True
        offsets.append(offset)
    return stacked, mask, offsets


def block(offset: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """The slices of a block of ``shape`` starting at ``offset`` (see ``stack_kernels``)."""
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _check_mask(mask, shape: tuple[int, ...], name: str) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask, dtype=bool)
    if m.shape != shape:
        raise ValueError(f"{name}: mask of shape {m.shape} does not match the tensor's {shape}")
    if not m.any():
        raise ValueError(f"{name}: the mask selects no entry")
    return None if m.all() else m


def masked_error(approx, exact, mask=None) -> float:
    """``relative_error`` on the entries where ``mask`` is True (all entries without a mask)."""
    if mask is None:
        return relative_error(approx, exact)
    m = np.asarray(mask, dtype=bool)
    return relative_error(np.asarray(approx)[m], np.asarray(exact)[m])


def _em_fit(x: np.ndarray, mask: np.ndarray | None, step, n_iter_max: int, tol: float = 1e-3):
    """Fit ``step(filled, state) -> (state, reconstruction)`` to the masked entries of ``x``.

    Without a mask: one call. With one: EM imputation, the unmasked entries refilled with the
    reconstruction between calls until the masked error changes by less than ``tol`` (relative);
    the best state seen is returned."""
    if mask is None:
        return step(x, None)[0]
    filled = np.where(mask, x, 0.0)
    state, rec = step(filled, None)
    best, best_err = state, masked_error(rec, x, mask)
    for _ in range(n_iter_max):
        filled = np.where(mask, x, rec)
        state, rec = step(filled, state)
        err = masked_error(rec, x, mask)
        if err < best_err:
            improvement = best_err - err
            best, best_err = state, err
            if improvement <= tol * max(best_err, np.finfo(float).tiny):
                break
        else:
            break
    return best


def _leading_left_gram(matrix: np.ndarray, rank: int) -> np.ndarray:
    """``_leading_left`` through the eigenvectors of the smaller Gram matrix (M M^T or M^T M):
    much faster on the long unfoldings of stacked kernels, accurate for the leading vectors."""
    m, n = matrix.shape
    if rank > min(m, n):
        return _leading_left(matrix, rank)
    if m <= n:
        vectors = np.linalg.eigh(matrix @ matrix.T)[1][:, ::-1][:, :rank]
    else:
        values, right = np.linalg.eigh(matrix.T @ matrix)
        values, right = values[::-1][:rank], right[:, ::-1][:, :rank]
        if values[-1] <= values[0] * 1e-20:  # (numerically) rank deficient: the SVD is safer
            return _leading_left(matrix, rank)
        vectors = (matrix @ right) / np.sqrt(values)
    return _fix_signs(vectors)


def _gram_spectrum(matrix: np.ndarray) -> np.ndarray:
    """Squared singular values of a matrix, largest first (eigenvalues of its smaller Gram matrix)."""
    m, n = matrix.shape
    gram = matrix @ matrix.T if m <= n else matrix.T @ matrix
    return np.maximum(np.linalg.eigvalsh(gram)[::-1], 0.0)


def _energy_ranks(spectra: Sequence[np.ndarray], cost, budget: float, start: Sequence[int]) -> tuple[int, ...]:
    """Ranks that leave the same fraction ``tau`` of each unfolding's energy out (the split of the
    HOSVD / TT-SVD error bounds over the modes or cuts), ``tau`` the smallest whose parameter
    count ``cost(ranks)`` is within ``budget`` (bisection); at least ``start``, at least 1."""
    tails = []
    for s in spectra:
        total = max(float(s.sum()), np.finfo(float).tiny)
        tails.append(np.concatenate([np.cumsum(s[::-1])[::-1], [0.0]]) / total)  # tails[m][r]: left out at rank r

    def ranks(tau: float) -> list[int]:
        return [max(int(lo), 1, int(np.argmax(t <= tau))) for t, lo in zip(tails, start)]

    lo, hi = 0.0, 1.0
    if cost(ranks(hi)) > budget:
        return tuple(ranks(hi))
    for _ in range(60):
        mid = (lo + hi) / 2
        if cost(ranks(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    return tuple(ranks(hi))


# --------------------------------------------------------------------------- N-way Tucker

_TUCKER_FORMS = ("an int >= 1 (every rank, capped by its mode's size), a float in (0, 1] (fraction "
                 "of the dense parameter count), or one int per mode, each between 1 and the mode's size")


def _tucker_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    return math.prod(ranks) + sum(n * r for n, r in zip(shape, ranks))


def _scaled_ranks(shape: Sequence[int], scale: float, full_modes: Sequence[int]) -> tuple[int, ...]:
    return tuple(n if m in full_modes else max(1, min(n, int(scale * n))) for m, n in enumerate(shape))


def tucker_ranks(shape: Sequence[int], rank: RankSpec, full_modes: Sequence[int] = (),
                 dense_params: int | None = None, tensor=None) -> tuple[int, ...]:
    """Per-mode Tucker ranks for a tensor of ``shape``.

    ``rank``: an int (every mode but ``full_modes``, each capped by its size); a float in (0, 1]:
    the fraction of ``dense_params`` (default prod(shape)) that core + factors may use: with
    ``tensor`` given, allocated by energy (every mode leaves out the same fraction of its
    unfolding's squared singular values, the smallest fraction within the budget: the HOSVD error
    bound ``sum_m sum_{k > R_m} s_{m,k}^2`` split evenly), else every mode but ``full_modes`` scaled
    by one ratio (the largest within the budget; at least 1); or a sequence of one int per mode.
    """
    shape = tuple(int(n) for n in shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"tucker_ranks: expected positive sizes, got {shape}")
    if _is_int(rank):
        r = _check_positive_int(rank, "tucker_ranks", _TUCKER_FORMS)
        return tuple(n if m in full_modes else min(r, n) for m, n in enumerate(shape))
    if _is_fraction_type(rank):
        budget = _check_fraction(rank, "tucker_ranks", _TUCKER_FORMS) * (dense_params or math.prod(shape))
        if tensor is not None:
            x, _ = _as_float64(tensor, len(shape), "tucker_ranks")
            spectra = [_gram_spectrum(_unfold(x, m)) for m in range(x.ndim)]
            start = [n if m in full_modes else 1 for m, n in enumerate(shape)]
            return _energy_ranks(spectra, lambda r: _tucker_params(shape, r), budget, start)
        lo, hi = 0.0, 1.0
        for _ in range(60):  # the parameter count grows with the scale: bisect for the last within budget
            mid = (lo + hi) / 2
            if _tucker_params(shape, _scaled_ranks(shape, mid, full_modes)) <= budget:
                lo = mid
            else:
                hi = mid
        return _scaled_ranks(shape, lo, full_modes)
    if _is_sequence(rank) and len(rank) == len(shape) and all(_is_int(r) for r in rank):
        if any(not 1 <= int(r) <= n for r, n in zip(rank, shape)):
            raise ValueError(f"tucker_ranks: ranks {tuple(rank)} out of range for shape {shape}; "
                             f"valid ranks: {_TUCKER_FORMS}")
        return tuple(int(r) for r in rank)
    raise ValueError(f"tucker_ranks: invalid rank {rank!r} for shape {shape}; valid ranks: {_TUCKER_FORMS}")


def _project(x: np.ndarray, factors: Sequence[np.ndarray], skip: int | None = None) -> np.ndarray:
    """``x`` times the transposed factors on every mode but ``skip``, the most shrinking first."""
    order = sorted((m for m in range(len(factors)) if m != skip),
                   key=lambda m: factors[m].shape[1] / factors[m].shape[0])
    for m in order:
        x = _mode_dot(x, factors[m].T, m)
    return x


def reconstruct_tucker(core, factors: Sequence[np.ndarray]) -> np.ndarray:
    """Dense tensor ``core x_0 U_0 x_1 U_1 ...`` (U_m of shape (size_m, rank_m))."""
    dtype = _result_dtype([core, *factors])
    c = np.asarray(core, dtype=np.float64)
    fs = [np.asarray(f, dtype=np.float64) for f in factors]
    if c.ndim != len(fs) or any(f.ndim != 2 or f.shape[1] != r for f, r in zip(fs, c.shape)):
        raise ValueError(f"reconstruct_tucker: core {c.shape} and factors {[f.shape for f in fs]} do not fit "
                         "(one factor (size, rank) per core mode)")
    for m, f in enumerate(fs):
        c = _mode_dot(c, f, m)
    return c.astype(dtype)


def tucker(tensor, ranks: RankSpec, n_iter_max: int = 50, tol: float = 1e-8, mask=None,
           full_modes: Sequence[int] = (), em_iter_max: int = 15,
           em_tol: float = 1e-3) -> tuple[np.ndarray, list[np.ndarray]]:
    """Tucker decomposition of an N-way tensor (HOSVD, then HOOI sweeps).

    Returns ``(core, factors)``: factors U_m (size_m, rank_m) with orthonormal columns and core
    (rank_0, ..., rank_{N-1}) with ``T ~ reconstruct_tucker(core, factors)``. ``ranks``: any form
    ``tucker_ranks`` accepts (``full_modes`` as there). HOOI stops when the fit ``||core|| / ||T||``
    improves by less than ``tol`` (relative) or after ``n_iter_max`` sweeps. With ``mask`` (bool,
    the tensor's shape) only the masked entries are fitted (EM imputation, one HOOI sweep per EM
    step, at most ``em_iter_max`` steps, until the masked error improves by less than ``em_tol``).
    """
    x, dtype = _as_float64(tensor, None, "tucker")
    r = tucker_ranks(x.shape, ranks, full_modes)
    mask = _check_mask(mask, x.shape, "tucker")

    def hooi(t: np.ndarray, factors, sweeps: int):
        if factors is None:
            factors = [_leading_left_gram(_unfold(t, m), r[m]) for m in range(t.ndim)]
        norm = np.linalg.norm(t)
        fit = np.linalg.norm(_project(t, factors)) / norm if norm > 0 else 1.0
        for _ in range(sweeps):
            new = list(factors)
            for m in range(t.ndim):
                new[m] = _leading_left_gram(_unfold(_project(t, new, skip=m), m), r[m])
            new_fit = np.linalg.norm(_project(t, new)) / norm if norm > 0 else 1.0
            if new_fit < fit:  # HOOI is monotone; only rounding makes it step back
                break
            factors, change, fit = new, new_fit - fit, new_fit
            if change <= tol * max(fit, np.finfo(float).tiny):
                break
        return factors

    def step(t: np.ndarray, state):
        factors = hooi(t, None if state is None else state[1], n_iter_max if mask is None else 1)
        core = _project(t, factors)
        return (core, factors), reconstruct_tucker(core, factors)

    core, factors = _em_fit(x, mask, step, min(n_iter_max, em_iter_max), em_tol)
    return core.astype(dtype), [f.astype(dtype) for f in factors]


# --------------------------------------------------------------------------- N-way TT

_TT_TENSOR_FORMS = ("an int >= 1 (every internal rank, capped by the unfoldings), a float in (0, 1] "
                    "(fraction of the dense parameter count), or a list of the N-1 internal ranks, "
                    "each between 1 and its unfolding's maximal rank")


def tt_max_ranks(shape: Sequence[int]) -> list[int]:
    """Maximal internal TT ranks of a tensor: min(prod of the sizes left of each cut, prod right)."""
    shape = [int(n) for n in shape]
    return [min(math.prod(shape[:k + 1]), math.prod(shape[k + 1:])) for k in range(len(shape) - 1)]


def _tt_tensor_params(shape: Sequence[int], internal: Sequence[int]) -> int:
    r = [1, *internal, 1]
    return sum(r[k] * n * r[k + 1] for k, n in enumerate(shape))


def tt_tensor_ranks(shape: Sequence[int], rank: RankSpec, dense_params: int | None = None,
                    tensor=None) -> tuple[int, ...]:
    """The N-1 internal TT ranks of a tensor of ``shape`` (r_0 = r_N = 1 not included).

    ``rank``: an int (each capped by ``tt_max_ranks``), a float in (0, 1] (fraction of
    ``dense_params``, default prod(shape): with ``tensor`` given, allocated by energy (every cut
    leaves out the same fraction of its unfolding's squared singular values, the smallest within
    the budget: the TT-SVD error bound split evenly, as in Oseledets' TT-SVD), else the largest
    uniform rank, capped likewise, within the budget; at least 1), or a list of N-1 ints, each
    between 1 and its maximal rank.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"tt_tensor_ranks: expected at least 2 positive sizes, got {shape}")
    max_ranks = tt_max_ranks(shape)
    if _is_int(rank):
        r = _check_positive_int(rank, "tt_tensor_ranks", _TT_TENSOR_FORMS)
        return tuple(min(r, m) for m in max_ranks)
    if _is_fraction_type(rank):
        budget = _check_fraction(rank, "tt_tensor_ranks", _TT_TENSOR_FORMS) * (dense_params or math.prod(shape))
        if tensor is not None:
            x, _ = _as_float64(tensor, len(shape), "tt_tensor_ranks")
            spectra = [_gram_spectrum(x.reshape(math.prod(shape[:k + 1]), -1)) for k in range(len(shape) - 1)]
            return _energy_ranks(spectra, lambda r: _tt_tensor_params(shape, r), budget, [1] * len(max_ranks))
        lo, hi = 1, max(max_ranks)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _tt_tensor_params(shape, [min(mid, m) for m in max_ranks]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return tuple(min(lo, m) for m in max_ranks)
    if _is_sequence(rank) and all(_is_int(r) for r in rank):
        if len(rank) != len(max_ranks) or any(not 1 <= int(r) <= m for r, m in zip(rank, max_ranks)):
            raise ValueError(f"tt_tensor_ranks: ranks {list(rank)} do not fit shape {shape} (maximal "
                             f"ranks {max_ranks}); valid ranks: {_TT_TENSOR_FORMS}")
        return tuple(int(r) for r in rank)
    raise ValueError(f"tt_tensor_ranks: invalid rank {rank!r}; valid ranks: {_TT_TENSOR_FORMS}")


def _tt_svd(x: np.ndarray, internal: Sequence[int]) -> list[np.ndarray]:
    cores, rest, r_prev = [], x.reshape(1, -1), 1
    for k, n in enumerate(x.shape[:-1]):
        unfolding = rest.reshape(r_prev * n, -1)
        if internal[k] < min(unfolding.shape):  # truncated: left vectors from the smaller Gram matrix
            u = _leading_left_gram(unfolding, internal[k])
            r = u.shape[1]
            cores.append(u.reshape(r_prev, n, r))
            rest = u.T @ unfolding
        else:
            u, s, vt = np.linalg.svd(unfolding, full_matrices=False)
            r = min(internal[k], s.size)
            cores.append(u[:, :r].reshape(r_prev, n, r))
            rest = s[:r, None] * vt[:r]
        r_prev = r
    cores.append(rest.reshape(r_prev, x.shape[-1], 1))
    return cores


def reconstruct_tt(cores: Sequence[np.ndarray]) -> np.ndarray:
    """Dense tensor of TT cores (r_{k-1}, n_k, r_k), r_0 = r_N = 1."""
    dtype = _result_dtype(list(cores))
    cs = [np.asarray(c, dtype=np.float64) for c in cores]
    if (not cs or any(c.ndim != 3 for c in cs) or cs[0].shape[0] != 1 or cs[-1].shape[2] != 1
            or any(cs[k].shape[2] != cs[k + 1].shape[0] for k in range(len(cs) - 1))):
        raise ValueError(f"reconstruct_tt: core shapes {[c.shape for c in cs]} do not fit (r_(k-1), n_k, r_k) "
                         "with r_0 = r_N = 1")
    full = cs[0].reshape(-1, cs[0].shape[2])
    for c in cs[1:]:
        full = (full @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[2])
    return full.reshape([c.shape[1] for c in cs]).astype(dtype)


def tt(tensor, ranks: RankSpec, mask=None, n_iter_max: int = 15, tol: float = 1e-3) -> list[np.ndarray]:
    """TT-SVD of an N-way tensor (N >= 2): cores (r_{k-1}, n_k, r_k), r_0 = r_N = 1.

    ``ranks``: any form ``tt_tensor_ranks`` accepts; a rank beyond what a cut's SVD can give is
    lowered to it (the core shapes tell the ranks used). Exact at the maximal ranks. With
    ``mask``, only the masked entries are fitted (EM imputation around the TT-SVD, at most
    ``n_iter_max`` steps, stopping when the masked error improves by less than ``tol``).
    """
    x, dtype = _as_float64(tensor, None, "tt")
    if x.ndim < 2:
        raise ValueError(f"tt: expected a tensor of at least 2 modes, got shape {x.shape}")
    internal = tt_tensor_ranks(x.shape, ranks)
    mask = _check_mask(mask, x.shape, "tt")

    def step(t: np.ndarray, _state):
        cores = _tt_svd(t, internal)
        return cores, reconstruct_tt(cores)

    return [c.astype(dtype) for c in _em_fit(x, mask, step, n_iter_max, tol)]


# --------------------------------------------------------------------------- N-way CP, stable CP

def cp_tensor_rank(shape: Sequence[int], rank: int | float, dense_params: int | None = None) -> int:
    """CP rank for a tensor of ``shape``: an int as is, or a float in (0, 1], the fraction of
    ``dense_params`` (default prod(shape)) that R * sum(shape) may use (at least 1)."""
    shape = tuple(int(n) for n in shape)
    if _is_int(rank):
        return _check_positive_int(rank, "cp_tensor_rank", _CP_FORMS)
    if _is_fraction_type(rank):
        fraction = _check_fraction(rank, "cp_tensor_rank", _CP_FORMS)
        return max(1, int(fraction * (dense_params or math.prod(shape)) // sum(shape)))
    raise ValueError(f"cp_tensor_rank: invalid rank {rank!r}; valid ranks: {_CP_FORMS}")


def cp_masked(tensor, rank: int, mask=None, n_iter_max: int = 500, tol: float = 1e-10, ridge: float = 1e-6,
              seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """``cp_als`` fitted to the masked entries only (EM imputation, warm-started ALS steps);
    without a mask it is ``cp_als``. Returns ``(weights, factors)`` as ``cp_als`` does."""
    x, dtype = _as_float64(tensor, None, "cp_masked")
    mask = _check_mask(mask, x.shape, "cp_masked")
    if mask is None:
        return cp_als(x, rank, n_iter_max=n_iter_max, tol=tol, ridge=ridge, seed=seed)

    def step(t: np.ndarray, state):
        if state is None:
            weights, factors = cp_als(t, rank, n_iter_max=n_iter_max, tol=tol, ridge=ridge, seed=seed)
        else:  # warm start: a few ALS sweeps from the previous factors
            weights, factors = _cp_als_from(t, state, ridge, sweeps=5)
        return (weights, factors), reconstruct_cp(factors, weights)

    weights, factors = _em_fit(x, mask, step, 15, 1e-3)
    return weights.astype(dtype), [f.astype(dtype) for f in factors]


def _cp_als_from(x: np.ndarray, state, ridge: float, sweeps: int) -> tuple[np.ndarray, list[np.ndarray]]:
    weights, factors = state
    factors = [np.asarray(f, dtype=np.float64).copy() for f in factors]
    factors[0] = factors[0] * weights
    plans = _khatri_rao_free_mttkrp_paths(x.shape, factors[0].shape[1])
    grams = [f.T @ f for f in factors]
    for _ in range(sweeps):
        for n in range(x.ndim):
            factors[n], weights = _normalize_columns(_ridge_solve(_hadamard_grams(grams, n),
                                                                  _mttkrp(x, factors, n, plans[n]), ridge))
            grams[n] = factors[n].T @ factors[n]
        factors[-1] = factors[-1] * weights
        grams[-1] = factors[-1].T @ factors[-1]
    factors[-1], weights = _normalize_columns(factors[-1])
    return weights, factors


def cp_sensitivity(factors: Sequence[np.ndarray], weights=None) -> float:
    """Sensitivity of a CP model (Phan et al. 2020): ``lim E||[[A + dA]] - [[A]]||^2 / s^2`` for
    i.i.d. N(0, s^2) perturbations of every factor entry, which is
    ``sum_n I_n * trace(hadamard_{k != n} A_k^T A_k)``. The weights (if any) are absorbed into the
    first factor. Large when components of large norm cancel each other (degenerate CP)."""
    fs = [np.asarray(f, dtype=np.float64) for f in factors]
    if weights is not None:
        fs[0] = fs[0] * np.asarray(weights, dtype=np.float64)
    sq = [np.sum(f * f, axis=0) for f in fs]  # squared column norms: the diagonals of the Grams
    return float(sum(f.shape[0] * np.sum(np.prod([s for k, s in enumerate(sq) if k != n], axis=0))
                     for n, f in enumerate(fs)))


def _balance(factors: list[np.ndarray]) -> list[np.ndarray]:
    """Rescale each component's columns (their product unchanged) to the scaling of least
    sensitivity: column norms proportional to sqrt(I_n), the square roots of the mode sizes."""
    norms = np.stack([np.linalg.norm(f, axis=0) for f in factors])
    if np.any(norms == 0):
        return factors
    root = 0.5 * np.log([f.shape[0] for f in factors])
    target = np.exp(root[:, None] + np.mean(np.log(norms), axis=0)[None, :] - np.mean(root))
    return [f * (t / n) for f, t, n in zip(factors, target, norms)]


def _min_sensitivity_update(yz: np.ndarray, gram: np.ndarray, d: np.ndarray, norm_sq: float,
                            bound_sq: float) -> np.ndarray:
    """argmin_A tr(A diag(d) A^T) s.t. ||Y - A Z^T||^2 <= bound_sq, given YZ, Z^T Z and ||Y||^2.

    A = YZ (Z^T Z + mu diag(d))^-1, mu >= 0 set so that the error equals the bound (bisection on
    log mu with the error in closed form); the least-squares end (mu -> 0) when the bound cannot
    be met."""
    d = np.maximum(d, 1e-300 + 1e-12 * d.max())
    s_half = 1.0 / np.sqrt(d)
    sigma, v = np.linalg.eigh(gram * s_half[:, None] * s_half[None, :])
    sigma = np.maximum(sigma, 0.0)
    m = yz * s_half[None, :] @ v
    msq = np.sum(m * m, axis=0)

    def error(mu: float) -> float:
        return norm_sq - float(np.sum(msq * (sigma + 2 * mu) / (sigma + mu) ** 2))

    scale = max(float(sigma.max()), np.finfo(float).tiny)
    lo, hi = scale * 1e-14, scale
    if error(lo) >= bound_sq:
        mu = lo
    else:
        while error(hi) < bound_sq and hi < scale * 1e30:
            hi *= 10.0
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            if error(mid) < bound_sq:
                lo = mid
            else:
                hi = mid
            if hi / lo < 1 + 1e-12:
                break
        mu = lo  # the feasible side
    return (m / (sigma + mu)) @ v.T * s_half[None, :]


def cp_correct(tensor, factors: Sequence[np.ndarray], weights=None, error: float | None = None,
               n_iter_max: int = 200, tol: float = 1e-6) -> list[np.ndarray]:
    """Error-preserving correction of a CP model: the CP of minimal sensitivity within an error bound.

    Solves ``min cp_sensitivity([[A_1..A_N]])`` s.t. ``||T - [[A_1..A_N]]||_F <= error``
    (Phan et al., ECCV 2020), ``error`` being the absolute error of the given model by default, by
    alternating over the factors: with the others fixed, the sensitivity is the quadratic
    ``tr(A_n diag(w) A_n^T)`` and the bound a quadratic constraint, solved in closed form up to one
    Lagrange multiplier (``A_n = T_(n) Z (Z^T Z + mu diag(w))^-1``, ``mu`` by bisection). Stops when
    the sensitivity decreases by less than ``tol`` (relative) in a sweep. Returns the factors,
    weights absorbed, each component rescaled to its least sensitive scaling.
    """
    x, dtype = _as_float64(tensor, None, "cp_correct")
    fs = [np.asarray(f, dtype=np.float64).copy() for f in factors]
    if len(fs) != x.ndim or any(f.ndim != 2 or f.shape[0] != n or f.shape[1] != fs[0].shape[1]
                                for f, n in zip(fs, x.shape)):
        raise ValueError(f"cp_correct: factors {[f.shape for f in fs]} do not fit a tensor of shape {x.shape}")
    if weights is not None:
        fs[0] = fs[0] * np.asarray(weights, dtype=np.float64)
    norm_sq = float(np.sum(x * x))
    current = float(np.linalg.norm(reconstruct_cp(fs) - x))
    bound = current if error is None else float(error)
    if bound < 0:
        raise ValueError(f"cp_correct: error bound {error!r} must be >= 0")
    bound_sq = max(bound, current if error is None else 0.0) ** 2
    fs = _balance(fs)
    plans = _khatri_rao_free_mttkrp_paths(x.shape, fs[0].shape[1])
    sens = cp_sensitivity(fs)
    for _ in range(n_iter_max):
        for n in range(x.ndim):
            sq = [np.sum(f * f, axis=0) for f in fs]
            w = np.zeros(fs[0].shape[1])
            for m in range(x.ndim):
                if m != n:
                    w += x.shape[m] * np.prod([s for k, s in enumerate(sq) if k not in (m, n)], axis=0)
            gram = _hadamard_grams([f.T @ f for f in fs], n)
            fs[n] = _min_sensitivity_update(_mttkrp(x, fs, n, plans[n]), gram, w, norm_sq, bound_sq)
        new = cp_sensitivity(fs)
        done = sens - new <= tol * sens
        sens = new
        if done:
            break
    return [f.astype(dtype) for f in _balance(fs)]


def cp_stable(weight, rank: int | float, n_iter_max: int = 500, ridge: float = 0.0, seed: int = 0,
              correction_iters: int = 200) -> list[np.ndarray]:
    """Stable CP of a convolution weight (O, I, kh, kw): ``cp_als`` (plain by default: no ridge),
    then ``cp_correct`` at the ALS error. Same layout as ``cp``: ``[A_o, A_i, A_h, A_w]`` with
    ``W[o, i, h, w] ~ sum_r A_o[o, r] A_i[i, r] A_h[h, r] A_w[w, r]``, here with each
    component's scale spread over the four factors as the correction leaves it."""
    w, dtype = _as_float64(weight, 4, "cp_stable")
    r = cp_rank(w.shape, rank)
    weights, factors = cp_als(w, r, n_iter_max=n_iter_max, ridge=ridge, seed=seed)
    return [f.astype(dtype) for f in cp_correct(w, factors, weights, n_iter_max=correction_iters)]


__all__ += ["stack_kernels", "block", "masked_error", "tucker", "tucker_ranks", "reconstruct_tucker",
            "tt", "tt_tensor_ranks", "tt_max_ranks", "reconstruct_tt", "cp_tensor_rank", "cp_masked",
            "cp_sensitivity", "cp_correct", "cp_stable"]
