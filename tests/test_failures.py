"""Failures: codelet errors, bad input, shutdown and restart, exit without wait, missing binding."""
from __future__ import annotations

import textwrap
import traceback

import numpy as np
import pytest

import lotus_rt
from lotus_rt.runtime.settings import Settings
from conftest import starpu_skip_reason


def affine(x, a, b):
    np.multiply(x, a, out=x)
    np.add(x, b, out=x)


def exploding_body(x, message="boom 42"):
    raise ValueError(message)


# ---------------------------------------------------------------------- codelet errors


def test_codelet_error_surfaces_from_wait(rt, rng):
    x0 = rng.random(4) + 0.5
    x = x0.copy()
    h = rt.register(x)
    fut = rt.submit(rt.codelet("exploder", cpu=exploding_body), (h, "RW"), name="the bad task")
    with pytest.raises(lotus_rt.CodeletError) as info:
        rt.wait()
    err = info.value
    assert "exploder" in str(err) and "the bad task" in str(err) and "boom 42" in str(err)
    assert err.codelet == "exploder" and err.task == "the bad task"
    assert err.worker in {name for _, name in rt.workers}
    assert isinstance(err, lotus_rt.LotusError) and isinstance(err, RuntimeError)
    cause = err.__cause__
    assert isinstance(cause, ValueError) and str(cause) == "boom 42"
    tb = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
    assert "exploding_body" in tb and "raise ValueError(message)" in tb
    # the future holds the same failure
    assert fut.done()
    with pytest.raises(lotus_rt.CodeletError) as again:
        fut.result()
    assert again.value is err
    assert fut.exception() is err
    # reported once: the next wait() is clean
    rt.wait()
    h.unregister()
    np.testing.assert_array_equal(x, x0)


def test_future_result_raises_and_then_wait_does_not(rt, rng):
    h = rt.register(rng.random(4) + 0.5)
    fut = rt.submit(rt.codelet("exploder", cpu=exploding_body), (h, "RW"))
    with pytest.raises(lotus_rt.CodeletError, match="exploder") as info:
        fut.result()
    assert isinstance(info.value.__cause__, ValueError)
    rt.wait()   # observed through the future: not raised again
    h.unregister()


def test_future_exception_counts_as_observed(rt, rng):
    h = rt.register(rng.random(4) + 0.5)
    fut = rt.submit(rt.codelet("exploder", cpu=exploding_body), (h, "RW"))
    err = fut.exception()
    assert isinstance(err, lotus_rt.CodeletError) and isinstance(err.__cause__, ValueError)
    rt.wait()
    h.unregister()


def test_runtime_usable_after_a_failure(rt, rng):
    h = rt.register(rng.random(4) + 0.5)
    rt.submit(rt.codelet("exploder", cpu=exploding_body), (h, "RW"))
    with pytest.raises(lotus_rt.CodeletError):
        rt.wait()
    x0 = rng.random(16) + 0.5
    x = x0.copy()
    hx = rt.register(x)
    fut = rt.submit(rt.codelet("affine", cpu=affine), (hx, "RW"), a=2.0, b=-1.0)
    assert fut.result() is None
    rt.wait()
    hx.unregister(), h.unregister()
    np.testing.assert_allclose(x, x0 * 2.0 - 1.0, rtol=1e-15)


def test_failing_task_mid_chain_later_tasks_still_run(rt, rng):
    x0 = rng.random(16) + 0.5
    x = x0.copy()
    h = rt.register(x)
    aff = rt.codelet("affine", cpu=affine)
    boom = rt.codelet("exploder", cpu=exploding_body)
    ref = x0.copy()
    futures = []
    for i in range(10):
        if i == 5:
            futures.append(rt.submit(boom, (h, "RW"), name="step5", message="step 5 broke"))
            continue
        a, b = 1.0 + 0.05 * i, 0.1 * i - 0.3
        futures.append(rt.submit(aff, (h, "RW"), a=a, b=b, name=f"step{i}"))
        ref = ref * a + b
    with pytest.raises(lotus_rt.CodeletError, match="step 5 broke") as info:
        rt.wait()
    assert info.value.task == "step5"
    assert [f.exception() is not None for f in futures] == [i == 5 for i in range(10)]
    h.unregister()
    np.testing.assert_allclose(x, ref, rtol=1e-14)


