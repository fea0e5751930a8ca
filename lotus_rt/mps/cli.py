"""``lotus-rt mps``: train the MPS classifier on 14x14 MNIST by DMRG sweeps on the runtime.

    lotus-rt mps --bond-dim 20 --sweeps 3 --sweep realspace

Loads ``lotus_rt.data.mnist(size=14)`` (4 000 training / 1 000 test images; ``--shifts 4``
adds 16 000 training copies moved by one pixel, ``lotus_rt.data.mnist``'s ``shifts``), fits
``MPSClassifier`` and prints, per sweep, its time, the training accuracy at its last bond, the
test accuracy and the largest rank; then the per-worker task counts. While a sweep runs, a
progress bar (tqdm) counts its bond updates when stdout is a terminal; otherwise one line per
sweep is printed. ``add_arguments`` / ``run`` are what ``lotus_rt.cli`` wires in.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from lotus_rt.mps.classifier import DTYPES, SWEEPS, MPSClassifier, SweepReport
from lotus_rt.mps.features import FEATURE_MAPS
from lotus_rt.data.mnist import SHIFTS
from lotus_rt.mps.local import SOLVERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bond-dim", type=int, default=20, help="bond-dimension cap D (default 20)")
    parser.add_argument("--sweeps", type=int, default=3, help="DMRG sweeps (default 3)")
    parser.add_argument("--sweep", choices=SWEEPS, default="serial",
                        help="serial: one task at a time; batch: gradients over batch tiles; realspace: "
                             "two segments of the chain concurrently (default serial)")
    parser.add_argument("--tiles", type=int, default=None,
                        help="batch tiles per gradient (default: 1; batch: 1 per worker)")
    parser.add_argument("--solver", choices=SOLVERS, default="cg", help="local update: cg (least squares) or gd")
    parser.add_argument("--iters", type=int, default=5, help="CG iterations (or GD steps) per bond (default 5)")
    parser.add_argument("--reg", type=float, default=1e-3, help="L2 penalty of the local problem (default 1e-3)")
    parser.add_argument("--lr", type=float, default=1.0, help="GD step length (solver gd)")
    parser.add_argument("--cutoff", type=float, default=1e-10, help="discarded weight allowed per SVD")
    parser.add_argument("--feature-map", choices=FEATURE_MAPS, default="cos-sin")
    parser.add_argument("--size", type=int, choices=(7, 14), default=14, help="image side after downsampling")
    parser.add_argument("--shifts", type=int, choices=tuple(SHIFTS), default=0,
                        help="add training copies moved by one 28x28 pixel in 4 (or 8) directions: 5x (9x) "
                             "the training images; the test images are not changed (default 0)")
    parser.add_argument("--train", type=int, default=None,
                        help="use only the first N training images (with --shifts: the originals come first)")
    parser.add_argument("--test", type=int, default=None, help="use only the first N test images")
    parser.add_argument("--warmup", type=int, default=0, help="realspace: serial sweeps first (default 0)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--seed", type=int, default=0)


class _Progress:
    """A tqdm bar per sweep on a terminal, else one printed line per sweep."""

    def __init__(self, sweeps: int, interactive: bool):
        self.sweeps, self.interactive = sweeps, interactive
        self.bar: Any = None
        self.sweep = 0

    def on_bond(self, done: int, total: int, train_accuracy: float) -> None:
        if not self.interactive:
            return
        if self.bar is None:
            from tqdm import tqdm
            self.sweep += 1
            self.bar = tqdm(total=total, desc=f"sweep {self.sweep}/{self.sweeps}", unit="bond", leave=True)
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix(train_acc=f"{train_accuracy:.3f}", refresh=False)

    def on_sweep(self, report: SweepReport) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        else:
            self.sweep = report.sweep
        val = "-" if report.val_accuracy is None else f"{report.val_accuracy:.4f}"
        print(f"sweep {report.sweep}/{self.sweeps}: {report.seconds:6.1f} s, {report.updates} bond updates, "
              f"{report.tasks} tasks; train acc (last bond) {report.train_accuracy:.4f}, test acc {val}, "
              f"rank max {report.max_rank} mean {report.mean_rank:.1f}", flush=True)


def run(args: argparse.Namespace) -> int:
    from lotus_rt.data import mnist
    from lotus_rt.runtime import runtime

    try:
        clf = MPSClassifier(args.size * args.size, args.bond_dim, args.feature_map, sweeps=args.sweeps,
                            sweep=args.sweep, ntiles=args.tiles, solver=args.solver, iters=args.iters,
                            reg=args.reg, lr=args.lr, cutoff=args.cutoff, warmup=args.warmup,
                            dtype=args.dtype, seed=args.seed)
        for name in ("train", "test"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name}={value} must be >= 1")
    except ValueError as exc:
        print(f"lotus-rt mps: {exc}", file=sys.stderr)
        return 2
    x_train, y_train, x_test, y_test = mnist(size=args.size, shifts=args.shifts)
    originals = len(x_train) // len(SHIFTS[args.shifts])  # they come first, then the shifted copies
    x_train, y_train = x_train[:args.train], y_train[:args.train]
    x_test, y_test = x_test[:args.test], y_test[:args.test]
    rt = runtime()
    print(f"lotus_rt: engine={rt.engine} policy={rt.policy} "
          f"workers={', '.join(name for _, name in rt.workers)}")
    print(f"MPS classifier: {clf.n_sites} sites ({args.size}x{args.size} MNIST), bond dim {args.bond_dim}, "
          f"{args.sweep} sweeps; {len(x_train)} training / {len(x_test)} test images"
          + (f" ({max(0, len(x_train) - originals)} of them shifted by one pixel)" if args.shifts else ""))
    progress = _Progress(args.sweeps, sys.stdout.isatty())
    rt.stats(reset=True)
    start = time.perf_counter()
    clf.fit(x_train, y_train, x_val=x_test, y_val=y_test, on_bond=progress.on_bond, on_sweep=progress.on_sweep)
    elapsed = time.perf_counter() - start
    print(f"test accuracy {clf.history_[-1].val_accuracy:.4f} after {args.sweeps} sweeps in {elapsed:.1f} s; "
          f"{clf.n_parameters()} parameters")
    print(f"  {'worker':<12} {'tasks':>7} {'busy s':>8}")
    for s in rt.stats():
        print(f"  {s.worker:<12} {s.tasks:>7} {s.busy_s:>8.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lotus-rt mps", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
