"""MPS classifier trained by DMRG sweeps (lotus_rt.mps) on MNIST downsampled to 14x14.

Four measurements, side by side in one process (StarPU, every CPU worker):

1. accuracy vs bond dimension (10, 20, 40, 80): ``MPSClassifier`` (batch-parallel sweeps, CG
   local solves) after each of ``--sweeps`` sweeps, and the gradient-trained peer at the same
   bond dimension (``lotus_rt.nn.mps_torch``: Adam on the cross-entropy, ``--epochs`` epochs);
2. sweep time of the serial, real-space parallel and batch-parallel sweeps at ``--sweep-dim``,
   interleaved rounds (the order rotates), each a fit of ``--time-sweeps`` sweeps; the speed-up
   is serial time / variant time within a round, and each variant's test accuracy is recorded;
3. a Gantt chart of one real-space parallel sweep (tasks coloured by segment);
4. DMRG on a TTLinear vs Adam on the same layer under the same time budget: an MLP
   TTLinear(196 -> 64) -> ReLU -> Linear(64 -> 10), its TT cores trained by
   ``lotus_rt.nn.dmrg.DMRGOptimizer`` (the rest by Adam) or everything by Adam.

    python -m benchmarks mps [--quick] [--out DIR] [--dims 10,20,40,80] [--sweeps 4] ...
    python -m benchmarks mps --sections timing,gantt --repeats 5   # only parts 2 and 3

Writes ``DIR/mps.json`` (``mps_quick.json``; ``mps_<sections>.json`` for a subset), ``mps.png``
(accuracy vs bond dimension) and ``mps_gantt.png``. ``--quick`` uses 7x7 images, 600/200 samples
and tiny models (seconds).
"""
from __future__ import annotations

import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    import pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np

import lotus_rt
from benchmarks import common
from lotus_rt.data.mnist import SHIFTS

TARGET_ACCURACY, TARGET_DIM = 0.97, 40
TARGET_SPEEDUP, TARGET_ACC_GAP = 1.6, 0.005
SECTIONS = ("accuracy", "timing", "gantt", "tt")
SEGMENT_COLOURS = {"left": "tab:blue", "right": "tab:orange", "join": "tab:red", "fork": "tab:green",
                   "serial": "tab:grey", "init": "tab:purple"}


def load(quick: bool, shifts: int = 0) -> tuple[np.ndarray, ...]:
    """The 14x14 MNIST split (7x7, 600 / 200 images with ``quick``); ``shifts``: one-pixel shifted
    training copies (``lotus_rt.data.mnist``), taken per copy in the quick configuration too."""
    from lotus_rt.data import mnist
    x_train, y_train, x_test, y_test = mnist(size=7 if quick else 14, shifts=shifts)
    if quick:
        copies = len(SHIFTS[shifts])        # the originals, then one block per shift
        n = len(x_train) // copies
        keep = np.concatenate([np.arange(k * n, k * n + 600) for k in range(copies)])
        return x_train[keep], y_train[keep], x_test[:200], y_test[:200]
    return x_train, y_train, x_test, y_test


def dmrg_fit(data: tuple, dim: int, sweeps: int, sweep: str, args: Any, on_sweep=None):
    from lotus_rt.mps import MPSClassifier
    x_train, y_train, x_test, y_test = data
    clf = MPSClassifier(x_train[0].size, dim, sweeps=sweeps, sweep=sweep, reg=args.reg, iters=args.iters,
                        dtype=args.dtype, seed=args.seed)
    start = time.perf_counter()
    clf.fit(x_train, y_train, x_val=x_test, y_val=y_test, on_sweep=on_sweep)
    return clf, time.perf_counter() - start


