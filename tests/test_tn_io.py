"""What einsum takes and gives back: NumPy in, NumPy out; torch in, torch out; every bad call is
one clear error before any task runs.
"""
from __future__ import annotations

import numpy as np
import pytest

import lotus_rt
from lotus_rt import tn
from tn_cases import ENGINES, on_engine, quiet_runtime, assert_nothing_ran

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_in_torch_out(inline_engine, engine, dtype):
    gen = torch.Generator().manual_seed(7)
    a = torch.rand(6, 4, generator=gen, dtype=dtype) + 0.5
    b = (torch.rand(5, 4, generator=gen, dtype=dtype) + 0.5).t()  # not contiguous
    c = (torch.rand(5, 3, generator=gen, dtype=dtype) + 0.5).requires_grad_()
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    with on_engine(engine, inline_engine):
        for tile in (None, 2):
            out = tn.einsum("ij,jk,kl->il", a, b, c, tile=tile)
            assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.device.type == "cpu"
            torch.testing.assert_close(out, torch.einsum("ij,jk,kl->il", a, b, c).detach(), rtol=rtol, atol=0)
        out, saved = tn.forward("ij,jk->ik", a, b, tile=2)
        ga, gb = tn.backward(saved, torch.ones(6, 5, dtype=dtype), wrt=[0, 1])
    assert isinstance(ga, torch.Tensor) and isinstance(gb, torch.Tensor)
    torch.testing.assert_close(ga, torch.ones(6, 5, dtype=dtype) @ b.t(), rtol=rtol, atol=0)
    torch.testing.assert_close(gb, a.t() @ torch.ones(6, 5, dtype=dtype), rtol=rtol, atol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_numpy_in_numpy_out(inline_engine, engine, rng):
    a = rng.uniform(0.5, 1.5, (6, 4)).T  # Fortran-ordered view
    b = rng.uniform(0.5, 1.5, (4, 10))[:, ::2]  # strided view
    with on_engine(engine, inline_engine):
        for dtype in (np.float32, np.float64):
            out = tn.einsum("ji,jk->ik", a.astype(dtype).T.copy().T, b.astype(dtype), tile=2)
            assert type(out) is np.ndarray and out.dtype == dtype and out.shape == (6, 5)
            np.testing.assert_allclose(out, (a.T @ b), rtol=1e-5)
        scalar = tn.einsum("ij,ij->", a, a)
        assert isinstance(scalar, np.ndarray) and scalar.shape == ()
        np.testing.assert_allclose(scalar, np.sum(a * a), rtol=1e-12)


def _bad_calls():
    a, b = np.ones((3, 4)), np.ones((4, 5))
    ta, tb = torch.ones(3, 4, dtype=torch.float64), torch.ones(4, 5, dtype=torch.float64)
    sq = np.ones((3, 3))
    return {
        "shape mismatch": (lambda: tn.einsum("ij,jk->ik", a, np.ones((5, 5))), ValueError, r"index 'j'"),
        "ellipsis dims do not broadcast": (lambda: tn.einsum("...j,...j->...", a, np.ones((2, 4))), ValueError,
                                           r"dimension -1 of '\.\.\.' has size 3 in operand 0 and 2 in operand 1"),
        "two arrows": (lambda: tn.einsum("ij->j->i", a), ValueError, "->"),
        "unknown optimizer": (lambda: tn.einsum("ij,jk->ik", a, b, optimize="bogus"), ValueError,
                              r"bogus.*valid.*greedy.*optimal"),
        "complex": (lambda: tn.einsum("ij,jk->ik", a, b.astype(np.complex128)), TypeError, r"operand 1.*complex"),
        "mixed torch numpy": (lambda: tn.einsum("ij,jk->ik", a, tb), TypeError, r"torch"),
        "mixed numpy torch": (lambda: tn.einsum("ij,jk->ik", ta, b), TypeError, r"torch"),
        "object dtype": (lambda: tn.einsum("ij,jk->ik", a.astype(object), b), TypeError, r"operand 0.*object"),
        "bfloat16 torch": (lambda: tn.einsum("ij,jk->ik", ta.bfloat16(), tb.bfloat16()), TypeError,
                           r"operand 0.*bfloat16"),
        "int64 beyond 2**53": (lambda: tn.einsum("ij,jk->ik", a.astype(np.int64) * 2**40, b.astype(np.int64) * 2**20),
                               ValueError, r"2\*\*53"),
        "too few operands": (lambda: tn.einsum("ij,jk->ik", a), ValueError, r"2 operand.*1"),
        "too many operands": (lambda: tn.einsum("ij,jk->ik", a, b, b), ValueError, r"2 operand.*3"),
        "tile 0": (lambda: tn.einsum("ij,jk->ik", a, b, tile=0), ValueError, r"tile.*0"),
        "tile -1": (lambda: tn.einsum("ij,jk->ik", a, b, tile=-1), ValueError, r"tile.*-1"),
        "tile 2.5": (lambda: tn.einsum("ij,jk->ik", a, b, tile=2.5), ValueError, r"tile.*2\.5"),
        "tile 0, scalar output": (lambda: tn.einsum("ij,jk->", a, b, tile=0), ValueError, r"tile.*0"),
        "tile -1, scalar output": (lambda: tn.einsum("ij,jk->", a, b, tile=-1), ValueError, r"tile.*-1"),
        "tile 2.5, diagonal on the lead index": (lambda: tn.einsum("ii,ij->ij", sq, a, tile=2.5),
                                                 ValueError, r"tile.*2\.5"),
        "forward, tile 0": (lambda: tn.forward("ij,jk->ik", a, b, tile=0), ValueError, r"tile.*0"),
        "plan, tile -1": (lambda: tn.plan("ij,jk->ik", a, b, tile=-1), ValueError, r"tile.*-1"),
    }


BAD_CALLS = list(_bad_calls())


@pytest.mark.parametrize("engine", ENGINES)
def test_formerly_refused_calls_match_numpy(inline_engine, engine, rng):
    """What einsum used to refuse (no arrow, ellipsis, mixed and integer dtypes, torch integers)
    now gives numpy's result in numpy's dtype."""
    a, b = rng.uniform(0.5, 1.5, (3, 4)), rng.uniform(0.5, 1.5, (4, 5))
    ia, ib = rng.integers(-5, 6, (3, 4)), rng.integers(-5, 6, (4, 5))
    calls = [("ij,jk", (a, b)), ("...j,jk->...k", (a, b)), ("ij,jk->ik", (a, b.astype(np.float32))),
             ("ij,jk->ik", (ia, ib)), ("ij,jk->ik", (ia.astype(np.int8), ib.astype(np.uint8)))]
    with on_engine(engine, inline_engine):
        for eq, ops in calls:
            out, ref = tn.einsum(eq, *ops), np.einsum(eq, *ops)
            assert out.dtype == ref.dtype and out.shape == ref.shape, (eq, out.dtype, ref.dtype)
            np.testing.assert_allclose(out, ref, rtol=1e-12)
        out = tn.einsum("ij,jk->ik", torch.from_numpy(ia), torch.from_numpy(ib))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64
    assert torch.equal(out, torch.from_numpy(ia @ ib))


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_input_fails_before_any_task(name):
    call, exc_type, pattern = _bad_calls()[name]
    runtime = quiet_runtime()
    with pytest.raises(exc_type, match=pattern):
        call()
    assert_nothing_ran(runtime)


def test_bad_tile_rejected_even_when_an_equal_plan_is_cached():
    """tile=True / tile=2.0 are refused; a cached plan for tile=1 / tile=2 must not let them in."""
    a, b = np.ones((6, 4)), np.ones((4, 5))
    runtime = quiet_runtime()
    tn.einsum("ij,jk->ik", a, b, tile=1)
    tn.einsum("ij,jk->ik", a, b, tile=2)
    runtime.stats(reset=True)
    runtime.trace(clear=True)
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match="tile"):
            tn.einsum("ij,jk->ik", a, b, tile=bad)
    assert_nothing_ran(runtime)


