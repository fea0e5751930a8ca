"""Lowering a whole-model graph to tasks over batch tiles: one forward pass, one backward pass.

Forward. Ops are taken in graph order and, for each op, every tile's task is submitted; nothing
waits between ops, so StarPU's implicit dependencies alone order tile t of op l+1 after tile t of
op l: tiles flow through the layers as a wavefront while later tiles are still in earlier ones.
Priorities (``forward_priority``) favour the deepest op, then the earliest tile. Batch norm in
training needs the statistics of the whole batch: each tile's (count, mean, M2) partial, a tree
of pairwise combines, one finalising task (which also updates the running statistics), then
each tile's normalisation.

Backward. Ops in reverse. Every op's input gradient is its own task (high priority: the
critical path runs through them); its parameter gradients are separate, low-priority tasks that
fill one partial per tile, so a layer's weight gradients overlap the backward of the layers
below it. A value read by several ops receives one contribution from each; the first overwrites
its gradient buffer, the others add into it. At the end, every parameter's partials are summed
by a tree of add tasks. Batch norm's backward reduces (sum dy, sum dy*xhat) over the tiles the
same way before the per-tile input gradients.

State. Buffers are NumPy arrays registered once and kept with the ``Lowering``: per value and
tile its activation (a value and the values that reshape it share one buffer, stored in the
shape its pickiest reader needs, e.g. a TT layer's (rows, *in_shape)), per value needing a
gradient its gradient, per parameter and tile a partial gradient, and per op the scratch its
backward needs (pooling indices, statistics). The parameters and state buffers are the caller's
arrays (torch's, zero copy).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from lotus_rt.graph import codelets as C
from lotus_rt.graph.ir import Graph, Op
from lotus_rt.layers.codelets import BIAS_ADD, BIAS_GRAD
from lotus_rt.runtime import Handle, Runtime
from lotus_rt.runtime.core import Codelet
from lotus_rt.tn import plan_for
from lotus_rt.tn.lower import Forward, submit_backward, submit_forward

Tiles = Sequence[tuple[int, int]]
# Priority bands of the backward pass: the input-gradient chain first, parameter gradients after.
CRITICAL = 1 << 20


def _fit(name: str, limit: int = 47) -> str:
    """A task name within StarPU's 47 bytes, keeping the tile suffix."""
    if len(name.encode()) <= limit:
        return name
    head, bracket, tail = name.partition("[")
    keep = limit - len((bracket + tail).encode())
    return head.encode()[:max(keep, 1)].decode(errors="ignore") + bracket + tail


def storage_roots(graph: Graph) -> dict[int, int]:
    """value -> the value whose buffer it uses (a reshape reads and writes its input's buffer)."""
    root = {v.id: v.id for v in graph.values}
    for op in graph.ops:  # graph order: an input's root is known before its reshape
        if op.kind == "reshape":
            root[op.output] = root[op.inputs[0]]
    return root


def storage_shapes(graph: Graph, root: dict[int, int]) -> dict[int, tuple[int, ...]]:
    """root value -> per-sample shape of its buffer: its own, or what a tensor-network op needs
    (its input as (*in_shape), its output as (*out_shape)); a conflict is an error."""
    shapes = {r: graph.values[r].sample_shape for r in set(root.values())}
    wanted: dict[int, tuple[int, ...]] = {}
    for op in graph.ops:
        if op.kind != "contract":
            continue
        for value, shape in ((op.inputs[0], tuple(op.attrs["in_shape"])), (op.output, tuple(op.attrs["out_shape"]))):
            r = root[value]
            if wanted.setdefault(r, shape) != shape:
                raise NotImplementedError(f"graph value {graph.values[value].name or value} is read as "
                                          f"{wanted[r]} and {shape} by two tensor-network layers")
    shapes.update(wanted)
    return shapes


def requires_grad(graph: Graph, input_grads: Sequence[bool]) -> set[int]:
    """Values whose gradient is needed: downstream of an input or a parameter that needs one."""
    needs = {v for v, wanted in zip(graph.inputs, input_grads) if wanted}
    for op in graph.ops:
        if any(v in needs for v in op.inputs) or any(graph.params[p].requires_grad for p in op.params):
            needs.add(op.output)
    return needs


