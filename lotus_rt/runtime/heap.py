"""Keep freed heap memory for reuse, so every training step does not fault fresh pages in.

A layer's forward and backward allocate arrays of a few MB each (outputs, gradients, StarPU's
temporaries for intermediates) and free them when the step ends. glibc serves an allocation
above its mmap threshold with a fresh mmap and gives a freed heap top back to the kernel above
its trim threshold; both thresholds move with the process's history. When they end up low,
each step touches fresh pages: on the 2-core CPU machine one Tucker-2 training step took 640 to
2000 minor page faults on lotus_rt and 0 or 4300 on the same torch layers, depending only on
the process's allocation history; with the thresholds fixed, under one per step on both
(benchmarks/RESULTS.md: the torch/lotus_rt ratios did not move, both sides gained).

``keep_freed_memory()`` fixes both thresholds with ``mallopt``: allocations up to
``MMAP_THRESHOLD`` come from the heap, and up to ``TRIM_THRESHOLD`` of free heap is kept for
the next step. The cost is resident memory: freed blocks stay mapped instead of going back to
the kernel. The runtime applies it when it starts (LOTUS_HEAP=keep, the default; ``system``
leaves glibc's defaults), unless the user tuned glibc's allocator already (MALLOC_*_
variables or GLIBC_TUNABLES, as Settings read them). On a C library other than glibc nothing
is done.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Mapping

from lotus_rt.runtime.settings import ALLOCATOR_VARS

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest accepted value on 64-bit systems
TRIM_THRESHOLD = 256 * 2**20

_applied: str | None = None


def _user_choice(env: Mapping[str, str]) -> str | None:
    for name in ALLOCATOR_VARS:
        value = env.get(name)
        if value and (name != "GLIBC_TUNABLES" or "glibc.malloc." in value):
            return f"{name}={value}"
    return None


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory(env: Mapping[str, str]) -> str:
    """Fix glibc's mmap and trim thresholds (once per process) unless ``env`` (the variables
    Settings read) holds the user's own allocator settings. Returns what happened: "set",
    "user" (the user's allocator settings are kept) or "unavailable" (not glibc)."""
    global _applied
    if _applied is not None:
        return _applied
    if _user_choice(env):
        _applied = "user"
        return _applied
    libc = _glibc()
    if libc is None:
        _applied = "unavailable"
        return _applied
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    _applied = "set" if ok else "unavailable"
    return _applied


def report(env: Mapping[str, str]) -> str:
    """One line on the allocator thresholds in force, for ``lotus-rt info``."""
    chosen = _user_choice(env)
    if chosen:
        return f"the user's: {chosen}"
    if _applied == "set":
        return (f"glibc keeps freed memory: mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
                f"trim threshold {TRIM_THRESHOLD >> 20} MiB (LOTUS_HEAP=keep)")
    if _applied == "unavailable":
        return "not glibc: the C library's defaults"
    return "glibc's defaults (LOTUS_HEAP=system, or no runtime started yet)"
