"""Engine-neutral objects of the runtime: codelets, data handles, tasks, futures, records.

An engine (StarPU or inline) only has to move bytes and run bodies; everything a user can
get wrong is checked here, before a task reaches an engine. A task's body runs through
:func:`run_body`, which turns an exception into a :class:`CodeletError` stored on the task's
future and on the runtime's error list, so that it surfaces from ``future.result()`` and
``runtime.wait()`` instead of killing a worker thread.
"""
from __future__ import annotations

import math
import threading
import time
import zlib
from typing import Any, Callable, NamedTuple

import numpy as np

from lotus_rt.errors import CodeletError

MODES = ("R", "W", "RW")
NAME_MAX = 47  # StarPU task names are copied into 48-byte C buffers


class Codelet:
    """A named kernel with a CPU body and, optionally, a CUDA body: ``fn(*arrays, **kwargs)``."""

    __slots__ = ("name", "cpu", "cuda", "__weakref__")

    def __init__(self, name: str, cpu: Callable[..., Any] | None, cuda: Callable[..., Any] | None):
        if not name:
            raise ValueError("codelet name must be a non-empty string")
        c_name(name, NAME_MAX - 6, "codelet name")  # StarPU's perf-model symbol is "lotus_<name>"
        if cpu is None and cuda is None:
            raise ValueError(f"codelet {name!r} needs a cpu body, a cuda body, or both")
        for kind, fn in (("cpu", cpu), ("cuda", cuda)):
            if fn is not None and not callable(fn):
                raise TypeError(f"codelet {name!r}: the {kind} body must be callable, got {type(fn).__name__}")
        self.name = name
        self.cpu = cpu
        self.cuda = cuda

    def __repr__(self) -> str:
        kinds = [k for k in ("cpu", "cuda") if getattr(self, k) is not None]
        return f"Codelet({self.name!r}, {'+'.join(kinds)})"


class Handle:
    """Data registered with an engine.

    A registered NumPy array (zero copy: the array is the data's home): read it through
    ``with handle.acquire("R"):`` or after ``handle.unregister()``, which waits for the tasks
    using it and leaves the data in the array. An array in CUDA device memory (``device`` is
    its :class:`CudaArray`; ``array`` the object registered): the same, except that it is read
    only after ``unregister()``. Or a temporary (``runtime.temporary``): the engine allocates
    it where it is first written; ``unregister_submit()`` frees it once the tasks already
    submitted on it are done, without waiting.
    """

    __slots__ = ("_runtime", "array", "device", "shape", "dtype", "nbytes", "key", "temporary", "_ref",
                 "_registered", "__weakref__")

    def __init__(self, runtime: Any, array: "np.ndarray | CudaArray | None", ref: Any,
                 shape: tuple[int, ...] | None = None, dtype: Any = None):
        self._runtime = runtime
        self.device = array if isinstance(array, CudaArray) else None
        self.array = array.obj if self.device is not None else array
        self.temporary = shape is not None
        self.shape = tuple(shape) if self.temporary else array.shape
        self.dtype = np.dtype(dtype) if self.temporary else array.dtype
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        self.key = f"{self.dtype.str}{self.shape}"
        self._ref = ref
        self._registered = True

    @property
    def registered(self) -> bool:
        return self._registered

    @property
    def writeable(self) -> bool:
        if self.device is not None:
            return self.device.writeable
        return self.temporary or self.array.flags.writeable

    def unregister(self) -> Any:
        """Wait for the tasks using this data, bring it home, and forget the handle; returns the
        registered array (None for a temporary)."""
        if self._registered:
            self._runtime._unregister(self)  # raises, leaving the handle registered, inside a task
            self._registered = False
        return self.array

    def unregister_submit(self) -> None:
        """Temporaries only: free the data after the tasks submitted so far, without waiting."""
        if not self.temporary:
            raise ValueError("unregister_submit() is for temporaries; a registered array is "
                             "released with unregister(), which brings its data home")
        if self._registered:
            self._registered = False
            self._runtime._unregister_submit(self)

    def written_at_home(self) -> None:
        """The data was changed in place at its home outside tasks (an optimizer's update of a
        registered parameter, new inputs copied in): copies StarPU keeps on other memory nodes
        are dropped, so the next task reads the new values. Nothing to do without CUDA workers."""
        self._runtime._sync_home(self, "RW")

    def bring_home(self) -> None:
        """Make the home copy valid (tasks may have written a copy on a GPU) before reading the
        data outside tasks while it stays registered. Nothing to do without CUDA workers."""
        self._runtime._sync_home(self, "R")

    def acquire(self, mode: str = "R") -> "_Acquired":
        """Context manager giving the array back to Python for reading (R) or writing (RW)."""
        if mode not in ("R", "RW"):
            raise ValueError(f"acquire mode must be 'R' or 'RW', got {mode!r}")
        if self.temporary:
            raise ValueError("a temporary has no home array to acquire; register an array instead")
        if self.device is not None:
            raise ValueError("acquire() is for host arrays; data registered in CUDA device memory is "
                             "read after unregister(), which leaves the results in that memory")
        if not self._registered:
            raise RuntimeError("cannot acquire an unregistered handle")
        return _Acquired(self, mode)

    def __repr__(self) -> str:
        state = "registered" if self._registered else "unregistered"
        kind = "temporary" if self.temporary else "array"
        return f"Handle({kind}, shape={self.shape}, dtype={self.dtype}, {state})"

    def __del__(self):
        if getattr(self, "_registered", False):
            self._registered = False
            try:
                if self.temporary:
                    self._runtime._unregister_submit(self)
                else:
                    self._runtime._orphan(self)
            except Exception:  # interpreter shutdown: nothing left to release
                pass


