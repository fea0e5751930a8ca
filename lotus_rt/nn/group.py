"""Joint factorization of a group of layers: one shared low-rank network, one view per layer.

``tensorize_group(model, layers=[...], format="tucker"|"tt"|"cp", rank=...)`` stacks the kernels
of the named Conv2d/Linear layers into one tensor with a leading "layer" mode,
(L, O, I, KH, KW), factorizes it once (``lotus_rt.decompose``: HOSVD/HOOI, TT-SVD, CP-ALS; masked fits when padded) and
replaces each layer by a view (``GroupConv2d`` / ``GroupLinear``) that holds only its bias and
reads its kernel from the one ``SharedNetwork`` all views share:

- Tucker (T-Net, Kossaifi et al. 2019): factors U_L (L, R_L), U_O (O, R_O), U_I (I, R_I),
  U_h (KH, R_h), U_w (KW, R_w) and one core (R_L, R_O, R_I, R_h, R_w);
  ``W_l[o, c, i, j] = sum core[k, s, r, a, b] U_L[l, k] U_O[o, s] U_I[c, r] U_h[i, a] U_w[j, b]``.
- TT over (layer, out, in, kh, kw): G_L (L, r1), G_O (r1, O, r2), G_I (r2, I, r3),
  G_h (r3, KH, r4), G_w (r4, KW); ``W_l = G_L[l] G_O G_I G_h G_w`` (bonds summed).
- CP: A_L (L, R), A_O (O, R), A_I (I, R), A_h (KH, R), A_w (KW, R);
  ``W_l[o, c, i, j] = sum_r A_L[l, r] A_O[o, r] A_I[c, r] A_h[i, r] A_w[j, r]``.

Layers of different shapes share one network by zero padding (the choice documented in
``decompose.stack_kernels``): channels occupy the first O_l / I_l indices, kernels sit centered
in the common KH x KW window. A mask marks each layer's own entries; the decomposition fits only
those (EM imputation), and layer l reads its block only: the rows ``[:O_l]``, ``[:I_l]`` and its
kernel window of the shared factors. Nothing outside a block is ever used, so the padding costs
no accuracy, only the rows of the shared factors that some layers do not read.

A Linear layer joins a group as a convolution whose kernel covers its whole input: its flat input
is viewed as (C, h, w) (by default (I, 1, 1); ``example_input`` finds the (C, h, w) of a Linear
right after an ``nn.Flatten``, e.g. (64, 7, 7) for AlexNet's first fully connected layer), its
weight (O, C*h*w) as the kernel (O, C, h, w).

Each view runs like any tensorized layer: in torch eager (the reference), or, after
``lotus_rt.offload``, as a ``lotus_rt.layers.Program`` whose operands are the shared factors
sliced for that layer, e.g. for Tucker pre ``"nchw,cr->nrhw"`` with ``U_I[:I_l]``, unfold, main
``"rijnpq,ksrab,k,os,ia,jb->nopq"`` with the core, ``U_L[l]``, ``U_O[:O_l]`` and the kernel
windows of U_h, U_w: the planner contracts the small factors first. A layer with fewer input
channels than R_I (AlexNet's first convolution) skips the pre-contraction, which would widen
its input: U_I[:I_l] joins the main contraction instead (``"cijnpq,cr,ksrab,...->nopq"``). The slices are torch views
of the shared parameters, so autograd accumulates every layer's gradient into them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as torchF
from torch import nn

from lotus_rt import decompose
from lotus_rt.layers import ConvGeometry, Program
from lotus_rt.nn.autograd import run_program
from lotus_rt.nn.modules import _check_convertible, _check_input, _geometry

FORMATS = ("tucker", "tt", "cp")
FACTOR_NAMES = ("layer", "out", "inp", "height", "width")  # one per mode of (L, O, I, KH, KW)


@dataclass(frozen=True)
class Slot:
    """Where one layer's kernel sits in its group's stacked tensor (L, O, I, KH, KW)."""

    index: int
    out_channels: int
    in_channels: int
    kernel: tuple[int, int]
    offset: tuple[int, int] = (0, 0)  # the kernel window's start; channels start at 0

    def window(self) -> tuple[slice, slice]:
        return (slice(self.offset[0], self.offset[0] + self.kernel[0]),
                slice(self.offset[1], self.offset[1] + self.kernel[1]))


def _orthonormal(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(max(rows, cols), cols, dtype=torch.float64))[0][:rows]
    return q.to(dtype)


class SharedNetwork(nn.Module):
    """The low-rank network of a group: the factors every layer of the group reads.

    ``shape`` is the stacked (L, O, I, KH, KW), ``ranks`` the format's ranks (Tucker: one per
    mode; TT: the 4 internal ranks; CP: one int), ``slots`` one ``Slot`` per layer. A fresh
    network is random (scaled like torch's default dense init); ``tensorize_group`` loads it from
    the decomposition of trained layers.
    """

    def __init__(self, format: str, shape: Sequence[int], ranks, slots: Sequence[Slot],
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"SharedNetwork: format={format!r} is not valid; valid values: {', '.join(FORMATS)}")
        self.format, self.shape = format, tuple(int(n) for n in shape)
        if len(self.shape) != 5 or min(self.shape) < 1:
            raise ValueError(f"SharedNetwork: shape must be 5 positive sizes (L, O, I, KH, KW), got {tuple(shape)}")
        self.slots = tuple(slots)
        L, O, I, KH, KW = self.shape
        for s in self.slots:
            inside = (s.out_channels <= O and s.in_channels <= I and 0 <= s.offset[0]
                      and s.offset[0] + s.kernel[0] <= KH and 0 <= s.offset[1] and s.offset[1] + s.kernel[1] <= KW)
            if not inside or not 0 <= s.index < L:
                raise ValueError(f"SharedNetwork: {s} does not fit in the stacked shape {self.shape}")
        fan_in = max(s.in_channels * s.kernel[0] * s.kernel[1] for s in self.slots) if self.slots else I * KH * KW
        std = 1.0 / math.sqrt(3.0 * fan_in)  # the std of a kernel entry under torch's default init
        if format == "tucker":
            self.ranks = decompose.group_tucker_ranks(self.shape, ranks, full_modes=(0, 3, 4))
            for name, n, r in zip(FACTOR_NAMES, self.shape, self.ranks):
                self.register_parameter(name, nn.Parameter(_orthonormal(n, r, dtype)))
            self.core = nn.Parameter(torch.randn(self.ranks, dtype=dtype) * std
                                     * math.sqrt(math.prod(self.shape) / math.prod(self.ranks)))
        elif format == "tt":
            self.ranks = decompose.group_tt_ranks(self.shape, ranks)
            r = (1,) + self.ranks + (1,)
            core_std = (std ** 2 / math.prod(self.ranks)) ** (1 / 10)
            for k, (name, n) in enumerate(zip(FACTOR_NAMES, self.shape)):
                value = torch.randn(r[k], n, r[k + 1], dtype=dtype) * core_std
                self.register_parameter(name, nn.Parameter(value.reshape(self._tt_shape(k, r[k], n, r[k + 1]))))
        else:
            self.ranks = decompose.group_cp_rank(self.shape, ranks)
            factor_std = (std ** 2 / self.ranks) ** (1 / 10)
            for name, n in zip(FACTOR_NAMES, self.shape):
                self.register_parameter(name, nn.Parameter(torch.randn(n, self.ranks, dtype=dtype) * factor_std))

    @staticmethod
    def _tt_shape(k: int, left: int, n: int, right: int) -> tuple[int, ...]:
        """TT cores as stored: the first (L, r1) and the last (r4, KW) without their size-1 bond."""
        return (n, right) if k == 0 else (left, n) if k == 4 else (left, n, right)

    # ------------------------------------------------------------------ per-layer operands

    def uses_pre(self, index: int) -> bool:
        """Whether layer ``index`` contracts its input with the input factor before the unfold
        (Tucker and CP, when that lowers the channel count; otherwise the factor joins the main
        contraction, where the planner folds it into the small factors)."""
        return self.format != "tt" and self._in_rank() < self.slots[index].in_channels

    def _in_rank(self) -> int:
        return self.ranks[2] if self.format == "tucker" else self.ranks

    def operands(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Layer ``index``'s (pre, main) operands of its Program: views of the shared factors."""
        s = self.slots[index]
        wh, ww = s.window()
        if self.format == "tt":
            return ([], [self.layer[s.index], self.out[:, :s.out_channels], self.inp[:, :s.in_channels],
                         self.height[:, wh], self.width[:, ww]])
        inp = [self.inp[:s.in_channels]]
        if self.format == "tucker":
            main = [self.core, self.layer[s.index], self.out[:s.out_channels], self.height[wh], self.width[ww]]
        else:
            main = [self.layer[s.index], self.height[wh], self.width[ww], self.out[:s.out_channels]]
        return (inp, main) if self.uses_pre(index) else ([], inp + main)

    def program(self, index: int, geometry: ConvGeometry, bias: bool) -> Program:
        """The Program of layer ``index`` with ``geometry`` (see the module docstring)."""
        if self.format == "tt":
            return Program("cijnpq,x,xoy,ycz,ziw,wj->nopq", 5, conv=geometry, bias=bias)
        main = "ksrab,k,os,ia,jb->nopq" if self.format == "tucker" else "r,ir,jr,or->nopq"
        n_main = 5 if self.format == "tucker" else 4
        if self.uses_pre(index):
            return Program("rijnpq," + main, n_main, pre="nchw,cr->nrhw", n_pre=1, conv=geometry, bias=bias)
        return Program("cijnpq,cr," + main, n_main + 1, conv=geometry, bias=bias)

    def kernel(self, index: int) -> torch.Tensor:
        """Layer ``index``'s dense kernel (O_l, I_l, kh_l, kw_l), differentiable (torch.einsum)."""
        pre, main = self.operands(index)
        main = pre + main  # the input factor first
        if self.format == "tucker":
            inp, core, layer, out, height, width = main
            return torch.einsum("ksrab,k,os,cr,ia,jb->ocij", core, layer, out, inp, height, width)
        if self.format == "cp":
            inp, layer, height, width, out = main
            return torch.einsum("r,ir,jr,or,cr->ocij", layer, height, width, out, inp)
        return torch.einsum("x,xoy,ycz,ziw,wj->ocij", *main)

    def stacked(self) -> torch.Tensor:
        """The whole represented tensor (L, O, I, KH, KW), padding included."""
        if self.format == "tucker":
            return torch.einsum("ksrab,lk,os,cr,ia,jb->locij", self.core, self.layer, self.out, self.inp,
                                self.height, self.width)
        if self.format == "cp":
            return torch.einsum("lr,or,cr,ir,jr->locij", self.layer, self.out, self.inp, self.height, self.width)
        return torch.einsum("lx,xoy,ycz,ziw,wj->locij", self.layer, self.out, self.inp, self.height, self.width)

    def load(self, factors: Mapping[str, np.ndarray]) -> None:
        """Copy NumPy factors (names as the parameters) into the network."""
        with torch.no_grad():
            for name, value in factors.items():
                param = getattr(self, name)
                if tuple(param.shape) != tuple(value.shape):
                    raise ValueError(f"SharedNetwork.load: {name} has shape {tuple(param.shape)}, got {value.shape}")
                param.copy_(torch.from_numpy(np.ascontiguousarray(value)))

    def extra_repr(self) -> str:
        return f"format={self.format!r}, shape={self.shape}, ranks={self.ranks}, layers={len(self.slots)}"


class _GroupLayer(nn.Module):
    """A layer of a group: its geometry and bias; its kernel comes from the shared network."""

    def __init__(self, shared: SharedNetwork, index: int, geometry: ConvGeometry, bias: bool):
        super().__init__()
        self.shared, self.index, self.geometry = shared, index, geometry
        slot = shared.slots[index]
        if slot.kernel != geometry.kernel:
            raise ValueError(f"group layer {index}: kernel {geometry.kernel} differs from its slot's {slot.kernel}")
        self.in_channels, self.out_channels = slot.in_channels, slot.out_channels
        dtype = shared.layer.dtype
        fan_in = slot.in_channels * slot.kernel[0] * slot.kernel[1]
        self.bias = (nn.Parameter(torch.empty(slot.out_channels, dtype=dtype).uniform_(-1, 1) / math.sqrt(fan_in))
                     if bias else None)
        self.offloaded = False
        self._program = shared.program(index, geometry, bias)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """The layer as a convolution of a 4-D input: task DAGs when offloaded, else torch eager."""
        shared, g = self.shared, self.geometry
        pre, main = shared.operands(self.index)
        if self.offloaded:
            return run_program(self._program, x, *pre, *main, *([self.bias] if self.bias is not None else []))
        conv = dict(stride=g.stride, padding=g.padding, dilation=g.dilation)
        if not pre:  # TT, or an input factor wider than the layer's input: one convolution
            y = torchF.conv2d(x, shared.kernel(self.index), **conv)
        elif shared.format == "tucker":  # 1x1 (U_I), kh x kw (the core at this layer), 1x1 (U_O)
            core, layer, out, height, width = main
            y = torchF.conv2d(x, pre[0].t()[:, :, None, None])
            y = torchF.conv2d(y, torch.einsum("ksrab,k,ia,jb->srij", core, layer, height, width), **conv)
            y = torchF.conv2d(y, out[:, :, None, None])
        else:  # cp: 1x1, one depthwise kh x kw per component (scaled by A_L[l]), 1x1
            layer, height, width, out = main
            y = torchF.conv2d(x, pre[0].t()[:, :, None, None])
            y = torchF.conv2d(y, torch.einsum("r,ir,jr->rij", layer, height, width)[:, None], groups=layer.shape[0],
                              **conv)
            y = torchF.conv2d(y, out[:, :, None, None])
        return y + self.bias.view(1, -1, 1, 1) if self.bias is not None else y

    def kernel(self) -> torch.Tensor:
        """This layer's dense kernel (O, I, kh, kw) (a Linear's: (O, C, h, w) of its input view)."""
        return self.shared.kernel(self.index)


class GroupConv2d(_GroupLayer):
    """A Conv2d whose kernel is a slice of a ``SharedNetwork`` (see the module docstring)."""

    def __init__(self, shared: SharedNetwork, index: int, stride=1, padding=0, dilation=1, bias: bool = True):
        slot = shared.slots[index]
        super().__init__(shared, index, _geometry(slot.kernel, stride, padding, dilation), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, 4, self.in_channels, 1, "GroupConv2d")
        return self._conv(x)

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={g.kernel}, stride={g.stride}, "
                f"padding={g.padding}, layer={self.index}, offloaded={self.offloaded}")


