"""GEMM codelet bodies: ``out = a @ b`` (mode W) and ``out += a @ b`` (mode RW).

CPU bodies take NumPy arrays (one BLAS thread each: StarPU's workers are the parallelism) and
compute in the operands' dtype; GPU bodies take CuPy arrays on StarPU's stream and apply
``precision`` (the runtime's LOTUS_PRECISION, "auto" by default) to float32 data
(``kernels/precision.py``); the CPU bodies take and ignore it.
"""
from __future__ import annotations

import numpy as np

from . import precision as gpu_precision


def matmul_cpu(a: np.ndarray, b: np.ndarray, out: np.ndarray, precision: str = "auto") -> None:
    np.matmul(a, b, out=out)


def matmul_acc_cpu(a: np.ndarray, b: np.ndarray, out: np.ndarray, precision: str = "auto") -> None:
    out += np.matmul(a, b)


def matmul_gpu(a, b, out, precision: str = "auto") -> None:
    import cupy
    gpu_precision.matmul(cupy, a, b, out=out, precision=precision)


def matmul_acc_gpu(a, b, out, precision: str = "auto") -> None:
    import cupy
    gpu_precision.matmul(cupy, a, b, out=out, accumulate=True, precision=precision)
