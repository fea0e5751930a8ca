"""What every layer pass shares: the arrays it registers, and waiting for its tasks.

A pass (one layer's forward or backward) registers the arrays its tasks use through a
``Registry`` and waits once at its end. ``waited_pass`` is the one place that does this: the
block submits; at its end (also when it raises, before the arrays are given back) the pass's
tasks are waited for, then every array is unregistered.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from lotus_rt.runtime import Handle, Runtime


class Registry:
    """Handles registered for one forward/backward call, unregistered together."""

    def __init__(self, rt: Runtime):
        self.rt, self.handles = rt, []

    def register(self, array: np.ndarray) -> Handle:
        handle = self.rt.register(array)
        self.handles.append(handle)
        return handle

    def unregister_all(self) -> None:
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.unregister()


def let_submitted_finish(rt: Runtime) -> None:
    """After a failed submit or run: wait for what was submitted, before its data is released."""
    try:
        rt.wait()
    except Exception:  # the failure being raised already says what went wrong
        pass


@contextlib.contextmanager
def waited_pass(rt: Runtime) -> Iterator[Registry]:
    """Submit a pass's tasks inside the block on the arrays registered through the yielded
    registry; wait for them at its end (also when the block raises, before the arrays are given
    back); then unregister every array."""
    registry = Registry(rt)
    try:
        yield registry
        rt.wait()
    except BaseException:
        let_submitted_finish(rt)
        raise
    finally:
        registry.unregister_all()
