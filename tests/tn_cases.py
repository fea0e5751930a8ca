"""What the tensor-network tests share: engines, network strategies, references.

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
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import lotus_rt
from lotus_rt import tn
from conftest import starpu_runtime_or_skip

torch = pytest.importorskip("torch")


ENGINES = ("starpu", "inline")


LETTERS = "abcdefghijklmnopqrstuvwxyz"


RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}


PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


PLAN_PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


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


def ntasks(runtime) -> int:
    return sum(s.tasks for s in runtime.stats())


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


def torch_grads(equation, ops, grad_out, wrt):
    """torch.autograd through torch.einsum, one leaf per operand position."""
    leaves = [torch.tensor(np.array(o, dtype=np.float64), requires_grad=True) for o in ops]
    out = torch.einsum(equation, *leaves)
    out.backward(torch.from_numpy(np.array(grad_out, dtype=np.float64)))
    return out.detach().numpy(), [leaves[k].grad.numpy() for k in wrt]


FIXED_NETWORKS = [
    ("za,abc,cde,ef->zbdf", [(6, 3), (3, 4, 5), (5, 2, 3), (3, 4)]),           # TT
    ("abcd,ia,jb,kc,ld->ijkl", [(3, 4, 2, 3), (5, 3), (2, 4), (4, 2), (3, 3)]),  # Tucker
    ("ir,jr,kr->ijk", [(5, 4), (3, 4), (2, 4)]),                                 # CP
    ("bir,jr,kr->bijk", [(4, 3, 2), (5, 2), (3, 2)]),                            # CP with a batch
    ("bij,bjk->bik", [(5, 3, 4), (5, 4, 2)]),                                    # batch matmul
    ("ij,ij,jk->ik", [(4, 3), (4, 3), (3, 5)]),                                  # Hadamard
    ("ijk,j->i", [(5, 3, 4), (3,)]),                                             # private sum
]


def check_forward_backward_against_torch(equation, ops, wrt, tile, rng) -> None:
    out, saved = tn.forward(equation, *ops, tile=tile)
    grad_out = rng.uniform(-1, 1, out.shape)
    grads = tn.backward(saved, grad_out, wrt=wrt)
    ref_out, ref_grads = torch_grads(equation, ops, grad_out, wrt)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12)
    assert len(grads) == len(wrt)
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref, rtol=1e-10, atol=1e-12)


def quiet_runtime():
    """The process-wide runtime (the one ``tn`` uses) with its counters cleared."""
    runtime = lotus_rt.runtime()
    runtime.wait()
    runtime.stats(reset=True)
    runtime.trace(clear=True)
    return runtime


def assert_nothing_ran(runtime) -> None:
    runtime.wait()
    assert ntasks(runtime) == 0 and runtime.trace() == [], runtime.trace()[:5]