def accuracy_vs_dim(data: tuple, args: Any) -> list[dict]:
    import torch

    from lotus_rt.nn.mps_torch import TorchMPS, train
    rows = []
    for dim in args.dims:
        clf, total = dmrg_fit(data, dim, args.sweeps, "batch", args)
        h = clf.history_
        torch.manual_seed(args.seed)
        model = TorchMPS(data[0][0].size, dim, seed=args.seed)
        start = time.perf_counter()
        epochs = train(model, data[0], data[1], epochs=args.epochs, lr=args.torch_lr, x_val=data[2], y_val=data[3],
                       seed=args.seed)
        torch_s = time.perf_counter() - start
        row = {"bond_dim": dim,
               "dmrg": {"test_accuracy": [r.val_accuracy for r in h], "sweep_s": [r.seconds for r in h],
                        "train_accuracy_last_bond": [r.train_accuracy for r in h], "max_rank": h[-1].max_rank,
                        "mean_rank": h[-1].mean_rank, "params": clf.n_parameters(), "total_s": total,
                        "best": max(r.val_accuracy for r in h)},
               "torch": {"test_accuracy": [e.val_accuracy for e in epochs], "epoch_s": [e.seconds for e in epochs],
                         "train_loss": [e.train_loss for e in epochs], "total_s": torch_s,
                         "params": sum(p.numel() for p in model.parameters()),
                         "best": max(e.val_accuracy for e in epochs)}}
        print(f"D={dim:<3} DMRG ({args.sweeps} sweeps, {total:6.1f} s): test acc "
              f"{' '.join(f'{a:.4f}' for a in row['dmrg']['test_accuracy'])} | torch Adam ({len(epochs)} epochs, "
              f"{torch_s:6.1f} s): {row['torch']['test_accuracy'][-1]:.4f} (best {row['torch']['best']:.4f})",
              flush=True)
        rows.append(row)
    return rows


def sweep_times(data: tuple, rt, args: Any) -> dict:
    variants = ["serial", "realspace", "batch"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(args.repeats):
        k = rep % len(variants)
        for v in variants[k:] + variants[:k]:
            rt.stats(reset=True)
            clf, total = dmrg_fit(data, args.sweep_dim, args.time_sweeps, v, args)
            busy = {s.worker: s.busy_s for s in rt.stats()}
            runs[v].append({"sweep_s": [r.seconds for r in clf.history_], "total_s": total,
                            "test_accuracy": clf.history_[-1].val_accuracy,
                            "tasks_per_sweep": clf.history_[-1].tasks, "worker_busy_s": busy})
            print(f"  round {rep + 1} {v:<9} sweeps {' '.join(f'{s:6.2f}' for s in runs[v][-1]['sweep_s'])} s, "
                  f"test acc {runs[v][-1]['test_accuracy']:.4f}", flush=True)
    result = {"bond_dim": args.sweep_dim, "sweeps": args.time_sweeps, "variants": {}}
    serial = [sum(r["sweep_s"]) for r in runs["serial"]]
    for v in variants:
        times = [sum(r["sweep_s"]) for r in runs[v]]
        result["variants"][v] = {
            "sweeps_s": common.median_spread(times),
            "per_sweep_s": common.median_spread([t / args.time_sweeps for t in times]),
            "speedup_vs_serial": common.median_spread([s / t for s, t in zip(serial, times)]),
            "test_accuracy": runs[v][-1]["test_accuracy"],
            "accuracy_gap_vs_serial": runs[v][-1]["test_accuracy"] - runs["serial"][-1]["test_accuracy"],
            "tasks_per_sweep": runs[v][-1]["tasks_per_sweep"], "runs": runs[v]}
    return result


def gantt(data: tuple, rt, args: Any, path) -> dict:
    """Trace the second sweep of a real-space fit (the first also builds the environments)."""
    rt.trace(clear=True)
    marks = {}

    def on_sweep(report):
        if report.sweep == 1:
            rt.trace(clear=True)
            marks["t0"] = time.perf_counter()

    clf, _ = dmrg_fit(data, args.sweep_dim, 2, "realspace", args, on_sweep=on_sweep)
    records = [r for r in rt.trace() if not r.name.startswith("predict")]
    workers = [name for _, name in rt.workers]
    fig, (ax,) = common.figure(width=11, height=0.7 * len(workers) + 2.2)
    t0 = min(r.start_s for r in records)
    for r in records:
        seg = r.name.split(".")[0]
        ax.barh(workers.index(r.worker) if r.worker in workers else len(workers), (r.end_s - r.start_s) * 1e3,
                left=(r.start_s - t0) * 1e3, height=0.8, color=SEGMENT_COLOURS.get(seg, "black"), edgecolor="none")
    ax.set_yticks(range(len(workers)), workers)
    ax.invert_yaxis()
    ax.set_xlabel("time since the sweep's first task (ms)")
    import matplotlib.pyplot as plt
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for k, c in SEGMENT_COLOURS.items() if k not in ("serial", "init")]
    ax.legend(handles, [k for k in SEGMENT_COLOURS if k not in ("serial", "init")], ncol=4, fontsize=8,
              loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    span = max(r.end_s for r in records) - t0
    busy = {w: sum(r.end_s - r.start_s for r in records if r.worker == w) for w in workers}
    common.save(fig, path, f"one real-space parallel sweep, D={args.sweep_dim}: {len(records)} tasks in "
                f"{span:.2f} s; busy " + ", ".join(f"{w} {b / span:.0%}" for w, b in busy.items()))
    per_seg: dict[str, int] = {}
    for r in records:
        per_seg[r.name.split(".")[0]] = per_seg.get(r.name.split(".")[0], 0) + 1
    return {"png": str(path), "tasks": len(records), "span_s": span, "busy_s": busy, "tasks_by_segment": per_seg}


def tt_dmrg_vs_adam(data: tuple, args: Any) -> dict:
    import torch

    from lotus_rt import TTLinear
    from lotus_rt.nn.dmrg import make_optimizer
    x_train, y_train, x_test, y_test = (torch.from_numpy(a.reshape(len(a), -1)) if a.ndim > 1 else torch.from_numpy(a)
                                        for a in data)
    side = int(round(np.sqrt(x_train.shape[1])))
    in_shape, out_shape, rank = ((side,) * 2, (4, 4), 4) if side == 7 else ((4, 7, 7), (4, 4, 4), 8)
    hidden = int(np.prod(out_shape))

    def model():
        torch.manual_seed(args.seed)
        return torch.nn.Sequential(TTLinear(in_shape, out_shape, rank), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))

    results = {}
    for name, lr in (("adam", args.adam_lr), ("dmrg", args.dmrg_lr)):
        m = model()
        opt = make_optimizer(name, m, lr=lr)
        gen = torch.Generator().manual_seed(args.seed)
        steps, start, curve = 0, time.perf_counter(), []
        while time.perf_counter() - start < args.tt_budget:
            order = torch.randperm(len(x_train), generator=gen)
            for i in range(0, len(order), 64):
                idx = order[i:i + 64]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(m(x_train[idx]), y_train[idx])
                loss.backward()
                opt.step()
                steps += 1
                if time.perf_counter() - start >= args.tt_budget:
                    break
            with torch.no_grad():
                curve.append((time.perf_counter() - start, float((m(x_test).argmax(1) == y_test).float().mean())))
        with torch.no_grad():
            acc = float((m(x_test).argmax(1) == y_test).float().mean())
        results[name] = {"lr": lr, "steps": steps, "seconds": time.perf_counter() - start, "test_accuracy": acc,
                         "ranks": list(m[0].ranks), "tt_params": sum(c.numel() for c in m[0].cores),
                         "accuracy_per_epoch": curve}
        print(f"TT layer {in_shape}->{out_shape}: {name:<4} lr {lr:g}: {steps} steps in {args.tt_budget:g} s, "
              f"test acc {acc:.4f}, ranks {m[0].ranks}", flush=True)
    return {"layer": f"TTLinear({in_shape} -> {out_shape}), TT-ranks {rank}, then ReLU, Linear({hidden} -> 10)",
            "budget_s": args.tt_budget, **results}


