"""The parent side of the hetero scenario: one child process per (policy, mix), output kept as it goes."""
from __future__ import annotations

import argparse
import pathlib
import shutil
import time
from typing import Any, Mapping, Sequence

from benchmarks import common, worker
from benchmarks.hetero.config import CALIBRATION_POLICY, CLEARED_VARS, MIXES, MODEL_POLICIES, SCENARIO, WORKLOADS


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
