"""Einsum networks: parse an explicit equation and check it against operand shapes and dtypes.

    >>> net = parse("ab,bc->ac", [(2, 3), (3, 4)], ["float64", "float64"])
    >>> net.inputs, net.output, net.sizes["b"]
    (('ab', 'bc'), 'ac', 3)

Every check happens here, so a bad call fails with one message before any task exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

SUPPORTED_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Network:
    equation: str
    inputs: tuple[str, ...]
    output: str
    shapes: tuple[tuple[int, ...], ...]
    sizes: dict[str, int]
    dtype: np.dtype

    def __hash__(self) -> int:
        return hash((self.equation, self.shapes, self.dtype.str))


def parse(equation: str, shapes: Sequence[Sequence[int]], dtypes: Sequence[object]) -> Network:
    """Validate ``equation`` against the operands; raise ValueError/TypeError naming the problem."""
    if not isinstance(equation, str):
        raise TypeError(f"einsum: the equation must be a string, got {type(equation).__name__}")
    eq = equation.replace(" ", "")
    if "->" not in eq:
        raise ValueError(f"einsum: equation {equation!r} needs an explicit '->' output")
    if "..." in eq:
        raise ValueError(f"einsum: equation {equation!r}: ellipsis ('...') is not supported; "
                         "name every index")
    lhs, output = eq.split("->")
    inputs = tuple(lhs.split(","))
    for term in inputs + (output,):
        bad = [c for c in term if not c.isalpha()]
        if bad:
            raise ValueError(f"einsum: equation {equation!r}: index characters must be letters, got {bad[0]!r}")
    if len(inputs) != len(shapes):
        raise ValueError(f"einsum: equation {equation!r} has {len(inputs)} operand(s) but "
                         f"{len(shapes)} were given")
    if len(set(output)) != len(output):
        raise ValueError(f"einsum: equation {equation!r}: an output index is repeated")
    sizes: dict[str, int] = {}
    for k, (term, shape) in enumerate(zip(inputs, shapes)):
        shape = tuple(int(d) for d in shape)
        if len(term) != len(shape):
            raise ValueError(f"einsum: operand {k} has {len(shape)} dimension(s) {shape} but "
                             f"equation term {term!r} names {len(term)}")
        for index, dim in zip(term, shape):
            if dim <= 0:
                raise ValueError(f"einsum: operand {k} has an empty dimension {shape}")
            if sizes.setdefault(index, dim) != dim:
                raise ValueError(f"einsum: index {index!r} has size {sizes[index]} in one operand "
                                 f"and {dim} in operand {k} (equation {equation!r})")
    unknown = [i for i in output if i not in sizes]
    if unknown:
        raise ValueError(f"einsum: output index {unknown[0]!r} of {equation!r} is in no operand")
    kinds = {np.dtype(d) for d in dtypes}
    if len(kinds) != 1:
        raise TypeError(f"einsum: operands must share one dtype, got {sorted(str(k) for k in kinds)}")
    dtype = kinds.pop()
    if dtype.name not in SUPPORTED_DTYPES:
        raise TypeError(f"einsum: dtype {dtype} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    return Network(eq, inputs, output, tuple(tuple(int(d) for d in s) for s in shapes), sizes, dtype)
