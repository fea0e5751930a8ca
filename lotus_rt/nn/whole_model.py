"""Run a captured model's regions as task graphs: one autograd Function per region.

``WholeModel(model)`` traces the model once (``capture.trace``) and becomes its ``forward``.
At each call it runs the partition in order: a torch node as torch would, a region through
``RegionFunction``, which hands torch one op for the whole region. Per region and per key
(input shapes, dtype, train/eval, which tensors need gradients) it keeps ``Program``s: the
graph lowered once and recorded as step plans, replayed at every later step. A program that
kept a forward for a pending backward is not reused until that backward ran (or its autograd
graph was freed), so two forwards before one backward each get their own buffers.

Torch-side state is kept as torch does: batch norm's ``num_batches_tracked`` is incremented
here and its running statistics are updated in place by the graph's tasks (on the module's own
buffers); dropout masks are drawn here with torch's generator, exactly as ``F.dropout`` draws
them (``bernoulli_(1 - p)`` then ``/ (1 - p)``), in the model's order, so a seeded run draws the
same masks as torch eager.
"""
from __future__ import annotations

import collections
import threading
import warnings
import weakref
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from lotus_rt.graph.fuse import fuse_relu
from lotus_rt.graph.program import Program, tile_count, tile_ranges
from lotus_rt.nn import capture
from lotus_rt.runtime import runtime

# Batch tiles per CPU worker of the runtime. One tile per worker measured fastest on 2 CPU
# workers (demo, batch 64: 24.1 ms per step at 1, 29.7 at 2, 36.4 at 3): torch's kernels on
# smaller tiles lose more than the overlap between layers gains.
TILES_PER_WORKER = 1
# Keys (input shape, mode, gradient flags) whose programs a region keeps: each holds its buffers.
MAX_KEYS = 8


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A host NumPy view (zero copy) of a CPU tensor; a host copy of a CUDA one."""
    return tensor.detach().cpu().numpy()


def _registrable(tensor: torch.Tensor) -> Any:
    """What the runtime registers for a parameter or state buffer: a NumPy view of a CPU tensor,
    the CUDA tensor itself (registered on its GPU, zero copy)."""
    return tensor.detach() if tensor.is_cuda else tensor.detach().numpy()


class _Held:
    """A program holding one forward's buffers for its backward. It goes back to its pool after
    the backward ran, or when the autograd graph is freed without one; a later backward through
    the same graph (retain_graph) still works unless another forward has used the program since."""

    def __init__(self, pool: "_Pool", program: Program):
        self.pool, self.program = pool, program
        self.generation = program.generation
        self.returned = False

    def check(self) -> None:
        if self.program.generation != self.generation:
            raise RuntimeError("lotus_rt: a second backward through an offloaded region after another forward "
                               "reused its buffers; run the forward again instead of retain_graph=True")

    def give_back(self) -> None:
        if not self.returned:
            self.returned = True
            self.pool.give_back(self.program)

    def __del__(self):
        self.give_back()


class _Pool:
    """The programs of one region and key: one per forward whose backward is still pending."""

    def __init__(self):
        self.free: list[Program] = []
        self.lock = threading.Lock()

    def take(self) -> Program | None:
        with self.lock:
            return self.free.pop() if self.free else None

    def give_back(self, program: Program) -> None:
        with self.lock:
            if program not in self.free:
                self.free.append(program)


class RegionFunction(torch.autograd.Function):
    """One region: forward and backward run as the region's two step plans."""

    @staticmethod
    def forward(ctx: Any, region: "RegionRunner", key: tuple, *tensors: torch.Tensor):
        n_in = len(region.region.inputs)
        outputs, program, pool = region.run_forward(key, tensors[:n_in], tensors[n_in:])
        ctx.held = _Held(pool, program) if program.with_backward else None
        if not program.with_backward:
            pool.give_back(program)
        ctx.n_in, ctx.region = n_in, region
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor):
        if ctx.held is None:
            raise RuntimeError("lotus_rt: this region's forward kept no state for a backward")
        ctx.held.check()
        program = ctx.held.program
        input_grads, param_grads = program.backward([None if g is None else _array(g.contiguous()) for g in grads])
        ctx.held.give_back()  # its buffers are free for the next forward (a loss kept alive keeps no program)
        wrap = ctx.region.wrap
        return (None, None, *[wrap(g) for g in input_grads], *[wrap(g) for g in param_grads])


