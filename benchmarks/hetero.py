"""Heterogeneous benchmark: StarPU policies x worker mixes (CPUs, one GPU, both) on three workloads.

What it measures. Three workloads, each in every (policy, worker mix) pair: a tiled GEMM DAG
(``lotus_rt.workloads.gemm_dag``, float32 8192², tiles of 1024: 512 tasks), one training step
of an offloaded ``TTLinear`` (4096 -> 4096 as 8x8x8x8, TT-ranks 16, batch 1024) and one of an
offloaded ``TuckerConv2d`` (128 -> 256, 3x3, ranks (64, 128), 32x32 images, batch 64); a step
is built and timed with ``benchmarks.layers_bench``'s helpers. Policies: dmda, dmdas, eager,
ws, lws. Mixes (environment of the process): ``cpu`` STARPU_NCUDA=0; ``gpu`` STARPU_NCPU=0
STARPU_NCUDA=1; ``hybrid`` STARPU_NCUDA=1 (StarPU's CPU workers plus one CUDA worker). The
reference for every number is the *best single device* of its workload: the fastest median of
the cpu and gpu mixes over all policies; speed-up = that time / the run's time (> 1: faster
than the best single device). Also measured: a single-task GEMM (8192², one task on the CUDA
worker of the gpu mix, operands already on the GPU after the warm-up) against a bare
``cupy.matmul`` in the same precision, and torch eager on the same GPU (``torch.matmul``,
``cupy.matmul`` with and without host transfers, the two layer steps on ``torch.cuda``,
synchronized) as references.

How. StarPU reads its settings once, so each (policy, mix) runs in its own process
(``benchmarks.worker.run_worker`` starting ``python -m benchmarks.hetero --child SPEC``), one
after the other. Each mix has its own STARPU_HOME and STARPU_PERF_MODEL_DIR under
``DIR/hetero[_quick]_starpu/<mix>/`` (emptied at the start of an invocation, then kept): the
history-based models persist from one policy's process to the next within a mix and never touch
the user's. Before the timed processes, one untimed ``dmda`` process per mix with
STARPU_CALIBRATE=1 runs every workload a few times, so dmda and dmdas are not timed while
calibrating; StarPU's bus calibration, done once by a first probe process, is copied into each
mix's folder. Processes run policy by policy (the calibrations first, then dmda in every mix,
then dmdas, ...), so a run cut short by ``--budget-s`` still holds whole rows of the policies the
targets are about. In each process, per workload: a correctness check (the GEMM against float64
NumPy on some rows of every tile row, the layers' outputs and gradients against torch eager on a
sub-batch), warm-up, then ``--repeats`` timed calls (medians, min, max: ``common.median_spread``);
tasks per worker kind are counted from ``lotus_rt.stats()`` over the timed calls and from the
trace of the last one. In the ``--gantt`` run (default hybrid:dmda) the last call of each
workload is exported with ``lotus_rt.tracing.export``: a per-worker Gantt chart of the GEMM at
``DIR/hetero[_quick]_gantt.png``, Chrome traces and the layers' charts under
``DIR/hetero[_quick]_traces/``. The GPU precision of float32 GEMMs (LOTUS_PRECISION, resolved for
the GPU's compute capability) is recorded and the cupy/torch references use the same one
(CUPY_TF32=1 and torch's allow_tf32 for tf32, float16 operands for fp16; none exists for bf16).

Mixes that need a CUDA worker are skipped, with the reason, where StarPU was built without
CUDA, started no CUDA worker, or CuPy (the CUDA codelet bodies) sees no GPU; the torch and cupy
references are skipped, with the reason, where torch or CuPy sees no GPU. On a CPU-only machine
the scenario therefore runs the cpu mix alone and succeeds.

Targets (printed as met / missed / not measured from the numbers): the GEMM codelet at large
sizes >= 0.9x a bare cupy.matmul in the same precision; hybrid dmda >= 1.0x the best single
device on every workload, and > 1.1x where the workload is *balanced*: where a perfect split
between the two devices would gain at least 25% (ideal speed-up 1 + t_fast / t_slow >= 1.25,
i.e. the slower device within 4x of the faster), which is this benchmark's definition.

    python -m benchmarks hetero [--quick] [--out DIR] [--policies dmda,eager] [--mixes cpu,hybrid]
                                [--budget-s S] [--gantt MIX:POLICY]

Writes ``DIR/hetero[_quick].json`` (rewritten after every process, ``complete`` false until the
end), ``DIR/hetero[_quick].png`` (speed-ups) and the Gantt chart. Exit status 1 when a run failed
or a result disagrees with its reference, 2 without the StarPU binding.

Status: written and run on a 2-core CPU machine (cpu mix only). UNVERIFIED: everything that
needs a GPU (the gpu and hybrid mixes, the single-task GEMM, the cupy/torch references, the
precision matching, the Gantt chart of a hybrid run) has never run; the default sizes were
chosen from CPU measurements and FLOP estimates for an H100 with 16 cores (see
benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Callable, Mapping, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks import common, worker  # noqa: E402

SCENARIO = "hetero"
POLICIES = ("dmda", "dmdas", "eager", "ws", "lws")  # model-based first: the targets are about dmda
QUICK_POLICIES = ("dmda", "eager")
MODEL_POLICIES = ("dmda", "dmdas")  # read the history-based models: calibrated first
CALIBRATION_POLICY = "dmda"
MIXES: dict[str, dict[str, str]] = {
    "cpu": {"STARPU_NCUDA": "0"},
    "gpu": {"STARPU_NCPU": "0", "STARPU_NCUDA": "1"},
    "hybrid": {"STARPU_NCUDA": "1"},
}
SINGLE_DEVICE = ("cpu", "gpu")
WORKLOADS = ("gemm", "tt", "tucker")
# inherited settings a mix must not pick up from the caller's environment (STARPU_NCPU is left to
# the caller: it bounds the CPU workers of the cpu and hybrid mixes)
CLEARED_VARS = ("STARPU_SCHED", "STARPU_CALIBRATE", "STARPU_NCUDA", "STARPU_PERF_MODEL_DIR")

GEMM_CODELET_TARGET = 0.9     # codelet time >= 0.9x cupy.matmul's speed
HYBRID_FLOOR = 1.0            # hybrid dmda vs best single device, every workload
HYBRID_BALANCED_TARGET = 1.1  # ... where balanced
BALANCED_IDEAL = 1.25         # balanced: a perfect split would gain >= 25%
CHECK_ROWS = 64               # GEMM rows checked against float64 NumPy
LAYER_CHAIN = 8               # a layer step's error allowance, in single-GEMM tolerances

FULL = {
    "gemm": {"size": 8192, "tile": 1024, "dtype": "float32"},
    "single_gemm": {"size": 8192, "dtype": "float32", "repeats": 5},
    "tt": {"in_shape": [8, 8, 8, 8], "out_shape": [8, 8, 8, 8], "rank": 16, "batch": 1024, "check_batch": 64},
    "tucker": {"in_channels": 128, "out_channels": 256, "kernel": 3, "ranks": [64, 128], "image": 32,
               "batch": 64, "check_batch": 8},
    "steps": 3, "repeats": 3, "calibration_repeats": 2, "reference_repeats": 5, "timeout": 150.0,
}
QUICK = {
    "gemm": {"size": 256, "tile": 128, "dtype": "float32"},
    "single_gemm": {"size": 512, "dtype": "float32", "repeats": 3},
    "tt": {"in_shape": [4, 4, 4], "out_shape": [4, 4, 4], "rank": 4, "batch": 16, "check_batch": 16},
    "tucker": {"in_channels": 8, "out_channels": 16, "kernel": 3, "ranks": [4, 8], "image": 8,
               "batch": 8, "check_batch": 8},
    "steps": 1, "repeats": 2, "calibration_repeats": 1, "reference_repeats": 3, "timeout": 90.0,
}


# ---------------------------------------------------------------------------------- GPU facts

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
        configured = precision.configured()
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


# ---------------------------------------------------------------------------------- workloads

def gemm_workload(rt, size: int, tile: int, dtype: str, tol: float, seed: int = 0) -> common.Workload:
    """C = A @ B (``size`` square, ``dtype``) as the tiled DAG of ``lotus_rt.workloads``.

    Timed: registering the tiles, submitting, running, unregistering (``gemm_dag``). The check
    compares the first rows of every tile row of C with float64 NumPy (a full float64 product
    at 8192² would take longer than the whole benchmark)."""
    from lotus_rt.workloads import gemm_dag, split_tiles

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    a_tiles, b_tiles = split_tiles(a, tile), split_tiles(b, tile)
    nt = math.ceil(size / tile)
    per_row = max(1, CHECK_ROWS // nt)

    def call() -> float:
        start = time.perf_counter()
        gemm_dag(rt, a_tiles, b_tiles)
        return time.perf_counter() - start

    def error() -> float:
        c_tiles = gemm_dag(rt, a_tiles, b_tiles)
        rows = [i * tile + r for i in range(nt) for r in range(min(per_row, len(c_tiles[i][0])))]
        got = np.concatenate([np.concatenate(row, axis=1)[:per_row] for row in c_tiles])
        return common.rel_error(got, a[rows].astype(np.float64) @ b.astype(np.float64))

    return common.Workload(f"gemm{size}_t{tile}_{dtype}", {"size": size, "tile": tile, "dtype": dtype},
                           nt ** 3, call, error, tol)


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


# ---------------------------------------------------------------------------------- child side

def _by_kind(stats: Sequence[Any], field: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in stats:
        out[s.kind] = out.get(s.kind, 0) + getattr(s, field)
    return out


def time_workload(rt, w: common.Workload, repeats: int, warmup: int,
                  export: Callable[[list], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Check, warm up (``warmup`` calls counting the check), time ``repeats`` calls. Tasks and
    busy time per worker kind over the timed calls; the trace of the last one (``export``d)."""
    error = w.error()
    for _ in range(warmup - 1):
        w.call()
    rt.stats(reset=True)
    samples = common.interleaved({w.name: w.call}, repeats - 1)[w.name]
    rt.trace(clear=True)
    samples += common.interleaved({w.name: w.call}, 1)[w.name]
    last = rt.trace()
    stats = rt.stats()
    tasks = _by_kind(stats, "tasks")
    record = {
        "name": w.name, "params": w.params, "tasks_expected": w.tasks or None,
        "time_s": common.median_spread(samples),
        "max_rel_error": error, "tolerance": w.tolerance,
        "tasks_per_call": sum(tasks.values()) / repeats,
        "tasks_by_kind": {k: int(v) for k, v in tasks.items()},
        "busy_s_by_kind": _by_kind(stats, "busy_s"),
        "worker_tasks": {s.worker: s.tasks for s in stats},
        "last_call_tasks_by_kind": {k: sum(r.kind == k for r in last) for k in sorted({r.kind for r in last})},
    }
    if export is not None:
        record["trace"] = export(last)
    return record


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
            rt.submit(GEMM, (ha, "R"), (hb, "R"), (hc, "W"), name="gemm_single")
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


