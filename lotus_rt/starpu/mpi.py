"""The StarPU-MPI half of the binding: present when the binding was compiled with it.

``_build.py`` compiles ``_mpi_shim.c`` into ``_lotus_starpu`` only when pkg-config found
``starpumpi-<series>`` and MPI's compiler flags. ``load_mpi()`` returns ``(ffi, lib)`` when the
``lotus_mpi_*`` functions are there, and otherwise raises one StarPUUnavailable naming what is
missing now (asked of pkg-config / mpicc again: only on this error path) and how to get it.
"""
from __future__ import annotations

import functools
from typing import Any

from lotus_rt.errors import StarPUUnavailable
from lotus_rt.starpu import load


def _missing_reason() -> str:
    try:
        from lotus_rt.starpu import _build
        name, _, _, _ = _build.find_starpu()
        _build.find_starpumpi(name)
    except Exception as exc:  # noqa: BLE001 - StarPUNotFound, MPINotFound, or cffi missing
        return f"{exc}; `make deps` installs openmpi-bin and libopenmpi-dev and rebuilds the binding"
    return ("StarPU-MPI and MPI are found now, but this binding was compiled before they were: rebuild it "
            "(`make deps`, or `pip install -e .` in the checkout)")


@functools.lru_cache(maxsize=None)
def load_mpi() -> tuple[Any, Any]:
    """``(ffi, lib)`` of a binding compiled with StarPU-MPI, or StarPUUnavailable saying why not."""
    ffi, lib = load()
    if not hasattr(lib, "lotus_mpi_init"):
        raise StarPUUnavailable("lotus_rt.distributed needs StarPU-MPI, but the StarPU binding was built "
                                f"without it: {_missing_reason()}")
    return ffi, lib


def mpi_available() -> bool:
    """Whether the binding was compiled with StarPU-MPI."""
    try:
        load_mpi()
    except StarPUUnavailable:
        return False
    return True
