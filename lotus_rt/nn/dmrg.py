"""DMRG for TT layers: an optimiser that updates two merged cores of a TTLinear at a time.

Algorithm and state. Each ``TTLinear`` (cores G_j of shape (r_j, in_j, out_j, r_{j+1})) is kept
in mixed-canonical form around a bond (k, k+1): cores left of k are left-orthonormal, cores
right of k+1 right-orthonormal (set up by QR sweeps when the optimiser is built; the layer's
function does not change). Then the weight W is an isometric image of the merged bond tensor
B = G_k G_{k+1}, so a gradient step on B is a step of the same length on W. ``step()``:

1. the gradient of the loss with respect to B, from the layer's input x and output gradient g
   of the last forward/backward (captured by hooks): dL/dB = sum_z x_z (x) g_z contracted with
   every other core, one einsum run as a task DAG on the runtime (``lotus_rt.einsum``);
2. B <- B - lr dL/dB;
3. B is split back by a truncated SVD of the (r_k i o) x (i' o' r_k+2) matrix (an
   ``mps_svd_split_matrix`` task: unpadded, so the SVD costs what the bond does), the rank r_{k+1}
   adapting to ``max_rank`` and ``cutoff``; the orthonormal factor stays behind, the centre moves on;
4. the sweep position moves one bond (right to the last bond, then left, and so on).

The other parameters (biases, layers that are not TT) are left to ``others``, a torch optimiser
(Adam in ``make_optimizer``). When a rank changes, the two cores it joins become new
``nn.Parameter`` objects (autograd fixes a leaf's shape), so no other optimiser may hold them.

In a model offloaded whole (``lotus_rt.offload``), the swept layers run as their own task DAGs
between the graph's regions (``TTLinear.own_task_dag``, set here), where the hooks see their
input and output gradient and new cores are picked up at the next call; the rest of the step
stays one graph. ``make_optimizer`` captures an already offloaded model again for that.

    >>> opt = make_optimizer("dmrg", model, lr=0.05)                  # doctest: +SKIP
    >>> opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()  # doctest: +SKIP
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from lotus_rt import tn
from lotus_rt.mps import codelets
from lotus_rt.nn import whole_model
from lotus_rt.nn.convert import offload
from lotus_rt.nn.modules import TTLinear

OPTIMIZERS = ("adam", "dmrg")


@dataclass
class _LayerState:
    layer: TTLinear
    bond: int = 0
    direction: str = "right"
    captured: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)


def _set_core(layer: TTLinear, j: int, value: np.ndarray) -> None:
    param = layer.cores[j]
    new = torch.from_numpy(np.ascontiguousarray(value)).to(param.dtype)
    if tuple(new.shape) == tuple(param.shape):
        param.data = new
        param.grad = None
    else:  # autograd keeps a leaf's shape in its gradient accumulator: a new shape needs a new leaf
        layer.cores[j] = torch.nn.Parameter(new, requires_grad=param.requires_grad)


def _ranks(layer: TTLinear) -> tuple[int, ...]:
    return (1,) + tuple(int(c.shape[3]) for c in layer.cores)


def canonicalize(layer: TTLinear, center: int) -> None:
    """Mixed-canonical form around core ``center`` (QR from both ends); W does not change."""
    cores = [c.detach().cpu().double().numpy().copy() for c in layer.cores]
    for j in range(center):
        r0, i, o, r1 = cores[j].shape
        q, r = np.linalg.qr(cores[j].reshape(r0 * i * o, r1))
        cores[j] = q.reshape(r0, i, o, q.shape[1])
        cores[j + 1] = np.einsum("ab,bior->aior", r, cores[j + 1])
    for j in range(len(cores) - 1, center, -1):
        r0, i, o, r1 = cores[j].shape
        q, r = np.linalg.qr(cores[j].reshape(r0, i * o * r1).T)
        cores[j] = q.T.reshape(q.shape[1], i, o, r1)
        cores[j - 1] = np.einsum("aiob,cb->aioc", cores[j - 1], r)
    for j, c in enumerate(cores):
        _set_core(layer, j, c)
    layer.ranks = _ranks(layer)


def bond_gradient_equation(d: int, k: int) -> str:
    """einsum of dL/dB for bond (k, k+1) of a d-core TT: x, g, then every other core (the
    outer rank indices r_0 and r_d, of size 1, are dropped: cores 0 and d-1 come squeezed)."""
    letters = iter(string.ascii_letters)
    z = next(letters)
    ins = [next(letters) for _ in range(d)]
    outs = [next(letters) for _ in range(d)]
    ranks = [next(letters) for _ in range(d + 1)]
    ranks[0] = ranks[d] = ""
    terms = [z + "".join(ins), z + "".join(outs)]
    terms += [ranks[j] + ins[j] + outs[j] + ranks[j + 1] for j in range(d) if j not in (k, k + 1)]
    out = ranks[k] + ins[k] + outs[k] + ins[k + 1] + outs[k + 1] + ranks[k + 2]
    return ",".join(terms) + "->" + out


class DMRGOptimizer:
    """Two-site DMRG sweeps over the cores of TTLinear layers (see the module docstring).

    layers: a TTLinear or several; lr: step length on the merged bond tensor; max_rank: cap of
    every TT rank (default: each layer's largest rank when the optimiser is built); cutoff:
    discarded-weight fraction allowed in each SVD; others: a torch optimiser for every other
    parameter (stepped and zeroed with this one), or None.
    """

    def __init__(self, layers: TTLinear | Iterable[TTLinear], lr: float = 0.05, max_rank: int | None = None,
                 cutoff: float = 1e-8, others: torch.optim.Optimizer | None = None, runtime: Any = None):
        layers = [layers] if isinstance(layers, TTLinear) else list(layers)
        if not layers or not all(isinstance(m, TTLinear) for m in layers):
            raise ValueError("DMRGOptimizer needs one or more TTLinear layers")
        if any(len(m.cores) < 2 for m in layers):
            raise ValueError("DMRGOptimizer needs TTLinear layers with at least two cores")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr={lr!r} must be a positive number")
        if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
            raise ValueError(f"max_rank={max_rank!r} must be a positive integer or None")
        if not (isinstance(cutoff, (int, float)) and 0 <= cutoff < 1):
            raise ValueError(f"cutoff={cutoff!r} must be in [0, 1)")
        self.lr, self.cutoff, self.others = float(lr), float(cutoff), others
        self.max_rank = max_rank
        self._runtime = runtime
        self._states = []
        for layer in layers:
            layer.own_task_dag = True  # an offloaded whole model runs it between regions, where hooks see it
            canonicalize(layer, 0)
            state = _LayerState(layer)
            state.hooks.append(layer.register_forward_hook(self._capture(state)))
            self._states.append(state)
        self.steps = 0

    @staticmethod
    def _capture(state: _LayerState):
        def hook(module, inputs, output):
            if torch.is_grad_enabled() and output.requires_grad:
                x = inputs[0].detach()
                output.register_hook(lambda g: state.captured.append((x, g.detach())))
        return hook

    @property
    def layers(self) -> list[TTLinear]:
        return [s.layer for s in self._states]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for s in self._states:
            s.captured.clear()
            for p in s.layer.cores:
                p.grad = None
        if self.others is not None:
            self.others.zero_grad(set_to_none=set_to_none)

    def remove_hooks(self) -> None:
        for s in self._states:
            for h in s.hooks:
                h.remove()
            s.hooks.clear()

    def step(self, closure: Any = None) -> Any:
        """One bond update per layer (from the gradients of the last backward), then ``others``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for s in self._states:
            if not s.captured and any(p.grad is not None for p in s.layer.cores):
                raise RuntimeError(
                    "DMRGOptimizer: a TTLinear got gradients but its input and output gradient were not seen: it "
                    "ran inside a whole-model task graph captured before this optimiser was built. Build it with "
                    "lotus_rt.nn.dmrg.make_optimizer(\"dmrg\", model, lr), or before lotus_rt.offload(model)")
            if s.captured:
                self._update(s)
            s.captured.clear()
        if self.others is not None:
            self.others.step()
        self.steps += 1
        return loss

    def _rt(self) -> Any:
        from lotus_rt.runtime import runtime
        return self._runtime if self._runtime is not None else runtime()

    def _update(self, s: _LayerState) -> None:
        layer, k = s.layer, s.bond
        d = len(layer.cores)
        cores = [c.detach().cpu().numpy() for c in layer.cores]
        dtype = cores[0].dtype
        x = torch.cat([c[0] for c in s.captured]).reshape((-1,) + layer.in_shape).cpu().numpy().astype(dtype)
        g = torch.cat([c[1] for c in s.captured]).reshape((-1,) + layer.out_shape).cpu().numpy().astype(dtype)
        others = [cores[j][0] if j == 0 else cores[j][..., 0] if j == d - 1 else cores[j]
                  for j in range(d) if j not in (k, k + 1)]
        grad = tn.einsum(bond_gradient_equation(d, k), np.ascontiguousarray(x), np.ascontiguousarray(g),
                         *[np.ascontiguousarray(c) for c in others])
        r_left, r_right = cores[k].shape[0], cores[k + 1].shape[3]
        bond = np.einsum("aiob,bjpc->aiojpc", cores[k], cores[k + 1])
        bond -= self.lr * grad.reshape(bond.shape)
        left, right = self._split(bond, s.direction, self.max_rank or max(layer.ranks))
        _set_core(layer, k, left.reshape(r_left, layer.in_shape[k], layer.out_shape[k], -1))
        _set_core(layer, k + 1, right.reshape(-1, layer.in_shape[k + 1], layer.out_shape[k + 1], r_right))
        layer.ranks = _ranks(layer)
        # move on; at either end turn round on the same bond (its centre is on the right core)
        if s.direction == "right":
            s.bond, s.direction = (k + 1, "right") if k + 1 <= d - 2 else (k, "left")
        else:
            s.bond, s.direction = (k - 1, "left") if k >= 1 else (k, "right")

    def _split(self, bond: np.ndarray, direction: str, max_rank: int) -> tuple[np.ndarray, np.ndarray]:
        """Truncated SVD of B (r_k, i, o, i', o', r_k+2) as (r_k i o) x (i' o' r_k+2), one
        ``mps_svd_split_matrix`` task; returns the two factors as (r_k * i * o, rank) and
        (rank, i' * o' * r_k+2)."""
        r_left, i, o, i2, o2, r_right = bond.shape
        matrix = np.ascontiguousarray(bond.reshape(r_left * i * o, i2 * o2 * r_right))
        cap = min(max_rank, *matrix.shape)
        left = np.zeros((matrix.shape[0], cap), dtype=bond.dtype)
        right = np.zeros((cap, matrix.shape[1]), dtype=bond.dtype)
        info = np.zeros(3)
        rt = self._rt()
        handles = [rt.register(a) for a in (matrix, left, right, info)]
        try:
            rt.submit(codelets.SPLIT_MATRIX, (handles[0], "R"), (handles[1], "W"), (handles[2], "W"),
                      (handles[3], "W"), name="tt_dmrg.svd", direction=direction, max_rank=max_rank,
                      cutoff=self.cutoff)
            rt.wait()
        finally:
            for h in handles:
                h.unregister()
        rank = int(info[0])
        return left[:, :rank].copy(), right[:rank].copy()


def make_optimizer(name: str, model: torch.nn.Module, lr: float, **kwargs: Any) -> Any:
    """The optimiser ``lotus-rt train --optimizer NAME`` uses.

    "adam": torch.optim.Adam(model.parameters(), lr). "dmrg": DMRGOptimizer over every TTLinear of
    ``model`` with step ``lr`` (``max_rank``, ``cutoff`` passed on), and Adam (``adam_lr``, default
    1e-3) for every other parameter. Both have zero_grad() and step(). A model offloaded whole is
    captured again so that its TT layers run as their own task DAGs between the graph's regions
    (the rest of the step stays one graph).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not valid; valid values: {', '.join(OPTIMIZERS)}")
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    layers = [m for m in model.modules() if isinstance(m, TTLinear)]
    if not layers:
        raise ValueError("optimizer 'dmrg' needs a model with at least one TTLinear layer (tensorize it first)")
    tt_params = {id(p) for m in layers for p in m.cores}
    rest = [p for p in model.parameters() if id(p) not in tt_params and p.requires_grad]
    adam_lr = kwargs.pop("adam_lr", 1e-3)
    others = torch.optim.Adam(rest, lr=adam_lr) if rest else None
    optimizer = DMRGOptimizer(layers, lr=lr, others=others, **kwargs)
    if "_lotus_whole" in model.__dict__:  # offloaded whole: capture again, the TT layers now between regions
        whole_model.detach(model)
        offload(model)
    return optimizer
