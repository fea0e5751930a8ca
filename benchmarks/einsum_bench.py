"""Einsum benchmark: tensorized-layer forwards, lotus_rt.einsum vs torch.einsum vs numpy.einsum.

Networks (float32, batch ``--batch``, 1024 -> 1024 features):

- ``tt_r{8,16}``: a TT-matrix (tensor-train) layer, 1024 = 4*8*8*4 in and out. The input
  ``x[z,i,j,k,l]`` (z the batch) meets the cores ``G1[i,a,q]`` (in i1, out a1, rank),
  ``G2[q,j,b,r]``, ``G3[r,k,c,s]`` and ``G4[s,l,d]``:
  ``zijkl,iaq,qjbr,rkcs,sld->zabcd``.
- ``tucker2``: a Tucker-2 layer on 1024 = 32*32 (the two input modes factored, rank 16, the
  core keeps the two output modes): ``zij,ia,jb,abef->zef``.
- ``cp_r32``: a CP (rank 32) layer on 32*32 -> 32*32: ``zij,ir,jr,er,fr->zef``.

Speed. Every variant runs side by side in one process: a warm-up call each, then
``--repeats`` rounds, each round calling every variant once (the order rotates per round), and
the median per variant. Ratios are per round (``torch_s / lotus_s`` etc., > 1 means lotus_rt
is faster), reported as median, min and max. Variants: lotus_rt.einsum with ``tile=None``
(the planner's choice) and with each ``--tiles`` value (a tile-size sweep); torch.einsum with
``torch.set_num_threads(N)``; ``numpy.einsum(optimize=True)`` under
``threadpool_limits(N, "blas")``; and ``numpy.einsum`` given opt_einsum's optimal path
("numpy_path"). N is the number of StarPU CPU workers: the same thread count everywhere.

Fairness. StarPU 1.3's CPU workers busy-poll for work while idle (each keeps a core at 100 %).
Left alone, they would compete with torch's and numpy's threads for the same cores, so the
references run with StarPU paused (``runtime.paused()``: ``starpu_pause()`` through the
binding; paused workers block on a condition variable) and StarPU is resumed, untimed, before
each lotus_rt call. What a process mixing
torch and lotus_rt sees is shown once per network as "torch_unpaused" (torch.einsum with StarPU
left as lotus_rt leaves it between calls: its workers spinning with LOTUS_IDLE_PAUSE=0, paused
by lotus_rt itself with the idle pause on, the default). A short untimed sleep after every call
lets OpenBLAS's own spinning threads go idle before the next variant starts, and every timed
call follows an untimed call of the same variant, so no variant pays for waking its thread
pool after that sleep.

Note on numpy.einsum(optimize=True): numpy caps intermediates at the size of the largest
input or output (its default ``memory_limit``). On the TT networks the optimal path needs a
larger intermediate, so numpy falls back to one naive 3-operand einsum loop (scaling 10):
that, not BLAS, is its time. "numpy_path" lifts the cap by passing opt_einsum's path.

Correctness: each variant's warm-up output is compared with a float64 reference
(opt_einsum, optimal path): max |out - ref| / max |ref|; above 1e-4 the run fails (exit 1).

FLOPs. For each network, the path lotus_rt plans with ``optimize="auto"`` and ``"greedy"`` is
compared with opt_einsum's ``contract_path(..., optimize="optimal")``. The two tools count
differently: ``Plan.flops`` counts 2*prod(sizes of all indices involved) for every pairwise
step (and 1*prod for unary steps), whereas opt_einsum's ``opt_cost`` (``helpers.flop_count``)
counts prod * (max(1, terms - 1) + [an index is summed away]) per contraction, i.e. 2*prod for
a pairwise contraction that sums an index but only 1*prod for a pairwise step that sums
nothing (an outer or Hadamard product, e.g. ``ir,jr->rij`` in the CP network). To compare like
with like, both paths are recounted under each convention: "opt_einsum" (every step of both
paths through ``opt_einsum.helpers.flop_count``; lotus_rt's recount must equal the
``opt_cost`` opt_einsum itself reports for that optimizer, ``Plan.optimal_flops``, which is
checked) and "lotus" (2*prod per pairwise step). The headline ratio, lotus path / optimal
path, uses opt_einsum's convention; the target is <= 1.05.

Profile: one extra traced call per lotus variant: number of tasks, busy seconds summed over
tasks (``lotus_rt.trace()``), wall seconds, utilisation busy / (N * wall), the time outside any
task (wall - first-task-start-to-last-task-end span: planning, registration, submission,
wait and unregistration), the idle worker-time per task, busy time per plan step and the
GFLOP/s achieved inside tasks.

    python -m benchmarks einsum [--quick] [--out DIR] [--batch 256] [--repeats 7] [--tiles 32,64,128]
    python benchmarks/einsum_bench.py ...                  (the same, as a script)

Writes ``DIR/einsum.json`` (default DIR benchmarks/out) and a bar chart of the speed ratios
next to it (``einsum.png``). ``--quick`` (TT rank 4 only, batch 16, 3 repeats, tiles None and 8;
well under 15 s) writes ``einsum_quick.json`` / ``.png``, so it never overwrites a full run.
The exit status is 1 when an output disagrees with the float64 reference, else 0.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    import pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import opt_einsum  # noqa: E402
from opt_einsum.helpers import flop_count  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import lotus_rt  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.common import median_spread, rel_error  # noqa: E402
from lotus_rt import tn  # noqa: E402

MAX_REL_ERROR = common.MAX_REL_ERROR["float32"]
SETTLE_S = common.SETTLE_S  # untimed sleep after each call
SETTLE_BLAS_S = 0.15  # after numpy calls: OpenBLAS threads spin ~0.1 s before sleeping
FLOPS_TARGET = 1.05
SPEED_TARGET = 1.0


@dataclass(frozen=True)
class Net:
    name: str
    equation: str
    shapes: tuple[tuple[int, ...], ...]
    description: str


def networks(batch: int, ranks: list[int], quick: bool) -> list[Net]:
    nets = [Net(f"tt_r{r}", common.TT_EQUATION, common.tt_shapes(batch, r),
                f"TT-matrix layer 1024->1024 (4x8x8x4 <-> 4x8x8x4), TT-ranks {r}") for r in ranks]
    if not quick:
        nets.append(Net("tucker2", "zij,ia,jb,abef->zef",
                        ((batch, 32, 32), (32, 16), (32, 16), (16, 16, 32, 32)),
                        "Tucker-2 layer 1024->1024 (32x32 in, input modes factored to rank 16)"))
        nets.append(Net("cp_r32", "zij,ir,jr,er,fr->zef",
                        ((batch, 32, 32), (32, 32), (32, 32), (32, 32), (32, 32)),
                        "CP layer 1024->1024 (32x32 <-> 32x32), rank 32"))
    return nets


# ---------------------------------------------------------------------------------- FLOPs

def _opt_einsum_cost(inputs: list[str], output: str, sizes: dict[str, int]) -> int:
    """opt_einsum's count for one contraction of ``inputs`` into ``output``."""
    indices = set("".join(inputs)) | set(output)
    summed = bool(indices - set(output))
    return flop_count(indices, summed, len(inputs), sizes)


