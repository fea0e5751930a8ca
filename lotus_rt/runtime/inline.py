"""The ``inline`` engine: the sequential reference, and the fallback when StarPU is missing.

Each task runs in the submitting thread, at ``submit()``, on the registered arrays themselves
(read-only views for mode "R"). Submission order is a valid topological order of the implicit
data dependencies, so results equal any correct parallel schedule's. A failing body is recorded
exactly as on StarPU: it surfaces from ``wait()`` and from the task's future.
"""
from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np

from lotus_rt.runtime.core import ErrorLog, Task, TaskRecord, WorkerStats, monotonic, run_body
from lotus_rt.runtime.settings import Settings

WORKER = "inline"


class InlineEngine:
    name = "inline"
    policy = "inline"
    priority_range = (0, 0)  # tasks run in submission order

    def __init__(self, settings: Settings, errors: ErrorLog):
        self._errors = errors
        self._lock = threading.Lock()  # counters and trace are shared by submitting threads
        self._running = threading.local()  # .active while this thread runs a body
        self._tasks = 0
        self._busy = 0.0
        self._t0 = monotonic()
        self._trace_on = settings.trace
        self._trace: collections.deque[TaskRecord] = collections.deque(maxlen=settings.trace_capacity)
        self.workers = [("cpu", WORKER)]

    # data: the user's array is the only copy
    def register(self, array: np.ndarray) -> None:
        return None

    def register_temporary(self, handle: Any) -> np.ndarray:
        return np.empty(handle.shape, handle.dtype)  # the ref is the storage itself

    def unregister_submit(self, ref: Any) -> None:
        pass

    def unregister(self, ref: Any, array: np.ndarray | None) -> None:
        pass

    def acquire(self, ref: Any, mode: str) -> None:
        pass

    def release(self, ref: Any) -> None:
        pass

    def sync_home(self, ref: Any, mode: str) -> None:
        pass

    # step plans: the recorded tasks, run in order at every plan run
    def plan_new(self) -> list:
        return []

    def plan_add(self, plan: list, task: Task, task_id: int) -> None:
        plan.append((task, task_id))
        return None

    def plan_run(self, plan: list, tasks: list[Task]) -> None:
        for task, task_id in plan:
            self.submit(task, task_id)

    def plan_free(self, plan: list, task_ids: list[int]) -> None:
        plan.clear()

    def submit(self, task: Task, task_id: int) -> None:
        arrays = []
        for handle, mode in zip(task.handles, task.modes):
            data = handle._ref if handle.temporary else handle.array
            if mode == "R":
                data = data.view()
                data.flags.writeable = False
            arrays.append(data)
        start = monotonic()
        self._running.active = True
        try:
            run_body(task, task.codelet.cpu, arrays, WORKER, self._errors)
        finally:
            self._running.active = False
        end = monotonic()
        with self._lock:
            self._tasks += 1
            self._busy += end - start
            if self._trace_on:
                self._trace.append(TaskRecord(task_id, task.name, WORKER, "cpu", start - self._t0, end - self._t0))
        return None  # the future is already complete

    def wait_all(self) -> None:
        pass

    # tasks run at submit, in the submitting thread: there is nothing to pause
    def set_idle_pause(self, enabled: bool) -> None:
        pass

    def user_pause(self) -> None:
        pass

    def user_resume(self) -> None:
        pass

    def user_paused(self) -> bool:
        return False

    def stats(self, reset: bool) -> list[WorkerStats]:
        with self._lock:
            result = [WorkerStats(WORKER, "cpu", self._tasks, self._busy)]
            if reset:
                self._tasks, self._busy = 0, 0.0
        return result

    def trace(self, clear: bool) -> list[TaskRecord]:
        with self._lock:
            records = list(self._trace)
            if clear:
                self._trace.clear()
        return records

    def in_task(self) -> bool:
        # Waiting inside a body would not deadlock here, but it would on StarPU: same error.
        return getattr(self._running, "active", False)

    def shutdown(self) -> None:
        pass