class _Acquired:
    __slots__ = ("handle", "mode")

    def __init__(self, handle: Handle, mode: str):
        self.handle = handle
        self.mode = mode

    def __enter__(self) -> np.ndarray:
        self.handle._runtime._acquire(self.handle, self.mode)
        return self.handle.array

    def __exit__(self, *exc) -> None:
        self.handle._runtime._release(self.handle)


class Future:
    """The outcome of one task. ``result()`` waits for it and raises its CodeletError, if any.

    A task is done once its body has returned (on a CUDA worker: once its kernels are queued
    on StarPU's stream). Read its data through ``handle.acquire()`` or ``handle.unregister()``.
    """

    __slots__ = ("task_name", "_waiter", "_error", "_observed")

    def __init__(self, task_name: str, waiter: Any = None):
        self.task_name = task_name
        self._waiter = waiter  # engine object with done() and wait(timeout); None: already done
        self._error: CodeletError | None = None
        self._observed = False

    def done(self) -> bool:
        return self._waiter is None or self._waiter.done()

    def exception(self, timeout: float | None = None) -> CodeletError | None:
        if self._waiter is not None and not self._waiter.wait(timeout):
            raise TimeoutError(f"task {self.task_name!r} did not finish within {timeout} s")
        self._observed = True
        return self._error

    def result(self, timeout: float | None = None) -> None:
        error = self.exception(timeout)
        if error is not None:
            raise error

    def __repr__(self) -> str:
        state = "failed" if self._error is not None else ("done" if self.done() else "pending")
        return f"Future({self.task_name!r}, {state})"


class Task:
    """A submitted task as the engines see it; modes are "R", "W" or "RW"."""

    __slots__ = ("codelet", "handles", "modes", "kwargs", "name", "priority", "future")

    def __init__(self, codelet: Codelet, handles: tuple[Handle, ...], modes: tuple[str, ...],
                 kwargs: dict[str, Any], name: str, priority: int, future: Future):
        self.codelet = codelet
        self.handles = handles
        self.modes = modes
        self.kwargs = kwargs
        self.name = name
        self.priority = priority
        self.future = future


class WorkerStats(NamedTuple):
    worker: str
    kind: str
    tasks: int
    busy_s: float


class TaskRecord(NamedTuple):
    task_id: int
    name: str
    worker: str
    kind: str
    start_s: float
    end_s: float