@dataclass
class Lowering:
    rt: Runtime
    graph: Graph
    tiles: Tiles
    params: list[np.ndarray]  # the caller's parameter arrays, in graph.params order
    buffers: list[np.ndarray]  # the caller's state arrays, in graph.buffers order
    training: bool
    input_grads: list[bool]
    arrays: list[np.ndarray] = field(default_factory=list)  # every array a handle below is registered on
    handles: list[Handle] = field(default_factory=list)

    def __post_init__(self) -> None:
        g = self.graph
        self.root = storage_roots(g)
        self.shape = storage_shapes(g, self.root)
        self.needs = requires_grad(g, self.input_grads) if any(self.input_grads) or \
            any(p.requires_grad for p in g.params) else set()
        self.ntiles = len(self.tiles)
        self.act = {r: [self._new((stop - start,) + self.shape[r], g.values[r].dtype) for start, stop in self.tiles]
                    for r in set(self.root.values())}
        self.param_handles = [self._register(a) for a in self.params]
        self.buffer_handles = [self._register(a) for a in self.buffers]
        self.grad: dict[int, list[tuple[np.ndarray, Handle]]] = {}
        self.grad_written: dict[tuple[int, int], bool] = {}
        self.pgrad: dict[int, list[tuple[np.ndarray, Handle] | None]] = {}
        self.scratch: dict[tuple[int, str], Any] = {}
        self.kept: dict[int, Forward] = {}  # a tensor-network op's saved forward
        self.masks: dict[int, list[np.ndarray]] = {}  # dropout masks (written by the caller per step)
        self.bn_factors: dict[int, np.ndarray] = {}  # batch norm's running-average factor per step
        self.order = {id(op): k for k, op in enumerate(g.ops)}

    # ------------------------------------------------------------------ buffers

    def _register(self, array: np.ndarray) -> Handle:
        handle = self.rt.register(array)
        self.arrays.append(array)
        self.handles.append(handle)
        return handle

    def _new(self, shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray, Handle]:
        array = np.zeros(shape, dtype)
        return array, self._register(array)

    def value(self, v: int, t: int) -> Handle:
        return self.act[self.root[v]][t][1]

    def value_array(self, v: int, t: int) -> np.ndarray:
        return self.act[self.root[v]][t][0]

    def tile_shape(self, v: int, t: int) -> tuple[int, ...]:
        """The value's own shape for tile t (its buffer may store it in another shape)."""
        start, stop = self.tiles[t]
        return (stop - start,) + self.graph.values[v].sample_shape

    def rows(self, t: int) -> int:
        return self.tiles[t][1] - self.tiles[t][0]

    def grad_target(self, v: int, t: int) -> tuple[Handle, bool]:
        """(gradient buffer of v for tile t, whether to add into it) for one more contribution."""
        r = self.root[v]
        if r not in self.grad:
            self.grad[r] = [self._new((stop - start,) + self.shape[r], self.graph.values[r].dtype)
                            for start, stop in self.tiles]
        accumulate = self.grad_written.get((r, t), False)
        self.grad_written[(r, t)] = True
        return self.grad[r][t][1], accumulate

    def grad_source(self, v: int, t: int) -> Handle | None:
        """The (complete) gradient of v for tile t, or None when nothing contributed (zero)."""
        r = self.root[v]
        return self.grad[r][t][1] if self.grad_written.get((r, t)) else None

    def grad_array(self, v: int, t: int) -> np.ndarray:
        self.grad_target(v, t)
        return self.grad[self.root[v]][t][0]

    def pgrad_target(self, p: int, t: int) -> tuple[Handle, bool]:
        """(tile t's partial gradient of parameter p, whether to add into it)."""
        slots = self.pgrad.setdefault(p, [None] * self.ntiles)
        if slots[t] is None:
            slots[t] = self._new(self.graph.params[p].shape, self.graph.params[p].dtype)
            return slots[t][1], False
        return slots[t][1], True

    def scratch_array(self, op: Op, key: str, shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray, Handle]:
        k = (id(op), key)
        if k not in self.scratch:
            self.scratch[k] = self._new(shape, dtype)
        return self.scratch[k]

    # ------------------------------------------------------------------ submission

    def submit(self, codelet: Codelet, *accesses: tuple[Handle, str], priority: int = 0, name: str = "",
               **kwargs: Any) -> None:
        """Submit a task named "<codelet> <layer>[tile]" (traces group tasks by either word)."""
        label = f"{codelet.name} {name}" if name else codelet.name
        self.rt.submit(codelet, *accesses, priority=priority, name=_fit(label), **kwargs)

    def forward_priority(self, op: Op, t: int) -> int:
        return self.order[id(op)] * self.ntiles + (self.ntiles - t)

    def backward_priority(self, op: Op, t: int, critical: bool) -> int:
        depth = len(self.graph.ops) - self.order[id(op)]  # the last op's backward comes first
        return (CRITICAL if critical else 0) + depth * self.ntiles + (self.ntiles - t)

    def tree(self, slots: list[Handle], combine: Codelet, priority: int, name: str) -> Handle:
        """Reduce ``slots`` pairwise into the first with ``combine(other R, acc RW)``."""
        level = list(slots)
        while len(level) > 1:
            nxt = []
            for i in range(0, len(level) - 1, 2):
                self.submit(combine, (level[i + 1], "R"), (level[i], "RW"), priority=priority, name=name)
                nxt.append(level[i])
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        return level[0]

    # ------------------------------------------------------------------ passes

    def forward(self) -> None:
        for op in self.graph.ops:
            FORWARD[op.kind](self, op)

    def backward(self) -> None:
        """Gradients of every needed input and parameter; the outputs' gradients are written by
        the caller into ``grad_array(output, t)`` before the pass runs."""
        for v in self.graph.outputs:
            for t in range(self.ntiles):
                self.grad_target(v, t)
        for op in reversed(self.graph.ops):
            if op.output in self.needs:
                BACKWARD[op.kind](self, op)
        for p, slots in self.pgrad.items():
            written = [s[1] for s in slots if s is not None]
            self.tree(written, C.ADD_INTO, priority=0, name="dparam_sum")

    def written_each_step(self) -> list[Handle]:
        """Handles whose data Python writes before a forward run: inputs, dropout masks, batch
        norm factors, and the caller's parameters and state (an optimizer updates them in place)."""
        handles = [self.value(v, t) for v in self.graph.inputs for t in range(self.ntiles)]
        handles += [self.scratch[key][1] for key in self.scratch if key[1].startswith(("mask", "factor"))]
        return handles + self.param_handles + self.buffer_handles

    def result_grad_handles(self, input_grads: Sequence[bool]) -> list[Handle]:
        """Handles Python reads after a backward run: wanted input gradients, parameter partials."""
        handles = [self.grad[self.root[v]][t][1] for v, wanted in zip(self.graph.inputs, input_grads)
                   if wanted and self.root[v] in self.grad for t in range(self.ntiles)]
        return handles + [slot[1] for slots in self.pgrad.values() for slot in slots if slot is not None]

    def param_grad(self, p: int) -> np.ndarray | None:
        """The summed gradient of parameter p after the backward pass (None: none was needed)."""
        slots = self.pgrad.get(p)
        if not slots:
            return None
        return next(s[0] for s in slots if s is not None)

    def release(self) -> None:
        for kept in self.kept.values():
            kept.release()
        self.kept.clear()
        for handle in self.handles:
            if handle.registered:
                handle.unregister()
        self.handles.clear()