@pytest.mark.parametrize("name, value, message", [
    ("LOTUS_OPTIMIZE", "bogus", r"LOTUS_OPTIMIZE='bogus'.*valid.*greedy"),
    ("LOTUS_TILE", "abc", r"LOTUS_TILE='abc'"),
    ("LOTUS_TILE", "0", r"LOTUS_TILE='0'"),
])
def test_bad_environment_is_a_config_error(monkeypatch, name, value, message):
    """A bad value is refused when the runtime reads the environment (start or reconfigure),
    before anything runs; the settings in force stay as they were."""
    runtime = quiet_runtime()
    before = runtime.settings
    monkeypatch.setenv(name, value)
    with pytest.raises(lotus_rt.ConfigError, match=message):
        runtime.reconfigure()
    assert runtime.settings == before
    assert_nothing_ran(runtime)
    tn.einsum("ij,jk->ik", np.ones((3, 4)), np.ones((4, 5)))  # still the settings read at start
    monkeypatch.delenv(name)


def test_bad_backward_calls(rng):
    runtime = quiet_runtime()
    a, b = rng.uniform(0.5, 1.5, (6, 4)), rng.uniform(0.5, 1.5, (4, 5))
    out, saved = tn.forward("ij,jk->ik", a, b, tile=2)
    runtime.stats(reset=True)
    runtime.trace(clear=True)
    bad = [
        (lambda: tn.backward(saved, np.ones((5, 6)), wrt=[0]), ValueError, r"shape \(5, 6\).*\(6, 5\)"),
        (lambda: tn.backward(saved, np.ones((6, 5), np.float32), wrt=[0]), ValueError, r"float32"),
        (lambda: tn.backward(saved, np.ones((6, 5)), wrt=[2]), ValueError, r"index 2.*2 operand"),
        (lambda: tn.backward(saved, np.ones((6, 5)), wrt=[-1]), ValueError, r"index -1"),
        (lambda: tn.backward(saved, torch.ones(6, 5, dtype=torch.float64).numpy().tolist(), wrt=[0]),
         TypeError, r"list"),
    ]
    for call, exc_type, pattern in bad:
        with pytest.raises(exc_type, match=pattern):
            call()
    assert_nothing_ran(runtime)
    # a refused call leaves the forward usable
    g = rng.uniform(-1, 1, (6, 5))
    da, db = tn.backward(saved, g, wrt=[0, 1])
    np.testing.assert_allclose(da, g @ b.T, rtol=1e-12)
    np.testing.assert_allclose(db, a.T @ g, rtol=1e-12)
    runtime.stats(reset=True)
    runtime.trace(clear=True)
    with pytest.raises(RuntimeError, match="already released"):
        tn.backward(saved, g, wrt=[0])
    assert_nothing_ran(runtime)
    # release() also ends it
    out, saved = tn.forward("ij,jk->ik", a, b)
    saved.release()
    saved.release()  # idempotent
    with pytest.raises(RuntimeError, match="already released"):
        tn.backward(saved, g, wrt=[0])
