"""Tensor networks on the runtime: einsum forward and backward as task DAGs.

    >>> import numpy as np
    >>> from lotus_rt import tn
    >>> a, b = np.random.rand(8, 5), np.random.rand(5, 3)
    >>> out, saved = tn.forward("ij,jk->ik", a, b)            # keeps what backward needs
    >>> da, db = tn.backward(saved, np.ones((8, 3)), wrt=(0, 1))
    >>> bool(np.allclose(da, np.ones((8, 3)) @ b.T))
    True

``einsum`` is the forward alone (what ``lotus_rt.einsum`` calls). ``forward`` also returns a
``Saved``: the operands stay registered and every intermediate stays allocated (one forward's
memory) until ``backward`` runs or ``Saved.release()`` is called. Operands are NumPy arrays or
CPU torch tensors (all of one kind); results come back as the same kind. Each call waits for
the tasks it submitted (``runtime().wait()``), so a codelet failure surfaces here.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from lotus_rt.runtime import Handle, Runtime, runtime
from lotus_rt.tn.lower import Forward, submit_backward, submit_forward
from lotus_rt.tn.network import Network
from lotus_rt.tn.plan import Plan, cached_plan

__all__ = ["einsum", "forward", "backward", "plan", "plan_for", "Saved", "Plan", "Network"]


def _to_numpy(operands: Sequence[Any]) -> tuple[list[np.ndarray], bool]:
    """Contiguous NumPy arrays (zero copy where possible) and whether the inputs were torch."""
    torch_inputs = [type(op).__module__.startswith("torch") for op in operands]
    if any(torch_inputs) and not all(torch_inputs):
        raise TypeError("einsum: operands mix torch tensors and other arrays; pass one kind")
    arrays = []
    for k, op in enumerate(operands):
        if torch_inputs[k]:
            if op.device.type != "cpu":
                raise ValueError(f"einsum: operand {k} is on {op.device}; einsum takes CPU tensors "
                                 "(CUDA operands are not implemented yet; StarPU's CUDA workers still "
                                 "run the tasks)")
            op = op.detach().numpy()
        elif not isinstance(op, np.ndarray):
            raise TypeError(f"einsum: operand {k} is a {type(op).__name__}, not a numpy array or torch tensor")
        arrays.append(op if op.flags.c_contiguous else np.ascontiguousarray(op))
    return arrays, bool(torch_inputs) and all(torch_inputs)


def _from_numpy(array: np.ndarray, as_torch: bool) -> Any:
    if as_torch:
        import torch
        return torch.from_numpy(array)
    return array


def plan(equation: str, *operands: Any, optimize: str | None = None, tile: int | None = None,
         rt: Runtime | None = None) -> Plan:
    """The (cached) plan lotus_rt would use for these operands, without running it."""
    arrays, _ = _to_numpy(operands)
    return _plan(equation, arrays, optimize, tile, rt or runtime())


def plan_for(equation: str, shapes: Sequence[tuple[int, ...]], dtype: Any, tile: int | None = None,
             optimize: str | None = None, rt: Runtime | None = None, nworkers: int | None = None) -> Plan:
    """The plan for operands of these shapes (one dtype), for callers that lower it themselves;
    ``nworkers`` overrides the runtime's worker count (1: plan for one task running it all)."""
    rt = rt or runtime()
    return _plan_shapes(equation, [tuple(s) for s in shapes], [np.dtype(dtype)] * len(shapes),
                        optimize, tile, rt, nworkers)


def _plan(equation: str, arrays: list[np.ndarray], optimize: str | None, tile: int | None,
          rt: Runtime) -> Plan:
    return _plan_shapes(equation, [a.shape for a in arrays], [a.dtype for a in arrays], optimize, tile, rt)


def _plan_shapes(equation: str, shapes: list[tuple[int, ...]], dtypes: list[np.dtype],
                 optimize: str | None, tile: int | None, rt: Runtime, nworkers: int | None = None) -> Plan:
    settings = rt.settings
    optimize = settings.optimize if optimize is None else optimize
    tile = settings.tile if tile is None else tile
    nworkers = max(1, len(rt.workers)) if nworkers is None else nworkers
    return cached_plan(equation, shapes, dtypes, optimize, tile, nworkers)


