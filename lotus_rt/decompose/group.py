"""Decompositions for groups of layers: one low-rank tensor for several layers' kernels.

A group's kernels are stacked along a leading "layer" mode (``stack_kernels``), zero padded to a
common shape when they differ, with a mask of the entries that belong to a layer; ``block``
slices a layer back out. The fits below take that mask and fit only the masked entries (EM
imputation: the entries outside the mask are refilled with the current reconstruction between
steps, so the padding costs no rank):

- ``masked_tucker(T, ranks, mask)``: HOSVD, then one warm-started HOOI sweep per EM step (plain
  ``tucker`` of ``hooi.py`` without a mask); for a stacked conv group (L, O, I, kh, kw), T-Net's
  shared channel and kernel factors with a core over the layer mode (Kossaifi et al. 2019).
- ``masked_tt(T, ranks, mask)``: ``tt`` (TT-SVD) per EM step; cores (r_{k-1}, n_k, r_k).
- ``masked_cp(T, rank, mask)``: ``cp_als``, then warm-started ALS sweeps per EM step.
- ``cp_sensitivity``, ``cp_correct``, ``cp_stable``: the sensitivity of a CP model and its
  error-preserving correction to the least sensitive CP at the same error (Phan et al., ECCV
  2020), against the diverging, mutually cancelling components that plain CP-ALS shows at high
  compression; ``cp_stable`` is ``cp`` followed by that correction.

Rank helpers take the group's budget: ``group_tucker_ranks``, ``group_tt_ranks``,
``group_cp_rank`` (an int, a float fraction of ``dense_params`` -- spread over the modes or cuts
by the energy of the unfoldings' singular values when the tensor is given --, or explicit ranks).
NumPy only.

    >>> import numpy as np
    >>> from lotus_rt import decompose
    >>> rng = np.random.default_rng(0)
    >>> stacked, mask, offsets = decompose.stack_kernels([rng.standard_normal((4, 2, 5, 5)),
    ...                                                   rng.standard_normal((6, 4, 3, 3))])
    >>> stacked.shape, offsets[1]                      # the 3x3 kernel centred in the 5x5 window
    ((2, 6, 4, 5, 5), (0, 0, 1, 1))
    >>> core, factors = decompose.masked_tucker(stacked, stacked.shape, mask=mask)   # full rank
    >>> decompose.masked_error(decompose.reconstruct_tucker(core, factors), stacked, mask) < 1e-10
    True
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

from ._base import (RankSpec, _as_float64, _check_fraction, _check_positive_int, _is_fraction_type, _is_int,
                    _is_sequence, _leading_left, _mode_dot, _unfold, relative_error)
from .als import _CP_FORMS, cp_als, cp_rank, reconstruct_cp
from .hooi import reconstruct_tucker, tucker
from .ttsvd import reconstruct_tt, tt

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


def group_tucker_ranks(shape: Sequence[int], rank: RankSpec, full_modes: Sequence[int] = (),
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
        raise ValueError(f"group_tucker_ranks: expected positive sizes, got {shape}")
    if _is_int(rank):
        r = _check_positive_int(rank, "group_tucker_ranks", _TUCKER_FORMS)
        return tuple(n if m in full_modes else min(r, n) for m, n in enumerate(shape))
    if _is_fraction_type(rank):
        budget = _check_fraction(rank, "group_tucker_ranks", _TUCKER_FORMS) * (dense_params or math.prod(shape))
        if tensor is not None:
            x, _ = _as_float64(tensor, len(shape), "group_tucker_ranks")
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
            raise ValueError(f"group_tucker_ranks: ranks {tuple(rank)} out of range for shape {shape}; "
                             f"valid ranks: {_TUCKER_FORMS}")
        return tuple(int(r) for r in rank)
    raise ValueError(f"group_tucker_ranks: invalid rank {rank!r} for shape {shape}; valid ranks: {_TUCKER_FORMS}")


def _project(x: np.ndarray, factors: Sequence[np.ndarray], skip: int | None = None) -> np.ndarray:
    """``x`` times the transposed factors on every mode but ``skip``, the most shrinking first."""
    order = sorted((m for m in range(len(factors)) if m != skip),
                   key=lambda m: factors[m].shape[1] / factors[m].shape[0])
    for m in order:
        x = _mode_dot(x, factors[m].T, m)
    return x


def masked_tucker(tensor, ranks: RankSpec, mask=None, full_modes: Sequence[int] = (), em_iter_max: int = 15,
                  em_tol: float = 1e-3, n_iter_max: int = 100, tol: float = 1e-4) -> tuple[np.ndarray, list[np.ndarray]]:
    """Tucker decomposition of an N-way tensor fitted to the entries where ``mask`` is True.

    Returns ``(core, factors)`` as ``tucker`` (``hooi.py``) does: factors U_m (size_m, rank_m)
    with orthonormal columns and core (rank_0, ..., rank_{N-1}), ``T ~ reconstruct_tucker(core,
    factors)``. ``ranks``: any form ``group_tucker_ranks`` accepts (``full_modes`` as there).
    Without a mask (or an all-True one) this is ``tucker(T, ranks, n_iter_max=, tol=)``. With one:
    EM imputation from the zero-filled tensor's HOSVD, one warm-started HOOI sweep per EM step,
    at most ``em_iter_max`` steps, until the masked error improves by less than ``em_tol``
    (relative); the best step's fit is returned.
    """
    x, dtype = _as_float64(tensor, None, "masked_tucker")
    r = group_tucker_ranks(x.shape, ranks, full_modes)
    mask = _check_mask(mask, x.shape, "masked_tucker")
    if mask is None:
        return tucker(tensor, r, n_iter_max=n_iter_max, tol=tol)

    def hooi(t: np.ndarray, factors):
        if factors is None:  # HOSVD
            return [_leading_left(_unfold(t, m), r[m]) for m in range(t.ndim)]
        new = list(factors)
        for m in range(t.ndim):  # one HOOI sweep
            new[m] = _leading_left(_unfold(_project(t, new, skip=m), m), r[m])
        return new

    def step(t: np.ndarray, state):
        factors = hooi(t, None if state is None else state[1])
        core = _project(t, factors)
        return (core, factors), reconstruct_tucker(core, factors)

    core, factors = _em_fit(x, mask, step, em_iter_max, em_tol)
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


def group_tt_ranks(shape: Sequence[int], rank: RankSpec, dense_params: int | None = None,
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
        raise ValueError(f"group_tt_ranks: expected at least 2 positive sizes, got {shape}")
    max_ranks = tt_max_ranks(shape)
    if _is_int(rank):
        r = _check_positive_int(rank, "group_tt_ranks", _TT_TENSOR_FORMS)
        return tuple(min(r, m) for m in max_ranks)
    if _is_fraction_type(rank):
        budget = _check_fraction(rank, "group_tt_ranks", _TT_TENSOR_FORMS) * (dense_params or math.prod(shape))
        if tensor is not None:
            x, _ = _as_float64(tensor, len(shape), "group_tt_ranks")
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
            raise ValueError(f"group_tt_ranks: ranks {list(rank)} do not fit shape {shape} (maximal "
                             f"ranks {max_ranks}); valid ranks: {_TT_TENSOR_FORMS}")
        return tuple(int(r) for r in rank)
    raise ValueError(f"group_tt_ranks: invalid rank {rank!r}; valid ranks: {_TT_TENSOR_FORMS}")


def masked_tt(tensor, ranks: RankSpec, mask=None, n_iter_max: int = 15, tol: float = 1e-3) -> list[np.ndarray]:
    """TT-SVD of an N-way tensor (N >= 2): cores (r_{k-1}, n_k, r_k), r_0 = r_N = 1.

    ``ranks``: any form ``group_tt_ranks`` accepts; a rank beyond what a cut's SVD can give is
    lowered to it (the core shapes tell the ranks used). Exact at the maximal ranks. With
    ``mask``, only the masked entries are fitted (EM imputation around the TT-SVD, at most
    ``n_iter_max`` steps, stopping when the masked error improves by less than ``tol``).
    """
    x, dtype = _as_float64(tensor, None, "masked_tt")
    if x.ndim < 2:
        raise ValueError(f"masked_tt: expected a tensor of at least 2 modes, got shape {x.shape}")
    internal = group_tt_ranks(x.shape, ranks)
    mask = _check_mask(mask, x.shape, "masked_tt")

    def step(t: np.ndarray, _state):
        cores = tt(t, list(internal))
        return cores, reconstruct_tt(cores)

    return [c.astype(dtype) for c in _em_fit(x, mask, step, n_iter_max, tol)]


# --------------------------------------------------------------------------- N-way CP, stable CP

def group_cp_rank(shape: Sequence[int], rank: int | float, dense_params: int | None = None) -> int:
    """CP rank for a tensor of ``shape``: an int as is, or a float in (0, 1], the fraction of
    ``dense_params`` (default prod(shape)) that R * sum(shape) may use (at least 1)."""
    shape = tuple(int(n) for n in shape)
    if _is_int(rank):
        return _check_positive_int(rank, "group_cp_rank", _CP_FORMS)
    if _is_fraction_type(rank):
        fraction = _check_fraction(rank, "group_cp_rank", _CP_FORMS)
        return max(1, int(fraction * (dense_params or math.prod(shape)) // sum(shape)))
    raise ValueError(f"group_cp_rank: invalid rank {rank!r}; valid ranks: {_CP_FORMS}")


def masked_cp(tensor, rank: int, mask=None, n_iter_max: int = 500, tol: float = 1e-10, ridge: float = 1e-6,
              seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """``cp_als`` fitted to the masked entries only (EM imputation, warm-started ALS steps);
    without a mask it is ``cp_als``. Returns ``(weights, factors)`` as ``cp_als`` does."""
    x, dtype = _as_float64(tensor, None, "masked_cp")
    mask = _check_mask(mask, x.shape, "masked_cp")
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
    grams = [f.T @ f for f in factors]
    for _ in range(sweeps):
        for n in range(x.ndim):
            factors[n], weights = _normalize_columns(_ridge_solve(_hadamard_grams(grams, n),
                                                                  _mttkrp(x, factors, n), ridge))
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
    sens = cp_sensitivity(fs)
    for _ in range(n_iter_max):
        for n in range(x.ndim):
            sq = [np.sum(f * f, axis=0) for f in fs]
            w = np.zeros(fs[0].shape[1])
            for m in range(x.ndim):
                if m != n:
                    w += x.shape[m] * np.prod([s for k, s in enumerate(sq) if k not in (m, n)], axis=0)
            gram = _hadamard_grams([f.T @ f for f in fs], n)
            fs[n] = _min_sensitivity_update(_mttkrp(x, fs, n), gram, w, norm_sq, bound_sq)
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


# --------------------------------------------------------------------------- CP helpers

@functools.lru_cache(maxsize=64)
def _mttkrp_path(shape: tuple[int, ...], rank: int, n: int) -> tuple[str, list]:
    letters = "abcdefghijklmnopqrstuvwxy"
    if len(shape) > len(letters):
        raise ValueError(f"CP: at most {len(letters)} modes are supported, got {len(shape)}")
    modes = letters[:len(shape)]
    others = [k for k in range(len(shape)) if k != n]
    eq = modes + "," + ",".join(modes[k] + "z" for k in others) + "->" + modes[n] + "z"
    dummy = [np.empty(shape)] + [np.empty((shape[k], rank)) for k in others]
    return eq, np.einsum_path(eq, *dummy, optimize="greedy")[0]


def _mttkrp(x: np.ndarray, factors: Sequence[np.ndarray], n: int) -> np.ndarray:
    """X_(n) times the Khatri-Rao product of the other factors, without forming it."""
    eq, path = _mttkrp_path(x.shape, factors[0].shape[1], n)
    return np.einsum(eq, x, *[f for k, f in enumerate(factors) if k != n], optimize=path)


def _hadamard_grams(grams: Sequence[np.ndarray], skip: int | None) -> np.ndarray:
    out = np.ones_like(grams[0])
    for k, g in enumerate(grams):
        if k != skip:
            out = out * g
    return out


def _ridge_solve(gram: np.ndarray, rhs: np.ndarray, ridge: float) -> np.ndarray:
    r = gram.shape[0]
    lam = ridge * max(np.trace(gram) / r, np.finfo(np.float64).tiny)
    return np.linalg.solve(gram + lam * np.eye(r), rhs.T).T


def _normalize_columns(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(a, axis=0)
    return a / np.where(norms > 0, norms, 1.0), norms


__all__ = ["stack_kernels", "block", "masked_error", "masked_tucker", "masked_tt", "masked_cp",
           "group_tucker_ranks", "group_tt_ranks", "group_cp_rank", "tt_max_ranks",
           "cp_sensitivity", "cp_correct", "cp_stable"]
