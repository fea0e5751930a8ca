"""Small layers fused: one forward task and one backward task per batch tile.

A layer whose forward is under ``tiles.FUSE_FLOPS`` (about 0.2 ms of work) gains nothing from a
DAG of a dozen tiny tasks: each costs more in Python and GIL hand-offs between worker threads
than its math. Such a layer runs its forward as one task per batch tile and its backward as one
task per tile (``kernels/fused.py``: the backward recomputes the forward's intermediates),
scheduled by StarPU like any other task.

Planning happens here, not in the task: ``fused_program`` gathers, per tile shape, the plans of
the forward's contractions and of every operand gradient (all from the one plan cache, planned
for a single task) into a ``FusedProgram`` the codelet body only executes. Parameters are
packed into one flat array so that a task needs at most five buffers; per-tile partial
parameter gradients are summed by a tree of add tasks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lotus_rt.kernels import fused as fused_kernels
from lotus_rt.layers.codelets import FUSED_BACKWARD, FUSED_FORWARD
from lotus_rt.layers.passes import waited_pass
from lotus_rt.layers.program import Program, unfolded_shape
from lotus_rt.runtime import Runtime
from lotus_rt.tn import plan_for
from lotus_rt.tn.lower import Slot, sum_tree
from lotus_rt.tn.plan import Plan

Shape = tuple[int, ...]


@dataclass(frozen=True)
class GradientPlan:
    """The gradient of one operand of a contraction: ``plan`` contracts the other operands with
    the output gradient; ``broadcast`` is the operand's shape with 1 on the indices it summed
    privately (the gradient is constant along them), or None when it has none."""

    plan: Plan
    broadcast: Shape | None


@dataclass(frozen=True)
class FusedProgram:
    """Everything a fused body needs for one tile shape (see kernels/fused.py)."""

    shapes: tuple[Shape, ...]  # the parameters', in packing order
    n_pre: int
    n_main: int
    conv: tuple | None  # (kernel, stride, padding, dilation)
    bias: bool
    bias_axis: int
    bias_span: int
    pre: Plan | None
    main: Plan
    pre_grads: tuple[GradientPlan, ...]  # per operand of pre (the input first)
    main_grads: tuple[GradientPlan, ...]  # per operand of main (its first operand first)


def gradient_plans(plan: Plan, rt: Runtime) -> tuple[GradientPlan, ...]:
    """One GradientPlan per operand of ``plan``'s contraction, planned for a single task."""
    net = plan.network
    out_shape = plan.shape(plan.output_node)
    result = []
    for k, term in enumerate(net.inputs):
        if len(set(term)) != len(term):
            raise NotImplementedError(f"fused gradient through a repeated index ({term!r} in {net.equation!r})")
        others = [t for j, t in enumerate(net.inputs) if j != k] + [net.output]
        seen = set("".join(others))
        kept = "".join(i for i in term if i in seen)
        shapes = [s for j, s in enumerate(net.shapes) if j != k] + [out_shape]
        grad_plan = plan_for(",".join(others) + "->" + kept, shapes, net.dtype, tile=_untiled(shapes), rt=rt,
                             nworkers=1)
        broadcast = None if kept == term else tuple(net.shapes[k][p] if i in seen else 1 for p, i in enumerate(term))
        result.append(GradientPlan(grad_plan, broadcast))
    return tuple(result)


def _untiled(shapes: Sequence[Shape]) -> int:
    """A tile length no index reaches: the plan is not cut into tiles."""
    return max(max(s, default=1) for s in shapes)


