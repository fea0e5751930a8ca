"""What the GPU machine offers (torch, CuPy, the precision of float32 GEMMs) and the GPU references
the hetero scenario compares with: torch eager and a bare cupy.matmul on the same card."""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

import numpy as np

from benchmarks import common
from benchmarks.hetero.workloads import layer_cases


def gpu_facts() -> dict[str, Any]:
    """What torch and CuPy see of the GPU (name, compute capability, versions), with the reason
    wherever one of them sees none. Starts no StarPU."""
    facts: dict[str, Any] = {"name": None, "compute_capability": None, "torch_cuda": False,
                             "torch_reason": None, "cupy_devices": 0, "cupy_reason": None}
    try:
        import torch
        facts["torch_cuda_version"] = torch.version.cuda
        if torch.cuda.is_available():
            facts["torch_cuda"] = True
            facts["name"] = torch.cuda.get_device_name(0)
            major, minor = torch.cuda.get_device_capability(0)
            facts["compute_capability"] = 10 * major + minor
        else:
            facts["torch_reason"] = f"torch {torch.__version__} sees no GPU (torch.cuda.is_available() is False)"
    except ImportError as exc:
        facts["torch_reason"] = f"torch is not importable ({exc})"
    try:
        import cupy
        facts["cupy"] = cupy.__version__
        try:
            facts["cupy_devices"] = int(cupy.cuda.runtime.getDeviceCount())
        except Exception as exc:  # noqa: BLE001 - CUDARuntimeError without a driver, etc.
            facts["cupy_reason"] = f"CuPy {cupy.__version__} sees no GPU ({type(exc).__name__}: {exc})"
        if facts["cupy_devices"]:
            device = cupy.cuda.Device(0)
            facts["compute_capability"] = facts["compute_capability"] or int(device.compute_capability)
            if facts["name"] is None:
                name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
                facts["name"] = name.decode() if isinstance(name, bytes) else str(name)
        elif facts["cupy_reason"] is None:
            facts["cupy_reason"] = f"CuPy {cupy.__version__} sees no GPU (0 devices)"
    except ImportError as exc:
        facts["cupy_reason"] = f"CuPy is not installed ({exc}): the CUDA codelet bodies need it"
    return facts


def gpu_precision(compute_capability: int | None) -> dict[str, Any]:
    """LOTUS_PRECISION as configured and as it resolves for this GPU's float32 GEMMs; empty where
    this lotus_rt has no such setting (nothing is assumed then)."""
    try:
        from lotus_rt.kernels import precision
        from lotus_rt.runtime.settings import read_settings
        configured = read_settings().precision
    except (ImportError, AttributeError):
        return {}
    record: dict[str, Any] = {"configured": configured, "resolved": None}
    if compute_capability:
        try:
            record["resolved"] = precision.resolve(configured, int(compute_capability))
        except (ValueError, RuntimeError) as exc:
            record["error"] = str(exc)
    return record


def tolerance(dtype: str, precision: str | None, chain: int = 1) -> float:
    """Max relative error allowed against float64: ``common.MAX_REL_ERROR`` for the dtype, or
    ``chain`` times lotus_rt's own tolerance for a reduced GPU precision of float32 GEMMs."""
    base = common.MAX_REL_ERROR[dtype]
    if dtype == "float32" and precision and precision != "fp32":
        try:
            from lotus_rt.kernels import precision as module
            return max(base, chain * module.tolerance(precision, np.float32)[0])
        except (ImportError, AttributeError, ValueError):
            pass
    return base


def _gpu_samples(fn: Callable[[], Any], sync: Callable[[], Any], repeats: int, warmup: int = 2,
                 per_call: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) / per_call)
    return samples


def _torch_references(spec: Mapping[str, Any], precision: str | None, device: str = "cuda") -> dict[str, Any]:
    """torch eager on ``device`` (the GPU; "cpu" only to exercise this code without one)."""
    import torch

    from benchmarks import layers_bench

    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    repeats = spec["reference_repeats"]
    n = spec["gemm"]["size"]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision or "", getattr(torch, spec["gemm"]["dtype"]))
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty_like(a)
    out: dict[str, Any] = {"flags": {"allow_tf32": tf32, "cudnn_allow_tf32": tf32, "gemm_dtype": str(dtype)}}
    out["gemm"] = {"size": n, "time_s": common.median_spread(
        _gpu_samples(lambda: torch.matmul(a, b, out=c), sync, repeats))}
    del a, b, c
    for kind, case in layer_cases(spec).items():
        torch.manual_seed(0)
        module = case.make().to(device)
        x = torch.randn(case.input_shape, device=device, requires_grad=True)
        with torch.no_grad():
            weights = torch.randn_like(module(x))
        steps = spec["steps"]

        def run(module=module, x=x, weights=weights, steps=steps) -> None:
            for _ in range(steps):
                layers_bench.training_step(module, x, weights)

        out[kind] = {"time_s": common.median_spread(_gpu_samples(run, sync, repeats, per_call=steps)),
                     "steps_per_call": steps}
        del module, x, weights
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def _cupy_references(spec: Mapping[str, Any], precision: str | None) -> dict[str, Any]:
    import cupy

    if precision == "bf16":
        raise RuntimeError("CuPy has no bfloat16 dtype: there is no bare cupy.matmul in bf16")
    dtype = "float16" if precision == "fp16" else spec["gemm"]["dtype"]
    sync, repeats = cupy.cuda.Device().synchronize, spec["reference_repeats"]
    out: dict[str, Any] = {"dtype": dtype, "CUPY_TF32": os.environ.get("CUPY_TF32")}
    for key, n in (("gemm", spec["gemm"]["size"]), ("single_gemm", spec["single_gemm"]["size"])):
        a, b = (cupy.random.standard_normal((n, n), dtype=np.float32).astype(dtype) for _ in range(2))
        c = cupy.empty_like(a)
        out[key] = {"size": n, "time_s": common.median_spread(
            _gpu_samples(lambda: cupy.matmul(a, b, out=c), sync, repeats))}
        if key == "gemm":  # what the tiled DAG does: operands from the host, the result back there
            a_host, b_host = cupy.asnumpy(a), cupy.asnumpy(b)
            out["gemm_with_transfers"] = {"size": n, "time_s": common.median_spread(_gpu_samples(
                lambda: cupy.asnumpy(cupy.matmul(cupy.asarray(a_host), cupy.asarray(b_host))), sync, repeats))}
        del a, b, c
    cupy.get_default_memory_pool().free_all_blocks()
    return out