def test_several_failures_first_raised_rest_noted(rt, rng):
    h = rt.register(rng.random(4) + 0.5)
    boom = rt.codelet("exploder", cpu=exploding_body)
    for i in range(3):   # one handle in RW: they fail in this order
        rt.submit(boom, (h, "RW"), name=f"fail{i}", message=f"failure {i}")
    with pytest.raises(lotus_rt.CodeletError, match="failure 0") as info:
        rt.wait()
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "2 more" in notes and "fail1" in notes and "fail2" in notes
    rt.wait()   # all three were reported by the previous wait()
    h.unregister()


IN_BODY_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, lotus_rt
    call = sys.argv[1]
    rt = lotus_rt.runtime()
    print("ENGINE", rt.engine)
    x0 = np.random.default_rng(5).random(4) + 0.5
    x = x0.copy()
    h = rt.register(x)
    victim = rt.register(np.ones(3))

    def call_wait(x):
        rt.wait()

    def call_unregister(x):
        victim.unregister()

    def call_acquire(x):
        with victim.acquire("R"):
            pass

    def call_shutdown(x):
        lotus_rt.shutdown()

    fut = rt.submit(rt.codelet("in_body_" + call, cpu=globals()["call_" + call]), (h, "RW"))
    err = fut.exception()
    cause = None if err is None else err.__cause__
    print("RESULT", type(err).__name__, type(cause).__name__, str(cause).replace(chr(10), " "))
    print("VICTIM_REGISTERED", victim.registered, "LIVE", victim in rt._live)

    # the process-wide runtime is intact and still works
    rt.wait()
    try:
        same = lotus_rt.runtime() is rt
    except Exception as exc:
        same = f"{type(exc).__name__}: {exc}"
    print("SAME_RUNTIME", same)
    print("CLOSED", rt.closed)
    rt.submit(rt.codelet("double", cpu=lambda x: np.multiply(x, 2, out=x)), (h, "RW"))
    rt.wait()
    print("FINAL_OK", bool(np.allclose(h.unregister(), x0 * 2)))
