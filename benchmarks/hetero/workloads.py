"""The hetero scenario's workloads: the tiled GEMM DAG, the two layer training steps, one GEMM task."""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Mapping

import numpy as np

from benchmarks import common
from benchmarks.hetero.config import CHECK_ROWS


def layer_cases(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The two layers as ``layers_bench.Case`` objects: ``{"tt": ..., "tucker": ...}``."""
    from benchmarks import layers_bench
    from lotus_rt import TTLinear, TuckerConv2d

    tt, tk = cfg["tt"], cfg["tucker"]
    n_in = math.prod(tt["in_shape"])
    return {
        "tt": layers_bench.Case(
            "tt_linear", f"TTLinear {n_in}->{math.prod(tt['out_shape'])} "
            f"({'x'.join(map(str, tt['in_shape']))}), TT-ranks {tt['rank']}",
            lambda: TTLinear(tt["in_shape"], tt["out_shape"], tt["rank"]), (tt["batch"], n_in)),
        "tucker": layers_bench.Case(
            "tucker2_conv", f"TuckerConv2d {tk['in_channels']}->{tk['out_channels']}, {tk['kernel']}x"
            f"{tk['kernel']}, pad {tk['kernel'] // 2}, ranks {tuple(tk['ranks'])}, {tk['image']}x{tk['image']} images",
            lambda: TuckerConv2d(tk["in_channels"], tk["out_channels"], tk["kernel"], tuple(tk["ranks"]),
                                 padding=tk["kernel"] // 2),
            (tk["batch"], tk["in_channels"], tk["image"], tk["image"])),
    }


def layer_workload(case, steps: int, check_batch: int, tol: float) -> common.Workload:
    """``steps`` training steps of the offloaded layer per call; checked against torch eager (the
    same factors) on the first ``check_batch`` samples."""
    import torch

    import lotus_rt
    from benchmarks import layers_bench

    torch.manual_seed(0)
    reference = case.make()
    layer = lotus_rt.offload(copy.deepcopy(reference))
    x = torch.randn(case.input_shape, requires_grad=True)
    with torch.no_grad():
        out_shape = tuple(reference(x[:1]).shape[1:])
    weights = torch.randn((case.input_shape[0], *out_shape))
    x_check = x[:check_batch].detach().clone().requires_grad_(True)
    w_check = weights[:check_batch].clone()

    return common.Workload(
        case.name, {"description": case.description, "input_shape": list(case.input_shape),
                    "steps_per_call": steps, "check_batch": x_check.shape[0], "dtype": "float32"},
        0, lambda: layers_bench._time_steps(layer, x, weights, steps),
        lambda: layers_bench.max_rel_error(layer, reference, x_check, w_check), tol)


def single_gemm(rt, size: int, dtype: str, repeats: int, tol: float, warmup: int = 2) -> dict[str, Any]:
    """One GEMM task (``lotus_rt.workloads.GEMM``, ``size`` square) submitted and waited for,
    ``warmup + repeats`` times on the same registered operands: after the first call A and B are
    on the GPU and C stays there (written, never read) until the end, so the timed calls are
    the codelet and StarPU's per-task cost, not the bus. Also the task's own duration as StarPU's
    profiling recorded it."""
    from lotus_rt.workloads import GEMM

    rng = np.random.default_rng(1)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    c = np.zeros_like(a)
    ha, hb, hc = rt.register(a), rt.register(b), rt.register(c)
    wall, task_s, kinds = [], [], set()
    try:
        for k in range(warmup + repeats):
            rt.trace(clear=True)
            start = time.perf_counter()
            rt.submit(GEMM, (ha, "R"), (hb, "R"), (hc, "W"), name="gemm_single", precision=rt.settings.precision)
            rt.wait()
            elapsed = time.perf_counter() - start
            records = [r for r in rt.trace() if r.name == "gemm_single"]
            if k >= warmup:
                wall.append(elapsed)
                if records:
                    task_s.append(records[-1].end_s - records[-1].start_s)
            kinds.update(r.kind for r in records)
    finally:
        for h in (ha, hb, hc):
            h.unregister()
    rows = min(CHECK_ROWS, size)
    error = common.rel_error(c[:rows], a[:rows].astype(np.float64) @ b.astype(np.float64))
    time_s = common.median_spread(wall)
    return {"size": size, "dtype": dtype, "time_s": time_s,
            "task_s": common.median_spread(task_s) if task_s else None,
            "worker_kinds": sorted(kinds), "tflops": 2 * size ** 3 / time_s["median"] / 1e12,
            "max_rel_error": error, "tolerance": tol}
