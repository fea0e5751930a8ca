"""Whole models: ``tensorize`` swaps dense layers for factorized ones, ``offload`` runs them
as task DAGs.

``tensorize(model, rank=..., conv="tucker2"|"cp", linear="tt", skip=...)`` replaces every
nn.Conv2d (except 1x1 convolutions and the model's first convolution, unless
``include_first=True``) and every nn.Linear whose sizes factor into ``linear_factors`` parts,
by decomposing the trained weights; it returns the model and keeps a per-layer report in
``model.lotus_report`` (params before/after, relative reconstruction error).

``offload(model)`` captures the model with torch.fx and runs each stretch of supported layers
(convolutions dense or tensorized, linear and TT layers, activations, pooling, batch norm,
dropout, residual adds, concatenations) as one task graph per pass over batch tiles
(``lotus_rt.nn.whole_model``); parameters and state_dict keys stay the same. What it cannot
capture stays in torch, named once in a warning, with its layers offloaded one by one: the
tensorized layers switched to their runtime path, dense nn.Linear / nn.Conv2d turned into their
offloaded twins by changing their class in place.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable

from torch import nn

from lotus_rt.nn.group import GROUP_LAYERS
from lotus_rt.nn.modules import (CPConv2d, OffloadedConv2d, OffloadedLinear, TTLinear, TuckerConv2d,
                                 _FactorizedConv2d)

TENSORIZED = (TTLinear, TuckerConv2d, CPConv2d, *GROUP_LAYERS)  # GROUP_LAYERS: views of a tensorize_group network


@dataclass(frozen=True)
class LayerReport:
    name: str
    kind: str
    params_before: int
    params_after: int
    error: float

    def row(self) -> str:
        return (f"{self.name:<20} {self.kind:<14} {self.params_before:>10} {self.params_after:>10} "
                f"{self.params_before / max(self.params_after, 1):>7.1f}x {self.error:>9.4f}")


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def balanced_factors(n: int, parts: int) -> tuple[int, ...]:
    """Split n into ``parts`` integer factors as equal as possible (1s allowed), largest first."""
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    factors = [1] * parts
    for prime in sorted(primes, reverse=True):
        factors[factors.index(min(factors))] *= prime
    return tuple(sorted(factors, reverse=True))


def _named_children_recursive(model: nn.Module):
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            yield module, (f"{name}.{child_name}" if name else child_name), child_name, child


def tensorize(model: nn.Module, rank=0.25, conv: str = "tucker2", linear: str = "tt",
              skip: Iterable[str] = (), include_first: bool = False, linear_factors: int = 3,
              verbose: bool = True) -> nn.Module:
    """Replace dense layers by decomposed tensorized ones (see the module docstring)."""
    if conv not in ("tucker2", "cp"):
        raise ValueError(f"tensorize: conv={conv!r} is not valid; valid values: 'tucker2', 'cp'")
    if linear not in ("tt", None):
        raise ValueError(f"tensorize: linear={linear!r} is not valid; valid values: 'tt', None")
    skip = set(skip)
    report: list[LayerReport] = []
    first_conv = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    for parent, full_name, child_name, child in list(_named_children_recursive(model)):
        if full_name in skip or isinstance(child, TENSORIZED):
            continue
        if isinstance(child, nn.Conv2d):
            if child.kernel_size == (1, 1) or (full_name == first_conv and not include_first):
                continue
            layer = (TuckerConv2d.from_conv(child, rank) if conv == "tucker2" else CPConv2d.from_conv(child, rank))
        elif isinstance(child, nn.Linear) and linear == "tt":
            in_shape = balanced_factors(child.in_features, linear_factors)
            out_shape = balanced_factors(child.out_features, linear_factors)
            layer = TTLinear.from_linear(child, in_shape, out_shape, rank)
        else:
            continue
        setattr(parent, child_name, layer)
        report.append(LayerReport(full_name, type(layer).__name__, _params(child), _params(layer),
                                  float(layer.reconstruction_error)))
    model.lotus_report = report
    if verbose and report:
        print(f"{'layer':<20} {'kind':<14} {'params':>10} {'after':>10} {'ratio':>8} {'w.err':>9}")
        for row in report:
            print(row.row())
        before = sum(r.params_before for r in report)
        after = sum(r.params_after for r in report)
        print(f"{'tensorized layers':<35} {before:>10} {after:>10} {before / max(after, 1):>7.1f}x")
        print("w.err: relative error of each layer's weight as the decomposition rebuilds it, "
              "||W - W~|| / ||W||, before any fine-tuning (a large value is expected at high "
              "compression; fine-tuning recovers the accuracy)")
    return model


def offload(model: nn.Module, whole_model: bool = True) -> nn.Module:
    """Run the model on the runtime; returns the model (changed in place).

    ``whole_model`` (the default): the model is captured with torch.fx and each run of
    supported layers becomes one task graph per pass over batch tiles (``nn.whole_model``);
    what cannot be captured or lowered stays in torch, its layers offloaded one by one, and is
    named once in a warning. ``whole_model=False``, or a model torch.fx cannot trace: every
    supported layer runs as its own task DAG behind its own autograd Function."""
    if whole_model:
        from lotus_rt.nn import whole_model as wm
        try:
            whole = wm.attach(model)
        except Exception as exc:  # noqa: BLE001 - torch.fx raises many kinds of error on untraceable code
            warnings.warn(f"lotus_rt.offload: torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: "
                          f"{exc}); its layers are offloaded one by one instead", RuntimeWarning, stacklevel=2)
        else:
            for node in whole.torch_modules():
                _offload_layers(node, warn=False)
            if whole.kept:
                warnings.warn("lotus_rt.offload: these parts of the model run in torch: " + "; ".join(whole.kept),
                              RuntimeWarning, stacklevel=2)
            return model
    _offload_layers(model, warn=True)
    return model


def _offload_layers(model: nn.Module, warn: bool) -> None:
    """Each supported layer of ``model`` runs as its own task DAG (the per-layer path)."""
    kept = []
    for name, module in model.named_modules():
        if isinstance(module, TENSORIZED):
            module.offloaded = True
        elif type(module) is nn.Linear:
            module.__class__ = OffloadedLinear
        elif type(module) is nn.Conv2d:
            if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
                kept.append(f"{name} (Conv2d groups={module.groups}, padding={module.padding!r}, "
                            f"padding_mode={module.padding_mode!r})")
            else:
                module.__class__ = OffloadedConv2d
    if kept and warn:
        warnings.warn("lotus_rt.offload: these layers stay in torch: " + "; ".join(kept), RuntimeWarning,
                      stacklevel=3)


def offloaded_layers(model: nn.Module) -> list[str]:
    """Names of the layers that run on the runtime (in the whole-model graph or one by one)."""
    whole = model.__dict__.get("_lotus_whole")
    in_graph = whole.region_modules() if whole is not None else []
    one_by_one = [name for name, m in model.named_modules()
                  if isinstance(m, (OffloadedLinear, OffloadedConv2d))
                  or (isinstance(m, (TTLinear, _FactorizedConv2d, *GROUP_LAYERS)) and m.offloaded)]
    return in_graph + [n for n in one_by_one if n not in in_graph]


__all__ = ["tensorize", "offload", "offloaded_layers", "balanced_factors", "LayerReport"]
