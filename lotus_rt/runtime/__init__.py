"""The engine-neutral runtime API: register arrays, define codelets, submit tasks, wait.

    >>> import numpy as np, lotus_rt
    >>> rt = lotus_rt.runtime()                      # process-wide, initialised on first use
    >>> a = np.arange(4.0); h = rt.register(a)
    >>> double = rt.codelet("double", cpu=lambda x: np.multiply(x, 2, out=x))
    >>> fut = rt.submit(double, (h, "RW"))
    >>> rt.wait(); h.unregister()[-1]
    6.0

The engine is StarPU (``LOTUS_ENGINE=starpu``, the default) or ``inline``, the sequential
reference that runs each task at submit. With LOTUS_ENGINE unset and StarPU unavailable, one
warning is given and ``inline`` is used. Every check on user input happens here, before a task
reaches the engine.
"""
from __future__ import annotations

import atexit
import contextlib
import itertools
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from lotus_rt.errors import ConfigError, StarPUUnavailable
from lotus_rt.runtime import heap, settings as settings_module
from lotus_rt.runtime.counters import RunStats, cache_stats
from lotus_rt.runtime.core import (Codelet, ErrorLog, Future, Handle, Task, TaskRecord, WorkerStats,
                                   check_priority, parse_accesses, raise_collected, task_name,
                                   validate_array, validate_cuda_array)
from lotus_rt.runtime.inline import InlineEngine
from lotus_rt.runtime.plans import StepPlan
from lotus_rt.runtime.settings import Settings

__all__ = ["Runtime", "runtime", "shutdown", "Codelet", "Handle", "Future", "WorkerStats", "TaskRecord",
           "Settings", "RunStats", "StepPlan"]


