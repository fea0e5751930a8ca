"""Einsum networks lowered to tasks: forward against numpy.einsum, backward against torch autograd,
on both engines (StarPU and the inline reference); intermediates reordered; several workers.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

import lotus_rt
from lotus_rt import tn
from lotus_rt.tn import lower
from conftest import starpu_runtime_or_skip
from tn_cases import (DTYPES, ENGINES, FAMILIES, FIXED_NETWORKS, GRAD_FAMILIES, PROPERTY, SEEDS, TILES,
                      assert_matches_numpy, check_forward_backward_against_torch, make_operands, ntasks,
                      on_engine, torch_grads)

torch = pytest.importorskip("torch")


def test_inline_redirection_runs_on_the_inline_runtime(inline_engine):
    starpu = lotus_rt.runtime()
    a, b = np.ones((3, 4)), np.ones((4, 2))
    starpu_before = ntasks(starpu)
    with on_engine("inline", inline_engine):
        inline_engine.trace(clear=True)
        out = tn.einsum("ij,jk->ik", a, b, tile=1)
        names = [r.name for r in inline_engine.trace()]
    np.testing.assert_array_equal(out, np.full((3, 2), 4.0))
    assert names == ["pair0[0]", "pair0[1]", "pair0[2]"]
    assert ntasks(starpu) == starpu_before


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("family", list(FAMILIES))
@PROPERTY
@given(data=st.data(), dtype=DTYPES, tile=TILES, seed=SEEDS)
def test_forward_matches_numpy(inline_engine, engine, family, data, dtype, tile, seed):
    case = data.draw(FAMILIES[family], label="network")
    ops = make_operands(case, dtype, seed)
    copies = [o.copy() for o in ops]
    with on_engine(engine, inline_engine) as runtime:
        out = tn.einsum(case.equation, *ops, tile=tile)
        ntiles = tn.plan(case.equation, *ops, tile=tile, rt=runtime).ntiles
    event(f"tiled: {ntiles > 1}")
    event(f"diagonal: {case.diagonal}")
    event(f"same object twice: {bool(case.same_as)}")
    assert_matches_numpy(out, case.equation, copies, dtype)
    for op, copy in zip(ops, copies):  # operands are read, never written
        np.testing.assert_array_equal(op, copy)


@pytest.mark.parametrize("engine", ENGINES)
def test_same_array_object_twice(inline_engine, engine, rng):
    a = rng.uniform(0.5, 1.5, (5, 5))
    with on_engine(engine, inline_engine):
        for tile in (None, 1, 2, 64):
            np.testing.assert_allclose(tn.einsum("ij,jk->ik", a, a, tile=tile), a @ a, rtol=1e-12)
            np.testing.assert_allclose(tn.einsum("ij,ij,jk->ik", a, a, a, tile=tile),
                                       np.einsum("ij,ij,jk->ik", a, a, a), rtol=1e-12)
            np.testing.assert_allclose(tn.einsum("ij,ji->", a, a, tile=tile), np.trace(a @ a), rtol=1e-12)


def test_top_level_einsum_is_tn_einsum(rng):
    a, b = rng.random((4, 3)), rng.random((3, 6))
    np.testing.assert_allclose(lotus_rt.einsum("ij,jk->ik", a, b, tile=2), a @ b, rtol=1e-12)
    np.testing.assert_allclose(lotus_rt.einsum("ij,jk->ki", a, b, optimize="greedy"), (a @ b).T, rtol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("family", list(GRAD_FAMILIES))
@PROPERTY
@given(data=st.data(), tile=TILES, seed=SEEDS)
def test_backward_matches_torch(inline_engine, engine, family, data, tile, seed):
    case = data.draw(GRAD_FAMILIES[family], label="network")
    nops = len(case.shapes)
    wrt = data.draw(st.lists(st.integers(0, nops - 1), min_size=1, max_size=nops, unique=True), label="wrt")
    ops = make_operands(case, np.float64, seed)
    grad_out = np.random.default_rng(seed ^ 0x5EED).uniform(-1.5, 1.5, np.einsum(case.equation, *ops).shape)
    with on_engine(engine, inline_engine):
        out, saved = tn.forward(case.equation, *ops, tile=tile)
        grads = tn.backward(saved, grad_out, wrt=wrt)
    assert_matches_numpy(out, case.equation, ops, np.float64)
    _, ref_grads = torch_grads(case.equation, ops, grad_out, wrt)
    _, scales = torch_grads(case.equation, [np.abs(o) for o in ops], np.abs(grad_out), wrt)
    terms = case.equation.split("->")[0].split(",")
    sizes = {i: d for term, shape in zip(terms, case.shapes) for i, d in zip(term, shape)}
    assert len(grads) == len(wrt)
    for k, grad, ref, scale in zip(wrt, grads, ref_grads, scales):
        assert isinstance(grad, np.ndarray) and grad.dtype == np.float64
        assert grad.shape == case.shapes[k], (k, grad.shape)
        n_terms = math.prod(d for i, d in sizes.items() if i not in terms[k])  # summed per element
        bound = 1e-10 * math.sqrt(n_terms) * max(float(np.max(scale)), 1e-300)
        err = float(np.max(np.abs(grad - ref)))
        assert err <= bound, f"{case.equation}: d/d operand {k}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("tile", [None, 1, 3])
@pytest.mark.parametrize("equation, shapes", FIXED_NETWORKS)
def test_backward_fixed_networks(inline_engine, engine, equation, shapes, tile, rng):
    ops = [rng.uniform(0.5, 1.5, s) for s in shapes]
    wrt = list(range(len(ops)))[::-1]  # results follow wrt's order
    with on_engine(engine, inline_engine):
        check_forward_backward_against_torch(equation, ops, wrt, tile, rng)


@pytest.fixture
def reorder_every_intermediate(monkeypatch):
    """Plans built inside the test reorder intermediates at any size (normally only large ones),
    and GEMM calls cost nothing, so that copies decide (the TT and Tucker networks get reordered)."""
    import importlib
    from lotus_rt.kernels import gemm_layout
    from lotus_rt.tn import layouts
    plan = importlib.import_module("lotus_rt.tn.plan")  # lotus_rt.tn.plan is also a function's name
    monkeypatch.setattr(layouts, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(gemm_layout, "BYTES_PER_GEMM", 0)
    plan.PLANS.clear()
    gemm_layout._cache.clear()
    yield
    plan.PLANS.clear()
    gemm_layout._cache.clear()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("equation, shapes", FIXED_NETWORKS + [
    ("zabcd,xaiy,ybjw,wckv,vdlu->zijkl", [(6, 2, 3, 2, 3), (1, 2, 3, 2), (2, 3, 2, 3), (3, 2, 4, 2), (2, 3, 2, 1)]),
])
def test_reordered_intermediates_give_the_same_results(inline_engine, engine, equation, shapes, rng,
                                                       reorder_every_intermediate):
    ops = [rng.uniform(0.5, 1.5, s) for s in shapes]
    with on_engine(engine, inline_engine):
        check_forward_backward_against_torch(equation, ops, list(range(len(ops))), 2, rng)


@pytest.mark.parametrize("engine", ENGINES)
def test_backward_through_a_diagonal_is_not_implemented(inline_engine, engine, rng):
    a, b = rng.uniform(0.5, 1.5, (4, 4)), rng.uniform(0.5, 1.5, (4, 3))
    with on_engine(engine, inline_engine) as runtime:
        # gradients that do not go through the diagonal work
        out, saved = tn.forward("ii,ij->j", a, b)
        (db,) = tn.backward(saved, np.ones(3), wrt=[1])
        np.testing.assert_allclose(db, np.outer(np.diag(a), np.ones(3)), rtol=1e-12)
        out, saved = tn.forward("ii,ij->j", a, b)
        with pytest.raises(NotImplementedError, match=r"diagonal.*ii->i|ii->i.*diagonal"):
            tn.backward(saved, np.ones(3), wrt=[0, 1])
        out, saved = tn.forward("ii->i", a)
        with pytest.raises(NotImplementedError, match="diagonal"):
            tn.backward(saved, np.ones(4), wrt=[0])
        runtime.wait()  # nothing left failing behind
        np.testing.assert_allclose(tn.einsum("ii,ij->j", a, b, tile=1), np.einsum("ii,ij->j", a, b), rtol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_backward_through_a_diagonal_fails_before_submitting(inline_engine, engine, rng):
    """Like every other unsupported request, it is refused before any task is submitted."""
    a, b = rng.uniform(0.5, 1.5, (4, 4)), rng.uniform(0.5, 1.5, (4, 3))
    with on_engine(engine, inline_engine) as runtime:
        out, saved = tn.forward("ii,ij->j", a, b)
        runtime.stats(reset=True)
        with pytest.raises(NotImplementedError, match="diagonal"):
            tn.backward(saved, np.ones(3), wrt=[0])
        ran = ntasks(runtime)
    assert ran == 0, f"{ran} backward task(s) ran before the NotImplementedError"


def test_tiled_tasks_run_on_several_workers(rng):
    runtime = starpu_runtime_or_skip()
    cpu_workers = [w for kind, w in runtime.workers if kind == "cpu"]
    if len(cpu_workers) < 2:
        pytest.skip(f"the runtime has {len(cpu_workers)} CPU worker(s); this needs >= 2")
    x, w = rng.random((512, 256)), rng.random((256, 256))
    lotus_rt.trace(clear=True)
    lotus_rt.stats(reset=True)
    busy = set()
    for _ in range(3):  # 8 tasks of ~1 ms each: a second worker takes some, normally at once
        out = lotus_rt.einsum("bi,ij->bj", x, w, tile=64)
        busy |= {s.worker for s in lotus_rt.stats() if s.tasks > 0}
        if len(busy) >= 2:
            break
    np.testing.assert_allclose(out, x @ w, rtol=1e-12)
    assert len(busy) >= 2, f"every task ran on {busy}: {lotus_rt.stats()}"
    names = [r.name for r in lotus_rt.trace()]
    assert {f"pair0[{t}]" for t in range(8)} <= set(names), names[:20]
    assert {r.worker for r in lotus_rt.trace() if r.name.startswith("pair0[")} == busy


@pytest.mark.parametrize("engine", ENGINES)
def test_codelet_failure_in_a_contraction(inline_engine, engine, rng, monkeypatch):
    """A failing pair body (injected on one tile) surfaces as CodeletError; the runtime goes on."""
    real = lower.PAIR.cpu

    def failing_on_tile_3(a, b, out, **kwargs):
        if kwargs.get("a_slice") == (0, 6, 8):
            raise ZeroDivisionError("injected failure on rows 6:8")
        return real(a, b, out, **kwargs)

    x, w = rng.random((8, 4)), rng.random((4, 3))
    with on_engine(engine, inline_engine) as runtime:
        monkeypatch.setattr(lower.PAIR, "cpu", failing_on_tile_3)
        with pytest.raises(lotus_rt.CodeletError) as info:
            tn.einsum("bi,ij->bj", x, w, tile=2)
        err = info.value
        assert err.codelet == "contract_pair" and err.task == "pair0[3]"
        assert isinstance(err.__cause__, ZeroDivisionError) and "rows 6:8" in str(err)
        # the same through forward/backward: the failing task is in the backward this time
        monkeypatch.setattr(lower.PAIR, "cpu", real)
        out, saved = tn.forward("bi,ij->bj", x, w, tile=2)
        monkeypatch.setattr(lower.PAIR, "cpu", failing_on_tile_3)
        with pytest.raises(lotus_rt.CodeletError):
            tn.backward(saved, np.ones((8, 3)), wrt=[1])
        with pytest.raises(RuntimeError, match="already released"):
            tn.backward(saved, np.ones((8, 3)), wrt=[1])
        monkeypatch.setattr(lower.PAIR, "cpu", real)
        runtime.wait()  # no failure left behind
        np.testing.assert_allclose(tn.einsum("bi,ij->bj", x, w, tile=2), x @ w, rtol=1e-12)
        out, saved = tn.forward("bi,ij->bj", x, w, tile=2)
        (dw,) = tn.backward(saved, np.ones((8, 3)), wrt=[1])
        np.testing.assert_allclose(dw, x.T @ np.ones((8, 3)), rtol=1e-12)