""")


@pytest.mark.parametrize("call", ["wait", "unregister", "acquire", "shutdown"])
@pytest.mark.parametrize("engine", ["starpu", "inline"])
def test_blocking_call_inside_a_body_fails_cleanly(run_py, describe_proc, engine, call):
    """wait()/unregister()/acquire()/shutdown() in a body: a RuntimeError in the task, no hang,
    and no side effect: the handle stays registered, the process-wide runtime stays current.

    Both engines must agree: code that works on the inline reference must not deadlock or
    misbehave on StarPU, so the inline engine must refuse the same calls.
    """
    if engine == "starpu" and starpu_skip_reason():
        pytest.skip(starpu_skip_reason())
    proc = run_py(IN_BODY_SCRIPT, env={"LOTUS_ENGINE": engine}, timeout=60, args=[call])
    assert proc.returncode == 0, describe_proc(proc)
    lines = {line.split()[0]: line.split(None, 1)[1] if " " in line else ""
             for line in proc.stdout.splitlines() if line}
    assert lines["ENGINE"] == engine
    err_type, cause_type, message = lines["RESULT"].split(None, 2)
    assert (err_type, cause_type) == ("CodeletError", "RuntimeError"), describe_proc(proc)
    assert f"{call}()" in message and "inside a codelet body" in message, message
    assert lines["VICTIM_REGISTERED"] == "True LIVE True", describe_proc(proc)
    assert lines["SAME_RUNTIME"] == "True", describe_proc(proc)
    assert lines["CLOSED"] == "False"
    assert lines["FINAL_OK"] == "True", describe_proc(proc)


# ---------------------------------------------------------------------- bad input, before submission


def _readonly(rng):
    a = rng.random(4) + 0.5
    a.flags.writeable = False
    return a


BAD_REGISTER = [
    ("non_contiguous", lambda rng: (rng.random((4, 6)) + 0.5)[:, ::2], ValueError, "contiguous"),
    ("fortran_order", lambda rng: np.asfortranarray(rng.random((4, 6)) + 0.5), ValueError, "contiguous"),
    ("object_dtype", lambda rng: np.array([1, "a", None], dtype=object), TypeError, "dtype"),
    ("string_dtype", lambda rng: np.array(["ab", "cd"]), TypeError, "dtype"),
    ("empty", lambda rng: np.empty((0, 3)), ValueError, "empty"),
    ("list", lambda rng: [1.0, 2.0], TypeError, "ndarray"),
    ("byteswapped", lambda rng: (rng.random(4) + 0.5).astype(">f8" if np.little_endian else "<f8"),
     TypeError, "byte order"),
]


@pytest.mark.parametrize("case", BAD_REGISTER, ids=[c[0] for c in BAD_REGISTER])
def test_register_rejects_bad_arrays(rt, rng, case):
    _, make, exc_type, words = case
    before = len(rt._live)
    with pytest.raises(exc_type, match=words):
        rt.register(make(rng))
    assert len(rt._live) == before


def _codelet_cases():
    def neither(rt, h, cl):
        rt.codelet("nobody")

    def not_callable(rt, h, cl):
        rt.codelet("bad", cpu="not a function")

    def name_too_long(rt, h, cl):
        rt.codelet("c" * 42, cpu=lambda x: None)

    def empty_name(rt, h, cl):
        rt.codelet("", cpu=lambda x: None)

    return [("neither_body", neither, ValueError, "cpu body, a cuda body"),
            ("body_not_callable", not_callable, TypeError, "callable"),
            ("codelet_name_too_long", name_too_long, ValueError, "at most 41"),
            ("codelet_name_empty", empty_name, ValueError, "non-empty")]


def _submit_cases():
    def mode_x(rt, h, cl):
        rt.submit(cl, (h, "X"))

    def mode_lowercase(rt, h, cl):
        rt.submit(cl, (h, "rw"))

    def not_a_handle(rt, h, cl):
        rt.submit(cl, (np.ones(3), "R"))

    def not_a_pair(rt, h, cl):
        rt.submit(cl, h)

    def not_a_codelet(rt, h, cl):
        rt.submit(lambda x: None, (h, "R"))

    def write_read_only(rt, h, cl):
        ro = rt.register(_readonly(np.random.default_rng(0)))
        try:
            rt.submit(cl, (ro, "W"))
        finally:
            ro.unregister()

    def twice_with_write(rt, h, cl):
        rt.submit(cl, (h, "RW"), (h, "R"))

    def twice_w_w(rt, h, cl):
        rt.submit(cl, (h, "W"), (h, "W"))

    def cuda_only(rt, h, cl):
        rt.submit(rt.codelet("gpu_only", cuda=lambda x: None), (h, "RW"))

    def unregistered(rt, h, cl):
        h2 = rt.register(np.ones(3))
        h2.unregister()
        rt.submit(cl, (h2, "R"))

    def other_runtime(rt, h, cl):
        other = lotus_rt.Runtime(Settings(engine="inline"))
        try:
            rt.submit(cl, (other.register(np.ones(3)), "R"))
        finally:
            other.shutdown()

    def task_name_too_long(rt, h, cl):
        rt.submit(cl, (h, "RW"), name="t" * 48)

    def task_name_not_str(rt, h, cl):
        rt.submit(cl, (h, "RW"), name=42)

    return [("mode_X", mode_x, ValueError, "mode 'X'"),
            ("mode_lowercase", mode_lowercase, ValueError, "mode 'rw'"),
            ("not_a_handle", not_a_handle, TypeError, "Handle"),
            ("not_a_pair", not_a_pair, TypeError, "pair"),
            ("not_a_codelet", not_a_codelet, TypeError, "Codelet"),
            ("write_on_read_only_array", write_read_only, ValueError, "read-only"),
            ("same_handle_twice_rw_r", twice_with_write, ValueError, "same handle"),
            ("same_handle_twice_w_w", twice_w_w, ValueError, "same handle"),
            ("cuda_only_codelet", cuda_only, ValueError, "no worker can run"),
            ("unregistered_handle", unregistered, ValueError, "unregistered"),
            ("handle_of_other_runtime", other_runtime, ValueError, "another runtime"),
            ("task_name_too_long", task_name_too_long, ValueError, "at most 47"),
            ("task_name_not_str", task_name_not_str, (TypeError, ValueError), "task name")]


BAD_CALLS = _codelet_cases() + _submit_cases()


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_one_clear_error_before_submission(rt, rng, case):
    name, call, exc_type, words = case
    if name == "cuda_only_codelet" and any(kind == "cuda" for kind, _ in rt.workers):
        pytest.skip("this runtime has CUDA workers")
    ran = []
    cl = rt.codelet("recorder", cpu=lambda *arrays, **kw: ran.append(len(arrays)))
    x0 = rng.random(5) + 0.5
    x = x0.copy()
    h = rt.register(x)
    trace_before = len(rt.trace())
    pending_before = dict(rt._engine._pending) if rt.engine == "starpu" else None
    with pytest.raises(exc_type, match=words):
        call(rt, h, cl)
    rt.wait()   # nothing was submitted, so nothing failed
    assert ran == []
    assert len(rt.trace()) == trace_before
    if rt.engine == "starpu":
        assert rt._engine._pending == pending_before
    # the runtime still works
    rt.submit(rt.codelet("affine", cpu=affine), (h, "RW"), a=2.0, b=1.0)
    rt.wait()
    h.unregister()
    np.testing.assert_allclose(x, x0 * 2.0 + 1.0, rtol=1e-15)


def test_longest_names_are_kept_whole(rt):
    h = rt.register(np.ones(3))
    cl = rt.codelet("c" * 41, cpu=lambda x: None)
    rt.trace(clear=True)
    rt.submit(cl, (h, "RW"), name="t" * 47)
    rt.submit(cl, (h, "RW"))
    rt.wait()
    h.unregister()
    assert [r.name for r in sorted(rt.trace(), key=lambda r: r.task_id)] == ["t" * 47, "c" * 41]


def test_read_only_array_can_be_read(rt, rng):
    src = _readonly(rng)
    out = rng.random(4) + 0.5
    hs, ho = rt.register(src), rt.register(out)
    rt.submit(rt.codelet("copy", cpu=lambda o, s: np.multiply(s, 2.0, out=o)), (ho, "W"), (hs, "R"))
    rt.wait()
    hs.unregister(), ho.unregister()
    np.testing.assert_allclose(out, src * 2.0, rtol=1e-15)


def test_priority_beyond_the_policy_range_is_clamped(rt, rng):
    """Priorities outside ``rt.priority_range`` (even beyond 32 bits) are clamped, not errors:
    the task runs, in order, and nothing is left half-submitted."""
    low, high = rt.priority_range
    assert isinstance(low, int) and isinstance(high, int) and low <= high
    x0 = rng.random(4) + 0.5
    x = x0.copy()
    h = rt.register(x)
    pending_before = dict(rt._engine._pending) if rt.engine == "starpu" else None
    aff = rt.codelet("affine", cpu=affine)
    for prio in (2**40, -2**70, high, low, np.int64(2**62)):
        rt.submit(aff, (h, "RW"), a=1.5, b=-0.25, priority=prio)
    rt.wait()
    h.unregister()
    ref = x0.copy()
    for _ in range(5):
        ref = ref * 1.5 - 0.25
    np.testing.assert_allclose(x, ref, rtol=1e-14)
    if rt.engine == "starpu":
        assert rt._engine._pending == pending_before


@pytest.mark.parametrize("name", ["\u00e9" * 47, "\u03bb" * 30 + "x", "na\u00efve task \u2192 \U0001f600"],
                         ids=["47_two_byte_chars", "mixed", "emoji"])
def test_non_ascii_task_names_round_trip_or_are_rejected(rt, name):
    """A task name is either refused up front (ValueError) or comes back whole from trace();
    it must never break trace() (a UTF-8 sequence cut by the 48-byte C buffer)."""
    h = rt.register(np.ones(3))
    ran = []
    cl = rt.codelet("recorder", cpu=lambda x: ran.append(1))
    rt.trace(clear=True)
    try:
        rt.submit(cl, (h, "RW"), name=name)
    except ValueError:
        rt.wait()
        assert ran == []
        accepted = False
    else:
        rt.wait()
        accepted = True
    finally:
        h.unregister()
    if accepted:
        assert ran == [1]
        assert [r.name for r in rt.trace(clear=True)] == [name]


@pytest.mark.parametrize("name", ["a\x00b", "\ud800"], ids=["nul", "lone_surrogate"])
def test_unencodable_task_names_are_a_clear_error_before_submission(rt, name):
    """Names the C side cannot hold whole (NUL, lone surrogate) are a ValueError naming the
    task name, before anything reaches the engine, or else they round-trip through trace()."""
    h = rt.register(np.ones(3))
    ran = []
    cl = rt.codelet("recorder", cpu=lambda x: ran.append(1))
    pending_before = dict(rt._engine._pending) if rt.engine == "starpu" else None
    rt.trace(clear=True)
    try:
        try:
            rt.submit(cl, (h, "RW"), name=name)
        except ValueError as exc:
            assert "name" in str(exc)
            rt.wait()
            assert ran == []
        else:
            rt.wait()
            assert ran == [1]
            assert [r.name for r in rt.trace(clear=True)] == [name]
        if rt.engine == "starpu":
            assert rt._engine._pending == pending_before, "a failed submission left a task in _pending"
    finally:
        rt.wait()
        h.unregister()
        if rt.engine == "starpu":   # do not let the leak (if any) disturb later tests
            for key in set(rt._engine._pending) - set(pending_before):
                rt._engine._pending.pop(key, None)


def test_too_many_arrays_for_starpu_is_a_clear_error(starpu_rt):
    rt = starpu_rt
    nmax = rt._engine._max_buffers
    pending_before = dict(rt._engine._pending)
    hs = [rt.register(np.ones(2)) for _ in range(nmax + 1)]
    with pytest.raises(ValueError, match="at most"):
        rt.submit(rt.codelet("wide", cpu=lambda *a: None), *[(h, "R") for h in hs])
    assert rt._engine._pending == pending_before
    rt.wait()
    for h in hs:
        h.unregister()


def test_closed_runtime_refuses_work(rng):
    rt = lotus_rt.Runtime(Settings(engine="inline"))
    h = rt.register(rng.random(3) + 0.5)
    rt.shutdown()
    assert rt.closed and not h.registered
    for call in (lambda: rt.register(np.ones(3)), lambda: rt.wait(), lambda: rt.stats(),
                 lambda: rt.submit(rt.codelet("x", cpu=lambda: None))):
        with pytest.raises(RuntimeError, match="shut down"):
            call()
    rt.shutdown()   # idempotent


# ---------------------------------------------------------------------- shutdown / restart


def test_shutdown_and_restart_twice_in_one_process(rng):
    reason = starpu_skip_reason()
    if reason:
        pytest.skip(reason)
    previous = None
    for round_ in range(3):
        lotus_rt.shutdown()
        if previous is not None:
            assert previous.closed
            with pytest.raises(RuntimeError, match="shut down"):
                previous.register(np.ones(2))
        rt = lotus_rt.runtime()
        assert rt.engine == "starpu" and rt is not previous and not rt.closed
        assert lotus_rt.runtime() is rt
        x0 = rng.random(32) + 0.5
        x = x0.copy()
        h = rt.register(x)
        for i in range(20):
            rt.submit(rt.codelet("affine", cpu=affine), (h, "RW"), a=1.0 + 0.01 * i, b=-0.1 * round_)
        rt.wait()
        h.unregister()
        ref = x0.copy()
        for i in range(20):
            ref = ref * (1.0 + 0.01 * i) - 0.1 * round_
        np.testing.assert_allclose(x, ref, rtol=1e-14)
        assert sum(s.tasks for s in rt.stats()) == 20
        previous = rt


def test_shutdown_waits_and_brings_registered_data_home(rng):
    reason = starpu_skip_reason()
    if reason:
        pytest.skip(reason)
    rt = lotus_rt.runtime()
    x0 = rng.random(32) + 0.5
    x = x0.copy()
    h = rt.register(x)
    for _ in range(10):
        rt.submit(rt.codelet("affine", cpu=affine), (h, "RW"), a=1.5, b=-0.5)
    lotus_rt.shutdown()     # no wait(), no unregister()
    assert rt.closed and not h.registered
    ref = x0.copy()
    for _ in range(10):
        ref = ref * 1.5 - 0.5
    np.testing.assert_allclose(x, ref, rtol=1e-13)


def test_shutdown_warns_about_unobserved_failures(rt):
    if rt.engine == "starpu":
        owned = False
    else:
        owned = True
    h = rt.register(np.ones(2))
    rt.submit(rt.codelet("exploder", cpu=exploding_body), (h, "RW"), name="never_waited")
    with pytest.warns(RuntimeWarning, match="never waited"):
        if owned:
            rt.shutdown()
        else:
            lotus_rt.shutdown()
    assert rt.closed


# ---------------------------------------------------------------------- exit without wait

EXIT_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, lotus_rt
    path = sys.argv[1]
    rt = lotus_rt.runtime()
    print("ENGINE", rt.engine, flush=True)
    h = rt.register(np.random.default_rng(0).random(3) + 0.5)

    def body(x, i):
        x *= 1.01
        with open(path, "a") as f:
            f.write(f"{i}\\n")

    cl = rt.codelet("append_line", cpu=body)
    for i in range(100):
        rt.submit(cl, (h, "RW"), i=i)
    if len(sys.argv) > 2:
        rt.submit(rt.codelet("exploder", cpu=lambda x: 1 / 0), (h, "RW"), name="late_failure")
    # no wait(), no unregister(), no shutdown(): the atexit hook must finish the work
""")


