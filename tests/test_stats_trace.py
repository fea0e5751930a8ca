"""Observation: per-worker stats and per-task trace records agree with what was submitted."""
from __future__ import annotations

import collections
import textwrap

import numpy as np
import pytest

import lotus_rt
from conftest import starpu_skip_reason


def affine(x, a, b):
    np.multiply(x, a, out=x)
    np.add(x, b, out=x)


def matmul_into(c, a, b):
    np.matmul(a, b, out=c)


def test_stats_count_tasks_since_reset(rt, rng):
    h0 = rt.register(np.ones(3))
    rt.submit(rt.codelet("before_reset", cpu=affine), (h0, "RW"), a=1.0, b=1.0)
    rt.wait()
    first = rt.stats(reset=True)
    assert sum(s.tasks for s in first) >= 1
    after_reset = rt.stats()
    assert sum(s.tasks for s in after_reset) == 0
    assert all(s.busy_s == 0 for s in after_reset)

    xs = [rng.random(8) + 0.5 for _ in range(5)]
    hs = [rt.register(x) for x in xs]
    aff = rt.codelet("affine", cpu=affine)
    n = 0
    for i in range(37):
        rt.submit(aff, (hs[i % 5], "RW"), a=1.01, b=0.1)
        n += 1
    rt.wait()
    stats = rt.stats()
    assert [(s.worker, s.kind) for s in stats] == [(name, kind) for kind, name in rt.workers]
    assert sum(s.tasks for s in stats) == n
    assert all(s.tasks >= 0 and s.busy_s >= 0 for s in stats)
    assert sum(s.busy_s for s in stats) > 0
    # stats() without reset does not change the counts; reset returns them, then zeroes them
    assert sum(s.tasks for s in rt.stats()) == n
    assert sum(s.tasks for s in rt.stats(reset=True)) == n
    assert sum(s.tasks for s in rt.stats()) == 0
    for h in hs + [h0]:
        h.unregister()


def test_module_level_stats_and_trace_use_the_process_wide_runtime(starpu_rt):
    rt = starpu_rt
    assert lotus_rt.runtime() is rt
    h = rt.register(np.ones(4))
    lotus_rt.stats(reset=True)
    lotus_rt.trace(clear=True)
    for i in range(7):
        rt.submit(rt.codelet("module_level", cpu=affine), (h, "RW"), a=2.0, b=0.0, name=f"m{i}")
    rt.wait()
    h.unregister()
    assert sum(s.tasks for s in lotus_rt.stats()) == 7
    assert [r.name for r in sorted(lotus_rt.trace(), key=lambda r: r.task_id)] == [f"m{i}" for i in range(7)]


def test_several_workers_run_a_tiled_workload(starpu_rt, rng):
    rt = starpu_rt
    ncpu = sum(kind == "cpu" for kind, _ in rt.workers)
    if ncpu < 2:
        pytest.skip(f"this StarPU has {ncpu} CPU worker(s); the test needs 2")
    n, ntiles = 300, 64   # a 300x300 float64 matmul: a few ms, without the GIL
    a_tiles = [rng.random((n, n)) for _ in range(8)]
    c_tiles = [rng.random((n, n)) + 0.5 for _ in range(ntiles)]
    ha = [rt.register(a) for a in a_tiles]
    hc = [rt.register(c) for c in c_tiles]
    mm = rt.codelet("tile_matmul", cpu=matmul_into)
    rt.wait()
    rt.stats(reset=True)
    rt.trace(clear=True)
    for i in range(ntiles):
        rt.submit(mm, (hc[i], "W"), (ha[i % 8], "R"), (ha[(i + 3) % 8], "R"), name=f"tile{i}")
    rt.wait()
    for h in ha + hc:
        h.unregister()
    stats = rt.stats()
    assert sum(s.tasks for s in stats) == ntiles
    busy_workers = [s.worker for s in stats if s.tasks > 0]
    assert len(busy_workers) >= 2, stats
    records = rt.trace()
    assert len({r.worker for r in records}) >= 2
    for i in (0, 17, ntiles - 1):   # and the work is right
        np.testing.assert_allclose(c_tiles[i], a_tiles[i % 8] @ a_tiles[(i + 3) % 8], rtol=1e-10)


