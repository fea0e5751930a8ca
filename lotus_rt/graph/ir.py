"""The whole-model graph as data: values, parameters, state buffers and the ops between them.

A ``Graph`` is what one pass of a captured model computes, without torch: ``lotus_rt.nn``
builds it from a torch.fx trace, ``lotus_rt.graph.program`` lowers it to tasks. Every value is
a batched activation (its first axis is the batch, cut into tiles); parameters and state buffers
(batch norm's running statistics) are whole arrays shared by every tile.

Op kinds and their attributes (``attrs``):

- ``conv``: stride, padding, dilation, groups, bias (bool), relu (a fused ReLU epilogue), w_view
  (None, or (perm, shape): the kernel is ``param.permute(perm).reshape(shape)``, as for the
  factors of Tucker-2 and CP convolutions); params (weight[, bias]).
- ``linear``: bias, relu; params (weight (out, in)[, bias]).
- ``contract``: a tensor-network layer (TT linear): equation (its first operand the input, in
  ``in_shape`` per sample), out_shape, bias, relu; params (the cores[, bias]).
- ``relu``, ``gelu`` (approximate), ``dropout`` (p; the mask is drawn by torch at each step).
- ``maxpool`` (kernel, stride, padding, dilation, ceil_mode), ``avgpool`` (kernel, stride, padding,
  ceil_mode, count_include_pad, divisor_override).
- ``batchnorm``: eps, affine, batch_stats (normalise with the batch's statistics, else with the
  running ones), update (update the running statistics), relu; params (weight, bias) when affine;
  buffers (running_mean, running_var) when it keeps running statistics.
- ``add`` (relu), ``cat`` (dim), ``reshape`` (the same data seen in another shape).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KINDS = ("conv", "linear", "contract", "relu", "gelu", "dropout", "maxpool", "avgpool", "batchnorm", "add",
         "cat", "reshape")


@dataclass
class Value:
    """A batched activation: ``shape[0]`` is the batch."""

    id: int
    shape: tuple[int, ...]
    dtype: np.dtype
    name: str = ""

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def sample_size(self) -> int:
        return math.prod(self.shape[1:])


@dataclass
class Param:
    id: int
    shape: tuple[int, ...]
    dtype: np.dtype
    requires_grad: bool
    name: str = ""


@dataclass
class Buffer:
    """Module state the graph updates in place (running statistics)."""

    id: int
    shape: tuple[int, ...]
    dtype: np.dtype
    name: str = ""


@dataclass
class Op:
    kind: str
    inputs: tuple[int, ...]
    output: int
    params: tuple[int, ...] = ()
    buffers: tuple[int, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"graph op kind {self.kind!r} is not known; kinds: {', '.join(KINDS)}")


@dataclass
class Graph:
    values: list[Value] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    buffers: list[Buffer] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def value(self, shape: tuple[int, ...], dtype: Any, name: str = "") -> int:
        self.values.append(Value(len(self.values), tuple(int(d) for d in shape), np.dtype(dtype), name))
        return len(self.values) - 1

    def param(self, shape: tuple[int, ...], dtype: Any, requires_grad: bool, name: str = "") -> int:
        self.params.append(Param(len(self.params), tuple(int(d) for d in shape), np.dtype(dtype), requires_grad, name))
        return len(self.params) - 1

    def buffer(self, shape: tuple[int, ...], dtype: Any, name: str = "") -> int:
        self.buffers.append(Buffer(len(self.buffers), tuple(int(d) for d in shape), np.dtype(dtype), name))
        return len(self.buffers) - 1

    def add(self, kind: str, inputs: tuple[int, ...] | list[int], shape: tuple[int, ...], *, params=(), buffers=(),
            name: str = "", dtype: Any = None, **attrs: Any) -> int:
        """Append an op producing a new value of ``shape``; returns the value's id."""
        dtype = self.values[inputs[0]].dtype if dtype is None else dtype
        out = self.value(shape, dtype, name)
        self.ops.append(Op(kind, tuple(inputs), out, tuple(params), tuple(buffers), dict(attrs), name))
        return out

    def consumers(self) -> dict[int, list[Op]]:
        found: dict[int, list[Op]] = {v.id: [] for v in self.values}
        for op in self.ops:
            for v in op.inputs:
                found[v].append(op)
        return found

    def producer(self) -> dict[int, Op]:
        return {op.output: op for op in self.ops}
