"""The real-space parallel sweep (after Stoudenmire & White 2013): two segments of the chain
swept concurrently as independent task graphs, joined at their boundary.

Layout. The chain is cut at site m (default N/2) into a left segment (sites 0..m-1) and a right
segment (sites m..N-1). Between sweeps the labelled centre sits at site m-1, as in the serial
sweep. A sweep is:

1. fork: site m gets a copy of the label index (``label_copy``: C1[c,t,b,l] = A_m[c,t,b] for
   every l; joined element-wise in l with the left centre C0 this is the same model), and the
   two boundary environments at cut m are computed: the left segment's right environment from
   C1, the right segment's left environment from C0. Both carry the label (L x D per sample).
2. concurrently, each segment with the other's boundary environment frozen as it was at the
   fork (the block-Jacobi step of real-space parallel DMRG): the left segment sweeps its bonds
   m-2 .. 0 .. m-2 with centre C0, the right segment m .. N-2 .. m with centre C1. Each bond
   tensor carries the label, and so does the environment on the far side of the segment (one
   shared label index: f_l = sum E_left[l] phi phi B[l] E_right[l]), so both segments fit the
   labels as directly as the serial sweep does. The two chains share no handle that either
   writes; StarPU runs them side by side, and their submissions are interleaved bond by bond.
3. join: the two centres are merged element-wise in l into the bond tensor of (m-1, m), which
   is updated like any other bond and split with the centre back at m-1.

2(m-1) + 2(N-m-1) + 1 = 2N-3 updates per sweep (the serial sweep does 2N-2), the two segments'
running concurrently. Each segment sees the other one sweep late, so the math is not the serial
sweep's: the two are compared on accuracy. ``warmup`` first sweeps run serially (the segments
then start from a model that already separates the classes). Memory: label-carrying
environments at every cut of both segments, about N n L D values on top of (N+1) n D.
"""
from __future__ import annotations

from typing import Any

from lotus_rt.mps import codelets as cl
from lotus_rt.mps.environments import submit_left, submit_right
from lotus_rt.mps.local import Chain, Model, Solver, Workspace, submit_bond
from lotus_rt.mps.serial import env_needed, schedule
from lotus_rt.runtime import Future, Handle, Runtime


class RealSpaceSweep:
    """Two segments swept concurrently; ``ntiles`` batch tiles per gradient within each."""

    name = "realspace"

    def __init__(self, ntiles: int = 1, boundary: int | None = None, warmup: int = 0):
        if int(ntiles) < 1:
            raise ValueError(f"realspace sweep: ntiles={ntiles!r} must be >= 1")
        self.ntiles_requested = int(ntiles)
        self.boundary_requested = boundary
        self.warmup = int(warmup)
        self._left: Workspace | None = None
        self._right: Workspace | None = None
        self._center: Handle | None = None

    def ntiles(self, n_workers: int) -> int:
        return self.ntiles_requested

    def min_sites(self) -> int:
        return 4

    def boundary(self, n_sites: int) -> int:
        m = n_sites // 2 if self.boundary_requested is None else int(self.boundary_requested)
        if not 2 <= m <= n_sites - 2:
            raise ValueError(f"realspace sweep: boundary={m} must leave at least 2 sites on each side "
                             f"of a chain of {n_sites}")
        return m

    def center_site(self, n_sites: int) -> int:
        return self.boundary(n_sites) - 1

    def labelled_cuts(self, n_sites: int) -> tuple[list[int], list[int]]:
        """(cuts of the right segment's labelled left environments, cuts of the left segment's
        labelled right environments)."""
        m = self.boundary(n_sites)
        return list(range(m, n_sites - 1)), list(range(2, m + 1))

    def segments(self, n_sites: int) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        m = self.boundary(n_sites)
        left = [(j, "left") for j in range(m - 2, -1, -1)] + [(j, "right") for j in range(0, m - 1)]
        right = [(j, "right") for j in range(m, n_sites - 1)] + [(j, "left") for j in range(n_sites - 2, m - 1, -1)]
        return left, right

    def visits(self, n_sites: int, index: int = 0) -> int:
        if index < self.warmup:
            return len(schedule(n_sites, self.center_site(n_sites)))
        left, right = self.segments(n_sites)
        return len(left) + len(right) + 1

    def start(self, rt: Runtime, bond_shape: tuple[int, ...], ntiles: int, dtype: Any) -> None:
        dim, d, _, _, labels = bond_shape
        self._left = Workspace(rt, bond_shape, ntiles, dtype)
        self._right = Workspace(rt, bond_shape, ntiles, dtype)
        self._center = rt.temporary((dim, d, dim, labels), dtype)

    def submit_sweep(self, rt: Runtime, model: Model, center: Handle, solver: Solver,
                     rows: list[Handle], index: int = 0) -> list[Future]:
        n_sites = len(model.sites)
        m = self.boundary(n_sites)
        envs, data = model.envs, model.data
        if index < self.warmup:
            visits = schedule(n_sites, m - 1)
            chain = Chain("serial", center, envs.main, envs.main, self._left)
            for i, (j, direction) in enumerate(visits):
                submit_bond(rt, model, chain, j, direction, solver, rows[i], env_after=env_needed(visits, i))
            return chain.futures
        # 1. fork: a copy of the label for the right segment, labelled boundary environments
        rt.submit(cl.LABEL_COPY, (model.sites[m], "R"), (self._center, "W"), name="fork.copy")
        submit_left(rt, data, envs.main[m - 1], center, envs.labelled_left[m], m - 1, "fork")
        submit_right(rt, data, envs.main[m + 1], self._center, envs.labelled_right[m], m, "fork")
        # 2. the two segments, submitted alternately so that both start at once
        left = Chain("left", center, envs.main, envs.labelled_right, self._left)
        right = Chain("right", self._center, envs.labelled_left, envs.main, self._right)
        v_left, v_right = self.segments(n_sites)
        row = iter(rows)
        futures: list[Future] = []
        for i in range(max(len(v_left), len(v_right))):
            for chain, visits in ((left, v_left), (right, v_right)):
                if i < len(visits):
                    j, direction = visits[i]
                    futures.append(submit_bond(rt, model, chain, j, direction, solver, next(row),
                                               env_after=env_needed(visits, i)))
        # 3. join across the boundary
        join = Chain("join", center, envs.main, envs.main, self._left)
        futures.append(submit_bond(rt, model, join, m - 1, "left", solver, next(row),
                                   pair=(center, self._center, "both")))
        return futures

    def release(self) -> None:
        for ws in (self._left, self._right):
            if ws is not None:
                ws.release()
        if self._center is not None:
            self._center.unregister_submit()
        self._left = self._right = self._center = None
