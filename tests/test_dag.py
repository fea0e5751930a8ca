"""Task graphs: orderings between tasks, data coming home, futures, views, concurrency.

Every ordering test uses non-commutative operations (x = x*a + b, logs that record the order
tasks ran in) and puts a slow task first, so that a schedule violating the dependency gives a
different, checkable result. The same tests run on both engines (fixture ``rt``).
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import lotus_rt
from lotus_rt.runtime.settings import Settings

# ---------------------------------------------------------------------- bodies


def affine(x, a, b, delay=0.0):
    """x = x*a + b, after an optional sleep (widens the window for a wrong ordering)."""
    if delay:
        time.sleep(delay)
    np.multiply(x, a, out=x)
    np.add(x, b, out=x)


def scaled_copy(dst, src, s, delay=0.0):
    """dst = src*s (dst is usually accessed in W mode)."""
    if delay:
        time.sleep(delay)
    np.multiply(src, s, out=dst)


def fill(x, value, delay=0.0):
    if delay:
        time.sleep(delay)
    x[...] = value


def log_append(log, value, delay=0.0):
    """log[0] counts entries; log[1 + count] = value. Records the order tasks ran in."""
    if delay:
        time.sleep(delay)
    n = int(log[0])
    log[1 + n] = value
    log[0] = n + 1


def squash_affine(x, a, b):
    """x = tanh(x*a + b): bounded, order-sensitive."""
    np.multiply(x, a, out=x)
    np.add(x, b, out=x)
    np.tanh(x, out=x)


def squash_mix(d, s, a):
    """d = tanh(d*a + s)."""
    np.multiply(d, a, out=d)
    np.add(d, s, out=d)
    np.tanh(d, out=d)


def squash_combine(d, s1, s2, a):
    """d = tanh(d*a + s1*s2 - s2)."""
    t = np.multiply(s1, s2)
    np.subtract(t, s2, out=t)
    np.multiply(d, a, out=d)
    np.add(d, t, out=d)
    np.tanh(d, out=d)


def squash_overwrite(d, s, a):
    """d = cos(s*a) (d in W mode: its old value is never read)."""
    np.multiply(s, a, out=d)
    np.cos(d, out=d)


# ---------------------------------------------------------------------- RAW / WAR / WAW


def test_read_after_write(rt, rng):
    x0 = rng.random(64) + 0.5
    x, y = x0.copy(), rng.random(64) + 0.5
    hx, hy = rt.register(x), rt.register(y)
    aff = rt.codelet("affine", cpu=affine)
    cp = rt.codelet("scaled_copy", cpu=scaled_copy)
    rt.submit(aff, (hx, "RW"), a=2.0, b=1.0, delay=0.1)   # writes x, slowly
    rt.submit(cp, (hy, "W"), (hx, "R"), s=3.0)             # must read the new x
    rt.wait()
    assert hx.unregister() is x and hy.unregister() is y
    np.testing.assert_allclose(x, x0 * 2.0 + 1.0, rtol=1e-15)
    np.testing.assert_allclose(y, (x0 * 2.0 + 1.0) * 3.0, rtol=1e-15)


def test_write_after_read(rt, rng):
    x0 = rng.random(64) + 0.5
    x, y = x0.copy(), rng.random(64) + 0.5
    hx, hy = rt.register(x), rt.register(y)
    cp = rt.codelet("scaled_copy", cpu=scaled_copy)
    aff = rt.codelet("affine", cpu=affine)
    rt.submit(cp, (hy, "W"), (hx, "R"), s=3.0, delay=0.1)  # reads the old x, slowly
    rt.submit(aff, (hx, "RW"), a=-1.0, b=5.0)              # must not overwrite x before
    rt.wait()
    hx.unregister(), hy.unregister()
    np.testing.assert_allclose(y, x0 * 3.0, rtol=1e-15)
    np.testing.assert_allclose(x, -x0 + 5.0, rtol=1e-15)


def test_write_after_write_rw(rt, rng):
    x0 = rng.random(64) + 0.5
    x = x0.copy()
    hx = rt.register(x)
    aff = rt.codelet("affine", cpu=affine)
    rt.submit(aff, (hx, "RW"), a=2.0, b=1.0, delay=0.1)
    rt.submit(aff, (hx, "RW"), a=3.0, b=-1.0)
    rt.wait()
    hx.unregister()
    np.testing.assert_allclose(x, (x0 * 2.0 + 1.0) * 3.0 - 1.0, rtol=1e-15)


def test_write_after_write_w_only(rt, rng):
    x = rng.random(32) + 0.5
    hx = rt.register(x)
    fl = rt.codelet("fill", cpu=fill)
    rt.submit(fl, (hx, "W"), value=7.0, delay=0.1)
    rt.submit(fl, (hx, "W"), value=11.0)
    rt.wait()
    hx.unregister()
    assert np.all(x == 11.0)


def test_rw_chain_runs_in_submission_order(rt, rng):
    n = 60
    log = np.full(n + 1, -1, dtype=np.int64)
    log[0] = 0
    h = rt.register(log)
    app = rt.codelet("log_append", cpu=log_append)
    values = rng.permutation(1000)[:n]
    for i, v in enumerate(values):
        rt.submit(app, (h, "RW"), value=int(v), delay=0.02 if i % 20 == 0 else 0.0)
    rt.wait()
    h.unregister()
    assert log[0] == n
    np.testing.assert_array_equal(log[1:], values)


# ---------------------------------------------------------------------- shapes of graphs


def test_diamond(rt, rng):
    x0, w0 = rng.random(50) + 0.5, rng.random(50) + 0.5
    x, y, z, w = x0.copy(), rng.random(50) + 0.5, rng.random(50) + 0.5, w0.copy()
    hx, hy, hz, hw = (rt.register(a) for a in (x, y, z, w))

    def join(w, y, z):
        np.multiply(w, 0.5, out=w)
        w += y * z

    a = rt.codelet("A", cpu=affine)
    b = rt.codelet("B", cpu=scaled_copy)
    c = rt.codelet("C", cpu=lambda z, x: np.subtract(x, 4.0, out=z))
    d = rt.codelet("D", cpu=join)
    rt.submit(a, (hx, "RW"), a=2.0, b=1.0, delay=0.05)
    rt.submit(b, (hy, "W"), (hx, "R"), s=3.0, delay=0.05)
    rt.submit(c, (hz, "W"), (hx, "R"))
    rt.submit(d, (hw, "RW"), (hy, "R"), (hz, "R"))
    rt.wait()
    for h in (hx, hy, hz, hw):
        h.unregister()
    xa = x0 * 2.0 + 1.0
    np.testing.assert_allclose(x, xa, rtol=1e-15)
    np.testing.assert_allclose(y, xa * 3.0, rtol=1e-15)
    np.testing.assert_allclose(z, xa - 4.0, rtol=1e-15)
    np.testing.assert_allclose(w, w0 * 0.5 + (xa * 3.0) * (xa - 4.0), rtol=1e-13)


def test_fan_out_fan_in(rt, rng):
    nout = 20
    x0 = rng.random(40) + 0.5
    x = x0.copy()
    outs = [rng.random(40) + 0.5 for _ in range(nout)]
    acc0 = rng.random(40) + 0.5
    acc = acc0.copy()
    hx, hacc = rt.register(x), rt.register(acc)
    houts = [rt.register(o) for o in outs]

    def spread(out, src, i):
        np.multiply(src, i + 1.0, out=out)
        out += i

    def gather(acc, part):
        np.multiply(acc, 0.5, out=acc)
        acc += part

    def gather_many(acc, *parts):
        acc -= sum(p * (k + 1) for k, p in enumerate(parts))

    rt.submit(rt.codelet("source", cpu=affine), (hx, "RW"), a=-2.0, b=3.0, delay=0.05)
    sp = rt.codelet("spread", cpu=spread)
    for i, h in enumerate(houts):
        rt.submit(sp, (h, "W"), (hx, "R"), i=i)
    ga = rt.codelet("gather", cpu=gather)
    for h in houts:
        rt.submit(ga, (hacc, "RW"), (h, "R"))
    # one task with the most arrays a task can take on every engine (StarPU's default is 8)
    rt.submit(rt.codelet("gather_many", cpu=gather_many), (hacc, "RW"), *[(h, "R") for h in houts[:7]])
    rt.wait()
    hx.unregister(), hacc.unregister()
    for h in houts:
        h.unregister()

    xs = x0 * -2.0 + 3.0
    ref_outs = [xs * (i + 1.0) + i for i in range(nout)]
    ref = acc0.copy()
    for o in ref_outs:
        ref = ref * 0.5 + o
    ref = ref - sum(p * (k + 1) for k, p in enumerate(ref_outs[:7]))
    for o, r in zip(outs, ref_outs):
        np.testing.assert_allclose(o, r, rtol=1e-15)
    np.testing.assert_allclose(acc, ref, rtol=1e-12)


# ---------------------------------------------------------------------- random DAG, both engines

OPS = ("affine", "mix", "combine", "overwrite")


def random_program(seed: int, nhandles: int = 10, ntasks: int = 200):
    rng = np.random.default_rng(seed)
    program = []
    for _ in range(ntasks):
        op = OPS[rng.integers(len(OPS))]
        d = int(rng.integers(nhandles))
        others = [int(i) for i in rng.permutation([i for i in range(nhandles) if i != d])]
        a = float(rng.uniform(0.5, 1.5))
        prio = int(rng.integers(-3, 4))
        if op == "affine":
            program.append((op, d, (), dict(a=a, b=float(rng.uniform(-0.5, 0.5))), prio))
        elif op == "combine":
            # sometimes the same handle twice in R mode (allowed)
            s2 = others[0] if rng.random() < 0.15 else others[1]
            program.append((op, d, (others[0], s2), dict(a=a), prio))
        else:
            program.append((op, d, (others[0],), dict(a=a), prio))
    inits = [rng.standard_normal(24) for _ in range(nhandles)]
    return inits, program


def numpy_reference(inits, program):
    arrays = [a.copy() for a in inits]
    for op, d, srcs, kw, _ in program:
        x = arrays[d]
        if op == "affine":
            arrays[d] = np.tanh(x * kw["a"] + kw["b"])
        elif op == "mix":
            arrays[d] = np.tanh(x * kw["a"] + arrays[srcs[0]])
        elif op == "combine":
            s1, s2 = arrays[srcs[0]], arrays[srcs[1]]
            arrays[d] = np.tanh(x * kw["a"] + (s1 * s2 - s2))
        else:
            arrays[d] = np.cos(arrays[srcs[0]] * kw["a"])
    return arrays


def run_program(runtime, inits, program):
    arrays = [a.copy() for a in inits]
    handles = [runtime.register(a) for a in arrays]
    codelets = {"affine": runtime.codelet("sq_affine", cpu=squash_affine),
                "mix": runtime.codelet("sq_mix", cpu=squash_mix),
                "combine": runtime.codelet("sq_combine", cpu=squash_combine),
                "overwrite": runtime.codelet("sq_overwrite", cpu=squash_overwrite)}
    futures = []
    for op, d, srcs, kw, prio in program:
        mode = "W" if op == "overwrite" else "RW"
        futures.append(runtime.submit(codelets[op], (handles[d], mode),
                                      *[(handles[s], "R") for s in srcs], priority=prio, **kw))
    runtime.wait()
    for h, a in zip(handles, arrays):
        assert h.unregister() is a
    assert all(f.done() and f.exception() is None for f in futures)
    return arrays


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_dag_starpu_equals_inline(starpu_rt, inline_rt, seed):
    inits, program = random_program(seed)
    # the program really is order-sensitive: running it reversed changes the result
    reversed_result = numpy_reference(inits, program[::-1])
    reference = numpy_reference(inits, program)
    assert any(not np.allclose(r, q) for r, q in zip(reference, reversed_result))

    on_starpu = run_program(starpu_rt, inits, program)
    on_inline = run_program(inline_rt, inits, program)
    for i, (s, n, r) in enumerate(zip(on_starpu, on_inline, reference)):
        np.testing.assert_array_equal(s, n, err_msg=f"handle {i}: starpu and inline differ")
        np.testing.assert_allclose(n, r, rtol=1e-12, atol=1e-14, err_msg=f"handle {i} vs numpy")


# ---------------------------------------------------------------------- arguments and views


def test_kwargs_reach_the_body(rt, rng):
    x0 = rng.random(16) + 0.5
    x = x0.copy()
    h = rt.register(x)
    seen = []

    def body(x, *, scale, offset, tag, coeffs, table, flag=None):
        seen.append((tag, coeffs, flag, table.sum()))
        np.multiply(x, scale, out=x)
        x += offset + sum(coeffs) + table[1]

    table = np.array([10.0, 20.0, 30.0])
    fut = rt.submit(rt.codelet("kw", cpu=body), (h, "RW"), scale=2.5, offset=-1.0, tag="hello",
                    coeffs=(1.0, 2.0), table=table, flag=None)
    fut.result()
    rt.wait()
    h.unregister()
    assert seen == [("hello", (1.0, 2.0), None, 60.0)]
    np.testing.assert_allclose(x, x0 * 2.5 - 1.0 + 3.0 + 20.0, rtol=1e-15)


def test_priorities_are_accepted_and_do_not_change_results(rt, rng):
    x0 = rng.random(16) + 0.5
    x = x0.copy()
    h = rt.register(x)
    aff = rt.codelet("affine", cpu=affine)
    ref = x0.copy()
    for i, prio in enumerate([-5, 0, 5, -1, 3, np.int64(2), np.int32(-2), 1]):
        a, b = 1.0 + 0.1 * i, -0.3 * i
        rt.submit(aff, (h, "RW"), priority=prio, a=a, b=b)
        ref = ref * a + b
    rt.wait()
    h.unregister()
    np.testing.assert_allclose(x, ref, rtol=1e-14)


@pytest.mark.parametrize("bad", [1.5, True, "high", None])
def test_priority_must_be_an_int(rt, bad):
    h = rt.register(np.ones(3))
    with pytest.raises(TypeError, match="priority"):
        rt.submit(rt.codelet("noop", cpu=lambda x: None), (h, "R"), priority=bad)
    h.unregister()


def test_read_mode_views_are_read_only(rt, rng):
    x0 = rng.random(8) + 0.5
    x, y = x0.copy(), rng.random(8) + 0.5
    hx, hy = rt.register(x), rt.register(y)
    flags = []

    def inspect(out, inp):
        flags.append((out.flags.writeable, inp.flags.writeable))

    def vandal(inp):
        inp[0] = -1.0

    rt.submit(rt.codelet("inspect", cpu=inspect), (hy, "RW"), (hx, "R"))
    rt.submit(rt.codelet("inspect", cpu=inspect), (hy, "W"), (hx, "R"))
    fut = rt.submit(rt.codelet("vandal", cpu=vandal), (hx, "R"))
    with pytest.raises(lotus_rt.CodeletError, match="vandal") as info:
        rt.wait()
    assert isinstance(info.value.__cause__, ValueError)
    assert "read-only" in str(info.value.__cause__)
    assert fut.exception() is info.value
    hx.unregister(), hy.unregister()
    assert flags == [(True, False), (True, False)]
    np.testing.assert_array_equal(x, x0)


# ---------------------------------------------------------------------- concurrency


def test_threads_submit_concurrently(rt, rng):
    nthreads, ntasks = 4, 500
    inits = [rng.standard_normal(32) for _ in range(nthreads)]
    params = [(rng.uniform(0.5, 1.5, ntasks), rng.uniform(-0.5, 0.5, ntasks)) for _ in range(nthreads)]
    arrays = [a.copy() for a in inits]
    handles = [rt.register(a) for a in arrays]
    cl = rt.codelet("sq_affine", cpu=squash_affine)
    barrier = threading.Barrier(nthreads)
    futures: list[list] = [[] for _ in range(nthreads)]
    failures = []

    def worker(t):
        try:
            barrier.wait()
            a_s, b_s = params[t]
            for i in range(ntasks):
                futures[t].append(rt.submit(cl, (handles[t], "RW"), a=float(a_s[i]), b=float(b_s[i]),
                                            name=f"t{t}_{i}"))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads), "a submitting thread hung"
    assert failures == []
    rt.wait()
    for t in range(nthreads):
        handles[t].unregister()
        ref = inits[t].copy()
        for a, b in zip(*params[t]):
            ref = np.tanh(ref * a + b)
        np.testing.assert_allclose(arrays[t], ref, rtol=1e-12, atol=1e-14, err_msg=f"thread {t}")
        assert len(futures[t]) == ntasks
        assert all(f.done() and f.exception() is None for f in futures[t])


# ---------------------------------------------------------------------- futures


def test_future_after_completion(rt, rng):
    x0 = rng.random(8) + 0.5
    x = x0.copy()
    h = rt.register(x)
    fut = rt.submit(rt.codelet("affine", cpu=affine), (h, "RW"), a=3.0, b=1.0, name="my task")
    rt.wait()
    assert fut.done()
    assert fut.result() is None
    assert fut.result(timeout=0) is None
    assert fut.exception() is None
    assert fut.task_name == "my task"
    h.unregister()
    np.testing.assert_allclose(x, x0 * 3.0 + 1.0, rtol=1e-15)


def test_inline_future_is_done_at_submit(inline_rt, rng):
    h = inline_rt.register(rng.random(4) + 0.5)
    fut = inline_rt.submit(inline_rt.codelet("affine", cpu=affine), (h, "RW"), a=2.0, b=0.0)
    assert fut.done()
    assert fut.result(timeout=0.01) is None
    h.unregister()


def test_future_timeout_behind_a_slow_task(starpu_rt, rng):
    rt = starpu_rt
    x0 = rng.random(8) + 0.5
    x = x0.copy()
    h = rt.register(x)
    slow = rt.submit(rt.codelet("slow_affine", cpu=affine), (h, "RW"), a=2.0, b=1.0, delay=0.5)
    blocked = rt.submit(rt.codelet("affine", cpu=affine), (h, "RW"), a=3.0, b=-1.0)
    with pytest.raises(TimeoutError):
        blocked.result(timeout=0.01)
    assert not blocked.done()
    with pytest.raises(TimeoutError):
        blocked.exception(timeout=0.01)
    assert blocked.result() is None     # waits for real now
    assert blocked.done()
    assert slow.result() is None
    assert slow.done()
    rt.wait()
    h.unregister()
    np.testing.assert_allclose(x, (x0 * 2.0 + 1.0) * 3.0 - 1.0, rtol=1e-15)


def test_predecessor_futures_are_done_when_a_successor_is(rt):
    """Once a task's future is done, the futures of the tasks it depends on are done too.

    (Task i+1 on a RW handle starts only after task i finished, so by the time
    ``futures[-1].result()`` returns, every earlier task of the chain has finished and
    ``done()``/``result(timeout=0)`` must say so.) Repeated, since a lag is a race.
    """
    h = rt.register(np.ones(4))
    cl = rt.codelet("noop", cpu=lambda x: None)
    lagging = []
    for rep in range(200):
        futures = [rt.submit(cl, (h, "RW")) for _ in range(10)]
        futures[-1].result()
        not_done = [i for i, f in enumerate(futures) if not f.done()]
        if not_done:
            lagging.append((rep, not_done))
        rt.wait()
    h.unregister()
    assert lagging == [], (f"{len(lagging)} of 200 chains had predecessors not done() after the "
                           f"last task's result() returned; first: {lagging[:3]}")


# ---------------------------------------------------------------------- acquire


def test_acquire_read_mid_stream(rt, rng):
    x0 = rng.random(32) + 0.5
    x = x0.copy()
    h = rt.register(x)
    aff = rt.codelet("affine", cpu=affine)
    ref = x0.copy()
    for i in range(5):
        a, b = 1.0 + 0.1 * i, 0.5 - 0.2 * i
        rt.submit(aff, (h, "RW"), a=a, b=b, delay=0.05 if i == 0 else 0.0)
        ref = ref * a + b
    with h.acquire("R") as arr:
        snapshot = np.array(arr, copy=True)
    np.testing.assert_allclose(snapshot, ref, rtol=1e-15)
    for i in range(5):
        rt.submit(aff, (h, "RW"), a=0.5, b=float(i))
        ref = ref * 0.5 + i
    rt.wait()
    h.unregister()
    np.testing.assert_allclose(x, ref, rtol=1e-14)


def test_acquire_read_write_is_seen_by_later_tasks(rt, rng):
    x0 = rng.random(32) + 0.5
    x = x0.copy()
    h = rt.register(x)
    aff = rt.codelet("affine", cpu=affine)
    rt.submit(aff, (h, "RW"), a=2.0, b=0.0, delay=0.05)
    with h.acquire("RW") as arr:
        np.testing.assert_allclose(arr, x0 * 2.0, rtol=1e-15)
        arr += 100.0
    rt.submit(aff, (h, "RW"), a=0.5, b=1.0)
    rt.wait()
    h.unregister()
    np.testing.assert_allclose(x, (x0 * 2.0 + 100.0) * 0.5 + 1.0, rtol=1e-14)


def test_acquire_rejects_bad_mode_and_unregistered(rt):
    h = rt.register(np.ones(3))
    with pytest.raises(ValueError, match="mode"):
        h.acquire("W")
    h.unregister()
    with pytest.raises(RuntimeError, match="unregistered"):
        h.acquire("R")


# ---------------------------------------------------------------------- dtypes and shapes

DTYPES = [np.float32, np.float64, np.int32, np.int64, np.complex64, np.bool_]
SHAPES = [(), (7,), (3, 4, 5)]


def random_array(rng, dtype, shape):
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        a = rng.random(shape) < 0.5
        if a.ndim:
            a.flat[0], a.flat[-1] = True, False   # both values present
        return np.array(a, dtype=dtype, order="C")   # (np.ascontiguousarray would make 0-d 1-d)
    if dtype.kind in "iu":
        return np.array(rng.integers(1, 100, size=shape), dtype=dtype, order="C")
    if dtype.kind == "c":
        return np.array((rng.random(shape) + 0.5) + 1j * (rng.random(shape) - 2.0), dtype=dtype, order="C")
    return np.array(rng.random(shape) + 0.5, dtype=dtype, order="C")


def transform(x):
    if x.dtype.kind == "b":
        np.logical_not(x, out=x)
    else:
        x *= 3
        x += 1


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_dtypes_and_shapes_zero_copy(rt, rng, dtype, shape):
    arr = random_array(rng, dtype, shape)
    assert arr.shape == shape and arr.dtype == np.dtype(dtype)
    expected = arr.copy()
    transform(expected)
    expected_twice = expected.copy()
    transform(expected_twice)
    mirror = np.zeros_like(arr)
    h, hm = rt.register(arr), rt.register(mirror)
    seen = []

    def copy_and_check(dst, src):
        seen.append((src.dtype, src.shape, dst.dtype, dst.shape, src.flags.writeable))
        dst[...] = src

    rt.submit(rt.codelet("transform", cpu=transform), (h, "RW"))
    rt.submit(rt.codelet("copy", cpu=copy_and_check), (hm, "W"), (h, "R"))
    rt.submit(rt.codelet("transform", cpu=transform), (h, "RW"))
    rt.wait()
    assert h.unregister() is arr
    assert hm.unregister() is mirror
    assert arr.dtype == np.dtype(dtype) and arr.shape == shape
    np.testing.assert_array_equal(mirror, expected)
    np.testing.assert_array_equal(arr, expected_twice)
    assert seen == [(np.dtype(dtype), shape, np.dtype(dtype), shape, False)]


def test_unregister_returns_the_registered_array_with_final_data(rt, rng):
    x0 = rng.random((6, 5)) + 0.5
    x = x0.copy()
    h = rt.register(x)
    assert h.registered and h.shape == (6, 5) and h.dtype == np.float64 and h.nbytes == x.nbytes
    rt.submit(rt.codelet("affine", cpu=affine), (h, "RW"), a=-1.5, b=2.0)
    out = h.unregister()             # waits for the task by itself
    assert out is x and not h.registered
    np.testing.assert_allclose(x, x0 * -1.5 + 2.0, rtol=1e-15)
    assert h.unregister() is x       # idempotent


def test_inline_runtimes_coexist(rng):
    rts = [lotus_rt.Runtime(Settings(engine="inline")) for _ in range(2)]
    try:
        xs = [rng.random(4) + 0.5 for _ in rts]
        refs = [x.copy() * (i + 2.0) for i, x in enumerate(xs)]
        for i, (r, x) in enumerate(zip(rts, xs)):
            h = r.register(x)
            r.submit(r.codelet("affine", cpu=affine), (h, "RW"), a=i + 2.0, b=0.0)
            r.wait()
            h.unregister()
        for x, ref in zip(xs, refs):
            np.testing.assert_allclose(x, ref, rtol=1e-15)
    finally:
        for r in rts:
            r.shutdown()
