"""GPU codelet bodies, the GEMM precision policy (LOTUS_PRECISION) and CUDA-resident data.

Tests marked ``gpu`` need CuPy, a GPU and a StarPU with a CUDA worker; elsewhere they are
skipped with ``conftest.gpu_skip_reason()``'s reason. They were written on a CPU machine and
have NOT run yet. The unmarked tests run everywhere: the policy's parsing and its NumPy
reference (``round_to``, ``tolerance``), the cuBLAS call that ``kernels/precision.py`` makes
checked against a NumPy model of cuBLAS (column-major, transposes, leading dimensions, batch
strides; every byte it touches must lie in an array handed to it), the GPU bodies' code paths
run through that model, and registering a CUDA array on a runtime without CUDA workers.

The StarPU checks run in subprocesses (StarPU reads STARPU_NCPU / STARPU_NCUDA / STARPU_SCHED
at init): a CUDA-only runtime (STARPU_NCPU=0) runs every codelet on the GPU; dmda, once
calibrated, places large GEMMs on the GPU and tiny ones on the CPUs; offloaded layers match the
inline engine; CuPy arrays and torch CUDA tensors are registered in place and keep the results.
"""
from __future__ import annotations

import ctypes
import json
import textwrap
import types

import numpy as np
import pytest

import gpu_cases
import lotus_rt
from conftest import describe, gpu_skip_reason, run_python
from lotus_rt import tn
from lotus_rt.kernels import contract, fused, precision
from lotus_rt.runtime import settings as config

gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def cupy():
    """CuPy, or a skip saying why the GPU tests cannot run here."""
    reason = gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    import cupy
    return cupy


def _close(actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float, what: str) -> None:
    """assert_allclose with ``atol`` relative to the largest expected magnitude."""
    scale = float(np.abs(expected).max()) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * max(scale, 1.0), err_msg=what)


def _error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


# ------------------------------------------------------------------ the policy setting

def test_auto_means_tf32_with_tensor_cores_else_fp32():
    assert precision.resolve("auto", 80) == precision.resolve("auto", 90) == "tf32"
    assert precision.resolve("auto", 75) == "fp32"
    assert [precision.resolve(p, 90) for p in config.PRECISIONS] == list(config.PRECISIONS)
    with pytest.raises(RuntimeError, match="bf16 needs a GPU of compute capability >= 8.0"):
        precision.resolve("bf16", 70)
    with pytest.raises(ValueError, match="valid values"):
        precision.resolve("fp64", 90)


# ------------------------------------------------------------------ round_to and tolerance

def test_round_to_keeps_representable_values_and_ties_to_even():
    ones = np.float32([1.0, -2.5, 0.0, np.inf, -np.inf])
    for p in config.PRECISIONS:
        np.testing.assert_array_equal(precision.round_to(p, ones), ones)
    # 1 + 2**-8 is half-way between bf16's 1 and 1 + 2**-7: to the even one, 1; 1 + 3 * 2**-8
    # is half-way between 1 + 2**-7 and 1 + 2**-6: to the even one, 1 + 2**-6
    ties = np.float32([1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 + 2.0**-20])
    np.testing.assert_array_equal(precision.round_to("bf16", ties), np.float32([1, 1 + 2.0**-6, 1 + 2.0**-7]))
    np.testing.assert_array_equal(precision.round_to("tf32", np.float32([1 + 2.0**-11])), np.float32([1]))
    assert np.isnan(precision.round_to("bf16", np.float32([np.nan]))).all()
    assert precision.round_to("bf16", np.float32([np.finfo(np.float32).max]))[0] == np.inf
    assert precision.round_to("fp16", np.float32([1e5]))[0] == np.inf


@pytest.mark.parametrize("p", config.PRECISIONS)
def test_round_to_error_is_within_the_unit_roundoff(p, rng):
    # magnitudes 1e-4 .. 1e4: within fp16's normal range, where its unit roundoff holds
    x = (rng.choice([-1.0, 1.0], 100_000) * 10.0 ** rng.uniform(-4, 4, 100_000)).astype(np.float32)
    rounded = precision.round_to(p, x)
    relative = np.abs(rounded.astype(np.float64) - x) / np.abs(x)
    assert relative.max() <= precision.UNIT_ROUNDOFF[p] * (1 + 1e-6)
    assert rounded.dtype == np.float32 and rounded is not x