def test_trace_has_one_record_per_task(rt, rng):
    hs = [rt.register(rng.random(6) + 0.5) for _ in range(4)]
    aff = rt.codelet("traced", cpu=affine)
    rt.wait()
    rt.trace(clear=True)
    names = []
    for i in range(50):
        name = None if i % 5 == 0 else f"task-{i}"
        rt.submit(aff, (hs[i % 4], "RW"), a=1.1, b=-0.1, name=name)
        names.append("traced" if name is None else name)
    rt.wait()
    records = rt.trace()
    assert len(records) == 50
    assert collections.Counter(r.name for r in records) == collections.Counter(names)
    assert len({r.task_id for r in records}) == 50
    worker_names = {name for _, name in rt.workers}
    kinds = dict((name, kind) for kind, name in rt.workers)
    for r in records:
        assert isinstance(r, lotus_rt.TaskRecord)
        assert r.worker in worker_names and r.kind == kinds[r.worker]
        assert 0 <= r.start_s <= r.end_s
    # a task's id follows submission order: names sorted by id are the submitted names
    assert [r.name for r in sorted(records, key=lambda r: r.task_id)] == names
    # tasks on one handle in RW run one after the other, in submission order
    by_id = sorted(records, key=lambda r: r.task_id)
    for k in range(4):
        chain = by_id[k::4]
        for prev, nxt in zip(chain, chain[1:]):
            assert prev.end_s <= nxt.start_s, (prev, nxt)
    # clear
    assert len(rt.trace(clear=True)) == 50
    assert rt.trace() == []
    for h in hs:
        h.unregister()


def test_failed_tasks_are_counted_and_traced(rt):
    h = rt.register(np.ones(2))
    rt.wait()
    rt.stats(reset=True)
    rt.trace(clear=True)
    fut = rt.submit(rt.codelet("failing", cpu=lambda x: 1 / 0), (h, "RW"), name="will_fail")
    assert isinstance(fut.exception(), lotus_rt.CodeletError)
    rt.wait()
    h.unregister()
    assert sum(s.tasks for s in rt.stats()) == 1
    assert [r.name for r in rt.trace()] == ["will_fail"]


TRACE_SCRIPT = textwrap.dedent("""
    import numpy as np, lotus_rt
    rt = lotus_rt.runtime()
    h = rt.register(np.random.default_rng(3).random(4) + 0.5)
    cl = rt.codelet("traced", cpu=lambda x: np.multiply(x, 1.5, out=x))
    for i in range(20):
        rt.submit(cl, (h, "RW"), name=f"t{i}")
    rt.wait()
    print("ENGINE", rt.engine)
    print("TASKS", sum(s.tasks for s in lotus_rt.stats()))
    print("TRACE", " ".join(r.name for r in sorted(lotus_rt.trace(), key=lambda r: r.task_id)))
""")


def _trace_run(run_py, engine, env):
    if engine == "starpu" and starpu_skip_reason():
        pytest.skip(starpu_skip_reason())
    proc = run_py(TRACE_SCRIPT, env={"LOTUS_ENGINE": engine, **env}, timeout=60)
    lines = dict((line.split(None, 1) + [""])[:2] for line in proc.stdout.splitlines() if line)
    return proc, lines


@pytest.mark.parametrize("engine", ["starpu", "inline"])
@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_trace_disabled(run_py, describe_proc, engine, value):
    proc, lines = _trace_run(run_py, engine, {"LOTUS_TRACE": value})
    assert proc.returncode == 0, describe_proc(proc)
    assert lines["ENGINE"] == engine
    assert lines["TASKS"] == "20"            # stats still count
    assert lines["TRACE"] == "", describe_proc(proc)


@pytest.mark.parametrize("engine", ["starpu", "inline"])
def test_trace_capacity_keeps_the_latest_records(run_py, describe_proc, engine):
    proc, lines = _trace_run(run_py, engine, {"LOTUS_TRACE_CAPACITY": "8", "LOTUS_TRACE": "1"})
    assert proc.returncode == 0, describe_proc(proc)
    assert lines["ENGINE"] == engine
    assert lines["TASKS"] == "20"
    names = lines["TRACE"].split()
    # 8 distinct records of submitted tasks. (Which 8: the records are appended as StarPU runs
    # completion callbacks, which may lag behind dependent tasks, so not exactly t12..t19.)
    assert len(names) == 8 and len(set(names)) == 8, describe_proc(proc)
    assert set(names) <= {f"t{i}" for i in range(20)}
    assert len(set(names) & {f"t{i}" for i in range(12, 20)}) >= 4, names