def _lotus_cost(inputs: list[str], output: str, sizes: dict[str, int]) -> float:
    """lotus_rt's count (plan.py ``_flops``): 2*prod for a pair, 1*prod for a unary step."""
    indices = set("".join(inputs)) | set(output)
    return float((2 if len(inputs) == 2 else 1) * math.prod(sizes[i] for i in indices))


def plan_costs(plan) -> dict[str, float]:
    sizes = plan.network.sizes
    steps = [([plan.nodes[i] for i in s.inputs], plan.nodes[s.output]) for s in plan.steps]
    return {"opt_einsum": float(sum(_opt_einsum_cost(i, o, sizes) for i, o in steps)),
            "lotus": float(sum(_lotus_cost(i, o, sizes) for i, o in steps))}


def optimal_costs(net: Net) -> tuple[dict[str, float], list, int]:
    path, info = opt_einsum.contract_path(net.equation, *net.shapes, shapes=True, optimize="optimal")
    sizes = info.size_dict
    opt_cost = lotus = 0.0
    for entry in info.contraction_list:
        lhs, out = entry[2].split("->")
        terms = lhs.split(",")
        opt_cost += _opt_einsum_cost(terms, out, sizes)
        # a path entry with k > 2 terms would be k - 1 pairwise GEMMs in lotus_rt; "optimal"
        # only returns pairs, so the pairwise count is exact here
        lotus += _lotus_cost(terms, out, sizes)
    assert opt_cost == info.opt_cost, (opt_cost, info.opt_cost)
    return {"opt_einsum": float(info.opt_cost), "lotus": lotus}, [list(p) for p in path], info.opt_cost


