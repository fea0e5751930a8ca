"""Exception types of lotus_rt: one class per kind of failure a user must tell apart."""
from __future__ import annotations


class LotusError(Exception):
    """Base class of every lotus_rt error."""


class ConfigError(LotusError, ValueError):
    """An environment variable or argument has a value lotus_rt or StarPU cannot use."""


class StarPUUnavailable(LotusError, RuntimeError):
    """libstarpu or lotus_rt's binding to it cannot be loaded or initialised."""


class CodeletError(LotusError, RuntimeError):
    """A codelet body raised; the original exception is chained as ``__cause__``."""

    def __init__(self, message: str, codelet: str, task: str, worker: str):
        super().__init__(message)
        self.codelet = codelet
        self.task = task
        self.worker = worker
