"""Step plans: a recorded list of tasks that the engine submits again, in one call, at every run.

A training step submits the same tasks, on the same data, at every step: only the data's
contents change. ``Runtime.record()`` captures the tasks submitted inside its block into a
``StepPlan`` instead of running them; ``plan.run()`` then submits them all, in their recorded
order (so StarPU derives the same implicit dependencies), through one call into the binding
(``lotus_plan_submit``): no Python per task on the submitting side. On the worker side a task
of a plan keeps its NumPy views between runs (its buffers stay where they are).

State. The plan holds its tasks (engine records, the Python ``Task`` objects with their
bodies and arguments), every ``Handle`` they use (so none is garbage-collected while the plan
lives), and the temporaries whose ``unregister_submit()`` the recorded code asked for: those are
freed with the plan, not after the first run. Data registered for a plan must stay registered
and in place until ``release()``: the plan reads and writes the same memory at every run.

    >>> import numpy as np, lotus_rt
    >>> rt = lotus_rt.runtime()
    >>> a = np.zeros(3); h = rt.register(a)
    >>> add = rt.codelet("add_one", cpu=lambda x: np.add(x, 1, out=x))
    >>> with rt.record() as plan:
    ...     _ = rt.submit(add, (h, "RW"))
    >>> for _ in range(3):
    ...     plan.run(); rt.wait()
    >>> plan.release(); h.unregister()[0]
    3.0
"""
from __future__ import annotations

from typing import Any

from lotus_rt.runtime.core import Handle, Task


class StepPlan:
    """A recorded list of tasks, run again by one call (see the module docstring)."""

    def __init__(self, runtime: Any, ref: Any):
        self._runtime = runtime
        self._ref = ref
        self.tasks: list[Task] = []
        self.task_ids: list[int] = []
        self._handles: dict[int, Handle] = {}
        self._deferred: list[Handle] = []  # temporaries freed with the plan
        self._last_run: int | None = None  # the runtime's wait count when last run
        self.runs = 0

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def released(self) -> bool:
        return self._ref is None

    def _add(self, task: Task, task_id: int) -> None:
        self.tasks.append(task)
        self.task_ids.append(task_id)
        for handle in task.handles:
            self._handles[id(handle)] = handle

    def _defer(self, handle: Handle) -> None:
        self._deferred.append(handle)

    def run(self) -> None:
        """Submit every recorded task, in order (after the previous run's tasks, which are
        waited for first if nothing waited since). Does not wait: call ``runtime.wait()``."""
        if self._ref is None:
            raise RuntimeError("this step plan was released")
        rt = self._runtime
        rt._check_open()
        for handle in self._handles.values():
            if not handle.registered and not handle.temporary:
                raise RuntimeError(f"a step plan uses {handle!r}, which was unregistered: the plan "
                                   "must be released before its data")
        if self._last_run is not None and self._last_run == rt._waits:
            rt.wait()  # a task may be submitted again only once it has terminated
        for task in self.tasks:
            task.future._error = None
            task.future._observed = False
        self._last_run = rt._waits
        self.runs += 1
        rt._engine.plan_run(self._ref, self.tasks)

    def release(self) -> None:
        """Wait for the plan's last run, free its tasks and its deferred temporaries (idempotent)."""
        if self._ref is None:
            return
        rt = self._runtime
        ref, self._ref = self._ref, None
        if rt.closed:
            return
        if self._last_run is not None and self._last_run == rt._waits:
            rt._engine.wait_all()
        rt._engine.plan_free(ref, self.task_ids)
        for handle in self._deferred:
            rt._engine.unregister_submit(handle._ref)
        self._deferred.clear()
        self._handles.clear()

    def __del__(self):
        if getattr(self, "_ref", None) is not None:
            try:
                if not self._runtime._engine.in_task():
                    self.release()
            except Exception:  # interpreter shutdown or a closed runtime
                pass

    def __repr__(self) -> str:
        state = "released" if self._ref is None else f"{self.runs} run(s)"
        return f"StepPlan({len(self.tasks)} tasks, {state})"