def _trace_exporter(rt, spec: Mapping[str, Any], kind: str) -> Callable[[list], dict[str, Any]] | None:
    """Writes the last call's trace: Chrome JSON (and a Gantt PNG) under the traces folder; the
    GEMM's Gantt chart also at the scenario's Gantt path."""
    trace = spec.get("trace")
    if not trace:
        return None
    from lotus_rt import tracing

    def export(records: list) -> dict[str, Any]:
        if not records:
            return {"note": "no task records (LOTUS_TRACE=0?)"}
        folder = pathlib.Path(trace["dir"])
        folder.mkdir(parents=True, exist_ok=True)
        names = [name for _, name in rt.workers]
        stem = f"{spec['mix']}_{spec['policy']}_{kind}"
        written = {"json": str(tracing.export(records, names, folder / f"{stem}.json"))}
        png = pathlib.Path(trace["gantt_png"]) if kind == "gemm" else folder / f"{stem}.png"
        title = (f"{kind}: one call, {spec['policy']} on the {spec['mix']} mix "
                 f"({len(records)} tasks, {len(names)} workers)")
        try:
            written["png"] = str(tracing.export(records, names, png, title=title))
        except ImportError as exc:  # matplotlib missing: the Chrome trace is still there
            written["png_error"] = str(exc)
        return written

    return export


