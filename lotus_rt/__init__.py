"""lotus_rt: tensorized neural networks run as StarPU task DAGs on CPUs and GPUs.

    >>> import lotus_rt
    >>> rt = lotus_rt.runtime()          # StarPU (or the inline reference engine)
    >>> rt.engine in ("starpu", "inline")
    True

See ``lotus_rt.runtime`` for the task API; ``stats()`` and ``trace()`` observe what ran.
"""
from __future__ import annotations

from lotus_rt.errors import CodeletError, ConfigError, LotusError, StarPUUnavailable
from lotus_rt.runtime import Runtime, TaskRecord, WorkerStats, runtime, shutdown

__version__ = "0.1.0"


def stats(reset: bool = False) -> list[WorkerStats]:
    """Per worker of the process-wide runtime: tasks run and busy seconds."""
    return runtime().stats(reset=reset)


def trace(clear: bool = False) -> list[TaskRecord]:
    """Per finished task of the process-wide runtime: name, worker, start and end seconds."""
    return runtime().trace(clear=clear)


__all__ = ["runtime", "shutdown", "stats", "trace", "Runtime", "WorkerStats", "TaskRecord",
           "CodeletError", "ConfigError", "LotusError", "StarPUUnavailable", "__version__"]
