"""The hetero scenario's analysis and output: speed-ups against the best single device, the
targets as met / missed / not measured, the chart and the printed table."""
from __future__ import annotations

import pathlib
from typing import Any, Mapping

from benchmarks import common
from benchmarks.hetero.config import (BALANCED_IDEAL, GEMM_CODELET_TARGET, HYBRID_BALANCED_TARGET, HYBRID_FLOOR,
                                      SINGLE_DEVICE, WORKLOADS)
from benchmarks.hetero.session import run_label, tasks_per_unit


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