class GroupLinear(_GroupLayer):
    """A Linear in a group: its flat input viewed as (C, h, w), its weight as an (O, C, h, w) kernel."""

    def __init__(self, shared: SharedNetwork, index: int, bias: bool = True):
        slot = shared.slots[index]
        super().__init__(shared, index, ConvGeometry(slot.kernel), bias)
        self.in_features = slot.in_channels * slot.kernel[0] * slot.kernel[1]
        self.out_features = slot.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, 2, self.in_features, 1, "GroupLinear")
        c, (h, w) = self.in_channels, self.geometry.kernel
        return self._conv(x.reshape(x.shape[0], c, h, w)).reshape(x.shape[0], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} as {(self.in_channels, *self.geometry.kernel)}, "
                f"out_features={self.out_features}, layer={self.index}, offloaded={self.offloaded}")


GROUP_LAYERS = (GroupConv2d, GroupLinear)


# ---------------------------------------------------------------------- tensorize_group


@dataclass
class GroupReport:
    """What ``tensorize_group`` did to one group (kept in ``model.lotus_groups``)."""

    layers: list[str]
    format: str
    shape: tuple[int, ...]
    ranks: object
    params_before: int  # the dense layers' weights and biases
    params_after: int  # the shared network plus the layers' biases
    errors: dict[str, float] = field(default_factory=dict)  # per layer: ||W - W~|| / ||W|| at initialisation

    def rows(self) -> list[str]:
        head = (f"group {self.format} {self.shape} ranks {self.ranks}: {self.params_before} -> {self.params_after} "
                f"params ({self.params_before / max(self.params_after, 1):.1f}x)")
        return [head] + [f"  {name:<24} w.err {err:.4f}" for name, err in self.errors.items()]


