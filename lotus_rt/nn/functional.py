"""Layer math as task DAGs: every supported layer is one ``Program`` run on the runtime.

A Program is: an optional 1x1 pre-contraction of the input (``pre``, an einsum), an optional
unfold (im2col) for a convolution, the main contraction (``main``, an einsum whose first
operand is the input or its unfolded columns), and an optional bias add. Parameters are
passed in order: the ``pre`` ones, then the ``main`` ones, then the bias.

    Tucker-2 conv: pre "nchw,cr->nrhw", unfold, main "nrijpq,srij,os->nopq"
    CP conv:       pre "nchw,cr->nrhw", unfold, main "nrijpq,ir,jr,or->nopq"
    TT linear:     main "zabc,xaiy,yblw,wcmv->zilm" (input reshaped to (batch, *in_shape))

``forward`` runs the pieces as tasks (contractions through ``lotus_rt.tn``, the unfold and the
bias add as codelets) and, when gradients are wanted, keeps what ``backward`` needs: the
``tn.Saved`` of each contraction (its operands and intermediates) and the shapes. ``backward``
runs the reverse: the main contraction's backward, a fold (col2im) for the input columns, the
pre-contraction's backward, and a bias reduction, each as tasks. It may run more than once
(autograd's retain_graph); the kept state is freed when the State is garbage-collected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from lotus_rt import tn
from lotus_rt.kernels import conv as conv_kernels
from lotus_rt.runtime import runtime
from lotus_rt.runtime.core import Codelet

UNFOLD = Codelet("conv_unfold", cpu=conv_kernels.unfold_cpu, cuda=conv_kernels.unfold_gpu)
FOLD = Codelet("conv_fold", cpu=conv_kernels.fold_cpu, cuda=conv_kernels.fold_gpu)
BIAS_ADD = Codelet("bias_add", cpu=conv_kernels.bias_add_cpu, cuda=conv_kernels.bias_add_gpu)
BIAS_GRAD = Codelet("bias_grad", cpu=conv_kernels.bias_grad_cpu, cuda=conv_kernels.bias_grad_gpu)


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
class State:
    """What a forward keeps for its backward."""

    saved_pre: tn.Saved | None
    saved_main: tn.Saved | None
    pre_shape: tuple[int, ...] | None  # the input of the unfold (for fold)


def _run_codelet(codelet: Codelet, *accesses: tuple[np.ndarray, str], **kwargs: Any) -> None:
    rt = runtime()
    handles = [(rt.register(a), mode) for a, mode in accesses]
    try:
        rt.submit(codelet, *handles, **kwargs)
        rt.wait()
    finally:
        for h, _ in handles:
            h.unregister()


def unfold(x: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """im2col as one task: (n, c, h, w) -> (n, c, kh, kw, ho, wo)."""
    n, c, h, w = x.shape
    ho, wo = geometry.output_hw(h, w)
    cols = np.empty((n, c) + geometry.kernel + (ho, wo), x.dtype)
    _run_codelet(UNFOLD, (x, "R"), (cols, "W"), **geometry.kwargs())
    return cols


def fold(cols: np.ndarray, shape: tuple[int, ...], geometry: ConvGeometry) -> np.ndarray:
    """col2im (the adjoint of ``unfold``) as one task."""
    x = np.empty(shape, cols.dtype)
    _run_codelet(FOLD, (cols, "R"), (x, "W"), **geometry.kwargs())
    return x


def forward(program: Program, x: np.ndarray, params: Sequence[np.ndarray], keep: bool) -> tuple[np.ndarray, State | None]:
    """Run the program on ``x``; with ``keep``, also return the State ``backward`` needs."""
    run = tn.forward if keep else (lambda eq, *ops: (tn.einsum(eq, *ops), None))
    pre_params = params[:program.n_pre]
    main_params = params[program.n_pre:program.n_pre + program.n_main]
    saved_pre = pre_shape = None
    if program.pre is not None:
        x, saved_pre = run(program.pre, x, *pre_params)
    if program.conv is not None:
        pre_shape = x.shape
        x = unfold(x, program.conv)
    y, saved_main = run(program.main, x, *main_params)
    if program.bias:
        _run_codelet(BIAS_ADD, (params[-1], "R"), (y, "RW"), axis=program.bias_axis, span=program.bias_span)
    return y, (State(saved_pre, saved_main, pre_shape) if keep else None)


def backward(program: Program, state: State, grad: np.ndarray, needs: Sequence[bool]) -> list[np.ndarray | None]:
    """Gradients for (x, *params) where ``needs`` is True (None elsewhere), as tasks."""
    n_params = program.n_pre + program.n_main + int(program.bias)
    needs = list(needs) + [False] * (1 + n_params - len(needs))
    grads: list[np.ndarray | None] = [None] * (1 + n_params)
    pre_wanted = program.pre is not None and (needs[0] or any(needs[1:1 + program.n_pre]))
    input_wanted = needs[0] or pre_wanted
    wrt = ([0] if input_wanted else []) + [k + 1 for k in range(program.n_main)
                                           if needs[1 + program.n_pre + k]]
    main_grads = dict(zip(wrt, tn.backward(state.saved_main, grad, wrt, release=False)))
    for k in range(program.n_main):
        grads[1 + program.n_pre + k] = main_grads.get(k + 1)
    if program.bias and needs[-1]:
        span = grad.shape[program.bias_axis:program.bias_axis + program.bias_span]
        bias_grad = np.empty(int(np.prod(span)), grad.dtype)
        _run_codelet(BIAS_GRAD, (grad, "R"), (bias_grad, "W"), axis=program.bias_axis, span=program.bias_span)
        grads[-1] = bias_grad
    if not input_wanted:
        return grads
    grad_in = main_grads[0]
    if program.conv is not None:
        grad_in = fold(grad_in, state.pre_shape, program.conv)
    if program.pre is None:
        grads[0] = grad_in
        return grads
    wrt_pre = ([0] if needs[0] else []) + [k + 1 for k in range(program.n_pre) if needs[1 + k]]
    pre_grads = dict(zip(wrt_pre, tn.backward(state.saved_pre, grad_in, wrt_pre, release=False)))
    grads[0] = pre_grads.get(0)
    for k in range(program.n_pre):
        grads[1 + k] = pre_grads.get(k + 1)
    return grads
