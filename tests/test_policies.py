"""Every StarPU scheduling policy computes the right DAG; bad configuration is one clear error.

Each policy runs in its own subprocess (StarPU reads STARPU_SCHED at init); the subprocesses
run two at a time. The parent writes the task program as JSON, the child runs it on StarPU and
saves the arrays, and the parent compares them with its own NumPy evaluation of the program.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import textwrap

import numpy as np
import pytest

import lotus_rt
import lotus_rt.starpu
from lotus_rt.runtime import settings as config
from conftest import run_python, starpu_skip_reason

SKIP_REASON = starpu_skip_reason()
POLICIES = list(lotus_rt.starpu.policies()) if lotus_rt.starpu.available() else []
STARPU_VERSION = lotus_rt.starpu.version() if lotus_rt.starpu.available() else ""
SERIES = ".".join(STARPU_VERSION.split(".")[:2])
# policies lotus_rt refuses on this StarPU release (known to hang): a ConfigError, not a hang
REFUSED = {name for series, name in getattr(config, "BROKEN_POLICIES", {}) if series == SERIES}
USABLE = [p for p in POLICIES if p not in REFUSED]

NHANDLES, NTASKS, N = 8, 200, 12
POLICY_TIMEOUT_S = 20   # a normal run takes well under a second

POLICY_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, lotus_rt
    program_path, out_path = sys.argv[1], sys.argv[2]
    with open(program_path) as f:
        spec = json.load(f)
    rt = lotus_rt.runtime()
    print("ENGINE", rt.engine)
    print("POLICY", rt.policy)

    def gemm(c, a, b, alpha):
        c *= 0.5
        c += alpha * (a @ b)
        np.tanh(c, out=c)

    def affine(x, a, b):
        x *= a
        x += b
        np.tanh(x, out=x)

    def overwrite(d, s, a):
        np.multiply(s.T, a, out=d)
        np.cos(d, out=d)

    cls = {"gemm": rt.codelet("pol_gemm", cpu=gemm), "affine": rt.codelet("pol_affine", cpu=affine),
           "overwrite": rt.codelet("pol_overwrite", cpu=overwrite)}
    arrays = [np.array(a, dtype=np.float64) for a in spec["inits"]]
    handles = [rt.register(a) for a in arrays]
    lotus_rt.stats(reset=True)
    for op, d, srcs, kw, prio in spec["program"]:
        mode = "W" if op == "overwrite" else "RW"
        rt.submit(cls[op], (handles[d], mode), *[(handles[s], "R") for s in srcs], priority=prio, **kw)
    rt.wait()
    print("TASKS", sum(s.tasks for s in lotus_rt.stats()))
    for h in handles:
        h.unregister()
    np.save(out_path, np.stack(arrays))
    print("DONE")
""")


def make_program(seed: int):
    rng = np.random.default_rng(seed)
    inits = [rng.standard_normal((N, N)).tolist() for _ in range(NHANDLES)]
    program = []
    for _ in range(NTASKS):
        d = int(rng.integers(NHANDLES))
        others = [int(i) for i in rng.permutation([i for i in range(NHANDLES) if i != d])]
        prio = int(rng.integers(-2, 3))
        r = rng.random()
        if r < 0.5:
            program.append(["gemm", d, others[:2], {"alpha": float(rng.uniform(0.05, 0.2))}, prio])
        elif r < 0.85:
            program.append(["affine", d, [], {"a": float(rng.uniform(0.5, 1.5)),
                                              "b": float(rng.uniform(-0.5, 0.5))}, prio])
        else:
            program.append(["overwrite", d, others[:1], {"a": float(rng.uniform(0.5, 1.5))}, prio])
    return {"inits": inits, "program": program}


def reference(spec):
    arrays = [np.array(a, dtype=np.float64) for a in spec["inits"]]
    for op, d, srcs, kw, _ in spec["program"]:
        if op == "gemm":
            arrays[d] = np.tanh(arrays[d] * 0.5 + kw["alpha"] * (arrays[srcs[0]] @ arrays[srcs[1]]))
        elif op == "affine":
            arrays[d] = np.tanh(arrays[d] * kw["a"] + kw["b"])
        else:
            arrays[d] = np.cos(arrays[srcs[0]].T * kw["a"])
    return np.stack(arrays)