def plot_accuracy(rows: list[dict], path, title: str) -> None:
    fig, (ax,) = common.figure()
    dims = [r["bond_dim"] for r in rows]
    ax.plot(dims, [r["dmrg"]["test_accuracy"][-1] for r in rows], marker="o", label="DMRG sweeps (lotus_rt, StarPU)")
    ax.plot(dims, [r["torch"]["test_accuracy"][-1] for r in rows], marker="s",
            label="gradient-trained MPS (torch Adam)")
    ax.axhline(TARGET_ACCURACY, color="black", linestyle="--", linewidth=0.8, label=f"target {TARGET_ACCURACY}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set_xlabel("bond dimension D")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    common.save(fig, path, title)


def main(argv: list[str] | None = None) -> int:
    p = common.parser("mps", __doc__.splitlines()[0])
    p.add_argument("--dims", type=common.int_list, default=None, help="bond dimensions (default 10,20,40,80)")
    p.add_argument("--sweeps", type=int, default=None, help="DMRG sweeps per fit (default 4)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the torch peer (default 8)")
    p.add_argument("--sweep-dim", type=int, default=None, help="bond dimension of the timing runs (default 20)")
    p.add_argument("--time-sweeps", type=int, default=None, help="sweeps per timed fit (default 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    p.add_argument("--tt-budget", type=float, default=None, help="seconds per TT optimiser (default 30)")
    p.add_argument("--reg", type=float, default=1e-3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--torch-lr", type=float, default=1e-3)
    p.add_argument("--adam-lr", type=float, default=3e-3)
    p.add_argument("--dmrg-lr", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="of the DMRG fits (float64: the variants' accuracies differ by their algorithm only, "
                        "not by float32 rounding, which moves them by up to ~1 point)")
    p.add_argument("--shifts", type=int, choices=tuple(SHIFTS), default=0,
                   help="training copies moved by one pixel in 4 or 8 directions (lotus_rt.data.mnist; default 0)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    if not sections or set(sections) - set(SECTIONS):
        p.error(f"--sections {args.sections!r}: choose from {', '.join(SECTIONS)}")
    q = args.quick
    args.dims = args.dims or ([4, 8] if q else [10, 20, 40, 80])
    args.sweeps = args.sweeps or (2 if q else 4)
    args.epochs = args.epochs or (1 if q else 8)
    args.sweep_dim = args.sweep_dim or (6 if q else 20)
    args.time_sweeps = args.time_sweeps or (1 if q else 3)
    args.repeats = args.repeats or (1 if q else 3)
    args.tt_budget = args.tt_budget or (2.0 if q else 30.0)

    import torch
    rt = lotus_rt.runtime()
    torch.set_num_threads(common.cpu_workers(rt))
    data = load(q, args.shifts)
    print(f"engine={rt.engine} policy={rt.policy} workers={len(rt.workers)}; {len(data[0])} train / {len(data[2])} "
          f"test images of {data[0].shape[-1]}x{data[0].shape[-1]}", flush=True)
    name = ("mps" if len(sections) == len(SECTIONS) else "mps_" + "_".join(sections)) + \
        (f"_shifts{args.shifts}" if args.shifts else "") + ("_float64" if args.dtype == "float64" else "")
    json_path = common.result_path(args.out, name, q)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"scenario": "mps", "quick": q, "sections": sections,
                              "config": {k: v for k, v in vars(args).items() if k not in ("out", "quick")},
                              "data": {"train": len(data[0]), "test": len(data[2]), "size": int(data[0].shape[-1]),
                                       "shifts": args.shifts}}
    targets = []
    if "accuracy" in sections:
        rows = result["accuracy_vs_bond_dim"] = accuracy_vs_dim(data, args)
        within = [r for r in rows if r["bond_dim"] <= TARGET_DIM]
        best = max((r["dmrg"]["test_accuracy"][-1] for r in within), default=None)
        targets.append({"target": f"test accuracy >= {TARGET_ACCURACY} at bond dimension <= {TARGET_DIM} "
                                  f"(after the last sweep)", "measured": best,
                        "status": "not measured" if best is None else ("met" if best >= TARGET_ACCURACY else "missed")})
        plot_accuracy(rows, common.png_path(json_path),
                      f"MPS on {data[0].shape[-1]}x{data[0].shape[-1]} MNIST ({len(data[0])} train / {len(data[2])} "
                      "test): test accuracy vs bond dimension")
    if "timing" in sections:
        timing = result["sweep_time"] = sweep_times(data, rt, args)
        for v in ("realspace", "batch"):
            res = timing["variants"][v]
            ok = (res["speedup_vs_serial"]["median"] >= TARGET_SPEEDUP
                  and abs(res["accuracy_gap_vs_serial"]) <= TARGET_ACC_GAP)
            measured = {"speedup": res["speedup_vs_serial"]["median"], "accuracy_gap": res["accuracy_gap_vs_serial"]}
            targets.append({"target": f"{v} sweep >= {TARGET_SPEEDUP}x the serial sweep, accuracy within "
                                      f"{TARGET_ACC_GAP * 100:.1f} points", "measured": measured,
                            "status": "met" if ok else "missed"})
        print(f"sweep time at D={args.sweep_dim} ({args.time_sweeps} sweeps, median of {args.repeats}): " + ", ".join(
            f"{v} {r['sweeps_s']['median']:.2f} s ({r['speedup_vs_serial']['median']:.2f}x, "
            f"acc {r['test_accuracy']:.4f})" for v, r in timing["variants"].items()))
    if "gantt" in sections:
        result["gantt"] = gantt(data, rt, args, json_path.with_name(json_path.stem + "_gantt.png"))
    if "tt" in sections:
        result["tt_dmrg_vs_adam"] = tt_dmrg_vs_adam(data, args)
    result["targets"] = targets
    result["environment"] = common.environment(rt)
    path = common.write_result(args.out, name, q, result)
    for t in targets:
        print(f"target {t['target']}: {t['status']} ({t['measured']})")
    print(f"wrote {path}" + (f", {common.png_path(json_path)}" if "accuracy" in sections else "")
          + (f", {result['gantt']['png']}" if "gantt" in sections else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