def linear_views_from(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple[int, int, int]]:
    """(C, h, w) per Linear that runs right after an ``nn.Flatten`` of a 4-D map (one forward pass)."""
    order: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: order.append((name, mod, tuple(inp[0].shape))))
             for name, m in model.named_modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    views = {}
    for (_, prev, prev_in), (name, module, _) in zip(order, order[1:]):
        if isinstance(module, nn.Linear) and isinstance(prev, nn.Flatten) and len(prev_in) == 4 \
                and math.prod(prev_in[1:]) == module.in_features:
            views[name] = tuple(prev_in[1:])
    return views


def _kernel_of(name: str, module: nn.Module, views: Mapping[str, Sequence[int]]) -> np.ndarray:
    weight = module.weight.detach().cpu().numpy().astype(np.float64)
    if isinstance(module, nn.Conv2d):
        return weight
    c, h, w = views.get(name, (module.in_features, 1, 1))
    if c * h * w != module.in_features:
        raise ValueError(f"tensorize_group: the view {(c, h, w)} of Linear {name!r} does not match its "
                         f"{module.in_features} input features")
    return weight.reshape(module.out_features, c, h, w)


def _resolve(model: nn.Module, layers: Sequence[str]) -> list[tuple[str, nn.Module]]:
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"tensorize_group: layers must be a non-empty list of layer names, got {layers!r}")
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise ValueError(f"tensorize_group: no layer named {unknown[0]!r} in the model; its Conv2d/Linear "
                         f"layers: {[n for n, m in modules.items() if type(m) in (nn.Conv2d, nn.Linear)]}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"tensorize_group: a layer is named twice in {list(layers)}")
    chosen = []
    for name in layers:
        module = modules[name]
        if type(module) not in (nn.Conv2d, nn.Linear):
            raise ValueError(f"tensorize_group: {name!r} is a {type(module).__name__}; a group takes dense "
                             "nn.Conv2d and nn.Linear layers")
        if isinstance(module, nn.Conv2d):
            _check_convertible(module)
        chosen.append((name, module))
    dtypes = {m.weight.dtype for _, m in chosen}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64}:
        raise ValueError(f"tensorize_group: the layers must share one float32/float64 dtype, got {sorted(map(str, dtypes))}")
    return chosen


