"""Lowering: a Plan plus registered operands becomes tasks on a runtime.

State. ``values[node]`` holds, per tile, where a node's data lives: a ``Slot`` = (handle,
slab), where ``slab`` is ``(axis, start, stop)`` when a task must read only one tile of a
whole registered operand, else None. Operands are registered whole and read by slab (tiles
share them without copies); every intermediate is a runtime temporary (StarPU allocates it
where its producer runs) and, unless the forward is kept for a backward pass, is released with
``unregister_submit`` as soon as its last reader has been submitted. The output is registered
per tile: tiles split the output's leading index, so each tile's rows are contiguous.

Backward (``submit_backward``) walks the steps in reverse. For a pair step z = x·w, the
gradients are dx = dz·w and dw = x·dz, each again a pairwise GEMM-shaped contraction that
reads the saved forward values (the forward keeps every intermediate, i.e. the memory of one
forward pass, until the backward is submitted). For a unary step (a sum or a permutation)
dx is dz broadcast back. A node shared by all tiles whose consumer is tiled receives one
partial gradient per tile; the partials are summed by a binary tree of add tasks. Gradients
of diagonal steps (an index repeated inside one operand) are not supported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from lotus_rt.kernels import contract as kernels
from lotus_rt.runtime import Runtime
from lotus_rt.runtime.core import Codelet, Handle
from lotus_rt.tn.plan import Plan, Step

PAIR = Codelet("contract_pair", cpu=kernels.pair_cpu, cuda=kernels.pair_gpu)
UNARY = Codelet("contract_unary", cpu=kernels.unary_cpu, cuda=kernels.unary_gpu)
ADD = Codelet("contract_add", cpu=kernels.add_cpu, cuda=kernels.add_gpu)


class Slot(NamedTuple):
    handle: Handle
    slab: tuple[int, int, int] | None = None


@dataclass
class Forward:
    """What a kept forward pass leaves for ``submit_backward``: every node's slots per tile."""

    plan: Plan
    values: dict[int, list[Slot]]
    temporaries: list[Handle] = field(default_factory=list)

    def release(self) -> None:
        for handle in self.temporaries:
            handle.unregister_submit()
        self.temporaries.clear()


Operand = Handle | list  # a whole registered array, or one handle per tile of a tiled node


def _operand_slots(plan: Plan, node: int, handle: Operand) -> list[Slot]:
    if isinstance(handle, list):  # already one handle per tile (a caller that tiles its own data)
        if plan.is_tiled(node) and len(handle) == plan.ntiles:
            return [Slot(h) for h in handle]
        if not plan.is_tiled(node) and len(handle) == 1:
            return [Slot(handle[0])] * plan.ntiles
        raise ValueError(f"{len(handle)} per-tile handles for a node of {plan.ntiles} tile(s)")
    if not plan.is_tiled(node):
        return [Slot(handle)] * plan.ntiles
    axis = plan.nodes[node].index(plan.tile_index)
    return [Slot(handle, (axis, start, stop)) for start, stop in plan.tiles()]


def _output_slots(rt: Runtime, plan: Plan, out: np.ndarray) -> tuple[list[Slot], list[Handle]]:
    if plan.tile_index is None:
        handle = rt.register(out)
        return [Slot(handle)], [handle]
    handles = [rt.register(out[start:stop]) for start, stop in plan.tiles()]
    return [Slot(h) for h in handles], handles


def _submit_step(rt: Runtime, step: Step, inputs: list[Slot], out: Slot, out_mode: str = "W",
                 spec: Any = None, name: str = "", offset: int = 0) -> None:
    spec = step.spec if spec is None else spec
    if len(inputs) == 2:
        (a, b) = inputs
        rt.submit(PAIR, (a.handle, "R"), (b.handle, "R"), (out.handle, out_mode), priority=step.priority + offset,
                  name=name or "pair", spec=spec, a_slice=a.slab, b_slice=b.slab, out_slice=out.slab,
                  precision=rt.settings.precision)
    else:
        (a,) = inputs
        rt.submit(UNARY, (a.handle, "R"), (out.handle, out_mode), priority=step.priority + offset,
                  name=name or "unary", spec=spec, a_slice=a.slab, out_slice=out.slab)