def test_rounded_operand_gemms_are_within_tolerance_and_ordered(rng):
    """The policy's arithmetic, emulated: a GEMM of rounded operands (exact accumulation)
    against the exact one, for an O(1)-scaled product with K = 2048."""
    k = 2048
    a = (rng.standard_normal((64, k)) * k ** -0.25).astype(np.float32)
    b = (rng.standard_normal((k, 48)) * k ** -0.25).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    errors = {}
    for p in config.PRECISIONS:
        emulated = precision.round_to(p, a).astype(np.float64) @ precision.round_to(p, b).astype(np.float64)
        rtol, atol = precision.tolerance(p, np.float32)
        np.testing.assert_allclose(emulated, exact, rtol=rtol, atol=atol, err_msg=p)
        errors[p] = _error(emulated, exact)
    assert errors["fp32"] < errors["fp16"] < errors["bf16"]


def test_tolerance():
    assert precision.tolerance("bf16", np.float64) == precision.tolerance("fp32", "float64") == (1e-10, 1e-10)
    tols = [precision.tolerance(p, np.float32)[0] for p in ("fp32", "fp16", "tf32", "bf16")]
    assert tols == sorted(tols) and tols[0] == 1e-4
    with pytest.raises(ValueError, match="valid values"):
        precision.tolerance("auto", np.float32)
    with pytest.raises(ValueError, match="not float32 or float64"):
        precision.tolerance("fp32", np.float16)


# ------------------------------------------------------------------ NumPy: plain matmul

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_operands_get_plain_matmul(dtype, rng):
    a, b = rng.standard_normal((3, 5, 7)).astype(dtype), rng.standard_normal((3, 7, 4)).astype(dtype)
    np.testing.assert_array_equal(precision.matmul(np, a, b), np.matmul(a, b))
    out = np.empty((3, 4, 5), dtype).swapaxes(1, 2)
    assert precision.matmul(np, a, b, out=out) is out
    np.testing.assert_array_equal(out, np.matmul(a, b))
    acc = rng.standard_normal((3, 5, 4)).astype(dtype)
    expected = acc + np.matmul(a, b)
    precision.matmul(np, a, b, out=acc, accumulate=True)
    np.testing.assert_array_equal(acc, expected)
    with pytest.raises(ValueError, match="needs the out array"):
        precision.matmul(np, a, b, accumulate=True)


# ------------------------------------------------------------------ the cuBLAS call, modelled

class _DeviceArray(np.ndarray):
    """Host memory posing as a CuPy array: ``.data.ptr`` is its address, and reading it records
    the memory of the array's root buffer as memory the cuBLAS model may touch."""

    bounds: list[tuple[int, int]] = []

    @property
    def data(self):
        root = self
        while isinstance(root.base, np.ndarray):
            root = root.base
        _DeviceArray.bounds.append(getattr(np.lib, "array_utils", np).byte_bounds(root))
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


def _dev(x):
    return x.view(_DeviceArray) if isinstance(x, np.ndarray) and not isinstance(x, _DeviceArray) else x


