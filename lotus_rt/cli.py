"""``lotus-rt`` command line: ``demo`` runs the main job, ``gemm`` and ``info`` the runtime.

    lotus-rt demo [--epochs 2]                  # MNIST CNN: dense, then tensorized on StarPU
    lotus-rt gemm [--size 1536] [--tile 256]    # tiled GEMM DAG over every StarPU worker
    lotus-rt info                               # StarPU version, workers, policy, settings

``gemm`` is the runtime's end-to-end check on real StarPU: it prints the policy in force,
per-worker task counts and busy time, and the error against one NumPy matmul.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits


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
    from lotus_rt import config, starpu

    print(f"lotus_rt {lotus_rt.__version__}")
    if starpu.available():
        print(f"StarPU {starpu.version()} (CUDA support compiled in: {starpu.built_with_cuda()})")
    else:
        print("StarPU binding: not available")
    rt = lotus_rt.runtime()
    print(f"engine: {rt.engine}; policy: {rt.policy}")
    for kind, name in rt.workers:
        print(f"  worker {name} ({kind})")
    settings = config.read_settings()
    print(f"LOTUS_ENGINE={os.environ.get('LOTUS_ENGINE', '')!r} LOTUS_TRACE={settings.trace} "
          f"LOTUS_TRACE_CAPACITY={settings.trace_capacity}")
    for name, value in config.starpu_env_report().items():
        print(f"{name}={value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lotus-rt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train a CNN on MNIST dense, then tensorized on StarPU")
    p_demo.add_argument("--epochs", type=int, default=2)
    p_demo.add_argument("--batch", type=int, default=64)
    p_demo.add_argument("--rank", type=float, default=0.15, help="fraction of each layer's parameters kept")
    p_demo.add_argument("--out", default="demo_out", help="folder for the Gantt chart")
    p_demo.add_argument("--seed", type=int, default=0)
    p_gemm = sub.add_parser("gemm", help="tiled GEMM DAG on every worker, checked against numpy")
    p_gemm.add_argument("--size", type=int, default=1536)
    p_gemm.add_argument("--tile", type=int, default=256)
    p_gemm.add_argument("--seed", type=int, default=0)
    sub.add_parser("info", help="StarPU version, workers, policy and settings")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from lotus_rt import demo
        return demo.run(args.epochs, args.batch, args.rank, out=args.out, seed=args.seed)
    if args.command == "gemm":
        return gemm_demo(args.size, args.tile, args.seed)
    return info()


if __name__ == "__main__":
    sys.exit(main())
