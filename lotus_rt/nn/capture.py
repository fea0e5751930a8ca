"""Capture a torch model with torch.fx and describe its supported parts as ``lotus_rt.graph`` graphs.

``trace(model)`` runs torch.fx's symbolic tracer with lotus_rt's tensorized layers as leaves.
``partition(gm)`` walks the traced nodes in order and groups consecutive supported nodes into
regions; a node lotus_rt cannot lower (an unknown module or function, a parameter used
directly, a broadcasting add, ...) stays a torch node between regions and is named once by the
caller. ``region_graph(region, meta, training)`` turns one region into a ``Graph`` for the shapes
one input shape gives (``node_meta``: torch.fx's ShapeProp under a FakeTensorMode, so nothing is
computed and no random number is drawn), mapping each torch module to graph ops:

- Conv2d -> conv; TuckerConv2d -> three convs (1x1, kxk core, 1x1); CPConv2d -> four (1x1,
  depthwise kh x 1, depthwise 1 x kw, 1x1); factors enter as views of the parameters, so their
  gradients reach the parameters themselves.
- Linear -> linear; TTLinear -> contract (the TT network's pairwise GEMM steps).
- ReLU, GELU, MaxPool2d, AvgPool2d (AdaptiveAvgPool2d to 1x1), BatchNorm2d, Flatten, Dropout,
  Identity, add, cat, flatten/view/reshape that keep the batch axis.
"""
from __future__ import annotations

import contextlib
import io
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lotus_rt.graph.ir import Graph, Op
from lotus_rt.nn.group import GROUP_LAYERS
from lotus_rt.nn.modules import CPConv2d, OffloadedConv2d, OffloadedLinear, TTLinear, TuckerConv2d

# The layers of a tensorize_group network are leaves too: not lowered into regions, they run
# between them as their own task DAGs (offload switches them like any tensorized layer).
LEAVES = (TTLinear, TuckerConv2d, CPConv2d, *GROUP_LAYERS)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, LEAVES) or super().is_leaf_module(module, name)


def trace(model: nn.Module) -> fx.GraphModule:
    """torch.fx GraphModule of ``model`` with lotus_rt's tensorized layers as leaf modules. A
    model that is itself such a layer (or a torch layer) becomes a one-node graph calling it."""
    if _Tracer().is_leaf_module(model, ""):
        graph = fx.Graph()
        graph.output(graph.call_module("layer", (graph.placeholder("x"),)))
        root = nn.Module()
        root.layer = model
        gm = fx.GraphModule(root, graph)
        gm.lotus_single_layer = True  # the model is the one node: its name is the model's, ""
        return gm
    return fx.GraphModule(model, _Tracer().trace(model))


def node_meta(gm: fx.GraphModule, args: tuple) -> dict[fx.Node, tuple[tuple[int, ...], torch.dtype] | None]:
    """Per node: (shape, dtype) of the tensor it makes for these arguments (None: not a tensor).

    Shapes come from torch.fx's ShapeProp on fake tensors (nothing computed, no random draw);
    where a module reads a value on the way (batch norm with momentum=None divides by its
    counter), from a real run whose state changes are undone: buffers and the random generator
    are restored afterwards."""
    with _own_forwards(gm):
        return _node_meta(gm, args)


@contextlib.contextmanager
def _own_forwards(gm: fx.GraphModule):
    """Modules whose forward lotus_rt replaced (an offloaded layer captured as a one-node graph)
    run their own forward inside the block."""
    swapped = [(m, type(m)) for m in gm.modules() if getattr(type(m), "_lotus_base", None) is not None]
    for module, cls in swapped:
        module.__class__ = cls._lotus_base
    try:
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


def _node_meta(gm: fx.GraphModule, args: tuple) -> dict[fx.Node, tuple[tuple[int, ...], torch.dtype] | None]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints the traceback it raises
            ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*args)
    except Exception as exc:  # noqa: BLE001 - data-dependent code under fake tensors
        if isinstance(exc.__cause__, (ValueError, TypeError)):
            raise exc.__cause__ from None  # the model refused its input: say so as it did
        buffers = [(b, b.clone()) for b in gm.buffers()]
        rng = torch.get_rng_state()
        try:
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                ShapeProp(gm).propagate(*args)
        except RuntimeError as real:
            raise (real.__cause__ or real) from None
        finally:
            torch.set_rng_state(rng)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
    meta = {}
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        meta[node] = (tuple(tm.shape), tm.dtype) if hasattr(tm, "shape") else None
    return meta


# ---------------------------------------------------------------------------------- what is supported

