"""``python -m benchmarks SCENARIO [args...]``: run one benchmark scenario, or ``all`` of them.

``SCENARIOS`` maps each name to the module that implements it (``main(argv) -> int``, accepting
``--quick`` and ``--out DIR``). A module that is missing is reported as unavailable, so the
suite itself never fails to import. ``all`` runs every available scenario in its own
subprocess (so no scenario inherits another's StarPU runtime, whose idle workers would compete
with the next one), forwarding ``--quick`` and ``--out``; its exit status is 1 if any failed.

    python -m benchmarks --list
    python -m benchmarks policies --quick --out /tmp/bench
    python -m benchmarks all --quick
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

SCENARIOS: dict[str, tuple[str, str]] = {
    "overhead": ("benchmarks.overhead", "µs per empty task (independent, chain); tiled GEMM DAG vs numpy"),
    "einsum": ("benchmarks.einsum_bench", "tensorized-layer einsums: lotus_rt vs torch/numpy, FLOPs vs optimal"),
    "layers": ("benchmarks.layers_bench", "tensorized layers' training step: offloaded vs torch eager"),
    "model": ("benchmarks.model_bench", "whole models' training step as one task graph vs torch eager and torch.compile"),
    "policies": ("benchmarks.policies", "every StarPU scheduling policy on a tiled GEMM and a TT einsum"),
    "ncpu": ("benchmarks.ncpu", "STARPU_NCPU = 1..cores: speedup and parallel efficiency"),
    "tiles": ("benchmarks.tiles", "tile-size sweep of a tiled GEMM and a TT einsum vs untiled"),
    "hetero": ("benchmarks.hetero", "policies x worker mixes (cpu, gpu, hybrid): GEMM DAG, TT and Tucker steps"),
    "decompose": ("benchmarks.decompose_bench", "Tucker, Tucker-2, CP, TT: lotus_rt.decompose vs tensorly, error and time"),
    "mps": ("benchmarks.mps_bench", "MPS classifier by DMRG sweeps: accuracy vs D, serial vs parallel sweeps, TT DMRG vs Adam"),
    "distributed": ("benchmarks.distributed_bench", "data-parallel step at 1, 2, 4 ranks: StarPU-MPI vs torch DDP (gloo)"),
}


def unavailable_reason(module: str) -> str | None:
    """Why ``module`` cannot be run (not found), or None. Does not import it."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"module {module} is not there (not written yet?)"


def list_scenarios() -> None:
    width = max(map(len, SCENARIOS))
    for name, (module, description) in SCENARIOS.items():
        reason = unavailable_reason(module)
        print(f"{name:<{width}}  {description}" + (f"  [unavailable: {reason}]" if reason else ""))
    print(f"{'all':<{width}}  every available scenario above, one subprocess each (--quick, --out forwarded)")


def run_scenario(name: str, argv: list[str]) -> int:
    module, _ = SCENARIOS[name]
    reason = unavailable_reason(module)
    if reason:
        print(f"benchmarks: scenario {name!r} is unavailable: {reason}", file=sys.stderr)
        return 2
    return int(importlib.import_module(module).main(argv) or 0)


def run_all(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks all")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, metavar="DIR")
    args = p.parse_args(argv)
    forwarded = (["--quick"] if args.quick else []) + (["--out", args.out] if args.out else [])
    status = {}
    for name, (module, _) in SCENARIOS.items():
        reason = unavailable_reason(module)
        if reason:
            print(f"== {name}: skipped, unavailable: {reason}", flush=True)
            status[name] = "unavailable"
            continue
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        from benchmarks.common import python_path
        env = dict(os.environ, PYTHONPATH=python_path(os.environ.get("PYTHONPATH")))
        rc = subprocess.call([sys.executable, "-m", "benchmarks", name, *forwarded], cwd=REPO_ROOT, env=env)
        status[name] = f"exit {rc} ({time.perf_counter() - start:.0f} s)"
        if rc:
            status[name] = "FAILED, " + status[name]
    print("== summary: " + ", ".join(f"{n} {s}" for n, s in status.items()))
    return 1 if any(s.startswith("FAILED") for s in status.values()) else 0


def main(argv: list[str] | None = None) -> int:
    from lotus_rt.runtime import omp
    omp.shorten_spin(os.environ)  # before any scenario imports torch; subprocesses inherit it
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0] + "\n\nscenarios:")
        list_scenarios()
        return 0 if argv else 2
    if argv[0] == "--list":
        list_scenarios()
        return 0
    name, rest = argv[0], argv[1:]
    if name == "all":
        return run_all(rest)
    if name not in SCENARIOS:
        print(f"benchmarks: unknown scenario {name!r}; choose one of: {', '.join(SCENARIOS)}, all",
              file=sys.stderr)
        return 2
    return run_scenario(name, rest)


if __name__ == "__main__":
    sys.exit(main())