class Saved:
    """A kept forward pass: registered operands and intermediates, for one ``backward``."""

    def __init__(self, rt: Runtime, plan_: Plan, operands: list[Handle], forward_: Forward, as_torch: bool):
        self.runtime, self.plan, self.as_torch = rt, plan_, as_torch
        self._operands, self._forward = operands, forward_

    def release(self) -> None:
        """Free the intermediates and give the operands back (idempotent)."""
        if self._forward is None:
            return
        self._forward.release()
        self._forward = None
        for handle in self._operands:
            handle.unregister()

    def __del__(self):
        if getattr(self, "_forward", None) is not None and not self.runtime.closed:
            try:
                self.release()
            except Exception:  # interpreter shutdown or a closed runtime
                pass


def _register_operands(rt: Runtime, arrays: list[np.ndarray]) -> list[Handle]:
    """One handle per distinct operand: a repeated operand is one handle read twice."""
    by_memory: dict[tuple, Handle] = {}
    handles = []
    for a in arrays:
        key = (a.ctypes.data, a.shape, a.dtype.str)
        if key not in by_memory:
            by_memory[key] = rt.register(a)
        handles.append(by_memory[key])
    return handles


def _distinct(handles: list[Handle]) -> list[Handle]:
    return list({id(h): h for h in handles}.values())


def _run(equation: str, operands: Sequence[Any], optimize, tile, keep: bool) -> tuple[Any, Saved | None]:
    rt = runtime()
    arrays, as_torch = _to_numpy(operands)
    the_plan = _plan(equation, arrays, optimize, tile, rt)
    out = np.empty(the_plan.shape(the_plan.output_node), the_plan.network.dtype)
    handles = _register_operands(rt, arrays)
    out_handles: list[Handle] = []
    kept = None
    try:
        out_handles, kept = submit_forward(rt, the_plan, handles, out, keep=keep)
        rt.wait()
    except BaseException:
        if kept is not None:
            kept.release()
        kept = None
        raise
    finally:
        for h in out_handles:
            h.unregister()
        if kept is None:
            for h in _distinct(handles):
                h.unregister()
    saved = Saved(rt, the_plan, _distinct(handles), kept, as_torch) if kept is not None else None
    return _from_numpy(out, as_torch), saved


def einsum(equation: str, *operands: Any, optimize: str | None = None, tile: int | None = None) -> Any:
    """Evaluate ``equation`` as a StarPU task DAG (see ``lotus_rt.einsum``)."""
    out, _ = _run(equation, operands, optimize, tile, keep=False)
    return out


def forward(equation: str, *operands: Any, optimize: str | None = None,
            tile: int | None = None) -> tuple[Any, "Saved"]:
    """Like ``einsum``, but also returns what ``backward`` needs (see the module docstring)."""
    return _run(equation, operands, optimize, tile, keep=True)


def backward(saved: Saved, grad_out: Any, wrt: Sequence[int] = (), release: bool = True) -> list[Any]:
    """Gradients of the forward's output w.r.t. the operands in ``wrt``, given ``grad_out``.

    Runs as tasks on the runtime, then releases ``saved`` unless ``release=False`` (for a
    caller that may run backward again, like autograd with retain_graph; ``saved`` is then
    released by ``Saved.release()`` or when it is garbage-collected).
    """
    if saved._forward is None:
        raise RuntimeError("backward: this forward pass was already released (backward runs once "
                           "unless called with release=False)")
    the_plan, rt = saved.plan, saved.runtime
    ninputs = len(the_plan.network.inputs)
    wrt = list(dict.fromkeys(int(k) for k in wrt))
    bad = [k for k in wrt if not 0 <= k < ninputs]
    if bad:
        raise ValueError(f"backward: wrt has operand index {bad[0]}; the equation has {ninputs} operand(s)")
    (grad,), as_torch = _to_numpy([grad_out])
    expected = the_plan.shape(the_plan.output_node)
    if grad.shape != expected or grad.dtype != the_plan.network.dtype:
        raise ValueError(f"backward: grad_out has shape {grad.shape} and dtype {grad.dtype}; "
                         f"expected {expected} and {the_plan.network.dtype}")
    grads = {k: np.empty(the_plan.shape(k), the_plan.network.dtype) for k in wrt}
    grad_handle = rt.register(grad)
    grad_handles = {k: rt.register(g) for k, g in grads.items()}
    try:
        submit_backward(rt, saved._forward, grad_handle, wrt, grad_handles)
        rt.wait()
    finally:
        grad_handle.unregister()
        for h in grad_handles.values():
            h.unregister()
        if release:
            saved.release()
    return [_from_numpy(grads[k], saved.as_torch) for k in wrt]
