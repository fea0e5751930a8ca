"""How a layer's batch is cut into tiles, and which layers run fused instead of as a DAG.

Every piece of a layer treats the samples of a batch independently, so the batch is cut into
tiles and each tile is an independent chain of tasks. ``batch_tiles`` sizes them from the
layer's forward FLOPs; ``use_fused`` decides, from the runtime's settings (LOTUS_FUSE, LOTUS_TILE)
and the FLOPs, whether a layer runs as one fused task per tile (``layers.fused``) or as a DAG of
contraction tasks per tile (``layers.dag``).
"""
from __future__ import annotations

from lotus_rt.runtime.settings import Settings
from lotus_rt.tn.plan import MIN_TASK_FLOPS

# A batch tile's forward should carry several task-sized pieces of work: its backward has about
# three times as many tasks, each costing tens of microseconds of Python on top of its math.
TILE_FLOPS = 8 * MIN_TASK_FLOPS
MAX_TILES_PER_WORKER = 4
# Below TILE_FLOPS a batch is still cut into one tile per worker once each worker's share is
# worth a task: one tile would run the layer's whole chain on one worker while the others idle
# (measured on the demo's layers, 2026-11-27: benchmarks/RESULTS.md, "Fifth session").
SPLIT_FLOPS = MIN_TASK_FLOPS
# Measured on 2 cores (2026-11-27, training steps, fused vs DAG interleaved in one process, with
# the idle pause in C): fused wins at 0.05-1.8e6 forward FLOPs (DAG 1.15-1.31x slower), ties near
# 4e6 (0.91-1.05x), loses from 8e6 up (0.70-0.85x). The bar was 4e7 before the idle pause.
FUSE_FLOPS = MIN_TASK_FLOPS / 5
# A fused tile is one task: worth splitting at a tenth of a task's work per worker. Under
# LOTUS_FUSE=auto a fused layer is too small for that on 2+ workers; LOTUS_FUSE=on splits.
FUSED_SPLIT_FLOPS = MIN_TASK_FLOPS / 10


def batch_tiles(n: int, flops: float, nworkers: int, rows: int | None = None,
                split_flops: float = SPLIT_FLOPS) -> list[tuple[int, int]]:
    """(start, stop) ranges over a batch of ``n`` whose forward costs ``flops``: one tile per
    ~TILE_FLOPS, and at least one per worker once each worker's share reaches ``split_flops``;
    at most MAX_TILES_PER_WORKER per worker and one per sample. ``rows`` (LOTUS_TILE) fixes
    the tile length instead."""
    if rows is None:
        nworkers = max(1, nworkers)
        ntiles = int(flops // TILE_FLOPS)
        if flops >= nworkers * split_flops:
            ntiles = max(ntiles, nworkers)
        ntiles = min(max(ntiles, 1), MAX_TILES_PER_WORKER * nworkers, n)
        rows = -(-n // ntiles)
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


def use_fused(settings: Settings, flops: float) -> bool:
    """Whether a layer whose forward costs ``flops`` runs fused (one task per tile and pass)."""
    return settings.fuse == "on" or (settings.fuse == "auto" and flops < FUSE_FLOPS and settings.tile is None)