def _named(base: str, label: str, fallback: str) -> str:
    """A step's task name: "pair3[2]", or with a caller's label "pair <label>" (its layer)."""
    if not label:
        return fallback
    return f"{base} {label}"[:47]


def submit_forward(rt: Runtime, plan: Plan, operands: list[Operand], out: np.ndarray | Operand,
                   keep: bool = False, label: str = "", priority: int = 0) -> tuple[list[Handle], Forward | None]:
    """Submit the plan's tasks computing ``out``; returns the output handles (unregister them
    to get the result) and, with ``keep``, the Forward a backward pass needs. ``out`` may also
    be a handle the caller registered (an untiled plan only): then no output handle is returned.
    ``label`` names the tasks "<step kind> <label>" (e.g. the layer and tile they belong to).
    A tiled operand (and the output) may also come as one handle per tile, e.g. a caller that
    keeps its batch in tile buffers; ``priority`` is added to every step's own priority."""
    values: dict[int, list[Slot]] = {k: _operand_slots(plan, k, h) for k, h in enumerate(operands)}
    readers = {node: 0 for node in range(len(plan.nodes))}
    for step in plan.steps:
        for node in step.inputs:
            readers[node] += 1
    if isinstance(out, (Handle, list)):
        out_slots, out_handles = _operand_slots(plan, plan.output_node, out if isinstance(out, list) else [out]), []
    else:
        out_slots, out_handles = _output_slots(rt, plan, out)
    temporaries: list[Handle] = []
    dtype = plan.network.dtype
    for n, step in enumerate(plan.steps):
        if step.output == plan.output_node:
            values[step.output] = out_slots
        elif step.tiled:
            values[step.output] = [Slot(rt.temporary(plan.shape(step.output, t), dtype)) for t in plan.tiles()]
        else:
            shared = Slot(rt.temporary(plan.shape(step.output), dtype))
            values[step.output] = [shared] * plan.ntiles
        if step.output != plan.output_node:
            temporaries.extend(_distinct(values[step.output]))
        for t in range(plan.ntiles if step.tiled else 1):
            _submit_step(rt, step, [values[i][t] for i in step.inputs], values[step.output][t],
                         name=_named(step.kind, label, f"{step.kind}{n}" + (f"[{t}]" if step.tiled else "")),
                         offset=priority)
        if not keep:
            for node in step.inputs:
                readers[node] -= 1
                if readers[node] == 0 and node >= len(operands):
                    for slot in _distinct(values[node]):
                        slot.handle.unregister_submit()
    if not keep:
        return out_handles, None
    return out_handles, Forward(plan, values, [s.handle for s in temporaries])


def _distinct(slots: list[Slot]) -> list[Slot]:
    seen, result = set(), []
    for slot in slots:
        if id(slot.handle) not in seen:
            seen.add(id(slot.handle))
            result.append(slot)
    return result


