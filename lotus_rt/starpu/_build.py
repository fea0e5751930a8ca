"""Builds ``lotus_rt.starpu._lotus_starpu``: a cffi API-mode module compiled against StarPU.

The StarPU to build against is the one pkg-config finds: ``starpu-1.4`` first, then
``starpu-1.3``. ``STARPU_PREFIX`` points at a self-built StarPU (its ``lib/pkgconfig`` is put
first on ``PKG_CONFIG_PATH`` and its library directory is baked in as an rpath). The cdef only
names lotus_* functions from ``_shim.c``, whose signatures do not depend on the StarPU version.

    python -m lotus_rt.starpu._build      # compile in place (what setup.py does via cffi_modules)

pkg-config runs only when a build asks for the FFI (``make_ffibuilder()``, which setup.py names
in ``cffi_modules``), never when the package is imported.

StarPU-MPI: when pkg-config also finds ``starpumpi-<same series>`` and the MPI compiler flags are
found (``pkg-config ompi``, else ``mpicc --showme:compile/link``), ``_mpi_shim.c`` is compiled in
(``LOTUS_WITH_MPI``, included at the end of ``_shim.c``) and ``MPI_CDEF`` is appended; otherwise
the binding is built as without it and ``find_starpumpi()`` says what was missing.
"""
from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
PKG_NAMES = ("starpu-1.4", "starpu-1.3")

CDEF = """
typedef struct lotus_rec lotus_rec;
typedef struct lotus_codelet lotus_codelet;
typedef struct lotus_plan lotus_plan;
struct lotus_trace_entry {
    uint64_t id;
    int worker;
    double start_us;
    double end_us;
    char name[48];
};

void lotus_version(int *major, int *minor, int *release);
int lotus_built_with_cuda(void);
int lotus_max_buffers(void);
int lotus_policy_count(void);
const char *lotus_policy_name(int i);
const char *lotus_policy_description(int i);

int lotus_init(int enable_profiling);
void lotus_shutdown(void);
const char *lotus_current_policy(void);
int lotus_worker_count(void);
int lotus_worker_kind(int id);
void lotus_worker_name(int id, char *dst, size_t maxlen);
int lotus_current_worker(void);
int lotus_worker_stats(int id, int *executed_tasks, double *executing_us);
double lotus_now_us(void);
int lotus_min_priority(void);
int lotus_max_priority(void);

void *lotus_register(void *ptr, size_t nelems, size_t elemsize);
void *lotus_register_temporary(size_t nelems, size_t elemsize);
void *lotus_register_cuda(void *ptr, size_t nelems, size_t elemsize, uintptr_t stream, int *err);
void lotus_unregister(void *handle);
void lotus_unregister_submit(void *handle);
int lotus_acquire(void *handle, int mode);
void lotus_release(void *handle);
int lotus_acquire_home(void *handle, int mode);
void lotus_release_home(void *handle);
int lotus_pin(void *ptr, size_t size);
int lotus_unpin(void *ptr, size_t size);
int lotus_mode_r(void);
int lotus_mode_w(void);
int lotus_mode_rw(void);

lotus_codelet *lotus_codelet_new(const char *name, int with_cpu, int with_cuda);
void lotus_codelet_free(lotus_codelet *c);

lotus_rec *lotus_submit(lotus_codelet *c, void **handles, int *modes, int n, int priority,
                        const char *name, uint64_t id, uint32_t footprint);
int lotus_last_submit_error(void);
int lotus_rec_done(lotus_rec *rec);
int lotus_rec_wait(lotus_rec *rec, double timeout_s);
void lotus_rec_release(lotus_rec *rec);
int lotus_wait_all(void);

lotus_plan *lotus_plan_new(void);
int lotus_plan_size(lotus_plan *p);
lotus_rec *lotus_plan_add(lotus_plan *p, lotus_codelet *c, void **handles, int *modes, int n, int priority,
                          const char *name, uint64_t id, uint32_t footprint);
int lotus_plan_submit(lotus_plan *p);
void lotus_plan_free(lotus_plan *p);
void lotus_idle_pause_configure(int enabled, long batch);
void lotus_start_held(void);
void lotus_user_pause(void);
int lotus_user_resume(void);
int lotus_user_paused(void);

int lotus_trace_configure(int enabled, size_t capacity);
uint64_t lotus_trace_read(struct lotus_trace_entry *out, size_t max, size_t *copied);
void lotus_trace_clear(void);

extern "Python" void lotus_py_exec(uint64_t id, void **ptrs, int n, int kind, int worker, void *stream);
"""


MPI_CDEF = """
int lotus_mpi_init(void *comm, int *rank, int *size);
int lotus_mpi_shutdown(void);
int lotus_mpi_initialized(void);
int lotus_mpi_finalized(void);
int lotus_mpi_rank(void);
int lotus_mpi_size(void);
int lotus_mode_redux(void);
void lotus_mpi_data_register(void *handle, int64_t tag, int owner);
int lotus_mpi_data_owner(void *handle);
int64_t lotus_mpi_data_tag(void *handle);
void lotus_mpi_cache_flush(void *handle);
int lotus_mpi_set_redux_sum(void *handle, int dtype);
void lotus_mpi_redux(void *handle, int priority);
lotus_rec *lotus_mpi_submit(lotus_codelet *c, void **handles, int *modes, int n, int priority,
                            const char *name, uint64_t id, uint32_t footprint, int execute_on, int *executed);
int lotus_mpi_wait_all(void);
int lotus_mpi_barrier(void);
void lotus_mpi_abort(int code);
"""