class CuBLASModel:
    """A stand-in for the ``cupy`` module: NumPy for everything, and a NumPy model of
    ``cublasGemmStridedBatchedEx`` (column-major storage, CUBLAS_OP_N/T, leading dimensions,
    batch strides, 32F/16F/16BF data) that checks cuBLAS's documented argument constraints
    and that every byte it reads or writes lies in an array the caller took ``.data.ptr`` of."""

    DTYPES = {0: np.float32, 2: np.float16, 14: np.uint16}

    def __init__(self):
        _DeviceArray.bounds = []
        self.calls: list[dict] = []
        cublas = types.SimpleNamespace(
            CUBLAS_OP_N=0, CUBLAS_OP_T=1, CUBLAS_GEMM_DEFAULT=-1, CUBLAS_COMPUTE_32F=68,
            CUBLAS_COMPUTE_32F_PEDANTIC=69, CUBLAS_COMPUTE_32F_FAST_TF32=77, gemmStridedBatchedEx=self._gemm)
        runtime = types.SimpleNamespace(CUDA_R_32F=0, CUDA_R_16F=2, CUDA_R_16BF=14, getDevice=lambda: 0)
        self.cuda = types.SimpleNamespace(cublas=cublas, runtime=runtime,
                                          device=types.SimpleNamespace(get_cublas_handle=lambda: 1),
                                          Device=lambda device_id=0: types.SimpleNamespace(compute_capability="90"))
        self.lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
            as_strided=lambda x, shape, strides: _dev(np.lib.stride_tricks.as_strided(x, shape, strides))))

    def __getattr__(self, name):
        attr = getattr(np, name)
        if callable(attr) and not isinstance(attr, type):
            return lambda *args, **kwargs: _dev(attr(*args, **kwargs))
        return attr

    def ElementwiseKernel(self, in_params, out_params, body, name):
        assert (in_params, out_params) == ("float32 x", "uint16 y")
        return lambda x: _dev((precision.round_to("bf16", x).view(np.uint32) >> 16).astype(np.uint16))

    def _matrices(self, ptr, dtype_code, rows, cols, ld, stride, count, writable=False):
        """The (count, rows, cols) column-major matrices at ``ptr``."""
        dtype = np.dtype(self.DTYPES[dtype_code])
        assert ld >= max(1, rows), f"leading dimension {ld} < rows {rows}"
        assert stride >= 0
        if writable:  # the matrices written may interleave, but no element may be written twice
            offsets = (np.arange(count)[:, None, None] * stride + np.arange(rows)[None, :, None]
                       + np.arange(cols)[None, None, :] * ld)
            assert np.unique(offsets).size == offsets.size, "overlapping output matrices"
        span = ((count - 1) * stride + (cols - 1) * ld + rows) * dtype.itemsize
        assert any(lo <= ptr and ptr + span <= hi for lo, hi in _DeviceArray.bounds), \
            "cuBLAS would touch memory outside the arrays it was given"
        base = np.frombuffer((ctypes.c_char * span).from_address(ptr), dtype)
        item = dtype.itemsize
        return np.lib.stride_tricks.as_strided(base, (count, rows, cols), (stride * item, item, ld * item),
                                               writeable=writable)

    def _operand(self, ptr, dtype_code, rows, cols, ld, stride, trans, count):
        """op(X) of shape (count, rows, cols) as float64."""
        stored = self._matrices(ptr, dtype_code, *((cols, rows) if trans else (rows, cols)), ld, stride, count)
        if dtype_code == 14:
            stored = (stored.astype(np.uint32) << 16).view(np.float32)
        value = stored.astype(np.float64)
        return value.transpose(0, 2, 1) if trans else value

    def _gemm(self, handle, transa, transb, m, n, k, alpha, a, atype, lda, stride_a, b, btype, ldb, stride_b,
              beta, c, ctype, ldc, stride_c, count, compute, algo):
        self.calls.append(dict(transa=transa, transb=transb, atype=atype, compute=compute, count=count))
        assert atype == btype and ctype == 0 and min(m, n, k, count) >= 1 and algo == -1
        op_a = self._operand(a, atype, m, k, lda, stride_a, transa, count)
        op_b = self._operand(b, btype, k, n, ldb, stride_b, transb, count)
        out = self._matrices(c, ctype, m, n, ldc, stride_c, count, writable=True)
        alpha_v, beta_v = ctypes.c_float.from_address(alpha).value, ctypes.c_float.from_address(beta).value
        product = alpha_v * np.matmul(op_a, op_b)
        out[...] = product + beta_v * out if beta_v else product


def _layout_cases(rng):
    """(name, a, b, out or None, accumulate): contiguous, transposed, strided, stacked,
    broadcast, not BLAS-readable, size-1 and accumulating products."""
    def f(*shape):
        return rng.standard_normal(shape).astype(np.float32)
    wide = f(6, 30)
    return [
        ("2-D", f(5, 7), f(7, 4), None, False),
        ("a transposed", f(7, 5).T, f(7, 4), None, False),
        ("b transposed", f(5, 7), f(4, 7).T, None, False),
        ("a transposed, padded", f(7, 9)[:, :5].T, f(7, 4), None, False),
        ("batched, both transposed", f(3, 7, 5).swapaxes(1, 2), f(3, 4, 7).swapaxes(1, 2), None, False),
        ("stacked 4-D, merges", f(2, 3, 5, 7), f(2, 3, 7, 4), None, False),
        ("stacked 4-D, outer loop", f(3, 2, 5, 7).swapaxes(0, 1), f(2, 3, 7, 4), None, False),
        ("broadcast stack", f(1, 5, 7), f(4, 7, 4), None, False),
        ("2-D times stack", f(5, 7), f(4, 7, 4), None, False),
        ("strided rows", wide[:, 3:10], f(7, 4), None, False),
        ("not BLAS-readable", f(5, 14)[:, ::2], f(7, 4), None, False),
        ("size-1 axes", f(1, 7), f(7, 1), None, False),
        ("K = 1", f(5, 1), f(1, 4), None, False),
        ("out with strided rows", f(5, 7), f(7, 4), np.zeros((5, 9), np.float32)[:, 2:6], False),
        ("out transposed", f(3, 5, 7), f(3, 7, 4), np.zeros((3, 4, 5), np.float32).swapaxes(1, 2), False),
        ("accumulate", f(3, 5, 7), f(3, 7, 4), f(3, 5, 4), True),
        ("accumulate, out transposed", f(5, 7), f(7, 4), f(4, 5).T, True),
    ]


