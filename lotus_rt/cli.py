"""``lotus-rt`` command line: the main job, runtime checks, benchmarks and traces.

    lotus-rt demo [--epochs 2]                  # MNIST CNN: dense, then tensorized on StarPU
    lotus-rt train --model resnet20 --data mnist --tensorize group   # dense, tensorized, offloaded
    lotus-rt cp-stability                       # plain vs stable CP of one layer, loss curves
    lotus-rt gemm [--size 1536] [--tile 256]    # tiled GEMM DAG over every StarPU worker
    lotus-rt info                               # StarPU, workers, policy, perf models, settings
    lotus-rt mps [--bond-dim 20] [--sweep realspace]   # MPS classifier trained by DMRG sweeps
    lotus-rt bench SCENARIO [--quick] ...       # = python -m benchmarks (needs a source checkout)
    lotus-rt trace [-o trace.json] -- python script.py [args]   # record any program's tasks
    lotus-rt launch -n 4 -- python train.py     # mpirun with N StarPU-MPI ranks (lotus_rt.distributed)

``gemm`` is the runtime's end-to-end check on real StarPU: it prints the policy in force,
per-worker task counts and busy time, and the error against one NumPy matmul. ``trace`` runs
the command with LOTUS_TRACE_FILE set, so the program's runtime writes every task record
(a Chrome trace for ``.json``, a Gantt chart for ``.png``) when it shuts down.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from lotus_rt.errors import ConfigError
from lotus_rt.runtime import heap, omp


def _print_stats(stats) -> None:
    print(f"  {'worker':<12} {'kind':<5} {'tasks':>6} {'busy s':>8}")
    for s in stats:
        print(f"  {s.worker:<12} {s.kind:<5} {s.tasks:>6} {s.busy_s:>8.3f}")


def gemm_demo(size: int, tile: int, seed: int) -> int:
    import lotus_rt
    from lotus_rt.workloads import gemm_dag, split_tiles, tiled_gemm

    rt = lotus_rt.runtime()
    print(f"lotus_rt {lotus_rt.__version__}: engine={rt.engine} policy={rt.policy} "
          f"workers={', '.join(f'{name} ({kind})' for kind, name in rt.workers)}")
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((size, size))
    b = rng.standard_normal((size, size))
    ntiles = -(-size // tile)
    print(f"tiled GEMM: {size}x{size} float64, tile {tile} -> {ntiles ** 3} tasks in {ntiles ** 2} chains")
    tiled_gemm(rt, a[:tile, :tile].copy(), b[:tile, :tile].copy(), tile)  # warm-up
    a_tiles, b_tiles = split_tiles(a, tile), split_tiles(b, tile)
    rt.stats(reset=True)
    start = time.perf_counter()
    c_tiles = gemm_dag(rt, a_tiles, b_tiles)
    elapsed = time.perf_counter() - start
    c = np.block(c_tiles)
    stats = rt.stats()
    ncpu = sum(kind == "cpu" for kind, _ in rt.workers)
    with threadpool_limits(limits=max(ncpu, 1), user_api="blas"):  # the same cores as the DAG
        start = time.perf_counter()
        reference = a @ b
        ref_elapsed = time.perf_counter() - start
    error = float(np.max(np.abs(c - reference)) / np.max(np.abs(reference)))
    print(f"lotus_rt DAG (register, run, unregister the tiles): {elapsed:.3f} s; one numpy matmul on {ncpu} BLAS thread(s): "
          f"{ref_elapsed:.3f} s (ratio {ref_elapsed / elapsed:.2f}x)")
    _print_stats(stats)
    ran = sum(s.tasks for s in stats)
    print(f"tasks run: {ran}; max relative error vs numpy: {error:.2e}")
    ok = error < 1e-12 and ran == ntiles ** 3
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def info() -> int:
    import lotus_rt
    from lotus_rt import starpu
    from lotus_rt.runtime import perfmodels, settings as settings_module

    print(f"lotus_rt {lotus_rt.__version__}")
    if starpu.available():
        print(f"StarPU {starpu.version()} (CUDA support compiled in: {starpu.built_with_cuda()})")
    else:
        print("StarPU binding: not available")
    settings_module.read_settings()  # a bad LOTUS_* value is one ConfigError, before StarPU starts
    rt = lotus_rt.runtime()
    settings = rt.settings
    print(f"engine: {rt.engine}; policy: {rt.policy}; priorities {rt.priority_range[0]}..{rt.priority_range[1]}")
    for kind, name in rt.workers:
        print(f"  worker {name} ({kind})")
    if rt.engine == "starpu":
        print(f"policies: {', '.join(settings_module.usable_policies(starpu.policies(), starpu.version()))}")
    print(f"performance models: {perfmodels.model_dir(settings.outside)}")
    models = perfmodels.lotus_models(settings.outside)
    if not models:
        print("  no lotus_rt codelet measured yet (model-aware policies such as dmda record them)")
    for m in models:
        print(f"  {m.codelet:<16} {'+'.join(m.devices):<9} {m.calibrated}/{m.footprints} task sizes "
              f"calibrated, {m.samples} samples")
    print("lotus_rt settings (runtime().settings):")
    for name, value in settings.report().items():
        print(f"  {name}={value}")
    starpu_vars = settings_module.starpu_env_report(settings)
    print("StarPU settings:" + ("" if starpu_vars else " none set (StarPU's defaults)"))
    for name, value in starpu_vars.items():
        print(f"  {name}={value}")
    print(f"OpenMP spin (torch's threads beside StarPU's workers): {omp.report(settings.outside)}")
    print(f"Heap (freed memory kept for the next step): {heap.report(settings.outside)}")
    return 0


def bench(args: list[str]) -> int:
    """Run the benchmark suite of this source checkout (``python -m benchmarks``)."""
    import pathlib
    import subprocess

    import lotus_rt
    root = pathlib.Path(lotus_rt.__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        print(f"lotus-rt bench: no benchmarks/ next to {root / 'lotus_rt'}; the suite runs from a source "
              "checkout (pip install -e .)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "benchmarks", *args], cwd=str(root))


def trace(output: str, command: list[str]) -> int:
    """Run ``command`` with its lotus_rt tasks recorded to ``output`` and summarise them."""
    import json
    import pathlib
    import subprocess

    from lotus_rt.runtime import settings as settings_module
    if not command:
        print("lotus-rt trace: give the command to run after --, e.g. lotus-rt trace -- python script.py",
              file=sys.stderr)
        return 2
    env = dict(os.environ, LOTUS_TRACE="1", LOTUS_TRACE_FILE=output)
    settings_module.read_settings(env)  # a bad output suffix is an error before the program runs
    path = pathlib.Path(output)
    if path.exists():
        path.unlink()
    code = subprocess.call(command, env=env)
    if not path.exists():
        print(f"lotus-rt trace: {output} was not written (did the program use lotus_rt's runtime?)",
              file=sys.stderr)
        return code or 1
    if path.suffix.lower() == ".json":
        events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]
        workers = {e["tid"] for e in events}
        print(f"lotus-rt trace: {len(events)} tasks on {len(workers)} worker(s) in {output} "
              "(open it in https://ui.perfetto.dev or chrome://tracing)")
    else:
        print(f"lotus-rt trace: Gantt chart in {output}")
    return code


def launch(nranks: int, command: list[str]) -> int:
    """Run ``command`` as ``nranks`` MPI ranks with mpirun (lotus_rt.distributed programs).

    Each rank gets an equal share of the cores as StarPU CPU workers (STARPU_NCPU, at least 1)
    and unbound workers (STARPU_WORKERS_NOBIND=1: every rank's StarPU would bind its workers to
    the same first cores), unless those are set; Open MPI yields the core while it polls
    (OMPI_MCA_mpi_yield_when_idle=1: StarPU-MPI's progression thread polls MPI_Test beside the
    workers; measured on 2 cores, 2 ranks: backward 27-40 ms per step with it, 95-157 ms
    without). mpirun binds nothing, oversubscribes when there are more ranks than cores, and
    runs as root when it is root."""
    import shutil
    import subprocess

    if not command:
        print("lotus-rt launch: give the command after --, e.g. lotus-rt launch -n 2 -- python train.py",
              file=sys.stderr)
        return 2
    if nranks < 1:
        print(f"lotus-rt launch: -n must be at least 1, got {nranks}", file=sys.stderr)
        return 2
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        print("lotus-rt launch: mpirun not found; install openmpi-bin libopenmpi-dev (make deps does)",
              file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    env = dict(os.environ)
    env.setdefault("STARPU_NCPU", str(max(1, cores // nranks)))
    env.setdefault("STARPU_WORKERS_NOBIND", "1")
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    args = [mpirun, "-np", str(nranks), "--bind-to", "none", "-x", "STARPU_NCPU", "-x", "STARPU_WORKERS_NOBIND"]
    if nranks > cores:
        args.append("--oversubscribe")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-run-as-root")
    return subprocess.call(args + command, env=env)


def main(argv: list[str] | None = None) -> int:
    omp.shorten_spin(os.environ)  # before the demo imports torch; `trace` and `bench` children inherit it
    parser = argparse.ArgumentParser(prog="lotus-rt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train a CNN on MNIST dense, then tensorized on StarPU")
    p_demo.add_argument("--epochs", type=int, default=2)
    p_demo.add_argument("--batch", type=int, default=64)
    p_demo.add_argument("--rank", type=float, default=0.15, help="fraction of each layer's parameters kept")
    p_demo.add_argument("--out", default="demo_out", help="folder for the Gantt chart")
    p_demo.add_argument("--seed", type=int, default=0)
    p_train = sub.add_parser("train", help="train a model dense, then tensorized (per layer, group, whole "
                                           "model) and offloaded; JSON + PNG per run")
    p_cp = sub.add_parser("cp-stability", help="one AlexNet conv as CP: plain CP-ALS vs stable CP, loss curves")
    p_gemm = sub.add_parser("gemm", help="tiled GEMM DAG on every worker, checked against numpy")
    p_gemm.add_argument("--size", type=int, default=1536)
    p_gemm.add_argument("--tile", type=int, default=256)
    p_gemm.add_argument("--seed", type=int, default=0)
    sub.add_parser("info", help="StarPU version, workers, policy, performance models and settings")
    # listed for --help only: main() hands everything after "bench" to the suite unparsed
    sub.add_parser("bench", help="benchmark suite (python -m benchmarks); --list shows scenarios", add_help=False)
    from lotus_rt.mps import cli as mps_cli
    mps_cli.add_arguments(sub.add_parser("mps", help="MPS classifier on 14x14 MNIST trained by DMRG sweeps"))
    p_trace = sub.add_parser("trace", help="record a program's tasks: lotus-rt trace -o t.json -- python x.py")
    p_trace.add_argument("-o", "--output", default="lotus_trace.json",
                         help="trace file: .json (Chrome trace) or .png (Gantt chart)")
    p_trace.add_argument("trace_command", nargs=argparse.REMAINDER)
    p_launch = sub.add_parser("launch", help="run a command as N StarPU-MPI ranks: lotus-rt launch -n 4 -- python x.py")
    p_launch.add_argument("-n", "--nranks", type=int, default=2)
    p_launch.add_argument("launch_command", nargs=argparse.REMAINDER)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after it belongs to the suite, options included
        return bench(argv[1:])
    if argv[:1] in (["train"], ["cp-stability"]):  # their options need lotus_rt.train, hence torch
        _add_train_arguments(p_train, p_cp)
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"lotus-rt: {exc}", file=sys.stderr)
        return 2


def _add_train_arguments(p: argparse.ArgumentParser, p_cp: argparse.ArgumentParser) -> None:
    from lotus_rt import train
    p.add_argument("--model", choices=train.MODELS, default="alexnet")
    p.add_argument("--data", choices=train.DATASETS, default="mnist")
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py (default: LOTUS_DATA_DIR)")
    p.add_argument("--tensorize", choices=train.MODES, default="none")
    p.add_argument("--format", choices=train.FORMATS, default="tucker", help="format of the group networks")
    p.add_argument("--rank", action="append", type=train.parse_rank, default=None,
                   help="fraction (0.1), rank (8) or per-mode ranks (2,8,8,3,3); once for every group, or once "
                        "per group of the mode (default: lotus_rt.train.DEFAULT_RANKS)")
    p.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    p.add_argument("--finetune-epochs", type=int, default=None, help="after tensorizing (default: --epochs)")
    p.add_argument("--optimizer", choices=sorted(train.TRAIN_OPTIMIZERS), default="adam",
                   help="dmrg: DMRG sweeps over the TT layers in the fine-tuning, Adam elsewhere")
    p.add_argument("--lr", type=float, default=None,
                   help="default: 1e-3 for adam, 0.02 for sgd, 0.05 for dmrg (the bond step)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-size", type=int, default=None, help="first N training images of a seeded shuffle")
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--no-offload", action="store_true", help="fine-tune the tensorized model in torch eager")
    p.add_argument("--no-dense-baseline", action="store_true",
                   help="skip training a dense copy for the fine-tuning epochs too")
    p.add_argument("--out", default="train_out")
    p.add_argument("--seed", type=int, default=0)
    p = p_cp
    p.add_argument("--layer", default="6")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--optimizer", choices=sorted(train.OPTIMIZERS), default="sgd")
    p.add_argument("--lr", type=float, action="append", default=None, help="repeat for several (default 0.01 0.02 0.035)")
    p.add_argument("--out", default="train_out")
    p.add_argument("--seed", type=int, default=0)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("train", "cp-stability"):
        from lotus_rt import train
        try:
            if args.command == "cp-stability":
                train.compare_cp(args.layer, args.rank, args.epochs, args.finetune_epochs, args.optimizer,
                                 args.lr or (0.01, 0.02, 0.035), out=args.out, seed=args.seed)
                return 0
            train.run(args.model, args.data, args.tensorize, args.rank, args.format, args.epochs, args.finetune_epochs,
                      args.optimizer, args.lr, args.batch, args.train_size, args.test_size, args.data_dir, args.out,
                      args.seed, offloaded=not args.no_offload, continue_dense=not args.no_dense_baseline)
        except (ValueError, FileNotFoundError) as exc:
            print(f"lotus-rt {args.command}: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "demo":
        from lotus_rt import demo
        return demo.run(args.epochs, args.batch, args.rank, out=args.out, seed=args.seed)
    if args.command == "gemm":
        return gemm_demo(args.size, args.tile, args.seed)
    if args.command == "mps":
        from lotus_rt.mps import cli as mps_cli
        return mps_cli.run(args)
    if args.command == "launch":
        return launch(args.nranks, args.launch_command[1:] if args.launch_command[:1] == ["--"] else args.launch_command)
    if args.command == "trace":
        command = args.trace_command[1:] if args.trace_command[:1] == ["--"] else args.trace_command
        return trace(args.output, command)
    return info()


if __name__ == "__main__":
    sys.exit(main())
