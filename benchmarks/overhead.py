"""Runtime overhead benchmark: empty tasks (independent, dependent chain) and a tiled GEMM.

Runs every variant side by side in one process, repeats each (warm-up, then the median of
``--repeats`` runs):

- independent: N empty tasks with no data, submitted then waited for (µs per task), each submitted
  from Python (``submit``) and the same N replayed from a step plan (``runtime.record()``, then
  ``plan.run()``: one C call submits them all), in alternating rounds;
- chain: N empty-bodied tasks all accessing one handle in RW (µs per task), submitted and replayed;
- wait latency: how long ``wait()`` takes to return after the last task of a burst ended
  (16 ~1 ms GEMM tasks on every worker; the end comes from ``trace()``, the same clock), in ms;
- gemm: a tiled GEMM DAG (``common.gemm_workload``: registering, running and unregistering
  the tiles) vs one numpy matmul on the same number of BLAS threads as there are StarPU CPU
  workers, in interleaved rounds; the ratio numpy_time / dag_time is per round (> 1 means the
  DAG is faster).

    python -m benchmarks overhead [--quick] [--out DIR] [--tasks 20000] [--repeats 5]
                                  [--size 2048 --tile 256]
    python benchmarks/overhead.py ...                      (the same, as a script)

Writes ``DIR/overhead[_quick].json`` and a bar chart ``overhead[_quick].png`` (µs per task,
GEMM ratio). ``--quick``: 2 000 tasks, 3 repeats, GEMM 512 tile 128. Exit status 1 when the
GEMM DAG disagrees with numpy.
"""
from __future__ import annotations

import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    import pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from benchmarks import common  # noqa: E402


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


class Replayed:
    """The same empty tasks recorded once into a step plan; ``run()`` times one replay (µs/task)."""

    def __init__(self, rt, n: int, chain: bool):
        self.rt, self.n = rt, n
        self.handle = rt.register(np.ones(8)) if chain else None
        body = rt.codelet("bench_touch" if chain else "bench_noop", cpu=(lambda x: None) if chain else (lambda: None))
        with rt.record() as self.plan:
            for _ in range(n):
                rt.submit(body, *([(self.handle, "RW")] if chain else []))

    def run(self) -> float:
        start = time.perf_counter()
        self.plan.run()
        self.rt.wait()
        return (time.perf_counter() - start) / self.n * 1e6

    def close(self) -> None:
        self.plan.release()
        if self.handle is not None:
            self.handle.unregister()


def submitted_and_replayed(rt, n: int, repeats: int) -> dict[str, list[float]]:
    """µs per task of each variant, in alternating rounds (a slow phase hits all of them)."""
    replays = {"independent": Replayed(rt, n, chain=False), "chain": Replayed(rt, n, chain=True)}
    samples: dict[str, list[float]] = {k: [] for k in ("independent", "independent_replayed", "chain",
                                                        "chain_replayed")}
    try:
        for r in replays.values():
            r.run()  # warm-up: the first run builds the plan's views
        for _ in range(repeats):
            samples["independent"].append(independent_tasks(rt, n))
            samples["independent_replayed"].append(replays["independent"].run())
            samples["chain"].append(chain_tasks(rt, n))
            samples["chain_replayed"].append(replays["chain"].run())
    finally:
        for r in replays.values():
            r.close()
    return samples


def wait_latency(rt, bursts: int) -> list[float]:
    """Per burst of 16 GEMM tasks: ms from the end of its last task to ``wait()`` returning."""
    lib = getattr(rt._engine, "_lib", None)
    if lib is None:  # the inline engine runs tasks at submit: nothing to wait for
        return []
    t0_us = rt._engine._t0_us
    matmul = rt.codelet("bench_matmul", cpu=lambda a, b, c: np.matmul(a, b, out=c))
    arrays = [np.random.default_rng(k).random((300, 300), dtype=np.float32) for k in range(3)]
    inputs = [rt.register(a) for a in arrays]
    outputs = [rt.register(np.empty((300, 300), np.float32)) for _ in range(8)]
    latencies = []
    for _ in range(bursts):
        rt.trace(clear=True)
        for k in range(16):
            rt.submit(matmul, (inputs[k % 3], "R"), (inputs[(k + 1) % 3], "R"), (outputs[k % 8], "W"))
        rt.wait()
        returned_ms = (lib.lotus_now_us() - t0_us) / 1e3
        latencies.append(returned_ms - max(r.end_s for r in rt.trace()) * 1e3)
        time.sleep(0.002)  # let the next burst start from paused workers, like a layer's next pass
    for h in inputs + outputs:
        h.unregister()
    return latencies


