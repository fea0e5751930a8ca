"""``MPSClassifier``: an MPS with a label index trained by two-site DMRG sweeps on the runtime.

    >>> import numpy as np
    >>> from lotus_rt.mps import MPSClassifier
    >>> x = np.random.default_rng(0).random((64, 8)); y = (x[:, 0] > 0.5).astype(int)
    >>> clf = MPSClassifier(8, bond_dim=4, n_labels=2, sweeps=2).fit(x, y)   # doctest: +SKIP
    >>> clf.score(x, y) > 0.9                                                # doctest: +SKIP
    True

``fit`` checks every argument first (one ValueError naming the problem, before any task),
then: features (``lotus_rt.mps.features``), a random canonical MPS (``state``), environments
registered per cut and batch tile (``environments``), and ``sweeps`` sweeps of the chosen
engine (``serial``, ``batch``, ``realspace``), each submitted whole and waited for bond by bond
(``on_bond``) so that progress can be shown. Between sweeps the sites come home (unregistered)
and the optional validation set is scored (``inference``); ``history_`` keeps one
``SweepReport`` per sweep.
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from lotus_rt.errors import CodeletError
from lotus_rt.mps import features, inference
from lotus_rt.mps import state as state_mod
from lotus_rt.mps.batch import BatchParallelSweep
from lotus_rt.mps.environments import Environments, TiledData, submit_initial
from lotus_rt.mps.local import SOLVERS, Model, Solver
from lotus_rt.mps.realspace import RealSpaceSweep
from lotus_rt.mps.serial import SerialSweep
from lotus_rt.runtime import Handle, Runtime, runtime as process_runtime

SWEEPS = ("serial", "batch", "realspace")
DTYPES = ("float32", "float64")


@dataclass
class SweepReport:
    """What one sweep did: wall time, accuracy, ranks and truncation."""

    sweep: int
    seconds: float
    train_accuracy: float        # at the last bond update of the sweep, before it (from its gradient)
    val_accuracy: float | None
    max_rank: int
    mean_rank: float
    max_discarded: float         # largest discarded weight of an SVD of the sweep
    updates: int
    tasks: int
    bond_train_accuracy: list[float] = field(default_factory=list, repr=False)  # per update


def _int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    return int(value)


def _real(value: Any, name: str, low: float, high: float | None = None, *, open_low: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (high is None or value < high)
    if not ok:
        bounds = f"{'>' if open_low else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
        raise ValueError(f"{name}={value!r} must be a finite number {bounds}")
    return float(value)


class MPSClassifier:
    """Matrix-product-state classifier (Stoudenmire & Schwab 2016) trained by DMRG sweeps.

    n_sites: pixels per sample (one site each); bond_dim: the bond-dimension cap D;
    feature_map: "cos-sin" or "linear"; n_labels: classes (labels 0..n_labels-1);
    sweeps: sweeps per ``fit``; sweep: "serial" (one task at a time), "batch" (gradients over
    ``ntiles`` batch tiles, default one per worker) or "realspace" (two segments concurrently);
    solver: "cg" (``iters`` conjugate-gradient steps on the local least-squares problem) or
    "gd" (``iters`` gradient steps of length ``lr``); reg: L2 penalty of the local problem;
    cutoff: discarded-weight fraction allowed in each SVD; dtype: "float32" or "float64";
    boundary, warmup: the real-space sweep's cut site and number of serial sweeps first;
    runtime: the runtime to run on (default: the process-wide ``lotus_rt.runtime()``).
    """

    def __init__(self, n_sites: int, bond_dim: int, feature_map: str = "cos-sin", *, n_labels: int = 10,
                 sweeps: int = 3, sweep: str = "serial", ntiles: int | None = None, solver: str = "cg",
                 iters: int = 5, reg: float = 1e-3, lr: float = 1.0, cutoff: float = 1e-10,
                 boundary: int | None = None, warmup: int = 0, dtype: str = "float32", seed: int = 0,
                 runtime: Runtime | None = None):
        self.n_sites = _int(n_sites, "n_sites", 2)
        self.bond_dim = _int(bond_dim, "bond_dim", 1)
        self.feature_map = features.check_feature_map(feature_map)
        self.n_labels = _int(n_labels, "n_labels", 2)
        self.sweeps = _int(sweeps, "sweeps", 1)
        if sweep not in SWEEPS:
            raise ValueError(f"sweep={sweep!r} is not valid; valid values: {', '.join(SWEEPS)}")
        self.sweep = sweep
        self.ntiles = None if ntiles is None else _int(ntiles, "ntiles", 1)
        if solver not in SOLVERS:
            raise ValueError(f"solver={solver!r} is not valid; valid values: {', '.join(SOLVERS)}")
        self.solver = solver
        self.iters = _int(iters, "iters", 1)
        self.reg = _real(reg, "reg", 0.0)
        self.lr = _real(lr, "lr", 0.0, open_low=True)
        self.cutoff = _real(cutoff, "cutoff", 0.0, 1.0)
        if str(dtype) not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not valid; valid values: {', '.join(DTYPES)}")
        self.dtype = np.dtype(str(dtype))
        self.seed = _int(seed, "seed", 0)
        if runtime is not None and not isinstance(runtime, Runtime):
            raise ValueError(f"runtime must be a lotus_rt Runtime or None, got {type(runtime).__name__}")
        self.runtime = runtime
        self.warmup = _int(warmup, "warmup", 0)
        self.engine = self._make_engine(boundary)
        if self.n_sites < self.engine.min_sites():
            raise ValueError(f"sweep={sweep!r} needs n_sites >= {self.engine.min_sites()}, got {self.n_sites}")
        if sweep == "realspace":
            self.engine.boundary(self.n_sites)  # a bad boundary is an error now, not at fit()
        elif boundary is not None or self.warmup:
            raise ValueError("boundary and warmup apply to sweep='realspace' only")
        self.state_: state_mod.MPSState | None = None
        self.history_: list[SweepReport] = []

    def _make_engine(self, boundary: int | None) -> Any:
        if self.sweep == "serial":
            return SerialSweep(1 if self.ntiles is None else self.ntiles)
        if self.sweep == "batch":
            return BatchParallelSweep(self.ntiles)
        if boundary is not None:
            boundary = _int(boundary, "boundary", 2)
        return RealSpaceSweep(1 if self.ntiles is None else self.ntiles, boundary, self.warmup)

    def _rt(self) -> Runtime:
        return self.runtime if self.runtime is not None else process_runtime()

    def _solver(self) -> Solver:
        return Solver(max_rank=self.bond_dim, kind=self.solver, iters=self.iters, reg=self.reg, lr=self.lr,
                      cutoff=self.cutoff)

    # ---------------------------------------------------------------------------------- input checks

    def _labels(self, y: Any, n: int, what: str) -> np.ndarray:
        arr = np.asarray(y)
        if arr.ndim != 1 or arr.shape[0] != n:
            raise ValueError(f"{what} must be a 1-d array of {n} labels (one per sample), got shape {arr.shape}")
        if arr.dtype.kind not in "iub":
            if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
                raise ValueError(f"{what} must hold integer class labels, got dtype {arr.dtype}")
        labels = arr.astype(np.int64)
        if labels.min() < 0 or labels.max() >= self.n_labels:
            raise ValueError(f"{what} holds labels in [{labels.min()}, {labels.max()}], outside "
                             f"0..{self.n_labels - 1} (n_labels={self.n_labels})")
        return np.ascontiguousarray(labels)

    def _check_xy(self, x: Any, y: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
        pixels = features.check_pixels(x, self.n_sites, what=f"X{what}")
        return pixels, self._labels(y, pixels.shape[0], f"y{what}")

    # ---------------------------------------------------------------------------------- training

    def fit(self, x: Any, y: Any, *, x_val: Any = None, y_val: Any = None,
            on_bond: Callable[[int, int, float], None] | None = None,
            on_sweep: Callable[[SweepReport], None] | None = None) -> "MPSClassifier":
        """Train on ``x`` (n, n_sites) in [0, 1] and integer labels ``y``.

        ``on_bond(done, total, train_accuracy)`` is called as each bond update of a sweep
        finishes; ``on_sweep(report)`` after each sweep.
        """
        pixels, labels = self._check_xy(x, y, "")
        val = None
        if x_val is not None or y_val is not None:
            if x_val is None or y_val is None:
                raise ValueError("give both x_val and y_val, or neither")
            val = self._check_xy(x_val, y_val, "_val")
        rt = self._rt()
        n_workers = sum(kind == "cpu" for kind, _ in rt.workers) or 1
        n, d, dim, nlab = pixels.shape[0], features.LOCAL_DIM, self.bond_dim, self.n_labels
        center = self.engine.center_site(self.n_sites)
        state = state_mod.random(self.n_sites, dim, d, nlab, center, self.seed, self.dtype)
        feats = features.site_major(pixels, self.feature_map, self.dtype)
        solver = self._solver()
        self.history_ = []
        persistent: list[Handle] = []
        failed = False
        try:
            data = TiledData(rt, feats, labels, self.engine.ntiles(n_workers))
            persistent += data.handles()
            envs = Environments(rt, data, dim, nlab, self.dtype, self.engine.labelled_cuts(self.n_sites))
            persistent += envs.handles()
            self.engine.start(rt, (dim, d, d, dim, nlab), data.ntiles, self.dtype)
            for s in range(self.sweeps):
                report = self._sweep(rt, state, data, envs, solver, s, on_bond)
                if val is not None:
                    pred = inference.scores(rt, state, val[0], self.feature_map, 2 * n_workers).argmax(axis=1)
                    report.val_accuracy = float((pred == val[1]).mean())
                self.history_.append(report)
                if on_sweep is not None:
                    on_sweep(report)
        except BaseException:
            failed = True
            raise
        finally:
            self.engine.release()
            for h in persistent:
                h.unregister()
            if failed:  # the tasks after a failed one may fail too: they are consequences
                try:
                    rt.wait()
                except CodeletError:
                    pass
        self.state_ = state
        self.n_train_ = n
        return self

    def _sweep(self, rt: Runtime, state: state_mod.MPSState, data: TiledData, envs: Environments,
               solver: Solver, index: int, on_bond: Callable[[int, int, float], None] | None) -> SweepReport:
        visits = self.engine.visits(self.n_sites, index)
        info = np.zeros((self.n_sites - 1, 3))
        rows = np.zeros((visits, 3))
        start = time.perf_counter()
        tasks_before = sum(s.tasks for s in rt.stats())
        sites = [rt.register(state.sites[j]) for j in range(self.n_sites)]
        others = [rt.register(state.center)] + [rt.register(info[j]) for j in range(len(info))]
        row_handles = [rt.register(rows[i]) for i in range(visits)]
        try:
            model = Model(data, envs, sites, others[1:])
            if index == 0:
                submit_initial(rt, data, envs, sites, state.center_site)
            futures = self.engine.submit_sweep(rt, model, others[0], solver, row_handles, index)
            for i, future in enumerate(futures):
                future.result()
                if on_bond is not None:
                    with row_handles[i].acquire("R") as row:
                        on_bond(i + 1, len(futures), float(row[2]) / data.n_samples)
            rt.wait()
        finally:
            for h in sites + others + row_handles:
                h.unregister()
        elapsed = time.perf_counter() - start
        ranks = info[:, 0].astype(int)
        state.ranks = [1] + [int(r) for r in ranks] + [1]
        acc = rows[:, 2] / data.n_samples
        return SweepReport(sweep=index + 1, seconds=elapsed, train_accuracy=float(acc[-1]), val_accuracy=None,
                           max_rank=int(ranks.max()), mean_rank=float(ranks.mean()),
                           max_discarded=float(info[:, 1].max()), updates=visits,
                           tasks=sum(s.tasks for s in rt.stats()) - tasks_before,
                           bond_train_accuracy=[float(a) for a in acc])

    # ---------------------------------------------------------------------------------- inference

    def _fitted(self) -> state_mod.MPSState:
        if self.state_ is None:
            raise ValueError("this MPSClassifier is not fitted yet: call fit(X, y) first")
        return self.state_

    def decision_function(self, x: Any) -> np.ndarray:
        """(n, n_labels) scores; each row is defined up to a positive factor (arg-max is the class)."""
        state = self._fitted()
        pixels = features.check_pixels(x, self.n_sites)
        rt = self._rt()
        n_workers = sum(kind == "cpu" for kind, _ in rt.workers) or 1
        return inference.scores(rt, state, pixels, self.feature_map, 2 * n_workers)

    def predict(self, x: Any) -> np.ndarray:
        return self.decision_function(x).argmax(axis=1)

    def score(self, x: Any, y: Any) -> float:
        """Accuracy on (x, y)."""
        self._fitted()
        pixels, labels = self._check_xy(x, y, "")
        return float((self.predict(pixels) == labels).mean())

    def n_parameters(self) -> int:
        return self._fitted().n_parameters()
