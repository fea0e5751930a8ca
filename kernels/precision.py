"""GEMM precision policy of the GPU codelet bodies (``LOTUS_PRECISION``), with a NumPy reference.

Every GEMM of a codelet body goes through :func:`matmul`. NumPy operands get ``np.matmul`` in
their own dtype, unchanged whatever the policy (CPU bodies stay float32/float64). CuPy float32
operands get the policy the caller passes (the runtime's ``LOTUS_PRECISION`` setting, handed to
every codelet body that multiplies as its ``precision`` argument):

=====  ==================================================================================
fp32   FP32 throughout: cuBLAS compute type ``CUBLAS_COMPUTE_32F_PEDANTIC`` (no Tensor
       Core or reduced-precision shortcuts).
tf32   ``CUBLAS_COMPUTE_32F_FAST_TF32``: Tensor Cores round the float32 operands to TF32
       (10 mantissa bits) inside cuBLAS and accumulate in FP32.
bf16   the operands are rounded to bfloat16 (round to nearest, ties to even) by an
       ElementwiseKernel into uint16 storage (CuPy 14 has no bfloat16 dtype) and passed as
       ``CUDA_R_16BF``; ``CUBLAS_COMPUTE_32F`` accumulates in FP32 into a float32 result.
fp16   the same with ``astype(float16)`` (IEEE round to nearest) and ``CUDA_R_16F``.
auto   (or unset) tf32 on GPUs with Tensor Cores for it (compute capability >= 8.0), else fp32.
=====  ==================================================================================

float64 (and any dtype other than float32) keeps CuPy's own GEMM in its dtype in every mode.

Mechanism: ``cublasGemmStridedBatchedEx`` (``cupy.cuda.cublas.gemmStridedBatchedEx``), whose
``computeType`` argument carries the policy, for 2-D and stacked ``(..., M, K) x (..., K, N)``
operands alike (stack axes broadcast as in ``numpy.matmul``). A row-major product is computed as
the column-major ``C^T = B^T A^T``. Matrices whose rows or columns are contiguous (a
``swapaxes`` view or a strided view, as ``kernels/contract.py`` passes them) are handed to
cuBLAS as they are (``CUBLAS_OP_T`` and a leading dimension), other operands are copied first;
the stack axes that merge into one stride per array (broadcast axes: stride 0) are one batched
call, any others a Python loop of such calls. ``out`` is written directly when its matrices are
row-major, else through a temporary. CuPy's wrapper sets the cuBLAS handle's stream to CuPy's
current stream at each call, which inside a codelet body is StarPU's stream. CuPy's own
``set_compute_type`` / ``CUPY_TF32`` was not used: in CuPy's ``_routines_linalg.pyx`` (read
on GitHub's main branch; the 14.2.0 wheel ships it compiled) it reaches 2-D products only
(``cupy.matmul`` of stacked operands calls the same cuBLAS function with the legacy compute
type ``CUDA_R_32F`` and copies transposed operands), and it is process-wide state shared with
every other CuPy user.

Checked on a CPU machine against CuPy 14.2.0 (cupy-cuda13x): every CuPy attribute and
constant used here exists. NOT YET RUN ON A GPU: the cuBLAS calls, the bf16 kernel and the
tolerances below are unverified until ``tests/test_gpu.py`` runs on one.

    >>> import numpy as np
    >>> a = np.float32([[1.0 + 2.0**-9]])
    >>> float(round_to("bf16", a)[0, 0]), float(round_to("fp32", a)[0, 0]) == 1.0 + 2.0**-9
    (1.0, True)
    >>> tolerance("bf16", np.float32)
    (0.03125, 0.03125)
"""
from __future__ import annotations

import functools
import itertools
from typing import Any

import numpy as np

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")  # the values of LOTUS_PRECISION besides "auto"
TENSOR_CORE_CC = 80  # compute capability (major * 10 + minor) from which tf32 and bf16 exist
# Relative rounding error of an operand as the GEMM sees it. tf32: 2**-10 bounds truncation
# as well as rounding to 10 mantissa bits, since cuBLAS does not document which it does.
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "tf32": 2.0**-10, "bf16": 2.0**-8, "fp16": 2.0**-11}
_DROPPED_BITS = {"tf32": 13, "bf16": 16}  # float32 mantissa bits the format lacks


