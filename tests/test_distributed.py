"""lotus_rt.distributed on loopback ranks: StarPU-MPI under mpirun, one CPU worker per rank.

Each configuration (2 and 3 ranks) runs tests/distributed_checks.py once under mpirun (through
coreutils ``timeout``, so a hang is a failure and never blocks the suite) and the tests below
compare what the ranks wrote: owner-computes placement and StarPU-MPI reductions in the binding,
an einsum and a two-einsum sweep across ranks against numpy.einsum, and five data-parallel
training steps against one process training on the full batch (float64). A task that raises on
one rank must end every rank with a clear error, quickly. Skipped, saying why, without mpirun or
without a binding compiled with StarPU-MPI.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, mpi_skip_reason, python_path

CHECKS = REPO_ROOT / "tests" / "distributed_checks.py"
NPARAMS = 6  # the data-parallel model: three Linear layers, weight and bias each


SKIP_REASON = mpi_skip_reason()
needs_mpi = pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))


def rank_env() -> dict[str, str]:
    env = dict(os.environ, STARPU_NCPU="1", STARPU_WORKERS_NOBIND="1", STARPU_SILENT="1",
               OMPI_MCA_mpi_yield_when_idle="1")
    env["PYTHONPATH"] = python_path(env.get("PYTHONPATH"))
    env.pop("LOTUS_ENGINE", None)
    return env


def mpirun_args(nranks: int) -> list[str]:
    args = ["mpirun", "-np", str(nranks), "--oversubscribe", "--bind-to", "none"]
    return args + (["--allow-run-as-root"] if os.geteuid() == 0 else [])


def run_ranks(nranks: int, out_dir: pathlib.Path, checks: list[str], timeout: int,
              launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """The checks on ``nranks`` ranks, killed (every rank) past ``timeout`` seconds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    launcher = launcher or mpirun_args(nranks)
    command = ["timeout", "-k", "10", str(timeout), *launcher, sys.executable, str(CHECKS), str(out_dir), *checks]
    return subprocess.run(command, env=rank_env(), cwd=str(REPO_ROOT), capture_output=True, text=True,
                          timeout=timeout + 30)


def results(out_dir: pathlib.Path, nranks: int) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nranks)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def ranks(request, tmp_path_factory):
    """Every rank's results of one run of the binding, einsum and data-parallel checks."""
    nranks = request.param
    out_dir = tmp_path_factory.mktemp(f"ranks{nranks}")
    proc = run_ranks(nranks, out_dir, ["binding", "einsum", "dp"], timeout=150)
    assert proc.returncode == 0, f"mpirun -np {nranks} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return results(out_dir, nranks), out_dir


@needs_mpi
def test_every_rank_runs_one_cpu_worker_in_a_world_of_all_ranks(ranks):
    res, _ = ranks
    assert [r["rank"] for r in res] == list(range(len(res)))
    assert {r["size"] for r in res} == {len(res)} and {r["workers"] for r in res} == {1}


@needs_mpi
def test_owner_computes_runs_each_task_on_the_owner_of_the_data_it_writes(ranks):
    res, _ = ranks
    size = len(res)
    for r in res:
        assert r["owner_computes"]["ran_here"] == [r["rank"]]  # task k writes data[k], owned by rank k
        assert r["owner_computes"]["moved_ran_here"] == (r["rank"] == size - 1)  # execute_on=size-1
    # data[k] = data[k+1] + 10(k+1), in submission order; then data[0] = data[1] + 0.5 on rank size-1
    expected = [float(k) for k in range(size)]
    for k in range(size):
        expected[k] = expected[(k + 1) % size] + 10.0 * (k + 1)
    expected[0] = expected[1] + 0.5
    for r in res:  # every rank received every result from its owner
        assert [v[0] for v in r["owner_computes"]["values"]] == expected


@needs_mpi
def test_redux_sums_every_rank_contribution_on_the_owner(ranks):
    res, _ = ranks
    total = float(sum(range(1, len(res) + 1)))
    for r in res:
        assert r["redux"] == [total] * 4


@needs_mpi
def test_bad_input_is_one_clear_error_before_any_task(ranks):
    res, _ = ranks
    for r in res:
        errors = r["errors"]
        assert set(errors) == {"unowned", "owner_range", "mode", "redux_unset"}
        assert "has no owner rank" in errors["unowned"] and "owner must be a rank" in errors["owner_range"]
        assert "valid modes: R, W, RW, REDUX" in errors["mode"] and "world.reduction" in errors["redux_unset"]


