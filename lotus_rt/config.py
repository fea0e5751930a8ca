"""Reads and validates configuration from the environment, before anything is submitted.

lotus_rt's own knobs are ``LOTUS_*``; StarPU's knobs keep StarPU's names and StarPU reads them
itself. lotus_rt only checks the StarPU values that would otherwise abort the process or be
silently ignored (an unknown ``STARPU_SCHED``, a non-integer ``STARPU_NCPU``) and reports them.

    >>> read_settings({"LOTUS_ENGINE": "inline"}).engine
    'inline'
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping

from lotus_rt.errors import ConfigError

ENGINES = ("starpu", "inline")
FUSE_MODES = ("auto", "on", "off")
HEAP_MODES = ("keep", "system")  # lotus_rt/heap.py: keep freed memory for reuse, or glibc's defaults
# GEMM precision of the GPU bodies (kernels/precision.py); "auto": tf32 on GPUs with Tensor Cores
# (compute capability >= 8.0), else fp32. CPU bodies always compute in the operands' dtype.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
            "0": False, "false": False, "no": False, "off": False}

# StarPU variables whose value must be a non-negative integer (StarPU's meaning for -1 aside).
STARPU_INT_VARS = ("STARPU_NCPU", "STARPU_NCUDA", "STARPU_NOPENCL", "STARPU_CALIBRATE")
# StarPU variables worth reporting in `info`-like output.
STARPU_REPORTED_VARS = ("STARPU_SCHED", "STARPU_NCPU", "STARPU_NCUDA", "STARPU_CALIBRATE",
                        "STARPU_PERF_MODEL_DIR", "STARPU_WORKERS_NOBIND", "STARPU_HOME",
                        "STARPU_SILENT")


def path_optimizers() -> tuple[str, ...]:
    """The opt_einsum path optimizers ``optimize=`` and LOTUS_OPTIMIZE accept."""
    import opt_einsum.paths
    return tuple(sorted(opt_einsum.paths._PATH_OPTIONS))


@dataclass(frozen=True)
class Settings:
    """lotus_rt's own settings. ``engine`` is None when LOTUS_ENGINE is unset (auto);
    ``tile`` is None when LOTUS_TILE is unset (einsum picks a tile per problem)."""

    engine: str | None = None
    trace: bool = True
    trace_capacity: int = 65536
    optimize: str = "auto"
    tile: int | None = None
    idle_pause: bool = True
    trace_file: str | None = None  # written at shutdown: .json (Chrome trace) or .png (Gantt)
    fuse: str = "auto"  # small layers as one forward and one backward task: auto, on, off
    precision: str = "auto"  # GPU GEMMs of float32 data: auto or one of PRECISIONS
    heap: str = "keep"  # allocator thresholds fixed at runtime start (heap.py), or "system"


TRACE_FILE_SUFFIXES = (".json", ".png")


def _trace_file(env: Mapping[str, str]) -> str | None:
    raw = env.get("LOTUS_TRACE_FILE")
    if raw is None or raw.strip() == "":
        return None
    if not raw.lower().endswith(TRACE_FILE_SUFFIXES):
        raise ConfigError(f"LOTUS_TRACE_FILE={raw!r} is not valid; expected a path ending in "
                          f"{' or '.join(TRACE_FILE_SUFFIXES)} (Chrome trace JSON or Gantt PNG)")
    return raw


def _choice(env: Mapping[str, str], name: str, choices: Iterable[str]) -> str | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    value = raw.strip().lower()
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name}={raw!r} is not valid; valid values: {', '.join(choices)}")
    return value


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} is not valid; expected a positive integer")
    return value


def read_precision(env: Mapping[str, str] | None = None) -> str:
    """LOTUS_PRECISION: "auto" (also when unset) or one of PRECISIONS; ConfigError otherwise."""
    env = os.environ if env is None else env
    return _choice(env, "LOTUS_PRECISION", ("auto",) + PRECISIONS) or Settings.precision


def read_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Parse every LOTUS_* variable; raise ConfigError naming the variable on a bad value."""
    env = os.environ if env is None else env
    trace = _choice(env, "LOTUS_TRACE", BOOLEANS)
    if trace is not None and not BOOLEANS[trace] and env.get("LOTUS_TRACE_FILE"):
        raise ConfigError("LOTUS_TRACE_FILE is set but LOTUS_TRACE is off: nothing would be recorded")
    idle_pause = _choice(env, "LOTUS_IDLE_PAUSE", BOOLEANS)
    optimize = env.get("LOTUS_OPTIMIZE") or None
    if optimize is not None and optimize not in path_optimizers():
        raise ConfigError(f"LOTUS_OPTIMIZE={optimize!r} is not valid; valid values: "
                          f"{', '.join(path_optimizers())}")
    return Settings(
        engine=_choice(env, "LOTUS_ENGINE", ENGINES),
        trace=True if trace is None else BOOLEANS[trace],
        trace_capacity=_positive_int(env, "LOTUS_TRACE_CAPACITY", Settings.trace_capacity),
        optimize=optimize or Settings.optimize,
        tile=_positive_int(env, "LOTUS_TILE", 0) or None,
        idle_pause=True if idle_pause is None else BOOLEANS[idle_pause],
        trace_file=_trace_file(env),
        fuse=_choice(env, "LOTUS_FUSE", FUSE_MODES) or Settings.fuse,
        precision=read_precision(env),
        heap=_choice(env, "LOTUS_HEAP", HEAP_MODES) or Settings.heap,
    )