# ---------------------------------------------------------------------------------- per op kind

def _needs_param(lw: Lowering, op: Op, k: int) -> bool:
    return len(op.params) > k and lw.graph.params[op.params[k]].requires_grad


def _weight_grads(lw: Lowering, op: Op, t: int, bias: bool) -> tuple[list[tuple[Handle, str]], dict[str, Any]]:
    """The (partial gradient handle, mode) accesses and flags of a weight-gradient task."""
    need_w, need_b = _needs_param(lw, op, 0), bias and _needs_param(lw, op, 1)
    accesses, flags = [], {"need_w": need_w, "need_b": need_b, "accumulate_w": False, "accumulate_b": False}
    for k, wanted, key in ((0, need_w, "accumulate_w"), (1, need_b, "accumulate_b")):
        if wanted:
            handle, accumulate = lw.pgrad_target(op.params[k], t)
            accesses.append((handle, "RW" if accumulate else "W"))
            flags[key] = accumulate
    return accesses, flags


def _conv_kwargs(lw: Lowering, op: Op, t: int) -> dict[str, Any]:
    a = op.attrs
    return {"x_shape": lw.tile_shape(op.inputs[0], t), "y_shape": lw.tile_shape(op.output, t),
            "w_view": a.get("w_view"), "stride": a["stride"], "padding": a["padding"], "dilation": a["dilation"],
            "groups": a["groups"]}


