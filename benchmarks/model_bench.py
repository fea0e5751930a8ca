"""Whole-model benchmark: one training step of a model offloaded as one task graph vs torch.

Models: the MNIST demo CNN (``lotus_rt.demo.small_alexnet``, 1x28x28 inputs) and a ResNet-style
CIFAR net (``resnet8``: a 3x3 stem, three stages of one basic block each, 16/32/64 channels, batch
norm, identity and 1x1-projection shortcuts, global average pooling; 3x32x32 inputs), each dense
and tensorized (``lotus_rt.tensorize``: Tucker-2 convolutions, TT fully-connected layers where
their sizes factor, the classifier kept dense). For each model and variant, side by side in one
process, interleaved rounds after a warm-up:

- ``lotus``: the model offloaded (``lotus_rt.offload``): captured with torch.fx, one task graph per
  pass over batch tiles, recorded once and replayed (the plan's task counts are reported);
- ``eager``: the same model in torch eager, as many threads as StarPU has CPU workers (StarPU's
  workers paused meanwhile, so they take no core from it);
- ``compile``: ``torch.compile`` (default mode) of the same model, where it compiles (full runs
  only: compiling takes minutes on 2 cores; the reason is recorded where it is skipped).

One training step is forward, cross-entropy, backward (gradients of every parameter), zeroing the
gradients before; the optimizer's update is the same on every side and is left out. The loss and
gradients of the offloaded model are checked against eager first, in float64 (relative 1e-10);
both sides' float32 drift from that float64 step is reported next to it. Ratios are
eager_time / variant_time per round (> 1: faster than eager); the dense eager step of the same
model is the second baseline (what tensorizing buys a user). A Gantt chart of one offloaded step
of the tensorized demo model is drawn, coloured by layer.

    python -m benchmarks model [--quick] [--out DIR] [--batch 64] [--repeats 7] [--steps 3]
                               [--models mnist_cnn,resnet8] [--no-compile] [--device cuda]

``--device cuda`` (the GPU run): the models and inputs on the GPU, torch eager on the same card
(synchronised), the offloaded model on a runtime with CUDA workers; torch.compile is skipped.

Writes ``DIR/model[_quick].json``, ``model[_quick].png`` (speed-ups) and
``model[_quick]_gantt.png``. Exit status 1 when an offloaded model disagrees with eager.
"""
from __future__ import annotations

import copy
import sys
import time
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    import pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import lotus_rt  # noqa: E402
from benchmarks import common  # noqa: E402

# The offloaded step must match torch's to this relative error in float64, where the two are the
# same arithmetic up to summation order. In float32 a ReLU whose input lies within rounding of
# zero can flip its mask; with batch norm after a convolution the weight gradient is a small
# difference of large sums (BN makes the loss invariant to the weight's scale), so one flipped
# element can move it by ~1e-3 relative. That drift is reported for torch and lotus alike
# (``float32_drift``), measured against the float64 step; it is not a correctness check.
MAX_REL_ERROR = common.MAX_REL_ERROR["float64"]
TARGETS = {"tensorized lotus vs tensorized eager": 1.0, "tensorized lotus vs dense eager": 1.0,
           "dense lotus vs dense eager": 0.9}


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet8(nn.Module):
    """A small CIFAR ResNet: stem, three stages of one basic block, global pooling, classifier."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        blocks, c = [], widths[0]
        for k, w in enumerate(widths):
            blocks.append(BasicBlock(c, w, 1 if k == 0 else 2))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def models(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], dict[str, Any]]]:
    """name -> (constructor, per-sample input shape, tensorize options)."""
    from lotus_rt.demo import small_alexnet
    widths = (4, 8, 8) if quick else (16, 32, 64)
    return {"mnist_cnn": (small_alexnet, (1, 28, 28), {"rank": 0.15, "skip": {"11"}}),
            "resnet8": (lambda: ResNet8(widths), (3, 16, 16) if quick else (3, 32, 32),
                        {"rank": 0.3, "skip": {"fc"}})}


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, pause=None) -> Callable[[], float]:
    def run() -> float:
        if pause is not None:
            with pause():
                return _steps(model, x, y, steps)
        return _steps(model, x, y, steps)
    return run


def _steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    _sync(x.device)
    start = time.perf_counter()
    for _ in range(steps):
        training_step(model, x, y)
    _sync(x.device)
    return (time.perf_counter() - start) / steps


def _step_values(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    loss = training_step(model, x, y)
    return [loss.detach().double()] + [p.grad.double() for p in model.parameters()]


def _max_rel(reference: list[torch.Tensor], values: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-3)) for a, b in zip(reference, values))


def step_errors(reference: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Loss and every parameter gradient of one step: the offloaded model against torch in
    float64 (the correctness check), and torch's and lotus_rt's float32 against float64."""
    exact = _step_values(copy.deepcopy(reference).double(), x.double(), y)
    offloaded64 = lotus_rt.offload(copy.deepcopy(reference).double())
    drift = {"torch": _max_rel(exact, _step_values(copy.deepcopy(reference), x, y)),
             "lotus": _max_rel(exact, _step_values(lotus_rt.offload(copy.deepcopy(reference)), x, y))}
    return {"max_rel_error": _max_rel(exact, _step_values(offloaded64, x.double(), y)), "float32_drift": drift}


