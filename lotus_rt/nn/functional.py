"""Layer math as task DAGs: every supported layer is one ``Program`` run on the runtime.

A Program is: an optional 1x1 pre-contraction of the input (``pre``, an einsum), an optional
unfold (im2col) for a convolution, the main contraction (``main``, an einsum whose first
operand is the input or its unfolded columns), and an optional bias add. Parameters are
passed in order: the ``pre`` ones, then the ``main`` ones, then the bias.

    Tucker-2 conv: pre "nchw,cr->nrhw", unfold, main "rijnpq,srij,os->nopq"
    CP conv:       pre "nchw,cr->nrhw", unfold, main "rijnpq,ir,jr,or->nopq"
    TT linear:     main "zabc,xaiy,yblw,wcmv->zilm" (input reshaped to (batch, *in_shape))

Batch tiles. Every piece of a layer treats the samples of a batch independently, so the batch
is cut into tiles (``batch_tiles``) and each tile is an independent chain of tasks: pre ->
unfold -> main -> bias add, its intermediates registered per tile. Nothing waits between
pieces: the chains of different tiles overlap on the workers and the caller waits once per
forward and once per backward. Parameters are registered once and read by every tile; steps
that touch only parameters (e.g. CP's two small kernel factors) run once per tile.

Fused small layers. A layer whose forward is under ``FUSE_FLOPS`` (about 0.2 ms of work) gains
nothing from a DAG of a dozen tiny tasks: each costs more in Python and GIL hand-offs between
worker threads than its math. Such a layer (LOTUS_FUSE=auto, the default; ``on`` fuses every
layer, ``off`` none) runs its forward as one task per batch tile and its backward as one task
per tile (``kernels/fused.py``: the backward recomputes the forward's intermediates), still
scheduled by StarPU like any other task. Its tiles follow the same rule as a DAG's, with a
lower bar for splitting (``FUSED_SPLIT_FLOPS``): a fused tile is one task, not a dozen.

``forward`` submits the chains and, when gradients are wanted, keeps what ``backward`` needs
(per tile: the lowered ``Forward`` of each contraction, with its operands and intermediates).
``backward`` runs the reverse per tile: the main contraction's backward, a fold (col2im), the
pre-contraction's backward, a bias reduction; parameter gradients are per-tile partials summed
by a tree of add tasks. It may run more than once (autograd's retain_graph); the kept state is
freed when the State is released or garbage-collected.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from lotus_rt import config, tn
from lotus_rt.kernels import conv as conv_kernels
from lotus_rt.kernels import fused as fused_kernels
from lotus_rt.runtime import Handle, Runtime, runtime
from lotus_rt.runtime.core import Codelet
from lotus_rt.tn.lower import Forward, Slot, submit_backward, submit_forward, sum_tree
from lotus_rt.tn.plan import MIN_TASK_FLOPS, Plan

UNFOLD = Codelet("conv_unfold", cpu=conv_kernels.unfold_cpu, cuda=conv_kernels.unfold_gpu)
FOLD = Codelet("conv_fold", cpu=conv_kernels.fold_cpu, cuda=conv_kernels.fold_gpu)
BIAS_ADD = Codelet("bias_add", cpu=conv_kernels.bias_add_cpu, cuda=conv_kernels.bias_add_gpu)
BIAS_GRAD = Codelet("bias_grad", cpu=conv_kernels.bias_grad_cpu, cuda=conv_kernels.bias_grad_gpu)
FUSED_FORWARD = Codelet("layer_forward", cpu=fused_kernels.forward_cpu, cuda=fused_kernels.forward_gpu)
FUSED_BACKWARD = Codelet("layer_backward", cpu=fused_kernels.backward_cpu, cuda=fused_kernels.backward_gpu)

# A batch tile's forward should carry several task-sized pieces of work: its backward has about
# three times as many tasks, each costing tens of microseconds of Python on top of its math.
TILE_FLOPS = 8 * MIN_TASK_FLOPS
MAX_TILES_PER_WORKER = 4
# Below TILE_FLOPS a batch is still cut into one tile per worker once each worker's share is
# worth a task: one tile would run the layer's whole chain on one worker while the others idle
# (measured on the demo's layers, 2026-11-27: benchmarks/RESULTS.md, "Fifth session").
SPLIT_FLOPS = MIN_TASK_FLOPS
# Measured on 2 cores (2026-11-27, training steps, fused vs DAG interleaved in one process, with
# the idle pause in C): fused wins at 0.05-1.8e6 forward FLOPs (DAG 1.15-1.31x slower), ties near
# 4e6 (0.91-1.05x), loses from 8e6 up (0.70-0.85x). The bar was 4e7 before the idle pause.
FUSE_FLOPS = MIN_TASK_FLOPS / 5
# A fused tile is one task: worth splitting at a tenth of a task's work per worker. Under
# LOTUS_FUSE=auto a fused layer is too small for that on 2+ workers; LOTUS_FUSE=on splits.
FUSED_SPLIT_FLOPS = MIN_TASK_FLOPS / 10


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        ho = conv_kernels.output_size(h, self.kernel[0], self.stride[0], self.padding[0], self.dilation[0])
        wo = conv_kernels.output_size(w, self.kernel[1], self.stride[1], self.padding[1], self.dilation[1])
        if ho <= 0 or wo <= 0:
            raise ValueError(f"convolution: input {h}x{w} is too small for kernel {self.kernel} with "
                             f"padding {self.padding} and dilation {self.dilation}")
        return ho, wo

    def kwargs(self) -> dict[str, tuple[int, int]]:
        return {"kernel": self.kernel, "stride": self.stride, "padding": self.padding, "dilation": self.dilation}


@dataclass(frozen=True)
class Program:
    main: str
    n_main: int
    pre: str | None = None
    n_pre: int = 0
    conv: ConvGeometry | None = None
    bias: bool = False
    bias_axis: int = 1
    bias_span: int = 1  # how many output axes the (flat) bias runs along


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


@dataclass
class FusedState:
    """What a fused forward keeps: its input, packed parameters and batch tiles (the backward
    recomputes the intermediates)."""

    runtime: Runtime
    x: np.ndarray
    packed: np.ndarray
    kwargs: dict[str, Any]
    tiles: list[tuple[int, int]]

    def release(self) -> None:
        self.x = self.packed = None


def batch_tiles(n: int, flops: float, nworkers: int, rows: int | None = None,
                split_flops: float = SPLIT_FLOPS) -> list[tuple[int, int]]:
    """(start, stop) ranges over a batch of ``n`` whose forward costs ``flops``: one tile per
    ~TILE_FLOPS, and at least one per worker once each worker's share reaches ``split_flops``;
    at most MAX_TILES_PER_WORKER per worker and one per sample. ``rows`` (LOTUS_TILE) fixes
    the tile length instead."""
    if rows is None:
        nworkers = max(1, nworkers)
        ntiles = int(flops // TILE_FLOPS)
        if flops >= nworkers * split_flops:
            ntiles = max(ntiles, nworkers)
        ntiles = min(max(ntiles, 1), MAX_TILES_PER_WORKER * nworkers, n)
        rows = -(-n // ntiles)
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


def unfolded_shape(shape: tuple[int, ...], geometry: ConvGeometry) -> tuple[int, ...]:
    """The shape of ``unfold``'s columns for an (n, c, h, w) input: (c, kh, kw, n, ho, wo)."""
    geometry.output_hw(shape[2], shape[3])  # a clear error when the input is too small
    return conv_kernels.columns_shape(shape, **geometry.kwargs())