def footprint(codelet: Codelet, handles: tuple[Handle, ...], kwargs: dict[str, Any]) -> int:
    """Stable 32-bit hash of what decides a task's duration: codelet, shapes, dtypes, scalars.

    StarPU's history-based performance model keys its measurements with it, and the models
    persist across processes, so it must not use Python's salted ``hash``.
    """
    parts = [codelet.name]
    parts.extend(h.key for h in handles)
    for key in sorted(kwargs):
        value = kwargs[key]
        if isinstance(value, (int, float, str, bool, tuple)) or value is None:
            parts.append(f"{key}={value!r}")
    return zlib.crc32("|".join(parts).encode())


class ErrorLog:
    """Codelet failures not yet reported by ``wait()`` (appended from worker threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._errors: list[tuple[Future, CodeletError]] = []

    def add(self, future: Future, error: CodeletError) -> None:
        with self._lock:
            self._errors.append((future, error))

    def take(self) -> list[CodeletError]:
        """The failures whose futures nobody has looked at, oldest first; clears the log."""
        with self._lock:
            errors, self._errors = self._errors, []
        return [err for fut, err in errors if not fut._observed]


def run_body(task: Task, fn: Callable[..., Any], arrays: list[Any], worker: str, errors: ErrorLog) -> None:
    """Call a codelet body; any exception becomes the task's CodeletError."""
    try:
        fn(*arrays, **task.kwargs)
    except BaseException as exc:  # noqa: BLE001 - a body must never take a worker down
        error = CodeletError(
            f"codelet {task.codelet.name!r} (task {task.name!r}) failed on worker {worker}: "
            f"{type(exc).__name__}: {exc}",
            codelet=task.codelet.name, task=task.name, worker=worker)
        error.__cause__ = exc
        task.future._error = error
        errors.add(task.future, error)


def raise_collected(errors: list[CodeletError]) -> None:
    """Raise the first of several codelet failures, saying how many there were."""
    if not errors:
        return
    first = errors[0]
    if len(errors) > 1:
        first.add_note(f"{len(errors) - 1} more task(s) failed since the last wait(): "
                       + "; ".join(f"{e.task!r}" for e in errors[1:6]))
    raise first


