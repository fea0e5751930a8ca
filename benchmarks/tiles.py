"""Tile-size sweep: how finely to cut a GEMM and a TT contraction into tasks.

In one process (the default StarPU configuration of the environment), two workloads at
several tile sizes:

- ``C = A @ B`` (float64, ``--size``) through ``lotus_rt.workloads.gemm_dag`` with each tile of
  ``--gemm-tiles``: (size / tile)³ tasks. Tile = size is the untiled variant, one task.
- a TT-matrix layer forward (1024 -> 1024, ``--rank``, batch ``--batch``) through
  ``lotus_rt.einsum(..., tile=t)`` for ``tile=None`` (the planner's choice, "auto") and each
  of ``--tt-tiles``; tile = batch is the untiled variant (one task per contraction step).

Each variant is checked against NumPy (that call doubles as a warm-up), warmed up again, then
the variants of one workload are timed in ``--repeats`` interleaved rounds. Reported per
variant: tiles, tasks, median time and the speedup against the untiled variant (median of the
per-round ratios untiled / variant; > 1: tiling pays).

    python -m benchmarks tiles [--quick] [--out DIR] [--gemm-tiles 1536,512,256,128]

Writes ``tiles[_quick].json`` and ``tiles[_quick].png``. Exit status 1 when a result
disagrees with NumPy.
"""
from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    import pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402


def sweep(workloads: list[common.Workload], untiled: str, repeats: int, warmup: int) -> list[dict]:
    """Measure ``workloads`` side by side; rows with the speedup against the ``untiled`` one."""
    results = common.measure(workloads, repeats, warmup)
    base = results[untiled]["time_s"]["samples"]
    rows = []
    for w in workloads:
        r = results[w.name]
        # interleaved() gives sample k of every variant from the same round: pair them
        ratios = [b / t for b, t in zip(base, r["time_s"]["samples"])]
        tile = w.params["tile"]
        rows.append({"variant": w.name, "tile": "auto" if tile is None else tile,
                     "untiled": w.name == untiled, **r,
                     "speedup_vs_untiled": common.median_spread(ratios)})
    return rows


def plot(result: dict, path) -> None:
    fig, axes = common.figure(2, width=5.6)
    cfg = result["config"]
    titles = {"gemm": f"tiled GEMM {cfg['gemm']['size']}², float64",
              "tt": f"TT r{cfg['tt']['rank']} einsum, batch {cfg['tt']['batch']}, float32"}
    for ax, kind in zip(axes, ("gemm", "tt")):
        rows = result[kind]
        labels = [f"{r['tile']}{' (' + str(r['plan_tile']) + ')' if r['tile'] == 'auto' else ''}\n"
                  f"{r['tasks']} task{'s' if r['tasks'] > 1 else ''}" for r in rows]
        common.speedup_bars(ax, labels, {"speedup": [r["speedup_vs_untiled"] for r in rows]},
                            ylabel="speedup vs untiled (> 1: tiling pays)", title=titles[kind])
        ax.set_xlabel("tile")
        ax.tick_params(axis="x", labelsize=7)
    env = result["environment"]
    common.save(fig, path, f"tile-size sweep, policy {env['policy']}, {len(env['workers'])} "
                           f"{env['engine']} workers ({env['date']}, {env['hostname']})")


def main(argv: list[str] | None = None) -> int:
    p = common.parser("tiles", __doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=None, help="GEMM size (default 1536; 256 with --quick)")
    p.add_argument("--gemm-tiles", type=common.int_list, default=None,
                   help="GEMM tiles (default 768,512,384,256,128,64; 128,64,32 with --quick); "
                        "the untiled size is always added")
    p.add_argument("--batch", type=int, default=None, help="TT batch (default 512; 32 with --quick)")
    p.add_argument("--rank", type=int, default=None, help="TT rank (default 16; 4 with --quick)")
    p.add_argument("--tt-tiles", type=common.int_list, default=None,
                   help="fixed TT tiles (default 256,128,64,32,16; 16,8,4 with --quick); "
                        "auto and the untiled batch are always added")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; 3 with --quick)")
    args = p.parse_args(argv)
    q = args.quick
    size = args.size or (256 if q else 1536)
    gemm_tiles = args.gemm_tiles or ([128, 64, 32] if q else [768, 512, 384, 256, 128, 64])
    batch, rank = args.batch or (32 if q else 512), args.rank or (4 if q else 16)
    tt_tiles = args.tt_tiles or ([16, 8, 4] if q else [256, 128, 64, 32, 16])
    repeats, warmup = args.repeats or (3 if q else 5), 1 if q else 2

    import lotus_rt
    rt = lotus_rt.runtime()
    gemm_tiles = [size] + sorted({t for t in gemm_tiles if 0 < t < size}, reverse=True)
    tt_tiles = [None, batch] + sorted({t for t in tt_tiles if 0 < t < batch}, reverse=True)
    print(f"tiles: engine={rt.engine} policy={rt.policy} workers={len(rt.workers)}; "
          f"GEMM {size}² tiles {gemm_tiles}, TT r{rank} batch {batch} tiles {tt_tiles}")
    gemm_rows = sweep([common.gemm_workload(rt, size, t) for t in gemm_tiles],
                      f"gemm{size}_t{size}", repeats, warmup)
    tt_rows = sweep([common.tt_workload(rt, batch, rank, t) for t in tt_tiles],
                    f"tt_r{rank}_b{batch}_t{batch}", repeats, warmup)
    best = {kind: min(rows, key=lambda r: r["time_s"]["median"])["variant"]
            for kind, rows in (("gemm", gemm_rows), ("tt", tt_rows))}
    result = {
        "scenario": "tiles", "quick": q, "environment": common.environment(rt),
        "config": {"gemm": {"size": size, "tiles": gemm_tiles, "dtype": "float64"},
                   "tt": {"batch": batch, "rank": rank, "tiles": tt_tiles, "dtype": "float32"},
                   "repeats": repeats, "warmup": warmup},
        "gemm": gemm_rows, "tt": tt_rows, "best": best,
    }
    path = common.write_result(args.out, "tiles", q, result)
    plot(result, common.png_path(path))
    print(f"{'workload':<22} {'tile':>5} {'tasks':>6} {'median ms':>10} {'vs untiled':>10} {'rel err':>8}")
    for r in gemm_rows + tt_rows:
        tile = f"{r['tile']}" + (f"={r['plan_tile']}" if r["tile"] == "auto" else "")
        print(f"{r['variant']:<22} {tile:>5} {r['tasks']:>6} {r['time_s']['median'] * 1e3:>10.2f} "
              f"{r['speedup_vs_untiled']['median']:>9.2f}x {r['max_rel_error']:>8.1e}")
    print(f"best: GEMM {best['gemm']}, TT {best['tt']}; wrote {path} and {common.png_path(path)}")
    ok = common.report_errors([(r["variant"], r["max_rel_error"], r["tolerance"]) for r in gemm_rows + tt_rows])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
