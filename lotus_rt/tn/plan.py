"""Planning: an einsum network becomes a list of GEMM-shaped steps on numbered nodes.

Algorithm. Nodes 0..n-1 are the operands. First, each operand with a repeated index (a
diagonal) or an index no other operand nor the output has (summed away privately) gets a
*unary* step that reduces it. Then opt_einsum's path optimizer orders the pairwise
contractions of the reduced network; each becomes a *pair* step whose result keeps only the
indices still needed (by the output or a remaining operand), laid out in the GEMM's natural
order (batch, free of the left operand, free of the right one) except the last step, which
writes the requested output order; then ``layouts.choose_orders`` may reorder a large
intermediate so that the GEMMs around it need no copies. A path entry with more than two
operands (``optimize=False``) is folded left to right.

Tiling splits the output's leading index into tiles: every node carrying that index exists
once per tile (an independent chain of tasks per tile); nodes without it (e.g. two weight
cores contracted together) are computed once and shared. ``tile=None`` picks a tile so that a
task is worth its overhead (about 1 ms of work at ``ASSUMED_FLOPS``) and, when the problem
allows, there are at least as many chains as workers.

Priorities come from the critical path: a step's priority grows with the work on the longest
path from it to the output (its bottom level), so that long chains and shared steps start first.

The plan cache. ``PLANS`` is the one cache of plans in lotus_rt, filled through two doors:
``cached_plan`` for canonical equations (the layers and the fused layer bodies), and
``cached_prepared`` for whatever a user hands ``lotus_rt.einsum`` / ``contract_expression``
(the grammar of ``tn/grammar.py``: its canonical form is cached beside the plan, a ``Prepared``).
Both are keyed by (equation, shapes, dtypes, optimizer, tile request, workers) *before*
parsing, since a caller asks for the same few plans at every call and parsing costs most of a
lookup; hits and misses are counted under the name "plans" (``lotus_rt.stats().caches["plans"]``).

Optimizers. ``optimize`` takes what opt_einsum's ``contract`` takes: a path optimizer's name
(``Settings``' ``path_optimizers()``), True ("auto"), False (one step over all operands, folded
left to right), an ``opt_einsum.paths.PathOptimizer``, an explicit path (a list of tuples of
operand positions, as ``opt_einsum.contract_path`` or ``numpy.einsum_path`` returns it, the
latter's leading "einsum_path" included), or ``contract_path``'s whole ``(path, PathInfo)``
result. ``optimizer_key`` turns it into a hashable key (a path into nested tuples); an
explicit path is checked against the operand count before planning.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import opt_einsum
from opt_einsum.contract import PathInfo

from lotus_rt.kernels.contract import PairSpec, UnarySpec, pair_spec
from lotus_rt.runtime.counters import cache_counter
from lotus_rt.runtime.settings import path_optimizers
from lotus_rt.tn import grammar, layouts
from lotus_rt.tn.grammar import Canonical
from lotus_rt.tn.network import Network, parse

ASSUMED_FLOPS = 2e10  # per CPU worker, for tile sizing only: tasks measured 14-29 GFLOP/s (float32, 2026-11-27)
MIN_TASK_FLOPS = ASSUMED_FLOPS * 1e-3  # ~1 ms: StarPU's guidance for a CPU task
PRIORITY_SCALE = 100


@dataclass(frozen=True)
class Step:
    kind: str  # "pair" or "unary"
    inputs: tuple[int, ...]
    output: int
    spec: PairSpec | UnarySpec
    flops: float
    tiled: bool
    priority: int = 0


@dataclass(frozen=True)
class Plan:
    network: Network
    optimizer: object  # an optimizer_key: a name, False, ("path", ((0, 1), ...)) or a PathOptimizer
    nodes: tuple[str, ...]  # the indices of every node
    steps: tuple[Step, ...]
    output_node: int
    tile_index: str | None  # the output index split into tiles (None: not tiled)
    tile: int  # tile length along tile_index (== its size when not tiled)
    flops: float  # summed over steps, opt_einsum's convention: 2/element if a step sums, else 1
    optimal_flops: float | None = None  # opt_einsum's count for its chosen path, for comparison

    @property
    def ntiles(self) -> int:
        return -(-self.network.sizes[self.tile_index] // self.tile) if self.tile_index else 1

    def tiles(self) -> list[tuple[int, int]]:
        """(start, stop) of each tile along the tile index (one full range when not tiled)."""
        if self.tile_index is None:
            return [(0, 0)]
        size = self.network.sizes[self.tile_index]
        return [(s, min(s + self.tile, size)) for s in range(0, size, self.tile)]

    def shape(self, node: int, tile: tuple[int, int] | None = None) -> tuple[int, ...]:
        sizes = self.network.sizes
        return tuple((tile[1] - tile[0]) if (tile and i == self.tile_index) else sizes[i]
                     for i in self.nodes[node])

    def is_tiled(self, node: int) -> bool:
        return self.tile_index is not None and self.tile_index in self.nodes[node]


def _flops(indices: str, sizes: dict[str, int], factor: int) -> float:
    return float(factor * math.prod(sizes[i] for i in set(indices)))


def _dedupe(indices) -> str:
    return "".join(dict.fromkeys(indices))


class PlanCache:
    """Plans by key, at most ``limit`` of them (cleared when full), hits and misses counted."""

    def __init__(self, limit: int = 1024):
        self.limit = limit
        self._plans: dict[tuple, Plan] = {}
        self._lock = threading.Lock()
        self.counter = cache_counter("plans")

    def get(self, key: tuple) -> Plan | None:
        plan = self._plans.get(key)
        if plan is None:
            self.counter.miss()
        else:
            self.counter.hit()
        return plan

    def put(self, key: tuple, plan: Plan) -> None:
        with self._lock:
            if len(self._plans) >= self.limit:
                self._plans.clear()
            self._plans[key] = plan

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


PLANS = PlanCache()


def optimizer_key(optimize: object) -> object:
    """A hashable form of ``optimize`` (see the module docstring); TypeError if it is none of the
    accepted forms. Names and paths are checked on a cache miss (``check_optimizer``), so that a
    call with a cached plan does not pay for it."""
    if type(optimize) is str or optimize is False or isinstance(optimize, opt_einsum.paths.PathOptimizer):
        return optimize
    if optimize is True:
        return "auto"
    if (isinstance(optimize, tuple) and len(optimize) == 2
            and isinstance(optimize[1], PathInfo)):  # contract_path's result
        optimize = optimize[0]
    if isinstance(optimize, (list, tuple)):
        entries = list(optimize)
        if entries and isinstance(entries[0], str) and entries[0] == "einsum_path":  # numpy.einsum_path
            entries = entries[1:]
        path = []
        for n, entry in enumerate(entries):
            if isinstance(entry, (str, bytes)) or not isinstance(entry, (list, tuple)) or not all(
                    isinstance(p, (int, np.integer)) and not isinstance(p, (bool, np.bool_)) for p in entry):
                raise TypeError(f"einsum: optimize path entry {n} is {entry!r}; a path is a list of tuples of "
                                "operand positions, e.g. [(0, 1), (0, 1)]")
            path.append(tuple(int(p) for p in entry))
        return ("path", tuple(path))
    raise TypeError(f"einsum: optimize={optimize!r} is not an optimizer; valid: {', '.join(path_optimizers())}, "
                    "True, False, a PathOptimizer, an explicit path or opt_einsum.contract_path's result")


def check_optimizer(key: object, noperands: int) -> None:
    """Check an optimizer key: a known name, or a path that contracts ``noperands`` operands
    into one (ValueError naming the bad entry)."""
    if type(key) is str:
        if key not in path_optimizers():
            raise ValueError(f"einsum: unknown path optimizer {key!r}; valid: {', '.join(path_optimizers())}, "
                             "True, False, a PathOptimizer or an explicit path")
        return
    if not (isinstance(key, tuple) and key and key[0] == "path"):
        return
    remaining = noperands
    for n, entry in enumerate(key[1]):
        if not entry or len(set(entry)) != len(entry) or not all(0 <= p < remaining for p in entry):
            raise ValueError(f"einsum: optimize path entry {n} {entry} does not name distinct positions among "
                             f"the {remaining} operand(s) left at that step")
        remaining -= len(entry) - 1
    if remaining != 1:
        raise ValueError(f"einsum: the optimize path {list(key[1])} leaves {remaining} operands; a path must "
                         f"contract all {noperands} into one")


def _path_argument(key: object) -> object:
    """What opt_einsum.contract_path takes for an optimizer key."""
    return [tuple(e) for e in key[1]] if isinstance(key, tuple) and key and key[0] == "path" else key


def cached_plan(equation: str, shapes: Sequence[tuple[int, ...]], dtypes: Sequence[object], optimizer: object,
                tile: int | None, nworkers: int) -> Plan:
    """The plan of the canonical ``equation`` for operands of these shapes and dtypes, from the
    plan cache (planned and stored on a miss). ``optimizer`` is an ``optimizer_key``. Bad input
    is a ValueError/TypeError naming the problem."""
    try:
        # type(tile): True and 2.0 equal 1 and 2 as keys, but build_plan must get to refuse them
        key = (equation, tuple(map(tuple, shapes)), tuple(np.dtype(d).str for d in dtypes), optimizer,
               tile, type(tile), nworkers)
        plan = PLANS.get(key)
    except TypeError:  # unhashable or odd arguments: parse() explains what is wrong
        key = plan = None
    if plan is not None:
        return plan
    net = parse(equation, shapes, dtypes)
    optimizer = optimizer_key(optimizer)
    check_optimizer(optimizer, len(net.inputs))
    plan = build_plan(net, optimizer, tile, nworkers)
    if key is not None:
        PLANS.put(key, plan)
    return plan


@dataclass(frozen=True)
class Prepared:
    """A user's einsum ready to run: its canonical form and the plan of that (None when an index
    has size 0: the result is zeros and no task runs)."""

    canonical: Canonical
    plan: Plan | None


def cached_prepared(equation: str, shapes: Sequence[tuple[int, ...]], dtypes: Sequence[np.dtype],
                    optimizer: object, tile: int | None, nworkers: int) -> Prepared:
    """``equation`` in any grammar ``tn/grammar.py`` accepts, canonicalized and planned, from the
    one plan cache. ``optimizer`` is an ``optimizer_key``. Every error detectable from the
    equation, shapes and dtypes is raised here, before any task exists."""
    try:
        key = ("einsum", equation, tuple(shapes), tuple(d.str for d in dtypes), optimizer, tile, type(tile),
               nworkers)
        prepared = PLANS.get(key)
    except (TypeError, AttributeError):  # unhashable or odd arguments: canonicalize explains
        key = prepared = None
    if prepared is not None:
        return prepared
    canon = grammar.canonicalize(equation, shapes, dtypes)
    check_optimizer(optimizer, len(canon.shapes))
    if tile is not None and (type(tile) is not int or tile <= 0):
        raise ValueError(f"einsum: tile must be a positive int or None, got {tile!r}")
    plan = None
    if not canon.empty:
        net = parse(canon.equation, canon.shapes, [canon.compute_dtype] * len(canon.shapes))
        plan = build_plan(net, optimizer, tile, nworkers)
    prepared = Prepared(canon, plan)
    if key is not None:
        PLANS.put(key, prepared)
    return prepared


def build_plan(net: Network, optimizer: object = "auto", tile: int | None = None, nworkers: int = 1) -> Plan:
    """Plan ``net`` (not cached: ``cached_plan`` is the cache); see the module docstring."""
    if tile is not None and (type(tile) is not int or tile <= 0):
        raise ValueError(f"einsum: tile must be a positive int or None, got {tile!r}")
    sizes, output = net.sizes, net.output
    nodes: list[str] = list(net.inputs)
    raw_steps: list[tuple[str, tuple[int, ...], int, PairSpec | UnarySpec, float]] = []

    def add_node(indices: str) -> int:
        nodes.append(indices)
        return len(nodes) - 1

    current = list(range(len(nodes)))
    if len(current) == 1:  # a single operand: one unary step straight to the output
        term = nodes[0]
        out = add_node(output)
        raw_steps.append(("unary", (0,), out, UnarySpec("einsum", f"{term}->{output}"), _flops(term, sizes, 1)))
        current = [out]
    else:
        for k, term in enumerate(net.inputs):
            others = set(output).union(*(t for j, t in enumerate(net.inputs) if j != k))
            keep = _dedupe(i for i in term if i in others)
            if keep != term:
                out = add_node(keep)
                raw_steps.append(("unary", (k,), out, UnarySpec("einsum", f"{term}->{keep}"),
                                  _flops(term, sizes, 1)))
                current[k] = out
    optimal_flops = None
    if len(current) > 1:
        reduced_eq = ",".join(nodes[c] for c in current) + "->" + output
        shapes = [tuple(sizes[i] for i in nodes[c]) for c in current]
        try:
            path, info = opt_einsum.contract_path(reduced_eq, *shapes, shapes=True,
                                                  optimize=_path_argument(optimizer))
        except (KeyError, TypeError, NotImplementedError) as exc:
            raise ValueError(f"einsum: unknown path optimizer {optimizer!r}: {exc}") from exc
        optimal_flops = float(info.opt_cost)
        for positions in path:
            group = [current[p] for p in positions]
            for p in sorted(positions, reverse=True):
                del current[p]
            left = group[0]
            for j, right in enumerate(group[1:]):
                rest = current + group[j + 2:]
                last = not rest
                needed = set(output).union(*(nodes[r] for r in rest))
                a, b = nodes[left], nodes[right]
                if last:
                    out_idx = output
                else:
                    natural = ([i for i in a if i in b] + [i for i in a if i not in b]
                               + [i for i in b if i not in a])
                    out_idx = "".join(i for i in natural if i in needed)
                out = add_node(out_idx)
                sums = any(i in b and i not in out_idx for i in a)
                raw_steps.append(("pair", (left, right), out, pair_spec(a, b, out_idx),
                                  _flops(a + b, sizes, 2 if sums else 1)))
                left = out
            current.append(left)
    (final,) = current
    if nodes[final] != output:  # e.g. a single operand already reduced by preprocessing
        out = add_node(output)
        raw_steps.append(("unary", (final,), out, UnarySpec("einsum", f"{nodes[final]}->{output}"),
                          _flops(nodes[final], sizes, 1)))
        final = out
    layouts.choose_orders(nodes, raw_steps, set(range(len(net.inputs))) | {final}, sizes)
    raw_steps = [_respec(nodes, step) for step in raw_steps]

    total = sum(s[4] for s in raw_steps)
    tile_index, tile_len = _choose_tiling(net, nodes, raw_steps, tile, nworkers, total)
    ntiles = -(-sizes[tile_index] // tile_len) if tile_index else 1
    tiled = [tile_index is not None and tile_index in nodes[s[2]] for s in raw_steps]
    priorities = _critical_path_priorities(raw_steps, tiled, ntiles)
    steps = tuple(Step(kind, ins, out, spec, flops, t, p)
                  for (kind, ins, out, spec, flops), t, p in zip(raw_steps, tiled, priorities))
    return Plan(net, optimizer, tuple(nodes), steps, final, tile_index, tile_len, total, optimal_flops)


def _respec(nodes: list[str], step: tuple) -> tuple:
    """``step`` with its spec rebuilt from the (possibly reordered) ``nodes``."""
    kind, inputs, out, spec, flops = step
    if kind == "pair":
        spec = pair_spec(nodes[inputs[0]], nodes[inputs[1]], nodes[out])
    elif spec.kind == "einsum":
        spec = UnarySpec("einsum", f"{nodes[inputs[0]]}->{nodes[out]}")
    return kind, inputs, out, spec, flops


def _choose_tiling(net: Network, nodes: list[str], steps: list, tile: int | None, nworkers: int,
                   total_flops: float) -> tuple[str | None, int]:
    if not net.output:
        return None, 1
    index = net.output[0]
    size = net.sizes[index]
    if any(term.count(index) > 1 for term in net.inputs):  # a diagonal on it: keep whole
        return None, size
    if tile is not None:
        return (index, tile) if tile < size else (None, size)
    # smallest per-row work among the steps that will be tiled
    tiled_flops = [flops for _, _, out, _, flops in steps if index in nodes[out]]
    per_row = min(tiled_flops) / size if tiled_flops else 0.0
    if total_flops < MIN_TASK_FLOPS * 2 or per_row == 0.0:
        return None, size
    rows = max(1, math.ceil(MIN_TASK_FLOPS / per_row))
    if -(-size // rows) < nworkers:  # fewer chains than workers: split finer if it allows
        rows = max(1, size // nworkers)
    return (index, rows) if rows < size else (None, size)


def _critical_path_priorities(steps: list, tiled: list[bool], ntiles: int) -> list[int]:
    consumer: dict[int, int] = {}
    for k, (_, inputs, _, _, _) in enumerate(steps):
        for node in inputs:
            consumer[node] = k
    bottom = [0.0] * len(steps)
    for k in range(len(steps) - 1, -1, -1):  # steps are in topological order
        work = steps[k][4] / (ntiles if tiled[k] else 1)
        after = consumer.get(steps[k][2])
        bottom[k] = work + (bottom[after] if after is not None else 0.0)
    top = max(bottom, default=0.0) or 1.0
    return [round(PRIORITY_SCALE * b / top) for b in bottom]
