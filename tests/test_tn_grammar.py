"""The einsum grammar (lotus_rt/tn/grammar.py): what numpy.einsum and opt_einsum.contract accept
gives their answer, in numpy's dtype, on both engines; malformed input is one error, naming the
operand and the index, before any task runs; opt_einsum's ``optimize=`` forms and
``contract_expression`` (one plan, reused through the plan cache).
"""
from __future__ import annotations

import math

import numpy as np
import opt_einsum
import pytest
from hypothesis import HealthCheck, event, given, settings

import lotus_rt
from lotus_rt import tn
from lotus_rt.tn import grammar
from tn_cases import ENGINES, assert_nothing_ran, grammar_cases, on_engine, quiet_runtime, reference_check

torch = pytest.importorskip("torch")


# ----------------------------------------------------------------------------- property test

GRAMMAR_PROPERTY = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("engine", ENGINES)
@GRAMMAR_PROPERTY
@given(case=grammar_cases())
def test_random_grammar_matches_numpy(inline_engine, engine, case):
    """Random equations (repeated indices, hyperedges, scalars, ellipsis, size-1 broadcasting,
    implicit outputs, non-ASCII letters, the sublist form, mixed dtypes) against numpy.einsum."""
    for tag in case.tags:
        event(tag)
    with on_engine(engine, inline_engine):
        out = tn.einsum(*case.args)
    reference_check(out, case)


# ----------------------------------------------------------------------------- malformed input

def _malformed():
    """(equation, operand shapes or operands, exception, pattern): every message names the
    operand and/or the index at fault."""
    x, y = (3, 4), (4, 5)
    return [
        ("ij,jk->ik->i", [x, y], ValueError, r"'->'"),
        ("ij-jk", [x, y], ValueError, r"'->'"),
        ("ij,jk>ik", [x, y], ValueError, r"'->'"),
        ("ij,j1->i", [x, y], ValueError, r"operand 1 'j1'.*'1'"),
        ("ij,jk->i_", [x, y], ValueError, r"output 'i_'.*'_'"),
        ("i.j,jk->ik", [x, y], ValueError, r"operand 0 'i\.j'.*'\.'"),
        ("...i...,jk->ik", [x, y], ValueError, r"operand 0.*single '\.\.\.'"),
        ("ij,jk,kl->il", [x, y], ValueError, r"3 operand term.*2 operand"),
        ("ij->ij", [x, y], ValueError, r"1 operand term.*2 operand"),
        ("ijk,jk->i", [x, y], ValueError, r"operand 0 has 2 dimension.*'ijk' names 3"),
        ("i,jk->ik", [x, y], ValueError, r"operand 0 has 2 dimension.*'i' names 1.*'\.\.\.'"),
        ("ij...k,jk->i", [x, y], ValueError, r"operand 0 has 2 dimension.*names 3 besides '\.\.\.'"),
        ("ij,jk->ikk", [x, y], ValueError, r"output index 'k' is repeated"),
        ("ij,jk->iz", [x, y], ValueError, r"output index 'z' is in no operand"),
        ("ij,jk->ik", [x, (5, 5)], ValueError, r"index 'j' has size 4 in operand 0 and 5 in operand 1"),
        ("αβ,βγ->αγ", [x, (5, 5)], ValueError, r"index 'β' has size 4 in operand 0 and 5 in operand 1"),
        ("ii->i", [(1, 3)], ValueError, r"operand 0 repeats index 'i' with sizes 1 and 3"),
        ("...i,...i", [(2, 3), (4, 3)], ValueError, r"dimension -1 of '\.\.\.' has size 2 in operand 0 and 4"),
        ("ij,jk->ik", [x, np.ones(y, np.complex64)], TypeError, r"operand 1 is complex64"),
        ("ij,jk->ik", [np.array([["a"] * 4] * 3), y], TypeError, r"operand 0 has dtype <U1"),
        ("ij,jk->ik", [np.ones(x, np.longdouble), y], TypeError, r"operand 0 has dtype float128"),
        ("ij,jk->ik", [x, {"not": "an array"}], TypeError, r"operand 1 is a dict"),
        ("ij,jk->ik", [x, [[1, 2], [3]]], TypeError, r"operand 1 cannot be made an array"),
        (42, [x], TypeError, r"sublist of operand 0 must be a list"),
        ("".join(chr(0x3b1 + k) for k in range(27)) + "," + "".join(chr(0x3b1 + k) for k in range(26, 53)),
         [(1,) * 27, (1,) * 27], ValueError, r"53 distinct indices.*more than the 52"),
    ]


MALFORMED = _malformed()


