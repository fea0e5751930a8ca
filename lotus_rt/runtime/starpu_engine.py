"""The ``starpu`` engine: tasks go to real StarPU through lotus_rt's cffi binding.

State and algorithm. StarPU owns scheduling, data coherency and dependencies: arrays are
registered with the vector interface (zero copy, the NumPy array is the home copy; an array
already in CUDA memory gets its GPU's memory node as home) and every task is submitted with
StarPU's implicit sequential consistency, so read/write orderings follow submission order.
Python keeps only:

- ``_pending``: task id -> Task, filled before ``starpu_task_submit`` and popped by the worker
  that runs the task (``lotus_py_exec``, entered with the GIL taken by cffi). The worker builds
  NumPy views (CPU) or CuPy views (CUDA, on StarPU's local stream) on StarPU's buffers.
- the task's C record, owned jointly by the C completion callback and the Future (``ffi.gc``),
  so ``Future.result()`` waits on a condition variable without any Python in the callback.
- ``_orphans``: handles garbage-collected while registered; they are unregistered at the next
  ``wait()``, since unregistering blocks and must not run on a worker thread.
- the idle pause (LOTUS_IDLE_PAUSE, on by default): StarPU's idle CPU workers poll at 100% CPU,
  which halves the speed of whatever else the process runs (torch between layers, the
  optimizer) and, with a worker per core, keeps the thread returning from ``wait()`` off the
  CPU for 2-4 ms until the kernel preempts a polling worker. So the C side counts outstanding
  tasks and the completion callback of the last one pauses the workers (``starpu_pause``;
  see "idle pause" in _shim.c). The tasks submitted next are held (StarPU queues them) until
  ``START_BATCH`` of them are queued or anything waits on them (``wait``, a Future,
  ``unregister``/``acquire``), then the workers resume: a burst of small submits runs without
  the submitting thread and the workers taking the GIL from each other at every task.
  CPU-only runs for now (see ``__init__``).

Per-worker counts and busy time come from StarPU's profiling; per-task records come from a
bounded ring filled by the C completion callback.
"""
from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from lotus_rt.errors import StarPUUnavailable
from lotus_rt.runtime import settings as settings_module
from lotus_rt.runtime.settings import Settings
from lotus_rt.runtime.core import CudaArray, ErrorLog, Task, TaskRecord, WorkerStats, footprint, run_body
from lotus_rt.starpu import load, policies, version

KINDS = {0: "cpu", 1: "cuda", 2: "other"}
START_BATCH = 64  # tasks held while the workers are paused before they are resumed anyway
ENOERR = {-19: "ENODEV: no worker of this StarPU can run this codelet",
          -7: "E2BIG: too many arrays for one task"}

_active: "StarPUEngine | None" = None
_extern_lock = threading.Lock()
_extern_defined = False


def _define_entry_point(ffi: Any, lib: Any) -> None:
    """Bind the C entry point ``lotus_py_exec`` to the active engine (once per process)."""
    global _extern_defined
    with _extern_lock:
        if _extern_defined:
            return

        @ffi.def_extern(onerror=_entry_point_failed)
        def lotus_py_exec(task_id, ptrs, n, kind, worker, stream):
            _active._execute(task_id, ptrs, n, kind, worker, stream)

        _extern_defined = True


def _entry_point_failed(exc_type, exc, tb) -> None:
    # Only reachable if lotus_rt itself is broken (run_body catches body errors); say so loudly.
    import traceback
    traceback.print_exception(exc_type, exc, tb)


class _RecWaiter:
    """Waits on one task's C record; the record is released when this object dies."""

    __slots__ = ("_rec", "_lib", "_engine")

    def __init__(self, rec: Any, lib: Any, engine: "StarPUEngine"):
        self._rec = rec
        self._lib = lib
        self._engine = engine

    def done(self) -> bool:
        self._engine.start_held_tasks()  # someone is polling: held tasks must be able to run
        return bool(self._lib.lotus_rec_done(self._rec))

    def wait(self, timeout: float | None) -> bool:
        self._engine.start_held_tasks()
        if timeout is None and self._engine.user_paused() and not self._lib.lotus_rec_done(self._rec):
            raise RuntimeError("Future.result() inside runtime.paused(): it would wait for a task the "
                               "paused workers never run; leave the paused() block first")
        return bool(self._lib.lotus_rec_wait(self._rec, -1.0 if timeout is None else float(timeout)))