class RegionRunner:
    """A region's graphs and programs per key, and the call that runs it."""

    def __init__(self, gm: fx.GraphModule, region: capture.Region):
        self.gm, self.region = gm, region
        self.pools: collections.OrderedDict[tuple, _Pool] = collections.OrderedDict()
        self.graphs: dict[tuple, capture.RegionGraph] = {}
        self.device = torch.device("cpu")
        self.on_backward: Any = None  # given to every program (Program.on_backward)

    def wrap(self, array: np.ndarray | None) -> torch.Tensor | None:
        return None if array is None else torch.from_numpy(array).to(self.device)

    def region_graph(self, meta: dict, meta_key: tuple, training: bool) -> capture.RegionGraph:
        key = (meta_key, training)
        if key not in self.graphs:
            rg = capture.region_graph(self.gm, self.region, meta, training)
            fuse_relu(rg.graph)
            self.graphs[key] = rg
        return self.graphs[key]

    def __call__(self, inputs: list[torch.Tensor], meta: dict, meta_key: tuple) -> list[torch.Tensor]:
        training = self.gm.training
        rg = self.region_graph(meta, meta_key, training)
        grad_on = torch.is_grad_enabled()
        input_grads = tuple(grad_on and t.requires_grad for t in inputs)
        param_grads = tuple(grad_on and p.requires_grad for p in rg.params)
        key = (meta_key, training, input_grads, param_grads)
        self.device = inputs[0].device
        return list(RegionFunction.apply(self, key, *inputs, *rg.params))

    def run_forward(self, key: tuple, inputs: tuple[torch.Tensor, ...], params: tuple[torch.Tensor, ...]):
        meta_key, training, input_grads, param_grads = key
        rg = self.graphs[(meta_key, training)]
        for param, wanted in zip(rg.graph.params, param_grads):
            param.requires_grad = wanted  # what this program computes gradients for
        for p in params:
            if not p.is_contiguous():  # registered zero copy: a contiguous copy becomes the parameter's data
                with torch.no_grad():
                    p.data = p.data.contiguous()
        param_arrays = [_registrable(p) for p in params]
        buffer_arrays = [_registrable(b) for b in rg.buffers]
        pool = self._pool(key)
        program = pool.take()
        if program is not None and not program.matches(param_arrays, buffer_arrays):
            program.release()  # the parameters moved (replaced or re-allocated): lower again
            program = None
        if program is None:
            batch = inputs[0].shape[0]
            nworkers = len(runtime().workers)
            tiles = tile_ranges(batch, tile_count(rg.graph, batch, nworkers, TILES_PER_WORKER), runtime().settings.tile)
            program = Program(rg.graph, batch, param_arrays, buffer_arrays, training, list(input_grads), tiles)
        program.on_backward = self.on_backward
        masks = self._dropout_masks(rg, inputs[0].dtype)
        factors = self._batchnorm_factors(rg)
        outputs = program.forward([_array(x.contiguous()) for x in inputs], masks, factors)
        return [self.wrap(o) for o in outputs], program, pool

    def _pool(self, key: tuple) -> _Pool:
        """The key's pool, most recently used last; past MAX_KEYS keys (input shapes, modes) the
        least recently used one's idle programs are freed."""
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = _Pool()
            while len(self.pools) > MAX_KEYS:
                _, old = self.pools.popitem(last=False)
                for program in old.free:
                    program.release()
        self.pools.move_to_end(key)
        return pool

    def _dropout_masks(self, rg: capture.RegionGraph, dtype: torch.dtype) -> dict[int, np.ndarray]:
        masks = {}
        for op, p in rg.dropouts:
            noise = torch.empty(rg.graph.values[op.output].shape, dtype=dtype)
            noise.bernoulli_(1 - p)
            if p < 1:
                noise.div_(1 - p)
            masks[id(op)] = noise.numpy()
        return masks

    def _batchnorm_factors(self, rg: capture.RegionGraph) -> dict[int, float]:
        factors = {}
        for op, module in rg.batchnorms:
            module.num_batches_tracked.add_(1)
            factors[id(op)] = (1.0 / float(module.num_batches_tracked) if module.momentum is None
                                                else float(module.momentum))
        return factors

    def release(self) -> None:
        for pool in self.pools.values():
            for program in pool.free:
                program.release()
        self.pools.clear()


