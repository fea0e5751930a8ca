"""One child process of the hetero scenario: a probe, a (policy, mix) run, or the GPU references.

StarPU reads its settings once, so the parent starts one child per setting
(``python -m benchmarks.hetero --child SPEC``); the child prints one BENCH_RESULT line."""
from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Mapping, Sequence

from benchmarks import common, worker
from benchmarks.hetero.config import CHECK_ROWS, LAYER_CHAIN
from benchmarks.hetero.gpu import _cupy_references, _torch_references, gpu_facts, gpu_precision, tolerance
from benchmarks.hetero.workloads import layer_cases, layer_workload, single_gemm


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


def _trace_exporter(rt, spec: Mapping[str, Any], kind: str) -> Callable[[list], dict[str, Any]] | None:
    """Writes the last call's trace: Chrome JSON (and a Gantt PNG) under the traces folder; the
    GEMM's Gantt chart also at the scenario's Gantt path."""
    trace = spec.get("trace")
    if not trace:
        return None
    from lotus_rt.runtime import tracing

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
            w = common.gemm_workload(rt, g["size"], g["tile"], g["dtype"], tolerance(g["dtype"], precision),
                                     check_rows=CHECK_ROWS)
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
