"""A layer's forward and backward as a DAG of tasks per batch tile.

Forward. Each batch tile is an independent chain: pre -> unfold -> main -> bias add, its
intermediates registered per tile. Nothing waits between pieces: the chains of different tiles
overlap on the workers and the caller waits once per forward and once per backward. Parameters
are registered once and read by every tile; steps that touch only parameters (e.g. CP's two
small kernel factors) run once per tile. With ``keep``, the forward also returns the ``State``
the backward needs (per tile: the lowered ``Forward`` of each contraction, with its operands
and intermediates).

Backward. The reverse per tile: the main contraction's backward, a fold (col2im), the
pre-contraction's backward, a bias reduction; parameter gradients are per-tile partials summed
by a tree of add tasks. It may run more than once (autograd's retain_graph); the kept state is
freed when the State is released or garbage-collected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lotus_rt.layers.codelets import BIAS_ADD, BIAS_GRAD, FOLD, UNFOLD
from lotus_rt.layers.passes import Registry, let_submitted_finish, waited_pass
from lotus_rt.layers.program import Program, unfolded_shape
from lotus_rt.runtime import Handle, Runtime
from lotus_rt.tn import plan_for
from lotus_rt.tn.lower import Forward, Slot, submit_backward, submit_forward, sum_tree


@dataclass
class TileState:
    """One batch tile's kept forward: rows [start, stop) of the batch."""

    start: int
    stop: int
    pre: Forward | None
    main: Forward | None
    unfold_input_shape: tuple[int, ...] | None  # for fold


@dataclass
class State:
    """What a forward keeps for its backward: per-tile Forwards and every handle they read."""

    runtime: Runtime
    tiles: list[TileState]
    input_shape: tuple[int, ...]
    param_shapes: list[tuple[int, ...]]
    dtype: np.dtype
    handles: list[Handle] = field(default_factory=list)

    def release(self) -> None:
        """Free the intermediates and unregister the kept operands (idempotent)."""
        tiles, self.tiles = self.tiles, []
        handles, self.handles = self.handles, []
        _release_tiles(tiles)
        for handle in handles:
            handle.unregister()

    def __del__(self):
        if getattr(self, "handles", None) and not self.runtime.closed:
            try:
                self.release()
            except Exception:  # interpreter shutdown or a closed runtime
                pass


def forward(rt: Runtime, program: Program, x: np.ndarray, params: Sequence[np.ndarray], y: np.ndarray,
            tiles: list[tuple[int, int]], keep: bool) -> State | None:
    """Write the program's output on ``x`` into ``y`` with one task chain per tile; with
    ``keep``, return the State ``backward`` needs."""
    registry = Registry(rt)
    kept: list[TileState] = []
    try:
        p_handles = [registry.register(p) for p in params]
        pre_params = p_handles[:program.n_pre]
        main_params = p_handles[program.n_pre:program.n_pre + program.n_main]
        for start, stop in tiles:
            kept.append(_forward_tile(rt, registry, program, x[start:stop], y[start:stop],
                                      pre_params, main_params, p_handles[-1] if program.bias else None,
                                      keep, start, stop))
        rt.wait()
    except BaseException:
        let_submitted_finish(rt)
        _release_tiles(kept)
        registry.unregister_all()
        raise
    if not keep:  # on success the handles stay registered for the backward
        registry.unregister_all()
        return None
    return State(rt, kept, x.shape, [p.shape for p in params], x.dtype, registry.handles)


def _forward_tile(rt: Runtime, registry: Registry, program: Program, x: np.ndarray, y: np.ndarray,
                  pre_params: list[Handle], main_params: list[Handle], bias: Handle | None, keep: bool,
                  start: int, stop: int) -> TileState:
    rows = stop - start
    current = registry.register(x)
    shape = x.shape
    saved_pre = saved_main = None
    unfold_input_shape = None
    if program.pre is not None:
        plan = plan_for(program.pre, [shape] + [h.shape for h in pre_params], x.dtype, tile=rows, rt=rt)
        out = np.empty(plan.shape(plan.output_node), x.dtype)
        out_handles, saved_pre = submit_forward(rt, plan, [current] + pre_params, out, keep=keep)
        registry.handles.extend(out_handles)
        (current,), shape = out_handles, out.shape
    if program.conv is not None:
        unfold_input_shape = shape
        cols = np.empty(unfolded_shape(shape, program.conv), x.dtype)
        cols_handle = registry.register(cols)
        rt.submit(UNFOLD, (current, "R"), (cols_handle, "W"), name="conv_unfold", **program.conv.kwargs())
        current, shape = cols_handle, cols.shape
    plan = plan_for(program.main, [shape] + [h.shape for h in main_params], x.dtype, tile=rows, rt=rt)
    out_handles, saved_main = submit_forward(rt, plan, [current] + main_params, y, keep=keep)
    registry.handles.extend(out_handles)
    if bias is not None:
        rt.submit(BIAS_ADD, (bias, "R"), (out_handles[0], "RW"), name="bias_add",
                  axis=program.bias_axis, span=program.bias_span)
    return TileState(start, stop, saved_pre, saved_main, unfold_input_shape)


