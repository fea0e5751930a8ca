"""Soak: 20 000 small tasks with handles registered and dropped along the way leak nothing.

Checked after the run: live handles back to the baseline, no task left in the StarPU engine's
``_pending`` map, no orphaned handle left unregistered, resident memory grown by less than a
bound after a warm-up, and the numbers right.
"""
from __future__ import annotations

import gc
import os

import numpy as np

RSS_GROWTH_LIMIT = 50 * 2**20
WARMUP_TASKS, SOAK_TASKS = 2_000, 20_000


def rss_bytes() -> int:
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


def add_scalar(x, b):
    np.add(x, b, out=x)


def add_into(d, s):
    np.add(d, s, out=d)


def churn(rt, rng, acc_handle, ntasks, codelets):
    """ntasks tasks; every 10th registers a fresh array used by two tasks, which is then either
    unregistered (and checked) or simply dropped while registered. Returns acc's expected delta."""
    inc, mix = codelets
    delta = np.zeros(acc_handle.shape)
    i = 0
    while i < ntasks:
        if i % 10 == 0:
            tmp0 = rng.random(acc_handle.shape) + 0.5
            tmp = tmp0.copy()
            h = rt.register(tmp)
            rt.submit(inc, (h, "RW"), b=1.0)
            rt.submit(mix, (acc_handle, "RW"), (h, "R"))
            delta += tmp0 + 1.0
            if i % 20 == 0:
                assert h.unregister() is tmp
                np.testing.assert_array_equal(tmp, tmp0 + 1.0)
            del h   # the other half are dropped while registered (orphaned)
            i += 2
        else:
            rt.submit(inc, (acc_handle, "RW"), b=0.25)
            delta += 0.25
            i += 1
    return delta


def test_soak_no_leaks(rt, rng):
    gc.collect()
    rt.wait()
    live_before = len(rt._live)
    starpu = rt.engine == "starpu"
    pending_before = set(rt._engine._pending) if starpu else set()

    acc0 = rng.random(16) + 0.5
    acc = acc0.copy()
    hacc = rt.register(acc)
    codelets = (rt.codelet("soak_inc", cpu=add_scalar), rt.codelet("soak_mix", cpu=add_into))

    expected = acc0 + churn(rt, rng, hacc, WARMUP_TASKS, codelets)
    gc.collect()
    rt.wait()
    gc.collect()
    rss_after_warmup = rss_bytes()

    expected = expected + churn(rt, rng, hacc, SOAK_TASKS, codelets)
    gc.collect()     # drop every handle reference before the final wait
    rt.wait()        # drains the handles orphaned while registered
    gc.collect()
    growth = rss_bytes() - rss_after_warmup

    assert len(rt._live) == live_before + 1      # acc only
    if starpu:
        assert set(rt._engine._pending) <= pending_before, "tasks of the soak left in _pending"
        assert rt._engine._orphans == [], "orphaned handles not unregistered by wait()"
    with hacc.acquire("R") as current:
        np.testing.assert_allclose(current, expected, rtol=1e-9)
    assert hacc.unregister() is acc
    assert len(rt._live) == live_before
    np.testing.assert_allclose(acc, expected, rtol=1e-9)
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB over {SOAK_TASKS} tasks"
