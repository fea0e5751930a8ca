"""Data-parallel training over StarPU-MPI ranks: a model replica per rank, a shard of each batch,
parameter gradients summed across ranks by tasks of the step's own graph.

    world = lotus_rt.distributed.init()
    model = lotus_rt.distributed.data_parallel(model)          # offloads it, syncs rank 0's weights
    for x, y in batches:                                         # the same global batches on every rank
        loss = loss_fn(model(shard(x)), shard(y)); loss.backward(); optimizer.step()

How. ``data_parallel`` offloads the model whole (``lotus_rt.nn.whole_model``: its regions run as
recorded step plans), broadcasts rank 0's parameters and buffers to every rank, and makes a
``GradientReducer`` the ``on_backward`` of every region. When a region's backward plan has been
submitted, the reducer submits, per parameter (the last layer's first), StarPU-MPI tasks
(``World.submit``, owner computes) on the handle that holds the parameter's gradient summed over
this rank's tiles: a binomial sum tree over the ranks towards a root rank (parameter index mod
size, so that roots rotate), a scale by 1/size on the root (the gradient of the global batch's
mean loss, as DDP averages), and a binomial broadcast of the root's bytes back into every
rank's handle. Those tasks depend on that handle alone, so one layer's reduction starts (its
sends are posted by StarPU-MPI) as soon as its gradient is summed, while the layers below are
still in their backward; the region's one ``wait()`` covers both. Every rank ends with the same
bytes, so the optimizer (torch, on each rank) leaves identical parameters.

Inside the graph: every gradient reduction of every region, as tasks between the backward
tasks. Not inside: the reduction tasks are submitted again at every step (StarPU-MPI posts its
messages when a task is submitted, so they cannot be replayed from the step plan), the optimizer
step and the loss run in torch, and buffers (batch norm's running statistics) are synchronised
from rank 0 once, at ``data_parallel()``, not at every step. A parameter that runs in torch
(outside every region) is refused with one error: its gradient would not be reduced.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from lotus_rt.distributed.codelets import ADD_INTO, COPY, SCALE
from lotus_rt.runtime.core import Handle
from lotus_rt.runtime.mpi import World, world as current_world


class GradientReducer:
    """A region program's ``on_backward``: sums each parameter's gradient across the ranks with
    StarPU-MPI tasks (see the module docstring). ``tasks_here`` counts those this rank ran."""

    def __init__(self, world: World, mean: bool = True):
        self.world, self.mean = world, mean
        self._programs: weakref.WeakKeyDictionary[Any, list[tuple[str, list[Handle], int]]] = \
            weakref.WeakKeyDictionary()
        self.futures: list[Any] = []  # the last step's tasks that ran on this rank

    def __call__(self, program: Any) -> None:
        entries = self._programs.get(program)
        if entries is None:  # first backward of this program: the same order on every rank
            entries = self._programs[program] = self._register(program)
        self.futures = []
        for name, copies, root in entries:
            self._reduce(name, copies, root)

    def _register(self, program: Any) -> list[tuple[str, list[Handle], int]]:
        world, lw = self.world, program.lowering
        entries = []
        for p in reversed(range(len(lw.graph.params))):  # the last layer's gradients are ready first
            slots = lw.pgrad.get(p)
            if not slots:
                continue
            local = next(slot[1] for slot in slots if slot is not None)  # the tiles' sum (Lowering.tree)
            param = lw.graph.params[p]
            copies = [world.attach(local, owner=r) if r == world.rank else
                      world.temporary(param.shape, param.dtype, owner=r) for r in range(world.size)]
            entries.append((param.name or f"param{p}", copies, p % world.size))
        return entries

    def _reduce(self, name: str, copies: list[Handle], root: int) -> None:
        world, size = self.world, self.world.size
        if size == 1:
            return
        priority = world._rt.priority_range[1]
        at = lambda v: copies[(v + root) % size]  # noqa: E731 - rank v of the tree rooted at `root`
        label = f"allreduce {name}"[:47]
        step = 1
        while step < size:  # binomial sum tree: at(0) ends with the sum
            for v in range(0, size, 2 * step):
                if v + step < size:
                    self._submit(ADD_INTO, (at(v + step), "R"), (at(v), "RW"), priority=priority, name=label)
            step *= 2
        if self.mean:
            self._submit(SCALE, (at(0), "RW"), priority=priority, name=label, factor=1.0 / size)
        step //= 2
        while step >= 1:  # binomial broadcast of the root's bytes
            for v in range(0, size, 2 * step):
                if v + step < size:
                    self._submit(COPY, (at(v), "R"), (at(v + step), "W"), priority=priority, name=label)
            step //= 2

    def _submit(self, codelet: Any, *accesses: Any, **kwargs: Any) -> None:
        future = self.world.submit(codelet, *accesses, **kwargs)
        if future is not None:
            self.futures.append(future)


def shard(batch: Any, world: World | None = None) -> Any:
    """This rank's contiguous slice of a batch (first dimension split evenly over the ranks)."""
    world = world or current_world()
    n = len(batch)
    if n % world.size:
        raise ValueError(f"shard(): a batch of {n} samples does not split evenly over {world.size} ranks; "
                         "use a global batch size divisible by the number of ranks")
    k = n // world.size
    return batch[world.rank * k:(world.rank + 1) * k]


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b is not None]


