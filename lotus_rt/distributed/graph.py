"""Contraction graphs across ranks: data placed by an owner map, tasks placed by owner computes.

    g = lotus_rt.distributed.Graph()
    x = g.put(x_array, owner=0)                        # every rank, same order
    cores = [g.put(core if r == world.rank else Remote(core_shape, dtype), owner=r)
             for r, core in ...]                       # e.g. one TT core / MPS segment per rank
    y = g.einsum("bi,ijk,kl->bjl", x, *cores)          # tasks on the ranks that own their data
    result = g.fetch(y)                                # on every rank (or one: to=rank)

How. ``einsum`` plans the network with lotus_rt's planner (``tn.plan_for``: opt_einsum's path,
GEMM-shaped steps) untiled (a rank's workers still run independent steps side by side) and
submits it through ``tn.lower.submit_forward`` on a placing runtime (``_Placed``) that sends
every task through ``World.submit``. Operands live where the owner map puts them (``put``: the
owner registers its array, the other ranks a placeholder with no home); an intermediate is
owned by the rank that owns the largest input of the step writing it (its owner is decided at
that step, the same on every rank), so the step runs there and StarPU-MPI moves only the smaller
inputs. The result is owned by ``owner=`` or, by default, by the same rule. Results stay where
they were computed, so one einsum can feed another (a sweep) without gathering in between;
``fetch`` copies a result into a fresh array on the ranks that ask (a task on each of them
reading it: StarPU-MPI moves it from its owner).

``placement`` lists (task name, rank) of every task submitted, the same on every rank, and
``tasks_here`` how many ran on this rank.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from lotus_rt.distributed.codelets import COPY
from lotus_rt.runtime.core import Codelet, Handle
from lotus_rt.runtime.mpi import World, world as current_world


@dataclass(frozen=True)
class Remote:
    """An operand held by another rank: only its shape and dtype are needed here."""

    shape: tuple[int, ...]
    dtype: Any

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))


@dataclass(frozen=True)
class Tensor:
    """Data of a Graph: its handle on this rank, shape, dtype and owner rank (None: not yet
    placed, the result of an einsum whose last step has not been submitted)."""

    handle: Handle
    shape: tuple[int, ...]
    dtype: np.dtype
    graph: "Graph"

    @property
    def owner(self) -> int:
        return self.graph.world.owner(self.handle)


class _Placed:
    """The runtime tn.lower submits to: every task through World.submit, placing the data a step
    writes on the owner of its largest input (or on the owner asked for) before submitting."""

    def __init__(self, graph: "Graph"):
        self.graph, self.world = graph, graph.world
        self.settings = self.world._rt.settings
        self.forced: dict[int, int] = {}  # id(handle) -> owner asked for

    def temporary(self, shape: tuple[int, ...], dtype: Any) -> Handle:
        handle = self.world._rt.temporary(shape, dtype)
        self.graph._temporaries.append(handle)
        return handle

    def register(self, array: np.ndarray) -> Handle:
        raise NotImplementedError("distributed graphs use untiled plans: their outputs are single handles")

    def submit(self, codelet: Codelet, *accesses: tuple[Handle, str], priority: int = 0, name: str | None = None,
               **kwargs: Any) -> Any:
        world = self.world
        reads = [h for h, mode in accesses if mode == "R"]
        for handle, mode in accesses:
            if mode != "R" and handle not in world._data:
                owner = self.forced.pop(id(handle), None)
                if owner is None:
                    largest = max(reads, key=lambda h: h.nbytes) if reads else None  # first of the largest
                    owner = world.owner(largest) if largest is not None else world.rank
                world.attach(handle, owner)
        written = next(h for h, mode in accesses if mode != "R")
        self.graph.placement.append((name or codelet.name, world.owner(written)))
        future = world.submit(codelet, *accesses, priority=priority, name=name, **kwargs)
        if future is not None:
            self.graph.tasks_here += 1
        return future


class Graph:
    """Tensors placed on ranks and einsums between them (see the module docstring)."""

    def __init__(self, world: World | None = None, optimize: str | None = None):
        self.world = world or current_world()
        self.optimize = optimize
        self.placement: list[tuple[str, int]] = []
        self.tasks_here = 0
        self._handles: list[Handle] = []  # registered arrays (put by their owner)
        self._temporaries: list[Handle] = []
        self._placed = _Placed(self)

    def put(self, data: np.ndarray | Remote, owner: int) -> Tensor:
        """Place data on ``owner``: the owner passes the array (registered zero copy: keep it
        alive and unchanged until ``release``); the other ranks the array or a ``Remote``."""
        world = self.world
        owner = world._check_owner(owner)
        if isinstance(data, Remote):
            if owner == world.rank:
                raise ValueError(f"put(): rank {owner} owns this operand, so it must pass the array, not a Remote")
            shape, dtype = data.shape, data.dtype
        elif isinstance(data, np.ndarray):
            shape, dtype = data.shape, data.dtype
        else:
            raise TypeError(f"put(): expected a numpy array or a Remote, got {type(data).__name__}")
        if dtype.kind not in "fc":
            raise TypeError(f"put(): dtype {dtype} is not a float or complex dtype")
        if owner == world.rank:
            handle = world.register(np.ascontiguousarray(data), owner)
            self._handles.append(handle)
        else:  # no home copy here: the data stays distributed
            handle = world.temporary(shape, dtype, owner)
            self._temporaries.append(handle)
        return Tensor(handle, tuple(shape), np.dtype(dtype), self)

    def einsum(self, equation: str, *operands: Tensor, owner: int | None = None, label: str = "") -> Tensor:
        """Submit ``equation`` over placed tensors (every rank, same order); returns the result,
        owned by ``owner`` or by the owner of its last step's largest input."""
        from lotus_rt import tn
        from lotus_rt.tn.lower import submit_forward
        if not operands or any(not isinstance(t, Tensor) or t.graph is not self for t in operands):
            raise TypeError("einsum(): operands must be Tensors of this Graph (Graph.put or Graph.einsum)")
        dtypes = {t.dtype for t in operands}
        if len(dtypes) != 1:
            raise TypeError(f"einsum(): operands have dtypes {sorted(map(str, dtypes))}; use one dtype")
        plan = tn.plan_for(equation, [t.shape for t in operands], dtypes.pop(), tile=sys.maxsize,
                           optimize=self.optimize, rt=self.world._rt)  # untiled: one handle per value
        if not plan.steps:
            raise ValueError(f"einsum(): {equation!r} has no contraction step (a plain copy); nothing to distribute")
        forced = None if owner is None else self.world._check_owner(owner)
        shape = plan.shape(plan.output_node)
        out = self._placed.temporary(shape, plan.network.dtype)
        if forced is not None:
            self._placed.forced[id(out)] = forced
        handles = [t.handle for t in operands]
        submit_forward(self._placed, plan, handles, out, keep=False, label=label)
        return Tensor(out, tuple(shape), plan.network.dtype, self)

    def fetch(self, tensor: Tensor, to: int | None = None) -> np.ndarray | None:
        """The tensor's values as a new array on rank ``to`` (None: on every rank) and None on
        the others; every rank calls it (it waits for every rank: ``World.wait``)."""
        world = self.world
        targets = range(world.size) if to is None else [world._check_owner(to)]
        out = None
        homes = []
        for r in targets:
            if r == world.rank:
                out = np.empty(tensor.shape, tensor.dtype)
                home = world.register(out, owner=r)
            else:
                home = world.temporary(tensor.shape, tensor.dtype, owner=r)
            homes.append(home)
            world.submit(COPY, (tensor.handle, "R"), (home, "W"), name="fetch")
        world.wait()
        for home in homes:
            if home.temporary:
                home.unregister_submit()
            else:
                home.unregister()
        return out

    def release(self) -> None:
        """Give the arrays back and free the placeholders and results (every rank)."""
        for handle in self._handles:
            handle.unregister()
        for handle in self._temporaries:
            if handle.registered:
                handle.unregister_submit()
        self._handles.clear()
        self._temporaries.clear()


def einsum(equation: str, *operands: np.ndarray | Remote, owners: Sequence[int], to: int | None = None,
           optimize: str | None = None, world: World | None = None) -> np.ndarray | None:
    """One einsum across ranks: operand k lives on ``owners[k]`` (that rank passes the array,
    the others the array or a ``Remote``); tasks run where their data is. Returns the result
    on rank ``to`` (None: every rank), None elsewhere. Every rank calls it with the same shapes."""
    graph = Graph(world, optimize)
    if len(owners) != len(operands):
        raise ValueError(f"einsum(): {len(operands)} operands but {len(owners)} owners")
    try:
        tensors = [graph.put(op, owner) for op, owner in zip(operands, owners)]
        result = graph.einsum(equation, *tensors)
        return graph.fetch(result, to)
    finally:
        graph.release()


__all__ = ["Graph", "Tensor", "Remote", "einsum"]
