"""A graph lowered once for one input shape and mode, then replayed at every step.

``Program(graph, batch, params, buffers, training, input_grads)`` cuts the batch into tiles,
allocates and registers every buffer (``Lowering``), and records the forward pass, and the
backward pass when gradients are wanted, as two step plans (``runtime.record()``). A step then
costs: copying the inputs into their tile buffers, one ``plan.run()`` (one call into the binding
submits every task), one ``wait()``, and copying the outputs out. The first step records; later
steps replay. The parameters and state buffers are the caller's arrays, registered in place: they
must stay where they are (``matches`` tells whether a program still fits the caller's arrays).

    forward(inputs, masks, bn_factors) -> outputs   (new arrays)
    backward(output_grads) -> (input grads, parameter grads)   (new arrays; None where not wanted)
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from lotus_rt.graph.ir import Graph
from lotus_rt.graph.lower import Lowering
from lotus_rt.runtime import Runtime, StepPlan, runtime


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
        self.param_ptrs = [a.ctypes.data for a in params]
        self.buffer_ptrs = [a.ctypes.data for a in buffers]
        self.lowering = Lowering(self.rt, graph, self.tiles, list(params), list(buffers), training,
                                 self.input_grads)
        self.with_backward = bool(self.lowering.needs)
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
        return [a.ctypes.data for a in params] == self.param_ptrs and \
            [a.ctypes.data for a in buffers] == self.buffer_ptrs

    def forward(self, inputs: Sequence[np.ndarray], masks: dict[int, np.ndarray] | None = None,
                bn_factors: dict[int, float] | None = None) -> list[np.ndarray]:
        """Run the forward pass on ``inputs`` (whole batches); returns the outputs (new arrays).
        ``masks``: per dropout op (``id(op)``), its whole-batch mask; ``bn_factors``: per batch
        norm op, its running-average factor for this step."""
        lw = self.lowering
        for v, x in zip(self.graph.inputs, inputs):
            for t, (start, stop) in enumerate(self.tiles):
                lw.value_array(v, t).reshape(stop - start, -1)[...] = x[start:stop].reshape(stop - start, -1)
        for key, mask in (masks or {}).items():
            for t, (start, stop) in enumerate(self.tiles):
                lw.masks[key][t][...] = mask[start:stop].reshape(lw.masks[key][t].shape)
        for key, factor in (bn_factors or {}).items():
            lw.bn_factors[key][0] = factor
        self._forward.run()
        self.rt.wait()
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
        self._backward.run()
        try:
            if self.on_backward is not None:
                self.on_backward(self)
        finally:
            self.rt.wait()
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