def resolve(requested: str, compute_capability: int) -> str:
    """The precision ``requested`` ("auto" or one of PRECISIONS) means on a GPU of
    ``compute_capability`` (major * 10 + minor, e.g. 90 for an H100).

        >>> resolve("auto", 90), resolve("auto", 75), resolve("fp16", 75)
        ('tf32', 'fp32', 'fp16')
    """
    if requested == "auto":
        return "tf32" if compute_capability >= TENSOR_CORE_CC else "fp32"
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not valid; valid values: auto, {', '.join(PRECISIONS)}")
    if requested == "bf16" and compute_capability < TENSOR_CORE_CC:
        raise RuntimeError(f"LOTUS_PRECISION=bf16 needs a GPU of compute capability >= 8.0 (bfloat16 "
                           f"GEMMs), this one has {compute_capability / 10:.1f}; use fp16, tf32 or fp32")
    return requested


@functools.lru_cache(maxsize=None)
def _device_precision(cupy: Any, device_id: int, requested: str) -> str:
    return resolve(requested, int(cupy.cuda.Device(device_id).compute_capability))


def device_precision(cupy: Any, requested: str = "auto") -> str:
    """What ``requested`` means on the ``cupy`` module's current device (resolved once per
    device and request)."""
    return _device_precision(cupy, cupy.cuda.runtime.getDevice(), requested)


def matmul(xp: Any, a: Any, b: Any, out: Any = None, *, accumulate: bool = False,
           precision: str = "auto") -> Any:
    """``a @ b`` for 2-D ``(M, K) x (K, N)`` or stacked ``(..., M, K) x (..., K, N)`` operands
    (stack axes broadcast as in ``numpy.matmul``).

    Writes ``out = a @ b`` (or ``out += a @ b`` with ``accumulate``) and returns ``out``, or a
    new array when ``out`` is None. ``xp`` is numpy or cupy. ``precision`` ("auto" or one of
    PRECISIONS) applies to CuPy float32 operands only.

        >>> float(matmul(np, np.ones((2, 3)), np.ones((3, 4)))[0, 0])
        3.0
    """
    if accumulate and out is None:
        raise ValueError("matmul(accumulate=True) needs the out array to add to")
    if xp is np or a.dtype != np.float32 or b.dtype != np.float32:
        if accumulate:
            out += xp.matmul(a, b)
            return out
        return xp.matmul(a, b, out=out)
    return _cublas_matmul(xp, a, b, out, accumulate, device_precision(xp, precision))


def round_to(precision: str, array: Any) -> np.ndarray:
    """A float32 copy of ``array`` with every value rounded as the GPU GEMM's operands are.

    fp32: unchanged; fp16: through IEEE half (overflow beyond 65504 to inf, subnormals below
    6.1e-5); bf16 and tf32: to 7 and 10 mantissa bits, round to nearest with ties to even
    (NaN stays NaN). For tf32 this is a model: cuBLAS may truncate instead, which
    ``tolerance`` allows for. The NumPy reference of the policy's arithmetic for CPU tests.
    """
    x = np.array(array, dtype=np.float32, copy=True)
    if precision == "fp32":
        return x
    if precision == "fp16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    if precision not in _DROPPED_BITS:
        raise ValueError(f"precision {precision!r} is not valid; valid values: {', '.join(PRECISIONS)}")
    drop = _DROPPED_BITS[precision]
    bits = x.view(np.uint32)
    # below NaN's bit patterns the sum cannot wrap: the largest finite value rounds up to inf
    rounded = bits + np.uint32((1 << (drop - 1)) - 1) + ((bits >> np.uint32(drop)) & np.uint32(1))
    rounded &= np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    return np.where(np.isnan(x), x, rounded.view(np.float32))


