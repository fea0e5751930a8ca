"""Planning: the one plan cache (and its counters), FLOPs against opt_einsum's optimum, the tiling
choice, critical-path priorities, intermediate layouts; settings reach the planner.
"""
from __future__ import annotations

import math
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lotus_rt
from lotus_rt import tn
from lotus_rt.runtime.settings import Settings
from conftest import starpu_runtime_or_skip
from tn_cases import PLAN_PROPERTY, tt_chains, tuckers, TILES

torch = pytest.importorskip("torch")


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
