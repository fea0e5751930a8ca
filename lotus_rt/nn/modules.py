"""Tensorized layers (thin nn.Modules) and the offloaded twins of dense Linear/Conv2d.

Each tensorized layer holds its factors as parameters and has two forward paths:
``offloaded=False`` (the default) runs the factorization in torch eager (torch.einsum /
F.conv2d pieces: the reference, and the baseline of the benchmarks); ``offloaded=True``
(set by ``lotus_rt.offload``) runs it as task DAGs on the runtime through one autograd
Function (see ``lotus_rt.layers`` for the programs). Factor layouts:

- TTLinear: cores G_k (r_{k-1}, in_k, out_k, r_k), r_0 = r_d = 1 (Novikov et al. 2015).
- TuckerConv2d: first (C_in, R_in), core (R_out, R_in, kh, kw), last (C_out, R_out): a 1x1, a
  kh x kw and a 1x1 convolution (Kim et al. 2016). ``ranks`` = (R_in, R_out) or one int.
- CPConv2d: A_in (C_in, R), A_h (kh, R), A_w (kw, R), A_out (C_out, R): 1x1, depthwise kh x 1,
  depthwise 1 x kw, 1x1 (Lebedev et al. 2015).
"""
from __future__ import annotations

import math
import string
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as torchF
from torch import nn

from lotus_rt import decompose
from lotus_rt.nn.autograd import run_program
from lotus_rt.layers import ConvGeometry, Program


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _geometry(kernel_size, stride, padding, dilation) -> ConvGeometry:
    geometry = ConvGeometry(_pair(kernel_size, "kernel_size"), _pair(stride, "stride"),
                            _pair(padding, "padding"), _pair(dilation, "dilation"))
    if min(geometry.kernel + geometry.stride + geometry.dilation) < 1 or min(geometry.padding) < 0:
        raise ValueError(f"invalid convolution geometry {geometry}")
    return geometry


def _dense_init_std(fan_in: int) -> float:
    return 1.0 / math.sqrt(3.0 * fan_in)  # the std of torch's default kaiming-uniform weights


def _bias(out_features: int, fan_in: int, bias: bool, dtype) -> nn.Parameter | None:
    if not bias:
        return None
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(out_features, dtype=dtype).uniform_(-bound, bound))


def _load(layer: nn.Module, pairs, bias: torch.Tensor | None) -> None:
    """Copy decomposed factors (NumPy) and the dense layer's bias into ``layer``'s parameters."""
    with torch.no_grad():
        for param, value in pairs:
            param.copy_(torch.from_numpy(np.ascontiguousarray(value)))
        if bias is not None:
            layer.bias.copy_(bias.detach())


def _check_input(x: torch.Tensor, ndim: int, channels: int, axis: int, layer: str) -> None:
    if x.dim() != ndim or x.shape[axis] != channels:
        raise ValueError(f"{layer}: expected an input of {ndim} dimensions with {channels} at "
                         f"dimension {axis}, got shape {tuple(x.shape)}")