def tolerance(precision: str, dtype: Any) -> tuple[float, float]:
    """``(rtol, atol)`` for one GEMM's result against an exact (float64) reference.

    Assumes results of order one (inputs scaled so that each output, a sum of K products, is
    O(1)) and K up to a few thousand; for a chain of GEMMs multiply by their number. float64
    data ignores ``precision`` (no policy applies to it).
    """
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return 1e-10, 1e-10
    if dtype != np.float32:
        raise ValueError(f"tolerance(): dtype {dtype} is not float32 or float64")
    if precision not in UNIT_ROUNDOFF:
        raise ValueError(f"precision {precision!r} is not valid; valid values: {', '.join(PRECISIONS)}")
    # 8 unit roundoffs: about 10 standard deviations of the operand rounding error of an O(1)
    # result; 1e-4 floors it at what FP32 accumulation of a few thousand terms can reach.
    tol = max(8 * UNIT_ROUNDOFF[precision], 1e-4)
    return tol, tol


# ---------------------------------------------------------------------------------- CuPy side

@functools.lru_cache(maxsize=None)
def _bf16_kernel(cupy: Any) -> Any:
    return cupy.ElementwiseKernel(
        "float32 x", "uint16 y",
        """
        unsigned int bits = __float_as_uint(x);
        if ((bits & 0x7fffffffu) > 0x7f800000u) {
            y = (unsigned short)((bits >> 16) | 0x0040u);  // NaN stays a (quiet) NaN
        } else {
            bits += 0x7fffu + ((bits >> 16) & 1u);        // round to nearest, ties to even
            y = (unsigned short)(bits >> 16);
        }
        """,
        "lotus_round_bf16")


def _matrix_layout(x: Any) -> tuple[bool, int] | None:
    """How cuBLAS reads the row-major matrices in ``x``'s last two axes: (transposed, leading
    dimension in elements), or None when they must be copied first.

    Rows of stride ld are the column-major transpose with leading dimension ld (not
    transposed); a swapaxes view is column-major storage of the matrix itself (transposed)."""
    item = x.itemsize
    rows, cols = x.shape[-2:]
    sr, sc = x.strides[-2], x.strides[-1]
    if sr % item or sc % item:
        return None
    sr, sc = sr // item, sc // item
    if (cols == 1 or sc == 1) and (rows == 1 or sr >= cols):
        return False, sr if rows > 1 else cols
    if (rows == 1 or sr == 1) and (cols == 1 or sc >= rows):
        return True, sc if cols > 1 else rows
    return None


def _readable(cupy: Any, x: Any) -> tuple[Any, tuple[bool, int]]:
    layout = _matrix_layout(x)
    if layout is None:
        x = cupy.ascontiguousarray(x)
        layout = _matrix_layout(x)
    return x, layout


def _writable_in_place(cupy: Any, out: Any, a: Any, b: Any) -> bool:
    """Whether cuBLAS can write ``out`` directly: float32 row-major matrices, stack axes that
    do not overlap, no memory shared with the operands."""
    layout = _matrix_layout(out) if out.dtype == np.float32 else None
    if layout is None or layout[0]:
        return False
    if any(size > 1 and stride <= 0 for size, stride in zip(out.shape[:-2], out.strides[:-2])):
        return False
    return not (cupy.may_share_memory(out, a) or cupy.may_share_memory(out, b))


def _batches(stack: tuple[int, ...], strides: list[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], int, list[int]]:
    """Split the stack axes into one batch of cuBLAS's strided-batched call (the longest run of
    trailing axes that merges into a single stride for every array) and the outer axes left
    to loop over. ``strides``: per array, its stack strides in elements. Returns (element
    offset per array for each outer index, batch count, batch stride per array)."""
    axes = [i for i, size in enumerate(stack) if size > 1]
    count, batch_strides = 1, [0] * len(strides)
    while axes:
        axis = axes[-1]
        if count > 1 and any(st[axis] != bs * count for st, bs in zip(strides, batch_strides)):
            break
        if count == 1:
            batch_strides = [st[axis] for st in strides]
        count *= stack[axis]
        axes.pop()
    ranges = [range(stack[i]) for i in axes]
    offsets = [tuple(sum(st[i] * j for i, j in zip(axes, index)) for st in strides)
               for index in itertools.product(*ranges)]
    return offsets, count, batch_strides


