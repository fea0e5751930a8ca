"""CP decomposition by alternating least squares, with a Tikhonov term that vanishes as the fit
converges.

``cp_als(T, rank)``: ``T ~ sum_r weights[r] * outer(factors[0][:, r], ..., factors[-1][:, r])``.
Start: HOSVD (each mode's leading left singular vectors, padded with seeded random unit columns
when the rank exceeds the mode). A sweep solves each factor in turn by least squares against its
MTTKRP and the Hadamard product V of the other factors' Gram matrices, with ``lam * I`` added
to V::

    lam = ridge * trace(V) / R * s,   s = min(1, max(e, d))

``e`` is the current relative error and ``d = 2 * max(0, -min_{r != s} C_rs - 0.5)`` with
``C_rs = prod_n cos(a_r^(n), a_s^(n))`` the congruence of two components (Harshman's degeneracy
indicator: two components that grow while cancelling each other have C -> -1). On data the
model fits, e -> 0 and the regularisation vanishes with it (exactly low-rank data reach the
round-off floor, not the ridge's bias); on a degenerate problem (border rank: components diverge
while the error also goes to 0, the concern of Phan et al. 2020) d stays near 1 and the ridge
keeps the components bounded.

MTTKRP by a dimension tree (Phan, Tichavsky & Cichocki 2013): the modes are cut in two halves;
one GEMM of the tensor (as a matrix, first half by second half) with the Khatri-Rao product of
the second half's factors serves every mode of the first half (each then one small einsum), and
one GEMM with the first half's updated factors serves the second half: two passes over the
tensor per sweep, where one MTTKRP per mode makes N.

Error. ``e`` comes from the last MTTKRP and the Gram matrices (no reconstruction), except below
``EXACT_BELOW`` where that formula loses its digits to cancellation (it computes e**2 as a
difference of O(1) numbers, so it cannot see below ~1e-8): there the residual is computed
densely. Stops when ``e`` changes by less than ``tol`` between sweeps (unless it still falls at
least 4-fold per sweep and is above 1e-13: exactly low-rank data then reach round-off in a few
more sweeps), or after ``n_iter_max``.

``cp(W, rank)`` is the same on a convolution weight (O, I, kh, kw), the weights absorbed in the
first factor; ``cp_rank`` turns an int or a parameter fraction into a rank.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ._base import (_as_float64, _check_fraction, _check_positive_int, _is_fraction_type, _is_int,
                    _leading_left, _result_dtype, _unfold, _weight_shape)

_CP_FORMS = "an int >= 1 or a float in (0, 1] (fraction of the dense parameter count)"
EXACT_BELOW = 1e-4  # below this estimated relative error, compute the residual densely
DEGENERATE_CONGRUENCE = -0.5  # congruence below which the ridge is kept (full at -1)
FAST, ROUND_OFF = 0.25, 1e-13  # keep sweeping while the error falls 4-fold per sweep, down to round-off


def _khatri_rao(factors: Sequence[np.ndarray]) -> np.ndarray:
    """Column-wise Kronecker product: ``KR[(i_1, ..., i_k), r] = prod_j factors[j][i_j, r]``, rows
    in C order (the first factor's index slowest, as ``reshape`` flattens those modes)."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    return out


def _group_equations(size: int) -> list[str]:
    """For a group of ``size`` modes: per mode j, the einsum summing a partial (I_1..I_size, R)
    against the group's other factors, leaving (I_j, R)."""
    letters = "abcdefghijklmnopqrstuvwxy"[:size]
    return [letters + "z," + ",".join(letters[m] + "z" for m in range(size) if m != j) + "->" + letters[j] + "z"
            for j in range(size)]


def _group_mttkrp(partial: np.ndarray, factors: Sequence[np.ndarray], j: int, equations: list[str]) -> np.ndarray:
    if len(factors) == 1:
        return partial
    return np.einsum(equations[j], partial, *[f for m, f in enumerate(factors) if m != j], optimize=len(factors) > 2)


def _cp_init(x: np.ndarray, rank: int, rng: np.random.Generator) -> list[np.ndarray]:
    """HOSVD start: leading left singular vectors of each unfolding, padded with random unit columns."""
    factors = []
    for n in range(x.ndim):
        unfolded = _unfold(x, n)
        u = _leading_left(unfolded, min(rank, *unfolded.shape))
        if u.shape[1] < rank:
            extra = rng.standard_normal((x.shape[n], rank - u.shape[1]))
            u = np.concatenate([u, extra / np.linalg.norm(extra, axis=0)], axis=1)
        factors.append(u)
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
    try:
        return np.linalg.solve(gram + lam * np.eye(r), rhs.T).T
    except np.linalg.LinAlgError:  # singular without a ridge (lam 0, collinear components)
        return rhs @ np.linalg.pinv(gram + lam * np.eye(r))


def _normalize_columns(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(a, axis=0)
    safe = np.where(norms > 0, norms, 1.0)
    return a / safe, norms


def _cp_error(x2: np.ndarray, norm_x: float, mttkrp_last: np.ndarray, factors: list[np.ndarray],
              weights: np.ndarray, congruence: np.ndarray, kr_left: np.ndarray) -> float:
    """Relative error ||X - model|| / ||X||: from the last MTTKRP and the Gram matrices, or, when
    that estimate is below EXACT_BELOW (see the module docstring), from the residual
    ``X - (KR_left * weights) @ KR_right^T`` on ``x2``, the tensor as (left modes, right modes)."""
    inner = float(np.sum(mttkrp_last * factors[-1] * weights))
    model_sq = float(weights @ congruence @ weights)
    estimate = math.sqrt(max(norm_x ** 2 - 2 * inner + model_sq, 0.0)) / norm_x
    if estimate >= EXACT_BELOW:
        return estimate
    half = len(factors) // 2
    model = (kr_left * weights) @ _khatri_rao(factors[half:]).T
    return float(np.linalg.norm(x2 - model)) / norm_x


def _degeneracy(congruence: np.ndarray) -> float:
    """0 unless two components' congruence is below DEGENERATE_CONGRUENCE; 1 at -1."""
    if congruence.shape[0] < 2:
        return 0.0
    off = congruence - np.diag(np.diag(congruence))
    worst = float(np.min(off))
    return min(1.0, max(0.0, (DEGENERATE_CONGRUENCE - worst) / (1.0 + DEGENERATE_CONGRUENCE)))


def cp_als(tensor, rank: int, n_iter_max: int = 500, tol: float = 1e-10, ridge: float = 1e-6,
           seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """CP decomposition of an N-way tensor (N >= 2) by regularised alternating least squares.

    Returns ``(weights, factors)``: weights (R,) in decreasing order and one factor (I_n, R) of unit
    columns per mode, such that ``T ~ sum_r weights[r] * outer(factors[0][:, r], ..., factors[-1][:, r])``.
    Each ALS solve adds ``ridge * trace(V) / R * s`` to the diagonal of its R x R normal matrix
    V, where ``s`` shrinks with the relative error unless components turn degenerate (module
    docstring; ``ridge=0``: plain ALS). Stops when the relative error changes by less than
    ``tol`` between sweeps (unless it still falls 4-fold per sweep, above 1e-13), or after
    ``n_iter_max`` sweeps. ``seed`` drives the random columns
    that pad the HOSVD start when ``rank`` exceeds a mode's size.
    """
    x, dtype = _as_float64(tensor, None, "cp_als")
    if x.ndim < 2:
        raise ValueError(f"cp_als: expected a tensor of at least 2 modes, got shape {x.shape}")
    if not _is_int(rank) or rank < 1:
        raise ValueError(f"cp_als: rank must be an int >= 1, got {rank!r}")
    if not _is_int(n_iter_max) or n_iter_max < 0 or not tol >= 0 or not ridge >= 0:
        raise ValueError(f"cp_als: n_iter_max must be an int >= 0, tol and ridge >= 0; got {n_iter_max!r}, "
                         f"{tol!r}, {ridge!r}")
    rank = int(rank)
    norm_x = float(np.linalg.norm(x))
    factors = _cp_init(x, rank, np.random.default_rng(seed))
    weights = np.ones(rank)
    if norm_x == 0:
        return np.zeros(rank, dtype=dtype), [f.astype(dtype) for f in factors]
    half = x.ndim // 2  # the dimension tree: modes [0, half) then [half, N)
    groups = (list(range(half)), list(range(half, x.ndim)))
    x2 = x.reshape(math.prod(x.shape[:half]), -1)
    equations = [_group_equations(len(g)) for g in groups]
    grams = [f.T @ f for f in factors]
    error, scale = None, 1.0
    for _ in range(n_iter_max):
        for side, group in enumerate(groups):
            # one GEMM per half: the tensor against the Khatri-Rao product of the other half's factors
            kr = _khatri_rao([factors[n] for n in groups[1 - side]])
            partial = (x2 @ kr if side == 0 else x2.T @ kr).reshape([x.shape[n] for n in group] + [rank])
            for j, n in enumerate(group):
                m = _group_mttkrp(partial, [factors[k] for k in group], j, equations[side])
                factors[n], weights = _normalize_columns(_ridge_solve(_hadamard_grams(grams, n), m, ridge * scale))
                grams[n] = factors[n].T @ factors[n]
        congruence = _hadamard_grams(grams, None)
        new_error = _cp_error(x2, norm_x, m, factors, weights, congruence, kr)
        scale = min(1.0, max(new_error, _degeneracy(congruence)))
        # |change| < tol stops, unless the error still falls 4-fold per sweep (fast linear convergence
        # on data the model fits exactly: a few more sweeps reach round-off instead of ~tol)
        converged = (error is not None and abs(error - new_error) < tol
                     and not (new_error < FAST * error and new_error > ROUND_OFF))
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
