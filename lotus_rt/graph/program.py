"""A graph lowered once for one input shape and mode, then replayed at every step.

``Program(graph, batch, params, buffers, training, input_grads)`` cuts the batch into tiles,
allocates and registers every buffer (``Lowering``), and records the forward pass, and the
backward pass when gradients are wanted, as two step plans (``runtime.record()``). A step then
costs: copying the inputs into their tile buffers, one ``plan.run()`` (one call into the binding
submits every task), one ``wait()``, and copying the outputs out. The first step records; later
steps replay. The parameters and state buffers are the caller's arrays, registered in place: they
must stay where they are (``matches`` tells whether a program still fits the caller's arrays).
They may be NumPy arrays or arrays in CUDA device memory (torch CUDA tensors, CuPy arrays:
registered on their GPU); activations and gradients live in host buffers StarPU moves to the
workers that need them. With CUDA workers a step also tells StarPU what Python wrote or reads
outside tasks (``Handle.written_at_home`` / ``bring_home``); without them CPU workers work on
the home copies themselves and nothing is needed.

    forward(inputs, masks, bn_factors) -> outputs   (new arrays)
    backward(output_grads) -> (input grads, parameter grads)   (new arrays; None where not wanted)
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from lotus_rt.graph.ir import Graph
from lotus_rt.graph.lower import Lowering
from lotus_rt.runtime import Runtime, StepPlan, runtime


def address(array) -> int:
    """Where an array's data starts: a NumPy array, or an object in CUDA device memory."""
    if isinstance(array, np.ndarray):
        return array.ctypes.data
    return int(array.__cuda_array_interface__["data"][0])


# A tile's share of a heavy op (convolution, linear, tensor network) should be worth a task: a
# task costs about 6-10 µs of runtime overhead (replayed), a MFLOP about 50 µs at 2e10 FLOP/s.
MIN_TILE_FLOPS = 1e6


def heavy_flops(graph: Graph) -> list[float]:
    """Forward FLOPs of each convolution, linear and tensor-network op of the graph."""
    flops = []
    for op in graph.ops:
        n = graph.values[op.output].shape[0]
        out = graph.values[op.output].shape
        if op.kind == "conv":
            view = op.attrs.get("w_view")
            kernel = view[1] if view else graph.params[op.params[0]].shape
            flops.append(2.0 * n * math.prod(out[1:]) * math.prod(kernel[1:]))
        elif op.kind == "linear":
            flops.append(2.0 * n * math.prod(graph.params[op.params[0]].shape))
        elif op.kind == "contract":
            cores = op.params[:len(op.params) - int(op.attrs["bias"])]
            flops.append(2.0 * n * sum(math.prod(graph.params[p].shape) for p in cores))
    return flops


