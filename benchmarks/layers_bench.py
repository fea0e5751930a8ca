"""Layer training-step benchmark: each tensorized layer on lotus_rt vs the same factorization in torch.

For every layer type (TT linear, Tucker-2 conv, CP conv) one module is built; a deep copy of it
is offloaded (its forward and backward run as tasks on the runtime: batch-tiled task DAGs, or
one fused task each for a small layer; the ``tasks`` column tells which) and the original runs
the same factors in torch eager (torch.einsum / F.conv2d pieces). One *training step* is
forward, a weighted-sum loss against a fixed random tensor, and backward to the input and every
parameter. Both variants run side by side in one process, interleaved, after a warm-up; torch
uses as many threads as StarPU has CPU workers. Each sample is the mean of ``--steps`` steps;
the reported figure is the median of ``--repeats`` samples and the ratio is
torch_time / lotus_time (> 1: lotus_rt is faster). Outputs and gradients of the two variants
are compared (max relative error), so a fast wrong answer cannot pass.

    python -m benchmarks layers [--quick] [--out DIR] [--batch N] [--repeats R] [--steps S]

Writes ``DIR/layers.json`` (``layers_quick.json`` with --quick) and a bar chart next to it.
Exit status 1 when a lotus_rt result disagrees with torch beyond float32 tolerance.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from typing import Callable

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    import pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import torch

import lotus_rt
from benchmarks import common

MAX_REL_ERROR = 1e-4
SPEED_TARGET, SPEED_FLOOR = 1.0, 0.8


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    make: Callable[[], torch.nn.Module]
    input_shape: tuple[int, ...]


def cases(batch: int, quick: bool) -> list[Case]:
    from lotus_rt import CPConv2d, TTLinear, TuckerConv2d

    if quick:
        return [
            Case("tt_linear", "TTLinear 64->64 (4x4x4), TT-ranks 4",
                 lambda: TTLinear((4, 4, 4), (4, 4, 4), 4), (batch, 64)),
            Case("tucker2_conv", "TuckerConv2d 8->16, 3x3, ranks (4, 8)",
                 lambda: TuckerConv2d(8, 16, 3, (4, 8), padding=1), (batch, 8, 8, 8)),
            Case("cp_conv", "CPConv2d 8->16, 3x3, rank 8",
                 lambda: CPConv2d(8, 16, 3, 8, padding=1), (batch, 8, 8, 8)),
        ]
    return [
        Case("tt_linear_r8", "TTLinear 1024->1024 (4x8x8x4), TT-ranks 8",
             lambda: TTLinear((4, 8, 8, 4), (4, 8, 8, 4), 8), (batch, 1024)),
        Case("tt_linear_r16", "TTLinear 1024->1024 (4x8x8x4), TT-ranks 16",
             lambda: TTLinear((4, 8, 8, 4), (4, 8, 8, 4), 16), (batch, 1024)),
        Case("tucker2_conv", "TuckerConv2d 64->128, 3x3, pad 1, ranks (16, 32), 16x16 images",
             lambda: TuckerConv2d(64, 128, 3, (16, 32), padding=1), (batch // 4, 64, 16, 16)),
        Case("cp_conv", "CPConv2d 64->128, 3x3, pad 1, rank 32, 16x16 images",
             lambda: CPConv2d(64, 128, 3, 32, padding=1), (batch // 4, 64, 16, 16)),
        # the MNIST demo's tensorized layers (rank 0.15 of the dense parameters), at its batch of 64
        Case("demo_tucker_14", "the demo's TuckerConv2d 32->64, 3x3, pad 1, ranks (9, 17), 14x14 images",
             lambda: TuckerConv2d(32, 64, 3, (9, 17), padding=1), (batch // 4, 32, 14, 14)),
        Case("demo_tucker_7", "the demo's TuckerConv2d 64->64, 3x3, pad 1, ranks (19, 18), 7x7 images",
             lambda: TuckerConv2d(64, 64, 3, (19, 18), padding=1), (batch // 4, 64, 7, 7)),
        Case("demo_tt", "the demo's TTLinear 3136->256 (16x14x14 -> 8x8x4), TT-ranks 31",
             lambda: TTLinear((16, 14, 14), (8, 8, 4), 31), (batch // 4, 3136)),
    ]


def training_step(layer: torch.nn.Module, x: torch.Tensor, weights: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    (layer(x) * weights).sum().backward()


def _grads(layer: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [x.grad] + [p.grad for p in layer.parameters()]


def max_rel_error(layer: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor,
                  weights: torch.Tensor) -> float:
    """Largest relative difference over the output and every gradient of one step."""
    errors = []
    for module in (layer, reference):
        training_step(module, x, weights)
        with torch.no_grad():
            errors.append([module(x)] + _grads(module, x))
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(*errors))


def _time_steps(layer: torch.nn.Module, x: torch.Tensor, weights: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        training_step(layer, x, weights)
    return (time.perf_counter() - start) / steps


def run_case(case: Case, repeats: int, steps: int, rt) -> dict:
    torch.manual_seed(0)
    reference = case.make()
    layer = lotus_rt.offload(copy.deepcopy(reference))
    x = torch.randn(case.input_shape, requires_grad=True)
    with torch.no_grad():
        weights = torch.randn_like(reference(x))
    error = max_rel_error(layer, reference, x, weights)
    for module in (layer, reference):  # warm-up: plans, codelet calibration, allocator
        _time_steps(module, x, weights, 2)
    rt.stats(reset=True)
    times = common.interleaved({"lotus": lambda: _time_steps(layer, x, weights, steps),
                                "torch": lambda: _time_steps(reference, x, weights, steps)}, repeats)
    lotus, eager = times["lotus"], times["torch"]
    tasks = sum(s.tasks for s in rt.stats())
    ratios = [e / lt for lt, e in zip(lotus, eager)]
    params = sum(p.numel() for p in reference.parameters())
    return {"name": case.name, "description": case.description, "input_shape": list(case.input_shape),
            "params": params, "tasks_per_step": tasks / (repeats * steps),
            "lotus_s": common.median_spread(lotus), "torch_s": common.median_spread(eager),
            "torch_over_lotus": common.median_spread(ratios), "max_rel_error": error}


def plot(result: dict, path) -> None:
    names = [c["name"] for c in result["cases"]]
    fig, (ax,) = common.figure(width=1.6 * len(names) + 3)
    common.speedup_bars(ax, names, {"torch eager / lotus_rt": [c["torch_over_lotus"] for c in result["cases"]]},
                        ylabel="torch eager time / lotus_rt time", baseline=SPEED_TARGET)
    ax.axhline(SPEED_FLOOR, color="grey", linewidth=0.8, linestyle=":")
    for k, c in enumerate(result["cases"]):
        ratio = c["torch_over_lotus"]["median"]
        ax.text(k, ratio, f"{ratio:.2f}x", ha="center", va="bottom", fontsize=8)
    common.save(fig, path, f"one training step per layer: target {SPEED_TARGET}x (dashed), floor "
                f"{SPEED_FLOOR}x (dotted); {result['config']['threads']} threads, {result['environment']['policy']}")


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("layers", __doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="batch of the TT layers (default 256; "
                        "the convolutions and the demo's layers take a quarter of it; 8 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per variant (default 7; 3 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per sample (default 5; 2 with --quick)")
    args = parser.parse_args(argv)
    batch = args.batch or (8 if args.quick else 256)
    repeats = args.repeats or (3 if args.quick else 7)
    steps = args.steps or (2 if args.quick else 5)

    rt = lotus_rt.runtime()
    threads = common.cpu_workers(rt)
    torch.set_num_threads(threads)
    results = [run_case(case, repeats, steps, rt) for case in cases(batch, args.quick)]
    result = {
        "scenario": "layers", "quick": args.quick, "environment": common.environment(rt),
        "config": {"threads": threads, "torch_threads": torch.get_num_threads(), "dtype": "float32",
                   "batch": batch, "repeats": repeats, "steps_per_sample": steps},
        "targets": {"torch_over_lotus": f">= {SPEED_TARGET} (floor {SPEED_FLOOR})"},
        "cases": results,
    }
    json_path = common.write_result(args.out, "layers", args.quick, result)
    plot(result, common.png_path(json_path))

    print(f"engine={rt.engine} policy={rt.policy} workers={len(rt.workers)} torch threads={threads}")
    print(f"{'layer':<15} {'params':>8} {'tasks':>6} {'lotus ms':>9} {'torch ms':>9} {'torch/lotus':>12} {'rel err':>8}")
    for c in results:
        print(f"{c['name']:<15} {c['params']:>8} {c['tasks_per_step']:>6.0f} {c['lotus_s']['median'] * 1e3:>9.2f} "
              f"{c['torch_s']['median'] * 1e3:>9.2f} {c['torch_over_lotus']['median']:>11.2f}x "
              f"{c['max_rel_error']:>8.1e}")
    print(f"wrote {json_path} and {common.png_path(json_path)}")
    ok = common.report_errors([(c["name"], c["max_rel_error"], MAX_REL_ERROR) for c in results])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