class StarPUEngine:
    name = "starpu"

    def __init__(self, settings: Settings, errors: ErrorLog):
        global _active
        if _active is not None:
            raise RuntimeError("a StarPU engine is already running in this process; shut it down first")
        self._ffi, self._lib = load()
        settings_module.check_starpu_env(policies(), settings.starpu_env(), starpu_version=version())
        settings_module.prepare_starpu_environment()
        _define_entry_point(self._ffi, self._lib)
        ret = self._lib.lotus_init(1)
        if ret != 0:
            raise StarPUUnavailable(f"starpu_init failed with {ret} ({os.strerror(-ret) if ret < 0 else ret})")
        _active = self
        self._errors = errors
        self._pending: dict[int, Task] = {}
        self._planned: dict[int, Task] = {}  # tasks of step plans: run again at every plan run
        self._views: dict[int, tuple[tuple, list[np.ndarray]]] = {}  # a planned task's last buffers
        self._codelets: dict[Any, Any] = {}
        self._codelets_lock = threading.Lock()
        self._footprints: dict[Any, int] = {}
        self._orphans: list[tuple[Any, np.ndarray]] = []
        self.before_shutdown: list[Any] = []  # called before starpu_shutdown (StarPU-MPI's, runtime/mpi.py)
        self._mode_ints = {"R": self._lib.lotus_mode_r(), "W": self._lib.lotus_mode_w(),
                           "RW": self._lib.lotus_mode_rw()}
        self._max_buffers = self._lib.lotus_max_buffers()
        self._t0_us = self._lib.lotus_now_us()
        self.policy = self._ffi.string(self._lib.lotus_current_policy()).decode()
        self.workers = [(KINDS[self._lib.lotus_worker_kind(i)], self._worker_name(i))
                        for i in range(self._lib.lotus_worker_count())]
        self.priority_range = (self._lib.lotus_min_priority(), self._lib.lotus_max_priority())
        self._pin = any(kind == "cuda" for kind, _ in self.workers)
        self._stats = [[0, 0.0] for _ in self.workers]
        self._stats_lock = threading.Lock()
        self._lib.lotus_trace_configure(int(settings.trace), settings.trace_capacity)
        self._trace_capacity = settings.trace_capacity
        self._blas_limits = _limit_blas_threads(sum(kind == "cpu" for kind, _ in self.workers))
        self.set_idle_pause(settings.idle_pause)

    def _worker_name(self, worker_id: int) -> str:
        buf = self._ffi.new("char[128]")
        self._lib.lotus_worker_name(worker_id, buf, 128)
        return self._ffi.string(buf).decode()

    # ------------------------------------------------------------------ data

    def register(self, array: np.ndarray) -> Any:
        if array.size >= 2**32:
            raise ValueError(f"register(): {array.size} elements exceed StarPU's vector interface limit (2**32)")
        ptr = self._ffi.cast("void *", array.ctypes.data)
        if self._pin:
            self._lib.lotus_pin(ptr, array.nbytes)
        return self._lib.lotus_register(ptr, array.size, array.itemsize)

    def register_cuda(self, array: CudaArray) -> Any:
        """Register device memory with the memory node of the CUDA worker driving its device."""
        if array.size >= 2**32:
            raise ValueError(f"register(): {array.size} elements exceed StarPU's vector interface limit (2**32)")
        err = self._ffi.new("int *")
        ref = self._lib.lotus_register_cuda(self._ffi.cast("void *", array.ptr), array.size, array.itemsize,
                                            array.stream, err)
        if ref == self._ffi.NULL:
            why = {-19: "no CUDA worker of this StarPU drives the device that holds it",
                   -22: "its pointer is not CUDA device memory (managed and host memory are not accepted)",
                   -5: "a CUDA call failed (cudaPointerGetAttributes or cudaStreamSynchronize)"}
            raise ValueError(f"register(): cannot register this {type(array.obj).__name__} on a GPU: "
                             f"{why.get(err[0], f'error {err[0]}')}")
        return ref

    def register_temporary(self, handle: Any) -> Any:
        nelems = handle.nbytes // handle.dtype.itemsize
        if nelems >= 2**32:
            raise ValueError(f"temporary(): {nelems} elements exceed StarPU's vector interface limit (2**32)")
        return self._lib.lotus_register_temporary(nelems, handle.dtype.itemsize)

    def unregister_submit(self, ref: Any) -> None:
        self._lib.lotus_unregister_submit(ref)

    def unregister(self, ref: Any, array: np.ndarray | None) -> None:
        self.start_held_tasks()  # unregistering waits for the tasks on the data
        self._lib.lotus_unregister(ref)
        if self._pin and isinstance(array, np.ndarray):  # not device memory (a CUDA-resident handle)
            self._lib.lotus_unpin(self._ffi.cast("void *", array.ctypes.data), array.nbytes)

    def orphan(self, ref: Any, array: np.ndarray) -> None:
        self._orphans.append((ref, array))

    def acquire(self, ref: Any, mode: str) -> None:
        self.start_held_tasks()
        ret = self._lib.lotus_acquire(ref, self._mode_ints[mode])
        if ret != 0:
            raise RuntimeError(f"starpu_data_acquire failed with {ret}")

    def release(self, ref: Any) -> None:
        self._lib.lotus_release(ref)

    def sync_home(self, ref: Any, mode: str) -> None:
        """With CUDA workers: "RW" drops the copies of data written at home outside tasks, "R"
        makes the home valid again after tasks wrote elsewhere. CPU workers use the home itself."""
        if not self._pin:
            return
        self.start_held_tasks()
        ret = self._lib.lotus_acquire_home(ref, self._mode_ints[mode])
        if ret != 0:
            raise RuntimeError(f"starpu_data_acquire_on_node failed with {ret}")
        self._lib.lotus_release_home(ref)

    # ------------------------------------------------------------------ tasks

    def _c_codelet(self, codelet: Any) -> Any:
        c = self._codelets.get(codelet)
        if c is None:
            with self._codelets_lock:
                c = self._codelets.get(codelet)
                if c is None:
                    c = self._lib.lotus_codelet_new(codelet.name.encode(), int(codelet.cpu is not None),
                                                    int(codelet.cuda is not None))
                    if c == self._ffi.NULL:
                        raise MemoryError("cannot allocate a StarPU codelet")
                    self._codelets[codelet] = c
        return c

    def submit(self, task: Task, task_id: int) -> _RecWaiter:
        n = len(task.handles)
        if n > self._max_buffers:
            raise ValueError(f"submit(): a task takes at most {self._max_buffers} arrays with this "
                             f"StarPU (STARPU_NMAXBUFS), got {n}")
        ffi, lib = self._ffi, self._lib
        c_codelet = self._codelets.get(task.codelet) or self._c_codelet(task.codelet)
        fp = self._footprint(task)
        low, high = self.priority_range
        priority = low if task.priority < low else high if task.priority > high else task.priority
        handles = [h._ref for h in task.handles]  # cffi turns the lists into C arrays
        modes = [self._mode_ints[m] for m in task.modes]
        name = task.name.encode()
        self._pending[task_id] = task
        try:
            rec = lib.lotus_submit(c_codelet, handles, modes, n, priority, name, task_id, fp)
        except BaseException:
            self._pending.pop(task_id, None)
            raise
        if rec == ffi.NULL:
            self._pending.pop(task_id, None)
            err = lib.lotus_last_submit_error()
            raise RuntimeError(f"starpu_task_submit failed for task {task.name!r}: {ENOERR.get(err, err)}")
        return _RecWaiter(ffi.gc(rec, lib.lotus_rec_release), lib, self)

    # ------------------------------------------------------------------ step plans

    def plan_new(self) -> Any:
        ref = self._lib.lotus_plan_new()
        if ref == self._ffi.NULL:
            raise MemoryError("cannot allocate a step plan")
        return self._ffi.gc(ref, lambda _: None)  # freed by plan_free, never by the GC

    def plan_add(self, plan: Any, task: Task, task_id: int) -> "_RecWaiter":
        n = len(task.handles)
        if n > self._max_buffers:
            raise ValueError(f"submit(): a task takes at most {self._max_buffers} arrays with this "
                             f"StarPU (STARPU_NMAXBUFS), got {n}")
        low, high = self.priority_range
        priority = low if task.priority < low else high if task.priority > high else task.priority
        rec = self._lib.lotus_plan_add(plan, self._codelets.get(task.codelet) or self._c_codelet(task.codelet),
                                       [h._ref for h in task.handles], [self._mode_ints[m] for m in task.modes],
                                       n, priority, task.name.encode(), task_id, self._footprint(task))
        if rec == self._ffi.NULL:
            err = self._lib.lotus_last_submit_error()
            raise RuntimeError(f"cannot record task {task.name!r}: {ENOERR.get(err, err)}")
        self._planned[task_id] = task
        return _RecWaiter(rec, self._lib, self)  # the plan owns the record

    def plan_run(self, plan: Any, tasks: list[Task]) -> None:
        failed = self._lib.lotus_plan_submit(plan)
        if failed:
            err = self._lib.lotus_last_submit_error()
            self.wait_all()  # the tasks before it were submitted
            raise RuntimeError(f"starpu_task_submit failed for task {tasks[failed - 1].name!r} of a step plan: "
                               f"{ENOERR.get(err, err)}")

    def plan_free(self, plan: Any, task_ids: list[int]) -> None:
        self._lib.lotus_plan_free(plan)
        for task_id in task_ids:
            self._planned.pop(task_id, None)
            self._views.pop(task_id, None)

    def _footprint(self, task: Task) -> int:
        if task.kwargs:  # scalar arguments take part; not worth caching
            return footprint(task.codelet, task.handles, task.kwargs)
        key = (task.codelet, tuple([h.key for h in task.handles]))
        fp = self._footprints.get(key)
        if fp is None:
            if len(self._footprints) > 4096:
                self._footprints.clear()
            fp = self._footprints[key] = footprint(task.codelet, task.handles, task.kwargs)
        return fp

    def _execute(self, task_id: int, ptrs: Any, n: int, kind: int, worker: int, stream: Any) -> None:
        task = self._pending.pop(task_id, None)
        if task is None:
            task = self._planned[task_id]
            if kind == 0:
                self._execute_planned(task_id, task, ptrs, n, worker)
                return
        worker_name = self.workers[worker][1] if 0 <= worker < len(self.workers) else str(worker)
        if kind == 1:
            from lotus_rt.runtime import cuda_views
            arrays = [cuda_views.device_array(ptrs[i], h.nbytes, h.shape, h.dtype)
                      for i, h in enumerate(task.handles)]
            with cuda_views.on_stream(stream):
                run_body(task, task.codelet.cuda, arrays, worker_name, self._errors)
            return
        run_body(task, task.codelet.cpu, self._host_views(task, ptrs, n), worker_name, self._errors)

    def _host_views(self, task: Task, ptrs: Any, n: int) -> list[np.ndarray]:
        buffer, frombuffer = self._ffi.buffer, np.frombuffer
        arrays = []
        for i in range(n):
            handle = task.handles[i]
            view = frombuffer(buffer(ptrs[i], handle.nbytes), handle.dtype).reshape(handle.shape)
            if task.modes[i] == "R":
                view.flags.writeable = False
            arrays.append(view)
        return arrays

    def _execute_planned(self, task_id: int, task: Task, ptrs: Any, n: int, worker: int) -> None:
        """A step plan's task on a CPU worker: its views are kept while its buffers stay put."""
        key = tuple(ptrs[i] for i in range(n))
        cached = self._views.get(task_id)
        if cached is None or cached[0] != key:
            cached = self._views[task_id] = (key, self._host_views(task, ptrs, n))
        worker_name = self.workers[worker][1] if 0 <= worker < len(self.workers) else str(worker)
        run_body(task, task.codelet.cpu, cached[1], worker_name, self._errors)

    def in_task(self) -> bool:
        return self._lib.lotus_current_worker() >= 0

    def wait_all(self) -> None:
        ret = self._lib.lotus_wait_all()  # starts held tasks, and those submitted while it waits
        if ret != 0:
            raise RuntimeError(f"starpu_task_wait_for_all failed with {ret}")
        self._drain_orphans()

    def start_held_tasks(self) -> None:
        self._lib.lotus_start_held()

    def set_idle_pause(self, enabled: bool) -> None:
        # Not with CUDA workers yet: whether a paused CUDA worker still serves the transfers an
        # unregister or acquire needs is untested (no GPU run so far).
        self._lib.lotus_idle_pause_configure(int(enabled and not self._pin), START_BATCH)

    def user_pause(self) -> None:
        self._lib.lotus_user_pause()

    def user_resume(self) -> None:
        if self._lib.lotus_user_resume() != 0:
            raise RuntimeError("resume without a matching pause")

    def user_paused(self) -> bool:
        return self._lib.lotus_user_paused() > 0

    def _drain_orphans(self) -> None:
        while self._orphans:
            ref, array = self._orphans.pop()
            self.unregister(ref, array)

    # ------------------------------------------------------------------ observation

    def stats(self, reset: bool) -> list[WorkerStats]:
        ntasks, busy_us = self._ffi.new("int *"), self._ffi.new("double *")
        with self._stats_lock:
            for i, acc in enumerate(self._stats):
                if self._lib.lotus_worker_stats(i, ntasks, busy_us) == 0:
                    acc[0] += ntasks[0]
                    acc[1] += busy_us[0] / 1e6
            result = [WorkerStats(name, kind, acc[0], acc[1])
                      for (kind, name), acc in zip(self.workers, self._stats)]
            if reset:
                self._stats = [[0, 0.0] for _ in self.workers]
        return result

    def trace(self, clear: bool) -> list[TaskRecord]:
        out = self._ffi.new("struct lotus_trace_entry[]", self._trace_capacity)
        copied = self._ffi.new("size_t *")
        self._lib.lotus_trace_read(out, self._trace_capacity, copied)
        if clear:
            self._lib.lotus_trace_clear()
        records = []
        for i in range(copied[0]):
            e = out[i]
            kind, worker = self.workers[e.worker] if 0 <= e.worker < len(self.workers) else ("other", str(e.worker))
            records.append(TaskRecord(int(e.id), self._ffi.string(e.name).decode(), worker, kind,
                                      (e.start_us - self._t0_us) / 1e6, (e.end_us - self._t0_us) / 1e6))
        return records

    # ------------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        global _active
        while self._lib.lotus_user_resume() == 0:  # starpu_shutdown needs running workers
            pass
        self.wait_all()
        while self.before_shutdown:
            self.before_shutdown.pop()()
        self._lib.lotus_idle_pause_configure(0, START_BATCH)  # resumes: starpu_shutdown needs the workers
        self._lib.lotus_shutdown()
        for c in self._codelets.values():
            self._lib.lotus_codelet_free(c)
        self._codelets.clear()
        self._lib.lotus_trace_configure(0, 0)
        if self._blas_limits is not None:
            self._blas_limits.restore_original_limits()
        _active = None


def _limit_blas_threads(ncpu_workers: int) -> Any:
    """StarPU's CPU workers are the parallelism: one BLAS thread per task, not nested pools."""
    if ncpu_workers <= 1:
        return None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=1, user_api="blas")

