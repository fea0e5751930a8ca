"""Tensor-network einsum: forward and backward against NumPy/torch, on both engines; plans; bad input.

Engines. ``lotus_rt.tn`` always runs on the process-wide ``runtime()``; the inline variants
point ``lotus_rt.tn.runtime`` (the name ``tn`` looks the runtime up by) at one private inline
runtime for the duration of a call, and every such test checks that the inline runtime really
ran the tasks (so a refactoring that makes the redirection ineffective fails loudly instead of
testing StarPU twice).

Networks are drawn by hypothesis (derandomized, no example database): TT chains, Tucker, CP and
generic random graphs (shared, batch/Hadamard and privately summed indices, a repeated operand
passed as the same object, a diagonal in forward-only cases). Reference values are computed in
float64 by numpy.einsum; the error bound is ``rtol * sqrt(K) * max(einsum of |operands|)``
where K is the number of summed terms per output element.
"""
from __future__ import annotations

import contextlib
import math
import types
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lotus_rt
from lotus_rt import tn
from lotus_rt.runtime.settings import Settings
from lotus_rt.tn import lower
from conftest import starpu_runtime_or_skip

torch = pytest.importorskip("torch")

ENGINES = ("starpu", "inline")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PLAN_PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def inline_engine():
    """One private inline runtime for the module (module scope: usable under hypothesis)."""
    runtime = lotus_rt.Runtime(Settings(engine="inline"))
    yield runtime
    runtime.shutdown()


@contextlib.contextmanager
def on_engine(engine: str, inline_runtime):
    """Run ``tn`` calls inside the block on ``engine``; yields that runtime.

    On exit (inline) checks that ``tn`` really looked its runtime up through the redirection.
    """
    if engine == "starpu":
        runtime = starpu_runtime_or_skip()
        yield runtime
        return
    lookups = []

    def the_inline_runtime():
        lookups.append(1)
        return inline_runtime

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tn, "runtime", the_inline_runtime)
        yield inline_runtime
    assert lookups, "lotus_rt.tn never asked for its runtime: redirecting it to the inline one no longer works"


def _ntasks(runtime) -> int:
    return sum(s.tasks for s in runtime.stats())


def test_inline_redirection_runs_on_the_inline_runtime(inline_engine):
    starpu = lotus_rt.runtime()
    a, b = np.ones((3, 4)), np.ones((4, 2))
    starpu_before = _ntasks(starpu)
    with on_engine("inline", inline_engine):
        inline_engine.trace(clear=True)
        out = tn.einsum("ij,jk->ik", a, b, tile=1)
        names = [r.name for r in inline_engine.trace()]
    np.testing.assert_array_equal(out, np.full((3, 2), 4.0))
    assert names == ["pair0[0]", "pair0[1]", "pair0[2]"]
    assert _ntasks(starpu) == starpu_before


# ---------------------------------------------------------------------- network strategies


class Case(NamedTuple):
    equation: str
    shapes: tuple[tuple[int, ...], ...]
    same_as: dict  # operand position -> earlier position whose array object it reuses
    diagonal: bool  # an index repeated inside one operand (forward only)
    full_output: bool  # every index kept (no private sums): for flop comparisons


def _case(terms, output, sizes, same_as=None, diagonal=False, full_output=False) -> Case:
    terms = ["".join(t) for t in terms]
    return Case(",".join(terms) + "->" + "".join(output),
                tuple(tuple(sizes[i] for i in t) for t in terms), dict(same_as or {}), diagonal, full_output)