def flops_report(net: Net, ops: list[np.ndarray]) -> dict:
    optimal, path, _ = optimal_costs(net)
    report = {"convention": "headline ratio uses opt_einsum's flop_count for every step of both "
                            "paths; 'lotus' recounts both as 2*prod per pairwise step",
              "optimal": {"path": path, **{f"flops_{k}": v for k, v in optimal.items()}}}
    for optimizer in ("auto", "greedy"):
        plan = tn.plan(net.equation, *ops, optimize=optimizer, tile=None)
        costs = plan_costs(plan)
        unary = sum(s.kind == "unary" for s in plan.steps)
        if unary == 0 and plan.optimal_flops is not None and costs["opt_einsum"] != plan.optimal_flops:
            raise AssertionError(f"{net.name}/{optimizer}: recount {costs['opt_einsum']} != "
                                 f"opt_einsum's {plan.optimal_flops}")
        report[optimizer] = {
            "plan_flops": plan.flops,  # lotus_rt's own count
            "opt_einsum_opt_cost": plan.optimal_flops,  # opt_einsum's opt_cost for this optimizer
            "flops_opt_einsum": costs["opt_einsum"], "flops_lotus": costs["lotus"],
            "unary_steps": unary,
            "steps": [_step_text(plan, s) for s in plan.steps],
            "ratio_vs_optimal": costs["opt_einsum"] / optimal["opt_einsum"],
            "ratio_vs_optimal_lotus_convention": costs["lotus"] / optimal["lotus"],
            "meets_target": costs["opt_einsum"] / optimal["opt_einsum"] <= FLOPS_TARGET,
        }
    return report


def _step_text(plan, step) -> str:
    return ",".join(plan.nodes[i] for i in step.inputs) + "->" + plan.nodes[step.output]


def plan_report(plan) -> dict:
    return {"optimizer": plan.optimizer, "tile_index": plan.tile_index, "tile": plan.tile,
            "ntiles": plan.ntiles, "flops": plan.flops,
            "tasks": common.einsum_tasks(plan),
            "steps": [{"step": _step_text(plan, s), "kind": s.kind, "flops": s.flops,
                       "tiled": s.tiled, "priority": s.priority} for s in plan.steps]}


# ---------------------------------------------------------------------------------- timing

def profile_lotus(rt, net: Net, ops, tile, nworkers: int, plan) -> dict:
    """One traced call: how its wall time splits between task bodies and everything else."""
    lotus_rt.trace(clear=True)
    start = time.perf_counter()
    lotus_rt.einsum(net.equation, *ops, tile=tile)
    wall = time.perf_counter() - start
    records = lotus_rt.trace(clear=True)
    time.sleep(SETTLE_S)
    if not records:
        return {"wall_s": wall, "tasks": 0, "note": "no trace records (tracing off or inline engine)"}
    busy = sum(r.end_s - r.start_s for r in records)
    span = max(r.end_s for r in records) - min(r.start_s for r in records)
    per_step: dict[str, float] = {}
    for r in records:
        key = r.name.split("[")[0]
        per_step[key] = per_step.get(key, 0.0) + (r.end_s - r.start_s)
    steps = {f"{s.kind}{n}": _step_text(plan, s) for n, s in enumerate(plan.steps)}
    return {
        "wall_s": wall, "tasks": len(records), "busy_s": busy, "span_s": span,
        "utilisation": busy / (nworkers * wall),
        "outside_tasks_s": wall - span,  # before the first task starts + after the last ends
        "idle_worker_s_per_task": (nworkers * wall - busy) / len(records),
        "mean_task_s": busy / len(records),
        "task_gflops_per_worker": plan.flops / busy / 1e9 if busy > 0 else None,
        "busy_s_by_step": {f"{k} ({steps.get(k, '?')})": v for k, v in sorted(per_step.items())},
    }