class WholeModel:
    """The forward of an offloaded model: its regions as task graphs, the rest in torch."""

    def __init__(self, model: nn.Module):
        self.gm = capture.trace(model)
        self.partition = capture.partition(self.gm)
        self.runners = {id(step): RegionRunner(self.gm, step) for step in self.partition.steps
                        if isinstance(step, capture.Region)}
        self.metas: dict[tuple, dict] = {}
        self.fallback: dict[int, str] = {}  # region -> why it runs in torch (for its shapes)

    @property
    def kept(self) -> list[str]:
        return list(self.partition.kept) + sorted(set(self.fallback.values()))

    def torch_modules(self) -> list[nn.Module]:
        """The modules that run in torch (between regions): their layers are offloaded one by one."""
        return [self.gm.get_submodule(step.target) for step in self.partition.steps
                if isinstance(step, fx.Node) and step.op == "call_module"]

    def region_modules(self) -> list[str]:
        """The modules the regions run as task graphs, by name."""
        single = getattr(self.gm, "lotus_single_layer", False)
        return ["" if single else node.target for step in self.partition.steps if isinstance(step, capture.Region)
                for node in step.nodes if node.op == "call_module"]

    def _meta(self, args: tuple) -> tuple[tuple, dict]:
        key = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else repr(a) for a in args)
        if key not in self.metas:
            self.metas[key] = capture.node_meta(self.gm, args)
        return key, self.metas[key]

    def __call__(self, *args: Any) -> Any:
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            self.gm.training = owner.training  # the flag only: each module keeps its own mode
        self._check_devices(args)
        meta_key, meta = self._meta(args)
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, args):
            env[node] = value
        for node in self.gm.graph.nodes:  # sizes come from the shapes, not from tensors
            if capture.is_shape_node(node):
                env[node] = _shape_value(node, env, meta)
        for step in self.partition.steps:
            if isinstance(step, capture.Region):
                self._run_region(step, env, meta, meta_key)
            else:
                self._run_torch_nodes([step], env)
        (output,) = [n for n in self.gm.graph.nodes if n.op == "output"]
        return fx.node.map_arg(output.args[0], lambda n: env[n])

    _owner: Any = None

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copy of the model captures itself at its first call: buffers are never shared

    def __reduce__(self):
        raise TypeError("a model offloaded by lotus_rt cannot be pickled whole: save model.state_dict() "
                        "and offload the reloaded model again")

    def _check_devices(self, args: tuple) -> None:
        """One clear error for inputs the graph cannot take, before anything runs. A model on a
        CUDA device runs on a runtime with CUDA workers: its parameters and state are registered
        on the GPU, the activations in host buffers StarPU moves (not yet run on a GPU)."""
        rt = runtime()
        for a in args:
            if not isinstance(a, torch.Tensor):
                continue
            if a.device.type == "cuda" and not any(kind == "cuda" for kind, _ in rt.workers):
                raise ValueError("lotus_rt.offload: the input is on a CUDA device but the runtime has no CUDA "
                                 f"worker (engine {rt.engine!r}, workers {sorted({k for k, _ in rt.workers})}): move "
                                 "the model and its inputs to the CPU, or run a CUDA-enabled StarPU with STARPU_NCUDA >= 1")
            if a.device.type not in ("cpu", "cuda"):
                raise ValueError(f"the input is on {a.device.type}: offloaded layers take CPU tensors")
            if a.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"the input has dtype {a.dtype}; offloaded layers take float32 or float64")

    def _run_region(self, region: capture.Region, env: dict, meta: dict, meta_key: tuple) -> None:
        runner = self.runners[id(region)]
        inputs = [env[n] for n in region.inputs]
        if id(region) not in self.fallback:
            try:
                outputs = runner(inputs, meta, meta_key)
            except capture.Unsupported as exc:
                self.fallback[id(region)] = f"a region ({exc})"
                warnings.warn(f"lotus_rt.offload: this part of the model runs in torch: {exc}", RuntimeWarning,
                              stacklevel=4)
            else:
                for node, value in zip(region.outputs, outputs):
                    env[node] = value
                return
        self._run_torch_nodes(region.nodes, env)

    def _run_torch_nodes(self, nodes: list[fx.Node], env: dict) -> None:
        for node in nodes:
            if node in env:
                continue
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            if node.op == "call_module":
                module = self.gm.get_submodule(node.target)
                base = getattr(type(module), "_lotus_base", None)  # the offloaded layer itself: its own forward
                env[node] = base.forward(module, *args, **kwargs) if base is not None else module(*args, **kwargs)
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "get_attr":
                env[node] = _get_attr(self.gm, node.target)

    def release(self) -> None:
        for runner in self.runners.values():
            runner.release()


