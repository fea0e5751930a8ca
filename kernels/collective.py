"""Codelet bodies of the cross-rank reductions (``lotus_rt.distributed``): sum, scale, copy.

Each body gets the arrays of its task in handle order and works in place; written once over
the array module of its arrays (NumPy on a CPU worker, CuPy on a CUDA worker).
"""
from __future__ import annotations

from typing import Any


def _xp(array: Any) -> Any:
    if type(array).__module__.startswith("cupy"):
        import cupy
        return cupy
    import numpy
    return numpy


def add_into(src: Any, acc: Any) -> None:
    """acc += src."""
    _xp(acc).add(acc, src, out=acc)


def scale(x: Any, factor: float) -> None:
    """x *= factor."""
    _xp(x).multiply(x, x.dtype.type(factor), out=x)


def copy(src: Any, dst: Any) -> None:
    """dst[...] = src."""
    _xp(dst).copyto(dst, src)


add_into_cpu = add_into_gpu = add_into
scale_cpu = scale_gpu = scale
copy_cpu = copy_gpu = copy
