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
import sys

from benchmarks import common
from benchmarks.hetero.child import child_main
from benchmarks.hetero.config import (BALANCED_IDEAL, CALIBRATION_POLICY, FULL, GEMM_CODELET_TARGET,
                                      HYBRID_BALANCED_TARGET, HYBRID_FLOOR, MIXES, POLICIES, QUICK,
                                      QUICK_POLICIES, SCENARIO, WORKLOADS, _split, configuration)
from benchmarks.hetero.gpu import gpu_facts, gpu_precision
from benchmarks.hetero.report import analyse, error_checks, plot, print_report, targets
from benchmarks.hetero.session import Session, base_spec, copy_bus_calibration, measure_all, probe_cuda, \
    run_label, run_references

__all__ = ["main", "targets", "analyse", "WORKLOADS"]


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

    from lotus_rt import starpu
    from lotus_rt.runtime import settings as config
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
