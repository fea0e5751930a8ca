"""Contraction codelet bodies: a pairwise contraction as one (batched) GEMM, and unary steps.

``pair``: ``out[o] = sum a[x] * b[w]`` where every index of ``a`` and ``b`` is either in the
output or shared by both (the planner sums private indices away first), as one stacked matmul
over strided views of the operands and of ``out`` (``gemm_layout`` picks the layout that copies
least for the arrays' actual strides: per-sample GEMMs over a strided activation, transposed
operands read as they are, the result written straight into ``out``).

``unary``: ``out = einsum(eq, a)`` (diagonals, sums over private indices, permutations), or
``broadcast``: ``out = a`` expanded along the indices ``out`` has and ``a`` lacks (the
backward of a sum).

Each body takes optional ``*_slice = (axis, start, stop)``: the task reads only that slab of a
whole registered operand, which is how batch tiles share one input without copying it. The pair
bodies take ``precision`` (the runtime's LOTUS_PRECISION) for the GPU's GEMMs; the CPU ignores it.
The same code serves NumPy (CPU) and CuPy (GPU) through the array module ``xp``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import gemm_layout
from . import precision as gpu_precision


@dataclass(frozen=True)
class PairSpec:
    """A pairwise contraction ``a_idx,b_idx->out_idx`` (see ``pair_spec``)."""

    a_idx: str
    b_idx: str
    out_idx: str


@dataclass(frozen=True)
class UnarySpec:
    kind: str  # "einsum" or "broadcast"
    equation: str = ""  # einsum: "ij->j"
    perm: tuple[int, ...] = ()  # broadcast: a's axes in out's order of the shared indices
    expand: tuple[int, ...] = ()  # broadcast: out axes a lacks (inserted as size-1 axes)


def pair_spec(a_idx: str, b_idx: str, out_idx: str) -> PairSpec:
    """Check that ``a_idx,b_idx->out_idx`` is a plain pairwise contraction (no repeated and no
    private indices: every index is in the output or in both operands)."""
    missing = set(out_idx) - set(a_idx) - set(b_idx)
    private = [i for i in a_idx + b_idx if (i in a_idx) != (i in b_idx) and i not in out_idx]
    repeated = any(len(set(t)) != len(t) for t in (a_idx, b_idx, out_idx))
    if missing or private or repeated:
        raise ValueError(f"pair_spec: {a_idx},{b_idx}->{out_idx} is not a plain pairwise contraction")
    return PairSpec(a_idx, b_idx, out_idx)


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


def _pair(xp: Any, a: Any, b: Any, out: Any, spec: PairSpec, a_slice, b_slice, out_slice,
          precision: str = "auto") -> None:
    a, b, out = _take(a, a_slice), _take(b, b_slice), _take(out, out_slice)
    layout = gemm_layout.find_layout(spec.a_idx, spec.b_idx, spec.out_idx, a.shape, a.strides,
                                     b.shape, b.strides, out.shape, out.strides, out.itemsize)
    p, q = (a, b) if layout.p_is_a else (b, a)
    product = (gemm_layout.operand_view(xp, p, layout.p), gemm_layout.operand_view(xp, q, layout.q))
    summed = tuple(range(layout.nstack, layout.nstack + layout.nkouter))
    if layout.out_view is not None:
        view = gemm_layout.out_view(xp, out, layout)
        if summed:
            xp.sum(gpu_precision.matmul(xp, *product, precision=precision), axis=summed, out=view)
        elif product[0].shape[-1] == 1:  # nothing contracted: an outer product, at memory speed
            xp.multiply(*product, out=view)
        else:
            gpu_precision.matmul(xp, *product, out=view, precision=precision)
        return
    result = gpu_precision.matmul(xp, *product, precision=precision)
    if summed:
        result = result.sum(axis=summed)
    order = [i for k, i in enumerate(layout.result_order) if not layout.nstack <= k < layout.nstack + layout.nkouter]
    sizes = dict(zip(spec.a_idx, a.shape)) | dict(zip(spec.b_idx, b.shape))
    result = result.reshape([sizes[i] for i in order])
    out[...] = result.transpose([order.index(i) for i in spec.out_idx])


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


def pair(xp: Any, a: Any, b: Any, out: Any, spec: PairSpec, precision: str = "auto") -> None:
    """``out`` = the pairwise contraction of whole arrays (for bodies that chain several)."""
    _pair(xp, a, b, out, spec, None, None, None, precision)


def unary(xp: Any, a: Any, out: Any, spec: UnarySpec) -> None:
    _unary(xp, a, out, spec, None, None)


def pair_cpu(a, b, out, *, spec: PairSpec, a_slice=None, b_slice=None, out_slice=None,
             precision: str = "auto") -> None:
    _pair(np, a, b, out, spec, a_slice, b_slice, out_slice)


def pair_gpu(a, b, out, *, spec: PairSpec, a_slice=None, b_slice=None, out_slice=None,
             precision: str = "auto") -> None:
    import cupy
    _pair(cupy, a, b, out, spec, a_slice, b_slice, out_slice, precision)


def unary_cpu(a, out, *, spec: UnarySpec, a_slice=None, out_slice=None) -> None:
    _unary(np, a, out, spec, a_slice, out_slice)


def unary_gpu(a, out, *, spec: UnarySpec, a_slice=None, out_slice=None) -> None:
    import cupy
    _unary(cupy, a, out, spec, a_slice, out_slice)


def add_cpu(a, out) -> None:
    out += a


def add_gpu(a, out) -> None:
    out += a