@pytest.mark.parametrize("index", range(len(MALFORMED)), ids=[str(m[0])[:24] for m in MALFORMED])
def test_malformed_equations_fail_before_any_task(index):
    equation, operands, exc_type, pattern = MALFORMED[index]
    ops = [np.ones(o) if isinstance(o, tuple) else o for o in operands]
    runtime = quiet_runtime()
    with pytest.raises(exc_type, match=pattern):
        lotus_rt.einsum(equation, *ops)
    assert_nothing_ran(runtime)


@pytest.mark.parametrize("call, exc_type, pattern", [
    (lambda a, b: tn.einsum(a, [0, -1], b, [1, 2]), TypeError, r"sublist of operand 0.*-1"),
    (lambda a, b: tn.einsum(a, [0, 1.5], b, [1, 2]), TypeError, r"sublist of operand 0.*1\.5"),
    (lambda a, b: tn.einsum(a, "ij", b, [1, 2]), TypeError, r"sublist of operand 0 must be a list"),
    (lambda a, b: tn.einsum(a, [0, 1], b, [1, 2], [0, "k"]), TypeError, r"output sublist.*'k'"),
    (lambda a, b: tn.einsum([0, 1], a), TypeError, r"looks like a sublist"),
    (lambda a, b: tn.einsum(a), TypeError, r"got a ndarray and nothing else"),
    (lambda a, b: tn.einsum(b"ij", a), TypeError, r"str, not bytes"),
    (lambda a, b: tn.einsum("ij,jk", a, b, optimize="bogus"), ValueError, r"bogus.*valid.*greedy"),
    (lambda a, b: tn.einsum("ij,jk", a, b, optimize=3), TypeError, r"optimize=3"),
    (lambda a, b: tn.einsum("ij,jk", a, b, optimize=[(0, 2)]), ValueError, r"path entry 0 \(0, 2\).*2 operand"),
    (lambda a, b: tn.einsum("ij,jk", a, b, optimize=[(0, 0)]), ValueError, r"path entry 0 \(0, 0\)"),
    (lambda a, b: tn.einsum("ij,jk", a, b, optimize=[]), ValueError, r"leaves 2 operands"),
    (lambda a, b: tn.einsum("ij,jk", a, b, optimize=[("a", 1)]), TypeError, r"path entry 0"),
    (lambda a, b: tn.contract_expression("ij,jk", (3, 4), (5, 5)), ValueError, r"index 'j' has size 4"),
    (lambda a, b: tn.contract_expression("ij,jk", (3, 4), "45"), TypeError, r"shape 1"),
    (lambda a, b: tn.contract_expression("ij,jk", (3, 4), (4, 5))(a, a), ValueError,
     r"operand 1 has shape \(3, 4\).*\(4, 5\)"),
    (lambda a, b: tn.contract_expression("ij,jk", (3, 4), (4, 5))(a), ValueError, r"takes 2 operand"),
    (lambda a, b: tn.einsum("ij,jk", torch.ones(3, 4), np.ones((4, 5))), TypeError, r"mix torch.*operand 1"),
])
def test_malformed_calls_fail_before_any_task(call, exc_type, pattern):
    a, b = np.ones((3, 4)), np.ones((4, 5))
    runtime = quiet_runtime()
    with pytest.raises(exc_type, match=pattern):
        call(a, b)
    assert_nothing_ran(runtime)


def test_backward_refusals_fail_before_any_task():
    _, saved = tn.forward("ij,j->i", np.ones((3, 4)), np.arange(4))
    _, saved16 = tn.forward("ij,j->i", np.ones((3, 4), np.float16), np.ones(4, np.float16))
    runtime = quiet_runtime()
    with pytest.raises(TypeError, match=r"operand 1 is int64"):
        tn.backward(saved, np.ones(3), wrt=[1])
    with pytest.raises(TypeError, match=r"result is float16"):
        tn.backward(saved16, np.ones(3, np.float16), wrt=[0])
    saved.release()
    saved16.release()
    assert_nothing_ran(runtime)


# ----------------------------------------------------------------------------- fixed cases

@pytest.mark.parametrize("engine", ENGINES)
def test_non_ascii_single_operand_steps(inline_engine, engine, rng):
    """Traces, permutations and sums on non-ASCII letters: once CodeletError (numpy.einsum inside
    the task takes ASCII only), now mapped to ASCII at parse time."""
    a = rng.uniform(0.5, 1.5, (3, 3, 4))
    cases = [("ααβ->β", "aab->b"), ("αβγ->γβα", "abc->cba"), ("αβγ", "abc"), ("ααγ", "aac"), ("αβγ->", "abc->"),
             ("ααβ,β->α", "aab,b->a")]
    with on_engine(engine, inline_engine) as runtime:
        for eq, ascii_eq in cases:
            ops = [a] + ([a[0, 0]] if "," in eq else [])
            runtime.stats(reset=True)
            np.testing.assert_allclose(tn.einsum(eq, *ops), np.einsum(ascii_eq, *ops), rtol=1e-12)
            assert sum(s.tasks for s in runtime.stats()) >= 1