def gemm_versus_numpy(rt, size: int, tile: int, repeats: int) -> dict:
    """The tiled GEMM DAG and numpy's matmul on the same operands, interleaved rounds."""
    gemm = common.gemm_workload(rt, size, tile)
    a, b = gemm.inputs
    nthreads = common.cpu_workers(rt)

    def numpy_matmul() -> float:
        with threadpool_limits(limits=nthreads, user_api="blas"):
            start = time.perf_counter()
            a @ b
            return time.perf_counter() - start

    error = gemm.error()  # also the DAG's warm-up
    numpy_matmul()
    times = common.interleaved({"dag": gemm.call, "numpy": numpy_matmul}, repeats)
    return {"size": size, "tile": tile, "tasks": gemm.tasks, "dtype": "float64",
            "blas_threads": nthreads,
            "dag_s": common.median_spread(times["dag"]), "numpy_s": common.median_spread(times["numpy"]),
            "numpy_over_dag": common.median_spread([n / d for d, n in zip(times["dag"], times["numpy"])]),
            "max_rel_error": error, "tolerance": gemm.tolerance}


def plot(result: dict, path) -> None:
    fig, axes = common.figure(2, width=4.6)
    common.speedup_bars(axes[0], ["independent", "dependent chain"],
                        {"submitted": [result["independent_us_per_task"], result["chain_us_per_task"]],
                         "replayed": [result["independent_replayed_us_per_task"],
                                      result["chain_replayed_us_per_task"]]},
                        ylabel="µs per empty task (submit + run + wait)", baseline=None,
                        title=f"{result['config']['tasks']} empty tasks")
    g = result["gemm"]
    common.speedup_bars(axes[1], [f"{g['size']}², tile {g['tile']}\n({g['tasks']} tasks)"],
                        {"numpy / DAG": [g["numpy_over_dag"]]},
                        ylabel="numpy matmul time / DAG time (> 1: DAG faster)",
                        title=f"tiled GEMM, {g['blas_threads']} BLAS threads for numpy")
    env = result["environment"]
    common.save(fig, path, f"lotus_rt overhead, {env['engine']} {env['starpu_version'] or ''}, policy "
                           f"{env['policy']}, {len(env['workers'])} workers ({env['date']}, {env['hostname']})")


def main(argv: list[str] | None = None) -> int:
    p = common.parser("overhead", __doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=None, help="tasks per run (default 20000; 2000 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 5; 3 with --quick)")
    p.add_argument("--size", type=int, default=None, help="GEMM size (default 2048; 512 with --quick)")
    p.add_argument("--tile", type=int, default=None, help="GEMM tile (default 256; 128 with --quick)")
    args = p.parse_args(argv)
    q = args.quick
    tasks, repeats = args.tasks or (2000 if q else 20000), args.repeats or (3 if q else 5)
    size, tile = args.size or (512 if q else 2048), args.tile or (128 if q else 256)

    import lotus_rt
    rt = lotus_rt.runtime()
    independent_tasks(rt, 1000), chain_tasks(rt, 1000)  # warm-up
    samples = submitted_and_replayed(rt, tasks, repeats)
    latency = wait_latency(rt, 10 if q else 40)
    gemm = gemm_versus_numpy(rt, size, tile, repeats)

    result = {
        "scenario": "overhead", "quick": q, "environment": common.environment(rt),
        "config": {"tasks": tasks, "repeats": repeats},
        **{f"{k}_us_per_task": common.median_spread(v) for k, v in samples.items()},
        "replay_speedup": {k: common.median_spread([s / r for s, r in zip(samples[k], samples[k + "_replayed"])])
                           for k in ("independent", "chain")},
        "wait_latency_ms": common.median_spread(latency) if latency else None,
        "gemm": gemm,
    }
    path = common.write_result(args.out, "overhead", q, result)
    plot(result, common.png_path(path))
    env = result["environment"]
    print(f"engine={env['engine']} policy={env['policy']} workers={len(env['workers'])} "
          f"(StarPU {env['starpu_version']})")
    for label, key in (("independent empty task", "independent"), ("dependent chain task  ", "chain")):
        for how, suffix in (("submitted", ""), ("replayed ", "_replayed")):
            s = result[f"{key}{suffix}_us_per_task"]
            print(f"{label}, {how}: {s['median']:6.2f} us/task (min {s['min']:.2f}, max {s['max']:.2f})")
        print(f"{label}: replay {result['replay_speedup'][key]['median']:.2f}x faster (per round)")
    if latency:
        s = result["wait_latency_ms"]
        print(f"wait() returns {s['median']:.3f} ms after the last task ends (min {s['min']:.3f}, max {s['max']:.3f})")
    print(f"tiled GEMM {size}^2 tile {tile}: DAG {gemm['dag_s']['median']:.3f} s, numpy "
          f"{gemm['numpy_s']['median']:.3f} s, numpy/DAG = {gemm['numpy_over_dag']['median']:.2f}x "
          f"(max rel error {gemm['max_rel_error']:.1e})")
    print(f"wrote {path} and {common.png_path(path)}")
    ok = common.report_errors([("tiled GEMM", gemm["max_rel_error"], gemm["tolerance"])])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