def broadcast_state(model: nn.Module, world: World | None = None, root: int = 0) -> None:
    """Copy ``root``'s parameters and buffers into every rank's model (collective)."""
    world = world or current_world()
    handles = []
    for name, tensor in _tensors(model):
        if tensor.device.type != "cpu":
            raise ValueError(f"broadcast_state(): {name} is on {tensor.device}; data_parallel runs CPU models")
        if not tensor.is_contiguous():
            with torch.no_grad():
                tensor.data = tensor.data.contiguous()
        array = tensor.detach().numpy()
        if array.size == 0:
            continue
        handles.append(world.register(array, owner=root))
    for handle in handles:
        world.get(handle)
    world.wait()
    for handle in handles:
        handle.unregister()


def data_parallel(model: nn.Module, world: World | None = None, mean: bool = True) -> nn.Module:
    """Make ``model`` a data-parallel replica (in place; returns it): offloaded whole, rank 0's
    weights on every rank, gradients reduced across ranks inside each region's backward graph
    (summed, then divided by the number of ranks when ``mean``). Every rank calls it."""
    from lotus_rt.nn.convert import offload
    world = world or current_world()
    if not isinstance(model, nn.Module):
        raise TypeError(f"data_parallel(): expected a torch.nn.Module, got {type(model).__name__}")
    for name, tensor in _tensors(model):
        if tensor.device.type != "cpu" or (tensor.is_floating_point() and tensor.dtype not in
                                           (torch.float32, torch.float64)):
            raise ValueError(f"data_parallel(): {name} is {tensor.dtype} on {tensor.device}; data_parallel "
                             "runs float32/float64 models on the CPU")
    whole = model.__dict__.get("_lotus_whole")
    if whole is None:
        offload(model)
        whole = model.__dict__.get("_lotus_whole")
    if whole is None:
        raise ValueError(f"data_parallel(): torch.fx cannot capture {type(model).__name__} whole; data_parallel "
                         "reduces gradients inside the whole-model graph only")
    outside = [f"{name}" for module in whole.torch_modules() for name, p in module.named_parameters()
               if p.requires_grad]
    if outside:
        raise ValueError(f"data_parallel(): parameters of modules that run in torch ({', '.join(outside[:5])}) "
                         "would not be reduced across ranks; only models captured whole are supported")
    reducer = GradientReducer(world, mean)
    for runner in whole.runners.values():
        runner.on_backward = reducer
    broadcast_state(model, world)
    model.__dict__["_lotus_reducer"] = reducer
    model.register_forward_hook(_check_covered)
    return model


def _check_covered(model: nn.Module, args: Any, output: Any) -> None:
    """After a forward: every trainable parameter must have run inside a region (a region that
    fell back to torch at its first call would leave its parameters unreduced)."""
    if model.__dict__.get("_lotus_covered"):
        return
    whole = model.__dict__.get("_lotus_whole")
    covered = {id(p) for key, runner in whole.runners.items() if key not in whole.fallback
               for rg in runner.graphs.values() for p in rg.params}
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        raise ValueError(f"data_parallel(): parameters {', '.join(missing[:5])} ran in torch (a part of the model "
                         "fell back to torch, see the warning above): their gradients would not be reduced")
    model.__dict__["_lotus_covered"] = True


def reducer_of(model: nn.Module) -> GradientReducer:
    """The GradientReducer ``data_parallel`` installed on ``model``."""
    reducer = model.__dict__.get("_lotus_reducer")
    if reducer is None:
        raise ValueError("this model was not made data parallel (lotus_rt.distributed.data_parallel)")
    return reducer


__all__ = ["data_parallel", "shard", "broadcast_state", "GradientReducer", "reducer_of"]