def conv_forward(lw: Lowering, op: Op) -> None:
    bias, relu = op.attrs["bias"], bool(op.attrs.get("relu"))
    params = [(lw.param_handles[p], "R") for p in op.params]
    for t in range(lw.ntiles):
        lw.submit(C.CONV, (lw.value(op.inputs[0], t), "R"), *params, (lw.value(op.output, t), "W"),
                  priority=lw.forward_priority(op, t), name=f"{op.name}[{t}]",
                  bias=bias, relu=relu, **_conv_kwargs(lw, op, t))


def _weighted_backward(lw: Lowering, op: Op, dx_codelet: Codelet, dw_codelet: Codelet,
                       dx_reads: Callable[[int], list], dw_reads: Callable[[int], list],
                       kwargs: Callable[[int, str], dict[str, Any]]) -> None:
    """Per tile, a layer's input gradient (critical path) and its weight and bias partials (low
    priority: they overlap the backward of the layers below); a fused ReLU masks dy with y."""
    relu, x = bool(op.attrs.get("relu")), op.inputs[0]
    for t in range(lw.ntiles):
        gy = lw.grad_source(op.output, t)
        if gy is None:
            continue
        y = [(lw.value(op.output, t), "R")] if relu else []
        if x in lw.needs:
            gx, accumulate = lw.grad_target(x, t)
            lw.submit(dx_codelet, (gy, "R"), *dx_reads(t), *y, (gx, "RW" if accumulate else "W"),
                      priority=lw.backward_priority(op, t, True), name=f"{op.name}[{t}]", relu=relu,
                      accumulate=accumulate, **kwargs(t, "dx"))
        grads, flags = _weight_grads(lw, op, t, op.attrs["bias"])
        if grads:
            lw.submit(dw_codelet, (gy, "R"), *dw_reads(t), *y, *grads,
                      priority=lw.backward_priority(op, t, False), name=f"{op.name}[{t}]", relu=relu,
                      **flags, **kwargs(t, "dw"))


def conv_backward(lw: Lowering, op: Op) -> None:
    w = (lw.param_handles[op.params[0]], "R")
    reads = lambda t: [(lw.value(op.inputs[0], t), "R"), w]  # noqa: E731
    _weighted_backward(lw, op, C.CONV_DX, C.CONV_DW, reads, reads, lambda t, _: _conv_kwargs(lw, op, t))


def linear_forward(lw: Lowering, op: Op) -> None:
    bias, relu = op.attrs["bias"], bool(op.attrs.get("relu"))
    params = [(lw.param_handles[p], "R") for p in op.params]
    for t in range(lw.ntiles):
        x_shape = (lw.rows(t), lw.graph.values[op.inputs[0]].sample_size)
        lw.submit(C.LINEAR, (lw.value(op.inputs[0], t), "R"), *params, (lw.value(op.output, t), "W"),
                  priority=lw.forward_priority(op, t), name=f"{op.name}[{t}]", x_shape=x_shape, bias=bias,
                  relu=relu)


def linear_backward(lw: Lowering, op: Op) -> None:
    x, w = op.inputs[0], (lw.param_handles[op.params[0]], "R")
    out_features = lw.graph.params[op.params[0]].shape[0]

    def kwargs(t: int, which: str) -> dict[str, Any]:
        if which == "dx":
            return {}
        return {"x_shape": (lw.rows(t), lw.graph.values[x].sample_size), "out_features": out_features}

    _weighted_backward(lw, op, C.LINEAR_DX, C.LINEAR_DW, lambda t: [w], lambda t: [(lw.value(x, t), "R")], kwargs)