@pytest.mark.parametrize("p", config.PRECISIONS)
def test_cublas_call_computes_the_product_for_every_layout(p, rng):
    """The operand rounding and the cuBLAS arguments (transposes, leading dimensions, batch
    strides, the C^T = B^T A^T swap) for every layout the contraction kernels produce."""
    compute = {"fp32": 69, "tf32": 77, "bf16": 68, "fp16": 68}[p]
    data_type = {"fp32": 0, "tf32": 0, "bf16": 14, "fp16": 2}[p]
    rounding = "fp32" if p == "tf32" else p  # the model does not round to TF32 (cuBLAS does)
    for name, a, b, out, accumulate in _layout_cases(rng):
        model = CuBLASModel()
        before = None if out is None else out.copy()
        expected = (precision.round_to(rounding, a).astype(np.float64) @ precision.round_to(rounding, b))
        if accumulate:
            expected = expected + before
        result = precision.matmul(model, _dev(a), _dev(b), out=_dev(out), accumulate=accumulate, precision=p)
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5, err_msg=f"{p}: {name}")
        if out is not None:
            assert np.shares_memory(result, out)
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=f"{p}: {name} (out)")
        assert model.calls and all(c["compute"] == compute and c["atype"] == data_type for c in model.calls), name
    assert result.dtype == np.float32


def test_cublas_call_reads_transposed_views_without_copies_and_batches_stacks(rng):
    model = CuBLASModel()
    a = rng.standard_normal((3, 7, 5)).astype(np.float32).swapaxes(1, 2)
    precision.matmul(model, _dev(a), _dev(rng.standard_normal((3, 7, 4)).astype(np.float32)), precision="fp32")
    assert model.calls == [dict(transa=0, transb=1, atype=0, compute=69, count=3)]
    model = CuBLASModel()
    a = rng.standard_normal((3, 2, 5, 7)).astype(np.float32).swapaxes(0, 1)
    precision.matmul(model, _dev(a), _dev(rng.standard_normal((2, 3, 7, 4)).astype(np.float32)), precision="tf32")
    assert [c["count"] for c in model.calls] == [3, 3]  # the outer stack axis does not merge: a loop
    model = CuBLASModel()
    precision.matmul(model, _dev(rng.standard_normal((2, 3, 5, 7)).astype(np.float32)),
                     _dev(rng.standard_normal((2, 3, 7, 4)).astype(np.float32)), precision="tf32")
    assert [c["count"] for c in model.calls] == [6]  # contiguous stack axes merge into one batch


def test_float64_and_mismatched_shapes_on_the_gpu_path(rng):
    model = CuBLASModel()
    a, b = rng.standard_normal((4, 6)), rng.standard_normal((6, 3))
    np.testing.assert_allclose(precision.matmul(model, _dev(a), _dev(b), precision="bf16"), a @ b, rtol=1e-14)
    assert not model.calls  # float64: CuPy's own matmul in float64, whatever the policy
    with pytest.raises(ValueError, match="not \\(..., M, K\\) x \\(..., K, N\\)"):
        precision.matmul(model, _dev(np.ones((4, 6), np.float32)), _dev(np.ones((5, 3), np.float32)), precision="fp32")
    with pytest.raises(ValueError, match="out has shape"):
        precision.matmul(model, _dev(np.ones((4, 6), np.float32)), _dev(np.ones((6, 3), np.float32)),
                         out=_dev(np.ones((3, 4), np.float32)), precision="fp32")


