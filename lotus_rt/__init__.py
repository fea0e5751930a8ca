"""lotus_rt: tensorized neural networks run as StarPU task DAGs on CPUs and GPUs.

    >>> import lotus_rt
    >>> rt = lotus_rt.runtime()          # StarPU (or the inline reference engine)
    >>> rt.engine in ("starpu", "inline")
    True

See ``lotus_rt.runtime`` for the task API; ``stats()`` and ``trace()`` observe what ran.
"""
from __future__ import annotations


def _kernels_from_source_checkout() -> None:
    """Make ``lotus_rt.kernels`` importable from an uninstalled source checkout.

    setup.py installs the top-level ``kernels/`` folder as ``lotus_rt.kernels``; a checkout that
    is only on PYTHONPATH (the GPU machines, which cannot pip-install) has no such package, so
    the folder next to this one is loaded under that name.
    """
    import importlib.util
    import pathlib
    import sys
    if "lotus_rt.kernels" in sys.modules or importlib.util.find_spec("lotus_rt.kernels") is not None:
        return
    folder = pathlib.Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location("lotus_rt.kernels", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["lotus_rt.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # what the import system does for a found submodule


_kernels_from_source_checkout()

from lotus_rt.errors import CodeletError, ConfigError, LotusError, StarPUUnavailable  # noqa: E402
from lotus_rt.runtime import Runtime, TaskRecord, WorkerStats, runtime, shutdown

__version__ = "0.1.0"


def einsum(equation: str, *operands, optimize: str | None = None, tile: int | None = None):
    """Evaluate an einsum (explicit ``->``) as a DAG of GEMM-shaped tasks on the runtime.

    Operands are NumPy arrays or CPU torch tensors of one float dtype; the result is the same
    kind. ``optimize`` is an opt_einsum path optimizer (default LOTUS_OPTIMIZE or "auto");
    ``tile`` splits the output's leading index into tiles of that length (default: chosen
    per problem, or LOTUS_TILE). See ``lotus_rt.tn`` for the backward pass.

        >>> import numpy as np, lotus_rt
        >>> a, b = np.ones((4, 3)), np.ones((3, 2))
        >>> lotus_rt.einsum("ij,jk->ik", a, b)[0, 0]
        3.0
    """
    from lotus_rt import tn
    return tn.einsum(equation, *operands, optimize=optimize, tile=tile)


def stats(reset: bool = False) -> list[WorkerStats]:
    """Per worker of the process-wide runtime: tasks run and busy seconds."""
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


__all__ = [*_NN_NAMES, "einsum", "runtime", "shutdown", "stats", "trace", "Runtime", "WorkerStats", "TaskRecord",
           "CodeletError", "ConfigError", "LotusError", "StarPUUnavailable", "__version__"]