def _child_run(spec: Mapping[str, Any]) -> dict[str, Any]:
    import lotus_rt

    rt = lotus_rt.runtime()
    has_cuda = any(kind == "cuda" for kind, _ in rt.workers)
    precision = spec.get("gpu_precision") if has_cuda else None
    environment = common.environment(rt)
    environment["lotus_precision"] = gpu_precision(spec.get("compute_capability")) if has_cuda else {}
    out: dict[str, Any] = {"environment": environment, "workloads": {}, "worker_tasks": {}}
    cases = layer_cases(spec)
    for kind in spec["workloads"]:
        if kind == "gemm":
            g = spec["gemm"]
            w = gemm_workload(rt, g["size"], g["tile"], g["dtype"], tolerance(g["dtype"], precision))
            warmup = 1  # the check is a full call
        else:
            w = layer_workload(cases[kind], spec["steps"], spec[kind]["check_batch"],
                               tolerance("float32", precision, LAYER_CHAIN))
            warmup = 2  # the check ran a sub-batch: one more untimed full call
        record = time_workload(rt, w, spec["repeats"], warmup, _trace_exporter(rt, spec, kind))
        out["workloads"][kind] = record
        for name, n in record.pop("worker_tasks").items():
            out["worker_tasks"][name] = out["worker_tasks"].get(name, 0) + n
        del w
    if spec.get("single_gemm"):
        s = spec["single_gemm"]
        out["single_gemm"] = single_gemm(rt, s["size"], s["dtype"], s["repeats"], tolerance(s["dtype"], precision))
    return out


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


def _child_reference(spec: Mapping[str, Any]) -> dict[str, Any]:
    """torch eager and cupy on the GPU, no StarPU: the references of the workloads."""
    precision = spec.get("gpu_precision")
    out: dict[str, Any] = {"environment": common.environment(None), "gpu_precision": precision,
                           "torch": None, "cupy": None, "skipped": []}
    facts = gpu_facts()
    for name, ok, reason, run in (("torch", facts["torch_cuda"], facts["torch_reason"], _torch_references),
                                  ("cupy", facts["cupy_devices"] > 0, facts["cupy_reason"], _cupy_references)):
        if not ok:
            out["skipped"].append({"reference": name, "reason": reason})
            continue
        try:
            out[name] = run(spec, precision)
        except Exception as exc:  # noqa: BLE001 - one reference failing must not lose the other
            out["skipped"].append({"reference": name, "reason": f"failed: {type(exc).__name__}: {exc}"})
    return out


def _child_probe(spec: Mapping[str, Any]) -> dict[str, Any]:
    import lotus_rt

    rt = lotus_rt.runtime()
    return {"workers": [list(w) for w in rt.workers], "policy": rt.policy, "engine": rt.engine}