def _contract_plan(lw: Lowering, op: Op) -> Any:
    """The tensor network's plan for the whole batch, cut into the graph's tiles: steps that touch
    only the cores (batch-independent) run once per pass and are shared by every tile."""
    a = op.attrs
    cores = op.params[:len(op.params) - int(a["bias"])]
    batch = lw.graph.values[op.inputs[0]].shape[0]
    shapes = [(batch,) + tuple(a["in_shape"])] + [lw.graph.params[p].shape for p in cores]
    plan = plan_for(a["equation"], shapes, lw.graph.values[op.output].dtype, tile=lw.rows(0), rt=lw.rt)
    if plan.ntiles != lw.ntiles or (plan.tile_index is not None and plan.tiles() != list(lw.tiles)):
        raise NotImplementedError(f"{op.name}: the planner cut the batch into {plan.ntiles} tiles, the graph "
                                  f"into {lw.ntiles}")
    return plan


def contract_forward(lw: Lowering, op: Op) -> None:
    """A tensor-network layer (TT linear): the planner's pairwise GEMM steps over the tiles."""
    a = op.attrs
    cores = op.params[:len(op.params) - int(a["bias"])]
    tiles = range(lw.ntiles)
    _, kept = submit_forward(lw.rt, _contract_plan(lw, op), [[lw.value(op.inputs[0], t) for t in tiles]]
                             + [lw.param_handles[p] for p in cores], [lw.value(op.output, t) for t in tiles],
                             keep=True, label=op.name, priority=lw.forward_priority(op, 0))
    lw.kept[id(op)] = kept
    if a["bias"]:
        for t in tiles:
            lw.submit(BIAS_ADD, (lw.param_handles[op.params[-1]], "R"), (lw.value(op.output, t), "RW"),
                      priority=lw.forward_priority(op, t), name=f"{op.name}_bias[{t}]", axis=1,
                      span=len(a["out_shape"]))


def contract_backward(lw: Lowering, op: Op) -> None:
    a = op.attrs
    ncores = len(op.params) - int(a["bias"])
    x, tiles = op.inputs[0], range(lw.ntiles)
    sources = [lw.grad_source(op.output, t) for t in tiles]
    if any(g is None for g in sources):
        return
    dtype = lw.graph.values[op.output].dtype
    targets: dict[int, Any] = {}
    adds: list[tuple[Handle, Handle]] = []  # (fresh gradient, buffer to add it into)

    def target(handle: Handle, accumulate: bool, shape: tuple[int, ...]) -> Handle:
        if not accumulate:
            return handle
        fresh = lw._new(shape, dtype)[1]  # the steps write their gradient: a fresh buffer, added after
        adds.append((fresh, handle))
        return fresh

    if x in lw.needs:
        targets[0] = [target(*lw.grad_target(x, t), (lw.rows(t),) + tuple(a["in_shape"])) for t in tiles]
    for k in range(ncores):
        if _needs_param(lw, op, k):
            targets[k + 1] = target(*lw.pgrad_target(op.params[k], 0), lw.graph.params[op.params[k]].shape)
    prio = lw.backward_priority(op, 0, True)
    if targets:
        submit_backward(lw.rt, lw.kept[id(op)], sources, sorted(targets), targets, label=op.name, priority=prio)
    if a["bias"] and lw.graph.params[op.params[-1]].requires_grad:
        for t in tiles:
            handle, accumulate = lw.pgrad_target(op.params[-1], t)
            lw.submit(BIAS_GRAD, (sources[t], "R"),
                      (target(handle, accumulate, lw.graph.params[op.params[-1]].shape), "W"),
                      priority=lw.backward_priority(op, t, False), name=f"{op.name}_bias[{t}]", axis=1,
                      span=len(a["out_shape"]))
    for fresh, into in adds:
        lw.submit(C.ADD_INTO, (fresh, "R"), (into, "RW"), priority=prio, name=f"{op.name}_acc")


def _input_grad_tasks(lw: Lowering, op: Op, codelet: Codelet, reads: Callable[[int], list[tuple[Handle, str]]],
                      kwargs: Callable[[int], dict[str, Any]] = lambda t: {}) -> None:
    """Per tile, the task adding a single-input op's input gradient: ``codelet(dy, *reads(t), dx)``."""
    x = op.inputs[0]
    if x not in lw.needs:
        return
    for t in range(lw.ntiles):
        gy = lw.grad_source(op.output, t)
        if gy is None:
            continue
        gx, accumulate = lw.grad_target(x, t)
        lw.submit(codelet, (gy, "R"), *reads(t), (gx, "RW" if accumulate else "W"),
                  priority=lw.backward_priority(op, t, True), name=f"{op.name}[{t}]", accumulate=accumulate,
                  **kwargs(t))