class StarPUNotFound(RuntimeError):
    """No StarPU development files were found by pkg-config."""


def _pkg_config_env() -> dict[str, str]:
    env = dict(os.environ)
    prefix = env.get("STARPU_PREFIX")
    if prefix:
        dirs = [os.path.join(prefix, sub, "pkgconfig") for sub in ("lib", "lib64", "lib/x86_64-linux-gnu")]
        env["PKG_CONFIG_PATH"] = os.pathsep.join(dirs + [env.get("PKG_CONFIG_PATH", "")])
    return env


def find_starpu() -> tuple[str, str, list[str], list[str]]:
    """Return (pkg name, version, cflags, libs) of the StarPU pkg-config finds."""
    env = _pkg_config_env()
    for name in PKG_NAMES:
        try:
            version = subprocess.run(["pkg-config", "--modversion", name], env=env, check=True,
                                     capture_output=True, text=True).stdout.strip()
            cflags = subprocess.run(["pkg-config", "--cflags", name], env=env, check=True,
                                    capture_output=True, text=True).stdout
            libs = subprocess.run(["pkg-config", "--libs", name], env=env, check=True,
                                  capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        return name, version, shlex.split(cflags), shlex.split(libs)
    raise StarPUNotFound(
        "pkg-config finds neither starpu-1.4 nor starpu-1.3: install libstarpu-dev "
        "(apt-get install libstarpu-dev pkg-config) or set STARPU_PREFIX to a StarPU install")


class MPINotFound(RuntimeError):
    """StarPU-MPI (starpumpi) or the MPI compiler flags were not found."""


def _run(args: list[str], env: dict[str, str] | None = None) -> str:
    return subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout


def find_starpumpi(starpu_name: str) -> tuple[str, list[str], list[str]]:
    """Return (pkg name, cflags, libs) of StarPU-MPI for ``starpu_name`` plus MPI's own flags;
    raise MPINotFound saying what is missing."""
    env = _pkg_config_env()
    name = starpu_name.replace("starpu-", "starpumpi-")
    try:
        flags = shlex.split(_run(["pkg-config", "--cflags", "--libs", name], env))
    except (OSError, subprocess.CalledProcessError):
        raise MPINotFound(f"pkg-config finds no {name} (StarPU-MPI, shipped with libstarpu-dev)") from None
    try:
        mpi = shlex.split(_run(["pkg-config", "--cflags", "--libs", "ompi"], env))
    except (OSError, subprocess.CalledProcessError):
        try:
            mpi = shlex.split(_run(["mpicc", "--showme:compile"]) + " " + _run(["mpicc", "--showme:link"]))
        except (OSError, subprocess.CalledProcessError):
            raise MPINotFound("no MPI compiler flags (neither `pkg-config ompi` nor `mpicc --showme`): "
                              "install openmpi-bin libopenmpi-dev (make deps does)") from None
    return name, [f for f in flags + mpi if not f.startswith(("-L", "-l"))], \
        [f for f in flags + mpi if f.startswith(("-L", "-l"))]


def make_ffibuilder() -> FFI:
    starpu_name, _, cflags, libs = find_starpu()
    cdef, macros, extra_compile = CDEF, [], []
    try:
        mpi_name, mpi_cflags, mpi_libs = find_starpumpi(starpu_name)
    except MPINotFound as exc:
        print(f"lotus_rt: building the StarPU binding WITHOUT StarPU-MPI: {exc}", file=sys.stderr)
    else:
        print(f"lotus_rt: building the StarPU binding with StarPU-MPI ({mpi_name})", file=sys.stderr)
        cdef += MPI_CDEF
        macros.append(("LOTUS_WITH_MPI", "1"))
        cflags = cflags + mpi_cflags + [f"-I{HERE}"]  # _shim.c #includes _mpi_shim.c
        libs = libs + mpi_libs
        extra_compile = [f for f in mpi_cflags if not f.startswith("-I")]
    include_dirs = list(dict.fromkeys(f[2:] for f in cflags if f.startswith("-I")))
    library_dirs = list(dict.fromkeys(f[2:] for f in libs if f.startswith("-L")))
    libraries = list(dict.fromkeys(f[2:] for f in libs if f.startswith("-l")))
    ffibuilder = FFI()
    ffibuilder.cdef(cdef)
    ffibuilder.set_source(
        "lotus_rt.starpu._lotus_starpu",
        (HERE / "_shim.c").read_text(),
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        libraries=libraries,
        runtime_library_dirs=library_dirs,
        define_macros=macros,
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"] + extra_compile,
        py_limited_api=False,  # same file name (.cpython-3X-...so) from pip and from `python -m`
    )
    return ffibuilder


if __name__ == "__main__":
    make_ffibuilder().compile(tmpdir=str(HERE.parent.parent), verbose=False)