# Policies that hang even in a plain C program on some StarPU releases (checked with a
# 200-task chain of one RW handle): refused with an explanation instead of hanging.
BROKEN_POLICIES = {("1.3", "modular-heteroprio-heft"): "its task pushes never complete: a plain C "
                   "program with one RW task chain hangs in starpu_task_wait_for_all on StarPU 1.3.10"}


def usable_policies(policies: Iterable[str], starpu_version: str) -> list[str]:
    """The predefined policies minus those known to hang on this StarPU release."""
    series = ".".join(starpu_version.split(".")[:2])
    return [p for p in policies if (series, p) not in BROKEN_POLICIES]


def check_starpu_env(policies: Iterable[str], env: Mapping[str, str] | None = None,
                     starpu_version: str = "") -> None:
    """Validate the StarPU variables StarPU would abort on, hang on, or silently misread."""
    env = os.environ if env is None else env
    policies = list(policies)
    sched = env.get("STARPU_SCHED")
    series = ".".join(starpu_version.split(".")[:2])
    if sched and (series, sched) in BROKEN_POLICIES:
        raise ConfigError(f"STARPU_SCHED={sched!r} is not usable with StarPU {starpu_version}: "
                          f"{BROKEN_POLICIES[series, sched]}; valid values: "
                          f"{', '.join(usable_policies(policies, starpu_version))}")
    if sched and sched not in policies:
        raise ConfigError(f"STARPU_SCHED={sched!r} is not a scheduling policy of this StarPU; "
                          f"valid values: {', '.join(usable_policies(policies, starpu_version))}")
    for name in STARPU_INT_VARS:
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None or value < -1:
            raise ConfigError(f"{name}={raw!r} is not valid; expected an integer >= 0 "
                              "(or -1 for StarPU's default)")


def starpu_env_report(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The StarPU variables that are set, as StarPU will read them."""
    env = os.environ if env is None else env
    return {name: env[name] for name in STARPU_REPORTED_VARS if name in env}


def lotus_env_report(settings: Settings, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every LOTUS_* setting with the value in force (set or default)."""
    env = os.environ if env is None else env
    in_force = {
        "LOTUS_ENGINE": settings.engine or "auto (starpu, else inline)",
        "LOTUS_TRACE": "on" if settings.trace else "off",
        "LOTUS_TRACE_CAPACITY": str(settings.trace_capacity),
        "LOTUS_TRACE_FILE": settings.trace_file or "(none)",
        "LOTUS_OPTIMIZE": settings.optimize,
        "LOTUS_TILE": str(settings.tile) if settings.tile else "auto",
        "LOTUS_IDLE_PAUSE": "on" if settings.idle_pause else "off",
        "LOTUS_FUSE": settings.fuse,
        "LOTUS_PRECISION": settings.precision if settings.precision != "auto" else
        "auto (GPU GEMMs: tf32 with compute capability >= 8.0, else fp32)",
        "LOTUS_HEAP": settings.heap,
    }
    return {name: value + ("" if name in env else " (default)") for name, value in in_force.items()}
