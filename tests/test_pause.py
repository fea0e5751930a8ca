"""Pausing StarPU's workers: the idle pause (the last task's completion pauses them; held tasks
start when anything waits) and the user's ``runtime.paused()``.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import starpu_skip_reason

SKIP_REASON = starpu_skip_reason()


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


# ---------------------------------------------------------------------- the user's pause

def test_paused_holds_tasks_until_the_block_ends(rt):
    """Inside ``paused()`` StarPU's workers run nothing (tasks stay queued) and what would wait for
    them is refused instead of hanging; after the block the held tasks run. Pauses nest. The
    inline engine runs each task at submit: there the block changes nothing."""
    a = np.zeros(4)
    h = rt.register(a)
    add = rt.codelet("add_one", cpu=lambda x: np.add(x, 1, out=x))
    with rt.paused():
        with rt.paused():
            futures = [rt.submit(add, (h, "RW")) for _ in range(3)]
        if rt.engine == "starpu":
            time.sleep(0.05)
            assert not any(f.done() for f in futures)
            for blocking in (rt.wait, h.unregister, futures[-1].result):
                with pytest.raises(RuntimeError, match="inside runtime.paused"):
                    blocking()
            with pytest.raises(TimeoutError):
                futures[0].result(timeout=0.01)
        else:
            assert all(f.done() for f in futures)
    rt.wait()
    assert all(f.done() for f in futures)
    np.testing.assert_array_equal(h.unregister(), np.full(4, 3.0))