SHAPE_METHODS = ("size", "dim")
MODULES = (nn.Conv2d, nn.Linear, TTLinear, TuckerConv2d, CPConv2d, nn.ReLU, nn.GELU, nn.MaxPool2d, nn.AvgPool2d,
           nn.AdaptiveAvgPool2d, nn.BatchNorm2d, nn.Flatten, nn.Dropout, nn.Identity)
FUNCTIONS = {torch.relu: "relu", F.relu: "relu", F.gelu: "gelu", torch.flatten: "flatten", operator.add: "add",
             torch.add: "add", operator.iadd: "add", torch.cat: "cat", F.max_pool2d: "maxpool",
             F.avg_pool2d: "avgpool", F.dropout: "dropout", F.adaptive_avg_pool2d: "adaptive_avgpool"}
METHODS = {"relu": "relu", "flatten": "flatten", "view": "reshape", "reshape": "reshape", "add": "add"}


def is_shape_node(node: fx.Node, meta: dict | None = None) -> bool:
    """Nodes that only compute sizes (x.size(0), x.dim(), a size's item): evaluated from shapes."""
    if node.op == "call_method" and node.target in SHAPE_METHODS:
        return True
    return node.op == "call_function" and node.target is operator.getitem and \
        isinstance(node.args[0], fx.Node) and is_shape_node(node.args[0])


