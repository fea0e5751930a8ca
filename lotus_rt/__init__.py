"""lotus_rt: tensorized neural networks run as StarPU task DAGs on CPUs and GPUs.

    >>> import lotus_rt
    >>> rt = lotus_rt.runtime()          # StarPU (or the inline reference engine)
    >>> rt.engine in ("starpu", "inline")
    True

See ``lotus_rt.runtime`` for the task API; ``stats()`` and ``trace()`` observe what ran.
"""
from __future__ import annotations

from lotus_rt.errors import CodeletError, ConfigError, LotusError, StarPUUnavailable
from lotus_rt.runtime import Runtime, RunStats, TaskRecord, WorkerStats, runtime, shutdown

__version__ = "0.1.0"


def einsum(equation, *operands, optimize=None, tile: int | None = None):
    """Evaluate an einsum as a DAG of GEMM-shaped tasks on the runtime: a drop-in for
    ``numpy.einsum`` / ``opt_einsum.contract``.

    The whole grammar numpy takes (``lotus_rt.tn.grammar``): explicit or implicit output,
    ``...`` with broadcasting, size-1 broadcasting, scalars, any letters, and the interleaved
    form ``einsum(op, sublist, op, sublist, [out])``. Operands are NumPy arrays (or numbers,
    lists) or CPU torch tensors; the result is the same kind, in numpy's result dtype (computed
    in float32/float64; integers exactly, complex refused). ``optimize`` takes what opt_einsum
    takes: a path optimizer's name (default LOTUS_OPTIMIZE or "auto"), True/False, a
    PathOptimizer, an explicit path or ``opt_einsum.contract_path``'s result. ``tile`` splits the
    output's leading index into tiles of that length (default: chosen per problem, or LOTUS_TILE
    as the runtime read it). Bad input is one error before any task runs. See ``lotus_rt.tn``
    for the backward pass and ``contract_expression`` for a reusable expression.

        >>> import numpy as np, lotus_rt
        >>> a, b = np.ones((4, 3)), np.ones((3, 2))
        >>> float(lotus_rt.einsum("ij,jk->ik", a, b)[0, 0])
        3.0
        >>> lotus_rt.einsum("ij,jk", a, b).shape, lotus_rt.einsum("...j,->...", a, 2).shape
        ((4, 2), (4,))
    """
    from lotus_rt import tn
    return tn.einsum(equation, *operands, optimize=optimize, tile=tile)


def contract_expression(equation: str, *shapes, optimize=None, tile: int | None = None):
    """A reusable einsum for operands of these shapes, like ``opt_einsum.contract_expression``:
    checked and planned once; each call finds that plan in the plan cache (``stats().caches``).

        >>> import numpy as np, lotus_rt
        >>> expr = lotus_rt.contract_expression("ij,jk->ik", (4, 3), (3, 2))
        >>> float(expr(np.ones((4, 3)), np.ones((3, 2)))[0, 0])
        3.0
    """
    from lotus_rt import tn
    return tn.contract_expression(equation, *shapes, optimize=optimize, tile=tile)


def stats(reset: bool = False) -> RunStats:
    """Per worker of the process-wide runtime: tasks run and busy seconds (a list; its
    ``.caches`` holds the hits and misses of lotus_rt's caches, e.g. ``["plans"]``)."""
    return runtime().stats(reset=reset)


def trace(clear: bool = False) -> list[TaskRecord]:
    """Per finished task of the process-wide runtime: name, worker, start and end seconds."""
    return runtime().trace(clear=clear)


_NN_NAMES = ("TTLinear", "TuckerConv2d", "CPConv2d", "tensorize", "offload")


def __getattr__(name: str):
    """The torch-facing names load lazily: ``import lotus_rt`` alone does not import torch."""
    if name in _NN_NAMES:
        from lotus_rt import nn
        return getattr(nn, name)
    raise AttributeError(f"module 'lotus_rt' has no attribute {name!r}")


__all__ = [*_NN_NAMES, "einsum", "contract_expression", "runtime", "shutdown", "stats", "trace", "Runtime", "WorkerStats", "TaskRecord",
           "CodeletError", "ConfigError", "LotusError", "StarPUUnavailable", "__version__"]
