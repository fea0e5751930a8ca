"""StarPU-MPI on the runtime: ranks, data with an owner rank, owner-computes tasks, reductions.

    >>> from lotus_rt.runtime import mpi                  # under mpirun (or lotus-rt launch)
    >>> world = mpi.init()                                # StarPU-MPI on MPI_COMM_WORLD
    >>> a = world.register(np.ones(4), owner=0)           # every rank, in the same order
    >>> b = world.temporary((4,), np.float64, owner=1)    # no home array on this rank
    >>> fut = world.submit(copy, (a, "R"), (b, "W"))      # runs on rank 1; StarPU-MPI moves a
    >>> world.wait()                                      # every rank's tasks and messages

The model is StarPU-MPI's (``_mpi_shim.c``): every rank registers every piece of data, with the
same tag and the same owner, and submits the same tasks in the same order. A task runs on the
rank that owns the data it writes (``execute_on`` overrides that); StarPU-MPI sends it the data
it reads from their owners, and sends written data back to owners that did not run it. On the
other ranks ``submit`` returns None. Tags are given out in registration order (the same on every
rank as long as the ranks register the same data in the same order).

Reductions: ``reduction(handle, "sum")`` lets tasks access a handle in mode ``"REDUX"`` (each
rank accumulates into its own copy, initialised to zero); ``redux(handle)`` then sums every
rank's copy on the owner (``starpu_mpi_redux_data``; StarPU 1.3's waits for all tasks).

State: one ``World`` per process (``init`` again returns it), the owner and tag of every handle
it registered (weakly keyed), and a hook that stops StarPU-MPI before StarPU when the runtime
shuts down. Rank and size come from MPI, never from the environment. With ``abort_on_error``
(the default), an exception that nothing catches on one rank prints the rank and ends every
rank through MPI_Abort, so that the others never wait for a rank that is gone.
"""
from __future__ import annotations

import itertools
import sys
import weakref
from typing import Any, Sequence

import numpy as np

from lotus_rt.errors import StarPUUnavailable
from lotus_rt.runtime import Runtime, runtime
from lotus_rt.runtime.core import Codelet, Future, Handle, Task, _check_duplicates, check_priority, \
    raise_collected, task_name

MODES = ("R", "W", "RW", "REDUX")
REDUX_DTYPES = {np.dtype(np.float64): 0, np.dtype(np.float32): 1, np.dtype(np.int64): 2, np.dtype(np.int32): 3}
AUTO_TAG_BASE = 1 << 32  # tags given out by register(); explicit tags stay below


def _touch(array: np.ndarray) -> None:
    """Reads nothing: a task that makes StarPU-MPI bring its data to the rank running it."""


_TOUCH = Codelet("mpi_get", cpu=_touch, cuda=_touch)