def run_network(rt, net: Net, tiles: list, repeats: int, nthreads: int, rng) -> dict:
    import torch

    ops = [rng.standard_normal(shape).astype(np.float32) for shape in net.shapes]
    tops = [torch.from_numpy(op) for op in ops]
    with threadpool_limits(limits=nthreads, user_api="blas"), rt.paused():
        reference = opt_einsum.contract(net.equation, *[op.astype(np.float64) for op in ops],
                                        optimize="optimal")
    numpy_path = ["einsum_path", *opt_einsum.contract_path(net.equation, *ops, optimize="optimal")[0]]

    def lotus_fn(tile):
        return lambda: lotus_rt.einsum(net.equation, *ops, tile=tile)

    def torch_fn():
        with rt.paused():
            start = time.perf_counter()
            out = torch.einsum(net.equation, *tops)
            return time.perf_counter() - start, out

    def torch_unpaused_fn():
        start = time.perf_counter()
        out = torch.einsum(net.equation, *tops)
        return time.perf_counter() - start, out

    def numpy_fn(optimize):
        def call():
            with rt.paused(), threadpool_limits(limits=nthreads, user_api="blas"):
                start = time.perf_counter()
                out = np.einsum(net.equation, *ops, optimize=optimize)
                return time.perf_counter() - start, out
        return call

    def timed(fn):
        def call():
            start = time.perf_counter()
            out = fn()
            return time.perf_counter() - start, out
        return call

    lotus_names = [f"lotus[tile={'auto' if t is None else t}]" for t in tiles]
    variants = {name: timed(lotus_fn(t)) for name, t in zip(lotus_names, tiles)}
    variants.update({"torch": torch_fn, "torch_unpaused": torch_unpaused_fn,
                     "numpy": numpy_fn(True), "numpy_path": numpy_fn(numpy_path)})
    settle = {name: (SETTLE_BLAS_S if name.startswith("numpy") else SETTLE_S) for name in variants}

    errors = {}
    for name, fn in variants.items():  # warm-up (plans, caches, thread pools) + correctness
        _, out = fn()
        errors[name] = rel_error(out, reference)
        del out
        time.sleep(settle[name])
    # the output is dropped at once (only the elapsed time is kept)
    times = common.interleaved({name: (lambda fn=fn: fn()[0]) for name, fn in variants.items()},
                               repeats, settle, warm=True)

    lotus_results = []
    for name, tile in zip(lotus_names, tiles):
        plan = tn.plan(net.equation, *ops, tile=tile)
        ratios = {f"{ref}_over_lotus": median_spread([r / l for r, l in zip(times[ref], times[name])])
                  for ref in ("torch", "numpy", "numpy_path", "torch_unpaused")}
        lotus_results.append({"variant": name, "tile_request": tile, "plan": plan_report(plan),
                              "time_s": median_spread(times[name]), **ratios,
                              "max_rel_error": errors[name],
                              "profile": profile_lotus(rt, net, ops, tile, nthreads, plan)})
    best = min(lotus_results, key=lambda r: r["time_s"]["median"])
    return {
        "name": net.name, "equation": net.equation, "shapes": [list(s) for s in net.shapes],
        "description": net.description,
        "flops": flops_report(net, ops),
        "lotus": lotus_results,
        "references": {name: {"time_s": median_spread(times[name]), "max_rel_error": errors[name]}
                       for name in ("torch", "torch_unpaused", "numpy", "numpy_path")},
        "best_lotus_variant": best["variant"],
    }