@pytest.mark.parametrize("p", ["fp32", "bf16"])
def test_gpu_code_paths_of_every_codelet_through_the_model(p, rng, monkeypatch):
    """The bodies' xp-generic code, run as on the GPU (every GEMM through the cuBLAS call),
    equals the CPU bodies within the precision's tolerance."""
    monkeypatch.setattr(precision, "device_precision", lambda xp, requested="auto": p)
    model = CuBLASModel()
    rtol, atol = precision.tolerance(p, np.float32)
    for case in gpu_cases.cases(rng, np.float32):
        if case.codelet.cuda in (contract.pair_gpu,):
            body = lambda *arrays, **kw: contract._pair(model, *arrays, kw["spec"], kw.get("a_slice"),  # noqa: E731
                                                        kw.get("b_slice"), kw.get("out_slice"), p)
        elif case.codelet.cuda is fused.forward_gpu:
            body = lambda *arrays, key, **kw: fused._run_forward(model, *arrays, **kw)  # noqa: E731
        elif case.codelet.cuda is fused.backward_gpu:
            body = lambda *arrays, key, **kw: fused._run_backward(model, *arrays, **kw)  # noqa: E731
        else:
            continue  # no GEMM, or a body that imports cupy itself: covered by the gpu tests
        arrays = [_dev(a.copy()) for a in case.arrays]
        body(*arrays, **case.kwargs)
        for k, expected in zip(case.outputs, case.run("cpu")):
            _close(np.asarray(arrays[k]), expected, rtol * case.chain, atol * case.chain, case.name)
    assert model.calls


# ------------------------------------------------------------------ CUDA arrays, without CUDA

class _FakeCudaArray:
    """Just the interface: enough to be refused (its pointer is never dereferenced)."""

    def __init__(self, shape, typestr="<f4", strides=None):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (0x7F0000000000, False),
                                         "strides": strides, "version": 3, "stream": 1}


def test_registering_a_cuda_array_without_cuda_workers_is_one_clear_error(rt):
    live = len(rt._live)
    with pytest.raises(ValueError, match="lives in CUDA device memory, but the runtime has no CUDA worker"):
        rt.register(_FakeCudaArray((4, 5)))
    assert len(rt._live) == live


@pytest.mark.parametrize("fake, error, message", [
    (_FakeCudaArray((4, 5), strides=(4, 16)), ValueError, "C-contiguous"),
    (_FakeCudaArray((0, 5)), ValueError, "empty array"),
    (_FakeCudaArray((3,), "|O"), TypeError, "not supported"),
    (_FakeCudaArray((3,), ">f4"), TypeError, "not supported"),
])
def test_bad_cuda_arrays_are_refused_before_anything_else(inline_rt, fake, error, message):
    with pytest.raises(error, match=message):
        inline_rt.register(fake)


# ------------------------------------------------------------------ on a GPU

@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_bodies_equal_cpu_bodies(cupy, dtype, rng):
    p = precision.device_precision(cupy)
    rtol, atol = precision.tolerance(p, dtype)
    for case in gpu_cases.cases(rng, dtype):
        for gpu_out, cpu_out in zip(case.run("cuda", cupy), case.run("cpu")):
            _close(gpu_out, cpu_out, rtol * case.chain, atol * case.chain, f"{case.name} ({p})")


@gpu
def test_precisions_against_a_float64_reference(cupy, rng):
    """tf32/bf16/fp16 within tolerance of fp64, fp32 closer than bf16; bf16 and fp16 results
    equal the NumPy emulation (rounded operands, exact products) up to FP32 accumulation; the
    stacked, transposed, broadcast and accumulating layouts too."""
    k = 2048
    a = (rng.standard_normal((4, 96, k)) * k ** -0.25).astype(np.float32)
    b = (rng.standard_normal((4, 80, k)) * k ** -0.25).astype(np.float32).swapaxes(1, 2)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    ga, gb = cupy.asarray(a), cupy.asarray(np.ascontiguousarray(b.swapaxes(1, 2))).swapaxes(1, 2)
    errors = {}
    for p in config.PRECISIONS:
        result = cupy.asnumpy(precision.matmul(cupy, ga, gb, precision=p))
        rtol, atol = precision.tolerance(p, np.float32)
        _close(result, exact, rtol, atol, p)
        errors[p] = _error(result, exact)
        if p in ("bf16", "fp16"):
            emulated = precision.round_to(p, a).astype(np.float64) @ precision.round_to(p, b)
            _close(result, emulated, *precision.tolerance("fp32", np.float32), f"{p} vs its emulation")
        acc = cupy.ones((4, 96, 80), np.float32)
        precision.matmul(cupy, ga[:1], gb, out=acc, accumulate=True, precision=p)  # broadcast stack
        _close(cupy.asnumpy(acc), a[:1].astype(np.float64) @ b + 1.0, rtol, atol, f"{p} accumulate")
    assert errors["fp32"] < errors["bf16"] and errors["fp32"] <= errors["tf32"], errors
    assert errors["fp32"] < 1e-5, errors


