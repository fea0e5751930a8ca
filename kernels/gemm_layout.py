"""Lay a pairwise contraction over the operands' actual memory as one stacked GEMM, copying least.

``out[o] = sum a[x] * b[w]`` becomes ``matmul(P, Q)`` on (stack..., M, K) and (stack..., K, N)
views, where P is the operand holding the output's row indices (X), Q the one holding its
column indices (Y), and the stack axes are output indices (shared batch indices, and indices of
one operand, broadcast over the other). Each candidate layout is tried on the arrays' real
shapes and strides: a group of axes that must become one GEMM dimension merges without a copy
only when it is contiguous in memory, and numpy hands a matrix to BLAS only when one of its
strides is the item size (numpy's ``is_blasable2d``; otherwise its matmul falls back to a slow
loop). The candidate whose copies move the fewest bytes wins:

- stack choice: the shared indices plus any subset of the output's one-sided ones
  (a per-sample GEMM over a strided activation needs no copy; one big GEMM may need one);
- which operand gives the rows (a row-major ``out = a b`` or ``out^T = b^T a^T``);
- the order of the contracted indices (as stored in either operand);
- one contracted index taken out of the GEMM as a stack axis and summed afterwards, for
  operands where it sits between the others in memory (e.g. a weight gradient summed over
  samples from a (n, o, h, w) activation);
- and, as the fallback, the operands' own orders with the result transposed into ``out``.

Layouts are cached per (spec, shapes, strides), so the search runs once per task shape.
The same layout serves CuPy arrays (``xp.lib.stride_tricks.as_strided``), whose matmul takes
the same stacked, strided operands.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

# A stacked matmul call costs about as much as copying this many bytes (per-GEMM BLAS and loop
# overhead, ~1 µs), so a stack of many tiny GEMMs does not beat one copy of a small operand.
BYTES_PER_GEMM = 4096
_CACHE_LIMIT = 4096
MAX_SUBSET_ITEMS = 6  # 64 stack choices; beyond, only prefixes of the output's order


@dataclass(frozen=True)
class Operand:
    """How one operand enters the matmul: ``copy`` (axes order) when it is first copied to a
    contiguous array with its axes in that order, None when it is used in place; then the
    strided view (``shape``, ``strides`` in bytes) of (stack..., summed..., rows, columns)."""

    copy: tuple[int, ...] | None
    shape: tuple[int, ...]
    strides: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    p_is_a: bool  # the rows of the GEMM come from a
    p: Operand
    q: Operand
    nstack: int  # leading matmul axes that are output indices
    nkouter: int  # then this many contracted axes, summed after the matmul
    out_view: tuple[tuple[int, ...], tuple[int, ...]] | None  # (shape, strides) of out; None: transpose
    result_order: tuple[str, ...]  # indices of the result (stack, kouter, X, Y) for the fallback
    cost: float


def _merge(shape: Sequence[int], strides: Sequence[int], group: Sequence[int]) -> tuple[int, int] | None:
    """(size, stride) of ``group``'s axes (-1: broadcast, size 1) as one axis, or None when
    that axis cannot be a view (the axes are not contiguous with each other in that order)."""
    dims = [(shape[k], strides[k]) for k in group if k >= 0 and shape[k] != 1]
    size = math.prod(d for d, _ in dims)
    if not dims:
        return 1, 0
    for (_, outer), (inner_size, inner) in zip(dims, dims[1:]):
        if outer != inner * inner_size:
            return None
    return size, dims[-1][1]


def _blasable(rows: int, cols: int, rs: int, cs: int, item: int, output: bool) -> bool:
    """Whether numpy's matmul passes this (rows x cols) matrix to BLAS as it is."""
    def c_order(r, c, sr, sc):
        return (c == 1 or sc == item) and (r == 1 or (sr % item == 0 and sr // item >= c))
    if output:
        return c_order(rows, cols, rs, cs)
    return c_order(rows, cols, rs, cs) or c_order(cols, rows, cs, rs)


def _view(shape, strides, item, groups, output: bool) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(shape, strides) of the view merging ``groups``, or None when it would need a copy (a
    group is not contiguous, or its last two axes are not a matrix numpy passes to BLAS)."""
    merged = [_merge(shape, strides, g) for g in groups]
    if any(m is None for m in merged):
        return None
    view_shape = [m[0] for m in merged]
    view_strides = [m[1] for m in merged]
    rows, cols = view_shape[-2], view_shape[-1]
    # Size-1 matrix axes get the strides BLAS expects (they are never stepped along).
    if cols == 1:
        view_strides[-1] = item
    if rows == 1:
        view_strides[-2] = cols * view_strides[-1] if output else item
    if not _blasable(rows, cols, view_strides[-2], view_strides[-1], item, output):
        return None
    return tuple(view_shape), tuple(view_strides)


def _operand(shape, strides, item, groups) -> tuple[Operand, float]:
    """The operand's view, in place if possible, else of a contiguous copy; and its cost."""
    view = _view(shape, strides, item, groups, output=False)
    if view is not None:
        return Operand(None, *view), 0.0
    axes = tuple(k for g in groups for k in g if k >= 0)
    copy_shape = [shape[k] for k in axes]
    copy_strides = [item * math.prod(copy_shape[n + 1:]) for n in range(len(axes))]
    renumbered, position = [], 0
    for g in groups:  # the copy's axes are the operand's in group order
        renumbered.append(tuple(-1 if k < 0 else position + sum(1 for j in g[:n] if j >= 0)
                                for n, k in enumerate(g)))
        position += sum(1 for k in g if k >= 0)
    view = _view(copy_shape, copy_strides, item, renumbered, output=False)
    assert view is not None  # groups of a contiguous array in order always merge
    return Operand(axes, *view), 2.0 * math.prod(shape) * item


def _storage_order(idx: str, strides: Sequence[int], keep: Sequence[str]) -> list[str]:
    """``keep``'s indices ordered as they lie in memory (largest stride first)."""
    return sorted(keep, key=lambda i: -abs(strides[idx.index(i)]))


def _operand_groups(idx: str, stack: Sequence[str], kouter: Sequence[str], first: Sequence[str],
                    second: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    def pos(i):
        return idx.index(i) if i in idx else -1
    return (tuple((pos(i),) for i in stack) + tuple((pos(i),) for i in kouter)
            + (tuple(pos(i) for i in first), tuple(pos(i) for i in second)))


def _subsets(items: list[str]):
    """Every subset of ``items`` (at most 2**MAX_SUBSET_ITEMS), else its prefixes."""
    if len(items) > MAX_SUBSET_ITEMS:
        return [items[:r] for r in range(len(items) + 1)]
    return [c for r in range(len(items) + 1) for c in itertools.combinations(items, r)]


def _candidates(a_idx: str, b_idx: str, out_idx: str, a_strides, b_strides):
    shared = [i for i in out_idx if i in a_idx and i in b_idx]
    one_sided = [i for i in out_idx if (i in a_idx) != (i in b_idx)]
    contracted = [i for i in a_idx if i in b_idx and i not in out_idx]
    k_orders = {tuple(_storage_order(a_idx, a_strides, contracted)),
                tuple(_storage_order(b_idx, b_strides, contracted))}
    for extra in _subsets(one_sided):
        stack = [i for i in out_idx if i in shared or i in extra]
        rest = [i for i in out_idx if i not in stack]
        for p_is_a in (True, False):
            p_idx, q_idx = (a_idx, b_idx) if p_is_a else (b_idx, a_idx)
            x = [i for i in rest if i in p_idx]
            y = [i for i in rest if i in q_idx]
            for k_order in k_orders:
                for kouter in [()] + [(k,) for k in k_order]:
                    kin = [k for k in k_order if k not in kouter]
                    yield p_is_a, stack, list(kouter), x, y, kin


def find_layout(a_idx: str, b_idx: str, out_idx: str, a_shape, a_strides, b_shape, b_strides,
                out_shape, out_strides, item: int) -> Layout:
    """The cheapest stacked-GEMM layout of ``a_idx,b_idx->out_idx`` over these arrays."""
    key = (a_idx, b_idx, out_idx, tuple(a_shape), tuple(a_strides), tuple(b_shape), tuple(b_strides),
           tuple(out_shape), tuple(out_strides), item)
    layout = _cache.get(key)
    if layout is None:
        if len(_cache) >= _CACHE_LIMIT:
            _cache.clear()
        layout = _cache[key] = _search(*key)
    return layout


_cache: dict[tuple, Layout] = {}


def _search(a_idx, b_idx, out_idx, a_shape, a_strides, b_shape, b_strides, out_shape, out_strides, item) -> Layout:
    sizes = dict(zip(a_idx, a_shape)) | dict(zip(b_idx, b_shape))
    best: Layout | None = None
    out_nbytes = math.prod(out_shape) * item
    for p_is_a, stack, kouter, x, y, kin in _candidates(a_idx, b_idx, out_idx, a_strides, b_strides):
        p_idx, q_idx = (a_idx, b_idx) if p_is_a else (b_idx, a_idx)
        p_shape, p_strides = (a_shape, a_strides) if p_is_a else (b_shape, b_strides)
        q_shape, q_strides = (b_shape, b_strides) if p_is_a else (a_shape, a_strides)
        ngemm = math.prod(sizes[i] for i in stack + kouter)
        cost = ngemm * BYTES_PER_GEMM
        if kouter:  # the stacked partial results are written, then summed into out
            cost += math.prod(sizes[i] for i in stack + kouter + x + y) * item * 2
        for ordered in (True, False):
            if ordered:  # X and Y in out's order: the result is written straight into out
                xs, ys = x, y
                out_groups = tuple((out_idx.index(i),) for i in stack) + (
                    tuple(out_idx.index(i) for i in x), tuple(out_idx.index(i) for i in y))
                out_view = _view(out_shape, out_strides, item, out_groups, output=True)
                if out_view is None:
                    continue
                out_cost = 0.0
            else:  # the operands' own orders; the result is transposed into out
                xs = _storage_order(p_idx, p_strides, x)
                ys = _storage_order(q_idx, q_strides, y)
                out_view, out_cost = None, out_nbytes * 2
            p_op, p_cost = _operand(p_shape, p_strides, item, _operand_groups(p_idx, stack, kouter, xs, kin))
            q_op, q_cost = _operand(q_shape, q_strides, item, _operand_groups(q_idx, stack, kouter, kin, ys))
            total = cost + out_cost + p_cost + q_cost
            if best is None or total < best.cost:
                best = Layout(p_is_a, p_op, q_op, len(stack), len(kouter), out_view,
                              tuple(stack + kouter + xs + ys), total)
    assert best is not None  # the fallback candidate always exists
    return best


def operand_view(xp: Any, t: Any, op: Operand) -> Any:
    """``t`` as the matmul operand ``op`` describes: a strided view of it, or of a copy."""
    if op.copy is not None:
        t = xp.ascontiguousarray(t.transpose(op.copy))
    return xp.lib.stride_tricks.as_strided(t, shape=op.shape, strides=op.strides)


def out_view(xp: Any, out: Any, layout: Layout) -> Any:
    """``out`` as the matmul's result (``layout.out_view`` must not be None)."""
    shape, strides = layout.out_view
    return xp.lib.stride_tricks.as_strided(out, shape=shape, strides=strides)