def _decompose(stacked: np.ndarray, mask: np.ndarray | None, format: str, rank, dense_params: int,
               stable: bool) -> tuple[object, dict[str, np.ndarray]]:
    """The format's ranks and factors (names as SharedNetwork's parameters) of the stacked tensor."""
    if format == "tucker":
        full = (0,) if isinstance(rank, float) else (0, 3, 4)  # a float: every rank but the layer's by energy
        ranks = decompose.group_tucker_ranks(stacked.shape, rank, full_modes=full, dense_params=dense_params,
                                             tensor=stacked)
        core, factors = decompose.masked_tucker(stacked, ranks, mask=mask)
        return ranks, {"core": core, **dict(zip(FACTOR_NAMES, factors))}
    if format == "tt":
        ranks = decompose.group_tt_ranks(stacked.shape, rank, dense_params=dense_params, tensor=stacked)
        cores = decompose.masked_tt(stacked, ranks, mask=mask)
        ranks = tuple(c.shape[2] for c in cores[:-1])  # a cut's SVD may give fewer
        cores[0], cores[-1] = cores[0][0], cores[-1][:, :, 0]
        return ranks, dict(zip(FACTOR_NAMES, cores))
    r = decompose.group_cp_rank(stacked.shape, rank, dense_params=dense_params)
    weights, factors = decompose.masked_cp(stacked, r, mask=mask)
    if stable:  # the least sensitive CP at the same error; outside the mask the fit is kept as is
        target = stacked if mask is None else np.where(mask, stacked, decompose.reconstruct_cp(factors, weights))
        factors = decompose.cp_correct(target, factors, weights)
    else:
        factors = [factors[0] * weights] + list(factors[1:])
    return r, dict(zip(FACTOR_NAMES, factors))