@gpu
def test_bf16_kernel_rounds_like_the_numpy_reference(cupy):
    x = np.float32([1 + 2.0**-8, 1 + 3 * 2.0**-8, -1 - 2.0**-8, 3.0e38, np.finfo(np.float32).max, np.inf,
                    -np.inf, 1e-45, -0.0, np.nan, 0.1, 123.456])
    bits = precision._bf16_kernel(cupy)(cupy.asarray(x)).get()
    widened = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(widened, precision.round_to("bf16", x))  # NaN == NaN here


def test_the_runtime_precision_reaches_every_gemm_body(rng, monkeypatch):
    """LOTUS_PRECISION is read once, when the runtime starts (or reconfigures), and handed to
    every codelet body that multiplies: the einsum pair steps and the fused layer bodies."""
    rt = lotus_rt.Runtime(config.read_settings({"LOTUS_ENGINE": "inline", "LOTUS_PRECISION": "bf16"}))
    seen = []
    submit = rt.submit

    def recording_submit(codelet, *accesses, **kwargs):
        seen.append((codelet.name, kwargs.get("precision")))
        return submit(codelet, *accesses, **kwargs)

    monkeypatch.setattr(rt, "submit", recording_submit)
    monkeypatch.setattr(tn, "runtime", lambda: rt)
    try:
        a, b = rng.standard_normal((6, 5)), rng.standard_normal((5, 4))
        np.testing.assert_allclose(tn.einsum("ij,jk->ik", a, b), a @ b, rtol=1e-12)
        assert ("contract_pair", "bf16") in seen and all(p == "bf16" for n, p in seen if n == "contract_pair")
        rt.reconfigure(precision="fp16")
        seen.clear()
        tn.einsum("ij,jk->ik", a, b)
        assert seen and all(p == "fp16" for n, p in seen if n == "contract_pair")
    finally:
        rt.shutdown()
    for case in gpu_cases.fused_cases(rng, np.float32):  # the fused bodies take it as an argument too
        assert "precision" in case.kwargs


CUDA_ONLY_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    import cupy, numpy as np, lotus_rt, gpu_cases
    from lotus_rt.kernels import precision
    rt = lotus_rt.runtime()
    report = {"workers": rt.workers, "precision": precision.device_precision(cupy, rt.settings.precision),
              "cases": []}
    rng = np.random.default_rng(11)
    for dtype in (np.float32, np.float64):
        for case in gpu_cases.cases(rng, dtype):
            arrays = [a.copy() for a in case.arrays]
            handles = [rt.register(a) for a in arrays]
            rt.submit(case.codelet, *zip(handles, case.modes), name="case", **case.kwargs)
            rt.wait()
            for h in handles:
                h.unregister()
            for k, expected in zip(case.outputs, case.run("cpu")):
                report["cases"].append([case.name, np.dtype(dtype).name, case.chain,
                                        arrays[k].tolist(), expected.tolist()])
    report["kinds"] = sorted({r.kind for r in lotus_rt.trace()})
    json.dump(report, open(sys.argv[1], "w"))
""")


@gpu
def test_every_codelet_runs_on_a_cuda_only_starpu(cupy, tmp_path):
    path = tmp_path / "report.json"
    proc = run_python(CUDA_ONLY_SCRIPT, env={"STARPU_NCPU": "0", "STARPU_NCUDA": "1", "LOTUS_ENGINE": "starpu"},
                      args=[str(path)], timeout=300)
    assert proc.returncode == 0, describe(proc)
    report = json.loads(path.read_text())
    assert [kind for kind, _ in report["workers"]] == ["cuda"]
    assert report["kinds"] == ["cuda"]
    for name, dtype, chain, actual, expected in report["cases"]:
        rtol, atol = precision.tolerance(report["precision"], dtype)
        _close(np.array(actual), np.array(expected), rtol * chain, atol * chain, f"{name} {dtype}")


PLACEMENT_SCRIPT = textwrap.dedent("""
    import collections, json, sys
    import numpy as np, lotus_rt
    from lotus_rt.workloads import GEMM
    BIG, TINY, NBIG, NTINY, ROUNDS = 2048, 8, 6, 60, 4
    rt = lotus_rt.runtime()
    rng = np.random.default_rng(3)
    def operands(n):
        return [rt.register(rng.standard_normal((n, n)).astype(np.float32)) for _ in range(2)]
    big, tiny = operands(BIG), operands(TINY)
    outs = {"big": [rt.register(np.empty((BIG, BIG), np.float32)) for _ in range(NBIG)],
            "tiny": [rt.register(np.empty((TINY, TINY), np.float32)) for _ in range(NTINY)]}
    for _ in range(ROUNDS):  # the first rounds calibrate dmda's history models
        lotus_rt.trace(clear=True)
        for name, (a, b) in (("big", big), ("tiny", tiny)):
            for c in outs[name]:
                rt.submit(GEMM, (a, "R"), (b, "R"), (c, "W"), name=name)
        rt.wait()
    placed = collections.Counter(f"{r.name}:{r.kind}" for r in lotus_rt.trace())
    json.dump({"policy": rt.policy, "workers": rt.workers, "placed": placed}, open(sys.argv[1], "w"))
