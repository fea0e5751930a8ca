"""Runs the shared workloads in a fresh process, for scenarios that vary a StarPU setting.

StarPU reads STARPU_SCHED, STARPU_NCPU, ... once, at initialisation, so a scenario comparing
policies or worker counts starts one process per setting. The parent calls ``run_worker(env,
spec)``; the child (``python -m benchmarks.worker SPEC_JSON``) starts the lotus_rt runtime
under that environment, builds the workloads of ``spec``::

    {"gemm": {"size": 1536, "tile": 256}, "tt": {"batch": 512, "rank": 16, "tile": 32},
     "repeats": 5, "warmup": 2, "blas_threads": 1}

checks and times them with ``common.measure`` (BLAS limited to ``blas_threads`` per call when
given) and prints one line ``BENCH_RESULT {json}`` holding its ``environment``, per-workload
results and tasks per worker. ``sweep`` runs a list of settings this way and merges passes.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    import pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

MARKER = "BENCH_RESULT "


@dataclass(frozen=True)
class SweepDefaults:
    """A sweep scenario's defaults, each (full run, --quick)."""

    size: tuple[int, int]
    tile: tuple[int, int]
    repeats: tuple[int, int]
    passes: tuple[int, int]
    timeout: float
    batch: tuple[int, int] = (512, 32)
    rank: tuple[int, int] = (16, 4)
    tt_tile: tuple[int, int] = (32, 8)


def add_sweep_arguments(p, d: SweepDefaults) -> None:
    """The workload and repetition options every process-per-setting sweep takes."""
    def option(flag: str, pair: tuple[int, int], what: str) -> None:
        p.add_argument(flag, type=int, default=None, help=f"{what} (default {pair[0]}; {pair[1]} with --quick)")
    option("--size", d.size, "GEMM size")
    option("--tile", d.tile, "GEMM tile")
    option("--batch", d.batch, "TT batch")
    option("--rank", d.rank, "TT rank")
    option("--tt-tile", d.tt_tile, "TT einsum tile")
    option("--repeats", d.repeats, "timed rounds")
    option("--passes", d.passes, "passes over the settings, in alternating order, samples pooled per setting")
    p.add_argument("--timeout", type=float, default=d.timeout, help="seconds allowed per process")


def sweep_spec(args, d: SweepDefaults) -> tuple[dict[str, Any], int]:
    """(the workers' spec, the number of passes) from parsed ``add_sweep_arguments`` options."""
    q = int(bool(args.quick))
    spec = {"gemm": {"size": args.size or d.size[q], "tile": args.tile or d.tile[q]},
            "tt": {"batch": args.batch or d.batch[q], "rank": args.rank or d.rank[q],
                   "tile": args.tt_tile or d.tt_tile[q]},
            "repeats": args.repeats or d.repeats[q], "warmup": 1 if q else 2, "blas_threads": 1}
    return spec, args.passes or d.passes[q]


class WorkerFailed(RuntimeError):
    """The child exited non-zero, hung, or printed no result."""


