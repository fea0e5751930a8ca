"""Decompositions benchmark: lotus_rt.decompose against tensorly, side by side in one process.

Tensors (float64, seeded):

- ``conv``: a convolution weight (O, I, 3, 3) whose output and input channels carry decaying
  scales (Gaussian entries times geomspace(1, 0.05) along O and along I): a stand-in for a
  trained weight, whose channel spectra decay.
- ``random``: a Gaussian 3-way tensor (no structure: the hardest case for every method).
- ``low-rank``: exactly low-rank 3-way tensors, one per method: multilinear ranks equal to the
  Tucker ranks for ``tucker``/``tucker2``, CP rank equal to the CP rank for ``cp``, TT ranks
  equal to the TT ranks for ``tt``. Every method should fit them to round-off.

Methods, each with the same ranks, budget and stopping rule on both sides:

- ``tucker``: every mode; ``tensorly.decomposition.tucker`` vs ``decompose.tucker`` (HOSVD +
  HOOI, 100 sweeps at most, tol 1e-4 on the change of the relative error: both defaults).
- ``tucker2``: modes 0 and 1 only; ``partial_tucker(modes=[0, 1])`` vs ``tucker(modes=(0, 1))``.
- ``cp``: ``parafac(init="svd", n_iter_max=100, tol=1e-8, random_state=0)`` (tensorly's
  defaults) vs ``cp_als(n_iter_max=100, tol=1e-8, seed=0)``.
- ``tt``: ``tensor_train`` vs ``decompose.tt`` (TT-SVD, no iterations).

Accuracy: relative error ``||T - reconstruction|| / ||T||`` of each result (the same function
for both). Speed: ``--repeats`` interleaved rounds (the order alternates), each timing one call
of each side; the per-round ratio lotus_rt / tensorly, median over rounds (< 1: lotus_rt is
faster). BLAS runs on ``--blas-threads`` threads on both sides (default 1: on a small shared
machine more threads only add noise to calls of a few milliseconds); StarPU's workers are paused.

Target (issue 15): an error equal or better (within one part in 1e6, or both below 1e-12, the
round-off level) at <= 1.2x tensorly's time, on each row.

    python -m benchmarks decompose [--quick] [--out DIR] [--repeats 7] [--blas-threads 1]

Writes ``decompose[_quick].json`` and ``decompose[_quick].png`` (time ratio and errors per row).
Exit status 1 when a result is wrong (a low-rank tensor not fitted to 1e-8 by lotus_rt).
"""
from __future__ import annotations

import sys
import time
import warnings

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    import pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

TIME_TARGET = 1.2
LOW_RANK_TOLERANCE = 1e-8


def _orthonormal(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((n, r)))[0]


