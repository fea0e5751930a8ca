"""One two-site DMRG update as a task graph: merge, local solve, truncated SVD, environment.

Algorithm, for bond (j, j+1) with the centre on one of its two sites:

1. ``merge``: the bond tensor B = A_j C_{j+1} (moving left) or C_j A_{j+1} (moving right).
2. local solve of min_B 1/(2n) sum_n |<Phi_n, B> - onehot(y_n)|^2 + reg/2 |B|^2, where
   Phi_n = E_left(cut j) (x) phi_j (x) phi_{j+1} (x) E_right(cut j+2) are the projected inputs:
   ``cg``: conjugate gradients warm-started at B, ``iters`` iterations (each one H p product);
   ``gd``: ``iters`` gradient steps of length ``lr``. Every gradient and every H p is a sum over
   batch tiles: one task per tile (two GEMMs of n_t x 4D x D L), then a binary tree of add tasks,
   then one small task that does the CG (or GD) vector update.
3. ``split``: SVD of B, truncated to ``max_rank`` and ``cutoff``, the label moving with the
   centre in the sweep's direction; the orthonormal factor becomes site j (moving right) or
   j+1 (moving left). The kept rank and discarded weight go to ``info[j]``.
4. the environment the next bond needs: left cut j+1 (moving right) or right cut j+1.

Nothing here waits: every step reads and writes handles, and StarPU orders the tasks by their
data (sequential consistency per handle). A ``Chain`` is one sequence of updates that must run
in order (a whole serial sweep, or one segment of a real-space parallel sweep); its
``Workspace`` (bond tensor, CG vectors, per-tile partial sums: engine temporaries) is reused at
every bond of the chain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lotus_rt.mps import codelets as cl
from lotus_rt.mps.environments import Environments, TiledData, submit_left, submit_right
from lotus_rt.runtime import Future, Handle, Runtime

SOLVERS = ("cg", "gd")


@dataclass(frozen=True)
class Solver:
    """How a bond is updated and truncated."""

    max_rank: int
    kind: str = "cg"
    iters: int = 5
    reg: float = 1e-3
    lr: float = 1.0
    cutoff: float = 1e-10


class Workspace:
    """Temporaries of one chain: x (the bond tensor), CG's r and p, and per-tile partials."""

    def __init__(self, rt: Runtime, bond_shape: tuple[int, ...], ntiles: int, dtype: Any):
        size = int(np.prod(bond_shape))
        self.x = rt.temporary(bond_shape, dtype)
        self.r = rt.temporary(bond_shape, dtype)
        self.p = rt.temporary(bond_shape, dtype)
        self.grad = [rt.temporary((size + 2,), dtype) for _ in range(ntiles)]
        self.hv = [rt.temporary((size,), dtype) for _ in range(ntiles)]

    def release(self) -> None:
        for h in [self.x, self.r, self.p, *self.grad, *self.hv]:
            h.unregister_submit()


@dataclass
class Chain:
    """A sequence of bond updates that runs in order.

    ``center`` is the handle of the centre this chain moves; ``left`` maps a cut to the per-tile
    handles of its left environment (``envs.main`` or a labelled store), ``right`` likewise.
    """

    name: str
    center: Handle
    left: Any
    right: Any
    workspace: Workspace
    futures: list[Future] = field(default_factory=list)


@dataclass
class Model:
    """What every chain of a fit shares: data, environments, site handles, per-bond info rows."""

    data: TiledData
    envs: Environments
    sites: list[Handle]
    info: list[Handle]