def run_worker(env: Mapping[str, str], spec: Mapping[str, Any], timeout: float,
               module: str = "benchmarks.worker", args: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``spec`` in a child with environment ``env``; its result, or WorkerFailed saying why.

    The child is ``python -m MODULE *ARGS SPEC_JSON`` (this module by default; a scenario with
    workloads of its own passes its module and flag) printing one ``BENCH_RESULT`` line."""
    cmd = [sys.executable, "-m", module, *args, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=dict(env), cwd=str(common.REPO_ROOT), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise WorkerFailed(f"hung: killed after {timeout:g} s") from exc
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-5:]
        raise WorkerFailed(f"exit code {proc.returncode}: " + " | ".join(tail))
    return json.loads(lines[-1][len(MARKER):])


def sweep(cases: Sequence[tuple[str, Mapping[str, str]]], spec: Mapping[str, Any], timeout: float,
          calibrate: Mapping[str, str] | None = None, passes: int = 1) -> list[dict[str, Any]]:
    """Run ``spec`` once per case ``(label, environment overrides)`` and pass, one child at a time.

    Every child of one sweep shares a private temporary STARPU_HOME, so the performance models
    are reused from one child to the next. With ``calibrate`` (environment overrides, e.g. a
    model-based policy), an untimed first child fills those models, so that every measured
    child starts with calibrated models whatever its place in the sweep. Passes alternate the
    order of the cases (forward, reversed, ...), so a slow phase of a shared machine does not
    land on the same cases every time; a case's passes are merged (``merge_passes``). A failed
    child is recorded (``status: "failed"`` and the reason), not raised.
    """
    per_label: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in cases}
    with tempfile.TemporaryDirectory(prefix="lotus_bench_starpu_home_") as home:
        if calibrate is not None:
            try:
                run_worker(common.subprocess_env(home, **calibrate), {**spec, "repeats": 1}, timeout)
            except WorkerFailed as exc:
                print(f"  (calibration run failed: {exc})", flush=True)
        for r in range(passes):
            if passes > 1:
                print(f"  pass {r + 1}/{passes}", flush=True)
            for label, overrides in (cases if r % 2 == 0 else cases[::-1]):
                per_label[label].append(_run_case(home, label, overrides, spec, timeout))
    return [merge_passes(per_label[label]) for label, _ in cases]


def _run_case(home: str, label: str, overrides: Mapping[str, str], spec: Mapping[str, Any],
              timeout: float) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        result = run_worker(common.subprocess_env(home, **overrides), spec, timeout)
        run = {"label": label, "env": dict(overrides), "status": "ok", **result}
        times = ", ".join(f"{kind} {w['time_s']['median'] * 1e3:.1f} ms" for kind, w in result["workloads"].items())
    except WorkerFailed as exc:
        run = {"label": label, "env": dict(overrides), "status": "failed", "reason": str(exc)}
        times = f"FAILED ({exc})"
    run["wall_s"] = time.perf_counter() - start
    print(f"  {label:<32} {times}", flush=True)
    return run


def merge_passes(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One record for a case run in several processes: every timed sample pooled (median over
    all of them), the worst error, tasks per worker summed; the first process's environment.
    Failed when any pass failed."""
    failed = [r for r in runs if r["status"] != "ok"]
    if failed or len(runs) == 1:
        return {**(failed or runs)[0], "passes": len(runs)}
    merged = {**runs[0], "passes": len(runs), "wall_s": sum(r["wall_s"] for r in runs), "workloads": {}}
    for kind, first in runs[0]["workloads"].items():
        samples = [t for r in runs for t in r["workloads"][kind]["time_s"]["samples"]]
        merged["workloads"][kind] = {
            **first, "time_s": common.median_spread(samples),
            "pass_medians": [r["workloads"][kind]["time_s"]["median"] for r in runs],
            "max_rel_error": max(r["workloads"][kind]["max_rel_error"] for r in runs)}
    merged["worker_tasks"] = {w: sum(r["worker_tasks"].get(w, 0) for r in runs) for w in runs[0]["worker_tasks"]}
    return merged


def speedup_rows(runs: Sequence[Mapping[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Per successful run and workload: median ms (and each pass's median), the speedup (baseline
    median / run median, samples of all passes pooled) and the best-pass speedup (baseline's
    fastest pass median / run's fastest pass median)."""
    def pass_medians(w: Mapping[str, Any]) -> list[float]:
        return w.get("pass_medians", [w["time_s"]["median"]])

    base = next((r for r in runs if r["label"] == baseline and r["status"] == "ok"), None)
    rows = []
    for run in runs:
        if run["status"] != "ok":
            continue
        row: dict[str, Any] = {"label": run["label"]}
        for kind, w in run["workloads"].items():
            median, passes = w["time_s"]["median"], pass_medians(w)
            row[f"{kind}_ms"] = median * 1e3
            row[f"{kind}_pass_ms"] = [m * 1e3 for m in passes]
            row[f"{kind}_speedup"] = None
            row[f"{kind}_best_pass_speedup"] = None
            if base is not None:
                bw = base["workloads"][kind]
                row[f"{kind}_speedup"] = bw["time_s"]["median"] / median
                # other processes only ever add time: the fastest pass is the least disturbed
                row[f"{kind}_best_pass_speedup"] = min(pass_medians(bw)) / min(passes)
        rows.append(row)
    return rows


def error_checks(runs: Sequence[Mapping[str, Any]]) -> list[tuple[str, float, float]]:
    """(label, max relative error, tolerance) of every workload of every successful run."""
    return [(f"{run['label']} {kind}", w["max_rel_error"], w["tolerance"])
            for run in runs if run["status"] == "ok" for kind, w in run["workloads"].items()]


def build_workloads(rt, spec: Mapping[str, Any]) -> list[common.Workload]:
    workloads = []
    if "gemm" in spec:
        workloads.append(common.gemm_workload(rt, spec["gemm"]["size"], spec["gemm"]["tile"]))
    if "tt" in spec:
        tt = spec["tt"]
        workloads.append(common.tt_workload(rt, tt["batch"], tt["rank"], tt.get("tile")))
    return workloads


def main(argv: list[str] | None = None) -> int:
    import lotus_rt
    from threadpoolctl import threadpool_limits

    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    rt = lotus_rt.runtime()
    lotus_rt.stats(reset=True)
    workloads = build_workloads(rt, spec)
    # lotus_rt pins BLAS to one thread per task only with 2+ workers; a lone worker would
    # otherwise run multi-threaded BLAS, and a worker-count comparison would compare thread pools
    blas = spec.get("blas_threads")
    with threadpool_limits(limits=blas, user_api="blas") if blas else contextlib.nullcontext():
        results = common.measure(workloads, spec["repeats"], spec.get("warmup", 1))
        environment = common.environment(rt)
    # the workloads' names are parameter strings; the parent knows them by kind
    by_kind = dict(zip([k for k in ("gemm", "tt") if k in spec], results.values()))
    # tasks per worker over the whole run (checks, warm-up and timed rounds): the load balance
    worker_tasks = {s.worker: s.tasks for s in lotus_rt.stats()}
    print(MARKER + json.dumps({"environment": environment, "workloads": by_kind,
                               "worker_tasks": worker_tasks}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
