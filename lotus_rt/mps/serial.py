"""The serial two-site DMRG sweep (Stoudenmire & Schwab 2016) as one chain of tasks.

Schedule. Between sweeps the centre (the site tensor carrying the label index) sits at site
c = N/2 - 1. A sweep moves it left to site 0, right to site N-1 and back to c, updating every
bond it crosses: c + (N-1) + (N-1-c) = 2(N-1) two-site updates (``lotus_rt.mps.local``), the
end bonds twice in a row (at a turn the environment between the two visits is not recomputed,
since neither needs it). Each update depends on the previous one through the centre and the
environment it leaves behind, so the chain itself is sequential; its tasks parallelise only
across batch tiles (``lotus_rt.mps.batch``). With one tile, which is this engine's default,
every step of the chain is a single task: the serial baseline.

The whole sweep is submitted at once; ``submit_sweep`` returns the futures of the SVD tasks in
schedule order, which the caller waits on to report progress.
"""
from __future__ import annotations

from typing import Any

from lotus_rt.mps.local import Chain, Model, Solver, Workspace, submit_bond
from lotus_rt.runtime import Future, Handle, Runtime


def center_site(n_sites: int) -> int:
    return max(n_sites // 2 - 1, 0)


def schedule(n_sites: int, center: int) -> list[tuple[int, str]]:
    """(bond, direction) of every update of a sweep that starts and ends with the centre at ``center``."""
    return ([(j, "left") for j in range(center - 1, -1, -1)]
            + [(j, "right") for j in range(0, n_sites - 1)]
            + [(j, "left") for j in range(n_sites - 2, center - 1, -1)])


def env_needed(visits: list[tuple[int, str]], i: int) -> bool:
    """Whether update i must leave an environment behind: not at a turn, where the next
    update is the same bond in the other direction."""
    return i + 1 >= len(visits) or visits[i + 1][0] != visits[i][0]


class SerialSweep:
    """Serial sweep engine; ``ntiles`` batch tiles per gradient (1: strictly one task at a time)."""

    name = "serial"

    def __init__(self, ntiles: int = 1):
        if int(ntiles) < 1:
            raise ValueError(f"{self.name} sweep: ntiles={ntiles!r} must be >= 1")
        self.ntiles_requested = int(ntiles)
        self._workspace: Workspace | None = None

    def ntiles(self, n_workers: int) -> int:
        return self.ntiles_requested

    def min_sites(self) -> int:
        return 2

    def center_site(self, n_sites: int) -> int:
        return center_site(n_sites)

    def labelled_cuts(self, n_sites: int) -> tuple[list[int], list[int]]:
        return [], []

    def visits(self, n_sites: int, index: int = 0) -> int:
        return len(schedule(n_sites, self.center_site(n_sites)))

    def start(self, rt: Runtime, bond_shape: tuple[int, ...], ntiles: int, dtype: Any) -> None:
        self._workspace = Workspace(rt, bond_shape, ntiles, dtype)

    def submit_sweep(self, rt: Runtime, model: Model, center: Handle, solver: Solver,
                     rows: list[Handle], index: int = 0) -> list[Future]:
        n_sites = len(model.sites)
        visits = schedule(n_sites, self.center_site(n_sites))
        chain = Chain(self.name, center, model.envs.main, model.envs.main, self._workspace)
        for i, (j, direction) in enumerate(visits):
            submit_bond(rt, model, chain, j, direction, solver, rows[i], env_after=env_needed(visits, i))
        return chain.futures

    def release(self) -> None:
        if self._workspace is not None:
            self._workspace.release()
            self._workspace = None
