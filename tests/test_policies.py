"""Every StarPU scheduling policy computes the right DAG; bad configuration is one clear error.

Each policy runs in its own subprocess (StarPU reads STARPU_SCHED at init); the subprocesses
run two at a time. The parent writes the task program as JSON, the child runs it on StarPU and
saves the arrays, and the parent compares them with its own NumPy evaluation of the program.
"""
from __future__ import annotations

import concurrent.futures
import json
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
