"""Reference task DAGs used by the demo, the benchmarks and the tests.

``tiled_gemm`` splits C = A @ B into square tiles and submits, for every output tile C[i,j],
the chain C[i,j] = A[i,0] B[0,j]; C[i,j] += A[i,k] B[k,j] for k = 1.. . Chains of different
output tiles are independent, so the scheduler can spread them over all workers; within a
chain StarPU's implicit dependencies on C[i,j] order the accumulations.

    >>> import numpy as np, lotus_rt
    >>> a, b = np.random.rand(64, 48), np.random.rand(48, 32)
    >>> bool(np.allclose(tiled_gemm(lotus_rt.runtime(), a, b, tile=16), a @ b))
    True
"""
from __future__ import annotations

import numpy as np

from lotus_rt.kernels import gemm
from lotus_rt.runtime import Runtime
from lotus_rt.runtime.core import Codelet

GEMM = Codelet("gemm", cpu=gemm.matmul_cpu, cuda=gemm.matmul_gpu)
GEMM_ACC = Codelet("gemm_acc", cpu=gemm.matmul_acc_cpu, cuda=gemm.matmul_acc_gpu)


def split_tiles(matrix: np.ndarray, tile: int) -> list[list[np.ndarray]]:
    """Contiguous copies of the ``tile`` x ``tile`` blocks of a 2-D array (edge blocks smaller)."""
    if not isinstance(tile, int) or tile <= 0:
        raise ValueError(f"tile must be a positive int, got {tile!r}")
    rows, cols = matrix.shape
    return [[np.ascontiguousarray(matrix[i:i + tile, j:j + tile]) for j in range(0, cols, tile)]
            for i in range(0, rows, tile)]


def gemm_dag(rt: Runtime, a_tiles: list[list[np.ndarray]], b_tiles: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """The tile DAG of C = A @ B on ``rt``: registers, submits, waits; returns C's tiles."""
    c_tiles = [[np.empty((a_row[0].shape[0], b_col.shape[1]), a_row[0].dtype) for b_col in b_tiles[0]]
               for a_row in a_tiles]
    ha = [[rt.register(t) for t in row] for row in a_tiles]
    hb = [[rt.register(t) for t in row] for row in b_tiles]
    hc = [[rt.register(t) for t in row] for row in c_tiles]
    precision = rt.settings.precision
    try:
        for k in range(len(b_tiles)):  # k outermost: every chain gets its first task early
            for i, row in enumerate(hc):
                for j, c in enumerate(row):
                    if k == 0:
                        rt.submit(GEMM, (ha[i][0], "R"), (hb[0][j], "R"), (c, "W"), name=f"gemm[{i},{j}]",
                                  precision=precision)
                    else:
                        rt.submit(GEMM_ACC, (ha[i][k], "R"), (hb[k][j], "R"), (c, "RW"),
                                  name=f"gemm[{i},{j}]+={k}", precision=precision)
        rt.wait()
    finally:
        for handles in (ha, hb, hc):
            for row in handles:
                for h in row:
                    h.unregister()
    return c_tiles


def tiled_gemm(rt: Runtime, a: np.ndarray, b: np.ndarray, tile: int) -> np.ndarray:
    """C = A @ B as a DAG of tile GEMM tasks on ``rt``; returns C (a new array)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"tiled_gemm: shapes {a.shape} and {b.shape} do not multiply")
    if a.dtype != b.dtype:
        raise ValueError(f"tiled_gemm: dtypes differ ({a.dtype} and {b.dtype})")
    return np.block(gemm_dag(rt, split_tiles(a, tile), split_tiles(b, tile)))
