"""Step plans: tasks recorded once (``runtime.record()``) and submitted again by one call per run.

A plan's runs must equal the same tasks submitted one by one (submission order decides the
implicit dependencies), a failing body must surface from ``wait()`` without spoiling the next run,
and the data a plan uses must outlive it.
"""
from __future__ import annotations

import numpy as np
import pytest

import lotus_rt


def _chain_plan(rt, arrays, rng):
    """A small DAG over three arrays: scale, add into, read back; returns the plan and handles."""
    handles = [rt.register(a) for a in arrays]
    scale = rt.codelet("scale", cpu=lambda x, factor: np.multiply(x, factor, out=x))
    axpy = rt.codelet("axpy", cpu=lambda x, y: np.add(y, x, out=y))
    with rt.record() as plan:
        rt.submit(scale, (handles[0], "RW"), factor=2.0)
        rt.submit(axpy, (handles[0], "R"), (handles[1], "RW"))
        rt.submit(axpy, (handles[1], "R"), (handles[2], "RW"))
        rt.submit(scale, (handles[1], "RW"), factor=0.5)
    return plan, handles


def _reference_runs(arrays, runs):
    x, y, z = (a.copy() for a in arrays)
    for _ in range(runs):
        x *= 2.0
        y += x
        z += y
        y *= 0.5
    return x, y, z


def test_a_plan_runs_its_tasks_again_in_the_recorded_order(rt, rng):
    arrays = [rng.standard_normal(50) for _ in range(3)]
    expected = _reference_runs(arrays, 4)
    plan, handles = _chain_plan(rt, arrays, rng)
    assert len(plan) == 4 and plan.runs == 0
    np.testing.assert_array_equal(arrays[0], arrays[0])  # nothing ran while recording
    for _ in range(4):
        plan.run()
        rt.wait()
    plan.release()
    for handle, want in zip(handles, expected):
        np.testing.assert_allclose(handle.unregister(), want, rtol=1e-14)


def test_recording_runs_nothing_and_refuses_to_wait(rt, rng):
    a = np.zeros(4)
    h = rt.register(a)
    add = rt.codelet("add_one", cpu=lambda x: np.add(x, 1, out=x))
    rt.stats(reset=True)
    with rt.record() as plan:
        rt.submit(add, (h, "RW"))
        for blocking in (rt.wait, h.unregister):
            with pytest.raises(RuntimeError, match="inside runtime.record"):
                blocking()
        with pytest.raises(RuntimeError, match="already recording"):
            with rt.record():
                pass
    assert sum(s.tasks for s in rt.stats()) == 0 and not a.any()
    plan.run()
    plan.run()  # waits for the first run itself: a task is resubmitted only once it terminated
    rt.wait()
    plan.release()
    np.testing.assert_array_equal(h.unregister(), np.full(4, 2.0))


def test_a_failing_task_surfaces_and_the_next_run_works(rt, rng):
    a = np.zeros(8)
    h = rt.register(a)
    state = {"fail": True}

    def body(x):
        if state["fail"]:
            raise ArithmeticError("injected")
        x += 1

    flaky = rt.codelet("flaky", cpu=body)
    with rt.record() as plan:
        futures = [rt.submit(flaky, (h, "RW")) for _ in range(3)]
    plan.run()
    with pytest.raises(lotus_rt.CodeletError, match="flaky") as info:
        rt.wait()
    assert isinstance(info.value.__cause__, ArithmeticError)
    state["fail"] = False
    plan.run()
    rt.wait()  # the failures of the first run were reported once, not again
    assert all(f.done() and f.exception() is None for f in futures)
    plan.release()
    np.testing.assert_array_equal(h.unregister(), np.full(8, 3.0))


def test_temporaries_released_while_recording_live_as_long_as_the_plan(rt, rng):
    x = rng.standard_normal(16)
    out = np.zeros(16)
    hx, hout = rt.register(x), rt.register(out)
    copy = rt.codelet("copy", cpu=lambda a, b: np.copyto(b, a))
    double = rt.codelet("double_into", cpu=lambda a, b: np.multiply(a, 2, out=b))
    with rt.record() as plan:
        tmp = rt.temporary((16,), np.float64)
        rt.submit(copy, (hx, "R"), (tmp, "W"))
        rt.submit(double, (tmp, "R"), (hout, "W"))
        tmp.unregister_submit()  # what a pass does with its intermediates
    for _ in range(3):  # the temporary is still there at every run
        plan.run()
        rt.wait()
    plan.release()
    np.testing.assert_allclose(hout.unregister(), 2 * x)
    hx.unregister()


def test_a_plan_refuses_to_run_on_unregistered_data_and_after_release(rt, rng):
    a = np.zeros(4)
    h = rt.register(a)
    add = rt.codelet("add_one", cpu=lambda x: np.add(x, 1, out=x))
    with rt.record() as plan:
        rt.submit(add, (h, "RW"))
    plan.run()
    rt.wait()
    h.unregister()
    with pytest.raises(RuntimeError, match="unregistered"):
        plan.run()
    plan.release()
    with pytest.raises(RuntimeError, match="released"):
        plan.run()


def test_shutdown_releases_live_plans(run_py, describe_proc):
    code = ("import numpy as np, lotus_rt\n"
            "rt = lotus_rt.runtime(); a = np.zeros(2); h = rt.register(a)\n"
            "c = rt.codelet('inc', cpu=lambda x: np.add(x, 1, out=x))\n"
            "with rt.record() as plan:\n    rt.submit(c, (h, 'RW'))\n"
            "plan.run(); plan.run(); lotus_rt.shutdown(); print('OK', a[0], plan.released)\n")
    proc = run_py(code)
    assert proc.returncode == 0 and "OK 2.0 True" in proc.stdout, describe_proc(proc)