def tile_count(graph: Graph, batch: int, nworkers: int, per_worker: int) -> int:
    """How many batch tiles: ``per_worker`` per worker, fewer when a heavy op's share of a tile
    would not be worth a task (MIN_TILE_FLOPS), never more than samples."""
    flops = heavy_flops(graph)
    worth = int((sum(flops) / len(flops)) // MIN_TILE_FLOPS) if flops else 1
    return max(1, min(per_worker * max(nworkers, 1), worth, batch))


def tile_ranges(batch: int, ntiles: int, rows: int | None = None) -> list[tuple[int, int]]:
    """``ntiles`` near-equal tiles over the batch, or tiles of ``rows`` samples when given."""
    if rows is None:
        ntiles = max(1, min(ntiles, batch))
        rows = -(-batch // ntiles)
    return [(start, min(start + rows, batch)) for start in range(0, batch, rows)]


class Program:
    def __init__(self, graph: Graph, batch: int, params: Sequence[np.ndarray], buffers: Sequence[np.ndarray],
                 training: bool, input_grads: Sequence[bool], tiles: Sequence[tuple[int, int]],
                 rt: Runtime | None = None):
        self.rt = rt or runtime()
        self.graph, self.batch, self.training = graph, batch, training
        self.tiles = list(tiles)
        self.input_grads = list(input_grads)
        self.param_ptrs = [address(a) for a in params]
        self.buffer_ptrs = [address(a) for a in buffers]
        self.lowering = Lowering(self.rt, graph, self.tiles, list(params), list(buffers), training,
                                 self.input_grads)
        self.with_backward = bool(self.lowering.needs)
        self.generation = 0  # forwards run: a backward belongs to the forward of its generation
        # Called with this program after its backward plan is submitted and before the wait: more
        # tasks for the same step graph (lotus_rt.distributed's cross-rank gradient reduction).
        self.on_backward: Callable[["Program"], None] | None = None
        self._forward: StepPlan | None = None
        self._backward: StepPlan | None = None
        try:
            with self.rt.record() as plan:
                self.lowering.forward()
            self._forward = plan
            if self.with_backward:
                with self.rt.record() as plan:
                    self.lowering.backward()
                self._backward = plan
        except BaseException:
            self.release()
            raise

    @property
    def ntasks(self) -> tuple[int, int]:
        """Tasks per forward and per backward run."""
        return len(self._forward or ()), len(self._backward or ())

    def matches(self, params: Sequence[np.ndarray], buffers: Sequence[np.ndarray]) -> bool:
        """Whether the caller's arrays are still the ones this program registered."""
        return [address(a) for a in params] == self.param_ptrs and \
            [address(a) for a in buffers] == self.buffer_ptrs

    def forward(self, inputs: Sequence[np.ndarray], masks: dict[int, np.ndarray] | None = None,
                bn_factors: dict[int, float] | None = None) -> list[np.ndarray]:
        """Run the forward pass on ``inputs`` (whole batches); returns the outputs (new arrays).
        ``masks``: per dropout op (``id(op)``), its whole-batch mask; ``bn_factors``: per batch
        norm op, its running-average factor for this step."""
        lw = self.lowering
        self.generation += 1
        for v, x in zip(self.graph.inputs, inputs):
            for t, (start, stop) in enumerate(self.tiles):
                lw.value_array(v, t).reshape(stop - start, -1)[...] = x[start:stop].reshape(stop - start, -1)
        for key, mask in (masks or {}).items():
            for t, (start, stop) in enumerate(self.tiles):
                lw.masks[key][t][...] = mask[start:stop].reshape(lw.masks[key][t].shape)
        for key, factor in (bn_factors or {}).items():
            lw.bn_factors[key][0] = factor
        if self.rt.has_cuda:  # what Python wrote since the last step: StarPU's GPU copies are stale
            for handle in lw.written_each_step():
                handle.written_at_home()
        self._forward.run()
        self.rt.wait()
        if self.rt.has_cuda:
            for handle in [lw.value(v, t) for v in self.graph.outputs for t in range(len(self.tiles))] + \
                    lw.buffer_handles:
                handle.bring_home()
        return [self._gather(lw.value_array, v) for v in self.graph.outputs]

    def backward(self, output_grads: Sequence[np.ndarray | None]) -> tuple[list[np.ndarray | None],
                                                                             list[np.ndarray | None]]:
        """Run the backward pass for these output gradients (None: zero); returns the gradients
        of the inputs and of the parameters (new arrays; None where not wanted)."""
        if self._backward is None:
            raise RuntimeError("this graph program was built without a backward pass (no gradient wanted)")
        lw = self.lowering
        for v, g in zip(self.graph.outputs, output_grads):
            for t, (start, stop) in enumerate(self.tiles):
                target = lw.grad_array(v, t).reshape(stop - start, -1)
                if g is None:
                    target[...] = 0
                else:
                    target[...] = g[start:stop].reshape(stop - start, -1)
        if self.rt.has_cuda:
            for v in self.graph.outputs:
                for t in range(len(self.tiles)):
                    lw.grad_source(v, t).written_at_home()
        self._backward.run()
        try:
            if self.on_backward is not None:
                self.on_backward(self)
        finally:
            self.rt.wait()
        if self.rt.has_cuda:
            for handle in lw.result_grad_handles(self.input_grads):
                handle.bring_home()
        input_grads = [self._gather(lw.grad_array, v) if wanted else None
                       for v, wanted in zip(self.graph.inputs, self.input_grads)]
        param_grads = []
        for p in range(len(self.graph.params)):
            grad = lw.param_grad(p)
            param_grads.append(None if grad is None else grad.copy())
        return input_grads, param_grads

    def _gather(self, tile_array, v: int) -> np.ndarray:
        shape = self.graph.values[v].shape
        out = np.empty(shape, self.graph.values[v].dtype)
        flat = out.reshape(shape[0], -1)
        for t, (start, stop) in enumerate(self.tiles):
            flat[start:stop] = tile_array(v, t).reshape(stop - start, -1)
        return out

    def release(self) -> None:
        """Free the plans and unregister every buffer (idempotent)."""
        for plan in (self._forward, self._backward):
            if plan is not None:
                plan.release()
        self._forward = self._backward = None
        if not self.rt.closed:
            self.lowering.release()
