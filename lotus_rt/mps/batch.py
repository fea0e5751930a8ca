"""The batch-parallel sweep: the serial schedule, every gradient split over batch tiles.

The per-sample environments, the bond gradient and every CG product H p are sums over
samples, so with T tiles each of them is T independent tasks (one GEMM pair of n/T samples
each) followed by a binary tree of T-1 add tasks; the CG vector update, the SVD and the merge
stay single tasks. The arithmetic is the serial sweep's, summed in another order: the results
agree to rounding. Default T: two tiles per CPU worker, so that a worker that finishes early
takes another tile.
"""
from __future__ import annotations

from lotus_rt.mps.serial import SerialSweep


class BatchParallelSweep(SerialSweep):
    name = "batch"

    def __init__(self, ntiles: int | None = None):
        super().__init__(1 if ntiles is None else ntiles)
        self._auto = ntiles is None

    def ntiles(self, n_workers: int) -> int:
        return 2 * max(1, n_workers) if self._auto else self.ntiles_requested