# ---------------------------------------------------------------------------------- output

def print_table(result: dict) -> None:
    n, env = result["threads"], result["environment"]
    print(f"engine={env['engine']} policy={env['policy']} workers={len(env['workers'])} "
          f"(StarPU {env['starpu_version']}), {n} thread(s) for every variant, batch "
          f"{result['batch']}, float32, {result['repeats']} repeats; references run with StarPU "
          f"{'paused' if result['starpu_paused_for_references'] else 'NOT paused'}")
    head = (f"{'network':<9} {'variant':<17} {'tiles':>5} {'tasks':>5} {'lotus ms':>9} "
            f"{'torch/lotus':>11} {'numpy/lotus':>11} {'npath/lotus':>11} {'util':>5} {'rel err':>8}")
    print(head)
    print("-" * len(head))
    beside = "StarPU idle-paused" if result.get("idle_pause") else "StarPU spinning"
    for net in result["networks"]:
        refs = net["references"]
        for lot in net["lotus"]:
            p, prof = lot["plan"], lot["profile"]
            print(f"{net['name']:<9} {lot['variant']:<17} {p['ntiles']:>5} {p['tasks']:>5} "
                  f"{lot['time_s']['median'] * 1e3:>9.2f} {lot['torch_over_lotus']['median']:>10.2f}x "
                  f"{lot['numpy_over_lotus']['median']:>10.1f}x {lot['numpy_path_over_lotus']['median']:>10.2f}x "
                  f"{prof.get('utilisation', float('nan')):>5.2f} {lot['max_rel_error']:>8.1e}")
        print(f"{'':<9} references ms: torch {refs['torch']['time_s']['median'] * 1e3:.2f} "
              f"(beside lotus_rt, {beside}: {refs['torch_unpaused']['time_s']['median'] * 1e3:.2f}), numpy "
              f"{refs['numpy']['time_s']['median'] * 1e3:.2f}, numpy_path "
              f"{refs['numpy_path']['time_s']['median'] * 1e3:.2f}; rel err torch "
              f"{refs['torch']['max_rel_error']:.1e} numpy {refs['numpy']['max_rel_error']:.1e}")
    print()
    head = (f"{'network':<9} {'optimal':>12} {'auto':>12} {'auto/opt':>8} {'greedy':>12} "
            f"{'greedy/opt':>10}  (opt_einsum convention)")
    print(head)
    print("-" * len(head))
    for net in result["networks"]:
        f = net["flops"]
        print(f"{net['name']:<9} {f['optimal']['flops_opt_einsum']:>12.4g} {f['auto']['flops_opt_einsum']:>12.4g} "
              f"{f['auto']['ratio_vs_optimal']:>8.3f} {f['greedy']['flops_opt_einsum']:>12.4g} "
              f"{f['greedy']['ratio_vs_optimal']:>10.3f}  (plan.flops auto {f['auto']['plan_flops']:.4g}, "
              f"lotus-convention ratio {f['auto']['ratio_vs_optimal_lotus_convention']:.3f})")


