"""Contraction codelet bodies: a pairwise contraction as one (batched) GEMM, and unary steps.

``pair``: ``out[o] = sum a[x] * b[w]`` where every index of ``a`` and ``b`` is either in the
output or shared by both (the planner sums private indices away first). The operands are
permuted to (batch, free, contracted) and (batch, contracted, free), made contiguous, and
multiplied with one batched matmul; the result is written into ``out`` in the requested order.
An operand stored as (batch, contracted, free) instead is passed as a transposed view, not
copied: BLAS reads transposed matrices directly; an output wanted as (batch, free_b, free_a)
is written directly as the product of the transposes.

``unary``: ``out = einsum(eq, a)`` (diagonals, sums over private indices, permutations), or
``broadcast``: ``out = a`` expanded along the indices ``out`` has and ``a`` lacks (the
backward of a sum).

Each body takes optional ``*_slice = (axis, start, stop)``: the task reads only that slab of a
whole registered operand, which is how batch tiles share one input without copying it.
The same code serves NumPy (CPU) and CuPy (GPU) through the array module ``xp``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PairSpec:
    """How to lay a pairwise contraction out as a batched GEMM (see ``pair_spec``)."""

    a_perm: tuple[int, ...]
    b_perm: tuple[int, ...]
    nbatch: int
    nfree_a: int
    ncontracted: int
    out_perm: tuple[int, ...] | None  # natural (batch, free_a, free_b) -> requested; None: same
    out_swapped: bool = False  # requested order is (batch, free_b, free_a): write (a b)^T = b^T a^T


@dataclass(frozen=True)
class UnarySpec:
    kind: str  # "einsum" or "broadcast"
    equation: str = ""  # einsum: "ij->j"
    perm: tuple[int, ...] = ()  # broadcast: a's axes in out's order of the shared indices
    expand: tuple[int, ...] = ()  # broadcast: out axes a lacks (inserted as size-1 axes)


def pair_spec(a_idx: str, b_idx: str, out_idx: str) -> PairSpec:
    """GEMM layout of ``a_idx,b_idx->out_idx`` (no repeated and no private indices)."""
    batch = [i for i in a_idx if i in b_idx and i in out_idx]
    contracted = [i for i in a_idx if i in b_idx and i not in out_idx]
    free_a = [i for i in a_idx if i not in b_idx]
    free_b = [i for i in b_idx if i not in a_idx]
    missing = set(out_idx) - set(a_idx) - set(b_idx)
    private = [i for i in free_a + free_b if i not in out_idx]
    if missing or private or len(set(a_idx)) != len(a_idx) or len(set(b_idx)) != len(b_idx):
        raise ValueError(f"pair_spec: {a_idx},{b_idx}->{out_idx} is not a plain pairwise contraction")
    natural = batch + free_a + free_b
    out_perm = tuple(natural.index(i) for i in out_idx)
    swapped = list(out_idx) == batch + free_b + free_a and bool(free_a) and bool(free_b)
    return PairSpec(
        a_perm=tuple(a_idx.index(i) for i in batch + free_a + contracted),
        b_perm=tuple(b_idx.index(i) for i in batch + contracted + free_b),
        nbatch=len(batch), nfree_a=len(free_a), ncontracted=len(contracted),
        out_perm=None if out_perm == tuple(range(len(natural))) or swapped else out_perm,
        out_swapped=swapped)


def broadcast_spec(a_idx: str, out_idx: str) -> UnarySpec:
    """``out`` = ``a`` expanded to ``out_idx`` (a's indices must all be in out, no repeats)."""
    shared = [i for i in out_idx if i in a_idx]
    if len(shared) != len(a_idx):
        raise ValueError(f"broadcast_spec: {a_idx}->{out_idx} drops indices")
    return UnarySpec("broadcast", perm=tuple(a_idx.index(i) for i in shared),
                     expand=tuple(k for k, i in enumerate(out_idx) if i not in a_idx))


def _take(a: Any, cut: tuple[int, int, int] | None) -> Any:
    if cut is None:
        return a
    axis, start, stop = cut
    return a[(slice(None),) * axis + (slice(start, stop),)]


def _matrix_view(t: Any, nbatch: int, nrows: int) -> Any:
    """``t`` (already permuted to (batch, rows, columns)) as a 3-D (batch, R, C) operand of
    matmul: a view when the rows and columns are each contiguous in memory in either order
    (BLAS takes a transposed operand as is), else a contiguous copy."""
    shape = (math.prod(t.shape[:nbatch]), math.prod(t.shape[nbatch:nbatch + nrows]),
             math.prod(t.shape[nbatch + nrows:]))
    if t.flags.c_contiguous:
        return t.reshape(shape)
    order = tuple(range(nbatch)) + tuple(range(nbatch + nrows, t.ndim)) + tuple(range(nbatch, nbatch + nrows))
    swapped = t.transpose(order)
    if swapped.flags.c_contiguous:  # stored as (batch, columns, rows): a transposed view
        return swapped.reshape(shape[0], shape[2], shape[1]).swapaxes(1, 2)
    return t.reshape(shape)  # copies


def _pair(xp: Any, a: Any, b: Any, out: Any, spec: PairSpec, a_slice, b_slice, out_slice) -> None:
    a, b, out = _take(a, a_slice), _take(b, b_slice), _take(out, out_slice)
    at, bt = a.transpose(spec.a_perm), b.transpose(spec.b_perm)
    nb, nm, nk = spec.nbatch, spec.nfree_a, spec.ncontracted
    batch, free_a = at.shape[:nb], at.shape[nb:nb + nm]
    free_b = bt.shape[nb + nk:]
    shape3 = (math.prod(batch), math.prod(free_a), math.prod(free_b))
    a3 = _matrix_view(at, nb, nm)
    b3 = _matrix_view(bt, nb, nk)
    if spec.out_swapped and out.flags.c_contiguous:
        xp.matmul(b3.swapaxes(1, 2), a3.swapaxes(1, 2), out=out.reshape(shape3[0], shape3[2], shape3[1]))
    elif spec.out_perm is None and out.flags.c_contiguous:
        xp.matmul(a3, b3, out=out.reshape(shape3))
    else:
        natural = xp.matmul(a3, b3).reshape(batch + free_a + free_b)
        if spec.out_swapped:
            nf = len(free_a)
            order = tuple(range(nb)) + tuple(range(nb + nf, natural.ndim)) + tuple(range(nb, nb + nf))
            out[...] = natural.transpose(order)
        else:
            out[...] = natural if spec.out_perm is None else natural.transpose(spec.out_perm)


def _unary(xp: Any, a: Any, out: Any, spec: UnarySpec, a_slice, out_slice) -> None:
    a, out = _take(a, a_slice), _take(out, out_slice)
    if spec.kind == "einsum":
        out[...] = xp.einsum(spec.equation, a)
    else:
        shared = a.transpose(spec.perm)
        shape = list(shared.shape)
        for axis in spec.expand:
            shape.insert(axis, 1)
        out[...] = shared.reshape(shape)


def pair(xp: Any, a: Any, b: Any, out: Any, spec: PairSpec) -> None:
    """``out`` = the pairwise contraction of whole arrays (for bodies that chain several)."""
    _pair(xp, a, b, out, spec, None, None, None)


def unary(xp: Any, a: Any, out: Any, spec: UnarySpec) -> None:
    _unary(xp, a, out, spec, None, None)


def pair_cpu(a, b, out, *, spec: PairSpec, a_slice=None, b_slice=None, out_slice=None) -> None:
    _pair(np, a, b, out, spec, a_slice, b_slice, out_slice)


def pair_gpu(a, b, out, *, spec: PairSpec, a_slice=None, b_slice=None, out_slice=None) -> None:
    import cupy
    _pair(cupy, a, b, out, spec, a_slice, b_slice, out_slice)


def unary_cpu(a, out, *, spec: UnarySpec, a_slice=None, out_slice=None) -> None:
    _unary(np, a, out, spec, a_slice, out_slice)


def unary_gpu(a, out, *, spec: UnarySpec, a_slice=None, out_slice=None) -> None:
    import cupy
    _unary(cupy, a, out, spec, a_slice, out_slice)


def add_cpu(a, out) -> None:
    out += a


def add_gpu(a, out) -> None:
    out += a
