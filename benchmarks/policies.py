"""Scheduling-policy sweep: every StarPU policy on a tiled GEMM DAG and a tiled TT contraction.

StarPU picks its policy at initialisation (STARPU_SCHED), so each policy runs in a fresh
process (``benchmarks.worker``), one after the other, all sharing one private STARPU_HOME; a
first untimed ``dmda`` process calibrates the history-based performance models that the
model-based policies (dm*, heft, ...) read, so no policy pays for calibration in its timings.
In each process: a correctness check against NumPy (doubling as a warm-up), more warm-up
calls, then ``--repeats`` interleaved rounds of the two workloads; medians.

Workloads: ``C = A @ B`` (float64, ``--size``, tiles of ``--tile``: size/tile cubed tasks)
through ``lotus_rt.workloads.gemm_dag``, and a TT-matrix layer forward (1024 -> 1024,
``--rank``, batch ``--batch``) through ``lotus_rt.einsum(..., tile=--tt-tile)`` (a fixed tile,
so every policy gets the same DAG). The sweep makes ``--passes`` passes (2; the order reversed
every other pass, so a slow phase of a shared machine does not always hit the same policies)
and each policy's samples are pooled. Reported per policy: median time of each and its speedup
against ``eager`` (eager median / policy median; > 1 is faster than eager), and the best-pass
speedup (the fastest pass of each: the least disturbed when other processes share the cores). Policies that
lotus_rt refuses on this StarPU release (``lotus_rt.runtime.settings.BROKEN_POLICIES``: they hang) are listed as
skipped with the reason.

    python -m benchmarks policies [--quick] [--out DIR] [--policies eager,lws,dmda]

Writes ``policies[_quick].json`` and a bar chart ``policies[_quick].png``. Exit status 1 when
a result disagrees with NumPy or a policy's process failed.
"""
from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    import pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import common, worker  # noqa: E402

BASELINE = "eager"
QUICK_POLICIES = ("eager", "lws", "dmda")
CALIBRATION_POLICY = "dmda"


def policy_lists(requested: list[str] | None) -> tuple[list[str], list[dict[str, str]]]:
    """(policies to run, baseline first; the refused ones with the reason).

    The refused list covers every policy this StarPU offers that lotus_rt refuses, requested
    or not (none of them can run here).
    """
    from lotus_rt import starpu
    from lotus_rt.runtime import settings as config

    version = starpu.version()
    series = ".".join(version.split(".")[:2])
    offered = list(starpu.policies())
    unknown = [p for p in requested or [] if p not in offered]
    if unknown:
        raise SystemExit(f"unknown policies {', '.join(unknown)}; this StarPU offers: {', '.join(offered)}")
    wanted = requested or offered
    usable = config.usable_policies(offered, version)
    skipped = [{"policy": p, "reason": f"refused by lotus_rt on StarPU {version}: "
                                       f"{config.BROKEN_POLICIES[series, p]}"}
               for p in offered if p not in usable]
    return [BASELINE] + [p for p in wanted if p in usable and p != BASELINE], skipped


def plot(result: dict, path) -> None:
    rows = result["summary"]
    w = result["config"]["workloads"]
    fig, (ax,) = common.figure(1, width=max(6.0, 0.32 * len(rows) + 2), height=4.6)
    common.speedup_bars(
        ax, [r["label"] for r in rows],
        {f"tiled GEMM {w['gemm']['size']}², tile {w['gemm']['tile']}": [r["gemm_speedup"] for r in rows],
         f"TT r{w['tt']['rank']} einsum, batch {w['tt']['batch']}, tile {w['tt']['tile']}":
             [r["tt_speedup"] for r in rows]},
        ylabel=f"speedup vs {BASELINE} (> 1: faster)", rotate=True)
    env = result["environment"]
    common.save(fig, path, f"StarPU {env['starpu_version']} scheduling policies, "
                           f"{len(env['workers'] or [])} CPU workers ({env['date']}, {env['hostname']})")


DEFAULTS = worker.SweepDefaults(size=(1024, 256), tile=(128, 64), repeats=(5, 2), passes=(2, 1), timeout=120.0)


def main(argv: list[str] | None = None) -> int:
    p = common.parser("policies", __doc__.splitlines()[0])
    p.add_argument("--policies", type=str, default=None,
                   help=f"comma-separated subset (default: all; {','.join(QUICK_POLICIES)} with --quick)")
    worker.add_sweep_arguments(p, DEFAULTS)
    args = p.parse_args(argv)
    q = args.quick

    from lotus_rt import starpu
    if not starpu.available():
        print("policies: the StarPU binding is unavailable; this scenario needs StarPU", file=sys.stderr)
        return 2
    requested = args.policies.split(",") if args.policies else (list(QUICK_POLICIES) if q else None)
    policies, skipped = policy_lists(requested)
    spec, passes = worker.sweep_spec(args, DEFAULTS)

    print(f"policies: {len(policies)} to run, {len(skipped)} refused; one process each")
    runs = worker.sweep([(p_, {"STARPU_SCHED": p_}) for p_ in policies], spec, args.timeout,
                        calibrate={"STARPU_SCHED": CALIBRATION_POLICY}, passes=passes)
    for s in skipped:
        print(f"  {s['policy']:<28} skipped: {s['reason']}")
    summary = worker.speedup_rows(runs, BASELINE)
    base = next((r for r in runs if r["label"] == BASELINE and r["status"] == "ok"), None)
    environment = common.environment(None)
    if base is not None:
        environment.update({k: base["environment"][k] for k in ("engine", "workers", "blas_threads")})
    environment["policy"] = f"varied (STARPU_SCHED): {', '.join(policies)}"
    result = {
        "scenario": "policies", "quick": q, "environment": environment,
        "config": {"workloads": {k: spec[k] for k in ("gemm", "tt")}, "repeats": spec["repeats"],
                   "warmup": spec["warmup"], "blas_threads_per_call": spec["blas_threads"],
                   "passes": passes, "baseline": BASELINE, "calibration_policy": CALIBRATION_POLICY,
                   "process_per_policy": True},
        "summary": summary,
        "skipped": skipped,
        "failed": [{"policy": r["label"], "reason": r["reason"]} for r in runs if r["status"] != "ok"],
        "runs": runs,
    }
    path = common.write_result(args.out, "policies", q, result)
    if summary and base is not None:
        plot(result, common.png_path(path))
    print(f"{'policy':<32} {'GEMM ms':>8} {'vs eager':>8} {'per pass':>10} {'best':>6} "
          f"{'TT ms':>7} {'vs eager':>8} {'per pass':>10} {'best':>6}")
    for r in summary:
        cols = []
        for k in ("gemm", "tt"):
            per_pass = "/".join(f"{m:.0f}" for m in r[f"{k}_pass_ms"])
            cols.append(f"{r[f'{k}_ms']:>{8 if k == 'gemm' else 7}.1f} {r[f'{k}_speedup']:>7.2f}x "
                        f"{per_pass:>10} {r[f'{k}_best_pass_speedup']:>5.2f}x")
        print(f"{r['label']:<32} {' '.join(cols)}")
    print(f"wrote {path} and {common.png_path(path)}")
    ok = common.report_errors(worker.error_checks(runs))
    for f in result["failed"]:
        print(f"ERROR: policy {f['policy']}: {f['reason']}", file=sys.stderr)
    return 0 if ok and not result["failed"] and base is not None else 1


if __name__ == "__main__":
    sys.exit(main())