@needs_mpi
def test_a_distributed_einsum_and_sweep_equal_numpy_einsum(ranks):
    res, _ = ranks
    for r in res:
        assert r["einsum_err"] < 1e-12
        assert r["sweep_err"] < 1e-12
    placements = [r["placement"] for r in res]
    assert all(p == placements[0] for p in placements)  # every rank placed every task the same way
    assert len({rank for _, rank in placements[0]}) >= 2  # the sweep's tasks ran on several ranks
    assert sum(r["tasks_here"] for r in res) == len(placements[0])  # each task ran exactly once


@needs_mpi
def test_five_data_parallel_steps_match_one_process_and_agree_on_every_rank(ranks):
    res, out_dir = ranks
    params = [np.load(out_dir / f"params{r}.npz") for r in range(len(res))]
    for other in params[1:]:
        for key in params[0].files:
            assert np.array_equal(params[0][key], other[key])  # the same bytes on every rank
    for r in res:
        assert r["dp_err"] < 1e-6, r["dp_err"]  # vs torch on the full batch, same steps (float64)


@needs_mpi
def test_the_gradient_reduction_is_tasks_of_the_step_graph(ranks):
    res, _ = ranks
    size = len(res)
    # per parameter: size-1 sums, one scale on the root, size-1 broadcast copies
    assert sum(r["dp_reduction_tasks_here"] for r in res) == NPARAMS * (2 * (size - 1) + 1)
    for r in res:
        names = [name for name, _, _ in r["dp_trace"]]
        assert sum(n.startswith("allreduce ") for n in names) == 5 * r["dp_reduction_tasks_here"]


@needs_mpi
@pytest.mark.parametrize("nranks", [2, 3])
def test_a_task_that_raises_on_one_rank_ends_every_rank_with_a_clear_error(tmp_path, nranks):
    launcher = None
    if nranks == 2:  # through the command line's launcher
        launcher = [sys.executable, "-m", "lotus_rt.cli", "launch", "-n", "2", "--"]
    proc = run_ranks(nranks, tmp_path, ["fail"], timeout=60, launcher=launcher)
    assert proc.returncode not in (0, 124, 137), f"rc={proc.returncode}: a hang or no failure\n{proc.stderr[-2000:]}"
    output = proc.stdout + proc.stderr
    assert f"deliberate failure on rank {nranks - 1}" in output and "CodeletError" in output
    assert f"rank {nranks - 1} of {nranks}: uncaught CodeletError: ending every rank (MPI_Abort)" in output
    assert not any((tmp_path / f"rank{r}.json").exists() for r in range(nranks))  # no rank went on


@needs_mpi
@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py is not installed (optional)")
def test_init_on_a_given_communicator(tmp_path):
    proc = run_ranks(3, tmp_path, ["comm"], timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = results(tmp_path, 3)
    assert [(r["world_rank"], r["rank"], r["size"]) for r in res] == [(0, 0, 2), (1, 1, 2), (2, 0, 1)]
    assert [r["redux"][0] for r in res] == [3.0, 3.0, 1.0]


def test_without_starpu_mpi_the_error_names_what_is_missing(monkeypatch):
    import lotus_rt.starpu.mpi as binding
    from lotus_rt.errors import StarPUUnavailable
    from lotus_rt.starpu import _build

    def not_found(name):
        raise _build.MPINotFound(f"pkg-config finds no {name.replace('starpu-', 'starpumpi-')}")

    monkeypatch.setattr(binding, "load", lambda: (None, object()))  # a binding without lotus_mpi_*
    monkeypatch.setattr(_build, "find_starpumpi", not_found)
    binding.load_mpi.cache_clear()
    try:
        with pytest.raises(StarPUUnavailable, match=r"needs StarPU-MPI.*finds no starpumpi-.*make deps"):
            binding.load_mpi()
        assert not binding.mpi_available()
    finally:
        binding.load_mpi.cache_clear()


def test_launch_refuses_a_missing_command_or_rank_count(run_py):
    proc = run_py("import sys, lotus_rt.cli as c; sys.exit(c.main(['launch', '-n', '2']))")
    assert proc.returncode == 2 and "give the command after --" in proc.stderr
    proc = run_py("import sys, lotus_rt.cli as c; sys.exit(c.main(['launch', '-n', '0', '--', 'true']))")
    assert proc.returncode == 2 and "-n must be at least 1" in proc.stderr