def _get_attr(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _shape_value(node: fx.Node, env: dict, meta: dict) -> Any:
    """x.size(), x.size(k), x.dim() or an item of a size, from the recorded shapes."""
    if node.op == "call_method":
        shape = meta[node.args[0]][0]
        if node.target == "dim":
            return len(shape)
        k = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return torch.Size(shape) if k is None else shape[k]
    return env[node.args[0]][node.args[1]]


_CLASSES: dict[type, type] = {}


def _offloaded_class(cls: type) -> type:
    """A subclass of ``cls`` whose forward runs the whole-model graph (one per class)."""
    if cls not in _CLASSES:
        def forward(self: nn.Module, *args: Any) -> Any:
            whole = self.__dict__.get("_lotus_whole")
            if whole is None:  # first call, or a deep copy of an offloaded model: capture this one
                whole = self.__dict__["_lotus_whole"] = _capture(self)
            return whole(*args)

        _CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                    "__qualname__": cls.__qualname__, "_lotus_base": cls})
    return _CLASSES[cls]


def _capture(model: nn.Module) -> WholeModel:
    swapped = type(model)
    model.__class__ = swapped._lotus_base  # trace the model's own forward
    try:
        whole = WholeModel(model)
    finally:
        model.__class__ = swapped
    whole._owner = weakref.ref(model)
    return whole


def attach(model: nn.Module) -> WholeModel:
    """Make ``model``'s forward the whole-model graph (in place, by switching its class to a
    subclass, as offload does for single layers); returns the captured WholeModel."""
    whole = WholeModel(model)  # raises here when the model cannot be traced
    whole._owner = weakref.ref(model)
    model.__class__ = _offloaded_class(type(model))
    model.__dict__["_lotus_whole"] = whole
    return whole


def detach(model: nn.Module) -> None:
    """Give ``model`` its own class and forward back, and free its programs."""
    base = getattr(type(model), "_lotus_base", None)
    if base is None:
        return
    model.__class__ = base
    whole = model.__dict__.pop("_lotus_whole", None)
    if whole is not None:
        whole.release()
