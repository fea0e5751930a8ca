"""Settings: every LOTUS_* knob, and the outside variables lotus_rt reports, read in one place.

This is the only module of lotus_rt that reads the process environment (the CLI aside, which
builds environments for the programs it starts). ``read_settings()`` parses it once into a
frozen :class:`Settings`; the runtime keeps that object (``runtime().settings``) and passes it
down: the layers, the planner and the codelet bodies get their tile, fusion and precision
choices as arguments, never from the environment. A runtime re-reads the environment only when
it starts, or when asked to (``Runtime.reconfigure()``).

lotus_rt's own knobs are ``LOTUS_*``; StarPU's keep StarPU's names and StarPU reads them itself.
lotus_rt only checks the StarPU values that would otherwise abort the process or be silently
ignored (an unknown ``STARPU_SCHED``, a non-integer ``STARPU_NCPU``) and reports them.

    >>> read_settings({"LOTUS_ENGINE": "inline"}).engine
    'inline'
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping, MutableMapping

from lotus_rt.errors import ConfigError

ENGINES = ("starpu", "inline")
FUSE_MODES = ("auto", "on", "off")
HEAP_MODES = ("keep", "system")  # runtime/heap.py: keep freed memory for reuse, or glibc's defaults
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
# Outside variables lotus_rt looks at (besides STARPU_*): where StarPU keeps its models, and a
# user's own choice of allocator thresholds or OpenMP spin, which lotus_rt then leaves alone.
ALLOCATOR_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
OPENMP_VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")
OTHER_VARS = ("HOME",) + ALLOCATOR_VARS + OPENMP_VARS

# Knobs a running runtime can change (Runtime.reconfigure); the others need a restart.
LIVE_KNOBS = ("optimize", "tile", "fuse", "precision", "idle_pause", "data_dir")


def path_optimizers() -> tuple[str, ...]:
    """The opt_einsum path optimizers ``optimize=`` and LOTUS_OPTIMIZE accept."""
    import opt_einsum.paths
    return tuple(sorted(opt_einsum.paths._PATH_OPTIONS))


@dataclass(frozen=True)
class Settings:
    """lotus_rt's own settings. ``engine`` is None when LOTUS_ENGINE is unset (auto);
    ``tile`` is None when LOTUS_TILE is unset (einsum picks a tile per problem).

    ``explicit`` names the LOTUS_* variables that were set (the rest are defaults); ``outside``
    holds the STARPU_* variables and the few others lotus_rt reports or respects, as read."""

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
    data_dir: str | None = None  # where lotus_rt.data looks for data sets (e.g. cifar-10-batches-py)
    explicit: frozenset = frozenset()
    outside: Mapping[str, str] = field(default_factory=dict, compare=False)

    def starpu_env(self) -> dict[str, str]:
        """The STARPU_* variables that were set, as StarPU reads them."""
        return {k: v for k, v in self.outside.items() if k.startswith("STARPU_")}

    def report(self) -> dict[str, str]:
        """Every LOTUS_* setting with the value in force, "(default)" where it was not set."""
        in_force = {
            "LOTUS_ENGINE": self.engine or "auto (starpu, else inline)",
            "LOTUS_TRACE": "on" if self.trace else "off",
            "LOTUS_TRACE_CAPACITY": str(self.trace_capacity),
            "LOTUS_TRACE_FILE": self.trace_file or "(none)",
            "LOTUS_OPTIMIZE": self.optimize,
            "LOTUS_TILE": str(self.tile) if self.tile else "auto",
            "LOTUS_IDLE_PAUSE": "on" if self.idle_pause else "off",
            "LOTUS_FUSE": self.fuse,
            "LOTUS_PRECISION": self.precision if self.precision != "auto" else
            "auto (GPU GEMMs: tf32 with compute capability >= 8.0, else fp32)",
            "LOTUS_HEAP": self.heap,
            "LOTUS_DATA_DIR": self.data_dir or "(none: data sets only where a program is told)",
        }
        return {name: value + ("" if name in self.explicit else " (default)") for name, value in in_force.items()}


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


def read_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Parse every LOTUS_* variable of ``env`` (default: this process's environment); raise
    ConfigError naming the variable on a bad value."""
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
        precision=_choice(env, "LOTUS_PRECISION", ("auto",) + PRECISIONS) or Settings.precision,
        heap=_choice(env, "LOTUS_HEAP", HEAP_MODES) or Settings.heap,
        data_dir=env.get("LOTUS_DATA_DIR") or None,
        explicit=frozenset(k for k, v in env.items() if k.startswith("LOTUS_") and v != ""),
        outside={k: v for k, v in env.items() if k.startswith("STARPU_") or k in OTHER_VARS},
    )


