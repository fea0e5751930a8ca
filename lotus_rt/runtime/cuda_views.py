"""CuPy views on StarPU's CUDA buffers, for codelet bodies running on CUDA workers.

StarPU hands a CUDA worker device pointers (vector interface) and a per-worker local stream;
the body gets CuPy arrays that alias those buffers (no copy, no ownership) and runs with that
stream current, so its kernels are ordered with StarPU's transfers (codelets are declared
STARPU_CUDA_ASYNC: StarPU synchronises the stream before it calls the task done).

Not exercised on CPU-only machines: it is imported only when a task runs on a CUDA worker.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import cupy


def device_array(ptr: Any, nbytes: int, shape: tuple[int, ...], dtype: Any) -> "cupy.ndarray":
    """A CuPy array over ``nbytes`` of device memory at ``ptr`` (a cffi ``void *``)."""
    from lotus_rt.starpu import load
    ffi, _ = load()
    address = int(ffi.cast("uintptr_t", ptr))
    memory = cupy.cuda.UnownedMemory(address, nbytes, owner=None)
    return cupy.ndarray(shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(memory, 0))


@contextlib.contextmanager
def on_stream(stream: Any) -> Iterator[None]:
    """Make StarPU's local CUDA stream (a cffi ``void *``) CuPy's current stream."""
    from lotus_rt.starpu import load
    ffi, _ = load()
    with cupy.cuda.ExternalStream(int(ffi.cast("uintptr_t", stream))):
        yield
