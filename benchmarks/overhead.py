"""Runtime overhead benchmark: empty tasks (independent, dependent chain) and a tiled GEMM.

Runs every variant side by side in one process, repeats each (warm-up, then the median of
``--repeats`` runs) and writes ``benchmarks/out/overhead.json``:

- independent: N empty tasks with no data, submitted then waited for (µs per task);
- chain: N empty-bodied tasks all accessing one handle in RW (µs per task);
- gemm: a tiled GEMM DAG vs one numpy matmul on the same number of BLAS threads as there
  are StarPU CPU workers (ratio numpy_time / dag_time, > 1 means the DAG is faster).

    python benchmarks/overhead.py [--tasks 20000] [--repeats 5] [--size 2048 --tile 256]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

import lotus_rt
from lotus_rt.workloads import gemm_dag, split_tiles

OUT = pathlib.Path(__file__).resolve().parent / "out"


def _median_spread(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": samples}


def independent_tasks(rt, n: int) -> float:
    noop = rt.codelet("bench_noop", cpu=lambda: None)
    start = time.perf_counter()
    for _ in range(n):
        rt.submit(noop)
    rt.wait()
    return (time.perf_counter() - start) / n * 1e6


def chain_tasks(rt, n: int) -> float:
    touch = rt.codelet("bench_touch", cpu=lambda x: None)
    handle = rt.register(np.ones(8))
    start = time.perf_counter()
    for _ in range(n):
        rt.submit(touch, (handle, "RW"))
    rt.wait()
    elapsed = time.perf_counter() - start
    handle.unregister()
    return elapsed / n * 1e6


def gemm_pair(rt, size: int, tile: int, rng) -> tuple[float, float, float]:
    """(DAG seconds, numpy seconds, max relative error). The DAG time covers registering,
    submitting, running and unregistering the tiles; tiling and reassembly copies are not
    counted (they are layout work a tiled application does not repeat)."""
    a, b = rng.standard_normal((size, size)), rng.standard_normal((size, size))
    a_tiles, b_tiles = split_tiles(a, tile), split_tiles(b, tile)
    start = time.perf_counter()
    c_tiles = gemm_dag(rt, a_tiles, b_tiles)
    dag = time.perf_counter() - start
    ncpu = sum(kind == "cpu" for kind, _ in rt.workers)
    with threadpool_limits(limits=max(ncpu, 1), user_api="blas"):
        start = time.perf_counter()
        reference = a @ b
        ref = time.perf_counter() - start
    c = np.block(c_tiles)
    error = float(np.max(np.abs(c - reference)) / np.max(np.abs(reference)))
    return dag, ref, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--out", type=pathlib.Path, default=OUT / "overhead.json")
    args = parser.parse_args(argv)

    rt = lotus_rt.runtime()
    rng = np.random.default_rng(0)
    independent_tasks(rt, 1000), chain_tasks(rt, 1000), gemm_pair(rt, args.tile * 2, args.tile, rng)
    indep = [independent_tasks(rt, args.tasks) for _ in range(args.repeats)]
    chain = [chain_tasks(rt, args.tasks) for _ in range(args.repeats)]
    gemm_runs = [gemm_pair(rt, args.size, args.tile, rng) for _ in range(args.repeats)]
    dag, ref = [g[0] for g in gemm_runs], [g[1] for g in gemm_runs]
    ratios = [r / d for d, r in zip(dag, ref)]

    from lotus_rt import starpu
    result = {
        "benchmark": "overhead",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "processor": platform.processor(),
                    "python": platform.python_version(), "numpy": np.__version__},
        "engine": rt.engine,
        "starpu_version": starpu.version() if starpu.available() else None,
        "policy": rt.policy,
        "workers": rt.workers,
        "env": lotus_rt.config.starpu_env_report(),
        "tasks": args.tasks,
        "independent_us_per_task": _median_spread(indep),
        "chain_us_per_task": _median_spread(chain),
        "gemm": {"size": args.size, "tile": args.tile, "dtype": "float64",
                 "dag_s": _median_spread(dag), "numpy_s": _median_spread(ref),
                 "numpy_over_dag": _median_spread(ratios),
                 "max_rel_error": max(g[2] for g in gemm_runs)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"engine={rt.engine} policy={rt.policy} workers={len(rt.workers)} "
          f"(StarPU {result['starpu_version']})")
    print(f"independent empty task: {statistics.median(indep):6.2f} us/task "
          f"(min {min(indep):.2f}, max {max(indep):.2f})")
    print(f"dependent chain task:   {statistics.median(chain):6.2f} us/task "
          f"(min {min(chain):.2f}, max {max(chain):.2f})")
    print(f"tiled GEMM {args.size}^2 tile {args.tile}: DAG {statistics.median(dag):.3f} s, numpy "
          f"{statistics.median(ref):.3f} s, numpy/DAG = {statistics.median(ratios):.2f}x "
          f"(max rel error {result['gemm']['max_rel_error']:.1e})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