class World:
    """StarPU-MPI ranks on one communicator (see the module docstring)."""

    def __init__(self, rt: Runtime, ffi: Any, lib: Any, rank: int, size: int, comm: Any):
        self._rt, self._ffi, self._lib = rt, ffi, lib
        self._engine = rt._engine
        self.rank, self.size = rank, size
        self._comm = comm  # the mpi4py communicator given, kept alive (None: MPI_COMM_WORLD)
        self._tags = itertools.count(AUTO_TAG_BASE)
        self._data: weakref.WeakKeyDictionary[Handle, tuple[int, int]] = weakref.WeakKeyDictionary()
        self._redux: weakref.WeakSet[Handle] = weakref.WeakSet()
        self._modes = dict(self._engine._mode_ints, REDUX=lib.lotus_mode_redux())
        self.closed = False

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}{', closed' if self.closed else ''})"

    # ------------------------------------------------------------------ data

    def _check_owner(self, owner: Any) -> int:
        if isinstance(owner, bool) or not isinstance(owner, (int, np.integer)) or not 0 <= owner < self.size:
            raise ValueError(f"owner must be a rank in 0..{self.size - 1}, got {owner!r}")
        return int(owner)

    def attach(self, handle: Handle, owner: int, tag: int | None = None) -> Handle:
        """Give an already registered handle its owner rank and tag (every rank, same order)."""
        self._check_open()
        owner = self._check_owner(owner)
        if type(handle) is not Handle or handle._runtime is not self._rt or not handle.registered:
            raise TypeError(f"attach(): expected a registered Handle of this runtime, got {handle!r}")
        if handle in self._data:
            raise ValueError(f"attach(): {handle!r} already has owner {self._data[handle][0]} and tag "
                             f"{self._data[handle][1]}")
        if tag is None:
            tag = next(self._tags)
        elif isinstance(tag, bool) or not isinstance(tag, (int, np.integer)) or not 0 <= tag < AUTO_TAG_BASE:
            raise ValueError(f"tag must be an int in 0..2**32-1 (larger ones are given out automatically), got {tag!r}")
        self._lib.lotus_mpi_data_register(handle._ref, int(tag), owner)
        self._data[handle] = (owner, int(tag))
        return handle

    def register(self, array: np.ndarray, owner: int, tag: int | None = None) -> Handle:
        """Register ``array`` as this rank's copy of data owned by ``owner``: on the owner it is
        the data; elsewhere a home that receives a copy when a task here reads it or ``get``."""
        owner = self._check_owner(owner)
        return self.attach(self._rt.register(array), owner, tag)

    def temporary(self, shape: Sequence[int], dtype: Any, owner: int, tag: int | None = None) -> Handle:
        """Data owned by ``owner`` with no home array on this rank (StarPU allocates it where it
        is first written or received); free it with ``unregister_submit()``."""
        owner = self._check_owner(owner)
        return self.attach(self._rt.temporary(tuple(shape), dtype), owner, tag)

    def owner(self, handle: Handle) -> int:
        """The rank that owns ``handle``'s data."""
        if handle not in self._data:
            raise ValueError(f"{handle!r} has no owner rank: register it with this World")
        return self._data[handle][0]

    def tag(self, handle: Handle) -> int:
        if handle not in self._data:
            raise ValueError(f"{handle!r} has no tag: register it with this World")
        return self._data[handle][1]

    def reduction(self, handle: Handle, op: str = "sum") -> None:
        """Let tasks access ``handle`` in mode "REDUX", combining contributions with ``op``
        (only "sum": C init and combine codelets per dtype)."""
        self._check_open()
        if op != "sum":
            raise ValueError(f"reduction(): only 'sum' is implemented, got {op!r}")
        if handle not in self._data:
            raise ValueError(f"reduction(): {handle!r} has no owner rank: register it with this World first")
        code = REDUX_DTYPES.get(handle.dtype)
        if code is None:
            raise TypeError(f"reduction(): dtype {handle.dtype} is not supported; use one of "
                            f"{', '.join(str(d) for d in REDUX_DTYPES)}")
        self._lib.lotus_mpi_set_redux_sum(handle._ref, code)
        self._redux.add(handle)

    def redux(self, handle: Handle, priority: int = 0) -> None:
        """Sum every rank's "REDUX" contributions to ``handle`` on its owner (collective; the
        other ranks' copies are reset to zero). Blocks until every task submitted so far ran."""
        self._check_open()
        self._rt._check_not_in_task("redux()")
        self._rt._check_not_recording("redux()")
        if handle not in self._redux:
            raise ValueError(f"redux(): {handle!r} has no reduction; call world.reduction(handle) first")
        self._lib.lotus_mpi_redux(handle._ref, check_priority(priority))

    def get(self, handle: Handle, rank: int | None = None) -> None:
        """Bring the data from its owner to ``rank`` (None: to every rank). Every rank calls it;
        the copy is valid once ``handle.acquire()`` or ``unregister()`` returns. It is a task
        reading the data on each receiving rank (StarPU-MPI moves it there), so that waiting for
        that rank's tasks also waits for the message (see _mpi_shim.c on StarPU 1.3's barrier)."""
        self._check_open()
        if handle not in self._data:
            raise ValueError(f"get(): {handle!r} has no owner rank: register it with this World")
        owner = self._data[handle][0]
        targets = range(self.size) if rank is None else [self._check_owner(rank)]
        for r in targets:
            if r != owner:
                self.submit(_TOUCH, (handle, "R"), execute_on=r, name="get")

    def flush(self, handle: Handle) -> None:
        """Forget the copies of this data that earlier tasks sent or received (collective): the
        next task reading it elsewhere receives it again. Needed after tasks submitted with
        ``runtime().submit`` (not through this World) wrote it."""
        self._check_open()
        self._lib.lotus_mpi_cache_flush(handle._ref)

    # ------------------------------------------------------------------ tasks

    def _accesses(self, accesses: tuple[Any, ...]) -> tuple[tuple[Handle, ...], tuple[str, ...]]:
        if not accesses:
            raise ValueError("submit(): a StarPU-MPI task needs at least one (handle, mode) pair: its data "
                             "decide where it runs")
        handles, modes = [], []
        for i, access in enumerate(accesses):
            if type(access) is not tuple or len(access) != 2:
                raise TypeError(f"submit(): argument {i} must be a (handle, mode) pair, got {access!r}")
            handle, mode = access
            if type(handle) is not Handle or handle._runtime is not self._rt or not handle.registered:
                raise TypeError(f"submit(): argument {i} must be a registered Handle of this runtime, got {handle!r}")
            if mode not in MODES:
                raise ValueError(f"submit(): access mode {mode!r} of argument {i} is not valid; valid modes: "
                                 f"{', '.join(MODES)}")
            if handle not in self._data:
                raise ValueError(f"submit(): argument {i} ({handle!r}) has no owner rank: register it with "
                                 "world.register(), world.temporary() or world.attach() on every rank")
            if mode == "REDUX" and handle not in self._redux:
                raise ValueError(f"submit(): argument {i} is accessed in REDUX mode but has no reduction; "
                                 "call world.reduction(handle) first")
            if mode != "R" and not handle.writeable:
                raise ValueError(f"submit(): argument {i} is a read-only array and cannot be accessed with mode {mode!r}")
            handles.append(handle)
            modes.append(mode)
        if len(handles) > 1:
            _check_duplicates(handles, modes)
        return tuple(handles), tuple(modes)

    def submit(self, codelet: Codelet, *accesses: tuple[Handle, str], priority: int = 0, name: str | None = None,
               execute_on: int | None = None, **kwargs: Any) -> Future | None:
        """Submit ``codelet`` with StarPU-MPI's owner-computes rule, on every rank in the same
        order. Returns the task's Future on the rank that runs it, None on the others."""
        self._check_open()
        rt, engine, lib = self._rt, self._engine, self._lib
        if not isinstance(codelet, Codelet):
            raise TypeError(f"submit(): first argument must be a Codelet, got {type(codelet).__name__}")
        if codelet.cpu is None and not any(kind == "cuda" for kind, _ in rt.workers):
            raise ValueError(f"submit(): codelet {codelet.name!r} has no cpu body and this rank has no CUDA worker")
        if rt._plan_recording() is not None:
            raise RuntimeError("submit(): a StarPU-MPI task cannot be recorded in a step plan (its messages are "
                               "posted when it is submitted); submit it after plan.run()")
        handles, modes = self._accesses(accesses)
        where = -1 if execute_on is None else self._check_owner(execute_on)
        if len(handles) > engine._max_buffers:
            raise ValueError(f"submit(): a task takes at most {engine._max_buffers} arrays, got {len(handles)}")
        label = codelet.name if name is None else task_name(name)
        priority = check_priority(priority)
        low, high = engine.priority_range
        clamped = min(max(priority, low), high)
        future = Future(label)
        task = Task(codelet, handles, modes, kwargs, label, priority, future)
        task_id = next(rt._ids)
        executed = self._ffi.new("int *")
        engine._pending[task_id] = task
        try:
            rec = lib.lotus_mpi_submit(engine._codelets.get(codelet) or engine._c_codelet(codelet),
                                       [h._ref for h in handles], [self._modes[m] for m in modes], len(handles),
                                       clamped, label.encode(), task_id, engine._footprint(task), where, executed)
        except BaseException:
            engine._pending.pop(task_id, None)
            raise
        if executed[0] == 1:
            from lotus_rt.runtime.starpu_engine import _RecWaiter
            future._waiter = _RecWaiter(self._ffi.gc(rec, lib.lotus_rec_release), lib, engine)
            return future
        engine._pending.pop(task_id, None)
        if executed[0] == 0:
            return None
        raise RuntimeError(f"StarPU-MPI could not submit task {label!r} on rank {self.rank}: error "
                           f"{lib.lotus_last_submit_error()}")

    # ------------------------------------------------------------------ waiting

    def wait(self) -> None:
        """Wait for every task and message of this rank, then for every rank (collective);
        raise this rank's first codelet failure, naming the rank."""
        self._check_open()
        rt = self._rt
        rt._check_not_in_task("wait()")
        rt._check_not_paused("wait()")
        rt._check_not_recording("wait()")
        ret = self._lib.lotus_mpi_wait_all()
        if ret != 0:
            raise RuntimeError(f"starpu_mpi_wait_for_all failed with {ret} on rank {self.rank}")
        self._engine._drain_orphans()
        rt._waits += 1
        errors = rt._errors.take()
        if errors:
            errors[0].add_note(f"(on rank {self.rank} of {self.size})")
        raise_collected(errors)

    def barrier(self) -> None:
        """Every rank reaches this point (this rank's tasks and messages are done first)."""
        self._check_open()
        self._rt._check_not_in_task("barrier()")
        self._rt._check_not_paused("barrier()")
        ret = self._lib.lotus_mpi_barrier()
        if ret != 0:
            raise RuntimeError(f"starpu_mpi_barrier failed with {ret} on rank {self.rank}")

    def abort(self, code: int = 1, message: str | None = None) -> None:
        """End every rank now (MPI_Abort), after printing ``message`` with this rank's number."""
        if message:
            print(f"lotus_rt.distributed: rank {self.rank} of {self.size}: {message}", file=sys.stderr, flush=True)
        self._lib.lotus_mpi_abort(int(code))

    # ------------------------------------------------------------------ lifetime

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this StarPU-MPI world was shut down (with its runtime); MPI cannot be started "
                               "twice in one process")

    def _shutdown(self) -> None:
        global _world
        if not self.closed:
            self.closed = True
            self._lib.lotus_mpi_shutdown()
        if _world is self:
            _world = None


