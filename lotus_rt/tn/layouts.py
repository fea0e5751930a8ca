"""Choose the index order of a plan's intermediates so that its GEMMs need no copies.

A pair step may lay its result out in any index order; the order decides whether the step
itself, the step that reads it, and their backward steps can run as stacked GEMMs straight on
the arrays (``kernels/gemm_layout``) or must copy an operand or transpose a result. For every
intermediate written by a pair step (whose contractions touch an array of at least
MIN_ELEMENTS), in topological order, a few orders are tried: its current one (at first the
planner's natural one: batch, free of the left operand, free of the right one) and orders shaped
for each reader (the reader's stack indices, then its rows, then the contracted indices; or the
contracted indices before the rows). Each is scored by ``gemm_layout``'s cost (bytes copied,
plus a charge per GEMM call) summed over the forward and backward contractions that touch that
intermediate, on C-contiguous arrays of the full (untiled) sizes; the cheapest wins. A node's
best order depends on its neighbours', so the pass repeats (at most PASSES times) until nothing
changes.
"""
from __future__ import annotations

import math
from typing import Sequence

from lotus_rt.kernels import gemm_layout

# Intermediates whose contractions touch no array this large keep the natural order: copying
# them costs microseconds, and the search (milliseconds per plan) would cost more than it saves.
MIN_ELEMENTS = 1 << 16
PASSES = 3


def _contiguous_strides(shape: Sequence[int], item: int) -> tuple[int, ...]:
    return tuple(item * math.prod(shape[k + 1:]) for k in range(len(shape)))


def _pair_cost(a: str, b: str, out: str, sizes: dict[str, int], item: int) -> float:
    shapes = [tuple(sizes[i] for i in idx) for idx in (a, b, out)]
    args = [x for shape in shapes for x in (shape, _contiguous_strides(shape, item))]
    return gemm_layout.find_layout(a, b, out, *args, item=item).cost


def _step_costs(nodes: list[str], step: tuple, sizes: dict[str, int], item: int) -> float:
    """Forward and backward (one pair per input) cost of one pair step."""
    (x, w), z = step[1], step[2]
    cost = _pair_cost(nodes[x], nodes[w], nodes[z], sizes, item)
    cost += _pair_cost(nodes[z], nodes[w], nodes[x], sizes, item)
    cost += _pair_cost(nodes[z], nodes[x], nodes[w], sizes, item)
    return cost


def _consumer_orders(node: str, consumer: tuple, nodes: list[str], me: int) -> list[str]:
    """Orders of ``node`` shaped for the pair step reading it."""
    (x, w), z = consumer[1], consumer[2]
    other = nodes[w if x == me else x]
    out = nodes[z]
    shared = [i for i in out if i in node and i in other]
    free = [i for i in out if i in node and i not in other]
    contracted = [i for i in other if i in node and i not in out]
    return ["".join(shared + free + contracted), "".join(shared + contracted + free)]


def choose_orders(nodes: list[str], steps: list[tuple], fixed: set[int], sizes: dict[str, int],
                  item: int = 4) -> None:
    """Reorder, in place, the indices of the pair outputs in ``nodes`` not in ``fixed``.

    ``steps`` are the planner's raw steps (kind, inputs, output, spec, flops); their specs are
    rebuilt by the caller from the final ``nodes``.
    """
    readers: dict[int, list[tuple]] = {}
    for s in steps:
        for node in s[1]:
            readers.setdefault(node, []).append(s)
    for _ in range(PASSES):  # a node's best order depends on its neighbours' current orders
        if not any([_improve(nodes, step, readers, fixed, sizes, item) for step in steps]):
            break


def _improve(nodes: list[str], step: tuple, readers: dict[int, list[tuple]], fixed: set[int],
             sizes: dict[str, int], item: int) -> bool:
    """Give ``step``'s output its cheapest order; whether that changed it."""
    node = step[2]
    if step[0] != "pair" or node in fixed:
        return False
    touching = [step] + [r for r in readers.get(node, []) if r[0] == "pair"]
    largest = max(math.prod(sizes[i] for i in nodes[n]) for s in touching for n in s[1] + (s[2],))
    if len(touching) == 1 or largest < MIN_ELEMENTS:
        return False
    current = nodes[node]
    candidates = [current]
    for reader in touching[1:]:
        candidates += [c for c in _consumer_orders(current, reader, nodes, node) if c not in candidates]
    best, best_cost = current, math.inf
    for order in candidates:
        nodes[node] = order
        cost = sum(_step_costs(nodes, s, sizes, item) for s in touching)
        if cost < best_cost:
            best, best_cost = order, cost
    nodes[node] = best
    return best != current
