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


# ------------------------------------------------------------------ the whole einsum grammar

ASCII_POOL = "abcdefg"
UNICODE_POOL = "αβγδεζη"  # sorted like ASCII_POOL, so numpy's implicit output (on the ASCII twin) agrees


class GrammarCase(NamedTuple):
    args: tuple  # what einsum is called with: (equation, *operands) or the interleaved form
    numpy_args: tuple  # the same call for numpy.einsum (ASCII letters)
    tags: tuple[str, ...]  # for hypothesis.event


@st.composite
def grammar_cases(draw):
    """One einsum call in numpy's grammar: 1-4 operands over a pool of up to 5 letters (ASCII or
    not), repeated indices inside an operand (diagonals), letters shared by 3+ operands
    (hyperedges), scalar operands (Python numbers, 0-d arrays), '...' covering 0-2 broadcast
    dimensions, size-1 dimensions broadcast against larger ones, implicit or explicit output, the
    interleaved sublist form, and float32/float64/int/bool operands mixed."""
    nops = draw(st.integers(1, 4))
    pool_size = draw(st.integers(1, 5))
    use_unicode = draw(st.booleans())
    letters = (UNICODE_POOL if use_unicode else ASCII_POOL)[:pool_size]
    sizes = {c: draw(st.integers(1, 4)) for c in letters}
    nell = draw(st.sampled_from([0, 0, 1, 2]))
    ell_sizes = [draw(st.integers(2, 3)) for _ in range(nell)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    terms, operands, tags = [], [], set()
    for _ in range(nops):
        kind = draw(st.sampled_from(["array"] * 5 + ["python", "0d"]))
        dtype = draw(st.sampled_from([np.float64] * 4 + [np.float32] * 2 + [np.int64, np.int8, np.bool_]))
        if kind != "array":
            term = "..." if nell and draw(st.booleans()) else ""
            if kind == "python":
                value = draw(st.sampled_from([2.0, -1.5, 3, -2]))
                tags.add("python scalar")
            else:
                value = np.asarray(rng.uniform(0.5, 1.5), dtype=dtype) if dtype != np.bool_ else np.asarray(True)
                tags.add("0-d array")
            terms.append(term)
            operands.append(value)
            continue
        term = draw(st.lists(st.sampled_from(letters), min_size=0, max_size=4))
        shape = []
        own = {c: (1 if draw(st.integers(0, 4)) == 0 else sizes[c]) for c in set(term)}
        if any(own[c] == 1 != sizes[c] for c in own):
            tags.add("size-1 broadcast")
        if len(set(term)) < len(term):
            tags.add("diagonal")
        shape = [own[c] for c in term]
        if nell and draw(st.booleans()):
            k = draw(st.integers(0, nell))
            ell_shape = [ell_sizes[j] if draw(st.integers(0, 3)) else 1 for j in range(nell - k, nell)]
            at = draw(st.integers(0, len(term)))
            term = term[:at] + ["..."] + term[at:]
            shape = shape[:at] + ell_shape + shape[at:]
            tags.add(f"ellipsis covering {k}")
        terms.append("".join(term))
        if dtype == np.bool_:
            values = rng.integers(0, 2, shape).astype(bool)
        elif np.issubdtype(dtype, np.integer):
            values = rng.integers(-3, 4, shape).astype(dtype)
        else:
            values = (rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)).astype(dtype)
        operands.append(values)
    counts = {c: sum(t.count(c) for t in terms) for c in letters}
    if any(sum(c in t for t in terms) >= 3 for c in letters):
        tags.add("hyperedge")
    used = [c for c in letters if counts[c]]
    has_ell = any("..." in t and np.ndim(op) > len(t) - 3 for t, op in zip(terms, operands))
    if draw(st.booleans()):
        output = None
        tags.add("implicit output")
    else:
        output = "".join(draw(st.permutations(draw(st.lists(st.sampled_from(used), unique=True)) if used else [])))
        if has_ell or (nell and draw(st.booleans())):  # numpy wants '...' when it covers dimensions
            at = draw(st.integers(0, len(output)))
            output = output[:at] + "..." + output[at:]
    equation = ",".join(terms) + ("" if output is None else "->" + output)
    to_ascii = str.maketrans(UNICODE_POOL, ASCII_POOL)
    numpy_args = (equation.translate(to_ascii), *operands)
    if use_unicode:
        tags.add("non-ASCII letters")
    if draw(st.integers(0, 3)) == 0:  # the interleaved form
        def sub(term):  # ASCII_POOL[i] is numpy's subscript 26 + i; UNICODE_POOL[i] is 52 + i (non-ASCII)
            return [Ellipsis if c == "." else (52 + UNICODE_POOL.index(c) if use_unicode else 26 + ASCII_POOL.index(c))
                    for c in term.replace("...", ".")]
        args = [x for term, op in zip(terms, operands) for x in (op, sub(term))]
        if output is not None:
            args.append(sub(output))
        tags.add("sublist form")
        return GrammarCase(tuple(args), numpy_args, tuple(sorted(tags)))
    return GrammarCase((equation, *operands), numpy_args, tuple(sorted(tags)))


def reference_check(out, case: GrammarCase) -> None:
    """``out`` against numpy.einsum: its dtype and shape; integers exactly; floats within
    ``rtol * sqrt(K) * max(einsum of |operands|)`` of a float64 reference."""
    equation, *ops = case.numpy_args
    expected = np.asarray(np.einsum(equation, *ops))
    assert isinstance(out, np.ndarray)
    assert out.dtype == expected.dtype and out.shape == expected.shape, (equation, out.dtype, expected.dtype,
                                                                         out.shape, expected.shape)
    if expected.dtype.kind in "biu":
        np.testing.assert_array_equal(out, expected, err_msg=equation)
        return
    ops64 = [np.asarray(o, dtype=np.float64) for o in ops]
    ref = np.einsum(equation, *ops64)
    scale = float(np.max(np.abs(np.einsum(equation, *[np.abs(o) for o in ops64])), initial=1e-300))
    import opt_einsum.parser
    lhs, output, _ = opt_einsum.parser.parse_einsum_input([equation, *ops64])  # '...' and implicit resolved
    sizes: dict[str, int] = {}
    for term, op in zip(lhs.split(","), ops64):
        for index, dim in zip(term, op.shape):
            sizes[index] = max(sizes.get(index, 1), dim)
    summed = math.prod(d for index, d in sizes.items() if index not in output)
    rtol = RTOL[np.dtype(np.float32) if expected.dtype.itemsize <= 4 else np.dtype(np.float64)]
    bound = rtol * math.sqrt(summed) * scale
    err = float(np.max(np.abs(out.astype(np.float64) - ref), initial=0.0))
    assert err <= bound, f"{equation}: max error {err:.3g} > bound {bound:.3g}"