def _unary(forward: Codelet, backward: Codelet, keeps: str, **static: Any):
    """Forward/backward emitters of an element-wise op; ``keeps``: what its backward reads
    besides dy ("y": the output, "x": the input)."""
    def emit_forward(lw: Lowering, op: Op) -> None:
        attrs = {k: op.attrs[k] for k in static}
        for t in range(lw.ntiles):
            lw.submit(forward, (lw.value(op.inputs[0], t), "R"), (lw.value(op.output, t), "W"),
                      priority=lw.forward_priority(op, t), name=f"{op.name}[{t}]", **attrs)

    def emit_backward(lw: Lowering, op: Op) -> None:
        kept = op.output if keeps == "y" else op.inputs[0]
        attrs = {k: op.attrs[k] for k in static}
        _input_grad_tasks(lw, op, backward, lambda t: [(lw.value(kept, t), "R")], lambda t: attrs)
    return emit_forward, emit_backward


relu_forward, relu_backward = _unary(C.RELU, C.RELU_DX, "y")
gelu_forward, gelu_backward = _unary(C.GELU, C.GELU_DX, "x", approximate=None)


def _mask(lw: Lowering, op: Op, t: int) -> tuple[np.ndarray, Handle]:
    return lw.scratch_array(op, f"mask{t}", lw.tile_shape(op.output, t), lw.graph.values[op.output].dtype)


def dropout_forward(lw: Lowering, op: Op) -> None:
    masks = lw.masks[id(op)] = []
    for t in range(lw.ntiles):
        mask, handle = _mask(lw, op, t)
        masks.append(mask)
        lw.submit(C.DROPOUT, (lw.value(op.inputs[0], t), "R"), (handle, "R"), (lw.value(op.output, t), "W"),
                  priority=lw.forward_priority(op, t), name=f"{op.name}[{t}]")


def dropout_backward(lw: Lowering, op: Op) -> None:
    _input_grad_tasks(lw, op, C.DROPOUT_DX, lambda t: [(_mask(lw, op, t)[1], "R")])


def _pool_kwargs(lw: Lowering, op: Op, t: int, keys: Sequence[str]) -> dict[str, Any]:
    return {"x_shape": lw.tile_shape(op.inputs[0], t), **{k: op.attrs[k] for k in keys}}


