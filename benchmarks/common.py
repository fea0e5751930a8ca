"""Helpers shared by every benchmark scenario: argument conventions, timing, environment, output.

A scenario is a module with ``main(argv) -> int``. It parses its arguments with ``parser()``
(which adds ``--quick`` and ``--out DIR``), times variants with ``interleaved()`` (a warm-up
is the caller's job; the rounds rotate the order of the variants so that a slow phase of a
noisy machine is spread over all of them), summarises samples with ``median_spread()``, records
``environment(rt)`` and writes ``<DIR>/<scenario>[_quick].json`` with ``write_result()`` and a
PNG with the same stem (``png_path()``) drawn with ``speedup_bars()`` / ``scaling_lines()``.

Workloads used by several scenarios live here too: ``gemm_workload`` (a tiled GEMM DAG,
``lotus_rt.workloads``) and ``tt_workload`` (a TT-matrix layer forward, ``lotus_rt.einsum``),
each timed per call and checked against NumPy.

    >>> median_spread([3.0, 1.0, 2.0])["median"]
    2.0
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import socket
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "benchmarks" / "out"
# max |out - ref| / max |ref| allowed against a float64 NumPy reference
MAX_REL_ERROR = {"float32": 1e-4, "float64": 1e-10}
SETTLE_S = 0.02  # untimed pause after each timed call (StarPU/BLAS threads calm down)
# With ``interleaved(warm=True)``: untimed calls for at least this long before a timed one. On the
# 2-core VM one untimed call was not enough after a settle sleep: torch.einsum (CP network) took
# 5.6-7.5 ms as the first-but-one call after 20-50 ms idle and 1.3 ms after 5+ ms of calls.
WARM_S = 0.01


# ---------------------------------------------------------------------------------- arguments

def parser(scenario: str, description: str, default_out: pathlib.Path = OUT_DIR) -> argparse.ArgumentParser:
    """An ArgumentParser with the arguments every scenario accepts: --quick and --out DIR."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks {scenario}", description=description)
    p.add_argument("--quick", action="store_true",
                   help="tiny configuration (seconds), written to <scenario>_quick.json")
    p.add_argument("--out", type=pathlib.Path, default=default_out, metavar="DIR",
                   help=f"output directory (default {default_out.relative_to(REPO_ROOT)}/)")
    return p


def int_list(text: str) -> list[int]:
    """``"32,64"`` -> ``[32, 64]`` (for comma-separated arguments)."""
    return [int(t) for t in text.split(",") if t.strip()]


# ---------------------------------------------------------------------------------- timing

