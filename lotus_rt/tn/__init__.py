"""Tensor networks on the runtime: einsum forward and backward as task DAGs.

    >>> import numpy as np
    >>> from lotus_rt import tn
    >>> a, b = np.random.rand(8, 5), np.random.rand(5, 3)
    >>> out, saved = tn.forward("ij,jk->ik", a, b)            # keeps what backward needs
    >>> da, db = tn.backward(saved, np.ones((8, 3)), wrt=(0, 1))
    >>> bool(np.allclose(da, np.ones((8, 3)) @ b.T))
    True
    >>> expr = tn.contract_expression("ij,jk", (8, 5), (5, 3))  # one plan, reused by every call
    >>> bool(np.allclose(expr(a, b), a @ b))
    True

``einsum`` is the forward alone (what ``lotus_rt.einsum`` calls). It takes numpy.einsum's whole
grammar (``tn/grammar.py``: implicit output, ``...``, size-1 broadcasting, scalars, any letters,
the interleaved sublist form) and opt_einsum's ``optimize=`` forms (``tn/plan.py``); every
error detectable from the equation, shapes and dtypes is raised before any task is submitted.
``forward`` also returns a ``Saved``: the operands stay registered and every intermediate stays
allocated (one forward's memory) until ``backward`` runs or ``Saved.release()`` is called.
Operands are NumPy arrays, CPU torch tensors (not both kinds in one call), Python numbers or
lists; the result is a torch tensor when any operand is one, else a NumPy array, in numpy's
result dtype. Each call waits for the tasks it submitted (``runtime().wait()``), so a codelet
failure surfaces here.
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np

from lotus_rt.runtime import Handle, Runtime, runtime
from lotus_rt.tn import grammar
from lotus_rt.tn.grammar import Canonical
from lotus_rt.tn.lower import Forward, submit_backward, submit_forward
from lotus_rt.tn.network import Network
from lotus_rt.tn.plan import Plan, Prepared, cached_plan, cached_prepared, optimizer_key

__all__ = ["einsum", "forward", "backward", "plan", "plan_for", "contract_expression", "ContractExpression",
           "Saved", "Plan", "Network", "Canonical"]


def _is_torch(op: Any) -> bool:
    return type(op).__module__.startswith("torch")


def _torch_to_numpy(op: Any, k: int) -> np.ndarray:
    if op.device.type != "cpu":
        raise ValueError(f"einsum: operand {k} is on {op.device}; einsum takes CPU tensors "
                         "(CUDA operands are not implemented yet; StarPU's CUDA workers still "
                         "run the tasks)")
    try:
        return op.detach().numpy()
    except TypeError as exc:  # bfloat16 and other dtypes NumPy has no twin of
        raise TypeError(f"einsum: operand {k} is a torch tensor of dtype {op.dtype}, which has no NumPy "
                        f"dtype ({exc}); convert it, e.g. .float()") from None


def _to_numpy(operands: Sequence[Any], strict: bool = False) -> tuple[list[np.ndarray], bool]:
    """NumPy arrays (zero copy where possible) and whether the result goes back as torch.

    Torch tensors and other arrays do not mix; Python/NumPy numbers go with either. ``strict``
    (backward's grad_out): only arrays and tensors, made C-contiguous here.
    """
    torch_inputs = [_is_torch(op) for op in operands]
    if any(torch_inputs):
        others = [k for k, (op, t) in enumerate(zip(operands, torch_inputs))
                  if not t and not isinstance(op, (numbers.Number, np.generic))]
        if others:
            raise TypeError(f"einsum: operands mix torch tensors and other arrays (operand {others[0]} is a "
                            f"{type(operands[others[0]]).__name__}); pass one kind")
    arrays = []
    for k, op in enumerate(operands):
        if torch_inputs[k]:
            arrays.append(_torch_to_numpy(op, k))
        elif strict:
            if not isinstance(op, np.ndarray):
                raise TypeError(f"einsum: operand {k} is a {type(op).__name__}, not a numpy array or torch tensor")
            arrays.append(op if op.flags.c_contiguous else np.ascontiguousarray(op))
        else:
            arrays.append(grammar.as_array(op, k))
    return arrays, any(torch_inputs)


def _from_numpy(array: np.ndarray, as_torch: bool) -> Any:
    if as_torch:
        import torch
        return torch.from_numpy(array)
    return array


def _prepare(equation: Any, operands: Sequence[Any], optimize: Any, tile: int | None,
             rt: Runtime) -> tuple[Prepared, list[np.ndarray], bool]:
    """The cached canonical form and plan of one call, its operands as arrays, torch or not."""
    eq, ops = grammar.split_call(equation, operands)
    arrays, as_torch = _to_numpy(ops)
    settings = rt.settings
    key = optimizer_key(settings.optimize if optimize is None else optimize)
    tile = settings.tile if tile is None else tile
    prepared = cached_prepared(eq, [a.shape for a in arrays], [a.dtype for a in arrays], key, tile,
                               max(1, len(rt.workers)))
    return prepared, arrays, as_torch


def plan(equation: Any, *operands: Any, optimize: Any = None, tile: int | None = None,
         rt: Runtime | None = None) -> Plan | None:
    """The (cached) plan lotus_rt would use for these operands, without running it: the plan of
    the canonical equation (``tn/grammar.py``); None when an index has size 0 (nothing runs)."""
    return _prepare(equation, operands, optimize, tile, rt or runtime())[0].plan


def plan_for(equation: str, shapes: Sequence[tuple[int, ...]], dtype: Any, tile: int | None = None,
             optimize: Any = None, rt: Runtime | None = None, nworkers: int | None = None) -> Plan:
    """The plan of a canonical equation (explicit output, letters only, matching sizes) for
    operands of these shapes (one float dtype), for callers that lower it themselves;
    ``nworkers`` overrides the runtime's worker count (1: plan for one task running it all)."""
    rt = rt or runtime()
    return _plan_shapes(equation, [tuple(s) for s in shapes], [np.dtype(dtype)] * len(shapes),
                        optimize, tile, rt, nworkers)


def _plan_shapes(equation: str, shapes: list[tuple[int, ...]], dtypes: list[np.dtype],
                 optimize: Any, tile: int | None, rt: Runtime, nworkers: int | None = None) -> Plan:
    settings = rt.settings
    optimize = optimizer_key(settings.optimize if optimize is None else optimize)
    tile = settings.tile if tile is None else tile
    nworkers = max(1, len(rt.workers)) if nworkers is None else nworkers
    return cached_plan(equation, shapes, dtypes, optimize, tile, nworkers)


class Saved:
    """A kept forward pass: registered operands and intermediates, for one ``backward``."""

    def __init__(self, rt: Runtime, prepared: Prepared, operands: list[Handle], forward_: Forward | None,
                 as_torch: bool, arrays: list[np.ndarray]):
        self.runtime, self.prepared, self.as_torch = rt, prepared, as_torch
        self.plan: Plan | None = prepared.plan
        self._operands, self._forward, self._arrays = operands, forward_, arrays
        self._live = True

    def release(self) -> None:
        """Free the intermediates and give the operands back (idempotent)."""
        if not self._live:
            return
        self._live = False
        if self._forward is not None:
            self._forward.release()
            self._forward = None
        for handle in self._operands:
            handle.unregister()
        self._arrays = []

    def __del__(self):
        if getattr(self, "_live", False) and not self.runtime.closed:
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


def _run(equation: Any, operands: Sequence[Any], optimize: Any, tile: int | None,
         keep: bool) -> tuple[Any, Saved | None]:
    rt = runtime()
    prepared, arrays, as_torch = _prepare(equation, operands, optimize, tile, rt)
    return _execute(rt, prepared, arrays, as_torch, keep)


def _execute(rt: Runtime, prepared: Prepared, arrays: list[np.ndarray], as_torch: bool,
             keep: bool) -> tuple[Any, Saved | None]:
    canon, the_plan = prepared.canonical, prepared.plan
    engine_arrays = grammar.prepare_operands(canon, arrays)  # the last check before any task
    if the_plan is None:  # an index of size 0: a sum over nothing, or an empty result
        out = np.zeros(canon.out_shape, canon.result_dtype)
        saved = Saved(rt, prepared, [], None, as_torch, []) if keep else None
        return _from_numpy(out, as_torch), saved
    out = np.empty(the_plan.shape(the_plan.output_node), the_plan.network.dtype)
    handles = _register_operands(rt, engine_arrays)
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
    saved = Saved(rt, prepared, _distinct(handles), kept, as_torch, engine_arrays) if kept is not None else None
    return _from_numpy(grammar.finish_result(canon, out), as_torch), saved


def einsum(equation: Any, *operands: Any, optimize: Any = None, tile: int | None = None) -> Any:
    """Evaluate an einsum as a StarPU task DAG (see ``lotus_rt.einsum``)."""
    out, _ = _run(equation, operands, optimize, tile, keep=False)
    return out


def forward(equation: Any, *operands: Any, optimize: Any = None, tile: int | None = None) -> tuple[Any, Saved]:
    """Like ``einsum``, but also returns what ``backward`` needs (see the module docstring)."""
    return _run(equation, operands, optimize, tile, keep=True)


def backward(saved: Saved, grad_out: Any, wrt: Sequence[int] = (), release: bool = True) -> list[Any]:
    """Gradients of the forward's output w.r.t. the operands in ``wrt``, given ``grad_out``.

    ``grad_out`` has the output's shape and dtype (float32 or float64); each gradient has its
    operand's shape and dtype (a size-1 broadcast axis gets the sum along it, a float32 operand
    of a float64 einsum a float32 gradient); integer and bool operands have none (TypeError).
    Runs as tasks on the runtime, then releases ``saved`` unless ``release=False`` (for a
    caller that may run backward again, like autograd with retain_graph; ``saved`` is then
    released by ``Saved.release()`` or when it is garbage-collected).
    """
    if not saved._live:
        raise RuntimeError("backward: this forward pass was already released (backward runs once "
                           "unless called with release=False)")
    canon, the_plan, rt = saved.prepared.canonical, saved.plan, saved.runtime
    ninputs = len(canon.shapes)
    wrt = list(dict.fromkeys(int(k) for k in wrt))
    bad = [k for k in wrt if not 0 <= k < ninputs]
    if bad:
        raise ValueError(f"backward: wrt has operand index {bad[0]}; the equation has {ninputs} operand(s)")
    no_grad = [k for k in wrt if canon.dtypes[k].kind != "f"]
    if no_grad:
        raise TypeError(f"backward: operand {no_grad[0]} is {canon.dtypes[no_grad[0]]}: gradients exist for "
                        "float operands only")
    if canon.result_dtype.name not in ("float32", "float64"):
        raise TypeError(f"backward: the forward's result is {canon.result_dtype}; backward runs on float32 "
                        "and float64 results")
    (grad,), _ = _to_numpy([grad_out], strict=True)
    if grad.shape != canon.out_shape or grad.dtype != canon.result_dtype:
        raise ValueError(f"backward: grad_out has shape {grad.shape} and dtype {grad.dtype}; "
                         f"expected {canon.out_shape} and {canon.result_dtype}")
    if the_plan is None:  # an empty forward: every gradient is zero
        if release:
            saved.release()
        return [_from_numpy(np.zeros(canon.in_shapes[k], canon.dtypes[k]), saved.as_torch) for k in wrt]
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
    return [_from_numpy(grads[k].reshape(canon.in_shapes[k]).astype(canon.dtypes[k], copy=False), saved.as_torch)
            for k in wrt]


class ContractExpression:
    """A reusable einsum for operands of fixed shapes, like ``opt_einsum.contract_expression``.

    Built by ``contract_expression(equation, *shapes)``: the equation is checked against the
    shapes (and planned for float64 operands) at once; every call ``expr(*operands)`` checks
    the operands' shapes, then finds its plan in the one plan cache (a hit in
    ``lotus_rt.stats().caches["plans"]`` from the first float64 call on; another dtype adds one
    plan on its first call).
    """

    def __init__(self, equation: Any, shapes: Sequence[Sequence[int]], optimize: Any = None,
                 tile: int | None = None):
        if not isinstance(equation, str):
            raise TypeError(f"contract_expression: the equation must be a string, got {type(equation).__name__}")
        checked = []
        for k, shape in enumerate(shapes):
            if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list)) or not all(
                    isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise TypeError(f"contract_expression: shape {k} is {shape!r}; shapes are tuples of "
                                "non-negative ints (() for a scalar)")
            checked.append(tuple(int(d) for d in shape))
        self.equation, self.shapes, self.optimize, self.tile = equation, tuple(checked), optimize, tile
        # check the equation against the shapes and plan it now, for float64 operands
        _prepare(equation, [np.empty(s) for s in self.shapes], optimize, tile, runtime())

    def __call__(self, *operands: Any) -> Any:
        """The einsum of ``operands`` (shapes as given at construction; any dtype einsum takes)."""
        if len(operands) != len(self.shapes):
            raise ValueError(f"contract_expression: {self.equation!r} takes {len(self.shapes)} operand(s), "
                             f"got {len(operands)}")
        arrays, as_torch = _to_numpy(operands)
        for k, (a, shape) in enumerate(zip(arrays, self.shapes)):
            if a.shape != shape:
                raise ValueError(f"contract_expression: operand {k} has shape {a.shape}; this expression was "
                                 f"built for {shape}")
        rt = runtime()
        prepared, _, _ = _prepare(self.equation, arrays, self.optimize, self.tile, rt)
        out, _ = _execute(rt, prepared, arrays, as_torch, keep=False)
        return out

    def __repr__(self) -> str:
        return f"ContractExpression({self.equation!r}, {', '.join(map(str, self.shapes))})"


def contract_expression(equation: Any, *shapes: Sequence[int], optimize: Any = None,
                        tile: int | None = None) -> ContractExpression:
    """A reusable einsum for operands of these shapes (see ``ContractExpression``)."""
    return ContractExpression(equation, shapes, optimize=optimize, tile=tile)
