"""GEMM codelet bodies: ``out = a @ b`` (mode W) and ``out += a @ b`` (mode RW).

CPU bodies take NumPy arrays (one BLAS thread each: StarPU's workers are the parallelism) and
compute in the operands' dtype; GPU bodies take CuPy arrays on StarPU's stream and apply
LOTUS_PRECISION to float32 data (``kernels/precision.py``).
"""
from __future__ import annotations

import numpy as np

from lotus_rt.kernels import precision


def matmul_cpu(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    np.matmul(a, b, out=out)


def matmul_acc_cpu(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    out += np.matmul(a, b)


def matmul_gpu(a, b, out) -> None:
    import cupy
    precision.matmul(cupy, a, b, out=out)


def matmul_acc_gpu(a, b, out) -> None:
    import cupy
    precision.matmul(cupy, a, b, out=out, accumulate=True)