@pytest.fixture(scope="module")
def policy_runs(tmp_path_factory):
    """Run the program under every policy, two subprocesses at a time."""
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    tmp = tmp_path_factory.mktemp("policies")
    spec = make_program(2024)
    program_path = tmp / "program.json"
    program_path.write_text(json.dumps(spec))

    def run_one(name):
        out = tmp / f"{name}.npy"
        home = tmp / f"home-{name}"   # fresh performance models: every run starts uncalibrated
        home.mkdir()
        try:
            proc = run_python(POLICY_SCRIPT, env={"STARPU_SCHED": name, "LOTUS_ENGINE": "starpu",
                                                  "STARPU_HOME": str(home)},
                              timeout=POLICY_TIMEOUT_S, args=[str(program_path), str(out)])
        except subprocess.TimeoutExpired as exc:
            return name, exc, out
        return name, proc, out

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = {name: (proc, out) for name, proc, out in pool.map(run_one, POLICIES)}
    return spec, reference(spec), results


def test_policies_are_listed():
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    names = lotus_rt.starpu.policies()
    assert len(names) >= 10
    for expected in ("eager", "prio", "ws", "lws", "dm", "dmda", "dmdas", "random"):
        assert expected in names
    assert all(isinstance(desc, str) and desc for desc in names.values())


@pytest.mark.parametrize("policy", POLICIES or [pytest.param("none", marks=pytest.mark.skip(
    reason=SKIP_REASON or "StarPU unavailable"))])
def test_policy_runs_dag_correctly(policy_runs, policy):
    spec, ref, results = policy_runs
    proc, out = results[policy]
    if isinstance(proc, subprocess.TimeoutExpired):
        def text(data):
            return data.decode(errors="replace") if isinstance(data, bytes) else data
        pytest.fail(f"STARPU_SCHED={policy}: the run hung (killed after {proc.timeout} s)\n"
                    f"stdout: {text(proc.stdout)}\nstderr: {text(proc.stderr)}")
    detail = f"STARPU_SCHED={policy}: exit code {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    if policy in REFUSED:   # refused up front with the reason, before any task
        assert proc.returncode == 1, detail
        assert f"ConfigError: STARPU_SCHED={policy!r} is not usable with StarPU" in proc.stderr, detail
        assert "ENGINE" not in proc.stdout, detail
        return
    assert proc.returncode == 0, detail
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines() if " " in line)
    assert lines.get("ENGINE") == "starpu", detail
    assert lines.get("POLICY") == policy, detail
    assert lines.get("TASKS") == str(NTASKS), detail
    result = np.load(out)
    np.testing.assert_allclose(result, ref, rtol=1e-10, atol=1e-12, err_msg=f"STARPU_SCHED={policy}")


POLICY_SWITCH_SCRIPT = textwrap.dedent("""
    import os, numpy as np, lotus_rt
    for name in ["eager", "dmda", "lws", "prio", "modular-heft"]:
        os.environ["STARPU_SCHED"] = name
        rt = lotus_rt.runtime()
        x0 = np.random.default_rng(len(name)).random(8) + 0.5
        h = rt.register(x0.copy())
        for i in range(10):
            rt.submit(rt.codelet("aff", cpu=lambda x, i: np.add(x * 1.5, i, out=x)), (h, "RW"), i=i)
        rt.wait()
        ref = x0.copy()
        for i in range(10):
            ref = ref * 1.5 + i
        print("POLICY", name, rt.policy, bool(np.allclose(h.unregister(), ref, rtol=1e-14)))
        lotus_rt.shutdown()
""")


def test_policy_changes_after_shutdown_and_restart_in_one_process(run_py, describe_proc):
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    proc = run_py(POLICY_SWITCH_SCRIPT, env={"LOTUS_ENGINE": "starpu"}, timeout=90)
    assert proc.returncode == 0, describe_proc(proc)
    lines = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("POLICY")]
    assert lines == [[n, n, "True"] for n in ["eager", "dmda", "lws", "prio", "modular-heft"]], \
        describe_proc(proc)


# ---------------------------------------------------------------------- configuration errors