@pytest.mark.parametrize("engine", ENGINES)
def test_result_dtypes_follow_numpy(inline_engine, engine):
    """numpy's result dtype (Python numbers are 0-d arrays of the default types, as in
    numpy.einsum); integer results exact and wrapped like numpy's integer arithmetic."""
    i8 = np.full(300, 1, np.int8)
    cases = [
        ("i,i->", (np.arange(5, dtype=np.float32), np.arange(5.0))),
        (",i->i", (2.0, np.ones(3, np.float32))),
        (",i->i", (2, np.ones(3, np.float32))),
        (",i->i", (np.float32(2), np.ones(3, np.float32))),
        (",i->i", (2, np.arange(3, dtype=np.int8))),
        ("i->", (i8,)),                                       # 300 wraps to 44 in int8, as in numpy
        ("i,i->", (np.arange(4, dtype=np.uint8), np.arange(4, dtype=np.int8))),
        ("i,i->", (np.ones(300, bool), np.ones(300, bool))),   # bool: any product true
        ("i,i->i", (np.array([True, False]), np.array([2.5, 3.0]))),
        ("ij,jk", (np.arange(6, dtype=np.uint16).reshape(2, 3), np.arange(3, dtype=np.uint32)[:, None])),
        ("i,i->", (np.linspace(0, 1, 7, dtype=np.float16), np.ones(7, np.float16))),
        ("ij,j", (np.arange(6).reshape(2, 3), [1, 2, 3])),     # a list is an operand too
    ]
    with on_engine(engine, inline_engine):
        for eq, ops in cases:
            out, ref = tn.einsum(eq, *ops), np.einsum(eq, *ops)
            assert out.dtype == ref.dtype and out.shape == np.shape(ref), (eq, out.dtype, np.asarray(ref).dtype)
            if ref.dtype.kind in "biu":
                np.testing.assert_array_equal(out, ref)
            else:
                np.testing.assert_allclose(out, ref, rtol=1e-3 if ref.dtype == np.float16 else 1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_zero_size_dimensions(inline_engine, engine):
    cases = [("ij,jk->ik", [(0, 3), (3, 2)]), ("ij,jk->ik", [(2, 0), (0, 2)]), ("ij->", [(0, 3)]),
             ("ab,ab->ab", [(0, 4), (1, 4)]), ("i,i", [(0,), (0,)])]
    with on_engine(engine, inline_engine) as runtime:
        for eq, shapes in cases:
            ops = [np.ones(s, np.float32) for s in shapes]
            runtime.stats(reset=True)
            out, ref = tn.einsum(eq, *ops), np.einsum(eq, *ops)
            assert out.shape == ref.shape and out.dtype == ref.dtype
            np.testing.assert_array_equal(out, ref)
            assert sum(s.tasks for s in runtime.stats()) == 0  # nothing to compute: no task
        assert tn.plan("ij,jk->ik", np.ones((0, 3)), np.ones((3, 2))) is None


def test_sublist_form_matches_numpy_and_opt_einsum(rng):
    a, b, c = rng.random((2, 3)), rng.random((3, 4)), rng.random((5, 2, 3))
    np.testing.assert_allclose(tn.einsum(a, [0, 1], b, [1, 2]), np.einsum(a, [0, 1], b, [1, 2]), rtol=1e-12)
    np.testing.assert_allclose(tn.einsum(a, [0, 1], b, [1, 2], [2, 0]), (a @ b).T, rtol=1e-12)
    np.testing.assert_allclose(tn.einsum(c, [..., 1], b, [1, 2], [2, ...]),
                               np.einsum(c, [..., 1], b, [1, 2], [2, ...]), rtol=1e-12)
    # numpy's order A..Z, a..z: an implicit output sorts int subscripts as numpy sorts them
    np.testing.assert_allclose(tn.einsum(a, [30, 3]), np.einsum(a, [30, 3]), rtol=1e-12)
    # ints from 52 on (opt_einsum takes them, numpy stops at 52)
    np.testing.assert_allclose(tn.einsum(a, [60, 100], b, [100, 7]),
                               opt_einsum.contract(a, [60, 100], b, [100, 7]), rtol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_every_optimize_form_of_opt_einsum(inline_engine, engine, rng):
    eq = "ij,jk,kl,lm->im"
    ops = [rng.random(s) for s in [(3, 4), (4, 50), (50, 2), (2, 6)]]
    ref = np.einsum(eq, *ops)
    explicit = [(1, 2), (0, 2), (0, 1)]
    forms = ["auto", "greedy", "optimal", "dp", "branch-2", "random-greedy", True, False, explicit,
             opt_einsum.contract_path(eq, *ops), opt_einsum.contract_path(eq, *ops, optimize="optimal")[0],
             np.einsum_path(eq, *ops, optimize="greedy")[0], opt_einsum.RandomGreedy(max_repeats=4)]
    with on_engine(engine, inline_engine):
        for form in forms:
            np.testing.assert_allclose(tn.einsum(eq, *ops, optimize=form), ref, rtol=1e-12)
    plan = tn.plan(eq, *ops, optimize=explicit)
    pairs = [s for s in plan.steps if s.kind == "pair"]
    assert pairs[0].inputs == (1, 2), "the explicit path's first step contracts operands 1 and 2"
    assert plan.optimizer == ("path", tuple(explicit))
    assert tn.plan(eq, *ops, optimize=list(map(list, explicit))) is plan  # the same key, hashable form


@pytest.mark.parametrize("engine", ENGINES)
def test_contract_expression_reuses_one_plan(inline_engine, engine, rng):
    shapes = [(6, 4), (4, 5), (5,)]
    ops = [rng.random(s) for s in shapes]
    with on_engine(engine, inline_engine) as runtime:
        expr = tn.contract_expression("ij,jk,k", *shapes, optimize="greedy")
        runtime.stats(reset=True)
        for _ in range(3):
            np.testing.assert_allclose(expr(*ops), np.einsum("ij,jk,k", *ops), rtol=1e-12)
        plans = runtime.stats().caches["plans"]
        assert plans.hits >= 3 and plans.misses == 0, plans  # built at construction, found by every call
        out = expr(*[torch.from_numpy(o.astype(np.float32)) for o in ops])  # another dtype: one more plan
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        expr(*[o.astype(np.float32) for o in ops])
        plans = runtime.stats().caches["plans"]
        assert plans.misses == 1 and plans.hits >= 4, plans
    assert "ij,jk,k" in repr(expr)
    assert isinstance(lotus_rt.contract_expression("ij,jk,k", *shapes), tn.ContractExpression)


@pytest.mark.parametrize("engine", ENGINES)
def test_backward_through_broadcasting_and_casts(inline_engine, engine, rng):
    """Gradients come back in each operand's own shape and dtype: a size-1 broadcast axis gets
    the sum along it, a float32 operand of a float64 einsum a float32 gradient."""
    a = rng.uniform(0.5, 1.5, (1, 4))
    b = rng.uniform(0.5, 1.5, (5, 3, 4)).astype(np.float32)
    c = rng.uniform(0.5, 1.5, (4,))
    eq = "...j,nij,j->...in"
    with on_engine(engine, inline_engine):
        out, saved = tn.forward(eq, a, b, c)
        grad_out = rng.uniform(-1, 1, out.shape)
        ga, gb, gc = tn.backward(saved, grad_out, wrt=[0, 1, 2])
    leaves = [torch.tensor(x.astype(np.float64), requires_grad=True) for x in (a, b, c)]
    ref = torch.einsum("zj,nij,j->zin", *leaves)
    ref.backward(torch.from_numpy(grad_out))
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-6)
    for grad, leaf, original in zip((ga, gb, gc), leaves, (a, b, c)):
        assert grad.shape == original.shape and grad.dtype == original.dtype
        np.testing.assert_allclose(grad, leaf.grad.numpy(), rtol=1e-5)


def test_canonical_form_is_ascii_and_cached_with_the_plan():
    canon = grammar.canonicalize("...αβ,βγ", [(2, 3, 4), (1, 5)], [np.float32, np.float64])
    lhs, out = canon.equation.split("->")
    assert canon.equation.isascii() and "." not in canon.equation
    beta = lhs.split(",")[0][-1]
    assert lhs.split(",")[1] == out[-1] and beta not in out  # β: size 4 against 1, squeezed out of operand 1
    assert canon.squeeze == ((), (0,)) and canon.shapes == ((2, 3, 4), (5,))
    assert canon.out_shape == (2, 3, 5) and canon.result_dtype == np.float64 and canon.compute_dtype == np.float64
    a, b = np.ones((2, 3, 4), np.float32), np.ones((1, 5))
    runtime = lotus_rt.runtime()
    runtime.stats(reset=True)
    p1 = tn.plan("...αβ,βγ", a, b)
    p2 = tn.plan("...αβ,βγ", a, b)
    assert p1 is p2 and p1.network.equation == canon.equation
    assert runtime.stats().caches["plans"] == (1, 1)
    assert math.prod(canon.out_shape) == np.einsum("...ab,bc", a, b).size