""")


@gpu
def test_calibrated_dmda_puts_large_gemms_on_the_gpu_and_tiny_ones_on_cpus(cupy, tmp_path):
    """2048^2 GEMMs (4096^2 would make the CPU calibration runs minutes long) and 8x8 ones;
    the placement of the last round, after the calibration rounds, is read from the trace."""
    path = tmp_path / "placement.json"
    env = {"STARPU_SCHED": "dmda", "STARPU_CALIBRATE": "1", "STARPU_CALIBRATE_MINIMUM": "3",
           "STARPU_NCUDA": "1", "STARPU_NCPU": "4", "LOTUS_ENGINE": "starpu"}  # the run's STARPU_HOME:
    # its bus calibration is reused; models of these two GEMM sizes already there only help
    proc = run_python(PLACEMENT_SCRIPT, env=env, args=[str(path)], timeout=400)
    assert proc.returncode == 0, describe(proc)
    report = json.loads(path.read_text())
    placed = report["placed"]
    assert report["policy"] == "dmda"
    assert placed.get("big:cuda", 0) >= 0.8 * (placed.get("big:cuda", 0) + placed.get("big:cpu", 0)), placed
    assert placed.get("tiny:cpu", 0) >= 0.5 * (placed.get("tiny:cuda", 0) + placed.get("tiny:cpu", 0)), placed


LAYER_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np, torch, lotus_rt
    out = {}
    layers = {"tt": (lambda dtype: lotus_rt.TTLinear((4, 8), (8, 4), 3, dtype=dtype), (16, 32)),
              "tucker": (lambda dtype: lotus_rt.TuckerConv2d(8, 12, 3, ranks=(4, 6), padding=1, dtype=dtype),
                         (4, 8, 12, 12))}
    for name, (make, shape) in layers.items():
        for dtype in (torch.float32, torch.float64):
            for fuse in ("on", "off"):
                lotus_rt.runtime().reconfigure(fuse=fuse)
                torch.manual_seed(5)
                layer = make(dtype)
                lotus_rt.offload(layer, whole_model=False)
                x = torch.randn(shape, dtype=dtype, requires_grad=True)
                y = layer(x)
                weight = torch.randn(y.shape, dtype=dtype)
                (y * weight).sum().backward()
                key = f"{name}/{str(dtype)[6:]}/{fuse}"
                out[key + "/y"] = y.detach().numpy()
                out[key + "/dx"] = x.grad.numpy()
                for pname, param in layer.named_parameters():
                    out[key + "/d" + pname] = param.grad.numpy()
    np.savez(sys.argv[1], **out)
    print("ENGINE", lotus_rt.runtime().engine, sorted({k for k, _ in lotus_rt.runtime().workers}))
""")


@gpu
def test_offloaded_layers_on_a_cuda_starpu_match_the_inline_engine(cupy, tmp_path):
    runs = {"cuda": {"STARPU_NCPU": "0", "STARPU_NCUDA": "1", "LOTUS_ENGINE": "starpu"},
            "inline": {"LOTUS_ENGINE": "inline"}}
    for label, env in runs.items():
        proc = run_python(LAYER_SCRIPT, env=env, args=[str(tmp_path / f"{label}.npz")], timeout=300)
        assert proc.returncode == 0, describe(proc)
        assert proc.stdout.strip().endswith("ENGINE starpu ['cuda']" if label == "cuda" else "ENGINE inline ['cpu']"), \
            describe(proc)
    gpu_run, inline_run = np.load(tmp_path / "cuda.npz"), np.load(tmp_path / "inline.npz")
    p = precision.device_precision(cupy, "auto")
    for key in inline_run.files:
        dtype = key.split("/")[1]
        rtol, atol = precision.tolerance(p, dtype)
        _close(gpu_run[key], inline_run[key], 8 * rtol, 8 * atol, key)