def _plans(program: Program, x_shape: tuple[int, ...], param_shapes: Sequence[tuple[int, ...]],
           dtype: np.dtype, rt: Runtime) -> list[Plan]:
    """The untiled plans of the program's contractions for an input of ``x_shape``."""
    n = x_shape[0]
    plans = []
    shape = tuple(x_shape)
    if program.pre is not None:
        pre = tn.plan_for(program.pre, [shape] + list(param_shapes[:program.n_pre]), dtype, tile=n, rt=rt)
        plans.append(pre)
        shape = pre.shape(pre.output_node)
    if program.conv is not None:
        shape = unfolded_shape(shape, program.conv)
    main_params = list(param_shapes[program.n_pre:program.n_pre + program.n_main])
    plans.append(tn.plan_for(program.main, [shape] + main_params, dtype, tile=n, rt=rt))
    return plans


class _Registry:
    """Handles registered for one forward/backward call, unregistered together."""

    def __init__(self, rt: Runtime):
        self.rt, self.handles = rt, []

    def register(self, array: np.ndarray) -> Handle:
        handle = self.rt.register(array)
        self.handles.append(handle)
        return handle

    def unregister_all(self) -> None:
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.unregister()


def _check_parameter_count(program: Program, params: Sequence[np.ndarray]) -> None:
    expected = program.n_pre + program.n_main + int(program.bias)
    if len(params) != expected:
        raise ValueError(f"layer program takes {expected} parameter(s), got {len(params)}")


