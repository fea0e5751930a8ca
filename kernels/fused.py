"""Fused layer bodies: a whole small layer's forward, or its whole backward, as one codelet body.

A layer program (see ``lotus_rt.nn.functional``) is: optional pre-contraction ``pre`` of the
input, optional unfold (im2col), main contraction ``main``, optional bias. For a layer too
small to be worth a DAG, ``forward`` runs all of it in one task and ``backward`` recomputes the
(cheap) forward intermediates and produces every wanted gradient in one task.

The gradient of a contraction ``out = einsum(t_0, ..., t_n -> o)`` with respect to operand k is
``einsum(t_0, .., [skip k], .., t_n, o -> t_k)`` applied to the other operands and the output
gradient; an index of t_k found in no other term and not in o was summed privately, so the
gradient is constant along it (computed without it, then broadcast). Terms must not repeat an
index. Contractions run step by step through lotus_rt's plans (cached per equation and shapes)
with the same GEMM-shaped pair kernels the task DAGs use.

Parameters travel packed in one flat array (and their gradients likewise), so a task needs at
most five buffers whatever the layer: x, params, y (forward); x, params, grad, dx, param grads
(backward). ``shapes`` gives each parameter's shape in packing order, ``conv`` the convolution
geometry (kernel, stride, padding, dilation) or None; every argument is a hashable scalar or
tuple, so StarPU's performance model tells layers apart.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import numpy as np

from lotus_rt.kernels import contract as contract_kernels
from lotus_rt.kernels import conv as conv_kernels

Shape = tuple[int, ...]


@functools.lru_cache(maxsize=512)
def _plan(equation: str, shapes: tuple[Shape, ...], dtype: str) -> Any:
    # lotus_rt's planner (opt_einsum's path, every pairwise step laid out as a batched GEMM);
    # imported here because the planner sits above the kernels in the package
    from lotus_rt.tn.network import parse
    from lotus_rt.tn.plan import build_plan
    net = parse(equation, shapes, [np.dtype(dtype)] * len(shapes))
    return build_plan(net, "auto", max(net.sizes.values(), default=1), 1)  # one tile: untiled


def contract(xp: Any, equation: str, *operands: Any) -> Any:
    """``einsum(equation, *operands)``, step by step with the contraction kernels' GEMMs."""
    plan = _plan(equation, tuple(tuple(op.shape) for op in operands), operands[0].dtype.str)
    values = dict(enumerate(operands))
    for step in plan.steps:
        out = xp.empty(plan.shape(step.output), operands[0].dtype)
        if step.kind == "pair":
            contract_kernels.pair(xp, values[step.inputs[0]], values[step.inputs[1]], out, step.spec)
        else:
            contract_kernels.unary(xp, values[step.inputs[0]], out, step.spec)
        values[step.output] = out
    return values[plan.output_node]


def unpack(flat: Any, shapes: Sequence[Shape]) -> list[Any]:
    """Views of ``flat`` cut into consecutive arrays of ``shapes``."""
    views, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(flat[start:start + size].reshape(shape))
        start += size
    return views


def operand_gradient(xp: Any, equation: str, operands: Sequence[Any], k: int, grad_out: Any) -> Any:
    """d(sum(grad_out * einsum(equation, *operands))) / d(operands[k])."""
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    term = terms[k]
    if len(set(term)) != len(term):
        raise NotImplementedError(f"fused gradient through a repeated index ({term!r} in {equation!r})")
    others = [t for j, t in enumerate(terms) if j != k] + [out]
    seen = set("".join(others))
    kept = "".join(i for i in term if i in seen)
    ops = [op for j, op in enumerate(operands) if j != k] + [grad_out]
    g = contract(xp, ",".join(others) + "->" + kept, *ops)
    if kept == term:
        return g
    shape = [operands[k].shape[p] if i in seen else 1 for p, i in enumerate(term)]
    return xp.broadcast_to(g.reshape(shape), operands[k].shape)


def _conv_kwargs(geometry: tuple | None) -> dict | None:
    """(kernel, stride, padding, dilation) -> the keyword arguments of conv's unfold/fold."""
    return None if geometry is None else dict(zip(("kernel", "stride", "padding", "dilation"), geometry))


def _unfold(xp: Any, h: Any, conv_kwargs: dict) -> Any:
    cols = xp.empty(conv_kernels.columns_shape(h.shape, **conv_kwargs), h.dtype)
    conv_kernels._unfold(xp, h, cols, **conv_kwargs)
    return cols


def _forward(xp: Any, x: Any, params: list[Any], pre: str | None, n_pre: int, main: str, n_main: int,
             conv_kwargs: dict | None) -> tuple[Any, Any, Any]:
    """(pre output, main's first operand, main output) of the program."""
    h = contract(xp, pre, x, *params[:n_pre]) if pre is not None else x
    first = _unfold(xp, h, conv_kwargs) if conv_kwargs is not None else h
    return h, first, contract(xp, main, first, *params[n_pre:n_pre + n_main])


def _run_forward(xp: Any, x, packed, y, *, shapes, pre, n_pre, main, n_main, conv, bias_axis, bias_span):
    conv_kwargs = _conv_kwargs(conv)
    params = unpack(packed, shapes)
    y[...] = _forward(xp, x, params, pre, n_pre, main, n_main, conv_kwargs)[2]
    if len(params) > n_pre + n_main:
        conv_kernels.bias_add_cpu(params[-1], y, axis=bias_axis, span=bias_span)  # NumPy or CuPy alike


def _run_backward(xp: Any, x, packed, grad, dx, dpacked, *, shapes, needs, pre, n_pre, main, n_main,
                  conv, bias_axis, bias_span):
    conv_kwargs = _conv_kwargs(conv)
    params = unpack(packed, shapes)
    grads = unpack(dpacked, shapes)
    h, first, _ = _forward(xp, x, params, pre, n_pre, main, n_main, conv_kwargs)
    main_ops = [first] + params[n_pre:n_pre + n_main]
    for k in range(n_main):
        if needs[1 + n_pre + k]:
            grads[n_pre + k][...] = operand_gradient(xp, main, main_ops, k + 1, grad)
    if len(params) > n_pre + n_main and needs[-1]:
        conv_kernels.bias_grad_cpu(grad, grads[-1], axis=bias_axis, span=bias_span)  # NumPy or CuPy alike
    if not (needs[0] or any(needs[1:1 + n_pre])):
        return
    g = operand_gradient(xp, main, main_ops, 0, grad)
    if conv_kwargs is not None:
        folded = xp.empty(h.shape, g.dtype)
        conv_kernels._fold(xp, xp.ascontiguousarray(g), folded, **conv_kwargs)
        g = folded
    if pre is None:
        dx[...] = g
        return
    pre_ops = [x] + params[:n_pre]
    for k in range(n_pre):
        if needs[1 + k]:
            grads[k][...] = operand_gradient(xp, pre, pre_ops, k + 1, g)
    if needs[0]:
        dx[...] = operand_gradient(xp, pre, pre_ops, 0, g)


def forward_cpu(x, packed, y, **kwargs) -> None:
    _run_forward(np, x, packed, y, **kwargs)


def forward_gpu(x, packed, y, **kwargs) -> None:
    import cupy
    _run_forward(cupy, x, packed, y, **kwargs)


def backward_cpu(x, packed, grad, dx, dpacked, **kwargs) -> None:
    _run_backward(np, x, packed, grad, dx, dpacked, **kwargs)


def backward_gpu(x, packed, grad, dx, dpacked, **kwargs) -> None:
    import cupy
    _run_backward(cupy, x, packed, grad, dx, dpacked, **kwargs)