class TTLinear(nn.Module):
    """Linear layer prod(in_shape) -> prod(out_shape) with a TT-matrix (MPO) weight.

    ``own_task_dag``: when True, an offloaded whole model runs this layer as its own task DAG
    between its graph's regions instead of inside them (set by the DMRG optimiser, which replaces
    the cores between steps and reads the layer's input and output gradient through hooks)."""

    own_task_dag: bool = False

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], ranks, bias: bool = True,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_shape, self.out_shape = tuple(int(d) for d in in_shape), tuple(int(d) for d in out_shape)
        if len(self.in_shape) != len(self.out_shape) or not self.in_shape or min(self.in_shape + self.out_shape) < 1:
            raise ValueError(f"TTLinear: in_shape {in_shape} and out_shape {out_shape} must be "
                             "non-empty and of the same length, with positive factors")
        self.ranks = (1,) + tuple(decompose.tt_ranks(self.in_shape, self.out_shape, ranks)) + (1,)
        self.in_features, self.out_features = math.prod(self.in_shape), math.prod(self.out_shape)
        d = len(self.in_shape)
        std = (_dense_init_std(self.in_features) ** 2 / math.prod(self.ranks)) ** (1 / (2 * d))
        self.cores = nn.ParameterList(
            nn.Parameter(torch.randn(self.ranks[k], self.in_shape[k], self.out_shape[k], self.ranks[k + 1],
                                     dtype=dtype) * std) for k in range(d))
        self.bias = _bias(self.out_features, self.in_features, bias, dtype)
        self.offloaded = False
        self.equation = self._equation(d)
        self._program = Program(self.equation, d, bias=bias, bias_span=d)

    @staticmethod
    def _equation(d: int) -> str:
        letters = iter(string.ascii_letters)
        batch = next(letters)
        ins = [next(letters) for _ in range(d)]
        outs = [next(letters) for _ in range(d)]
        ranks = [next(letters) for _ in range(d + 1)]
        cores = [ranks[k] + ins[k] + outs[k] + ranks[k + 1] for k in range(d)]
        # r_0 and r_d have size 1: they appear in one core each and are summed away
        return f"{batch}{''.join(ins)},{','.join(cores)}->{batch}{''.join(outs)}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_shape: Sequence[int], out_shape: Sequence[int], ranks) -> "TTLinear":
        """TT-SVD of a dense layer's weight; ``reconstruction_error`` says how close it is."""
        if math.prod(in_shape) != linear.in_features or math.prod(out_shape) != linear.out_features:
            raise ValueError(f"TTLinear.from_linear: shapes {tuple(in_shape)} -> {tuple(out_shape)} do not "
                             f"factor {linear.in_features} -> {linear.out_features}")
        weight = linear.weight.detach().cpu().numpy()
        cores = decompose.tt_matrix(weight, in_shape, out_shape, ranks)
        layer = cls(in_shape, out_shape, [c.shape[3] for c in cores[:-1]], bias=linear.bias is not None,
                    dtype=linear.weight.dtype)
        _load(layer, zip(layer.cores, cores), linear.bias)
        layer.reconstruction_error = decompose.relative_error(
            decompose.reconstruct_tt_matrix(cores, in_shape, out_shape), weight)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, 2, self.in_features, 1, "TTLinear")
        xs = x.reshape((x.shape[0],) + self.in_shape)
        params = list(self.cores) + ([self.bias] if self.bias is not None else [])
        if self.offloaded:
            y = run_program(self._program, xs, *params)
            return y.reshape(x.shape[0], self.out_features)
        y = torch.einsum(self.equation, xs, *self.cores).reshape(x.shape[0], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, out_shape={self.out_shape}, ranks={self.ranks}, offloaded={self.offloaded}"


class _FactorizedConv2d(nn.Module):
    """Shared geometry, bias and the offloaded path of the factorized convolutions."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation,
                 bias: bool, dtype: torch.dtype):
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channels must be positive, got {in_channels} -> {out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.geometry = _geometry(kernel_size, stride, padding, dilation)
        fan_in = in_channels * self.geometry.kernel[0] * self.geometry.kernel[1]
        self.bias = _bias(out_channels, fan_in, bias, dtype)
        self.offloaded = False

    def _offloaded_forward(self, x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
        params = factors + ([self.bias] if self.bias is not None else [])
        return run_program(self._program, x, *params)

    @classmethod
    def _shaped_like(cls, conv: nn.Conv2d, rank) -> "_FactorizedConv2d":
        """A layer of ``conv``'s channels, geometry, bias and dtype with rank(s) ``rank``."""
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank, conv.stride, conv.padding,
                   conv.dilation, conv.bias is not None, conv.weight.dtype)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.bias.view(1, -1, 1, 1) if self.bias is not None else y

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={g.kernel}, stride={g.stride}, "
                f"padding={g.padding}, dilation={g.dilation}, offloaded={self.offloaded}")


class TuckerConv2d(_FactorizedConv2d):
    """Tucker-2 convolution: 1x1 (C_in -> R_in), kh x kw (R_in -> R_out), 1x1 (R_out -> C_out)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, ranks, stride=1, padding=0,
                 dilation=1, bias: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, dtype)
        kh, kw = self.geometry.kernel
        self.ranks = decompose.tucker2_ranks((out_channels, in_channels, kh, kw), ranks)
        r_in, r_out = self.ranks
        first = torch.linalg.qr(torch.randn(in_channels, r_in, dtype=torch.float64))[0]
        last = torch.linalg.qr(torch.randn(out_channels, r_out, dtype=torch.float64))[0]
        core_std = _dense_init_std(in_channels * kh * kw) * math.sqrt(in_channels * out_channels / (r_in * r_out))
        self.first = nn.Parameter(first.to(dtype))
        self.core = nn.Parameter(torch.randn(r_out, r_in, kh, kw, dtype=dtype) * core_std)
        self.last = nn.Parameter(last.to(dtype))
        self._program = Program("rijnpq,srij,os->nopq", 2, pre="nchw,cr->nrhw", n_pre=1,
                                conv=self.geometry, bias=bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks) -> "TuckerConv2d":
        """Tucker-2 (HOSVD + HOOI) of a dense convolution's weight."""
        _check_convertible(conv)
        weight = conv.weight.detach().cpu().numpy()
        rank_pair = decompose.tucker2_ranks(weight, ranks)  # "vbmf" needs the weight itself
        core, first, last = decompose.tucker2(weight, rank_pair)
        layer = cls._shaped_like(conv, rank_pair)
        _load(layer, ((layer.first, first), (layer.core, core), (layer.last, last)), conv.bias)
        layer.reconstruction_error = decompose.relative_error(
            decompose.reconstruct_tucker2(core, first, last), weight)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, 4, self.in_channels, 1, "TuckerConv2d")
        if self.offloaded:
            return self._offloaded_forward(x, [self.first, self.core, self.last])
        g = self.geometry
        y = torchF.conv2d(x, self.first.t()[:, :, None, None])
        y = torchF.conv2d(y, self.core, stride=g.stride, padding=g.padding, dilation=g.dilation)
        return self._add_bias(torchF.conv2d(y, self.last[:, :, None, None]))