MAXPOOL_KEYS = ("kernel", "stride", "padding", "dilation", "ceil_mode")
AVGPOOL_KEYS = ("kernel", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _indices(lw: Lowering, op: Op, t: int) -> Handle:
    return lw.scratch_array(op, f"indices{t}", lw.tile_shape(op.output, t), np.int64)[1]


def maxpool_forward(lw: Lowering, op: Op) -> None:
    for t in range(lw.ntiles):
        lw.submit(C.MAXPOOL, (lw.value(op.inputs[0], t), "R"), (lw.value(op.output, t), "W"),
                  (_indices(lw, op, t), "W"), priority=lw.forward_priority(op, t), name=f"{op.name}[{t}]",
                  **_pool_kwargs(lw, op, t, MAXPOOL_KEYS))


def maxpool_backward(lw: Lowering, op: Op) -> None:
    _input_grad_tasks(lw, op, C.MAXPOOL_DX, lambda t: [(lw.value(op.inputs[0], t), "R"), (_indices(lw, op, t), "R")],
                      lambda t: _pool_kwargs(lw, op, t, MAXPOOL_KEYS))


def avgpool_forward(lw: Lowering, op: Op) -> None:
    for t in range(lw.ntiles):
        lw.submit(C.AVGPOOL, (lw.value(op.inputs[0], t), "R"), (lw.value(op.output, t), "W"),
                  priority=lw.forward_priority(op, t), name=f"{op.name}[{t}]", y_shape=lw.tile_shape(op.output, t),
                  **_pool_kwargs(lw, op, t, AVGPOOL_KEYS))


def avgpool_backward(lw: Lowering, op: Op) -> None:
    _input_grad_tasks(lw, op, C.AVGPOOL_DX, lambda t: [(lw.value(op.inputs[0], t), "R")],
                      lambda t: {"y_shape": lw.tile_shape(op.output, t), **_pool_kwargs(lw, op, t, AVGPOOL_KEYS)})


def add_forward(lw: Lowering, op: Op) -> None:
    relu = bool(op.attrs.get("relu"))
    a, b = op.inputs
    for t in range(lw.ntiles):
        lw.submit(C.ADD, (lw.value(a, t), "R"), (lw.value(b, t), "R"), (lw.value(op.output, t), "W"),
                  priority=lw.forward_priority(op, t), name=f"{op.name}[{t}]", relu=relu)


def add_backward(lw: Lowering, op: Op) -> None:
    relu = bool(op.attrs.get("relu"))
    for t in range(lw.ntiles):
        gy = lw.grad_source(op.output, t)
        if gy is None:
            continue
        y = [(lw.value(op.output, t), "R")] if relu else []
        for x in op.inputs:
            if x in lw.needs:
                gx, accumulate = lw.grad_target(x, t)
                lw.submit(C.PASS_DX, (gy, "R"), *y, (gx, "RW" if accumulate else "W"),
                          priority=lw.backward_priority(op, t, True), name=f"{op.name}[{t}]", relu=relu,
                          accumulate=accumulate)


def cat_forward(lw: Lowering, op: Op) -> None:
    for t in range(lw.ntiles):
        lw.submit(C.CAT, *[(lw.value(x, t), "R") for x in op.inputs], (lw.value(op.output, t), "W"),
                  priority=lw.forward_priority(op, t), name=f"{op.name}[{t}]",
                  shapes=tuple(lw.tile_shape(x, t) for x in op.inputs), y_shape=lw.tile_shape(op.output, t),
                  dim=op.attrs["dim"])


def cat_backward(lw: Lowering, op: Op) -> None:
    dim = op.attrs["dim"]
    for t in range(lw.ntiles):
        gy = lw.grad_source(op.output, t)
        if gy is None:
            continue
        start = 0
        for x in op.inputs:
            stop = start + lw.graph.values[x].shape[dim]
            if x in lw.needs:
                gx, accumulate = lw.grad_target(x, t)
                lw.submit(C.SLICE_DX, (gy, "R"), (gx, "RW" if accumulate else "W"),
                          priority=lw.backward_priority(op, t, True), name=f"{op.name}[{t}]",
                          y_shape=lw.tile_shape(op.output, t), dim=dim, start=start, stop=stop,
                          accumulate=accumulate)
            start = stop


def reshape_forward(lw: Lowering, op: Op) -> None:
    """Nothing to run: the output is the input's buffer seen in another shape."""


def reshape_backward(lw: Lowering, op: Op) -> None:
    """Nothing to run: the gradients share one buffer too."""


def _bn_shapes(lw: Lowering, op: Op) -> tuple[int, tuple[int, ...]]:
    c = lw.graph.values[op.inputs[0]].shape[1]
    return c, lw.graph.values[op.inputs[0]].shape


def batchnorm_forward(lw: Lowering, op: Op) -> None:
    a, relu = op.attrs, bool(op.attrs.get("relu"))
    c, _ = _bn_shapes(lw, op)
    dtype = lw.graph.values[op.output].dtype
    _, stats = lw.scratch_array(op, "stats", (2 * c,), dtype)
    running = [(lw.buffer_handles[b], "RW") for b in op.buffers]
    prio_stats = lw.forward_priority(op, 0) + lw.ntiles  # the statistics gate every tile: first
    if a["batch_stats"]:
        parts = []
        for t in range(lw.ntiles):
            _, part = lw.scratch_array(op, f"part{t}", (2 * c + 1,), np.float64)
            parts.append(part)
            lw.submit(C.BN_PARTIAL, (lw.value(op.inputs[0], t), "R"), (part, "W"), priority=prio_stats,
                      name=f"{op.name}_stats[{t}]", x_shape=lw.tile_shape(op.inputs[0], t))
        total = lw.tree(parts, C.BN_COMBINE, prio_stats, f"{op.name}_combine")
        factor, factor_handle = lw.scratch_array(op, "factor", (1,), np.float64)
        lw.bn_factors[id(op)] = factor
        lw.submit(C.BN_FINALIZE, (total, "R"), (factor_handle, "R"), (stats, "W"),
                  *(running if a["update"] else []), priority=prio_stats, name=f"{op.name}_finalize",
                  eps=a["eps"], track=a["update"])
    else:
        lw.submit(C.BN_EVAL_STATS, *[(lw.buffer_handles[b], "R") for b in op.buffers], (stats, "W"),
                  priority=prio_stats, name=f"{op.name}_stats", eps=a["eps"])
    params = [(lw.param_handles[p], "R") for p in op.params]
    for t in range(lw.ntiles):
        lw.submit(C.BN_NORMALIZE, (lw.value(op.inputs[0], t), "R"), (stats, "R"), *params,
                  (lw.value(op.output, t), "W"), priority=lw.forward_priority(op, t), name=f"{op.name}[{t}]",
                  x_shape=lw.tile_shape(op.inputs[0], t), affine=a["affine"], relu=relu)


def batchnorm_backward(lw: Lowering, op: Op) -> None:
    a, relu, x = op.attrs, bool(op.attrs.get("relu")), op.inputs[0]
    c, full = _bn_shapes(lw, op)
    _, stats = lw.scratch_array(op, "stats", (2 * c,), lw.graph.values[op.output].dtype)
    sources = [lw.grad_source(op.output, t) for t in range(lw.ntiles)]
    if any(s is None for s in sources):  # nothing downstream used the output: no gradient flows
        return
    prio = lw.backward_priority(op, 0, True) + lw.ntiles
    sums = []
    for t in range(lw.ntiles):
        _, part = lw.scratch_array(op, f"dpart{t}", (2 * c,), np.float64)
        sums.append(part)
        y = [(lw.value(op.output, t), "R")] if relu else []
        lw.submit(C.BN_DX_PARTIAL, (sources[t], "R"), (lw.value(x, t), "R"), (stats, "R"), *y, (part, "W"),
                  priority=prio, name=f"{op.name}_sums[{t}]", x_shape=lw.tile_shape(x, t), relu=relu)
    total = lw.tree(sums, C.ADD_INTO, prio, f"d{op.name}_sum")
    count = full[0] * full[2] * full[3]
    if x in lw.needs:
        weight = [(lw.param_handles[op.params[0]], "R")] if a["affine"] else []
        for t in range(lw.ntiles):
            y = [(lw.value(op.output, t), "R")] if relu else []
            gx, accumulate = lw.grad_target(x, t)
            lw.submit(C.BN_DX, (sources[t], "R"), (lw.value(x, t), "R"), (stats, "R"), (total, "R"), *y, *weight,
                      (gx, "RW" if accumulate else "W"), priority=lw.backward_priority(op, t, True),
                      name=f"{op.name}[{t}]", x_shape=lw.tile_shape(x, t), count=count, affine=a["affine"],
                      relu=relu, training=a["batch_stats"], accumulate=accumulate)
    if a["affine"]:
        grads, flags = _weight_grads(lw, op, 0, True)
        if grads:
            lw.submit(C.BN_DPARAMS, (total, "R"), *grads, priority=lw.backward_priority(op, 0, False),
                      name=f"{op.name}", **flags)


FORWARD: dict[str, Callable[[Lowering, Op], None]] = {
    "conv": conv_forward, "linear": linear_forward, "contract": contract_forward, "relu": relu_forward,
    "gelu": gelu_forward, "dropout": dropout_forward, "maxpool": maxpool_forward, "avgpool": avgpool_forward,
    "batchnorm": batchnorm_forward, "add": add_forward, "cat": cat_forward, "reshape": reshape_forward,
}
BACKWARD: dict[str, Callable[[Lowering, Op], None]] = {
    "conv": conv_backward, "linear": linear_backward, "contract": contract_backward, "relu": relu_backward,
    "gelu": gelu_backward, "dropout": dropout_backward, "maxpool": maxpool_backward, "avgpool": avgpool_backward,
    "batchnorm": batchnorm_backward, "add": add_backward, "cat": cat_backward, "reshape": reshape_backward,
}