def _sum_tree(rt: Runtime, parts: list[Handle], name: str) -> Handle:
    level = list(parts)
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level) - 1, 2):
            rt.submit(cl.ADD, (level[i + 1], "R"), (level[i], "RW"), name=f"{name}.sum")
            nxt.append(level[i])
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _tiles_grad(rt: Runtime, model: Model, chain: Chain, j: int, vec: Handle, name: str) -> Handle:
    data, ws = model.data, chain.workspace
    left, right = chain.left[j], chain.right[j + 2]
    for t in range(data.ntiles):
        rt.submit(cl.BOND_GRAD, (left[t], "R"), (data.feat[j][t], "R"), (data.feat[j + 1][t], "R"),
                  (right[t], "R"), (vec, "R"), (data.label[t], "R"), (ws.grad[t], "W"), name=f"{name}.grad[{t}]")
    return _sum_tree(rt, ws.grad, name)


def _tiles_hv(rt: Runtime, model: Model, chain: Chain, j: int, vec: Handle, name: str) -> Handle:
    data, ws = model.data, chain.workspace
    left, right = chain.left[j], chain.right[j + 2]
    for t in range(data.ntiles):
        rt.submit(cl.BOND_HV, (left[t], "R"), (data.feat[j][t], "R"), (data.feat[j + 1][t], "R"),
                  (right[t], "R"), (vec, "R"), (ws.hv[t], "W"), name=f"{name}.hv[{t}]")
    return _sum_tree(rt, ws.hv, name)


def submit_bond(rt: Runtime, model: Model, chain: Chain, j: int, direction: str, solver: Solver,
                state: Handle, *, env_after: bool = True, pair: tuple[Handle, Handle, str] | None = None) -> Future:
    """Submit the update of bond (j, j+1); returns the future of its SVD task.

    ``state`` (3 float64: CG's r.r, the tiles' summed squared error and number of correct
    predictions before the update) receives the progress of this visit. ``pair`` = (left
    tensor, right tensor, which of them carries the label: "left", "right" or "both") overrides the two
    tensors merged, by default the centre and site j+1 (moving right) or site j and the centre
    (moving left). The SVD writes the centre and the site it leaves.
    """
    name, ws, n = chain.name, chain.workspace, model.data.n_samples
    if direction == "right":
        a, b, side = pair or (chain.center, model.sites[j + 1], "left")
        out_left, out_right = model.sites[j], chain.center
    else:
        a, b, side = pair or (model.sites[j], chain.center, "right")
        out_left, out_right = chain.center, model.sites[j + 1]
    rt.submit(cl.MERGE, (a, "R"), (b, "R"), (ws.x, "W"), name=f"{name}.merge", center=side)
    if solver.kind == "cg":
        grad = _tiles_grad(rt, model, chain, j, ws.x, name)
        rt.submit(cl.CG_INIT, (grad, "R"), (ws.x, "RW"), (ws.r, "W"), (ws.p, "W"), (state, "W"),
                  name=f"{name}.cg", n_samples=n, reg=solver.reg)
        for _ in range(solver.iters):
            hv = _tiles_hv(rt, model, chain, j, ws.p, name)
            rt.submit(cl.CG_STEP, (hv, "R"), (ws.x, "RW"), (ws.r, "RW"), (ws.p, "RW"), (state, "RW"),
                      name=f"{name}.cg", n_samples=n, reg=solver.reg)
    else:
        for step in range(solver.iters):
            grad = _tiles_grad(rt, model, chain, j, ws.x, name)
            rt.submit(cl.GD_STEP, (grad, "R"), (ws.x, "RW"), (state, "RW" if step else "W"),
                      name=f"{name}.gd", n_samples=n, reg=solver.reg, lr=solver.lr)
    future = rt.submit(cl.SPLIT, (ws.x, "R"), (out_left, "W"), (out_right, "W"), (model.info[j], "W"),
                       name=f"{name}.svd", direction=direction, max_rank=solver.max_rank, cutoff=solver.cutoff)
    if env_after:
        if direction == "right":
            submit_left(rt, model.data, chain.left[j], out_left, chain.left[j + 1], j, name)
        else:
            submit_right(rt, model.data, chain.right[j + 2], out_right, chain.right[j + 1], j + 1, name)
    chain.futures.append(future)
    return future
