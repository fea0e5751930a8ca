"""Fused layer bodies: a whole small layer's forward, or its whole backward, as one codelet body.

A layer program (``lotus_rt.layers``) is: optional pre-contraction ``pre`` of the input,
optional unfold (im2col), main contraction ``main``, optional bias. For a layer too small to be
worth a DAG, ``forward`` runs all of it in one task and ``backward`` recomputes the (cheap)
forward intermediates and produces every wanted gradient in one task.

The gradient of a contraction ``out = einsum(t_0, ..., t_n -> o)`` with respect to operand k is
``einsum(t_0, .., [skip k], .., t_n, o -> t_k)`` applied to the other operands and the output
gradient; an index of t_k found in no other term and not in o was summed privately, so the
gradient is constant along it (computed without it, then broadcast).

Every contraction comes in already planned: the caller (``lotus_rt.layers.fused``) passes a
``program`` holding the plans of the forward's contractions and of each gradient (objects with
``steps``, ``shape(node)`` and ``output_node``, as lotus_rt's planner makes them), and these
bodies run their pairwise steps with the same GEMM-shaped kernels the task DAGs use.

Parameters travel packed in one flat array (and their gradients likewise), so a task needs at
most five buffers whatever the layer: x, params, y (forward); x, params, grad, dx, param grads
(backward). ``program`` carries each parameter's shape in packing order and the convolution
geometry (kernel, stride, padding, dilation) or None; ``key`` (ignored here) names the layer
for StarPU's performance model; ``precision`` is the GPU GEMM policy.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from . import contract as contract_kernels
from . import conv as conv_kernels

Shape = tuple[int, ...]


def run_plan(xp: Any, plan: Any, operands: Sequence[Any], precision: str = "auto") -> Any:
    """The output of a planned einsum on ``operands``, step by step with the pair kernels."""
    dtype = operands[0].dtype
    values = dict(enumerate(operands))
    for step in plan.steps:
        out = xp.empty(plan.shape(step.output), dtype)
        if step.kind == "pair":
            contract_kernels.pair(xp, values[step.inputs[0]], values[step.inputs[1]], out, step.spec, precision)
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


def operand_gradient(xp: Any, gradient: Any, operands: Sequence[Any], k: int, grad_out: Any,
                     precision: str = "auto") -> Any:
    """d(sum(grad_out * einsum(*operands))) / d(operands[k]), with ``gradient`` the planned
    contraction of the other operands and ``grad_out`` (``.plan``), and ``.broadcast`` the
    shape (1 where operand k's index was summed privately) to broadcast it back, or None."""
    ops = [op for j, op in enumerate(operands) if j != k] + [grad_out]
    g = run_plan(xp, gradient.plan, ops, precision)
    if gradient.broadcast is None:
        return g
    return xp.broadcast_to(g.reshape(gradient.broadcast), operands[k].shape)


def _conv_kwargs(geometry: tuple | None) -> dict | None:
    """(kernel, stride, padding, dilation) -> the keyword arguments of conv's unfold/fold."""
    return None if geometry is None else dict(zip(("kernel", "stride", "padding", "dilation"), geometry))


def _unfold(xp: Any, h: Any, conv_kwargs: dict) -> Any:
    cols = xp.empty(conv_kernels.columns_shape(h.shape, **conv_kwargs), h.dtype)
    conv_kernels._unfold(xp, h, cols, **conv_kwargs)
    return cols


def _forward(xp: Any, x: Any, params: list[Any], program: Any, precision: str) -> tuple[Any, Any, Any]:
    """(pre output, main's first operand, main output) of the program."""
    n_pre, n_main = program.n_pre, program.n_main
    conv_kwargs = _conv_kwargs(program.conv)
    h = run_plan(xp, program.pre, [x, *params[:n_pre]], precision) if program.pre is not None else x
    first = _unfold(xp, h, conv_kwargs) if conv_kwargs is not None else h
    return h, first, run_plan(xp, program.main, [first, *params[n_pre:n_pre + n_main]], precision)


def _run_forward(xp: Any, x, packed, y, *, program, precision: str) -> None:
    params = unpack(packed, program.shapes)
    y[...] = _forward(xp, x, params, program, precision)[2]
    if program.bias:
        conv_kernels.bias_add_cpu(params[-1], y, axis=program.bias_axis, span=program.bias_span)  # NumPy or CuPy


def _run_backward(xp: Any, x, packed, grad, dx, dpacked, *, program, needs, precision: str) -> None:
    n_pre, n_main = program.n_pre, program.n_main
    params = unpack(packed, program.shapes)
    grads = unpack(dpacked, program.shapes)
    h, first, _ = _forward(xp, x, params, program, precision)
    main_ops = [first] + params[n_pre:n_pre + n_main]
    for k in range(n_main):
        if needs[1 + n_pre + k]:
            grads[n_pre + k][...] = operand_gradient(xp, program.main_grads[k + 1], main_ops, k + 1, grad, precision)
    if program.bias and needs[-1]:
        conv_kernels.bias_grad_cpu(grad, grads[-1], axis=program.bias_axis, span=program.bias_span)
    if not (needs[0] or any(needs[1:1 + n_pre])):
        return
    g = operand_gradient(xp, program.main_grads[0], main_ops, 0, grad, precision)
    if program.conv is not None:
        folded = xp.empty(h.shape, g.dtype)
        conv_kernels._fold(xp, xp.ascontiguousarray(g), folded, **_conv_kwargs(program.conv))
        g = folded
    if program.pre is None:
        dx[...] = g
        return
    pre_ops = [x] + params[:n_pre]
    for k in range(n_pre):
        if needs[1 + k]:
            grads[k][...] = operand_gradient(xp, program.pre_grads[k + 1], pre_ops, k + 1, g, precision)
    if needs[0]:
        dx[...] = operand_gradient(xp, program.pre_grads[0], pre_ops, 0, g, precision)


def forward_cpu(x, packed, y, *, program, key: str = "", precision: str = "auto") -> None:
    _run_forward(np, x, packed, y, program=program, precision=precision)


def forward_gpu(x, packed, y, *, program, key: str = "", precision: str = "auto") -> None:
    import cupy
    _run_forward(cupy, x, packed, y, program=program, precision=precision)


def backward_cpu(x, packed, grad, dx, dpacked, *, program, needs, key: str = "", precision: str = "auto") -> None:
    _run_backward(np, x, packed, grad, dx, dpacked, program=program, needs=needs, precision=precision)


def backward_gpu(x, packed, grad, dx, dpacked, *, program, needs, key: str = "", precision: str = "auto") -> None:
    import cupy
    _run_backward(cupy, x, packed, grad, dx, dpacked, program=program, needs=needs, precision=precision)