@st.composite
def tt_chains(draw, full_output=False):
    """z a0 r1, r1 a1 r2, ..., r(n-1) a(n-1): a batch index on the first core."""
    n = draw(st.integers(2, 6))
    letters = iter(LETTERS)
    z = next(letters)
    phys = [next(letters) for _ in range(n)]
    bonds = [next(letters) for _ in range(n - 1)]
    phys_max = {2: 7, 3: 7, 4: 5, 5: 4, 6: 3}[n]
    sizes = {z: draw(st.integers(1, 7))}
    sizes.update({p: draw(st.integers(1, phys_max)) for p in phys})
    sizes.update({r: draw(st.integers(1, 7)) for r in bonds})
    terms = []
    for k in range(n):
        term = ([z] if k == 0 else []) + ([bonds[k - 1]] if k else []) + [phys[k]] \
            + ([bonds[k]] if k < n - 1 else [])
        if draw(st.booleans()):
            term = draw(st.permutations(term))
        terms.append(term)
    output = [z] + phys
    if not full_output:
        dropped = draw(st.sets(st.sampled_from(phys), max_size=n - 1))
        output = [i for i in output if i not in dropped]
    if draw(st.booleans()):
        output = draw(st.permutations(output))
    return _case(terms, output, sizes, full_output=len(output) == n + 1)


@st.composite
def tuckers(draw, full_output=False):
    """A core (optionally with a batch index) times factor matrices on a random subset of modes."""
    m = draw(st.integers(2, 4))
    modes = list(LETTERS[:m])
    new = list(LETTERS[10:10 + m])
    batch = [] if full_output or not draw(st.booleans()) else ["z"]
    sizes = {i: draw(st.integers(1, 7 if m < 4 else 5)) for i in modes + new + ["z"]}
    factored = draw(st.lists(st.sampled_from(range(m)), min_size=1, max_size=m, unique=True))
    core = batch + modes
    if draw(st.booleans()):
        core = draw(st.permutations(core))
    terms = [core]
    for k in factored:
        terms.append([new[k], modes[k]] if draw(st.booleans()) else [modes[k], new[k]])
    output = batch + [new[k] if k in factored else modes[k] for k in range(m)]
    if draw(st.booleans()):
        output = draw(st.permutations(output))
    return _case(terms, output, sizes, full_output=True)


@st.composite
def cps(draw):
    """ir,jr,kr->ijk, optionally with a batch index on the first factor and a weight vector."""
    m = draw(st.integers(2, 4))
    modes = list(LETTERS[:m])
    sizes = {i: draw(st.integers(1, 7 if m < 4 else 5)) for i in modes + ["r", "z"]}
    batch = ["z"] if draw(st.booleans()) else []
    terms = [batch + [modes[0], "r"]] + [[i, "r"] for i in modes[1:]]
    if draw(st.booleans()):
        terms.insert(draw(st.integers(0, len(terms))), ["r"])
    output = batch + modes
    if draw(st.booleans()):
        output = draw(st.permutations(output))
    return _case(terms, output, sizes)


@st.composite
def random_graphs(draw, allow_diagonal=True):
    """2-5 operands over up to 6 shared letters; random output; repeated operand; diagonal."""
    nops = draw(st.integers(2, 5))
    pool = list(LETTERS[:draw(st.integers(1, 6))])
    sizes = {i: draw(st.integers(1, 5)) for i in pool}
    terms = [draw(st.lists(st.sampled_from(pool), min_size=0 if k else 1, max_size=4, unique=True))
             for k in range(nops)]
    same_as = {}
    if draw(st.booleans()):  # pass one array object twice
        j = draw(st.integers(1, nops - 1))
        i = draw(st.integers(0, j - 1))
        terms[j] = list(terms[i])
        same_as[j] = i
    if draw(st.booleans()):  # a batch/Hadamard index: in every operand and in the output
        b = draw(st.sampled_from(pool))
        terms = [t if b in t else t + [b] for t in terms]
        forced = [b]
    else:
        forced = []
    used = sorted({i for t in terms for i in t})
    output = draw(st.lists(st.sampled_from(used), max_size=len(used), unique=True))
    output = forced + [i for i in output if i not in forced]
    if draw(st.booleans()):
        output = draw(st.permutations(output))
    diagonal = False
    if allow_diagonal and draw(st.booleans()):
        candidates = [k for k, t in enumerate(terms)
                      if t and k not in same_as and k not in same_as.values()]
        if candidates:
            k = draw(st.sampled_from(candidates))
            letter = draw(st.sampled_from(terms[k]))
            terms[k] = list(terms[k])
            terms[k].insert(draw(st.integers(0, len(terms[k]))), letter)
            diagonal = True
    return _case(terms, output, sizes, same_as, diagonal)


