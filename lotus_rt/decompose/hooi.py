"""Tucker decompositions: HOSVD + HOOI on any subset of modes of an N-way tensor, and Tucker-2 of a
convolution weight (its two channel modes) on top of it.

``tucker(T, ranks, modes)``: ``T ~ core x_{m_1} U_1 x_{m_2} U_2 ...`` over the chosen modes (all
by default), each factor ``U_j`` (I_{m_j}, R_j) with orthonormal columns and the core the
projection ``T x_{m_1} U_1^T ...``. Start: HOSVD, the leading left singular vectors of each
chosen mode's unfolding. Then HOOI sweeps: each factor in turn becomes the leading left singular
vectors of the unfolding of T projected on every other factor. The relative error
``||T - model|| / ||T|| = sqrt(||T||^2 - ||core||^2) / ||T||`` (orthonormal factors) is tracked
after each sweep; the sweeps stop when it changes by less than ``tol`` between two sweeps,
checked from the third sweep on (tensorly's rule and default, 1e-4), after ``n_iter_max``
sweeps, or if rounding ever makes a sweep worse (HOOI is monotone), keeping the better factors.

Speed. Each projection applies the factors that shrink the tensor most first; the sweep's last
projection gives the core without recomputing it; leading singular vectors come from the
unfolding's Gram matrix (``_base._leading_left``).

``tucker2(W, ranks)`` is ``tucker`` on modes (0, 1) of a weight (O, I, kh, kw), returned as
``(core, first, last)`` with ``W[o, i, h, w] ~ sum_{s, r} last[o, s] first[i, r] core[s, r, h, w]``;
its ranks are the pair (R_in, R_out) of ``tucker2_ranks``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ._base import (RankSpec, _as_float64, _check_fraction, _check_positive_int, _is_fraction_type, _is_int,
                    _is_sequence, _leading_left, _mode_dot, _result_dtype, _unfold, _weight_shape)
from .vbmf import vbmf_rank

MIN_SWEEPS = 3  # the change is checked from the third sweep on, as tensorly's partial_tucker does
_TUCKER2_FORMS = ("an int >= 1 (both ranks, capped by the channel counts), a float in (0, 1] "
                  "(fraction of the dense parameter count), a pair (R_in, R_out) with "
                  "1 <= R_in <= I and 1 <= R_out <= O, or 'vbmf'")
_TUCKER_FORMS = ("an int >= 1 (every chosen mode, capped by its size) or one int per chosen mode, "
                 "each between 1 and that mode's size")


def tucker_modes(ndim: int, modes: Sequence[int] | None, name: str = "tucker") -> tuple[int, ...]:
    """The chosen modes as distinct non-negative ints (None: all ``ndim`` of them)."""
    if modes is None:
        return tuple(range(ndim))
    if not _is_sequence(modes) or not modes or not all(_is_int(m) for m in modes):
        raise ValueError(f"{name}: modes must be a non-empty list of ints, got {modes!r}")
    chosen = tuple(int(m) + ndim if int(m) < 0 else int(m) for m in modes)
    if any(not 0 <= m < ndim for m in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(f"{name}: modes {list(modes)} must be distinct modes of a {ndim}-way tensor")
    return chosen


def tucker_ranks(shape: Sequence[int], rank: int | Sequence[int], modes: Sequence[int] | None = None) -> tuple[int, ...]:
    """One rank per chosen mode (see ``tucker``): an int for all (capped by each mode's size),
    or one int per chosen mode, each between 1 and the mode's size."""
    shape = tuple(int(d) for d in shape)
    modes = tucker_modes(len(shape), modes, "tucker_ranks")
    if _is_int(rank):
        r = _check_positive_int(rank, "tucker_ranks", _TUCKER_FORMS)
        return tuple(min(r, shape[m]) for m in modes)
    if _is_sequence(rank) and len(rank) == len(modes) and all(_is_int(r) for r in rank):
        bad = [(m, int(r)) for m, r in zip(modes, rank) if not 1 <= int(r) <= shape[m]]
        if bad:
            raise ValueError(f"tucker_ranks: ranks {list(rank)} out of range for modes {list(modes)} of a tensor "
                             f"of shape {shape} (mode, rank) {bad}; valid ranks: {_TUCKER_FORMS}")
        return tuple(int(r) for r in rank)
    raise ValueError(f"tucker_ranks: invalid rank {rank!r} for {len(modes)} mode(s); valid ranks: {_TUCKER_FORMS}")


def _project(x: np.ndarray, factors: dict[int, np.ndarray], skip: int | None) -> np.ndarray:
    """``x`` times every factor's transpose on its mode but ``skip``, most shrinking first."""
    order = sorted((m for m in factors if m != skip), key=lambda m: factors[m].shape[1] / factors[m].shape[0])
    for m in order:
        x = _mode_dot(x, factors[m].T, m)
    return x


def _error(norm: float, core: np.ndarray) -> float:
    return math.sqrt(max(norm * norm - float(np.vdot(core, core)), 0.0)) / norm if norm > 0 else 0.0


def tucker(tensor, ranks: int | Sequence[int], modes: Sequence[int] | None = None, n_iter_max: int = 100,
           tol: float = 1e-4) -> tuple[np.ndarray, list[np.ndarray]]:
    """Tucker decomposition (HOSVD + HOOI) of an N-way tensor over ``modes`` (all by default).

    ``ranks``: an int (every chosen mode, capped by its size) or one int per chosen mode.
    Returns ``(core, factors)``: one factor (I_m, R_m) with orthonormal columns per chosen mode,
    in the order of ``modes``, and the core, the tensor with each chosen mode m reduced to R_m,
    such that ``T ~ reconstruct_tucker(core, factors, modes)``. HOOI stops when the relative
    error changes by less than ``tol`` between sweeps (from the third sweep on, as tensorly), or
    after ``n_iter_max`` sweeps (0: HOSVD only).
    """
    x, dtype = _as_float64(tensor, None, "tucker")
    chosen = tucker_modes(x.ndim, modes)
    core, factors = _tucker64(x, chosen, tucker_ranks(x.shape, ranks, chosen), n_iter_max, tol)
    return core.astype(dtype), [f.astype(dtype) for f in factors]


def _tucker64(x: np.ndarray, chosen: tuple[int, ...], rank: tuple[int, ...], n_iter_max: int,
              tol: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """``tucker`` on a float64 tensor with checked modes and ranks."""
    if not _is_int(n_iter_max) or n_iter_max < 0 or not tol >= 0:
        raise ValueError(f"tucker: n_iter_max must be an int >= 0 and tol >= 0, got {n_iter_max!r}, {tol!r}")
    factors = {m: _leading_left(_unfold(x, m), r) for m, r in zip(chosen, rank)}
    norm = float(np.linalg.norm(x))
    core = _project(x, factors, None)
    error = _error(norm, core)
    last = chosen[-1]
    for sweep in range(n_iter_max):
        new = dict(factors)
        for m, r in zip(chosen, rank):
            y = _project(x, new, m)
            new[m] = _leading_left(_unfold(y, m), r)
        new_core = _mode_dot(y, new[last].T, last)  # y: x projected on every factor but the last
        new_error = _error(norm, new_core)
        if new_error > error * (1 + 1e-12) + 1e-15:  # rounding only: keep the better factors
            break
        factors, core, change, error = new, new_core, error - new_error, new_error
        if sweep >= MIN_SWEEPS - 1 and change < tol:
            break
    return core, [factors[m] for m in chosen]


def reconstruct_tucker(core, factors: Sequence[np.ndarray], modes: Sequence[int] | None = None) -> np.ndarray:
    """The dense tensor ``core x_{m_1} factors[0] x_{m_2} factors[1] ...`` (modes: all by default)."""
    dtype = _result_dtype([core, *factors])
    c = np.asarray(core, dtype=np.float64)
    chosen = tucker_modes(c.ndim, modes if modes is not None else list(range(len(factors))), "reconstruct_tucker")
    fs = [np.asarray(f, dtype=np.float64) for f in factors]
    if len(fs) != len(chosen) or any(f.ndim != 2 or f.shape[1] != c.shape[m] for f, m in zip(fs, chosen)):
        raise ValueError(f"reconstruct_tucker: factors {[f.shape for f in fs]} do not fit core {c.shape} on modes "
                         f"{list(chosen)} (factor j is (I, core.shape[modes[j]]))")
    for f, m in sorted(zip(fs, chosen), key=lambda fm: fm[0].shape[0] / fm[0].shape[1]):  # least growth first
        c = _mode_dot(c, f, m)
    return c.astype(dtype)


# --------------------------------------------------------------------------- Tucker-2

def tucker2_core(weight: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Core ``W x_0 last^T x_1 first^T`` (R_out, R_in, kh, kw) for orthonormal factors."""
    return _mode_dot(_mode_dot(weight, last.T, 0), first.T, 1)


def tucker2(weight, ranks: RankSpec, n_iter_max: int = 100,
            tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tucker-2 of a convolution weight (O, I, kh, kw) over its channel modes (HOSVD + HOOI).

    ``ranks`` is any form ``tucker2_ranks`` accepts; a pair is (R_in, R_out). Returns
    ``(core, first, last)``: core (R_out, R_in, kh, kw), first (I, R_in) and last (O, R_out), both
    with orthonormal columns, such that
    ``W[o, i, h, w] ~ sum_{s, r} last[o, s] first[i, r] core[s, r, h, w]`` (``reconstruct_tucker2``).
    ``tucker`` on modes (0, 1): HOOI stops when the relative error changes by less than ``tol``
    between sweeps or after ``n_iter_max`` sweeps (0: HOSVD only).
    """
    w, dtype = _as_float64(weight, 4, "tucker2")
    r_in, r_out = tucker2_ranks(w, ranks)
    core, (last, first) = _tucker64(w, (0, 1), (r_out, r_in), n_iter_max, tol)
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
