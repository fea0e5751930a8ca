"""Worker-count scaling: STARPU_NCPU = 1 .. cpu_count on a tiled GEMM DAG and a TT contraction.

StarPU fixes its number of CPU workers at initialisation, so each count runs in a fresh
process (``benchmarks.worker``), one after the other, sharing one private STARPU_HOME. BLAS is
held to one thread per call in every process (lotus_rt does so itself only with two or more
workers; a lone worker would run multi-threaded BLAS), so the workers are the only parallelism.
In each process: a correctness check against NumPy (doubling as a warm-up), more warm-up calls,
then ``--repeats`` interleaved rounds of the two workloads. The sweep over counts makes
``--passes`` passes (3; order reversed every other pass) and each count's samples are pooled.

Workloads (the same DAG for every worker count): ``C = A @ B`` (float64, ``--size``, tiles of
``--tile``) through ``lotus_rt.workloads.gemm_dag``, and a TT-matrix layer forward (1024 ->
1024, ``--rank``, batch ``--batch``) through ``lotus_rt.einsum(..., tile=--tt-tile)``. A fixed
einsum tile matters here: ``tile=None`` would size the tiles for the number of workers.
Reported per count n: median time, speedup T(1) / T(n) and parallel efficiency speedup / n.

    python -m benchmarks ncpu [--quick] [--out DIR] [--max-ncpu N] [--policy lws]

Writes ``ncpu[_quick].json`` and ``ncpu[_quick].png`` (speedup against n with the ideal line).
Exit status 1 when a result disagrees with NumPy or a process failed.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    import pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import common, worker  # noqa: E402


def plot(result: dict, path) -> None:
    rows = result["summary"]
    w = result["config"]["workloads"]
    fig, axes = common.figure(2, width=5.2)
    counts = [r["ncpu"] for r in rows]
    labels = {"gemm": f"tiled GEMM {w['gemm']['size']}², tile {w['gemm']['tile']}",
              "tt": f"TT r{w['tt']['rank']} einsum, batch {w['tt']['batch']}, tile {w['tt']['tile']}"}
    common.scaling_lines(axes[0], counts, {labels[k]: [r[f"{k}_speedup"] for r in rows] for k in labels},
                         xlabel="STARPU_NCPU (CPU workers)", ylabel="speedup vs 1 worker",
                         title="speedup")
    common.speedup_bars(axes[1], [str(n) for n in counts],
                        {labels[k]: [r[f"{k}_efficiency"] for r in rows] for k in labels},
                        ylabel="parallel efficiency (speedup / n)", title="efficiency")
    axes[1].set_xlabel("STARPU_NCPU (CPU workers)")
    env = result["environment"]
    common.save(fig, path, f"StarPU {env['starpu_version']}, policy {env['policy']}, "
                           f"{env['cpu_count']} cores ({env['date']}, {env['hostname']})")


DEFAULTS = worker.SweepDefaults(size=(1536, 256), tile=(256, 64), repeats=(7, 3), passes=(3, 1), timeout=180.0)


def main(argv: list[str] | None = None) -> int:
    p = common.parser("ncpu", __doc__.splitlines()[0])
    p.add_argument("--max-ncpu", type=int, default=os.cpu_count() or 1,
                   help="largest STARPU_NCPU (default: os.cpu_count())")
    p.add_argument("--policy", type=str, default=None,
                   help="STARPU_SCHED for every run (default: the environment's, else StarPU's default)")
    worker.add_sweep_arguments(p, DEFAULTS)
    args = p.parse_args(argv)
    q = args.quick

    from lotus_rt import starpu
    if not starpu.available():
        print("ncpu: the StarPU binding is unavailable; this scenario needs StarPU", file=sys.stderr)
        return 2
    spec, passes = worker.sweep_spec(args, DEFAULTS)
    extra = {"STARPU_SCHED": args.policy} if args.policy else {}
    counts = list(range(1, max(1, args.max_ncpu) + 1))

    print(f"ncpu: STARPU_NCPU = {counts[0]}..{counts[-1]}; one process each")
    runs = worker.sweep([(f"ncpu={n}", {"STARPU_NCPU": str(n), **extra}) for n in counts], spec,
                        args.timeout, passes=passes)
    summary = worker.speedup_rows(runs, "ncpu=1")
    for row in summary:
        row["ncpu"] = n = int(row["label"].split("=")[1])
        for kind in ("gemm", "tt"):
            row[f"{kind}_efficiency"] = row[f"{kind}_speedup"] / n if row[f"{kind}_speedup"] else None
    ok_runs = [r for r in runs if r["status"] == "ok"]
    environment = common.environment(None)
    if ok_runs:  # the engine, policy and workers of the largest run
        environment.update({k: ok_runs[-1]["environment"][k]
                            for k in ("engine", "policy", "workers", "blas_threads")})
    environment["varied"] = "STARPU_NCPU"
    result = {
        "scenario": "ncpu", "quick": q, "environment": environment,
        "config": {"workloads": {k: spec[k] for k in ("gemm", "tt")}, "repeats": spec["repeats"],
                   "warmup": spec["warmup"], "blas_threads_per_call": spec["blas_threads"],
                   "passes": passes, "ncpu": counts, "process_per_count": True},
        "summary": summary,
        "failed": [{"ncpu": r["label"], "reason": r["reason"]} for r in runs if r["status"] != "ok"],
        "runs": runs,
    }
    path = common.write_result(args.out, "ncpu", q, result)
    complete = len(summary) == len(counts) and summary[0]["ncpu"] == 1
    if complete:
        plot(result, common.png_path(path))
    print(f"{'ncpu':>4} {'GEMM ms':>9} {'speedup':>8} {'eff':>5} {'TT ms':>9} {'speedup':>8} {'eff':>5}")
    for r in summary:
        print(f"{r['ncpu']:>4} {r['gemm_ms']:>9.2f} {r['gemm_speedup']:>7.2f}x {r['gemm_efficiency']:>5.2f} "
              f"{r['tt_ms']:>9.2f} {r['tt_speedup']:>7.2f}x {r['tt_efficiency']:>5.2f}")
    print(f"wrote {path} and {common.png_path(path)}")
    ok = common.report_errors(worker.error_checks(runs))
    for f in result["failed"]:
        print(f"ERROR: {f['ncpu']}: {f['reason']}", file=sys.stderr)
    return 0 if ok and complete else 1


if __name__ == "__main__":
    sys.exit(main())