FAMILIES = {
    "tt": tt_chains(),
    "tucker": tuckers(),
    "cp": cps(),
    "graph": random_graphs(),
}
GRAD_FAMILIES = {
    "tt": tt_chains(),
    "tucker": tuckers(),
    "cp": cps(),
    "graph": random_graphs(allow_diagonal=False),
}
DTYPES = st.sampled_from([np.float32, np.float64])
TILES = st.sampled_from([None, 1, 2, 3, 64])  # 64 >= every drawn size: same as untiled
SEEDS = st.integers(0, 2**32 - 1)


def make_operands(case: Case, dtype, seed: int) -> list[np.ndarray]:
    """Random operands bounded away from zero; a repeated operand is the same object."""
    rng = np.random.default_rng(seed)
    ops = []
    for k, shape in enumerate(case.shapes):
        if k in case.same_as:
            ops.append(ops[case.same_as[k]])
        else:
            values = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
            ops.append(np.asarray(values, dtype=dtype))
    return ops


def summed_terms(equation: str, shapes) -> int:
    """How many products one output element sums (1 when nothing is summed)."""
    lhs, output = equation.split("->")
    sizes = {i: d for term, shape in zip(lhs.split(","), shapes) for i, d in zip(term, shape)}
    return math.prod(d for i, d in sizes.items() if i not in output)


def assert_matches_numpy(out, equation: str, ops, dtype) -> None:
    ops64 = [np.asarray(o, dtype=np.float64) for o in ops]
    ref = np.einsum(equation, *ops64)
    scale = float(np.max(np.einsum(equation, *[np.abs(o) for o in ops64])))
    assert isinstance(out, np.ndarray), type(out)
    assert out.dtype == np.dtype(dtype) and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    bound = RTOL[np.dtype(dtype)] * math.sqrt(summed_terms(equation, [o.shape for o in ops])) * scale
    err = float(np.max(np.abs(out.astype(np.float64) - ref)))
    assert err <= bound, f"{equation}: max error {err:.3g} > bound {bound:.3g}"


# ---------------------------------------------------------------------- forward vs numpy


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


# ---------------------------------------------------------------------- backward vs torch


def torch_grads(equation, ops, grad_out, wrt):
    """torch.autograd through torch.einsum, one leaf per operand position."""
    leaves = [torch.tensor(np.array(o, dtype=np.float64), requires_grad=True) for o in ops]
    out = torch.einsum(equation, *leaves)
    out.backward(torch.from_numpy(np.array(grad_out, dtype=np.float64)))
    return out.detach().numpy(), [leaves[k].grad.numpy() for k in wrt]


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


FIXED_NETWORKS = [
    ("za,abc,cde,ef->zbdf", [(6, 3), (3, 4, 5), (5, 2, 3), (3, 4)]),           # TT
    ("abcd,ia,jb,kc,ld->ijkl", [(3, 4, 2, 3), (5, 3), (2, 4), (4, 2), (3, 3)]),  # Tucker
    ("ir,jr,kr->ijk", [(5, 4), (3, 4), (2, 4)]),                                 # CP
    ("bir,jr,kr->bijk", [(4, 3, 2), (5, 2), (3, 2)]),                            # CP with a batch
    ("bij,bjk->bik", [(5, 3, 4), (5, 4, 2)]),                                    # batch matmul
    ("ij,ij,jk->ik", [(4, 3), (4, 3), (3, 5)]),                                  # Hadamard
    ("ijk,j->i", [(5, 3, 4), (3,)]),                                             # private sum
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("tile", [None, 1, 3])
@pytest.mark.parametrize("equation, shapes", FIXED_NETWORKS)
def test_backward_fixed_networks(inline_engine, engine, equation, shapes, tile, rng):
    ops = [rng.uniform(0.5, 1.5, s) for s in shapes]
    wrt = list(range(len(ops)))[::-1]  # results follow wrt's order
    with on_engine(engine, inline_engine):
        _check_forward_backward_against_torch(equation, ops, wrt, tile, rng)


def _check_forward_backward_against_torch(equation, ops, wrt, tile, rng) -> None:
    out, saved = tn.forward(equation, *ops, tile=tile)
    grad_out = rng.uniform(-1, 1, out.shape)
    grads = tn.backward(saved, grad_out, wrt=wrt)
    ref_out, ref_grads = torch_grads(equation, ops, grad_out, wrt)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12)
    assert len(grads) == len(wrt)
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref, rtol=1e-10, atol=1e-12)


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
        _check_forward_backward_against_torch(equation, ops, list(range(len(ops))), 2, rng)