class CPConv2d(_FactorizedConv2d):
    """CP convolution: 1x1 (C_in -> R), depthwise kh x 1, depthwise 1 x kw, 1x1 (R -> C_out)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank, stride=1, padding=0,
                 dilation=1, bias: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, dtype)
        kh, kw = self.geometry.kernel
        self.rank = decompose.cp_rank((out_channels, in_channels, kh, kw), rank)
        std = (_dense_init_std(in_channels * kh * kw) ** 2 / self.rank) ** 0.125
        self.factor_in = nn.Parameter(torch.randn(in_channels, self.rank, dtype=dtype) * std)
        self.factor_h = nn.Parameter(torch.randn(kh, self.rank, dtype=dtype) * std)
        self.factor_w = nn.Parameter(torch.randn(kw, self.rank, dtype=dtype) * std)
        self.factor_out = nn.Parameter(torch.randn(out_channels, self.rank, dtype=dtype) * std)
        self._program = Program("rijnpq,ir,jr,or->nopq", 3, pre="nchw,cr->nrhw", n_pre=1,
                                conv=self.geometry, bias=bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank, stable: bool = False, ridge: float = 1e-6) -> "CPConv2d":
        """CP (ALS with a ridge term; ``ridge=0``: plain ALS) of a dense convolution's weight;
        ``stable=True`` adds the minimal-sensitivity correction of Phan et al. 2020 at the ALS
        error (``decompose.cp_stable``)."""
        _check_convertible(conv)
        weight = conv.weight.detach().cpu().numpy()
        r = decompose.cp_rank(weight.shape, rank)
        # (A_out, A_in, A_h, A_w)
        factors = decompose.cp_stable(weight, r, ridge=ridge) if stable else decompose.cp(weight, r, ridge=ridge)
        layer = cls._shaped_like(conv, r)
        a_out, a_in, a_h, a_w = factors
        _load(layer, ((layer.factor_out, a_out), (layer.factor_in, a_in), (layer.factor_h, a_h),
                      (layer.factor_w, a_w)), conv.bias)
        layer.reconstruction_error = decompose.relative_error(decompose.reconstruct_cp(factors), weight)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, 4, self.in_channels, 1, "CPConv2d")
        if self.offloaded:
            return self._offloaded_forward(x, [self.factor_in, self.factor_h, self.factor_w, self.factor_out])
        g, r = self.geometry, self.rank
        y = torchF.conv2d(x, self.factor_in.t()[:, :, None, None])
        y = torchF.conv2d(y, self.factor_h.t()[:, None, :, None], stride=(g.stride[0], 1),
                          padding=(g.padding[0], 0), dilation=(g.dilation[0], 1), groups=r)
        y = torchF.conv2d(y, self.factor_w.t()[:, None, None, :], stride=(1, g.stride[1]),
                          padding=(0, g.padding[1]), dilation=(1, g.dilation[1]), groups=r)
        return self._add_bias(torchF.conv2d(y, self.factor_out[:, :, None, None]))


def _check_convertible(conv: nn.Conv2d) -> None:
    if conv.groups != 1:
        raise ValueError(f"cannot factorize a grouped convolution (groups={conv.groups})")
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(f"cannot factorize a convolution with padding={conv.padding!r}, "
                         f"padding_mode={conv.padding_mode!r}; only numeric zero padding is supported")


class OffloadedLinear(nn.Linear):
    """nn.Linear whose forward is a GEMM task DAG (same parameters, same state_dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear: expected {self.in_features} input features, got shape {tuple(x.shape)}")
        program = Program("bi,oi->bo", 1, bias=self.bias is not None)
        params = [self.weight] + ([self.bias] if self.bias is not None else [])
        y = run_program(program, x.reshape(-1, self.in_features), *params)
        return y.reshape(x.shape[:-1] + (self.out_features,))


class OffloadedConv2d(nn.Conv2d):
    """nn.Conv2d whose forward is an unfold task plus a contraction DAG (same state_dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, 4, self.in_channels, 1, "Conv2d")
        geometry = _geometry(self.kernel_size, self.stride, self.padding, self.dilation)
        program = Program("cijnpq,ocij->nopq", 1, conv=geometry, bias=self.bias is not None)
        params = [self.weight] + ([self.bias] if self.bias is not None else [])
        return run_program(program, x, *params)