def _release_tiles(tiles: Sequence[TileState]) -> None:
    """Free the intermediates the tiles' kept forwards hold."""
    for tile in tiles:
        for kept in (tile.pre, tile.main):
            if kept is not None:
                kept.release()


def backward(program: Program, state: State, grad: np.ndarray, needs: list[bool]) -> list[np.ndarray | None]:
    """Gradients for (x, *params) where ``needs`` is True (None elsewhere), as tasks."""
    if not state.tiles:
        raise RuntimeError("backward: this layer's forward state was already released")
    n_params = program.n_params
    pre_wanted = program.pre is not None and (needs[0] or any(needs[1:1 + program.n_pre]))
    input_wanted = needs[0] or pre_wanted
    rt = state.runtime
    dtype = state.dtype
    wanted_params = [k for k in range(n_params) if needs[1 + k]]
    # per parameter, one partial gradient per tile (the first tile's is the result)
    partials = {k: [np.empty(state.param_shapes[k], dtype) for _ in state.tiles] for k in wanted_params}
    dx = np.empty(state.input_shape, dtype) if needs[0] else None
    with waited_pass(rt) as registry:
        partial_handles = {k: [registry.register(a) for a in arrays] for k, arrays in partials.items()}
        for t, tile in enumerate(state.tiles):
            _backward_tile(rt, registry, program, tile, grad[tile.start:tile.stop],
                           None if dx is None else dx[tile.start:tile.stop],
                           {k: handles[t] for k, handles in partial_handles.items()},
                           needs, input_wanted, pre_wanted)
        for handles in partial_handles.values():
            sum_tree(rt, [Slot(h) for h in handles], priority=0)
    grads: list[np.ndarray | None] = [dx] + [None] * n_params
    for k, arrays in partials.items():
        grads[1 + k] = arrays[0]
    return grads


def _backward_tile(rt: Runtime, registry: Registry, program: Program, tile: TileState, grad: np.ndarray,
                   dx: np.ndarray | None, partials: dict[int, Handle], needs: list[bool],
                   input_wanted: bool, pre_wanted: bool) -> None:
    grad_handle = registry.register(grad)
    n_pre, n_main = program.n_pre, program.n_main
    if program.bias and needs[-1]:
        rt.submit(BIAS_GRAD, (grad_handle, "R"), (partials[n_pre + n_main], "W"), name="bias_grad",
                  axis=program.bias_axis, span=program.bias_span)
    main_grads = {k + 1: partials[n_pre + k] for k in range(n_main) if needs[1 + n_pre + k]}
    direct = program.pre is None and program.conv is None  # the main's input gradient is dx itself
    if input_wanted:
        main_in = tile.main.plan.shape(0)
        main_grads[0] = registry.register(dx) if direct else registry.register(np.empty(main_in, grad.dtype))
    submit_backward(rt, tile.main, grad_handle, sorted(main_grads), main_grads)
    if not input_wanted or direct:
        return
    current = main_grads[0]
    if program.conv is not None:
        target = dx if program.pre is None else np.empty(tile.unfold_input_shape, grad.dtype)
        folded = registry.register(target)
        rt.submit(FOLD, (current, "R"), (folded, "W"), name="conv_fold", **program.conv.kwargs())
        current = folded
    if program.pre is None:
        return
    pre_grads = {k + 1: partials[k] for k in range(n_pre) if needs[1 + k]}
    if needs[0]:
        pre_grads[0] = registry.register(dx)
    submit_backward(rt, tile.pre, current, sorted(pre_grads), pre_grads)