def tensors(quick: bool, seed: int = 0) -> dict:
    """name -> (tensor or per-method tensors, ranks per method)."""
    from lotus_rt import decompose as D

    rng = np.random.default_rng(seed)
    o, i = (32, 16) if quick else (128, 64)
    conv = rng.standard_normal((o, i, 3, 3)) * np.geomspace(1, 0.05, o)[:, None, None, None] \
        * np.geomspace(1, 0.05, i)[None, :, None, None]
    shape = (12, 14, 16) if quick else (40, 50, 60)
    tr = (3, 4, 5) if quick else (8, 10, 12)  # Tucker ranks of the 3-way tensors
    cp_rank = 4 if quick else 10
    tt_ranks = (3, 4) if quick else (8, 10)
    core = rng.standard_normal(tr)
    low_tucker = D.reconstruct_tucker(core, [_orthonormal(rng, n, r) for n, r in zip(shape, tr)])
    low_cp = D.reconstruct_cp([rng.standard_normal((n, cp_rank)) for n in shape])
    r_tt = (1, *tt_ranks, 1)
    low_tt = D.reconstruct_tt([rng.standard_normal((r_tt[k], n, r_tt[k + 1])) for k, n in enumerate(shape)])
    conv_ranks = {"tucker": (o // 4, i // 4, 3, 3), "tucker2": (o // 4, i // 4), "cp": o // 4, "tt": (o // 4, 8, 3)}
    ranks3 = {"tucker": tr, "tucker2": tr[:2], "cp": cp_rank, "tt": tt_ranks}
    return {
        "conv": ({m: conv for m in conv_ranks}, conv_ranks),
        "random": ({m: rng.standard_normal(shape) for m in ranks3}, ranks3),
        "low-rank": ({"tucker": low_tucker, "tucker2": low_tucker, "cp": low_cp, "tt": low_tt}, ranks3),
    }


def pair(method: str, t: np.ndarray, ranks) -> tuple:
    """(tensorly call, lotus_rt call): each returns the dense reconstruction's input (a callable
    making it), so that timing covers the decomposition only."""
    import tensorly as tl
    from tensorly import decomposition as tld

    from lotus_rt import decompose as D

    if method == "tucker":
        return (lambda: (tld.tucker(t, rank=list(ranks), n_iter_max=100, tol=1e-4),
                         lambda r: tl.tucker_to_tensor(r)),
                lambda: (D.tucker(t, ranks, n_iter_max=100, tol=1e-4), lambda r: D.reconstruct_tucker(*r)))
    if method == "tucker2":
        return (lambda: (tld.partial_tucker(t, rank=list(ranks), modes=[0, 1], n_iter_max=100, tol=1e-4)[0],
                         lambda r: tl.tenalg.multi_mode_dot(r[0], r[1], modes=[0, 1])),
                lambda: (D.tucker(t, ranks, modes=(0, 1), n_iter_max=100, tol=1e-4),
                         lambda r: D.reconstruct_tucker(r[0], r[1], (0, 1))))
    if method == "cp":
        return (lambda: (tld.parafac(t, ranks, init="svd", n_iter_max=100, tol=1e-8, random_state=0),
                         lambda r: tl.cp_to_tensor(r)),
                lambda: (D.cp_als(t, ranks, n_iter_max=100, tol=1e-8, seed=0),
                         lambda r: D.reconstruct_cp(r[1], r[0])))
    if method == "tt":
        return (lambda: (tld.tensor_train(t, [1, *ranks, 1]), lambda r: tl.tt_to_tensor(r)),
                lambda: (D.tt(t, list(ranks)), lambda r: D.reconstruct_tt(r)))
    raise ValueError(method)


def timed(call):
    def run() -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start
    return run


def at_least_as_good(ours: float, theirs: float) -> bool:
    return ours <= theirs * (1 + 1e-6) + 1e-12


def measure(kind: str, method: str, t: np.ndarray, ranks, repeats: int) -> dict:
    from lotus_rt import decompose as D

    theirs_call, ours_call = pair(method, t, ranks)
    errors = {}
    for side, call in (("tensorly", theirs_call), ("lotus_rt", ours_call)):
        result, dense = call()  # also the warm-up
        errors[side] = D.relative_error(dense(result), t)
    times = common.interleaved({"tensorly": timed(theirs_call), "lotus_rt": timed(ours_call)}, repeats,
                               settle_s=0.0)
    ratios = [o / r for o, r in zip(times["lotus_rt"], times["tensorly"])]
    ratio = common.median_spread(ratios)
    row = {"tensor": kind, "method": method, "shape": list(t.shape),
           "ranks": ranks if isinstance(ranks, int) else list(ranks),
           "error": errors, "time_s": {k: common.median_spread(v) for k, v in times.items()},
           "lotus_over_tensorly": ratio,
           "error_met": at_least_as_good(errors["lotus_rt"], errors["tensorly"]),
           "time_met": ratio["median"] <= TIME_TARGET}
    row["met"] = row["error_met"] and row["time_met"]
    return row


def plot(result: dict, path) -> None:
    fig, axes = common.figure(2, width=6.4)
    rows = result["rows"]
    labels = [f"{r['tensor']}\n{r['method']}" for r in rows]
    common.speedup_bars(axes[0], labels, {"lotus_rt / tensorly": [r["lotus_over_tensorly"] for r in rows]},
                        ylabel="time ratio lotus_rt / tensorly (< 1: faster)", baseline=TIME_TARGET,
                        title=f"time (dashed: target {TIME_TARGET}x)", rotate=True)
    common.speedup_bars(axes[1], labels, {side: [max(r["error"][side], 1e-16) for r in rows]
                                          for side in ("tensorly", "lotus_rt")},
                        ylabel="relative error", baseline=None, log=True, title="relative error", rotate=True)
    env = result["environment"]
    common.save(fig, path, f"decompositions vs tensorly {result['tensorly']}, BLAS threads "
                           f"{result['config']['blas_threads']} ({env['date']}, {env['hostname']})")


def main(argv: list[str] | None = None) -> int:
    p = common.parser("decompose", __doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; 3 with --quick)")
    p.add_argument("--blas-threads", type=int, default=1, help="BLAS threads for both sides (default 1)")
    args = p.parse_args(argv)
    q = args.quick
    repeats = args.repeats or (3 if q else 7)
    warnings.filterwarnings("ignore", message="Trying to compute SVD")  # tensorly, rank > a mode's size
    import importlib.metadata

    from threadpoolctl import threadpool_limits

    import lotus_rt
    rt = lotus_rt.runtime()
    rows = []
    with rt.paused(), threadpool_limits(args.blas_threads, "blas"):
        for kind, (by_method, ranks) in tensors(q).items():
            for method, t in by_method.items():
                row = measure(kind, method, t, ranks[method], repeats)
                rows.append(row)
                print(f"{kind:<9} {method:<8} ranks {str(row['ranks']):<16} error tensorly "
                      f"{row['error']['tensorly']:.3e} lotus_rt {row['error']['lotus_rt']:.3e} | ms tensorly "
                      f"{row['time_s']['tensorly']['median'] * 1e3:8.2f} lotus_rt "
                      f"{row['time_s']['lotus_rt']['median'] * 1e3:8.2f} ratio "
                      f"{row['lotus_over_tensorly']['median']:.2f}  {'met' if row['met'] else 'MISSED'}", flush=True)
    result = {"scenario": "decompose", "quick": q, "environment": common.environment(rt),
              "tensorly": importlib.metadata.version("tensorly"),
              "config": {"repeats": repeats, "blas_threads": args.blas_threads, "time_target": TIME_TARGET},
              "rows": rows, "all_met": all(r["met"] for r in rows)}
    path = common.write_result(args.out, "decompose", q, result)
    plot(result, common.png_path(path))
    print(f"targets met on {sum(r['met'] for r in rows)}/{len(rows)} rows; wrote {path} and {common.png_path(path)}")
    ok = common.report_errors([(f"{r['tensor']} {r['method']} (lotus_rt)", r["error"]["lotus_rt"], LOW_RANK_TOLERANCE)
                               for r in rows if r["tensor"] == "low-rank"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