def child_main(spec_json: str) -> int:
    """Entry of one child process: run the spec's role, print one BENCH_RESULT line."""
    spec = json.loads(spec_json)
    role = spec["role"]
    result = {"probe": _child_probe, "run": _child_run, "reference": _child_reference}[role](spec)
    print(worker.MARKER + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------- parent side

def configuration(args: argparse.Namespace) -> dict[str, Any]:
    cfg = copy.deepcopy(QUICK if args.quick else FULL)
    if args.gemm_size:
        cfg["gemm"]["size"] = args.gemm_size
    if args.gemm_tile:
        cfg["gemm"]["tile"] = args.gemm_tile
    if args.dtype:
        cfg["gemm"]["dtype"] = cfg["single_gemm"]["dtype"] = args.dtype
    if args.single_size:
        cfg["single_gemm"]["size"] = args.single_size
    if args.tt_batch:
        cfg["tt"]["batch"] = args.tt_batch
        cfg["tt"]["check_batch"] = min(cfg["tt"]["check_batch"], args.tt_batch)
    if args.conv_batch:
        cfg["tucker"]["batch"] = args.conv_batch
        cfg["tucker"]["check_batch"] = min(cfg["tucker"]["check_batch"], args.conv_batch)
    for key in ("repeats", "steps"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    if args.timeout:
        cfg["timeout"] = args.timeout
    return cfg


def _split(text: str | None, default: Sequence[str], valid: Sequence[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()] if text else list(default)
    unknown = [t for t in items if t not in valid]
    if unknown:
        raise SystemExit(f"hetero: unknown {what} {', '.join(unknown)}; valid: {', '.join(valid)}")
    return items


class Session:
    """The parent's state: output paths, time budget, the JSON being built (rewritten after
    every child so a run cut short keeps what it measured)."""

    def __init__(self, args: argparse.Namespace, cfg: dict[str, Any]):
        self.args, self.cfg, self.quick = args, cfg, args.quick
        self.out = pathlib.Path(args.out)
        stem = SCENARIO + ("_quick" if self.quick else "")
        self.starpu_dir = self.out / f"{stem}_starpu"
        self.traces_dir = self.out / f"{stem}_traces"
        self.gantt_png = self.out / f"{stem}_gantt.png"
        for path in (self.starpu_dir, self.traces_dir):
            shutil.rmtree(path, ignore_errors=True)
        self.gantt_png.unlink(missing_ok=True)
        self.starpu_dir.mkdir(parents=True)
        self.start = time.perf_counter()
        self.result: dict[str, Any] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> str | None:
        budget = self.args.budget_s
        if budget is not None and self.elapsed() > budget:
            return f"time budget of {budget:g} s spent ({self.elapsed():.0f} s elapsed)"
        return None

    def home(self, name: str) -> pathlib.Path:
        return self.starpu_dir / name

    def env(self, home: str, overrides: Mapping[str, str]) -> dict[str, str]:
        self.home(home).mkdir(parents=True, exist_ok=True)
        env = common.subprocess_env(self.home(home))
        for name in CLEARED_VARS:
            env.pop(name, None)
        env["STARPU_PERF_MODEL_DIR"] = str(self.home(home) / "sampling")
        env.update(overrides)
        return env

    def child(self, home: str, overrides: Mapping[str, str], spec: Mapping[str, Any]) -> dict[str, Any]:
        """Run one child; a record with ``status`` ok (and the child's result) or failed/skipped."""
        reason = self.over_budget()
        record: dict[str, Any] = {"env": dict(overrides)}
        if reason:
            return {**record, "status": "skipped", "reason": reason, "wall_s": 0.0}
        start = time.perf_counter()
        try:
            result = worker.run_worker(self.env(home, overrides), spec, self.cfg["timeout"],
                                       module="benchmarks.hetero", args=("--child",))
            record.update(status="ok", **result)
        except worker.WorkerFailed as exc:
            record.update(status="failed", reason=str(exc))
        record["wall_s"] = time.perf_counter() - start
        return record

    def save(self, complete: bool = False) -> pathlib.Path:
        self.result["complete"] = complete
        self.result["elapsed_s"] = self.elapsed()
        return common.write_result(self.out, SCENARIO, self.quick, self.result)


def probe_cuda(session: Session, facts: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(probe record, why no CUDA worker can run here or None). Starts StarPU with one CUDA
    worker in a child only where it could have one; that child also calibrates the bus."""
    from lotus_rt import starpu

    if not starpu.built_with_cuda():
        return {"ran": False}, f"StarPU {starpu.version()} was built without CUDA support: no CUDA worker"
    if not facts["cupy_devices"]:
        return {"ran": False}, facts["cupy_reason"]
    record = session.child("probe", MIXES["hybrid"], {"role": "probe"})
    if record["status"] != "ok":
        return record, f"the probe process (STARPU_NCUDA=1) failed: {record.get('reason')}"
    ncuda = sum(kind == "cuda" for kind, _ in record["workers"])
    if not ncuda:
        return record, "StarPU started no CUDA worker with STARPU_NCUDA=1"
    return record, None


def copy_bus_calibration(session: Session, mixes: Sequence[str]) -> None:
    bus = session.home("probe") / "sampling" / "bus"
    if bus.is_dir():
        for mix in mixes:
            shutil.copytree(bus, session.home(mix) / "sampling" / "bus", dirs_exist_ok=True)


def base_spec(cfg: Mapping[str, Any], facts: Mapping[str, Any], precision: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("gemm", "single_gemm", "tt", "tucker", "steps", "repeats", "reference_repeats")
    return {**{k: cfg[k] for k in keys}, "workloads": list(WORKLOADS),
            "gpu_precision": precision.get("resolved"), "compute_capability": facts["compute_capability"]}


def run_label(run: Mapping[str, Any]) -> str:
    return f"{run['policy']} on {run['mix']}"


def tasks_per_unit(w: Mapping[str, Any]) -> dict[str, float]:
    """Tasks per worker kind of one timed unit: a GEMM call, or one training step of a layer."""
    units = len(w["time_s"]["samples"]) * w["params"].get("steps_per_call", 1)
    return {k: v / units for k, v in sorted(w["tasks_by_kind"].items())}


def _summary_line(run: Mapping[str, Any]) -> str:
    if run["status"] != "ok":
        return f"{run['status'].upper()} ({run.get('reason')})"
    parts = []
    for kind, w in run["workloads"].items():
        tasks = "/".join(f"{k} {v:.0f}" for k, v in sorted(tasks_per_unit(w).items())) or "-"
        parts.append(f"{kind} {w['time_s']['median'] * 1e3:.1f} ms [{tasks}]")
    return ", ".join(parts)


def measure_all(session: Session, policies: Sequence[str], mixes: Sequence[str], spec: Mapping[str, Any],
                gantt: tuple[str, str] | None) -> None:
    """Calibrations, then every (policy, mix) run, policy by policy; fills session.result."""
    result = session.result
    if any(p in MODEL_POLICIES for p in policies):
        for mix in mixes:
            cal_spec = {**spec, "role": "run", "mix": mix, "policy": CALIBRATION_POLICY,
                        "repeats": session.cfg["calibration_repeats"], "single_gemm": None}
            record = session.child(mix, {**MIXES[mix], "STARPU_SCHED": CALIBRATION_POLICY,
                                         "STARPU_CALIBRATE": "1"}, cal_spec)
            record.update(mix=mix, policy=CALIBRATION_POLICY)
            record.pop("environment", None)
            result["calibration"].append(record)
            print(f"  calibration ({CALIBRATION_POLICY}, STARPU_CALIBRATE=1) on {mix:<6} "
                  f"{record['status']} in {record['wall_s']:.1f} s"
                  + (f": {record.get('reason')}" if record["status"] != "ok" else ""), flush=True)
            session.save()
    single_pending = "gpu" in mixes
    for policy in policies:
        for mix in mixes:
            run_spec = {**spec, "role": "run", "mix": mix, "policy": policy,
                        "single_gemm": spec["single_gemm"] if (mix == "gpu" and single_pending) else None}
            if gantt == (mix, policy):
                run_spec["trace"] = {"dir": str(session.traces_dir), "gantt_png": str(session.gantt_png)}
            record = session.child(mix, {**MIXES[mix], "STARPU_SCHED": policy}, run_spec)
            record.update(mix=mix, policy=policy)
            if record["status"] == "ok" and record.get("single_gemm"):
                single_pending = False
                result["single_gemm"] = {**record.pop("single_gemm"), "run": run_label(record)}
            result["runs"].append(record)
            print(f"  {policy:<6} {mix:<6} {record['wall_s']:5.1f} s  {_summary_line(record)}", flush=True)
            session.save()


def run_references(session: Session, spec: Mapping[str, Any], facts: Mapping[str, Any],
                   precision: Mapping[str, Any]) -> None:
    result = session.result
    if not facts["torch_cuda"] and not facts["cupy_devices"]:
        for name, reason in (("torch", facts["torch_reason"]), ("cupy", facts["cupy_reason"])):
            result["skipped"].append({"reference": name, "reason": reason})
        return
    overrides = {"LOTUS_ENGINE": "inline"}  # no StarPU in the reference process
    if precision.get("resolved") == "tf32":
        overrides["CUPY_TF32"] = "1"
    record = session.child("reference", overrides, {**spec, "role": "reference"})
    if record["status"] != "ok":
        for name in ("torch", "cupy"):
            result["skipped"].append({"reference": name, "reason": f"reference process {record['status']}: "
                                                                   f"{record.get('reason')}"})
        return
    result["skipped"].extend(record.pop("skipped"))
    result["references"] = {k: record.get(k) for k in ("torch", "cupy", "gpu_precision", "wall_s", "env")}
    print(f"  references (torch eager / cupy on the GPU) in {record['wall_s']:.1f} s", flush=True)
    session.save()


# ---------------------------------------------------------------------------------- analysis

def reference_times(references: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """workload -> {reference label: median_spread} of the GPU references that ran."""
    out: dict[str, dict[str, Any]] = {kind: {} for kind in WORKLOADS}
    if not references:
        return out
    torch_ref, cupy_ref = references.get("torch") or {}, references.get("cupy") or {}
    if "gemm" in torch_ref:
        out["gemm"]["torch.matmul (GPU)"] = torch_ref["gemm"]["time_s"]
    if "gemm" in cupy_ref:
        out["gemm"]["cupy.matmul (GPU)"] = cupy_ref["gemm"]["time_s"]
        out["gemm"]["cupy.matmul + transfers"] = cupy_ref["gemm_with_transfers"]["time_s"]
    for kind in ("tt", "tucker"):
        if kind in torch_ref:  # per training step, as the offloaded layers' times are
            out[kind]["torch eager (GPU)"] = torch_ref[kind]["time_s"]
    return out


def _ratio_spread(best: float, t: Mapping[str, Any]) -> dict[str, Any]:
    """best / time as a spread: the median is best / median time (min from the slowest call)."""
    return {"median": best / t["median"], "min": best / t["max"], "max": best / t["min"],
            "samples": [best / s for s in t["samples"]]}


def analyse(result: dict[str, Any]) -> None:
    """Adds ``best_single``, ``balance``, ``summary`` and ``targets`` to ``result``."""
    ok = [r for r in result["runs"] if r["status"] == "ok"]
    refs = reference_times(result.get("references"))
    best_single, balance, summary = {}, {}, []
    for kind in WORKLOADS:
        per_mix: dict[str, tuple[float, str]] = {}
        for r in ok:
            if kind in r["workloads"] and r["mix"] in SINGLE_DEVICE:
                t = r["workloads"][kind]["time_s"]["median"]
                if r["mix"] not in per_mix or t < per_mix[r["mix"]][0]:
                    per_mix[r["mix"]] = (t, r["policy"])
        if not per_mix:
            continue
        best_mix = min(per_mix, key=lambda m: per_mix[m][0])
        best = per_mix[best_mix][0]
        best_single[kind] = {"mix": best_mix, "policy": per_mix[best_mix][1], "median_s": best}
        if len(per_mix) == 2:
            fast, slow = sorted(t for t, _ in per_mix.values())
            ideal = 1 + fast / slow
            balance[kind] = {"cpu_best_s": per_mix["cpu"][0], "gpu_best_s": per_mix["gpu"][0],
                             "ideal_hybrid_speedup": ideal, "balanced": ideal >= BALANCED_IDEAL}
        for r in ok:
            if kind not in r["workloads"]:
                continue
            w = r["workloads"][kind]
            t = w["time_s"]
            summary.append({"workload": kind, "policy": r["policy"], "mix": r["mix"], "median_ms": t["median"] * 1e3,
                            "min_ms": t["min"] * 1e3, "max_ms": t["max"] * 1e3, "speedup": best / t["median"],
                            "speedup_spread": _ratio_spread(best, t),
                            "tasks_per_call_by_kind": tasks_per_unit(w)})
        for label, t in refs[kind].items():
            summary.append({"workload": kind, "policy": label, "mix": "reference", "median_ms": t["median"] * 1e3,
                            "min_ms": t["min"] * 1e3, "max_ms": t["max"] * 1e3, "speedup": best / t["median"],
                            "speedup_spread": _ratio_spread(best, t),
                            "tasks_per_call_by_kind": {}})
    result.update(best_single=best_single, balance=balance, summary=summary)
    result["targets"] = targets(result)


def _target(name: str, status: str, detail: str) -> dict[str, str]:
    return {"target": name, "status": status, "detail": detail}


def _why_not_run(result: Mapping[str, Any], mix: str, policy: str | None = None) -> str:
    for s in result["skipped"]:
        if s.get("mix") == mix and "policy" not in s:
            return f"{mix} mix skipped: {s['reason']}"
    for r in result["runs"]:
        if r["mix"] == mix and (policy is None or r["policy"] == policy) and r["status"] != "ok":
            return f"{run_label(r)} {r['status']}: {r.get('reason')}"
    if mix not in result["config"]["mixes"]:
        return f"{mix} mix not requested (--mixes)"
    if policy and policy not in result["config"]["policies"]:
        return f"{policy} not requested (--policies)"
    return f"no {mix} measurement"


def targets(result: Mapping[str, Any]) -> list[dict[str, str]]:
    """The issue's targets, each met / missed / not measured / not applicable, from the numbers."""
    out = []
    name = f"GEMM codelet at large sizes >= {GEMM_CODELET_TARGET}x a bare cupy.matmul in the same precision"
    single = result.get("single_gemm")
    cupy_ref = ((result.get("references") or {}).get("cupy") or {}).get("single_gemm")
    precision = result["config"]["gpu_precision"].get("resolved") or "the dtype's own (no LOTUS_PRECISION here)"
    if single and cupy_ref:
        ratio = cupy_ref["time_s"]["median"] / single["time_s"]["median"]
        out.append(_target(name, "met" if ratio >= GEMM_CODELET_TARGET else "missed",
                           f"{ratio:.2f}x: codelet {single['time_s']['median'] * 1e3:.2f} ms "
                           f"({single['tflops']:.1f} TFLOP/s), cupy.matmul {cupy_ref['time_s']['median'] * 1e3:.2f} ms, "
                           f"{single['size']}² {single['dtype']}, GPU precision {precision}"))
    else:
        why = [] if single else [_why_not_run(result, "gpu")]
        if not cupy_ref:
            why += [s["reason"] for s in result["skipped"] if s.get("reference") == "cupy"] or ["no cupy reference"]
        out.append(_target(name, "not measured", "; ".join(why)))

    rows = {(r["workload"], r["policy"], r["mix"]): r for r in result["summary"]}
    hybrid = {k: rows.get((k, "dmda", "hybrid")) for k in WORKLOADS}
    name = f"hybrid dmda >= {HYBRID_FLOOR}x best single device on every workload"
    detail = ", ".join(f"{k} {r['speedup']:.2f}x" for k, r in hybrid.items() if r is not None)
    missing = [k for k in WORKLOADS if hybrid[k] is None or k not in result["balance"]]
    if missing:  # a speed-up needs the hybrid run and both single devices
        why = [f"missing for {', '.join(missing)}"]
        if any(hybrid[k] is None for k in missing):
            why.append(_why_not_run(result, "hybrid", "dmda"))
        for mix in SINGLE_DEVICE:
            if any(not any(r["workload"] == k and r["mix"] == mix for r in result["summary"]) for k in missing):
                why.append(_why_not_run(result, mix))
        out.append(_target(name, "not measured", "; ".join(filter(None, [detail] + why))))
    else:
        met = all(r["speedup"] >= HYBRID_FLOOR for r in hybrid.values())
        out.append(_target(name, "met" if met else "missed", detail))

    name = f"hybrid dmda > {HYBRID_BALANCED_TARGET}x best single device where balanced " \
           f"(ideal hybrid speed-up >= {BALANCED_IDEAL})"
    balanced = [k for k, b in result["balance"].items() if b["balanced"]]
    ideal = ", ".join(f"{k} ideal {b['ideal_hybrid_speedup']:.2f}x" for k, b in result["balance"].items())
    if missing:
        out.append(_target(name, "not measured", out[-1]["detail"]))
    elif not balanced:
        out.append(_target(name, "not applicable", f"no balanced workload ({ideal})"))
    else:
        met = all(hybrid[k]["speedup"] > HYBRID_BALANCED_TARGET for k in balanced)
        out.append(_target(name, "met" if met else "missed",
                           ", ".join(f"{k} {hybrid[k]['speedup']:.2f}x" for k in balanced) + f" ({ideal})"))
    return out


# ---------------------------------------------------------------------------------- output

def plot(result: Mapping[str, Any], path: pathlib.Path) -> None:
    kinds = [k for k in WORKLOADS if k in result["best_single"]]
    policies = result["config"]["policies"]
    mixes = [m for m in result["config"]["mixes"] if any(r["mix"] == m for r in result["summary"])]
    rows = {(r["workload"], r["policy"], r["mix"]): r for r in result["summary"]}
    empty = {"median": 0.0, "min": 0.0, "max": 0.0}
    fig, axes = common.figure(len(kinds), width=5.2, height=4.4)
    for ax, kind in zip(axes, kinds):
        series = {mix: [rows[kind, p, mix]["speedup_spread"] if (kind, p, mix) in rows else empty
                        for p in policies] for mix in mixes}
        best = result["best_single"][kind]
        common.speedup_bars(ax, policies, series, ylabel="speed-up vs best single device (> 1: faster)",
                            title=f"{kind}: best single = {best['mix']} {best['policy']} "
                                  f"{best['median_s'] * 1e3:.1f} ms", legend_title="mix")
        for k, r in enumerate(r for r in result["summary"] if r["workload"] == kind and r["mix"] == "reference"):
            ax.axhline(r["speedup"], linestyle=":", linewidth=1.0, color=f"C{k + 4}", label=r["policy"])
        ax.legend(fontsize=7)
    env = result["environment"]
    gpu = env["gpu"]["name"] or "no GPU"
    common.save(fig, path, f"hetero: StarPU {env['starpu_version']} policies x worker mixes; {gpu}, "
                           f"{env['cpu_count']} cores ({env['date']}, {env['hostname']})")


def print_report(result: Mapping[str, Any]) -> None:
    print("per call (GEMM: one C = A @ B; layers: one training step): median, min-max, speed-up vs the best "
          "single device's median, tasks per worker kind")
    print(f"{'workload':<8} {'policy':<24} {'mix':<9} {'median ms':>10} {'min-max ms':>19} "
          f"{'speed-up':>9}  tasks/call by kind")
    for r in result["summary"]:
        tasks = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["tasks_per_call_by_kind"].items())) or "-"
        print(f"{r['workload']:<8} {r['policy']:<24} {r['mix']:<9} {r['median_ms']:>10.2f} "
              f"{r['min_ms']:>9.2f}-{r['max_ms']:<9.2f} {r['speedup']:>8.2f}x  {tasks}")
    for kind, b in result["best_single"].items():
        bal = result["balance"].get(kind)
        extra = f"; ideal hybrid {bal['ideal_hybrid_speedup']:.2f}x ({'balanced' if bal['balanced'] else 'unbalanced'})" \
            if bal else ""
        print(f"best single device for {kind}: {b['mix']} {b['policy']} {b['median_s'] * 1e3:.2f} ms{extra}")
    if result.get("single_gemm"):
        s = result["single_gemm"]
        print(f"single-task GEMM {s['size']}² {s['dtype']} ({s['run']}, on {'+'.join(s['worker_kinds'])}): "
              f"{s['time_s']['median'] * 1e3:.2f} ms, {s['tflops']:.1f} TFLOP/s")
    for s in result["skipped"]:
        if "mix" in s:
            what = f"mix {s['mix']}"
        elif "reference" in s:
            what = f"reference {s['reference']}"
        else:
            what = f"{s['policy']} on {s['run_mix']}"
        print(f"skipped {what}: {s['reason']}")
    print("targets:")
    for t in result["targets"]:
        print(f"  [{t['status']}] {t['target']}: {t['detail']}")


def error_checks(result: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    checks = []
    for r in list(result["runs"]) + list(result["calibration"]):
        if r["status"] == "ok":
            checks += [(f"{run_label(r)} {k}", w["max_rel_error"], w["tolerance"]) for k, w in r["workloads"].items()]
    if result.get("single_gemm"):
        s = result["single_gemm"]
        checks.append((f"single-task GEMM ({s['run']})", s["max_rel_error"], s["tolerance"]))
    return checks


def main(argv: list[str] | None = None) -> int:
    p = common.parser(SCENARIO, __doc__.splitlines()[0])
    p.add_argument("--policies", default=None,
                   help=f"comma-separated (default {','.join(POLICIES)}; {','.join(QUICK_POLICIES)} with --quick)")
    p.add_argument("--mixes", default=None, help=f"comma-separated subset of {','.join(MIXES)} (default: all)")
    p.add_argument("--gemm-size", type=int, default=None, help=f"tiled GEMM size (default {FULL['gemm']['size']})")
    p.add_argument("--gemm-tile", type=int, default=None, help=f"tiled GEMM tile (default {FULL['gemm']['tile']})")
    p.add_argument("--single-size", type=int, default=None,
                   help=f"single-task GEMM size (default {FULL['single_gemm']['size']})")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None, help="GEMM dtype (default float32)")
    p.add_argument("--tt-batch", type=int, default=None, help=f"TT layer batch (default {FULL['tt']['batch']})")
    p.add_argument("--conv-batch", type=int, default=None,
                   help=f"Tucker conv batch (default {FULL['tucker']['batch']})")
    p.add_argument("--repeats", type=int, default=None, help=f"timed calls per workload (default {FULL['repeats']})")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per layer call (default {FULL['steps']})")
    p.add_argument("--timeout", type=float, default=None,
                   help=f"seconds allowed per process (default {FULL['timeout']:g}; {QUICK['timeout']:g} with --quick)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no process after this many seconds: the rest is recorded as skipped")
    p.add_argument("--gantt", default="hybrid:dmda", metavar="MIX:POLICY",
                   help="the run whose last call per workload is traced (default hybrid:dmda; 'none': no trace)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one child process
    args = p.parse_args(argv)
    if args.child is not None:
        return child_main(args.child)

    from lotus_rt import config, starpu
    if not starpu.available():
        print("hetero: the StarPU binding is unavailable; this scenario needs StarPU", file=sys.stderr)
        return 2
    offered = config.usable_policies(starpu.policies(), starpu.version())
    policies = _split(args.policies, QUICK_POLICIES if args.quick else POLICIES, offered, "policies")
    mixes = _split(args.mixes, list(MIXES), list(MIXES), "mixes")
    gantt = None
    if args.gantt != "none":
        mix, _, policy = args.gantt.partition(":")
        if mix not in MIXES or not policy:
            raise SystemExit(f"hetero: --gantt {args.gantt!r}: expected MIX:POLICY with MIX one of {', '.join(MIXES)}")
        gantt = (mix, policy)
    cfg = configuration(args)
    session = Session(args, cfg)
    facts = gpu_facts()
    precision = gpu_precision(facts["compute_capability"])
    environment = common.environment(None)
    environment.update(engine="starpu", policy=f"varied (STARPU_SCHED): {', '.join(policies)}", gpu=facts,
                       lotus_precision=precision)
    result = session.result
    result.update({
        "scenario": SCENARIO, "quick": args.quick, "complete": False, "environment": environment,
        "config": {**{k: cfg[k] for k in ("gemm", "single_gemm", "tt", "tucker", "steps", "repeats",
                                          "calibration_repeats", "reference_repeats", "timeout")},
                   "policies": policies, "mixes": mixes, "mix_env": {m: MIXES[m] for m in mixes},
                   "calibration_policy": CALIBRATION_POLICY, "budget_s": args.budget_s,
                   "gantt": args.gantt, "gpu_precision": precision, "starpu_dir": str(session.starpu_dir),
                   "targets": {"gemm_codelet_vs_cupy": GEMM_CODELET_TARGET, "hybrid_floor": HYBRID_FLOOR,
                               "hybrid_balanced": HYBRID_BALANCED_TARGET, "balanced_ideal": BALANCED_IDEAL}},
        "skipped": [], "calibration": [], "runs": [], "references": None, "single_gemm": None,
    })

    probe, no_cuda = probe_cuda(session, facts)
    result["probe"] = {k: v for k, v in probe.items() if k != "environment"}
    run_mixes = [m for m in mixes if m == "cpu" or not no_cuda]
    result["skipped"] += [{"mix": m, "reason": no_cuda} for m in mixes if m not in run_mixes]
    copy_bus_calibration(session, run_mixes)
    spec = base_spec(cfg, facts, precision)
    if "gpu" not in run_mixes:
        spec["single_gemm"] = None
    print(f"hetero: {len(policies)} policies x {len(run_mixes)} mixes ({', '.join(run_mixes)}), one process each; "
          f"GPU: {facts['name'] or 'none'}; precision of GPU float32 GEMMs: {precision.get('resolved') or '-'}",
          flush=True)
    for s in result["skipped"]:
        print(f"  mix {s['mix']} skipped: {s['reason']}", flush=True)

    run_references(session, spec, facts, precision)
    measure_all(session, policies, run_mixes, spec, gantt)
    runs = result["runs"]
    result["skipped"] += [{"policy": r["policy"], "run_mix": r["mix"], "reason": r["reason"]}
                          for r in runs if r["status"] == "skipped"]
    workers = {}
    for r in runs:
        if r["status"] == "ok":
            workers.setdefault(r["mix"], r["environment"]["workers"])
    environment["workers"] = workers or None
    environment["blas_threads"] = next((r["environment"]["blas_threads"] for r in runs if r["status"] == "ok"),
                                       environment["blas_threads"])
    traced = next((r for r in runs if (r["mix"], r["policy"]) == gantt and r["status"] == "ok"), None)
    result["gantt"] = ({"run": run_label(traced), "png": str(session.gantt_png) if session.gantt_png.exists() else None,
                        "traces_dir": str(session.traces_dir)} if traced else
                       {"note": f"no {args.gantt} run" + ("" if args.gantt == "none" else " ran")})
    analyse(result)
    path = session.save(complete=True)
    if result["summary"]:
        try:
            plot(result, common.png_path(path))
        except ImportError as exc:
            print(f"hetero: no chart ({exc})", file=sys.stderr)
    print_report(result)
    print(f"wrote {path}" + (f", {common.png_path(path)}" if common.png_path(path).exists() else "")
          + (f", {session.gantt_png}" if session.gantt_png.exists() else "") + f" ({session.elapsed():.0f} s)")
    ok = common.report_errors(error_checks(result))
    failed = [r for r in runs + result["calibration"] if r["status"] == "failed"]
    for r in failed:
        print(f"ERROR: {run_label(r)}: {r['reason']}", file=sys.stderr)
    if not any(r["status"] == "ok" for r in runs):
        print("ERROR: no run succeeded", file=sys.stderr)
        return 1
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
