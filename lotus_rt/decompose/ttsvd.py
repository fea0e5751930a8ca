"""Tensor-train decompositions by TT-SVD: of an N-way tensor (``tt``), and of a Linear weight as a
TT-matrix (``tt_matrix``, the cores of ``TTLinear``).

``tt(T, ranks)``: cores ``G_k`` of shape (r_{k-1}, I_k, r_k), r_0 = r_N = 1, with
``T[i_1, ..., i_N] = G_1[:, i_1, :] @ G_2[:, i_2, :] @ ... @ G_N[:, i_N, :]``.

``tt_matrix(W, in_shape, out_shape, ranks)``: TT-SVD of a Linear weight W (out, in) into a
TT-matrix (MPO). Core layout: ``G_k`` has shape ``(r_{k-1}, in_k, out_k, r_k)``, r_0 = r_d = 1,
and, with ``o = ravel_multi_index((o_1..o_d), out_shape)`` and
``i = ravel_multi_index((i_1..i_d), in_shape)`` (C order, as ``reshape`` does)::

    W[o, i] = sum_{r_1..r_{d-1}} prod_k G_k[r_{k-1}, i_k, o_k, r_k]
    y[b, o_1..o_d] = sum_{i, r} x[b, i_1..i_d] prod_k G_k[r_{k-1}, i_k, o_k, r_k]   (y = x @ W.T)

W is permuted to (i_1, o_1, i_2, o_2, ...) order and goes through the same sweep as ``tt``.

The sweep: left to right, the remainder is reshaped to (r_{k-1} I_k, rest); its ``r_k`` leading
left singular vectors become core k (from the Gram matrix, ``_base._leading_left``) and the
remainder becomes their projection ``U^T M``. With "vbmf" ranks each cut's rank is EVBMF's on the
matrix that step factorizes.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ._base import (RankSpec, _as_float64, _check_fraction, _check_positive_int, _is_fraction_type, _is_int,
                    _is_sequence, _leading_left, _result_dtype)
from .vbmf import vbmf_rank

_TT_FORMS = ("an int >= 1 (every internal rank, capped by the unfoldings), a float in (0, 1] "
             "(fraction of the dense parameter count), or a list of the d-1 internal ranks, "
             "each between 1 and the unfolding's maximal rank")
_TT_TENSOR_FORMS = ("an int >= 1 (every internal rank, capped by the unfoldings) or a list of the N-1 "
                    "internal ranks, each >= 1")


def _tt_sweep(t: np.ndarray, sizes: Sequence[int], internal: Sequence[int] | None) -> list[np.ndarray]:
    """TT-SVD of ``t`` (any shape with prod == prod(sizes)) into cores (r_{k-1}, sizes[k], r_k);
    ``internal`` the wanted ranks (lowered to what each cut can give), None for EVBMF's."""
    rest, r_prev, cores = t.reshape(1, -1), 1, []
    for k in range(len(sizes) - 1):
        unfolding = rest.reshape(r_prev * sizes[k], -1)
        cap = min(unfolding.shape)
        r = max(1, min(vbmf_rank(unfolding), cap)) if internal is None else min(internal[k], cap)
        u = _leading_left(unfolding, r)
        cores.append(u.reshape(r_prev, sizes[k], r))
        rest, r_prev = u.T @ unfolding, r
    cores.append(rest.reshape(r_prev, sizes[-1], 1))
    return cores


def tt(tensor, ranks: int | Sequence[int]) -> list[np.ndarray]:
    """TT-SVD of an N-way tensor (N >= 1): cores (r_{k-1}, I_k, r_k), r_0 = r_N = 1.

    ``ranks``: an int (every internal rank, capped by the unfoldings' sizes) or a list of the N-1
    internal ranks (each lowered to what its cut can give, so the core shapes tell the ranks
    used). Exact at the maximal ranks. ``reconstruct_tt`` is the inverse.
    """
    x, dtype = _as_float64(tensor, None, "tt")
    if x.ndim < 1:
        raise ValueError("tt: expected a tensor of at least one mode, got a scalar")
    if _is_int(ranks):
        internal = [_check_positive_int(ranks, "tt", _TT_TENSOR_FORMS)] * (x.ndim - 1)
    elif _is_sequence(ranks) and len(ranks) == x.ndim - 1 and all(_is_int(r) and r >= 1 for r in ranks):
        internal = [int(r) for r in ranks]
    else:
        raise ValueError(f"tt: invalid ranks {ranks!r} for a {x.ndim}-way tensor; valid ranks: {_TT_TENSOR_FORMS}")
    return [c.astype(dtype) for c in _tt_sweep(x, x.shape, internal)]


def reconstruct_tt(cores: Sequence[np.ndarray]) -> np.ndarray:
    """The dense tensor of TT cores (r_{k-1}, I_k, r_k), r_0 = r_N = 1."""
    dtype = _result_dtype(list(cores))
    cs = [np.asarray(c, dtype=np.float64) for c in cores]
    if (not cs or any(c.ndim != 3 for c in cs) or cs[0].shape[0] != 1 or cs[-1].shape[2] != 1
            or any(cs[k].shape[2] != cs[k + 1].shape[0] for k in range(len(cs) - 1))):
        raise ValueError(f"reconstruct_tt: core shapes {[c.shape for c in cs]} do not fit (r_(k-1), I_k, r_k) "
                         "with r_0 = r_N = 1")
    full = cs[0].reshape(-1, cs[0].shape[2])
    for c in cs[1:]:
        full = (full @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[2])
    return full.reshape([c.shape[1] for c in cs]).astype(dtype)


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
    cores = _tt_sweep(_interleave_in_out(w, ins, outs), [i * o for i, o in zip(ins, outs)], internal)
    return [c.reshape(c.shape[0], i, o, c.shape[2]).astype(dtype) for c, i, o in zip(cores, ins, outs)]


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
