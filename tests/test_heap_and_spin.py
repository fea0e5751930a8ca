"""Process tuning lotus_rt applies beside StarPU: heap thresholds (LOTUS_HEAP) and the OpenMP spin.
"""
from __future__ import annotations

import os

from lotus_rt.runtime import omp


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


# ---------------------------------------------------------------------- OpenMP spin

def test_shorten_spin_sets_gomp_spincount_unless_chosen_or_too_late(monkeypatch):
    monkeypatch.setattr(omp, "libgomp_loaded", lambda: False)
    env = {"PATH": "/bin"}
    assert omp.shorten_spin(env) == "set" and env["GOMP_SPINCOUNT"] == omp.SPINCOUNT
    for chosen in ({"GOMP_SPINCOUNT": "7"}, {"OMP_WAIT_POLICY": "PASSIVE"}):
        env = dict(chosen)
        assert omp.shorten_spin(env) == "user" and env == chosen  # the user's choice is kept
        assert "=".join(next(iter(chosen.items()))) in omp.report(env)
    assert "unset" in omp.report({})
    monkeypatch.setattr(omp, "libgomp_loaded", lambda: True)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert omp.shorten_spin(os.environ) == "late" and "GOMP_SPINCOUNT" not in os.environ
    env = {}
    assert omp.shorten_spin(env, this_process=False) == "set" and env["GOMP_SPINCOUNT"] == omp.SPINCOUNT