CONFIG_SCRIPT = textwrap.dedent("""
    import json, os, numpy as np, lotus_rt
    ran = []
    try:
        rt = lotus_rt.runtime()
        h = rt.register(np.ones(2))
        rt.submit(rt.codelet("probe", cpu=lambda x: ran.append(1)), (h, "RW"))
        rt.wait()
        print("NO_ERROR", rt.engine, rt.policy, len(rt.workers))
    except lotus_rt.ConfigError as exc:
        print("CONFIG_ERROR", isinstance(exc, ValueError), isinstance(exc, lotus_rt.LotusError))
        print("MESSAGE", str(exc).replace(chr(10), " "))
    print("RAN", len(ran))
    # a failed start leaves nothing behind: with a good environment, a runtime starts
    for name in json.loads(os.environ["BAD_VARS"]):
        os.environ.pop(name, None)
    rt = lotus_rt.runtime()
    h = rt.register(np.arange(1.0, 4.0))
    rt.submit(rt.codelet("double", cpu=lambda x: np.multiply(x, 2, out=x)), (h, "RW"))
    rt.wait()
    print("RECOVERED", rt.engine, h.unregister().tolist())
""")


def _run_config(run_py, env):
    proc = run_py(CONFIG_SCRIPT, env={**env, "BAD_VARS": json.dumps(list(env))}, timeout=60)
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines() if " " in line)
    return proc, lines


@pytest.mark.parametrize("env, words", [
    ({"STARPU_SCHED": "no-such-policy"}, ["STARPU_SCHED", "'no-such-policy'", "valid values", "eager", "dmda"]),
    ({"STARPU_SCHED": "DMDA"}, ["STARPU_SCHED", "valid values"]),
    ({"STARPU_NCPU": "abc"}, ["STARPU_NCPU", "'abc'", "integer"]),
    ({"STARPU_NCPU": "-5"}, ["STARPU_NCPU", "'-5'"]),
    ({"STARPU_NCUDA": "1.5"}, ["STARPU_NCUDA", "'1.5'"]),
], ids=["sched_unknown", "sched_wrong_case", "ncpu_abc", "ncpu_negative", "ncuda_float"])
def test_bad_starpu_env_is_a_config_error_before_any_task(run_py, describe_proc, env, words):
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    proc, lines = _run_config(run_py, env)
    assert proc.returncode == 0, describe_proc(proc)
    assert lines.get("CONFIG_ERROR") == "True True", describe_proc(proc)
    for word in words:
        assert word in lines["MESSAGE"], (word, lines["MESSAGE"])
    if "STARPU_SCHED" in env:   # every usable policy is listed, refused ones are not
        listed = lines["MESSAGE"].split("valid values: ", 1)[1].split(", ")
        assert listed == USABLE, listed
    assert lines["RAN"] == "0"
    assert lines.get("RECOVERED") == "starpu [2.0, 4.0, 6.0]", describe_proc(proc)


@pytest.mark.parametrize("env, words", [
    ({"LOTUS_ENGINE": "bogus"}, ["LOTUS_ENGINE", "'bogus'", "valid values", "starpu", "inline"]),
    ({"LOTUS_TRACE": "maybe"}, ["LOTUS_TRACE", "'maybe'"]),
    ({"LOTUS_TRACE_CAPACITY": "0"}, ["LOTUS_TRACE_CAPACITY", "'0'", "positive integer"]),
    ({"LOTUS_TRACE_CAPACITY": "lots"}, ["LOTUS_TRACE_CAPACITY", "'lots'"]),
    ({"LOTUS_IDLE_PAUSE": "sometimes"}, ["LOTUS_IDLE_PAUSE", "'sometimes'", "valid values"]),
    ({"LOTUS_FUSE": "maybe"}, ["LOTUS_FUSE", "'maybe'", "auto, on, off"]),
    ({"LOTUS_HEAP": "jemalloc"}, ["LOTUS_HEAP", "'jemalloc'", "keep, system"]),
    ({"LOTUS_TRACE_FILE": "t.txt"}, ["LOTUS_TRACE_FILE", "'t.txt'", ".json or .png"]),
], ids=["engine_bogus", "trace_maybe", "capacity_zero", "capacity_text", "idle_pause_bad", "fuse_bad",
        "heap_bad", "trace_file_bad"])
def test_bad_lotus_env_is_a_config_error(run_py, describe_proc, env, words):
    proc, lines = _run_config(run_py, env)
    assert proc.returncode == 0, describe_proc(proc)
    assert lines.get("CONFIG_ERROR") == "True True", describe_proc(proc)
    for word in words:
        assert word in lines["MESSAGE"], (word, lines["MESSAGE"])
    assert lines["RAN"] == "0"
    assert lines.get("RECOVERED", "").endswith("[2.0, 4.0, 6.0]"), describe_proc(proc)