_world: World | None = None
_hook_installed = False


def _comm_pointer(ffi: Any, comm: Any) -> Any:
    if comm is None:
        return ffi.NULL
    try:
        from mpi4py import MPI
    except ImportError:
        raise TypeError(f"init(): comm must be None (MPI_COMM_WORLD) or an mpi4py communicator; mpi4py is not "
                        f"installed and a {type(comm).__name__} was given") from None
    if not isinstance(comm, MPI.Comm) or comm == MPI.COMM_NULL:
        raise TypeError(f"init(): comm must be None or an mpi4py communicator, got {comm!r}")
    return ffi.cast("void *", MPI._addressof(comm))


def _install_abort_hook() -> None:
    global _hook_installed
    if _hook_installed:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        world = _world
        if world is not None and not world.closed:
            world.abort(1, f"uncaught {kind.__name__}: ending every rank (MPI_Abort)")

    sys.excepthook = hook
    _hook_installed = True


def init(comm: Any = None, abort_on_error: bool = True) -> World:
    """Start StarPU-MPI on the process-wide runtime (StarPU engine) and return the World.

    ``comm``: None for MPI_COMM_WORLD, or an mpi4py communicator (import mpi4py before calling
    this, so that its MPI_Finalize at exit comes after StarPU-MPI's shutdown). MPI is
    initialised here unless the program did it (mpi4py does on import). Called again, returns
    the same World."""
    global _world
    from lotus_rt.starpu.mpi import load_mpi
    ffi, lib = load_mpi()
    world = _world
    if world is not None and not world.closed:
        if comm is not None and comm is not world._comm:
            raise ValueError("init(): StarPU-MPI already runs on another communicator in this process")
        return world
    rt = runtime()
    if rt.engine != "starpu":
        raise StarPUUnavailable(f"lotus_rt.distributed needs the starpu engine; this runtime is {rt.engine!r} "
                                "(unset LOTUS_ENGINE=inline)")
    if lib.lotus_mpi_finalized():
        raise RuntimeError("init(): MPI was already finalized in this process (StarPU-MPI shut down with the "
                           "runtime); MPI cannot be started twice in one process")
    pointer = _comm_pointer(ffi, comm)
    rank, size = ffi.new("int *"), ffi.new("int *")
    ret = lib.lotus_mpi_init(pointer, rank, size)
    if ret != 0:
        raise StarPUUnavailable(f"starpu_mpi_init_comm failed with {ret}")
    _world = World(rt, ffi, lib, rank[0], size[0], comm)
    rt._engine.before_shutdown.append(_world._shutdown)
    if abort_on_error:
        _install_abort_hook()
    import atexit  # after mpi4py's own (if imported first): StarPU-MPI stops before MPI_Finalize
    atexit.register(_shutdown_runtime_at_exit)
    return _world


def _shutdown_runtime_at_exit() -> None:
    from lotus_rt.runtime import shutdown
    try:
        shutdown()
    except Exception as exc:  # noqa: BLE001 - report, never hang at exit
        print(f"lotus_rt: error while shutting down StarPU-MPI at exit: {exc}", file=sys.stderr)


def world() -> World:
    """The running World (``init()`` first)."""
    if _world is None or _world.closed:
        raise RuntimeError("StarPU-MPI is not running: call lotus_rt.distributed.init() first")
    return _world