@pytest.mark.parametrize("with_failure", [False, True], ids=["clean", "with_failure"])
def test_exit_without_wait_finishes_the_work(run_py, describe_proc, tmp_path, with_failure):
    reason = starpu_skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "lines.txt"
    args = [str(out)] + (["fail"] if with_failure else [])
    proc = run_py(EXIT_SCRIPT, env={"LOTUS_ENGINE": "starpu"}, timeout=60, args=args)
    assert proc.returncode == 0, describe_proc(proc)
    assert "ENGINE starpu" in proc.stdout
    lines = out.read_text().split()
    assert lines == [str(i) for i in range(100)]      # all ran, in order (one RW handle)
    if with_failure:
        assert "never waited" in proc.stderr and "late_failure" in proc.stderr, describe_proc(proc)
    else:
        assert "Traceback" not in proc.stderr, describe_proc(proc)


# ---------------------------------------------------------------------- missing binding

MISSING_BINDING_SCRIPT = textwrap.dedent("""
    import sys, warnings
    sys.modules["lotus_rt.starpu._lotus_starpu"] = None     # the compiled binding cannot import
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import numpy as np, lotus_rt, lotus_rt.starpu
        print("AVAILABLE", lotus_rt.starpu.available())
        try:
            rt = lotus_rt.runtime()
            lotus_rt.runtime()                     # the cached runtime: no second warning
            h = rt.register(np.arange(1.0, 5.0))
            rt.submit(rt.codelet("double", cpu=lambda x: np.multiply(x, 2, out=x)), (h, "RW"))
            rt.wait()
            print("ENGINE", rt.engine, "RESULT", h.unregister().tolist())
        except lotus_rt.StarPUUnavailable as exc:
            print("UNAVAILABLE", type(exc).__name__, str(exc).replace(chr(10), " "))
    for w in caught:
        print("WARNING", w.category.__name__, str(w.message).replace(chr(10), " "))
""")