def test_starpu_env_is_passed_to_starpu(run_py, describe_proc):
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    proc, lines = _run_config(run_py, {"STARPU_NCPU": "1", "STARPU_SCHED": "eager"})
    assert proc.returncode == 0, describe_proc(proc)
    assert lines.get("NO_ERROR") == "starpu eager 1", describe_proc(proc)
    assert lines["RAN"] == "1"


def test_engine_name_is_case_and_space_insensitive(run_py, describe_proc):
    proc, lines = _run_config(run_py, {"LOTUS_ENGINE": " Inline "})
    assert proc.returncode == 0, describe_proc(proc)
    assert lines.get("NO_ERROR") == "inline inline 1", describe_proc(proc)
    assert lines["RAN"] == "1"


# ---------------------------------------------------------------------- config functions in-process


def test_read_settings_values():
    s = config.read_settings({"LOTUS_ENGINE": "starpu", "LOTUS_TRACE": "off", "LOTUS_TRACE_CAPACITY": "17"})
    assert (s.engine, s.trace, s.trace_capacity) == ("starpu", False, 17)
    s = config.read_settings({})
    assert (s.engine, s.trace, s.trace_capacity) == (None, True, config.Settings.trace_capacity)
    assert s.idle_pause is True and config.read_settings({"LOTUS_IDLE_PAUSE": "off"}).idle_pause is False
    assert config.read_settings({"LOTUS_ENGINE": ""}).engine is None


def test_check_starpu_env_in_process():
    policies = ["eager", "dmda"]
    config.check_starpu_env(policies, {"STARPU_SCHED": "dmda", "STARPU_NCPU": "-1", "STARPU_NCUDA": "0"})
    with pytest.raises(lotus_rt.ConfigError, match="STARPU_SCHED='lws'.*eager, dmda"):
        config.check_starpu_env(policies, {"STARPU_SCHED": "lws"})
    with pytest.raises(lotus_rt.ConfigError, match="STARPU_CALIBRATE"):
        config.check_starpu_env(policies, {"STARPU_CALIBRATE": "yes"})
    assert os.environ.get("STARPU_SILENT") == "1"   # conftest's setting is in place


# ---------------------------------------------------------------------- idle pause

IDLE_CPU_CODE = r"""
import threading, time
import numpy as np
import lotus_rt
rt = lotus_rt.runtime()
assert rt.engine == "starpu", rt.engine
double = rt.codelet("double", cpu=lambda x: np.multiply(x, 2, out=x))
a = np.arange(4.0); h = rt.register(a)
rt.submit(double, (h, "RW")); rt.wait()
before = time.process_time(); time.sleep(0.4); idle_cpu = time.process_time() - before
rt.submit(double, (h, "RW")).result()            # runs after a pause; no wait() this time
before = time.process_time(); time.sleep(0.4); idle_cpu_no_wait = time.process_time() - before
# a submit from another thread while this one waits must not be left paused
def other():
    for _ in range(50):
        rt.submit(double, (h, "RW"))
t = threading.Thread(target=other); t.start()
for _ in range(50):
    rt.wait()
t.join(); rt.wait()
h.unregister()
print("IDLE_CPU", round(idle_cpu, 3))
print("IDLE_CPU_NO_WAIT", round(idle_cpu_no_wait, 3))
print("VALUE", a[1])
"""


@pytest.mark.parametrize("pause", ["1", "0"])
def test_idle_workers_are_paused_between_waits(run_py, describe_proc, pause):
    """With LOTUS_IDLE_PAUSE on, idle StarPU workers stop burning CPU once their last task is
    done, whether or not anything called wait(); tasks submitted afterwards (also from another
    thread during a wait) still run."""
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    proc = run_py(IDLE_CPU_CODE, {"LOTUS_IDLE_PAUSE": pause, "STARPU_NCPU": "2"}, timeout=60)
    assert proc.returncode == 0, describe_proc(proc)
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert float(lines["VALUE"]) == 2.0 ** 52, describe_proc(proc)
    for label in ("IDLE_CPU", "IDLE_CPU_NO_WAIT"):
        idle_cpu = float(lines[label])
        if pause == "1":
            assert idle_cpu < 0.1, f"{label}: paused workers used {idle_cpu} s of CPU in 0.4 s"
        else:  # two polling workers: close to 0.8 s of CPU time in 0.4 s, even on a busy machine
            assert idle_cpu > 0.2, f"{label}: polling workers used only {idle_cpu} s of CPU in 0.4 s"