def unsupported_reason(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why ``node`` cannot be lowered (None: it can). Shape-dependent checks come later."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if _own_task_dag(module):
            return f"module {node.target} ({type(module).__name__}: its own task DAG)"
        if type(module) not in MODULES and not isinstance(module, (OffloadedConv2d, OffloadedLinear)):
            return f"module {node.target} ({type(module).__name__})"
        if isinstance(module, nn.Conv2d) and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
            return f"module {node.target} (Conv2d padding={module.padding!r}, padding_mode={module.padding_mode!r})"
        if isinstance(module, nn.MaxPool2d) and module.return_indices:
            return f"module {node.target} (MaxPool2d with return_indices)"
        if isinstance(module, nn.BatchNorm2d) and not module.training and module.track_running_stats and \
                module.running_mean is None:
            return f"module {node.target} (BatchNorm2d without running statistics)"
        return None
    if node.op == "call_function":
        if node.target in FUNCTIONS:
            return None
        return f"function {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return None if node.target in METHODS else f"method .{node.target}()"
    if node.op == "get_attr":
        return f"attribute {node.target} used directly"
    return None


@dataclass
class Region:
    """Consecutive supported nodes: lowered together, one autograd Function."""

    nodes: list[fx.Node] = field(default_factory=list)
    inputs: list[fx.Node] = field(default_factory=list)  # tensors from outside, in first-use order
    outputs: list[fx.Node] = field(default_factory=list)  # its tensors used outside


@dataclass
class Partition:
    """The traced model as an ordered schedule of regions and torch nodes."""

    steps: list[Region | fx.Node]
    kept: list[str]  # why the torch nodes stay in torch


def partition(gm: fx.GraphModule) -> Partition:
    steps: list[Region | fx.Node] = []
    kept: list[str] = []
    current: Region | None = None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or is_shape_node(node):
            continue
        reason = unsupported_reason(gm, node)
        if reason is None:
            if current is None:
                current = Region()
                steps.append(current)
            current.nodes.append(node)
        else:
            current = None
            steps.append(node)
            if not (node.op == "call_module" and _own_task_dag(gm.get_submodule(node.target))):
                kept.append(reason)  # (such a layer is not kept in torch: it runs as its own task DAG)
    for step in steps:
        if isinstance(step, Region):
            _connect(step)
    return Partition(steps, kept)


def _own_task_dag(module: nn.Module) -> bool:
    """A layer that runs between regions as its own task DAG, not in torch: a layer of a shared
    network (``tensorize_group``), or one marked ``own_task_dag`` (a TT layer swept by DMRG)."""
    return isinstance(module, GROUP_LAYERS) or bool(getattr(module, "own_task_dag", False))


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return [n for n in found if not is_shape_node(n)]


def _connect(region: Region) -> None:
    inside = set(region.nodes)
    for node in region.nodes:
        for arg in _tensor_args(node):
            if arg not in inside and arg not in region.inputs:
                region.inputs.append(arg)
    for node in region.nodes:
        if any(user not in inside for user in node.users):
            region.outputs.append(node)


# ---------------------------------------------------------------------------------- region -> Graph

class Unsupported(Exception):
    """A node of a region cannot be lowered for these shapes (the region then runs in torch)."""


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(int(x) for x in v)


def _arg(node: fx.Node, k: int, name: str, default: Any = None) -> Any:
    if len(node.args) > k:
        return node.args[k]
    return node.kwargs.get(name, default)


@dataclass
class RegionGraph:
    """A region as a graph, and the torch objects its parameters and buffers are."""

    graph: Graph
    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    batchnorms: list[tuple[Op, nn.BatchNorm2d]]  # (op, module): batch norms updating running stats
    dropouts: list[tuple[Op, float]]  # (op, p)


class _Builder:
    def __init__(self, gm: fx.GraphModule, meta: dict, training: bool):
        self.gm, self.meta, self.training = gm, meta, training
        self.g = Graph()
        self.values: dict[fx.Node, int] = {}
        self.params: list[torch.Tensor] = []
        self.param_ids: dict[int, int] = {}
        self.buffers: list[torch.Tensor] = []
        self.batchnorms: list[tuple[Op, nn.BatchNorm2d]] = []
        self.dropouts: list[tuple[Op, float]] = []

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        found = self.meta.get(node)
        if found is None:
            raise Unsupported(f"node {node.name} does not make a tensor")
        return found[0]

    def param(self, tensor: torch.Tensor, name: str) -> int:
        key = id(tensor)
        if key not in self.param_ids:
            self.param_ids[key] = self.g.param(tuple(tensor.shape), _np_dtype(tensor.dtype), tensor.requires_grad, name)
            self.params.append(tensor)
        return self.param_ids[key]

    def buffer(self, tensor: torch.Tensor, name: str) -> int:
        self.buffers.append(tensor)
        return self.g.buffer(tuple(tensor.shape), _np_dtype(tensor.dtype), name)

    def op(self, kind: str, inputs: list[int], shape: tuple[int, ...], name: str, **kw: Any) -> int:
        return self.g.add(kind, inputs, shape, name=name[:40], **kw)

    # ------------------------------------------------------------------ modules

    def conv(self, x: int, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups,
             name: str, w_view=None, kernel=None) -> int:
        n, c, h, w = self.g.values[x].shape
        kernel = kernel or tuple(weight.shape[2:])
        out_channels = w_view[1][0] if w_view else weight.shape[0]
        ho = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
        wo = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        params = [self.param(weight, name + ".weight")] + ([self.param(bias, name + ".bias")] if bias is not None else [])
        return self.op("conv", [x], (n, out_channels, ho, wo), name, params=params, stride=list(stride),
                       padding=list(padding), dilation=list(dilation), groups=groups, bias=bias is not None,
                       w_view=w_view)

    def module(self, node: fx.Node, module: nn.Module, x: int) -> int:
        name, out = node.target, self.shape(node)
        if isinstance(module, TuckerConv2d):
            g, (r_in, r_out) = module.geometry, module.ranks
            c_in, c_out = module.in_channels, module.out_channels
            h = self.conv(x, module.first, None, (1, 1), (0, 0), (1, 1), 1, name + ".first",
                          w_view=((1, 0), (r_in, c_in, 1, 1)), kernel=(1, 1))
            h = self.conv(h, module.core, None, g.stride, g.padding, g.dilation, 1, name + ".core")
            return self.conv(h, module.last, module.bias, (1, 1), (0, 0), (1, 1), 1, name + ".last",
                             w_view=((0, 1), (c_out, r_out, 1, 1)), kernel=(1, 1))
        if isinstance(module, CPConv2d):
            g, r = module.geometry, module.rank
            (kh, kw), c_in, c_out = g.kernel, module.in_channels, module.out_channels
            h = self.conv(x, module.factor_in, None, (1, 1), (0, 0), (1, 1), 1, name + ".in",
                          w_view=((1, 0), (r, c_in, 1, 1)), kernel=(1, 1))
            h = self.conv(h, module.factor_h, None, (g.stride[0], 1), (g.padding[0], 0), (g.dilation[0], 1), r,
                          name + ".h", w_view=((1, 0), (r, 1, kh, 1)), kernel=(kh, 1))
            h = self.conv(h, module.factor_w, None, (1, g.stride[1]), (0, g.padding[1]), (1, g.dilation[1]), r,
                          name + ".w", w_view=((1, 0), (r, 1, 1, kw)), kernel=(1, kw))
            return self.conv(h, module.factor_out, module.bias, (1, 1), (0, 0), (1, 1), 1, name + ".out",
                             w_view=((0, 1), (c_out, r, 1, 1)), kernel=(1, 1))
        if isinstance(module, nn.Conv2d):
            return self.conv(x, module.weight, module.bias, _pair(module.stride), _pair(module.padding),
                             _pair(module.dilation), module.groups, name)
        if isinstance(module, TTLinear):
            if len(self.g.values[x].shape) != 2:
                raise Unsupported(f"{name}: TTLinear on a {len(self.g.values[x].shape)}-D input")
            params = [self.param(core, f"{name}.cores.{k}") for k, core in enumerate(module.cores)]
            if module.bias is not None:
                params.append(self.param(module.bias, name + ".bias"))
            return self.op("contract", [x], out, name, params=params, equation=module.equation,
                           in_shape=list(module.in_shape), out_shape=list(module.out_shape),
                           bias=module.bias is not None)
        if isinstance(module, nn.Linear):
            if len(self.g.values[x].shape) != 2:
                raise Unsupported(f"{name}: Linear on a {len(self.g.values[x].shape)}-D input")
            params = [self.param(module.weight, name + ".weight")] + \
                ([self.param(module.bias, name + ".bias")] if module.bias is not None else [])
            return self.op("linear", [x], out, name, params=params, bias=module.bias is not None)
        if isinstance(module, nn.ReLU):
            return self.op("relu", [x], out, name)
        if isinstance(module, nn.GELU):
            return self.op("gelu", [x], out, name, approximate=module.approximate)
        if isinstance(module, nn.MaxPool2d):
            return self.maxpool(x, out, name, module.kernel_size, module.stride, module.padding, module.dilation,
                                module.ceil_mode)
        if isinstance(module, nn.AvgPool2d):
            return self.avgpool(x, out, name, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                                module.count_include_pad, module.divisor_override)
        if isinstance(module, nn.AdaptiveAvgPool2d):
            return self.adaptive_avgpool(x, out, name, module.output_size)
        if isinstance(module, nn.BatchNorm2d):
            return self.batchnorm(x, out, name, module)
        if isinstance(module, nn.Flatten):
            return self.reshape(x, out, name)
        if isinstance(module, nn.Dropout):
            return self.dropout(x, out, name, module.p, self.training and module.training)
        if isinstance(module, nn.Identity):
            return self.reshape(x, out, name)
        raise Unsupported(f"module {name} ({type(module).__name__})")

    def maxpool(self, x, out, name, kernel, stride, padding, dilation, ceil_mode) -> int:
        kernel = _pair(kernel)
        return self.op("maxpool", [x], out, name, kernel=list(kernel), stride=list(_pair(stride or kernel)),
                       padding=list(_pair(padding)), dilation=list(_pair(dilation)), ceil_mode=bool(ceil_mode))

    def avgpool(self, x, out, name, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) -> int:
        kernel = _pair(kernel)
        return self.op("avgpool", [x], out, name, kernel=list(kernel), stride=list(_pair(stride or kernel)),
                       padding=list(_pair(padding)), ceil_mode=bool(ceil_mode),
                       count_include_pad=bool(count_include_pad), divisor_override=divisor_override)

    def adaptive_avgpool(self, x, out, name, output_size) -> int:
        h, w = self.g.values[x].shape[2:]
        if tuple(out[2:]) != (1, 1) and (h % out[2] or w % out[3]):
            raise Unsupported(f"{name}: adaptive average pooling {h}x{w} -> {out[2]}x{out[3]} is not a plain pool")
        kernel = (h // out[2], w // out[3])
        return self.avgpool(x, out, name, kernel, kernel, 0, False, True, None)

    def batchnorm(self, x, out, name, module: nn.BatchNorm2d) -> int:
        """As torch's BatchNorm2d: batch statistics in training (and always without running
        statistics), the running ones in eval; running statistics updated in training."""
        if len(self.g.values[x].shape) != 4:
            raise Unsupported(f"{name}: BatchNorm2d on a {len(self.g.values[x].shape)}-D input")
        tracked = module.track_running_stats and module.running_mean is not None
        batch_stats = (self.training and module.training) or not tracked
        params = [self.param(module.weight, name + ".weight"), self.param(module.bias, name + ".bias")] \
            if module.affine else []
        buffers = [self.buffer(module.running_mean, name + ".running_mean"),
                   self.buffer(module.running_var, name + ".running_var")] if tracked else []
        value = self.op("batchnorm", [x], out, name, params=params, buffers=buffers, eps=float(module.eps),
                        affine=module.affine, batch_stats=batch_stats, update=batch_stats and tracked)
        if batch_stats and tracked:
            self.batchnorms.append((self.g.ops[-1], module))
        return value

    def dropout(self, x, out, name, p: float, active: bool) -> int:
        if not active or p == 0:
            return self.reshape(x, out, name)
        value = self.op("dropout", [x], out, name, p=float(p))
        self.dropouts.append((self.g.ops[-1], float(p)))
        return value

    def reshape(self, x: int, out: tuple[int, ...], name: str) -> int:
        if out[0] != self.g.values[x].shape[0] or math.prod(out) != math.prod(self.g.values[x].shape):
            raise Unsupported(f"{name}: a reshape to {out} does not keep the batch axis")
        return self.op("reshape", [x], out, name)

    # ------------------------------------------------------------------ functions and methods

    def call(self, node: fx.Node) -> int:
        if node.op == "call_module":
            return self.module(node, self.gm.get_submodule(node.target), self.values[node.args[0]])
        kind = FUNCTIONS.get(node.target) if node.op == "call_function" else METHODS.get(node.target)
        out, name = self.shape(node), node.name
        x = self.values.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if kind == "relu":
            return self.op("relu", [x], out, name)
        if kind == "gelu":
            return self.op("gelu", [x], out, name, approximate=_arg(node, 1, "approximate", "none"))
        if kind in ("flatten", "reshape"):
            return self.reshape(x, out, name)
        if kind == "add":
            other = _arg(node, 1, "other")
            if not isinstance(other, fx.Node) or _arg(node, 2, "alpha", 1) != 1 or \
                    self.shape(node.args[0]) != self.shape(other) or self.shape(other) != out:
                raise Unsupported(f"{name}: only the add of two tensors of one shape is lowered")
            return self.op("add", [x, self.values[other]], out, name)
        if kind == "cat":
            tensors = node.args[0]
            dim = _arg(node, 1, "dim", 0)
            dim = dim % len(out)
            if dim == 0:
                raise Unsupported(f"{name}: a concatenation along the batch axis")
            return self.op("cat", [self.values[t] for t in tensors], out, name, dim=dim)
        if kind == "maxpool":
            if _arg(node, 6, "return_indices", False):
                raise Unsupported(f"{name}: max_pool2d with return_indices")
            kernel = _arg(node, 1, "kernel_size")
            return self.maxpool(x, out, name, kernel, _arg(node, 2, "stride") or kernel, _arg(node, 3, "padding", 0),
                                _arg(node, 4, "dilation", 1), _arg(node, 5, "ceil_mode", False))
        if kind == "avgpool":
            kernel = _arg(node, 1, "kernel_size")
            return self.avgpool(x, out, name, kernel, _arg(node, 2, "stride") or kernel, _arg(node, 3, "padding", 0),
                                _arg(node, 4, "ceil_mode", False), _arg(node, 5, "count_include_pad", True),
                                _arg(node, 6, "divisor_override"))
        if kind == "adaptive_avgpool":
            return self.adaptive_avgpool(x, out, name, _arg(node, 1, "output_size"))
        if kind == "dropout":
            return self.dropout(x, out, name, _arg(node, 1, "p", 0.5), bool(_arg(node, 2, "training", True)))
        raise Unsupported(f"{name}: {node.op} {node.target}")


def _np_dtype(dtype: torch.dtype):
    import numpy as np
    return {torch.float32: np.float32, torch.float64: np.float64}.get(dtype) or \
        (_ for _ in ()).throw(Unsupported(f"dtype {dtype}: lotus_rt's graph takes float32 or float64"))


def region_graph(gm: fx.GraphModule, region: Region, meta: dict, training: bool) -> RegionGraph:
    """The region as a Graph for these node shapes; raises Unsupported naming what cannot be lowered."""
    b = _Builder(gm, meta, training)
    batch = None
    for node in region.inputs:
        shape, dtype = meta[node] if meta.get(node) else (None, None)
        if shape is None or len(shape) < 2:
            raise Unsupported(f"region input {node.name} is not a batch of samples")
        batch = shape[0] if batch is None else batch
        if shape[0] != batch:
            raise Unsupported(f"region inputs of different batch sizes ({batch}, {shape[0]})")
        b.values[node] = b.g.value(shape, _np_dtype(dtype), node.name)
        b.g.inputs.append(b.values[node])
    for node in region.nodes:
        b.values[node] = b.call(node)
        if b.g.values[b.values[node]].shape[0] != batch:
            raise Unsupported(f"{node.name}: its output is not a batch of {batch} samples")
    b.g.outputs = [b.values[n] for n in region.outputs]
    dtypes = {v.dtype for v in b.g.values} | {p.dtype for p in b.g.params}
    if len(dtypes) > 1:
        raise Unsupported(f"the region mixes dtypes {sorted(str(d) for d in dtypes)}")
    return RegionGraph(b.g, b.params, b.buffers, b.batchnorms, b.dropouts)


Call = Callable[..., Any]