def test_missing_binding_falls_back_to_inline_with_one_warning(run_py, describe_proc):
    proc = run_py(MISSING_BINDING_SCRIPT, unset=["LOTUS_ENGINE"], timeout=60)
    assert proc.returncode == 0, describe_proc(proc)
    assert "AVAILABLE False" in proc.stdout
    assert "ENGINE inline RESULT [2.0, 4.0, 6.0, 8.0]" in proc.stdout, describe_proc(proc)
    warns = [line for line in proc.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warns) == 1, warns
    assert warns[0].startswith("WARNING RuntimeWarning") and "inline" in warns[0]


def test_missing_binding_with_engine_starpu_raises(run_py, describe_proc):
    proc = run_py(MISSING_BINDING_SCRIPT, env={"LOTUS_ENGINE": "starpu"}, timeout=60)
    assert proc.returncode == 0, describe_proc(proc)
    assert "UNAVAILABLE StarPUUnavailable" in proc.stdout, describe_proc(proc)
    assert "LOTUS_ENGINE=starpu" in proc.stdout
    assert not [line for line in proc.stdout.splitlines() if line.startswith("WARNING")]
    assert "ENGINE" not in proc.stdout.replace("LOTUS_ENGINE", "")


def test_missing_binding_with_engine_inline_is_silent(run_py, describe_proc):
    proc = run_py(MISSING_BINDING_SCRIPT, env={"LOTUS_ENGINE": "inline"}, timeout=60)
    assert proc.returncode == 0, describe_proc(proc)
    assert "ENGINE inline RESULT [2.0, 4.0, 6.0, 8.0]" in proc.stdout, describe_proc(proc)
    assert not [line for line in proc.stdout.splitlines() if line.startswith("WARNING")]
