"""A layer as a program of contractions: what the per-layer passes (DAG or fused) execute.

A ``Program`` is: an optional 1x1 pre-contraction of the input (``pre``, an einsum), an optional
unfold (im2col) for a convolution, the main contraction (``main``, an einsum whose first operand
is the input or its unfolded columns), and an optional bias add. Parameters are passed in
order: the ``pre`` ones, then the ``main`` ones, then the bias.

    Tucker-2 conv: pre "nchw,cr->nrhw", unfold, main "rijnpq,srij,os->nopq"
    CP conv:       pre "nchw,cr->nrhw", unfold, main "rijnpq,ir,jr,or->nopq"
    TT linear:     main "zabc,xaiy,yblw,wcmv->zilm" (input reshaped to (batch, *in_shape))
    dense conv:    unfold, main "cijnpq,ocij->nopq";  dense linear: main "bi,oi->bo"
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lotus_rt.kernels import conv as conv_kernels
from lotus_rt.runtime import Runtime
from lotus_rt.tn import plan_for
from lotus_rt.tn.plan import Plan


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

    def as_tuple(self) -> tuple[tuple[int, int], ...]:
        return (self.kernel, self.stride, self.padding, self.dilation)


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

    @property
    def n_params(self) -> int:
        return self.n_pre + self.n_main + int(self.bias)


def unfolded_shape(shape: tuple[int, ...], geometry: ConvGeometry) -> tuple[int, ...]:
    """The shape of ``unfold``'s columns for an (n, c, h, w) input: (c, kh, kw, n, ho, wo)."""
    geometry.output_hw(shape[2], shape[3])  # a clear error when the input is too small
    return conv_kernels.columns_shape(shape, **geometry.kwargs())


def check_parameter_count(program: Program, params: Sequence[object]) -> None:
    if len(params) != program.n_params:
        raise ValueError(f"layer program takes {program.n_params} parameter(s), got {len(params)}")


def program_plans(program: Program, x_shape: tuple[int, ...], param_shapes: Sequence[tuple[int, ...]],
                  dtype: np.dtype, rt: Runtime, nworkers: int | None = None) -> tuple[Plan | None, Plan]:
    """The untiled (pre, main) plans of the program for an input of ``x_shape`` (pre is None
    when the program has none); validates every shape."""
    n = x_shape[0]
    shape = tuple(x_shape)
    pre = None
    if program.pre is not None:
        pre = plan_for(program.pre, [shape] + list(param_shapes[:program.n_pre]), dtype, tile=n, rt=rt,
                       nworkers=nworkers)
        shape = pre.shape(pre.output_node)
    if program.conv is not None:
        shape = unfolded_shape(shape, program.conv)
    main_params = list(param_shapes[program.n_pre:program.n_pre + program.n_main])
    main = plan_for(program.main, [shape] + main_params, dtype, tile=n, rt=rt, nworkers=nworkers)
    return pre, main