def _cublas_matmul(cupy: Any, a: Any, b: Any, out: Any, accumulate: bool, precision: str) -> Any:
    cublas, device, runtime = cupy.cuda.cublas, cupy.cuda.device, cupy.cuda.runtime
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: operands of shapes {a.shape} and {b.shape} are not (..., M, K) x (..., K, N)")
    stack = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    m, k = a.shape[-2:]
    n = b.shape[-1]
    shape = stack + (m, n)
    if out is not None and tuple(out.shape) != shape:
        raise ValueError(f"matmul: out has shape {out.shape}, the product has shape {shape}")
    if out is not None and _writable_in_place(cupy, out, a, b):
        target = out
    elif accumulate:
        target = cupy.array(out, dtype=np.float32, order="C", copy=True)
    else:
        target = cupy.empty(shape, np.float32)
    if target.size == 0:
        return _finish(target, out)
    if k == 0:
        if not accumulate:
            target.fill(0)
        return _finish(target, out)

    if precision == "bf16":
        a, b = (_bf16_kernel(cupy)(x) for x in (a, b))
        data_type, compute = runtime.CUDA_R_16BF, cublas.CUBLAS_COMPUTE_32F
    elif precision == "fp16":
        a, b = (x.astype(np.float16) for x in (a, b))  # order "K": a transposed view stays one
        data_type, compute = runtime.CUDA_R_16F, cublas.CUBLAS_COMPUTE_32F
    elif precision == "tf32":
        data_type, compute = runtime.CUDA_R_32F, cublas.CUBLAS_COMPUTE_32F_FAST_TF32
    elif precision == "fp32":
        data_type, compute = runtime.CUDA_R_32F, cublas.CUBLAS_COMPUTE_32F_PEDANTIC
    else:
        raise ValueError(f"precision {precision!r} is not valid; valid values: {', '.join(PRECISIONS)}")

    a, (a_trans, lda) = _readable(cupy, a)
    b, (b_trans, ldb) = _readable(cupy, b)
    a = cupy.broadcast_to(a, stack + (m, k))  # broadcast stack axes get stride 0
    b = cupy.broadcast_to(b, stack + (k, n))
    nstack = len(stack)
    arrays = (b, a, target)
    strides = [tuple(st // x.itemsize for st in x.strides[:nstack]) for x in arrays]
    offsets, count, (stride_b, stride_a, stride_c) = _batches(stack, strides)
    ldc = _matrix_layout(target)[1]
    # alpha and beta are read from host memory during the call (CuPy keeps the handle's
    # pointer mode on host); float32 is the scale type of every CUBLAS_COMPUTE_32F* type.
    alpha = np.ones((), np.float32)
    beta = np.full((), 1.0 if accumulate else 0.0, np.float32)
    op = {False: cublas.CUBLAS_OP_N, True: cublas.CUBLAS_OP_T}
    handle = device.get_cublas_handle()
    for off_b, off_a, off_c in offsets:
        # Row-major C = A B is column-major C^T = B^T A^T: cuBLAS's (m, n, k) are (N, M, K)
        # and its first operand is b.
        cublas.gemmStridedBatchedEx(
            handle, op[b_trans], op[a_trans], n, m, k, alpha.ctypes.data,
            b.data.ptr + off_b * b.itemsize, data_type, ldb, stride_b,
            a.data.ptr + off_a * a.itemsize, data_type, lda, stride_a,
            beta.ctypes.data,
            target.data.ptr + off_c * target.itemsize, runtime.CUDA_R_32F, ldc, stride_c,
            count, compute, cublas.CUBLAS_GEMM_DEFAULT)
    return _finish(target, out)


def _finish(target: Any, out: Any) -> Any:
    if out is None:
        return target
    if target is not out:
        out[...] = target
    return out