def _compiled(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[nn.Module | None, str | None, float]:
    start = time.perf_counter()
    try:
        compiled = torch.compile(model)
        training_step(compiled, x, y)
    except Exception as exc:  # noqa: BLE001 - inductor can fail in many ways; the reason is the result
        return None, f"torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}", time.perf_counter() - start
    return compiled, None, time.perf_counter() - start


def run_model(name: str, make, sample_shape, tensorize: dict, batch: int, repeats: int, steps: int, compile_: bool,
              rt, gantt: Any = None, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    x = torch.randn((batch,) + sample_shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    variants: dict[str, dict] = {}
    timers: dict[str, Callable[[], float]] = {}
    for variant in ("dense", "tensorized"):
        reference = make()
        if variant == "tensorized":
            lotus_rt.tensorize(reference, verbose=False, **tensorize)
        reference = reference.to(device)
        errors = step_errors(reference, x, y)
        offloaded = lotus_rt.offload(copy.deepcopy(reference))
        training_step(offloaded, x, y)
        forward_tasks, backward_tasks = _plan_tasks(offloaded)
        record = {"params": sum(p.numel() for p in reference.parameters()), **errors,
                  "tasks_per_step": {"forward": forward_tasks, "backward": backward_tasks}}
        timers[f"{variant}/lotus"] = _timed(offloaded, x, y, steps)
        timers[f"{variant}/eager"] = _timed(reference, x, y, steps, pause=rt.paused)
        if compile_:
            compiled, reason, seconds = _compiled(copy.deepcopy(reference), x, y)
            record["compile_s"] = seconds
            if compiled is None:
                record["compile_skipped"] = reason
            else:
                timers[f"{variant}/compile"] = _timed(compiled, x, y, steps, pause=rt.paused)
        else:
            record["compile_skipped"] = "--no-compile or --quick: compiling takes minutes on 2 cores"
        variants[variant] = record
        if gantt is not None and variant == "tensorized":
            _gantt(offloaded, x, y, rt, gantt, f"{name}, tensorized")
    for run in timers.values():  # warm-up: plans recorded, allocator and caches settled
        run()
    times = common.interleaved(timers, repeats, warm=True)
    for variant, record in variants.items():
        eager = times[f"{variant}/eager"]
        record["time_s"] = {k.split("/")[1]: common.median_spread(v) for k, v in times.items()
                            if k.startswith(variant + "/")}
        record["eager_over"] = {k.split("/")[1]: common.median_spread([e / t for e, t in zip(eager, v)])
                                for k, v in times.items() if k.startswith(variant + "/")}
    dense_eager = times["dense/eager"]
    variants["tensorized"]["dense_eager_over"] = {
        k.split("/")[1]: common.median_spread([e / t for e, t in zip(dense_eager, v)])
        for k, v in times.items() if k.startswith("tensorized/")}
    return {"name": name, "input_shape": [batch, *sample_shape], "variants": variants}


def _plan_tasks(model: nn.Module) -> tuple[int, int]:
    whole = model.__dict__.get("_lotus_whole")
    if whole is None:
        return 0, 0
    counts = [p.ntasks for r in whole.runners.values() for pool in r.pools.values() for p in pool.free]
    return (max((c[0] for c in counts), default=0), max((c[1] for c in counts), default=0))


def _gantt(model: nn.Module, x, y, rt, path, title: str) -> None:
    from lotus_rt.runtime.tracing import gantt_png
    training_step(model, x, y)
    rt.trace(clear=True)
    training_step(model, x, y)
    records = rt.trace()
    gantt_png(records, [n for _, n in rt.workers], path, color_by="layer",
              title=f"one training step of the offloaded {title} model ({len(records)} tasks, coloured by layer)")


def plot(result: dict, path) -> None:
    groups, series = [], {"lotus (offloaded)": [], "torch.compile": []}
    empty = {"median": 0.0, "min": 0.0, "max": 0.0}
    for m in result["models"]:
        for variant, record in m["variants"].items():
            groups.append(f"{m['name']}\n{variant}")
            series["lotus (offloaded)"].append(record["eager_over"].get("lotus", empty))
            series["torch.compile"].append(record["eager_over"].get("compile", empty))
    fig, (ax,) = common.figure(width=1.8 * len(groups) + 3)
    common.speedup_bars(ax, groups, series, ylabel="torch eager step time / variant's (> 1: faster)", baseline=1.0)
    common.save(fig, path, f"training step vs torch eager of the same model; {result['config']['threads']} threads, "
                f"batch {result['config']['batch']}, {result['environment']['policy']}")


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("model", __doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="batch (default 64; 8 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per variant (default 7; 3 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per sample (default 3; 1 with --quick)")
    parser.add_argument("--models", default=None, help="comma-separated subset of mnist_cnn,resnet8")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the models and inputs live (cuda: the GPU run; torch.compile skipped)")
    args = parser.parse_args(argv)
    batch = args.batch or (8 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 7)
    steps = args.steps or (1 if args.quick else 3)
    available = models(args.quick)
    chosen = args.models.split(",") if args.models else list(available)
    unknown = [m for m in chosen if m not in available]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(available)}")

    rt = lotus_rt.runtime()
    threads = common.cpu_workers(rt)
    torch.set_num_threads(threads)
    json_path = common.result_path(args.out, "model", args.quick)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    gantt = json_path.with_name(json_path.stem + "_gantt.png")
    compile_ = not (args.quick or args.no_compile or args.device == "cuda")
    results = [run_model(name, *available[name], batch, repeats, steps, compile_, rt,
                         gantt if name == chosen[0] else None, args.device) for name in chosen]
    result = {"scenario": "model", "quick": args.quick, "environment": common.environment(rt),
              "config": {"threads": threads, "batch": batch, "repeats": repeats, "steps_per_sample": steps,
                         "dtype": "float32", "device": args.device},
              "targets": TARGETS, "models": results, "gantt": str(gantt)}
    json_path = common.write_result(args.out, "model", args.quick, result)
    plot(result, common.png_path(json_path))

    print(f"engine={rt.engine} policy={rt.policy} workers={len(rt.workers)} torch threads={threads} batch={batch}")
    print(f"{'model':<10} {'variant':<11} {'params':>8} {'tasks f/b':>10} {'lotus ms':>9} {'eager ms':>9} "
          f"{'compile ms':>10} {'eager/lotus':>11} {'dense eager/lotus':>17} {'f64 err':>8} {'f32 drift torch/lotus':>21}")
    for m in results:
        for variant, r in m["variants"].items():
            t = r["time_s"]
            comp = f"{t['compile']['median'] * 1e3:>10.1f}" if "compile" in t else f"{'-':>10}"
            dense = r.get("dense_eager_over", {}).get("lotus")
            print(f"{m['name']:<10} {variant:<11} {r['params']:>8} {r['tasks_per_step']['forward']:>4}/"
                  f"{r['tasks_per_step']['backward']:<5} {t['lotus']['median'] * 1e3:>9.1f} "
                  f"{t['eager']['median'] * 1e3:>9.1f} {comp} {r['eager_over']['lotus']['median']:>10.2f}x "
                  f"{(dense['median'] if dense else float('nan')):>16.2f}x {r['max_rel_error']:>8.1e} "
                  f"{r['float32_drift']['torch']:>10.1e}/{r['float32_drift']['lotus']:<10.1e}")
    print(f"wrote {json_path}, {common.png_path(json_path)} and {gantt}")
    checks = [(f"{m['name']} {v}", r["max_rel_error"], MAX_REL_ERROR) for m in results for v, r in m["variants"].items()]
    return 0 if common.report_errors(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