def test_tt_layer_plan_reorders_its_large_intermediate_to_avoid_copies():
    """TTLinear 1024->1024 at batch 256: the planner's natural order of the (batch, ...)
    intermediate would make its reader and their backward copy 8 MB operands; the chosen order
    lets every contraction that touches it run without copying it."""
    from lotus_rt.kernels import gemm_layout
    from lotus_rt.tn import layouts
    shapes = [(256, 4, 8, 8, 4), (1, 4, 4, 8), (8, 8, 8, 8), (8, 8, 8, 8), (8, 4, 4, 1)]
    plan = tn.plan_for("abcde,jbfk,kcgl,ldhm,mein->afghi", shapes, np.float32, tile=256)
    sizes = plan.network.sizes
    big = [n for n, idx in enumerate(plan.nodes) if n >= 5 and n != plan.output_node
           and math.prod(sizes[i] for i in idx) >= layouts.MIN_ELEMENTS]
    assert big
    for step in plan.steps:
        if step.kind != "pair" or not ({step.output, *step.inputs} & set(big)):
            continue
        (x, w), z = step.inputs, step.output
        for a, b, out in ((x, w, z), (z, w, x), (z, x, w)):  # forward, and both backward pairs
            idx = [plan.nodes[n] for n in (a, b, out)]
            arrays = [np.empty([sizes[i] for i in t], np.float32) for t in idx]
            layout = gemm_layout.find_layout(*idx, *(v for arr in arrays for v in (arr.shape, arr.strides)), item=4)
            p, q = (a, b) if layout.p_is_a else (b, a)
            for node, operand in ((p, layout.p), (q, layout.q)):
                assert node not in big or operand.copy is None, (idx, layout)


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
        ran = _ntasks(runtime)
    assert ran == 0, f"{ran} backward task(s) ran before the NotImplementedError"


# ---------------------------------------------------------------------- torch in, torch out


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


# ---------------------------------------------------------------------- several workers


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


# ---------------------------------------------------------------------- plans


def _fake_runtime(nworkers: int):
    """Just what planning reads from a runtime: its worker list and settings."""
    return types.SimpleNamespace(workers=[("cpu", f"CPU {k}") for k in range(nworkers)], settings=Settings())


def test_plan_cache_returns_the_same_plan(rng):
    a, b = rng.random((8, 5)), rng.random((5, 3))
    p = tn.plan("ij,jk->ik", a, b, optimize="greedy", tile=2)
    assert tn.plan("ij,jk->ik", a, b, optimize="greedy", tile=2) is p
    assert tn.plan("ij,jk->ik", rng.random((8, 5)), rng.random((5, 3)), optimize="greedy", tile=2) is p
    assert tn.plan("ij,jk->ik", torch.from_numpy(a), torch.from_numpy(b), optimize="greedy", tile=2) is p
    assert p.tile == 2 and p.ntiles == 4 and p.tile_index == "i"
    assert tn.plan("ij,jk->ik", a, b, optimize="greedy", tile=3) is not p
    assert tn.plan("ij,jk->ik", a, b, optimize="optimal", tile=2) is not p
    assert tn.plan("ij,jk->ik", a.astype(np.float32), b.astype(np.float32), optimize="greedy", tile=2) is not p
    assert tn.plan("ij,jk->ik", rng.random((9, 5)), b, optimize="greedy", tile=2) is not p