def forward(program: Program, x: np.ndarray, params: Sequence[np.ndarray], keep: bool) -> tuple[np.ndarray, State | None]:
    """Run the program on ``x``; with ``keep``, also return the State ``backward`` needs."""
    _check_parameter_count(program, params)
    rt = runtime()
    param_shapes = [p.shape for p in params]
    full_plans = _plans(program, x.shape, param_shapes, x.dtype, rt)  # validates every shape
    flops = sum(plan.flops for plan in full_plans)
    y = np.empty(full_plans[-1].shape(full_plans[-1].output_node), x.dtype)
    settings = config.read_settings()
    if settings.fuse == "on" or (settings.fuse == "auto" and flops < FUSE_FLOPS and settings.tile is None):
        tiles = batch_tiles(x.shape[0], flops, len(rt.workers), settings.tile, FUSED_SPLIT_FLOPS)
        return y, _fused_forward(rt, program, x, params, y, tiles, keep)
    tiles = batch_tiles(x.shape[0], flops, len(rt.workers), settings.tile)
    registry = _Registry(rt)
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
        _abandon(rt, kept)
        registry.unregister_all()
        raise
    if not keep:
        registry.unregister_all()
        return y, None
    return y, State(rt, kept, x.shape, param_shapes, x.dtype, registry.handles)


def _forward_tile(rt: Runtime, registry: _Registry, program: Program, x: np.ndarray, y: np.ndarray,
                  pre_params: list[Handle], main_params: list[Handle], bias: Handle | None, keep: bool,
                  start: int, stop: int) -> TileState:
    rows = stop - start
    current = registry.register(x)
    shape = x.shape
    saved_pre = saved_main = None
    unfold_input_shape = None
    if program.pre is not None:
        plan = tn.plan_for(program.pre, [shape] + [h.shape for h in pre_params], x.dtype, tile=rows, rt=rt)
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
    plan = tn.plan_for(program.main, [shape] + [h.shape for h in main_params], x.dtype, tile=rows, rt=rt)
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


def _let_submitted_finish(rt: Runtime) -> None:
    """After a failed submit or run: wait for what was submitted, before its data is released."""
    try:
        rt.wait()
    except Exception:  # the failure being raised already says what went wrong
        pass


def _abandon(rt: Runtime, kept: list[TileState]) -> None:
    _let_submitted_finish(rt)
    _release_tiles(kept)


@contextlib.contextmanager
def _waited_pass(rt: Runtime) -> Iterator[_Registry]:
    """Submit a pass's tasks inside the block on the arrays registered through the yielded
    registry; wait for them at its end (also when the block raises, before the arrays are given
    back); then unregister every array."""
    registry = _Registry(rt)
    try:
        yield registry
        rt.wait()
    except BaseException:
        _let_submitted_finish(rt)
        raise
    finally:
        registry.unregister_all()


