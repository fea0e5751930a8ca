"""Shorten GNU OpenMP's spin-wait, so torch's idle threads leave the cores to StarPU's workers.

torch's CPU thread pool on Linux is GNU OpenMP (libgomp). After every parallel region each
thread of the team spins for up to ``GOMP_SPINCOUNT`` iterations (300 000 by default, several
milliseconds) before it sleeps. When StarPU's CPU workers share the cores, those spinning threads
hold the cores the workers need right after every torch op (a loss, an activation, the
autograd engine's own ops): on the 2-core CPU machine a task started up to 7 ms after StarPU
was resumed, and one layer's training step ran 1.2-1.4x slower (benchmarks/RESULTS.md).
``GOMP_SPINCOUNT=30000`` (tens of microseconds) removed that without slowing torch there.

libgomp reads the variable once, when it is loaded (when torch is imported), so it must be in
the environment before that. ``shorten_spin()`` sets it unless the user chose a spin already
(``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` set) or libgomp is already loaded; lotus_rt's own
programs (``lotus-rt``, ``python -m benchmarks``) call it first thing, and a script can too:

    import os
    from lotus_rt.runtime import omp
    omp.shorten_spin(os.environ)    # before `import torch`
"""
from __future__ import annotations

from typing import Mapping, MutableMapping

SPINCOUNT = "30000"
USER_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def libgomp_loaded() -> bool:
    """Whether GNU OpenMP is already loaded in this process (then its spin is fixed)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libgomp" in line for line in maps)
    except OSError:  # not Linux: nothing known, nothing done
        return True


def shorten_spin(env: MutableMapping[str, str], this_process: bool = True) -> str:
    """Set ``GOMP_SPINCOUNT`` in ``env`` when nobody chose a spin yet. Programs pass their own
    process environment (``this_process``: then children inherit it, and nothing is set once libgomp
    is loaded here). Returns what happened: "set", "user" (the user's setting is kept) or
    "late" (libgomp already loaded: setting it would change nothing in this process)."""
    if any(env.get(name) for name in USER_VARIABLES):
        return "user"
    if this_process and libgomp_loaded():
        return "late"
    env["GOMP_SPINCOUNT"] = SPINCOUNT
    return "set"


def report(env: Mapping[str, str]) -> str:
    """One line on the OpenMP spin in force, for ``lotus-rt info`` (``env``: as Settings read it)."""
    chosen = {name: env[name] for name in USER_VARIABLES if env.get(name)}
    if chosen:
        return ", ".join(f"{k}={v}" for k, v in chosen.items())
    return (f"GOMP_SPINCOUNT unset: torch's OpenMP threads spin ~ms after each op, on the cores "
            f"StarPU's workers use; lotus-rt and the benchmarks set {SPINCOUNT}")
