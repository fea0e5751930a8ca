"""lotus_rt beyond one machine: StarPU-MPI ranks for data-parallel and distributed-graph work.

    import lotus_rt.distributed as dist
    world = dist.init()                          # under `lotus-rt launch -n 4 -- python train.py`
    model = dist.data_parallel(model)            # replica per rank, gradients reduced in the graph
    loss_fn(model(dist.shard(x)), dist.shard(y)).backward(); optimizer.step()

    y = dist.einsum("bi,ijk,kl->bjl", x, g1, g2, owners=[0, 1, 2])   # tasks where the data is

Everything runs on StarPU's own distributed engine, StarPU-MPI, through lotus_rt's binding
(``lotus_rt.starpu._mpi_shim.c``, compiled when starpumpi and MPI are found) and the runtime's
``World`` (``lotus_rt.runtime.mpi``: ranks, owned data, owner-computes tasks, reductions).
``data_parallel`` is in ``data_parallel.py``, the owner-map contraction graphs in ``graph.py``.
Without StarPU-MPI, ``init()`` raises one StarPUUnavailable naming what is missing.
"""
from __future__ import annotations

from lotus_rt.distributed.data_parallel import GradientReducer, broadcast_state, data_parallel, reducer_of, shard
from lotus_rt.distributed.graph import Graph, Remote, Tensor, einsum
from lotus_rt.runtime.mpi import World, init, world

__all__ = ["init", "world", "World", "data_parallel", "shard", "broadcast_state", "GradientReducer", "reducer_of",
           "Graph", "Tensor", "Remote", "einsum"]