def median_spread(samples: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the samples themselves."""
    samples = [float(s) for s in samples]
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": samples}


def interleaved(variants: Mapping[str, Callable[[], float]], repeats: int,
                settle_s: float | Mapping[str, float] = SETTLE_S, warm: bool = False) -> dict[str, list[float]]:
    """``repeats`` rounds, each calling every variant once (order rotated per round).

    Each variant returns the seconds of its timed region. ``settle_s`` (per variant or for all)
    is slept, untimed, after each call. ``warm``: each timed call follows untimed calls of the
    same variant (at least one, for at least WARM_S), so that thread pools that went to sleep
    during the settle (torch's, OpenBLAS's) and the idle cores are awake again: the time is
    that of a call in a loop, not of the first after a pause.
    """
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            if warm:
                start = time.perf_counter()
                variants[name]()
                while time.perf_counter() - start < WARM_S:
                    variants[name]()
            times[name].append(variants[name]())
            time.sleep(settle_s[name] if isinstance(settle_s, Mapping) else settle_s)
    return times


def rel_error(out: Any, reference: np.ndarray) -> float:
    """max |out - reference| / max |reference| (``out`` a NumPy array or a CPU torch tensor)."""
    out = np.asarray(out.numpy() if hasattr(out, "numpy") else out, dtype=np.float64)
    return float(np.max(np.abs(out - reference)) / np.max(np.abs(reference)))


def cpu_workers(rt) -> int:
    """Number of CPU workers of a runtime (at least 1: the inline engine has one)."""
    return max(1, sum(kind == "cpu" for kind, _ in rt.workers))


# ---------------------------------------------------------------------------------- environment

def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _processor() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor()


def environment(rt=None) -> dict[str, Any]:
    """Where and with what a result was measured. ``rt`` (a lotus_rt runtime) adds the engine,
    policy and workers; without one (a parent that only starts subprocesses) they are None."""
    import lotus_rt
    from lotus_rt import starpu
    from lotus_rt.runtime import omp, settings as settings_module

    settings = rt.settings if rt is not None else settings_module.read_settings()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "time": time.strftime("%H:%M:%S"),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "processor": _processor(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": _version("torch"),  # without importing torch (seconds) where it is not needed
        "opt_einsum": _version("opt_einsum"),
        "lotus_rt": lotus_rt.__version__,
        "starpu_version": starpu.version() if starpu.available() else None,
        "engine": rt.engine if rt is not None else None,
        "policy": rt.policy if rt is not None else None,
        "workers": [list(w) for w in rt.workers] if rt is not None else None,
        "blas_threads": _blas_threads(),
        "env": settings_module.starpu_env_report(settings),
        "lotus_env": {k: v for k, v in settings.report().items() if k in settings.explicit},
        "openmp_env": {k: v for k, v in settings.outside.items() if k in omp.USER_VARIABLES + ("OMP_NUM_THREADS",)},
    }


def _blas_threads() -> dict[str, int]:
    """Threads per call of each loaded BLAS library, as threadpoolctl sees them now."""
    from threadpoolctl import threadpool_info
    return {f"{i['internal_api']} {i.get('version') or ''}".strip(): i["num_threads"]
            for i in threadpool_info() if i["user_api"] == "blas"}


def subprocess_env(starpu_home: str | os.PathLike, **overrides: str) -> dict[str, str]:
    """This process's environment for a benchmark subprocess: silent StarPU with a private
    STARPU_HOME (its performance models), the repository importable, plus ``overrides``."""
    env = dict(os.environ)
    env.update({"STARPU_SILENT": "1", "STARPU_HOME": str(starpu_home)})
    env["PYTHONPATH"] = python_path(env.get("PYTHONPATH"))
    env.update(overrides)
    return env


def python_path(previous: str | None) -> str:
    """PYTHONPATH for a child that must import what this process imports: the folder lotus_rt
    was imported from first (an installed copy, as on the GPU machine, must not be shadowed by
    the checkout, whose lotus_rt lacks the installed ``lotus_rt.kernels``), then the checkout
    (``benchmarks``), then ``previous``."""
    import lotus_rt
    first = str(pathlib.Path(lotus_rt.__file__).resolve().parent.parent)
    parts = [first, str(REPO_ROOT)] + (previous.split(os.pathsep) if previous else [])
    return os.pathsep.join(dict.fromkeys(p for p in parts if p))


# ---------------------------------------------------------------------------------- output

def result_path(out_dir: pathlib.Path, name: str, quick: bool) -> pathlib.Path:
    return pathlib.Path(out_dir) / f"{name}{'_quick' if quick else ''}.json"


def png_path(json_path: pathlib.Path) -> pathlib.Path:
    return json_path.with_suffix(".png")


def write_result(out_dir: pathlib.Path, name: str, quick: bool, result: Mapping[str, Any]) -> pathlib.Path:
    """Write ``result`` as ``<out_dir>/<name>[_quick].json``; returns that path."""
    path = result_path(out_dir, name, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


def report_errors(checked: Sequence[tuple[str, float, float]]) -> bool:
    """Print every (label, error, tolerance) above its tolerance to stderr; True when all pass."""
    import sys
    bad = [(label, err, tol) for label, err, tol in checked if not err <= tol]
    for label, err, tol in bad:
        print(f"ERROR: {label}: relative error {err:.2e} > {tol:g}", file=sys.stderr)
    return not bad


# ---------------------------------------------------------------------------------- workloads

TT_EQUATION = "zijkl,iaq,qjbr,rkcs,sld->zabcd"


def tt_shapes(batch: int, rank: int) -> tuple[tuple[int, ...], ...]:
    """Operand shapes of a TT-matrix layer 1024 -> 1024 (4*8*8*4 in and out), TT-ranks ``rank``."""
    return ((batch, 4, 8, 8, 4), (4, 4, rank), (rank, 8, 8, rank), (rank, 8, 8, rank), (rank, 4, 4))


def einsum_tasks(plan) -> int:
    """Number of tasks a ``lotus_rt.tn`` plan submits (a tiled step is one task per tile)."""
    return sum(plan.ntiles if s.tiled else 1 for s in plan.steps)


@dataclass
class Workload:
    """One timed call (``call() -> seconds``), its task count and a correctness check
    (``error() -> max relative error`` of one call against a float64 NumPy reference)."""

    name: str
    params: dict[str, Any]
    tasks: int
    call: Callable[[], float]
    error: Callable[[], float]
    tolerance: float
    extra: dict[str, Any] = field(default_factory=dict)  # more fields for the JSON
    inputs: tuple[np.ndarray, ...] = ()  # the operands, for a caller timing a reference on them


def gemm_workload(rt, size: int, tile: int, dtype: str = "float64", tolerance: float | None = None,
                  check_rows: int | None = None, seed: int = 0) -> Workload:
    """C = A @ B (``size`` square, ``dtype``) as a DAG of ``tile`` x ``tile`` GEMM tasks
    (``lotus_rt.workloads.gemm_dag``).

    The timed region covers registering the tiles, submitting, running and unregistering; the
    tiling and reassembly copies are not timed (a tiled application keeps its data tiled). The
    check compares C with float64 NumPy: all of it, or with ``check_rows`` only about that many
    rows, the first of every tile row (a full float64 product of a large size would take longer
    than the benchmark). ``tolerance`` defaults to ``MAX_REL_ERROR[dtype]``.
    """
    from lotus_rt.workloads import gemm_dag, split_tiles

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    a_tiles, b_tiles = split_tiles(a, tile), split_tiles(b, tile)
    nt = math.ceil(size / tile)

    def call() -> float:
        start = time.perf_counter()
        gemm_dag(rt, a_tiles, b_tiles)
        return time.perf_counter() - start

    def error() -> float:
        c_tiles = gemm_dag(rt, a_tiles, b_tiles)
        if check_rows is None:
            return rel_error(np.block(c_tiles), a.astype(np.float64) @ b.astype(np.float64))
        per_row = max(1, check_rows // nt)
        rows = [i * tile + r for i in range(nt) for r in range(min(per_row, len(c_tiles[i][0])))]
        got = np.concatenate([np.concatenate(row, axis=1)[:per_row] for row in c_tiles])
        return rel_error(got, a[rows].astype(np.float64) @ b.astype(np.float64))

    name = f"gemm{size}_t{tile}" + ("" if dtype == "float64" else f"_{dtype}")
    return Workload(name, {"size": size, "tile": tile, "dtype": dtype}, nt ** 3, call, error,
                    MAX_REL_ERROR[dtype] if tolerance is None else tolerance, inputs=(a, b))


def tt_workload(rt, batch: int, rank: int, tile: int | None, seed: int = 0) -> Workload:
    """A TT-matrix layer forward (``TT_EQUATION``, float32) with ``lotus_rt.einsum(tile=tile)``
    (``None``: the planner's choice). The task count comes from the plan."""
    import opt_einsum

    import lotus_rt
    from lotus_rt import tn

    rng = np.random.default_rng(seed)
    ops = [rng.standard_normal(s).astype(np.float32) for s in tt_shapes(batch, rank)]
    plan = tn.plan(TT_EQUATION, *ops, tile=tile)

    def call() -> float:
        start = time.perf_counter()
        lotus_rt.einsum(TT_EQUATION, *ops, tile=tile)
        return time.perf_counter() - start

    def error() -> float:
        reference = opt_einsum.contract(TT_EQUATION, *[op.astype(np.float64) for op in ops],
                                        optimize="optimal")
        return rel_error(lotus_rt.einsum(TT_EQUATION, *ops, tile=tile), reference)

    label = "auto" if tile is None else tile
    return Workload(f"tt_r{rank}_b{batch}_t{label}",
                    {"batch": batch, "rank": rank, "tile": tile, "dtype": "float32",
                     "equation": TT_EQUATION},
                    einsum_tasks(plan), call, error, MAX_REL_ERROR["float32"],
                    {"ntiles": plan.ntiles, "plan_tile": plan.tile}, tuple(ops))


def measure(workloads: Sequence[Workload], repeats: int, warmup: int = 1) -> dict[str, dict[str, Any]]:
    """Check each workload, warm it up, then time ``repeats`` interleaved rounds.

    The correctness call doubles as the first warm-up call.
    """
    errors = {w.name: w.error() for w in workloads}
    for _ in range(warmup - 1):
        for w in workloads:
            w.call()
    times = interleaved({w.name: w.call for w in workloads}, repeats)
    return {w.name: {"params": w.params, "tasks": w.tasks, **w.extra,
                     "time_s": median_spread(times[w.name]),
                     "max_rel_error": errors[w.name], "tolerance": w.tolerance}
            for w in workloads}


# ---------------------------------------------------------------------------------- plots

def figure(ncols: int = 1, width: float = 6.0, height: float = 4.2):
    """A matplotlib (Agg) figure with ``ncols`` axes side by side: ``(fig, [axes])``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save(fig, path: pathlib.Path, title: str) -> pathlib.Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _median_and_bars(values: Sequence[Any]) -> tuple[list[float], list[list[float]] | None]:
    """Medians and (lower, upper) error-bar lengths of floats or ``median_spread`` dicts."""
    if all(isinstance(v, Mapping) for v in values):
        med = [v["median"] for v in values]
        return med, [[m - v["min"] for m, v in zip(med, values)],
                     [v["max"] - m for m, v in zip(med, values)]]
    return [float(v) for v in values], None


def speedup_bars(ax, groups: Sequence[str], series: Mapping[str, Sequence[Any]], *, ylabel: str,
                 title: str = "", baseline: float | None = 1.0, log: bool = False,
                 rotate: bool = False, legend_title: str | None = None) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series in each group.

    Values are floats or ``median_spread`` dicts (drawn with min-max error bars). ``baseline``
    draws a dashed reference line (1.0: "as fast as the reference").
    """
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for k, (label, values) in enumerate(series.items()):
        med, bars = _median_and_bars(values)
        ax.bar(x + (k - (len(series) - 1) / 2) * width, med, width, yerr=bars, capsize=2, label=label)
    if baseline is not None:
        ax.axhline(baseline, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, list(groups), rotation=60 if rotate else 0, ha="right" if rotate else "center",
                  fontsize=8 if rotate else 9)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(title=legend_title, fontsize=8)


def scaling_lines(ax, x: Sequence[float], series: Mapping[str, Sequence[float]], *, xlabel: str,
                  ylabel: str = "speedup", title: str = "", ideal: bool = True) -> None:
    """Speedup against a resource count (workers), one line per series, and y = x / x[0]."""
    for label, values in series.items():
        ax.plot(x, values, marker="o", label=label)
    if ideal:
        ax.plot(x, [v / x[0] for v in x], color="black", linestyle="--", linewidth=0.8, label="ideal")
    ax.set_xticks(list(x))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