def validate_array(array: Any) -> np.ndarray:
    """Check an array can be registered zero-copy; raise a ValueError/TypeError naming why."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"register() takes a numpy.ndarray, got {type(array).__name__}")
    if array.dtype.hasobject or array.dtype.kind not in "biufc":
        raise TypeError(f"register(): dtype {array.dtype} is not supported; use a boolean, "
                        "integer, floating or complex dtype")
    if not array.flags.c_contiguous:
        raise ValueError("register() needs a C-contiguous array (zero-copy registration); "
                         "pass numpy.ascontiguousarray(a)")
    if array.size == 0:
        raise ValueError(f"register(): cannot register an empty array (shape {array.shape})")
    if not array.dtype.isnative:
        raise TypeError(f"register(): dtype {array.dtype} is not in native byte order")
    return array


class CudaArray:
    """An array in CUDA device memory as its ``__cuda_array_interface__`` describes it.

    ``obj`` (a CuPy array, a torch CUDA tensor, ...) is kept referenced so that the memory
    outlives the registration; ``stream`` is the producer's stream to synchronise with before
    StarPU reads the data (0: none given).
    """

    __slots__ = ("obj", "ptr", "shape", "dtype", "size", "itemsize", "nbytes", "writeable", "stream")

    def __init__(self, obj: Any, ptr: int, shape: tuple[int, ...], dtype: np.dtype, writeable: bool, stream: int):
        self.obj, self.ptr, self.shape, self.dtype = obj, ptr, shape, dtype
        self.size = int(np.prod(shape, dtype=np.int64))
        self.itemsize = dtype.itemsize
        self.nbytes = self.size * dtype.itemsize
        self.writeable, self.stream = writeable, stream


def validate_cuda_array(obj: Any) -> CudaArray:
    """Check that an object exposing ``__cuda_array_interface__`` can be registered zero-copy
    (C-contiguous, non-empty, a supported dtype); raise a ValueError/TypeError naming why."""
    what = type(obj).__name__
    iface = obj.__cuda_array_interface__
    if not isinstance(iface, dict) or not {"shape", "typestr", "data"} <= iface.keys():
        raise TypeError(f"register(): {what}.__cuda_array_interface__ is not a CUDA array interface "
                        "dict with shape, typestr and data")
    if iface.get("mask") is not None:
        raise ValueError(f"register(): {what} is a masked CUDA array; masks are not supported")
    shape = tuple(int(d) for d in iface["shape"])
    try:
        dtype = np.dtype(iface["typestr"])
    except TypeError:
        raise TypeError(f"register(): {what} has typestr {iface['typestr']!r}, which is not a dtype") from None
    if dtype.hasobject or dtype.kind not in "biufc" or not dtype.isnative:
        raise TypeError(f"register(): dtype {dtype} of {what} is not supported; use a native-endian "
                        "boolean, integer, floating or complex dtype")
    if int(np.prod(shape, dtype=np.int64)) == 0:
        raise ValueError(f"register(): cannot register an empty array (shape {shape})")
    strides = iface.get("strides")
    if strides is not None:
        expected = [dtype.itemsize] * len(shape)
        for k in range(len(shape) - 2, -1, -1):
            expected[k] = expected[k + 1] * shape[k + 1]
        if any(n > 1 and int(s) != e for n, s, e in zip(shape, strides, expected)):
            raise ValueError(f"register() needs a C-contiguous array (zero-copy registration); {what} "
                             f"has strides {tuple(strides)}: make it contiguous first")
    ptr, readonly = iface["data"]
    stream = iface.get("stream")
    return CudaArray(obj, int(ptr), shape, dtype, not readonly, int(stream) if stream else 0)


def parse_accesses(accesses: tuple[Any, ...], runtime: Any) -> tuple[tuple[Handle, ...], tuple[str, ...]]:
    """Split ``((handle, mode), ...)`` into handles and modes, checking each pair."""
    if not accesses:
        return (), ()
    handles, modes = [], []
    for i, access in enumerate(accesses):
        if type(access) is not tuple or len(access) != 2:
            raise TypeError(f"submit(): argument {i} must be a (handle, mode) pair, got {access!r}")
        handle, mode = access
        if type(handle) is not Handle:
            raise TypeError(f"submit(): argument {i} must hold a Handle from runtime.register(), "
                            f"got {type(handle).__name__}")
        if mode not in MODES:
            raise ValueError(f"submit(): access mode {mode!r} of argument {i} is not valid; "
                             f"valid modes: {', '.join(MODES)}")
        if handle._runtime is not runtime or not handle._registered:
            raise ValueError(f"submit(): argument {i} is a handle that is unregistered or belongs "
                             "to another runtime instance")
        if mode != "R" and not handle.writeable:
            raise ValueError(f"submit(): argument {i} is a read-only array and cannot be accessed "
                             f"with mode {mode!r}")
        handles.append(handle)
        modes.append(mode)
    if len(handles) > 1:
        _check_duplicates(handles, modes)
    return tuple(handles), tuple(modes)


def _check_duplicates(handles: list[Handle], modes: list[str]) -> None:
    seen: dict[int, str] = {}
    for handle, mode in zip(handles, modes):
        previous = seen.get(id(handle))
        if previous is not None and (previous != "R" or mode != "R"):
            raise ValueError("submit(): the same handle appears twice in one task with a write "
                             "mode; pass it once with mode 'RW'")
        seen[id(handle)] = mode


def c_name(name: Any, limit: int, what: str) -> str:
    """A name StarPU can hold in a C buffer: at most ``limit`` bytes of UTF-8, no NUL."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, got {type(name).__name__}")
    try:
        encoded = name.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} {name!r} cannot be encoded as UTF-8: {exc}") from None
    if len(encoded) > limit or b"\0" in encoded:
        raise ValueError(f"{what} must be at most {limit} bytes of UTF-8 without NUL characters, "
                         f"got {name!r} ({len(encoded)} bytes)")
    return name


def task_name(name: Any) -> str:
    return c_name(name, NAME_MAX, "submit(): task name")


def check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, (int, np.integer)):
        raise TypeError(f"submit(): priority must be an int, got {priority!r}")
    return int(priority)


def monotonic() -> float:
    return time.perf_counter()