def fused_program(program: Program, x_shape: Shape, param_shapes: Sequence[Shape], dtype: np.dtype,
                  rt: Runtime, with_gradients: bool = True) -> FusedProgram:
    """The plans of one fused tile of ``x_shape`` (the gradients' only ``with_gradients``)."""
    shape = tuple(x_shape)
    pre = None
    if program.pre is not None:
        shapes = [shape] + list(param_shapes[:program.n_pre])
        pre = plan_for(program.pre, shapes, dtype, tile=_untiled(shapes), rt=rt, nworkers=1)
        shape = pre.shape(pre.output_node)
    if program.conv is not None:
        shape = unfolded_shape(shape, program.conv)
    shapes = [shape] + list(param_shapes[program.n_pre:program.n_pre + program.n_main])
    main = plan_for(program.main, shapes, dtype, tile=_untiled(shapes), rt=rt, nworkers=1)
    return FusedProgram(tuple(tuple(s) for s in param_shapes), program.n_pre, program.n_main,
                        None if program.conv is None else program.conv.as_tuple(), program.bias,
                        program.bias_axis, program.bias_span, pre, main,
                        gradient_plans(pre, rt) if pre is not None and with_gradients else (),
                        gradient_plans(main, rt) if with_gradients else ())


def _key(program: Program) -> str:
    """Names the layer for StarPU's performance model (the body ignores it)."""
    conv = "" if program.conv is None else f"|{program.conv.as_tuple()}"
    return f"{program.pre or ''}|{program.main}{conv}|{int(program.bias)}"


@dataclass
class FusedState:
    """What a fused forward keeps: its input, packed parameters and batch tiles (the backward
    recomputes the intermediates)."""

    runtime: Runtime
    program: Program
    x: np.ndarray | None
    packed: np.ndarray | None
    programs: dict[int, FusedProgram]  # per tile length
    tiles: list[tuple[int, int]]

    def release(self) -> None:
        self.x = self.packed = None


def _programs(rt: Runtime, program: Program, x: np.ndarray, params: Sequence[np.ndarray],
              tiles: list[tuple[int, int]], with_gradients: bool) -> dict[int, FusedProgram]:
    shapes = [p.shape for p in params]
    return {rows: fused_program(program, (rows,) + x.shape[1:], shapes, x.dtype, rt, with_gradients)
            for rows in {stop - start for start, stop in tiles}}


def forward(rt: Runtime, program: Program, x: np.ndarray, params: Sequence[np.ndarray], y: np.ndarray,
            tiles: list[tuple[int, int]], keep: bool) -> FusedState | None:
    programs = _programs(rt, program, x, params, tiles, with_gradients=keep)
    packed = np.concatenate([p.reshape(-1) for p in params])  # small layers only: a cheap copy
    key, precision = _key(program), rt.settings.precision
    with waited_pass(rt) as registry:
        packed_handle = registry.register(packed)
        for start, stop in tiles:
            rt.submit(FUSED_FORWARD, (registry.register(x[start:stop]), "R"), (packed_handle, "R"),
                      (registry.register(y[start:stop]), "W"), name="layer_forward",
                      program=programs[stop - start], key=key, precision=precision)
    return FusedState(rt, program, x, packed, programs, tiles) if keep else None


def backward(state: FusedState, grad: np.ndarray, needs: list[bool]) -> list[np.ndarray | None]:
    if state.x is None:
        raise RuntimeError("backward: this layer's forward state was already released")
    rt = state.runtime
    dx = np.empty_like(state.x)
    # one partial gradient of the packed parameters per tile, summed into the first; zeroed, since
    # a tile writes only the wanted parameters' part and the sum reads all of it
    partials = [np.zeros_like(state.packed) for _ in state.tiles]
    wanted = tuple(bool(n) for n in needs)
    key, precision = _key(state.program), rt.settings.precision
    with waited_pass(rt) as registry:
        packed_handle = registry.register(state.packed)
        partial_handles = [registry.register(p) for p in partials]
        for (start, stop), partial in zip(state.tiles, partial_handles):
            rt.submit(FUSED_BACKWARD, (registry.register(state.x[start:stop]), "R"), (packed_handle, "R"),
                      (registry.register(grad[start:stop]), "R"), (registry.register(dx[start:stop]), "W"),
                      (partial, "W"), name="layer_backward", program=state.programs[stop - start],
                      needs=wanted, key=key, precision=precision)
        sum_tree(rt, [Slot(h) for h in partial_handles], priority=0)
    views = fused_kernels.unpack(partials[0], state.programs[state.tiles[0][1] - state.tiles[0][0]].shapes)
    return [dx if needs[0] else None] + [v if w else None for v, w in zip(views, needs[1:])]