def test_tasks_held_after_a_pause_run_when_anything_waits_on_them(starpu_rt):
    """After a complete wait the workers are paused and new tasks are held until something needs
    them: polling a Future, acquire and unregister must each get them run (never a hang)."""
    import time

    a = np.ones(3)
    h = starpu_rt.register(a)
    double = starpu_rt.codelet("double", cpu=lambda x: np.multiply(x, 2, out=x))
    starpu_rt.submit(double, (h, "RW"))
    starpu_rt.wait()                                   # pauses the workers
    future = starpu_rt.submit(double, (h, "RW"))       # held
    deadline = time.monotonic() + 20
    while not future.done():
        assert time.monotonic() < deadline, "a held task never ran while its Future was polled"
        time.sleep(0.001)
    starpu_rt.wait()
    starpu_rt.submit(double, (h, "RW"))
    with h.acquire("R") as view:
        assert view[0] == 8.0
    starpu_rt.wait()
    starpu_rt.submit(double, (h, "RW"))
    assert h.unregister()[0] == 16.0


# ---------------------------------------------------------------------- heap

HEAP_CODE = r"""
import resource
import numpy as np
import lotus_rt
from lotus_rt.runtime import heap
rt = lotus_rt.runtime()
faults = []
for _ in range(3):   # what one training step does with its large arrays: allocate, fill, free
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.empty(24 * 2**20 // 8); a.fill(1.5); del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("FAULTS", *faults)
print("REPORT", heap.report(rt.settings.outside))
"""


def test_heap_keep_reuses_freed_memory_without_page_faults(run_py, describe_proc):
    """LOTUS_HEAP=keep (the default): a 24 MB array freed and allocated again reuses the heap's
    pages; only the first allocation faults pages in."""
    proc = run_py(HEAP_CODE, {"LOTUS_ENGINE": "inline"}, timeout=60)
    assert proc.returncode == 0, describe_proc(proc)
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    first, *later = (int(v) for v in lines["FAULTS"].split())
    assert first > 0 and max(later) <= first // 4, describe_proc(proc)
    assert "glibc keeps freed memory" in lines["REPORT"], describe_proc(proc)


def test_heap_setting_leaves_a_users_allocator_choice_alone(run_py, describe_proc):
    proc = run_py(HEAP_CODE, {"LOTUS_ENGINE": "inline", "MALLOC_TRIM_THRESHOLD_": "1000000"}, timeout=60)
    assert proc.returncode == 0, describe_proc(proc)
    assert "REPORT the user's: MALLOC_TRIM_THRESHOLD_=1000000" in proc.stdout, describe_proc(proc)
    proc = run_py(HEAP_CODE, {"LOTUS_ENGINE": "inline", "LOTUS_HEAP": "system"}, timeout=60)
    assert proc.returncode == 0, describe_proc(proc)
    assert "REPORT glibc's defaults" in proc.stdout, describe_proc(proc)


def test_threads_mixing_submits_futures_and_waits_never_hang_or_lose_a_task(starpu_rt):
    """The idle pause holds tasks submitted while the workers are paused: whatever mix of submits,
    future waits and wait() calls four threads make, every task runs exactly once and nothing
    waits forever (a held task with nobody left to start it would hang a join)."""
    import random
    import threading

    inc = starpu_rt.codelet("inc", cpu=lambda x: np.add(x, 1, out=x))
    arrays = [np.zeros(4) for _ in range(4)]
    handles = [starpu_rt.register(a) for a in arrays]
    counts = [0] * 4
    lock = threading.Lock()
    errors = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(800):
                j = rng.randrange(4)
                future = starpu_rt.submit(inc, (handles[j], "RW"))
                with lock:
                    counts[j] += 1
                r = rng.random()
                if r < 0.3:
                    future.result(timeout=30)
                elif r < 0.4:
                    starpu_rt.wait()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck: a held task was never started"
    assert not errors, errors
    starpu_rt.wait()
    for h in handles:
        h.unregister()
    assert [a[0] for a in arrays] == counts