CUDA_TENSOR_SCRIPT = textwrap.dedent("""
    import numpy as np, cupy, torch, lotus_rt
    from lotus_rt.workloads import GEMM
    rt = lotus_rt.runtime()
    double = rt.codelet("double_on_gpu", cuda=lambda x: x.__imul__(2))
    plus_one = rt.codelet("plus_one_on_cpu", cpu=lambda x: np.add(x, 1, out=x))
    makers = {"cupy": lambda: cupy.arange(1000, dtype=cupy.float32),
              "torch": lambda: torch.arange(1000, dtype=torch.float32, device="cuda")}
    for name, make in makers.items():
        obj = make()
        h = rt.register(obj)
        rt.submit(double, (h, "RW"))
        rt.submit(plus_one, (h, "RW"))   # StarPU moves it to RAM for the CPU task, and back
        rt.submit(double, (h, "RW"))
        back = h.unregister()
        assert back is obj
        values = cupy.asnumpy(back) if name == "cupy" else back.cpu().numpy()
        assert np.array_equal(values, (np.arange(1000) * 2 + 1) * 2), values[:4]
        assert name == "cupy" or back.device.type == "cuda"
        print("OK", name)
    a = torch.randn(64, 32, device="cuda"); b = torch.randn(32, 16, device="cuda")
    c = torch.empty(64, 16, device="cuda")
    handles = [rt.register(t) for t in (a, b, c)]
    rt.submit(GEMM, (handles[0], "R"), (handles[1], "R"), (handles[2], "W"))
    for h in handles:
        h.unregister()
    assert c.device.type == "cuda" and torch.allclose(c, a @ b, rtol=3e-2, atol=3e-2)
    kinds = {r.name: r.kind for r in lotus_rt.trace()}
    assert kinds["double_on_gpu"] == "cuda" and kinds["plus_one_on_cpu"] == "cpu", kinds
    print("OK gemm")
""")


@gpu
def test_cuda_arrays_are_registered_in_place_and_keep_the_results(cupy):
    proc = run_python(CUDA_TENSOR_SCRIPT, env={"STARPU_NCPU": "1", "STARPU_NCUDA": "1", "LOTUS_ENGINE": "starpu"},
                      timeout=300)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.split("\n")[:3] == ["OK cupy", "OK torch", "OK gemm"], describe(proc)


WHOLE_MODEL_SCRIPT = textwrap.dedent("""
    import copy, json, sys
    import torch, torch.nn.functional as F, lotus_rt
    from lotus_rt.demo import small_alexnet
    torch.manual_seed(0)
    report = {"workers": sorted({k for k, _ in lotus_rt.runtime().workers}), "runs": {}}
    for device in ("cuda", "cpu"):
        for tensorized in (False, True):
            reference = small_alexnet().double()
            if tensorized:
                lotus_rt.tensorize(reference, rank=0.3, skip={"11"}, verbose=False)
            reference = reference.to(device)
            model = lotus_rt.offload(copy.deepcopy(reference))
            opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (reference, model)]
            worst = 0.0
            for step in range(3):
                x = torch.randn(8, 1, 28, 28, dtype=torch.float64, device=device)
                y = torch.arange(8, device=device) % 10
                seen = []
                for m, opt in zip((reference, model), opts):
                    opt.zero_grad(); out = m(x); F.cross_entropy(out, y).backward(); opt.step()
                    seen.append([out.detach()] + [p.grad.clone() for p in m.parameters()])
                worst = max([worst] + [float((a - b).abs().max() / a.abs().max().clamp_min(1e-6))
                                       for a, b in zip(*seen)])
            report["runs"][f"{device}/{'tensorized' if tensorized else 'dense'}"] = worst
    report["kinds"] = sorted({r.kind for r in lotus_rt.trace()})
    json.dump(report, open(sys.argv[1], "w"))
""")


@gpu
def test_a_whole_model_on_cuda_trains_as_torch_does_on_a_cuda_starpu(cupy, tmp_path):
    """A model on the GPU (parameters and state registered on it) and a model on the host, each
    offloaded whole onto one CPU and one CUDA worker, train as torch does on the same device."""
    out = tmp_path / "whole.json"
    proc = run_python(WHOLE_MODEL_SCRIPT, env={"STARPU_NCPU": "1", "STARPU_NCUDA": "1", "LOTUS_ENGINE": "starpu"},
                      args=[str(out)], timeout=300)
    assert proc.returncode == 0, describe(proc)
    report = json.loads(out.read_text())
    assert report["workers"] == ["cpu", "cuda"] and "cuda" in report["kinds"], report
    for run, worst in report["runs"].items():
        assert worst < 1e-9, (run, worst)