def submit_backward(rt: Runtime, forward: Forward, grad_out: Operand, wrt: list[int],
                    grads: dict[int, Operand], label: str = "", priority: int = 0) -> None:
    """Submit the tasks writing d(output)/d(operand k) into ``grads[k]`` for every k in ``wrt``.

    ``grad_out`` holds the gradient of the output (registered whole, or one handle per tile);
    ``grads[k]`` are registered arrays shaped like operand k (or, for a tiled operand, one
    handle per tile). Wait on the runtime, then unregister them.
    """
    plan, values = forward.plan, forward.values
    ninputs = len(plan.network.inputs)
    needs = _nodes_needing_grad(plan, set(wrt))
    dtype = plan.network.dtype
    owned: list[Handle] = []

    def temp(node: int, tile: tuple[int, int] | None) -> Slot:
        handle = rt.temporary(plan.shape(node, tile), dtype)
        owned.append(handle)
        return Slot(handle)

    for step in plan.steps:  # refuse before any task is submitted
        if step.kind == "unary" and step.inputs[0] in needs:
            x_idx = plan.nodes[step.inputs[0]]
            if len(set(x_idx)) != len(x_idx):
                raise NotImplementedError(
                    f"backward through a diagonal ({step.spec.equation}) is not supported")
    gradient: dict[int, list[Slot]] = {plan.output_node: _operand_slots(plan, plan.output_node, grad_out)}
    for n in range(len(plan.steps) - 1, -1, -1):
        step = plan.steps[n]
        if step.output not in gradient:
            continue
        dz = gradient.pop(step.output)
        z_idx = plan.nodes[step.output]
        for position, x in enumerate(step.inputs):
            if x not in needs:
                continue
            x_idx = plan.nodes[x]
            if step.kind == "pair":
                w = step.inputs[1 - position]
                spec = kernels.pair_spec(z_idx, plan.nodes[w], x_idx)
                sources = lambda t: [dz[t], values[w][t]]  # noqa: E731
            else:
                spec = kernels.broadcast_spec(z_idx, x_idx)
                sources = lambda t: [dz[t]]  # noqa: E731
            if step.tiled and plan.is_tiled(x):
                slots = [temp(x, tile) for tile in plan.tiles()]
                for t, slot in enumerate(slots):
                    _submit_step(rt, step, sources(t), slot, spec=spec, offset=priority,
                                 name=_named("d" + step.kind, label, f"d{step.kind}{n}[{t}]"))
            elif step.tiled:  # x is shared by every tile: one partial per tile, then a sum tree
                partials = [temp(x, None) for _ in plan.tiles()]
                for t, slot in enumerate(partials):
                    _submit_step(rt, step, sources(t), slot, spec=spec, offset=priority,
                                 name=_named("d" + step.kind, label, f"d{step.kind}{n}[{t}]"))
                slots = [sum_tree(rt, partials, step.priority + priority, _named("dsum", label, "dsum"))] * plan.ntiles
            else:  # an operand's gradient is written straight into its destination
                dest = grads.get(x) if x < ninputs else None
                if isinstance(dest, list):
                    dest = dest[0] if len(dest) == 1 else None
                slot = Slot(dest) if dest is not None else temp(x, None)
                _submit_step(rt, step, sources(0), slot, spec=spec, offset=priority,
                             name=_named("d" + step.kind, label, f"d{step.kind}{n}"))
                slots = [slot] * plan.ntiles
            gradient[x] = slots
    for k in wrt:
        dest = grads[k]
        if isinstance(dest, list):
            for t, (slot, handle) in enumerate(zip(gradient[k], dest)):
                if slot.handle is not handle:
                    idx = plan.nodes[k]
                    rt.submit(UNARY, (slot.handle, "R"), (handle, "W"), name=_named("dcopy", label, "dcopy"),
                              spec=kernels.UnarySpec("einsum", f"{idx}->{idx}"), priority=priority)
        elif gradient[k][0].handle is not dest:
            _copy_into(rt, plan, k, gradient[k], dest, _named("dcopy", label, "dcopy"))
    for handle in owned:
        handle.unregister_submit()


def _nodes_needing_grad(plan: Plan, wrt: set[int]) -> set[int]:
    needs = set(wrt)
    for step in plan.steps:
        if any(i in needs for i in step.inputs):
            needs.add(step.output)
    return needs


def sum_tree(rt: Runtime, partials: list[Slot], priority: int, name: str = "dsum") -> Slot:
    level = list(partials)
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level) - 1, 2):
            rt.submit(ADD, (level[i + 1].handle, "R"), (level[i].handle, "RW"), priority=priority, name=name)
            nxt.append(level[i])
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _copy_into(rt: Runtime, plan: Plan, node: int, slots: list[Slot], dest: Handle, name: str = "dcopy") -> None:
    """Write a node's gradient (per tile or shared) into the registered array ``dest``."""
    idx = plan.nodes[node]
    identity = kernels.UnarySpec("einsum", f"{idx}->{idx}")
    if plan.is_tiled(node):
        axis = idx.index(plan.tile_index)
        for slot, (start, stop) in zip(slots, plan.tiles()):
            rt.submit(UNARY, (slot.handle, "R"), (dest, "RW"), name=name, spec=identity,
                      a_slice=None, out_slice=(axis, start, stop))
    else:
        rt.submit(UNARY, (slots[0].handle, "R"), (dest, "W"), name=name, spec=identity)