def tensorize_group(model: nn.Module, layers: Sequence[str], format: str = "tucker", rank=0.1,
                    stable: bool = False, example_input: torch.Tensor | None = None,
                    linear_views: Mapping[str, Sequence[int]] | None = None, normalize: bool = True,
                    verbose: bool = True) -> nn.Module:
    """Replace the named layers by views of ONE low-rank network fitted to their stacked kernels.

    ``layers``: names (as ``model.named_modules()``) of dense nn.Conv2d / nn.Linear layers of one
    dtype. ``format``: "tucker", "tt" or "cp" (module docstring). ``rank``: Tucker: an int (the
    channel ranks; layer and kernel modes kept full), a float in (0, 1] (the fraction of the
    layers' dense weight count the whole network may use, spread over the modes by the energy of
    the unfoldings' singular values: ``decompose.group_tucker_ranks(..., tensor=)``; the layer mode
    full), or 5 ints (R_L, R_O, R_I, R_h, R_w); TT: an int, a float (budget spread over the cuts
    likewise) or the 4 internal ranks; CP: an int or a float. ``stable``
    (CP): apply the sensitivity correction of Phan et al. 2020 (``decompose.cp_correct``).
    ``example_input`` / ``linear_views`` give the (C, h, w) view of Linear layers. ``normalize``:
    fit the kernels scaled to unit norm (each layer weighs the same in the fit, not by its size;
    the norms are folded back into the layer factor's rows). Each layer
    keeps its bias, stride, padding and dilation. Returns the model; ``model.lotus_groups`` lists
    a ``GroupReport`` per call.
    """
    if format not in FORMATS:
        raise ValueError(f"tensorize_group: format={format!r} is not valid; valid values: {', '.join(FORMATS)}")
    if stable and format != "cp":
        raise ValueError("tensorize_group: stable=True is the stable CP correction; it needs format='cp'")
    chosen = _resolve(model, layers)
    views = dict(linear_views or {})
    if example_input is not None and any(isinstance(m, nn.Linear) for _, m in chosen):
        views = {**linear_views_from(model, example_input), **views}
    kernels = [_kernel_of(name, module, views) for name, module in chosen]
    # each kernel at unit norm, so that the fit weighs every layer alike, not by its size; the
    # norms go back into the rows of the layer factor (exact: layer l's kernel is linear in row l)
    norms = np.array([np.linalg.norm(k) if normalize and np.linalg.norm(k) > 0 else 1.0 for k in kernels])
    stacked, mask, offsets = decompose.stack_kernels([k / n for k, n in zip(kernels, norms)])
    padded = not mask.all()
    dense_params = sum(k.size for k in kernels)
    ranks, factors = _decompose(stacked, mask if padded else None, format, rank, dense_params, stable)
    factors["layer"] = factors["layer"] * norms[:, None]
    slots = [Slot(l, k.shape[0], k.shape[1], (k.shape[2], k.shape[3]), offsets[l][2:]) for l, k in enumerate(kernels)]
    dtype = chosen[0][1].weight.dtype
    shared = SharedNetwork(format, stacked.shape, ranks, slots, dtype=dtype)
    shared.load({name: value.astype(np.float64) if dtype == torch.float64 else value.astype(np.float32)
                 for name, value in factors.items()})
    report = GroupReport([name for name, _ in chosen], format, stacked.shape, shared.ranks,
                         sum(p.numel() for _, m in chosen for p in m.parameters()), 0)
    for (name, module), kernel in zip(chosen, kernels):
        has_bias = module.bias is not None
        if isinstance(module, nn.Conv2d):
            view = GroupConv2d(shared, len(report.errors), module.stride, module.padding, module.dilation, has_bias)
        else:
            view = GroupLinear(shared, len(report.errors), has_bias)
        if has_bias:
            with torch.no_grad():
                view.bias.copy_(module.bias.detach())
        with torch.no_grad():
            report.errors[name] = decompose.relative_error(view.kernel().double().numpy(), kernel)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, view)
    report.params_after = sum(p.numel() for p in shared.parameters()) + sum(
        m.bias.numel() for _, m in chosen if m.bias is not None)
    model.lotus_groups = list(getattr(model, "lotus_groups", [])) + [report]
    if verbose:
        print("\n".join(report.rows()))
    return model


def same_shape_groups(model: nn.Module, names: Iterable[str]) -> list[list[str]]:
    """The named layers bucketed by weight shape, in order of first appearance (singletons too)."""
    modules = dict(model.named_modules())
    buckets: dict[tuple[int, ...], list[str]] = {}
    for name in names:
        buckets.setdefault(tuple(modules[name].weight.shape), []).append(name)
    return list(buckets.values())


__all__ = ["tensorize_group", "SharedNetwork", "GroupConv2d", "GroupLinear", "GroupReport", "Slot",
           "linear_views_from", "same_shape_groups", "FORMATS", "GROUP_LAYERS"]
