"""lotus_rt's own binding to libstarpu (cffi, API mode).

The compiled module ``_lotus_starpu`` is built at install time by ``_build.py`` against the
StarPU headers pkg-config finds; only this package touches cffi or C structs. ``load()``
returns ``(ffi, lib)`` or raises :class:`lotus_rt.errors.StarPUUnavailable` saying why.

    >>> from lotus_rt.starpu import load, policies
    >>> ffi, lib = load()
    >>> "dmda" in policies()
    True
"""
from __future__ import annotations

import functools

from lotus_rt.errors import StarPUUnavailable


@functools.lru_cache(maxsize=None)
def load():
    """Import the compiled binding; raise StarPUUnavailable with the reason if it cannot."""
    try:
        from lotus_rt.starpu import _lotus_starpu
    except ImportError as exc:
        raise StarPUUnavailable(
            "the StarPU binding lotus_rt.starpu._lotus_starpu is not built or cannot load "
            f"({exc}); install libstarpu-dev (or set STARPU_PREFIX) and reinstall lotus_rt "
            "with `pip install -e .`") from exc
    return _lotus_starpu.ffi, _lotus_starpu.lib


def available() -> bool:
    try:
        load()
    except StarPUUnavailable:
        return False
    return True


def version() -> str:
    ffi, lib = load()
    parts = ffi.new("int[3]")
    lib.lotus_version(parts, parts + 1, parts + 2)
    return f"{parts[0]}.{parts[1]}.{parts[2]}"


def built_with_cuda() -> bool:
    return bool(load()[1].lotus_built_with_cuda())


def policies() -> dict[str, str]:
    """StarPU's predefined scheduling policies: name -> description (usable before init)."""
    ffi, lib = load()
    return {ffi.string(lib.lotus_policy_name(i)).decode(): ffi.string(lib.lotus_policy_description(i)).decode()
            for i in range(lib.lotus_policy_count())}