class Runtime:
    """One engine plus the bookkeeping every engine shares (errors, live handles)."""

    def __init__(self, settings: Settings | None = None):
        settings = settings_module.read_settings() if settings is None else settings
        if settings.heap == "keep":
            heap.keep_freed_memory(settings.outside)
        self._settings = settings
        self._errors = ErrorLog()
        self._trace_file = settings.trace_file
        self._engine = self._start_engine(settings)
        kinds = {kind for kind, _ in self._engine.workers}
        self._has_cpu, self._has_cuda = "cpu" in kinds, "cuda" in kinds
        self._ids = itertools.count(1)
        self._live: weakref.WeakSet[Handle] = weakref.WeakSet()
        self._closed = False
        self._recording: StepPlan | None = None
        self._recorder: int | None = None  # the thread recording, if any
        self._waits = 0  # completed wait()s: a plan runs again only after one
        self._plans: weakref.WeakSet[StepPlan] = weakref.WeakSet()

    def _start_engine(self, settings: Settings) -> Any:
        if settings.engine == "inline":
            return InlineEngine(settings, self._errors)
        from lotus_rt.runtime.starpu_engine import StarPUEngine
        try:
            return StarPUEngine(settings, self._errors)
        except StarPUUnavailable as exc:
            if settings.engine == "starpu":
                raise StarPUUnavailable(f"LOTUS_ENGINE=starpu but StarPU cannot be used: {exc}") from exc
            warnings.warn(f"lotus_rt: StarPU is unavailable, using the sequential 'inline' engine "
                          f"(set LOTUS_ENGINE=inline to silence this): {exc}", RuntimeWarning, stacklevel=3)
            return InlineEngine(settings, self._errors)

    # ------------------------------------------------------------------ description

    @property
    def engine(self) -> str:
        return self._engine.name

    @property
    def workers(self) -> list[tuple[str, str]]:
        """(kind, name) of every worker: kind is "cpu" or "cuda"."""
        return list(self._engine.workers)

    @property
    def policy(self) -> str:
        return self._engine.policy

    @property
    def settings(self) -> Settings:
        """The LOTUS_* settings in force, read from the environment when this runtime started
        (or at the last ``reconfigure()``); the layers and the planner take their choices here."""
        return self._settings

    def reconfigure(self, env: Mapping[str, str] | None = None, **changes: Any) -> Settings:
        """Re-read the knobs a running runtime can change (LOTUS_OPTIMIZE, LOTUS_TILE,
        LOTUS_FUSE, LOTUS_PRECISION, LOTUS_IDLE_PAUSE) from the environment (or ``env``), then
        apply ``changes`` (e.g. ``tile=4``, ``fuse="on"``). The engine, tracing and heap
        settings change only with a restart (``lotus_rt.shutdown()``, then ``runtime()``):
        asking for another value of one is a ConfigError. Returns the new settings."""
        self._check_open()
        fixed = sorted(set(changes) - set(settings_module.LIVE_KNOBS))
        if fixed:
            raise ConfigError(f"reconfigure(): {fixed[0]!r} cannot change while the runtime runs; live "
                              f"settings: {', '.join(settings_module.LIVE_KNOBS)}")
        new = settings_module.refreshed(self._settings, settings_module.read_settings(env))
        if changes:
            new = settings_module.with_changes(new, **changes)
        if new.idle_pause != self._settings.idle_pause:
            self._engine.set_idle_pause(new.idle_pause)
        self._settings = new
        return new

    @property
    def priority_range(self) -> tuple[int, int]:
        """(lowest, highest) task priority the policy distinguishes; others are clamped to it."""
        return self._engine.priority_range

    def __repr__(self) -> str:
        return f"Runtime(engine={self.engine!r}, policy={self.policy!r}, workers={len(self.workers)})"

    # ------------------------------------------------------------------ data

    def register(self, array: Any) -> Handle:
        """Register a C-contiguous NumPy array (zero copy); the array stays the data's home.

        An array already in CUDA device memory (any object with ``__cuda_array_interface__``:
        a CuPy array, a torch CUDA tensor) is registered on that device's memory node, also
        without a copy; ``unregister()`` leaves the results there. It needs a runtime with a
        CUDA worker on that device (not yet run on a GPU).
        """
        self._check_open()
        if not isinstance(array, np.ndarray) and hasattr(array, "__cuda_array_interface__"):
            return self._register_cuda(array)
        array = validate_array(array)
        handle = Handle(self, array, self._engine.register(array))
        self._live.add(handle)
        return handle

    def _register_cuda(self, obj: Any) -> Handle:
        device = validate_cuda_array(obj)
        if not self._has_cuda:
            kinds = sorted({kind for kind, _ in self.workers})
            raise ValueError(f"register(): this {type(obj).__name__} lives in CUDA device memory, but the "
                             f"runtime has no CUDA worker (engine {self.engine!r}, workers {kinds}); register "
                             "a host copy instead, or run a CUDA-enabled StarPU with STARPU_NCUDA >= 1")
        handle = Handle(self, device, self._engine.register_cuda(device))
        self._live.add(handle)
        return handle

    def temporary(self, shape: tuple[int, ...], dtype: Any) -> Handle:
        """Engine-allocated data for intermediates; free it with ``handle.unregister_submit()``."""
        self._check_open()
        shape = tuple(int(d) for d in shape)
        dtype = np.dtype(dtype)
        if any(d <= 0 for d in shape) or dtype.kind not in "biufc":
            raise ValueError(f"temporary(): shape {shape} must be positive and dtype {dtype} numeric")
        handle = Handle(self, None, None, shape=shape, dtype=dtype)
        handle._ref = self._engine.register_temporary(handle)
        self._live.add(handle)
        return handle

    def _unregister_submit(self, handle: Handle) -> None:
        self._live.discard(handle)
        plan = self._plan_recording()
        if plan is not None:  # the recorded tasks will use it at every run: freed with the plan
            plan._defer(handle)
        elif not self._closed:
            self._engine.unregister_submit(handle._ref)

    def _unregister(self, handle: Handle) -> None:
        if not self._closed:
            self._check_not_in_task("unregister()")
            self._check_not_paused("unregister()")
            self._check_not_recording("unregister()")
            self._engine.unregister(handle._ref, handle.array)
        self._live.discard(handle)

    def _orphan(self, handle: Handle) -> None:
        if not self._closed and hasattr(self._engine, "orphan"):
            self._engine.orphan(handle._ref, handle.array)

    def _acquire(self, handle: Handle, mode: str) -> None:
        self._check_open()
        self._check_not_in_task("acquire()")
        self._check_not_paused("acquire()")
        self._check_not_recording("acquire()")
        self._engine.acquire(handle._ref, mode)

    def _sync_home(self, handle: Handle, mode: str) -> None:
        self._check_open()
        self._check_not_in_task("written_at_home()/bring_home()")
        self._check_not_paused("written_at_home()/bring_home()")
        self._check_not_recording("written_at_home()/bring_home()")
        if not handle.registered or handle.temporary:
            raise ValueError("written_at_home()/bring_home() take a registered array or device array")
        self._engine.sync_home(handle._ref, mode)

    @property
    def has_cuda(self) -> bool:
        """Whether the runtime has a CUDA worker."""
        return self._has_cuda

    def _release(self, handle: Handle) -> None:
        self._engine.release(handle._ref)

    # ------------------------------------------------------------------ tasks

    def codelet(self, name: str, cpu: Callable[..., Any] | None = None,
                cuda: Callable[..., Any] | None = None) -> Codelet:
        """Define a codelet: ``cpu(*numpy_arrays, **kwargs)``, ``cuda(*cupy_arrays, **kwargs)``."""
        return Codelet(name, cpu, cuda)

    def submit(self, codelet: Codelet, *accesses: tuple[Handle, str], priority: int = 0,
               name: str | None = None, **kwargs: Any) -> Future:
        """Submit ``codelet`` on ``(handle, mode)`` pairs; the body gets the arrays in that order.

        Orderings between tasks follow submission order on each handle (StarPU's implicit
        sequential consistency). ``kwargs`` are passed to the body as they are.
        """
        self._check_open()
        if not isinstance(codelet, Codelet):
            raise TypeError(f"submit(): first argument must be a Codelet from runtime.codelet(), "
                            f"got {type(codelet).__name__}")
        handles, modes = parse_accesses(accesses, self)
        if not ((codelet.cpu is not None and self._has_cpu) or (codelet.cuda is not None and self._has_cuda)):
            kinds = sorted({kind for kind, _ in self.workers})
            raise ValueError(f"submit(): no worker can run codelet {codelet.name!r}: it has "
                             f"{'a cpu' if codelet.cpu else 'no cpu'} body and "
                             f"{'a cuda' if codelet.cuda else 'no cuda'} body, the workers are {kinds}")
        label = codelet.name if name is None else task_name(name)
        if type(priority) is not int:
            priority = check_priority(priority)
        future = Future(label)
        task = Task(codelet, handles, modes, kwargs, label, priority, future)
        plan = self._plan_recording()
        if plan is None:
            future._waiter = self._engine.submit(task, next(self._ids))
        else:
            task_id = next(self._ids)
            future._waiter = self._engine.plan_add(plan._ref, task, task_id)
            plan._add(task, task_id)
        return future

    @contextlib.contextmanager
    def record(self) -> Iterator[StepPlan]:
        """Record the tasks this thread submits inside the block into a ``StepPlan`` instead of
        running them; ``plan.run()`` submits them all again, in order, in one call (see
        ``lotus_rt.runtime.plans``). Temporaries released inside the block live until
        ``plan.release()``; waiting, unregistering or acquiring inside the block is refused."""
        self._check_open()
        self._check_not_in_task("record()")
        if self._recording is not None:
            raise RuntimeError("record(): this runtime is already recording a plan")
        plan = StepPlan(self, self._engine.plan_new())
        self._plans.add(plan)
        self._recording, self._recorder = plan, threading.get_ident()
        try:
            yield plan
        except BaseException:
            self._recording = self._recorder = None
            plan.release()
            raise
        self._recording = self._recorder = None

    def _plan_recording(self) -> StepPlan | None:
        plan = self._recording
        return plan if plan is not None and self._recorder == threading.get_ident() else None

    def wait(self) -> None:
        """Wait for every submitted task; raise the first codelet failure not yet reported."""
        self._check_open()
        self._check_not_in_task("wait()")
        self._check_not_paused("wait()")
        self._check_not_recording("wait()")
        self._engine.wait_all()
        self._waits += 1
        raise_collected(self._errors.take())

    # ------------------------------------------------------------------ observation

    def stats(self, reset: bool = False) -> RunStats:
        """Per worker: tasks run and seconds spent running them (since start or last reset).

        The list also carries ``.caches``: hits and misses of lotus_rt's caches (``"plans"``:
        the planner's) since the last reset."""
        self._check_open()
        return RunStats(self._engine.stats(reset), cache_stats(reset))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Keep the workers asleep inside the block (e.g. while a reference computation is
        timed beside them); tasks submitted meanwhile are held until the block ends. Nests. (The
        inline engine runs each task at submit: there it changes nothing.)"""
        self._check_open()
        self._engine.user_pause()
        try:
            yield
        finally:
            self._engine.user_resume()

    def trace(self, clear: bool = False) -> list[TaskRecord]:
        """Per finished task: id, name, worker, kind, start and end (s since runtime start)."""
        self._check_open()
        return self._engine.trace(clear)

    # ------------------------------------------------------------------ lifetime

    def shutdown(self) -> None:
        """Wait for all tasks, unregister what is still registered, stop the engine."""
        if self._closed:
            return
        self._check_not_in_task("shutdown()")
        try:
            self._engine.wait_all()
            self._waits += 1
            for plan in list(self._plans):
                plan.release()
            for handle in list(self._live):
                handle.unregister()
            if self._trace_file:
                self._write_trace_file()
        finally:
            self._closed = True
            self._engine.shutdown()
        pending = self._errors.take()
        if pending:
            warnings.warn(f"lotus_rt: {len(pending)} task(s) failed and were never waited for; "
                          f"first: {pending[0]}", RuntimeWarning, stacklevel=2)

    def _write_trace_file(self) -> None:
        from lotus_rt.runtime import tracing
        records = self._engine.trace(False)
        try:
            path = tracing.export(records, [name for _, name in self.workers], self._trace_file,
                                  title=f"{len(records)} tasks, {self.engine} ({self.policy})")
        except Exception as exc:  # noqa: BLE001 - a trace must never turn a clean exit into a crash
            warnings.warn(f"lotus_rt: could not write LOTUS_TRACE_FILE={self._trace_file!r}: {exc}",
                          RuntimeWarning, stacklevel=3)
            return
        print(f"lotus_rt: wrote {len(records)} task records to {path}", file=sys.stderr)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this runtime has been shut down; call lotus_rt.runtime() for a new one")

    def _check_not_recording(self, what: str) -> None:
        if self._plan_recording() is not None:
            raise RuntimeError(f"{what} inside runtime.record(): the recorded tasks have not run; "
                               "run the plan (plan.run()), then wait")

    def _check_not_paused(self, what: str) -> None:
        if self._engine.user_paused():
            raise RuntimeError(f"{what} inside runtime.paused(): it would wait for tasks the paused "
                               "workers never run; leave the paused() block first")

    def _check_not_in_task(self, what: str) -> None:
        if self._engine.in_task():
            raise RuntimeError(f"{what} cannot be called from inside a codelet body: it would "
                               "wait for the worker that is running it")


_lock = threading.Lock()
_current: Runtime | None = None


def runtime() -> Runtime:
    """The process-wide runtime, started on first use (again after ``shutdown()``)."""
    global _current
    current = _current
    if current is not None and not current.closed:
        return current
    with _lock:
        if _current is None or _current.closed:
            _current = Runtime()
        return _current


def shutdown() -> None:
    """Shut the process-wide runtime down (a later ``runtime()`` starts a fresh one)."""
    global _current
    current = _current
    if current is not None:
        current.shutdown()  # raises (and stays current) when called from inside a task
        with _lock:
            if _current is current:
                _current = None


def _shutdown_at_exit() -> None:
    try:
        shutdown()
    except Exception as exc:  # noqa: BLE001 - report, never hang or crash at exit
        print(f"lotus_rt: error while shutting down at exit: {exc}", file=sys.stderr)


atexit.register(_shutdown_at_exit)