def plot(result: dict, path) -> None:
    nets = result["networks"]
    variants = [lot["variant"] for lot in nets[0]["lotus"]]
    panels = [("torch_over_lotus", "torch.einsum / lotus_rt", False),
              ("numpy_path_over_lotus", "numpy.einsum (optimal path) / lotus_rt", False),
              ("numpy_over_lotus", "numpy.einsum(optimize=True) / lotus_rt", True)]
    fig, axes = common.figure(len(panels), width=5.2)
    for ax, (key, title, log) in zip(axes, panels):
        common.speedup_bars(ax, [net["name"] for net in nets],
                            {name.replace("lotus", ""): [net["lotus"][k][key] for net in nets]
                             for k, name in enumerate(variants)},
                            ylabel="speed ratio (> 1: lotus_rt faster)", title=title, log=log,
                            legend_title="lotus_rt tile")
        if ax is not axes[0] and ax.get_legend() is not None:
            ax.get_legend().remove()
    env = result["environment"]
    common.save(fig, path, f"lotus_rt.einsum, batch {result['batch']}, float32, {result['threads']} "
                           f"threads ({env['date']}, {env['hostname']})")


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("einsum", __doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 256; 16 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; 3 with --quick)")
    parser.add_argument("--ranks", type=str, default=None, help="TT-ranks, comma-separated (default 8,16)")
    parser.add_argument("--tiles", type=str, default=None,
                        help="fixed tile sizes to sweep besides tile=None (default 32,64,128)")
    args = parser.parse_args(argv)
    quick = args.quick
    batch = args.batch or (16 if quick else 256)
    repeats = args.repeats or (3 if quick else 7)
    ranks = [int(r) for r in (args.ranks or ("4" if quick else "8,16")).split(",")]
    fixed = [int(t) for t in (args.tiles or ("8" if quick else "32,64,128")).split(",") if t.strip()]
    tiles: list = [None] + [t for t in fixed if 0 < t]

    import torch

    rt = lotus_rt.runtime()
    nthreads = common.cpu_workers(rt)
    torch.set_num_threads(nthreads)
    rng = np.random.default_rng(0)
    nets = [run_network(rt, net, tiles, repeats, nthreads, rng)
            for net in networks(batch, ranks, quick)]

    summary = {}
    for net in nets:
        auto, best = net["lotus"][0], min(net["lotus"], key=lambda r: r["time_s"]["median"])
        summary[net["name"]] = {
            "lotus_auto_ms": auto["time_s"]["median"] * 1e3,
            "auto_plan": f"ntiles={auto['plan']['ntiles']} tile={auto['plan']['tile']} tasks={auto['plan']['tasks']}",
            "torch_ms": net["references"]["torch"]["time_s"]["median"] * 1e3,
            "torch_over_lotus_auto": auto["torch_over_lotus"]["median"],
            "numpy_over_lotus_auto": auto["numpy_over_lotus"]["median"],
            "numpy_path_over_lotus_auto": auto["numpy_path_over_lotus"]["median"],
            "best_variant": best["variant"],
            "torch_over_lotus_best": best["torch_over_lotus"]["median"],
            "speed_target_met_auto": auto["torch_over_lotus"]["median"] >= SPEED_TARGET,
            "flops_ratio_auto": net["flops"]["auto"]["ratio_vs_optimal"],
            "flops_ratio_greedy": net["flops"]["greedy"]["ratio_vs_optimal"],
            "flops_target_met_auto": net["flops"]["auto"]["meets_target"],
        }
    result = {
        "scenario": "einsum", "environment": common.environment(rt),
        "threads": nthreads,
        "torch_num_threads": torch.get_num_threads(),
        "torch_opt_einsum": bool(torch.backends.opt_einsum.enabled and torch.backends.opt_einsum.is_available()),
        "starpu_paused_for_references": rt.engine == "starpu",
        "idle_pause": rt.settings.idle_pause,
        "batch": batch, "dtype": "float32", "repeats": repeats, "quick": quick,
        "tiles": tiles,
        "targets": {"torch_over_lotus": f">= {SPEED_TARGET}", "flops_over_optimal": f"<= {FLOPS_TARGET}"},
        "summary": summary,
        "networks": nets,
    }
    out_path = common.write_result(args.out, "einsum", quick, result)
    png = common.png_path(out_path)
    plot(result, png)
    print_table(result)
    print(f"wrote {out_path} and {png}")

    bad = []
    for net in nets:
        checked = [(lot["variant"], lot["max_rel_error"]) for lot in net["lotus"]]
        checked += [(name, ref["max_rel_error"]) for name, ref in net["references"].items()]
        bad += [(net["name"], name, err) for name, err in checked if not err <= MAX_REL_ERROR]
    for name, variant, err in bad:
        print(f"ERROR: {name} {variant}: relative error {err:.2e} > {MAX_REL_ERROR:g}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