def _fused_kwargs(program: Program, shapes: Sequence[tuple[int, ...]]) -> dict[str, Any]:
    g = program.conv
    return {"shapes": tuple(tuple(s) for s in shapes), "pre": program.pre, "n_pre": program.n_pre,
            "main": program.main, "n_main": program.n_main,
            "conv": None if g is None else (g.kernel, g.stride, g.padding, g.dilation),
            "bias_axis": program.bias_axis, "bias_span": program.bias_span}


def _fused_forward(rt: Runtime, program: Program, x: np.ndarray, params: Sequence[np.ndarray],
                   y: np.ndarray, tiles: list[tuple[int, int]], keep: bool) -> FusedState | None:
    packed = np.concatenate([p.reshape(-1) for p in params])  # small layers only: a cheap copy
    kwargs = _fused_kwargs(program, [p.shape for p in params])
    with _waited_pass(rt) as registry:
        packed_handle = registry.register(packed)
        for start, stop in tiles:
            rt.submit(FUSED_FORWARD, (registry.register(x[start:stop]), "R"), (packed_handle, "R"),
                      (registry.register(y[start:stop]), "W"), name="layer_forward", **kwargs)
    return FusedState(rt, x, packed, kwargs, tiles) if keep else None


def _fused_backward(state: FusedState, grad: np.ndarray, needs: list[bool]) -> list[np.ndarray | None]:
    if state.x is None:
        raise RuntimeError("backward: this layer's forward state was already released")
    rt = state.runtime
    dx = np.empty_like(state.x)
    # one partial gradient of the packed parameters per tile, summed into the first; zeroed, since
    # a tile writes only the wanted parameters' part and the sum reads all of it
    partials = [np.zeros_like(state.packed) for _ in state.tiles]
    kwargs = dict(state.kwargs, needs=tuple(bool(n) for n in needs))
    with _waited_pass(rt) as registry:
        packed_handle = registry.register(state.packed)
        partial_handles = [registry.register(p) for p in partials]
        for (start, stop), partial in zip(state.tiles, partial_handles):
            rt.submit(FUSED_BACKWARD, (registry.register(state.x[start:stop]), "R"), (packed_handle, "R"),
                      (registry.register(grad[start:stop]), "R"), (registry.register(dx[start:stop]), "W"),
                      (partial, "W"), name="layer_backward", **kwargs)
        sum_tree(rt, [Slot(h) for h in partial_handles], priority=0)
    views = fused_kernels.unpack(partials[0], state.kwargs["shapes"])
    return [dx if needs[0] else None] + [v if wanted else None for v, wanted in zip(views, needs[1:])]


def backward(program: Program, state: State | FusedState, grad: np.ndarray,
             needs: Sequence[bool]) -> list[np.ndarray | None]:
    """Gradients for (x, *params) where ``needs`` is True (None elsewhere), as tasks."""
    n_params = program.n_pre + program.n_main + int(program.bias)
    needs = list(needs) + [False] * (1 + n_params - len(needs))
    if isinstance(state, FusedState):
        return _fused_backward(state, grad, needs)
    if not state.tiles:
        raise RuntimeError("backward: this layer's forward state was already released")
    pre_wanted = program.pre is not None and (needs[0] or any(needs[1:1 + program.n_pre]))
    input_wanted = needs[0] or pre_wanted
    rt = state.runtime
    dtype = state.dtype
    wanted_params = [k for k in range(n_params) if needs[1 + k]]
    # per parameter, one partial gradient per tile (the first tile's is the result)
    partials = {k: [np.empty(state.param_shapes[k], dtype) for _ in state.tiles] for k in wanted_params}
    dx = np.empty(state.input_shape, dtype) if needs[0] else None
    with _waited_pass(rt) as registry:
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


def _backward_tile(rt: Runtime, registry: _Registry, program: Program, tile: TileState, grad: np.ndarray,
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
