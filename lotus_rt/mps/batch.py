"""The batch-parallel sweep: the serial schedule, every gradient split over batch tiles.

The per-sample environments, the bond gradient and every CG product H p are sums over
samples, so with T tiles each of them is T independent tasks (one GEMM pair of n/T samples
each) followed by a binary tree of T-1 add tasks; the CG vector update, the SVD and the merge
stay single tasks. The arithmetic is the serial sweep's, summed in another order: the results
agree to rounding. Default T: ``TILES_PER_WORKER`` tiles per CPU worker.
"""
from __future__ import annotations

from lotus_rt.mps.serial import SerialSweep

# One tile per worker measured fastest on 2 CPU workers (D=20, 4 000 images, float32, two
# sweeps each, two alternating rounds: 5.0 s a sweep at 1 per worker, 5.5 s at 2, the tasks per
# sweep 10 916 vs 21 052): per-task costs outweigh the balancing that smaller tiles buy.
TILES_PER_WORKER = 1


class BatchParallelSweep(SerialSweep):
    name = "batch"

    def __init__(self, ntiles: int | None = None):
        super().__init__(1 if ntiles is None else ntiles)
        self._auto = ntiles is None

    def ntiles(self, n_workers: int) -> int:
        return TILES_PER_WORKER * max(1, n_workers) if self._auto else self.ntiles_requested