def with_changes(settings: Settings, **changes: object) -> Settings:
    """``settings`` with some knobs changed, each checked as its LOTUS_* variable would be."""
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(Settings)})
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; settings: "
                          f"{', '.join(f.name for f in dataclasses.fields(Settings))}")
    env = {f"LOTUS_{name.upper()}": "" if value is None else str(value).lower() if isinstance(value, bool)
           else str(value) for name, value in changes.items()}
    checked = read_settings(env)
    values = {name: getattr(checked, name) for name in changes}
    explicit = settings.explicit | {k for k, v in env.items() if v != ""}
    return dataclasses.replace(settings, **values, explicit=explicit)


def refreshed(current: Settings, fresh: Settings) -> Settings:
    """``current`` with the live knobs (LIVE_KNOBS) taken from ``fresh``, a new reading of the
    environment. A restart-only knob that ``fresh`` sets explicitly to another value is a
    ConfigError: it would silently not take effect."""
    fixed = [f.name for f in dataclasses.fields(Settings)
             if f.name not in LIVE_KNOBS and f.name not in ("explicit", "outside")]
    changed = [f"LOTUS_{name.upper()}" for name in fixed
               if getattr(current, name) != getattr(fresh, name) and f"LOTUS_{name.upper()}" in fresh.explicit]
    if changed:
        raise ConfigError(f"{', '.join(changed)} changed: it takes effect only when the runtime restarts "
                          "(lotus_rt.shutdown(), then lotus_rt.runtime())")
    live_vars = {f"LOTUS_{name.upper()}" for name in LIVE_KNOBS}
    return dataclasses.replace(current, **{name: getattr(fresh, name) for name in LIVE_KNOBS},
                               explicit=(current.explicit - live_vars) | (fresh.explicit & live_vars),
                               outside=fresh.outside)


def prepare_starpu_environment(env: MutableMapping[str, str] | None = None) -> None:
    """Variables StarPU must see before ``starpu_init``: its own signal handlers would swallow
    Ctrl-C, so Python's are kept unless the user set STARPU_CATCH_SIGNALS."""
    env = os.environ if env is None else env
    env.setdefault("STARPU_CATCH_SIGNALS", "0")


# Policies that hang even in a plain C program on some StarPU releases (checked with a
# 200-task chain of one RW handle): refused with an explanation instead of hanging.
BROKEN_POLICIES = {("1.3", "modular-heteroprio-heft"): "its task pushes never complete: a plain C "
                   "program with one RW task chain hangs in starpu_task_wait_for_all on StarPU 1.3.10"}


def usable_policies(policies: Iterable[str], starpu_version: str) -> list[str]:
    """The predefined policies minus those known to hang on this StarPU release."""
    series = ".".join(starpu_version.split(".")[:2])
    return [p for p in policies if (series, p) not in BROKEN_POLICIES]


def check_starpu_env(policies: Iterable[str], env: Mapping[str, str], starpu_version: str = "") -> None:
    """Validate the StarPU variables of ``env`` that StarPU would abort on, hang on, or misread."""
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


def starpu_env_report(settings: Settings) -> dict[str, str]:
    """The reported StarPU variables that are set, as StarPU will read them."""
    return {name: settings.outside[name] for name in STARPU_REPORTED_VARS if name in settings.outside}