@PLAN_PROPERTY
@given(case=st.one_of(tt_chains(full_output=True), tuckers(full_output=True)))
def test_plan_flops_close_to_optimal(case):
    ops = [np.ones(s) for s in case.shapes]
    p = tn.plan(case.equation, *ops, optimize="optimal")
    assert p.optimal_flops is not None and p.optimal_flops > 0
    assert p.flops <= 1.05 * p.optimal_flops, (case.equation, case.shapes, p.flops, p.optimal_flops,
                                               [(s.spec, s.flops) for s in p.steps])


@pytest.mark.parametrize("nworkers", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("equation, shapes", [
    ("bi,ij->bj", [(512, 256), (256, 256)]),
    ("bi,ij->bj", [(10, 1448), (1448, 1448)]),  # few rows: the flop-based tile is too coarse
    ("bi,ij->bj", [(6, 2600), (2600, 2600)]),   # for 4 or 8 workers, finer tiles are needed
    ("bi,ij->bj", [(16, 2048), (2048, 2048)]),
    ("zab,bcd,def->zacef", [(1024, 8, 16), (16, 8, 16), (16, 8, 8)]),  # TT
])
def test_automatic_tiling_feeds_every_worker(equation, shapes, nworkers):
    ops = [np.ones(s) for s in shapes]
    p = tn.plan(equation, *ops, tile=None, rt=_fake_runtime(nworkers))
    from lotus_rt.tn.plan import MIN_TASK_FLOPS
    assert p.flops >= 2 * MIN_TASK_FLOPS  # large enough that the planner tiles it at all
    lead = equation.split("->")[1][0]
    size = p.network.sizes[lead]
    assert p.ntiles >= min(nworkers, size), \
        f"{equation} {shapes}: {p.ntiles} tile(s) of {p.tile} along {lead!r} (size {size}) for {nworkers} workers"


def test_automatic_tiling_with_this_runtime():
    runtime = starpu_runtime_or_skip()
    ops = [np.ones((512, 256)), np.ones((256, 256))]
    p = tn.plan("bi,ij->bj", *ops)
    assert p.ntiles >= len(runtime.workers)
    small = tn.plan("bi,ij->bj", np.ones((3, 4)), np.ones((4, 5)))
    assert small.ntiles == 1  # too small to be worth splitting


@PLAN_PROPERTY
@given(case=tt_chains(), tile=TILES, optimize=st.sampled_from(["auto", "greedy", "optimal"]))
def test_priorities_follow_the_critical_path(case, tile, optimize):
    ops = [np.ones(s) for s in case.shapes]
    p = tn.plan(case.equation, *ops, optimize=optimize, tile=tile)
    consumer = {node: step for step in p.steps for node in step.inputs}
    for step in p.steps:
        after = consumer.get(step.output)
        if after is not None:
            assert step.priority >= after.priority, (case.equation, [(s.inputs, s.priority) for s in p.steps])
    top = max(s.priority for s in p.steps)
    assert any(s.priority == top and all(i < len(ops) for i in s.inputs) for s in p.steps)


def test_tt_chain_first_steps_have_the_highest_priority():
    # a left-to-right chain (greedy contracts along the chain from the batch end)
    shapes = [(64, 4), (4, 6, 4), (4, 6, 4), (4, 6, 4), (4, 6)]
    eq = "za,abc,cde,efg,gh->zbdfh"
    p = tn.plan(eq, *[np.ones(s) for s in shapes], optimize="greedy")
    pairs = [s for s in p.steps if s.kind == "pair"]
    assert len(pairs) == 4
    prios = [s.priority for s in pairs]
    assert prios[0] == max(prios) and prios == sorted(prios, reverse=True), prios


# ---------------------------------------------------------------------- bad input


def _bad_calls():
    a, b = np.ones((3, 4)), np.ones((4, 5))
    ta, tb = torch.ones(3, 4, dtype=torch.float64), torch.ones(4, 5, dtype=torch.float64)
    sq = np.ones((3, 3))
    return {
        "shape mismatch": (lambda: tn.einsum("ij,jk->ik", a, np.ones((5, 5))), ValueError, r"index 'j'"),
        "no arrow": (lambda: tn.einsum("ij,jk", a, b), ValueError, "->"),
        "ellipsis": (lambda: tn.einsum("...j,jk->...k", a, b), ValueError, r"ellipsis"),
        "unknown optimizer": (lambda: tn.einsum("ij,jk->ik", a, b, optimize="bogus"), ValueError,
                              r"bogus.*valid.*greedy.*optimal"),
        "mixed dtypes": (lambda: tn.einsum("ij,jk->ik", a, b.astype(np.float32)), TypeError, r"float32.*float64"),
        "mixed torch numpy": (lambda: tn.einsum("ij,jk->ik", a, tb), TypeError, r"torch"),
        "mixed numpy torch": (lambda: tn.einsum("ij,jk->ik", ta, b), TypeError, r"torch"),
        "int dtype": (lambda: tn.einsum("ij,jk->ik", a.astype(int), b.astype(int)), TypeError, r"int64"),
        "int torch": (lambda: tn.einsum("ij,jk->ik", ta.long(), tb.long()), TypeError, r"int64"),
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


def _quiet_runtime():
    """The process-wide runtime (the one ``tn`` uses) with its counters cleared."""
    runtime = lotus_rt.runtime()
    runtime.wait()
    runtime.stats(reset=True)
    runtime.trace(clear=True)
    return runtime


def _assert_nothing_ran(runtime) -> None:
    runtime.wait()
    assert _ntasks(runtime) == 0 and runtime.trace() == [], runtime.trace()[:5]


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_input_fails_before_any_task(name):
    call, exc_type, pattern = _bad_calls()[name]
    runtime = _quiet_runtime()
    with pytest.raises(exc_type, match=pattern):
        call()
    _assert_nothing_ran(runtime)


def test_bad_tile_rejected_even_when_an_equal_plan_is_cached():
    """tile=True / tile=2.0 are refused; a cached plan for tile=1 / tile=2 must not let them in."""
    a, b = np.ones((6, 4)), np.ones((4, 5))
    runtime = _quiet_runtime()
    tn.einsum("ij,jk->ik", a, b, tile=1)
    tn.einsum("ij,jk->ik", a, b, tile=2)
    runtime.stats(reset=True)
    runtime.trace(clear=True)
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match="tile"):
            tn.einsum("ij,jk->ik", a, b, tile=bad)
    _assert_nothing_ran(runtime)


@pytest.mark.parametrize("name, value, message", [
    ("LOTUS_OPTIMIZE", "bogus", r"LOTUS_OPTIMIZE='bogus'.*valid.*greedy"),
    ("LOTUS_TILE", "abc", r"LOTUS_TILE='abc'"),
    ("LOTUS_TILE", "0", r"LOTUS_TILE='0'"),
])
def test_bad_environment_is_a_config_error(monkeypatch, name, value, message):
    """A bad value is refused when the runtime reads the environment (start or reconfigure),
    before anything runs; the settings in force stay as they were."""
    runtime = _quiet_runtime()
    before = runtime.settings
    monkeypatch.setenv(name, value)
    with pytest.raises(lotus_rt.ConfigError, match=message):
        runtime.reconfigure()
    assert runtime.settings == before
    _assert_nothing_ran(runtime)
    tn.einsum("ij,jk->ik", np.ones((3, 4)), np.ones((4, 5)))  # still the settings read at start
    monkeypatch.delenv(name)


def test_environment_settings_are_used(lotus_env):
    a, b = np.ones((6, 4)), np.ones((4, 5))
    lotus_env(LOTUS_TILE="2", LOTUS_OPTIMIZE="greedy")
    p = tn.plan("ij,jk->ik", a, b)
    assert (p.tile, p.ntiles, p.optimizer) == (2, 3, "greedy")
    assert tn.plan("ij,jk->ik", a, b, tile=3, optimize="optimal").tile == 3  # arguments win


def test_settings_are_read_once_not_per_call(monkeypatch):
    """The environment reaches the planner only through the runtime's settings: a variable set
    after the runtime read it changes nothing until reconfigure()."""
    a, b = np.ones((6, 4)), np.ones((4, 5))
    runtime = lotus_rt.runtime()
    monkeypatch.setenv("LOTUS_TILE", "2")
    assert runtime.settings.tile is None and tn.plan("ij,jk->ik", a, b).ntiles != 3
    runtime.reconfigure()
    try:
        assert runtime.settings.tile == 2 and tn.plan("ij,jk->ik", a, b).ntiles == 3
    finally:
        monkeypatch.delenv("LOTUS_TILE")
        runtime.reconfigure()
    assert runtime.settings.tile is None


def test_plan_cache_hits_and_misses_show_in_stats(rng):
    runtime = lotus_rt.runtime()
    a, b = rng.random((7, 5)), rng.random((5, 3))
    runtime.stats(reset=True)
    tn.plan("ij,jk->ik", a, b, optimize="greedy", tile=3)
    tn.plan("ij,jk->ik", a, b, optimize="greedy", tile=3)
    tn.plan("ij,jk->ik", a, b, optimize="greedy", tile=3)
    plans = lotus_rt.stats(reset=True).caches["plans"]
    assert plans.hits >= 2 and plans.misses <= 1 and plans.hits + plans.misses == 3
    assert lotus_rt.stats().caches["plans"] == (0, 0)


def test_bad_backward_calls(rng):
    runtime = _quiet_runtime()
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
    _assert_nothing_ran(runtime)
    # a refused call leaves the forward usable
    g = rng.uniform(-1, 1, (6, 5))
    da, db = tn.backward(saved, g, wrt=[0, 1])
    np.testing.assert_allclose(da, g @ b.T, rtol=1e-12)
    np.testing.assert_allclose(db, a.T @ g, rtol=1e-12)
    runtime.stats(reset=True)
    runtime.trace(clear=True)
    with pytest.raises(RuntimeError, match="already released"):
        tn.backward(saved, g, wrt=[0])
    _assert_nothing_ran(runtime)
    # release() also ends it
    out, saved = tn.forward("ij,jk->ik", a, b)
    saved.release()
    saved.release()  # idempotent
    with pytest.raises(RuntimeError, match="already released"):
        tn.backward(saved, g, wrt=[0])


# ---------------------------------------------------------------------- codelet failures


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


@pytest.mark.parametrize("a_idx, b_idx, out_idx", [
    ("ik", "kj", "ij"),          # plain GEMM
    ("ki", "kj", "ij"),          # a stored (contracted, free): transposed view
    ("ik", "jk", "ij"),          # b stored (free, contracted): transposed view
    ("ik", "kj", "ji"),          # output wanted as (free_b, free_a): product of the transposes
    ("rnpq", "rij", "rijnpq"),   # batched outer product written swapped (CP conv backward)
    ("bkmi", "bkj", "bjmi"),     # batch + swapped output with two free indices of a
    ("zab", "bca", "zc"),        # several contracted indices in another order: copies
    ("xyk", "kz", "zxy"),        # output permutation that is neither natural nor swapped
    ("os", "npqs", "nopq"),      # 1x1 conv: one GEMM per sample n, the weight broadcast
    ("nchw", "cr", "nrhw"),      # per-sample GEMM written swapped
    ("nopq", "os", "npqs"),      # per-sample GEMM reading a transposed view
    ("or", "rnpq", "nopq"),      # per-sample GEMM over a strided (non-contiguous) view
    ("bnik", "bkj", "bnji"),     # shared batch b, then one-sided n, then swapped output
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pair_kernel_layouts_match_numpy(a_idx, b_idx, out_idx, dtype, rng):
    from lotus_rt.kernels import contract
    sizes = dict(zip("abchijkmnopqrswxyz", rng.integers(2, 6, 18).tolist()))
    a = rng.standard_normal([sizes[i] for i in a_idx]).astype(dtype)
    b = rng.standard_normal([sizes[i] for i in b_idx]).astype(dtype)
    spec = contract.pair_spec(a_idx, b_idx, out_idx)
    out = np.empty([sizes[i] for i in out_idx], dtype)
    contract.pair_cpu(a, b, out, spec=spec)
    reference = np.einsum(f"{a_idx},{b_idx}->{out_idx}", a.astype(np.float64), b.astype(np.float64))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.allclose(out, reference, rtol=tol, atol=tol)


def _strided(rng, shape, dtype, kind):
    """A fresh random array of ``shape`` stored in an unusual way (``kind``), as kernels meet it."""
    if kind == "contiguous":
        return rng.standard_normal(shape).astype(dtype)
    if kind == "reversed":  # stored with its axes in reverse order (a transposed view)
        return np.ascontiguousarray(rng.standard_normal(shape[::-1]).astype(dtype).transpose())
    if kind == "reversed_view":
        return rng.standard_normal(shape[::-1]).astype(dtype).transpose()
    # "sliced": every other row of a taller array, as a batch tile reads a slab
    return rng.standard_normal((2 * shape[0],) + tuple(shape[1:])).astype(dtype)[::2]


@pytest.mark.parametrize("a_idx, b_idx, out_idx", [
    ("nopq", "npqs", "os"),      # weight gradient: samples summed after per-sample GEMMs
    ("nchw", "cr", "nrhw"),      # 1x1 conv on NCHW: per-sample GEMMs, no copy
    ("os", "npqs", "nopq"),
    ("rnpq", "rij", "rijnpq"),   # nothing contracted: an outer product
    ("ab", "b", "a"),            # matrix-vector
    ("a", "ab", "b"),            # vector-matrix
    ("ia", "ja", "ij"),
    ("zab", "bca", "zc"),
    ("xyk", "kz", "zxy"),
])
@pytest.mark.parametrize("kind", ["reversed_view", "sliced"])
def test_pair_kernel_strided_operands_match_numpy(a_idx, b_idx, out_idx, kind, rng):
    """The layout search works on the arrays' real strides: views that are neither contiguous
    nor transposed-contiguous still give einsum's result (a copy where a view cannot be BLAS'd)."""
    from lotus_rt.kernels import contract
    sizes = dict(zip("abchijkmnopqrswxyz", rng.integers(2, 6, 18).tolist()))
    a = _strided(rng, [sizes[i] for i in a_idx], np.float32, kind)
    b = _strided(rng, [sizes[i] for i in b_idx], np.float32, "contiguous")
    out = _strided(rng, [sizes[i] for i in out_idx], np.float32, kind)
    contract.pair_cpu(a, b, out, spec=contract.pair_spec(a_idx, b_idx, out_idx))
    reference = np.einsum(f"{a_idx},{b_idx}->{out_idx}", a.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation, copies", [
    ("nchw,cr->nrhw", False),    # the layers' 1x1 pieces on NCHW activations: per-sample GEMMs
    ("or,rnpq->nopq", False),
    ("nopq,or->rnpq", False),
    ("nopq,rnpq->or", False),    # weight gradient: sum over samples of per-sample GEMMs
    ("rijnpq,srij->npqs", False),  # the unfolded core convolution: one GEMM on transposed views
    ("nopq,npqs->os", False),
])
def test_layout_search_avoids_copies_on_layer_shapes(equation, copies):
    """At the benchmark's sizes the layers' contractions run on their C-contiguous operands
    without any copy (at tiny sizes a copy can be cheaper than many small GEMMs)."""
    from lotus_rt.kernels import gemm_layout
    (a_idx, b_idx), out_idx = equation.split("->")[0].split(","), equation.split("->")[1]
    sizes = dict(n=16, c=64, h=16, w=16, r=16, o=128, p=16, q=16, s=32, i=3, j=3)
    arrays = [np.empty([sizes[i] for i in idx], np.float32) for idx in (a_idx, b_idx, out_idx)]
    layout = gemm_layout.find_layout(a_idx, b_idx, out_idx, *(x for arr in arrays for x in (arr.shape, arr.strides)),
                                     item=4)
    assert (layout.p.copy is not None or layout.q.copy is not None or layout.out_view is None) == copies, layout
