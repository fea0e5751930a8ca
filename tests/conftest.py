"""Shared fixtures of lotus_rt's test suite.

Before any runtime starts, StarPU is pointed at a throw-away STARPU_HOME (its history-based
performance models would otherwise be written to ~/.starpu) and silenced. Subprocesses started
by the tests inherit both.

Fixtures:
    rt          the runtime under test, once per engine: "starpu" (the process-wide runtime,
                skipped when the StarPU binding cannot be loaded) and "inline" (a private
                ``Runtime(Settings(engine="inline"))``, shut down afterwards).
    starpu_rt   the process-wide StarPU runtime only.
    inline_rt   a fresh inline runtime only.
    inline_engine   one inline runtime per test module (usable inside hypothesis tests).
    run_py      runs Python code in a subprocess with a chosen environment.
    lotus_env   sets LOTUS_* variables for the process-wide runtime (and undoes them).

Markers: ``gpu`` (tests/test_gpu.py) needs CuPy, a GPU and a CUDA-enabled StarPU;
``gpu_skip_reason()`` says why such a test is skipped here.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Iterable, Mapping

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

_STARPU_HOME = tempfile.mkdtemp(prefix="lotus_rt_tests_starpu_home_")
os.environ["STARPU_HOME"] = _STARPU_HOME
os.environ["STARPU_SILENT"] = "1"
# The tests decide tracing themselves (subprocesses set these explicitly when they need them).
for _name in ("LOTUS_TRACE", "LOTUS_TRACE_CAPACITY"):
    os.environ.pop(_name, None)

if str(REPO_ROOT) not in sys.path:  # for `benchmarks`; after, never before, an installed lotus_rt
    sys.path.append(str(REPO_ROOT))

import lotus_rt  # noqa: E402  (after the environment above is set)
import lotus_rt.starpu  # noqa: E402
from lotus_rt.runtime.settings import Settings  # noqa: E402

ENGINES = ("starpu", "inline")


def starpu_skip_reason() -> str | None:
    """Why the StarPU engine cannot be tested in this process, or None."""
    if not lotus_rt.starpu.available():
        try:
            lotus_rt.starpu.load()
        except lotus_rt.StarPUUnavailable as exc:
            return f"StarPU binding unavailable: {exc}"
        return "StarPU binding unavailable"
    if os.environ.get("LOTUS_ENGINE", "").strip().lower() == "inline":
        return "LOTUS_ENGINE=inline is set for this test run: the process-wide runtime is not StarPU"
    return None


@functools.lru_cache(maxsize=None)
def mpi_skip_reason() -> str | None:
    """Why StarPU-MPI programs cannot run here (no mpirun, or a binding built without
    StarPU-MPI: its message says what is missing), or None."""
    if shutil.which("mpirun") is None or shutil.which("timeout") is None:
        return "mpirun (openmpi-bin) or coreutils timeout is not installed; `make deps` installs OpenMPI"
    reason = starpu_skip_reason()
    if reason:
        return reason
    from lotus_rt.starpu.mpi import load_mpi
    try:
        load_mpi()
    except lotus_rt.StarPUUnavailable as exc:
        return str(exc)
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CuPy, a CUDA GPU and a StarPU with a CUDA worker "
                                       "(skipped with the reason elsewhere)")


@functools.lru_cache(maxsize=None)
def gpu_skip_reason() -> str | None:
    """Why the GPU tests cannot run here (no CuPy, no GPU, no CUDA StarPU worker), or None.

    Whether StarPU starts a CUDA worker is asked of a subprocess (StarPU reads STARPU_NCUDA at
    init, and this process's runtime may already be running)."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed: the GPU codelet bodies need it (pip install -e .[gpu])"
    try:
        import cupy
        ndevices = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CuPy without a driver raises CUDA errors of its own
        return f"CuPy cannot reach a GPU: {type(exc).__name__}: {exc}"
    if ndevices < 1:
        return "CuPy sees no CUDA device"
    reason = starpu_skip_reason()
    if reason:
        return reason
    if not lotus_rt.starpu.built_with_cuda():
        return ("the StarPU binding was built against a StarPU without CUDA support "
                "(README, 'GPU machines': build one and rebuild the binding)")
    proc = run_python("import lotus_rt; print('NCUDA', sum(k == 'cuda' for k, _ in lotus_rt.runtime().workers))",
                      env={"STARPU_NCPU": "1", "STARPU_NCUDA": "1", "LOTUS_ENGINE": "starpu"}, timeout=120)
    if proc.returncode != 0 or "NCUDA 1" not in proc.stdout:
        return f"StarPU started no CUDA worker with STARPU_NCUDA=1: {describe(proc)[-800:]}"
    return None


def pytest_unconfigure(config):
    # StarPU writes its performance models into STARPU_HOME at shutdown: shut down first.
    try:
        lotus_rt.shutdown()
    finally:
        shutil.rmtree(_STARPU_HOME, ignore_errors=True)


def _drain(runtime) -> None:
    """Fail the test (at teardown) if it left a codelet failure nobody observed."""
    if runtime.closed:
        return
    try:
        runtime.wait()
    except lotus_rt.CodeletError as exc:  # pragma: no cover - only on a faulty test
        pytest.fail(f"the test left an unobserved codelet failure behind: {exc}")


def starpu_runtime_or_skip():
    """The process-wide runtime when it is StarPU; skips the test (saying why) otherwise."""
    reason = starpu_skip_reason()
    if reason:
        pytest.skip(reason)
    runtime = lotus_rt.runtime()
    if runtime.engine != "starpu":
        pytest.skip(f"the process-wide runtime is {runtime.engine!r}, not StarPU")
    return runtime


@pytest.fixture(params=ENGINES)
def rt(request):
    """The runtime under test, once with each engine."""
    if request.param == "starpu":
        runtime = starpu_runtime_or_skip()
        yield runtime
        _drain(runtime)
    else:
        runtime = lotus_rt.Runtime(Settings(engine="inline"))
        yield runtime
        _drain(runtime)
        runtime.shutdown()


@pytest.fixture
def starpu_rt():
    runtime = starpu_runtime_or_skip()
    yield runtime
    _drain(runtime)


@pytest.fixture(scope="module")
def inline_engine():
    """One private inline runtime per test module (module scope: usable under hypothesis)."""
    runtime = lotus_rt.Runtime(Settings(engine="inline"))
    yield runtime
    runtime.shutdown()


@pytest.fixture
def inline_rt():
    runtime = lotus_rt.Runtime(Settings(engine="inline"))
    yield runtime
    _drain(runtime)
    runtime.shutdown()


@pytest.fixture
def lotus_env(monkeypatch):
    """``lotus_env(LOTUS_FUSE="on", ...)`` sets LOTUS_* variables and has the process-wide
    runtime re-read them (``reconfigure()``, the route a program takes); both are undone after
    the test."""
    def apply(**variables: str) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        lotus_rt.runtime().reconfigure()

    yield apply
    monkeypatch.undo()
    if not lotus_rt.runtime().closed:
        lotus_rt.runtime().reconfigure()


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's id (reproducible, different per test)."""
    import zlib

    import numpy as np
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def python_path(previous: str | None) -> str:
    """PYTHONPATH for a subprocess: the folder lotus_rt was imported from first (an installed
    copy must not be shadowed by the checkout, which has no ``lotus_rt.kernels`` of its own),
    then the repository (tests, benchmarks), then ``previous``."""
    first = str(pathlib.Path(lotus_rt.__file__).resolve().parent.parent)
    parts = [first, str(REPO_ROOT)] + (previous.split(os.pathsep) if previous else [])
    return os.pathsep.join(dict.fromkeys(p for p in parts if p))


def run_python(code: str, env: Mapping[str, str] | None = None, unset: Iterable[str] = (),
               timeout: float = 60, args: Iterable[str] = ()) -> subprocess.CompletedProcess:
    """Run ``python -c code`` from the repository root with lotus_rt importable.

    ``env`` entries are added to (a copy of) this process's environment, ``unset`` names are
    removed from it. Raises subprocess.TimeoutExpired past ``timeout`` (a hang is a failure).
    """
    full_env = dict(os.environ)
    for name in unset:
        full_env.pop(name, None)
    full_env.update(env or {})
    full_env["PYTHONPATH"] = python_path(full_env.get("PYTHONPATH"))
    return subprocess.run([sys.executable, "-c", code, *args], env=full_env, cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_py():
    return run_python


def describe(proc: subprocess.CompletedProcess) -> str:
    """A failure message with everything a subprocess said."""
    return f"exit code {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@pytest.fixture
def describe_proc():
    return describe
