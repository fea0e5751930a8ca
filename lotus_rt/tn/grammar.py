"""The einsum grammar users write, turned into the canonical equations the planner takes.

What is accepted (everything ``numpy.einsum`` accepts, plus what opt_einsum adds):

- ``"ij,jk->ik"`` (explicit output) and ``"ij,jk"`` (implicit output: the indices that occur
  once, sorted by character, after the broadcast dimensions of ``...`` when there are any);
  spaces anywhere are ignored.
- ``...`` once per term: the operand's leading dimensions that the term does not name, aligned
  from the right and broadcast against each other as NumPy broadcasts shapes. An explicit output
  without ``...`` sums those dimensions (opt_einsum's reading; numpy refuses it when there are any).
- Size-1 broadcasting: an index of size 1 in one operand and n in another takes size n, the
  size-1 operand being constant along it (numpy's rule). An index repeated inside one operand
  (a diagonal) needs equal sizes there, as in numpy.
- Any letter: ASCII letters stand for themselves; every other non-ASCII character, and every
  broadcast dimension of ``...``, is given an unused ASCII letter once, here. At most 52 distinct
  indices (numpy's limit too). ASCII characters that are not letters (digits, ``_``, ...) are
  refused.
- Scalars: Python numbers and 0-d arrays are operands whose term is empty (``",ij->ij"``) or
  ``...``.
- The interleaved form ``einsum(op0, sublist0, op1, sublist1, ..., [sublist_out])``: sublists
  of non-negative ints and ``Ellipsis``; int k stands for the k-th of A-Z, a-z (numpy's order,
  so an implicit output sorts as numpy sorts it), ints from 52 on for non-ASCII characters in
  the same order (opt_einsum allows them; numpy stops at 52).

How. ``split_call`` turns a call's arguments into an equation string and operands (per call;
cheap). ``canonicalize(equation, shapes, dtypes)`` is a pure function of what a plan is keyed
by: it checks everything that can be checked from the equation, the shapes and the dtypes
(every error names the operand and the index, in the user's letters) and returns a
``Canonical``: an explicit equation over ASCII letters with no ``...``, the operand axes to
squeeze away (size-1 axes broadcast against a larger size: the squeezed operand is constant along
that index, so dropping the index from its term is exact), the output shape, and the dtypes.
``tn.plan`` caches it with the plan (the one plan cache), so a repeated call does none of this.
``prepare_operands`` applies it to the arrays of one call.

Dtypes. The result dtype is numpy's, ``np.result_type`` of the operands as arrays (a Python
float is a float64 0-d array there, as in ``numpy.einsum``). The engine computes in float32 or
float64: float16/float32 results are computed in float32, float64 in float64 (float16 is
rounded from float32, at least as accurate as numpy). Integer and bool results are computed in
float64 and cast back: exact as long as no partial sum can exceed 2**53, which is checked per
call from the operands' largest magnitudes (``prepare_operands``; a ValueError before any task
otherwise); the cast wraps as numpy's integer arithmetic does (``int8`` sums are modulo 2**8).
Complex, long double, object, string and time dtypes are refused (TypeError naming the operand).
"""
from __future__ import annotations

import math
import numbers
import string
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

INTERNAL = string.ascii_letters  # the internal alphabet: 52 ASCII letters
EXACT_LIMIT = 2.0 ** 53  # float64 adds integers exactly below this
_ASCII_LETTERS = frozenset(INTERNAL)
_FLOAT_COMPUTE = {"float16": np.dtype(np.float32), "float32": np.dtype(np.float32),
                  "float64": np.dtype(np.float64)}


@dataclass(frozen=True)
class Canonical:
    """A user's einsum in canonical form (see the module docstring)."""

    equation: str  # explicit, ASCII letters only, no '...'
    in_shapes: tuple[tuple[int, ...], ...]  # the operands' own shapes
    shapes: tuple[tuple[int, ...], ...]  # operand shapes once the ``squeeze`` axes are dropped
    squeeze: tuple[tuple[int, ...], ...]  # per operand, the size-1 axes broadcast away
    out_shape: tuple[int, ...]
    compute_dtype: np.dtype  # float32 or float64: what the tasks compute in
    result_dtype: np.dtype  # numpy's result dtype
    dtypes: tuple[np.dtype, ...]  # the operands' own dtypes
    summed_terms: int  # products summed per output element (for the integer exactness check)
    empty: bool  # some index has size 0: the result is zeros, no task runs
    identity: bool  # operands go to the engine as they are (no squeeze, no cast)

    @property
    def exact_integers(self) -> bool:
        """Whether the result is an integer/bool dtype computed in float64 and cast back."""
        return self.result_dtype.kind in "biu"


# ------------------------------------------------------------------------------ call forms

def _sublist_symbol(k: Any, where: str) -> str:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or k < 0:
        raise TypeError(f"einsum: {where}: a subscript must be a non-negative int or Ellipsis, got {k!r}")
    k = int(k)
    if k < 26:
        return chr(ord("A") + k)
    if k < 52:
        return chr(ord("a") + k - 26)
    code = 192 + (k - 52)
    if code >= 0xD800:  # skip the surrogates
        code += 0x800
    if code > 0x10FFFF:
        raise ValueError(f"einsum: {where}: subscript {k} is too large")
    return chr(code)


def _sublist_term(sub: Any, where: str) -> str:
    if isinstance(sub, (str, bytes)) or not isinstance(sub, (list, tuple)):
        raise TypeError(f"einsum: {where} must be a list of ints (and Ellipsis), got {type(sub).__name__}")
    return "".join("..." if s is Ellipsis else _sublist_symbol(s, where) for s in sub)


def split_call(first: Any, rest: Sequence[Any]) -> tuple[str, list[Any]]:
    """``(equation, operands)`` from ``einsum(first, *rest)`` in either form.

    ``first`` a string: the equation, then the operands. Otherwise the interleaved form
    ``op, sublist, op, sublist, ..., [output sublist]``, turned into an equation string.
    """
    if isinstance(first, str):
        return first, list(rest)
    if isinstance(first, (bytes, bytearray)):
        raise TypeError("einsum: the equation must be a str, not bytes")
    if isinstance(first, (list, tuple)) and first and all(isinstance(s, numbers.Integral) or s is Ellipsis
                                                          for s in first):
        raise TypeError(f"einsum: the first argument {first!r} looks like a sublist; the interleaved form "
                        "is einsum(operand, sublist, operand, sublist, ..., [output sublist])")
    args = [first, *rest]
    if len(args) < 2:
        raise TypeError(f"einsum: got a {type(first).__name__} and nothing else; call einsum(equation, *operands) "
                        "or einsum(operand, sublist, ..., [output sublist])")
    operands, terms = args[0::2], []
    output = None
    if len(args) % 2:  # an odd count: the last argument is the output sublist
        output = _sublist_term(args[-1], "the output sublist")
        operands = operands[:-1]
    for k, sub in enumerate(args[1::2]):
        terms.append(_sublist_term(sub, f"the sublist of operand {k}"))
    return ",".join(terms) + ("" if output is None else "->" + output), operands


# ------------------------------------------------------------------------------ canonical form

def _check_chars(term: str, where: str, equation: str) -> None:
    body = term.replace("...", "", 1)
    if "." in body:
        raise ValueError(f"einsum: equation {equation!r}: {where} {term!r} has a '.' outside a single "
                         "'...' (one ellipsis per term)")
    for c in body:
        if c.isascii() and c not in _ASCII_LETTERS:
            raise ValueError(f"einsum: equation {equation!r}: {where} {term!r} has the character {c!r}; "
                             "indices are letters (ASCII or any non-ASCII character)")


def canonicalize(equation: str, shapes: Sequence[Sequence[int]], dtypes: Sequence[Any]) -> Canonical:
    """Check a user's einsum against its operands' shapes and dtypes; its canonical form.

    Raises ValueError (equation, shapes) or TypeError (types, dtypes) naming the operand and the
    index; see the module docstring for what is accepted.
    """
    if not isinstance(equation, str):
        raise TypeError(f"einsum: the equation must be a string, got {type(equation).__name__}")
    shapes = [tuple(int(d) for d in s) for s in shapes]
    nops = len(shapes)
    eq = "".join(equation.split())
    if eq.count("->") > 1 or eq.replace("->", "").count("-") or eq.replace("->", "").count(">"):
        raise ValueError(f"einsum: equation {equation!r}: '-' and '>' may only appear once, as the "
                         "output arrow '->'")
    explicit = "->" in eq
    lhs, output = eq.split("->") if explicit else (eq, None)
    terms = lhs.split(",")
    if nops == 0:
        raise ValueError(f"einsum: equation {equation!r} was given no operand")
    if len(terms) != nops:
        raise ValueError(f"einsum: equation {equation!r} has {len(terms)} operand term(s) but "
                         f"{nops} operand(s) were given")
    for k, term in enumerate(terms):
        _check_chars(term, f"the term of operand {k}", equation)
    if output is not None:
        _check_chars(output, "the output", equation)

    # ellipsis: how many dimensions it covers in each operand
    ell_dims = []
    for k, (term, shape) in enumerate(zip(terms, shapes)):
        named = len(term) - 3 if "..." in term else len(term)
        if "..." in term:
            if named > len(shape):
                raise ValueError(f"einsum: operand {k} has {len(shape)} dimension(s) {shape} but its term "
                                 f"{term!r} names {named} besides '...'")
            ell_dims.append(len(shape) - named)
        else:
            if named != len(shape):
                hint = " (use '...' for the dimensions it does not name)" if named < len(shape) else ""
                raise ValueError(f"einsum: operand {k} has {len(shape)} dimension(s) {shape} but its term "
                                 f"{term!r} names {named}{hint}")
            ell_dims.append(0)
    nell = max(ell_dims)

    # the letters: ASCII ones stay, the others and the ellipsis dimensions get unused ASCII letters
    user_chars = list(dict.fromkeys(c for t in terms + ([output] if output else []) for c in t.replace("...", "")))
    if output is not None:
        missing = [c for c in output.replace("...", "") if c not in "".join(terms)]
        if missing:
            raise ValueError(f"einsum: equation {equation!r}: output index {missing[0]!r} is in no operand term")
        body = output.replace("...", "")
        repeated = [c for c in body if body.count(c) > 1]
        if repeated:
            raise ValueError(f"einsum: equation {equation!r}: output index {repeated[0]!r} is repeated")
    pool = iter(c for c in INTERNAL if c not in user_chars)
    need = sum(1 for c in user_chars if c not in _ASCII_LETTERS) + nell
    free = sum(1 for c in INTERNAL if c not in user_chars)
    if need > free:
        raise ValueError(f"einsum: equation {equation!r} uses {len(user_chars)} distinct indices and '...' covers "
                         f"{nell} dimension(s): more than the {len(INTERNAL)} indices lotus_rt (and numpy) support")
    mapping = {c: (c if c in _ASCII_LETTERS else next(pool)) for c in user_chars}
    ell = [next(pool) for _ in range(nell)]
    user = {v: f"index {k!r}" for k, v in mapping.items()}
    user.update({c: f"dimension {j - nell} of '...'" for j, c in enumerate(ell)})

    def expand(term: str, ndims: int) -> list[str]:
        if "..." not in term:
            return [mapping[c] for c in term]
        head, tail = term.split("...")
        return [mapping[c] for c in head] + ell[nell - ndims:] + [mapping[c] for c in tail]

    full_terms = [expand(t, n) for t, n in zip(terms, ell_dims)]
    if output is None:
        counts: dict[str, int] = {}
        for t in terms:
            for c in t.replace("...", ""):
                counts[c] = counts.get(c, 0) + 1
        out = ell + [mapping[c] for c in sorted(c for c, n in counts.items() if n == 1)]
    else:
        out = expand(output, nell) if "..." in output else [mapping[c] for c in output]

    # sizes, with numpy's broadcasting of size-1 dimensions
    sizes: dict[str, int] = {}
    first_seen: dict[str, tuple[int, int]] = {}
    for k, (term, shape) in enumerate(zip(full_terms, shapes)):
        within: dict[str, int] = {}
        for letter, dim in zip(term, shape):
            if within.setdefault(letter, dim) != dim:
                raise ValueError(f"einsum: operand {k} repeats {user[letter]} with sizes "
                                 f"{within[letter]} and {dim} (a diagonal needs equal sizes)")
        for letter, dim in within.items():
            known = sizes.get(letter)
            if known is None or known == 1:
                if known is None or dim != 1:
                    sizes[letter], first_seen[letter] = dim, (k, dim)
            elif dim not in (1, known):
                j, d = first_seen[letter]
                raise ValueError(f"einsum: {user[letter]} has size {d} in operand {j} and {dim} in "
                                 f"operand {k} (equation {equation!r}); sizes must match or be 1")
    squeeze, canon_terms, canon_shapes = [], [], []
    for term, shape in zip(full_terms, shapes):
        axes = tuple(a for a, (letter, dim) in enumerate(zip(term, shape)) if dim == 1 and sizes[letter] != 1)
        squeeze.append(axes)
        canon_terms.append("".join(letter for a, letter in enumerate(term) if a not in axes))
        canon_shapes.append(tuple(d for a, d in enumerate(shape) if a not in axes))
    canon_out = "".join(out)
    out_shape = tuple(sizes[c] for c in out)

    result_dtype, compute = _dtypes(dtypes)
    summed = math.prod(sizes[c] for c in sizes if c not in canon_out)
    empty = any(d == 0 for d in sizes.values())
    dts = tuple(np.dtype(d) for d in dtypes)
    identity = not any(squeeze) and all(d == compute for d in dts)
    return Canonical(",".join(canon_terms) + "->" + canon_out, tuple(shapes), tuple(canon_shapes), tuple(squeeze), out_shape,
                     compute, result_dtype, dts, int(summed), empty, identity)


def _dtypes(dtypes: Sequence[Any]) -> tuple[np.dtype, np.dtype]:
    """(numpy's result dtype, the float dtype the tasks compute in); TypeError naming the operand."""
    dts = [np.dtype(d) for d in dtypes]
    for k, dt in enumerate(dts):
        if dt.kind == "c":
            raise TypeError(f"einsum: operand {k} is {dt}: complex einsums are not supported (lotus_rt computes "
                            "in float32/float64); contract the real and imaginary parts separately")
        if dt.kind not in "biuf" or (dt.kind == "f" and dt.name not in _FLOAT_COMPUTE):
            raise TypeError(f"einsum: operand {k} has dtype {dt}, which lotus_rt cannot compute in; supported: "
                            "float16/32/64 (computed in float32/float64), integers and bool (computed exactly "
                            "in float64)")
    result = np.result_type(*dts)
    compute = _FLOAT_COMPUTE.get(result.name, np.dtype(np.float64))
    return result, compute


# ------------------------------------------------------------------------------ per call

def as_array(op: Any, k: int) -> np.ndarray:
    """A NumPy array for one (non-torch) operand: arrays as they are, numbers and sequences via
    ``np.asarray`` (as numpy.einsum converts them); anything else is a TypeError."""
    if isinstance(op, np.ndarray):
        return op
    if isinstance(op, (numbers.Number, np.generic, list, tuple)):
        try:
            return np.asarray(op)
        except ValueError as exc:  # ragged nested lists
            raise TypeError(f"einsum: operand {k} cannot be made an array: {exc}") from None
    raise TypeError(f"einsum: operand {k} is a {type(op).__name__}, not a numpy array, torch tensor, "
                    "number or list")


def prepare_operands(canon: Canonical, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The arrays the tasks read: squeezed, cast to the compute dtype, C-contiguous.

    For an integer/bool result, checks that float64 computes it exactly (ValueError otherwise).
    """
    if canon.exact_integers and not canon.empty:
        bound = float(canon.summed_terms)
        for a in arrays:
            bound *= float(np.max(np.abs(a.astype(np.float64, copy=False)))) if a.size else 0.0
        if bound >= EXACT_LIMIT:
            raise ValueError(f"einsum: an integer result ({canon.result_dtype}) whose partial sums may reach "
                             f"{bound:.3g} >= 2**53 cannot be computed exactly in float64; cast the operands "
                             "to float64 (or use numpy.einsum for wrap-around integer arithmetic)")
    if canon.identity:
        return [a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in arrays]
    out = []
    for a, axes, shape in zip(arrays, canon.squeeze, canon.shapes):
        if axes:
            a = a.reshape(shape) if a.flags.c_contiguous else a.squeeze(axis=axes)
        out.append(np.asarray(a, dtype=canon.compute_dtype, order="C"))  # (ascontiguousarray makes 0-d 1-d)
    return out


def finish_result(canon: Canonical, out: np.ndarray) -> np.ndarray:
    """The computed result in numpy's result dtype (integers: exact values, wrapped as numpy wraps)."""
    dtype = canon.result_dtype
    if out.dtype == dtype:
        return out
    if dtype.kind == "b":
        return out.astype(bool)  # nonzero: some product was true (astype keeps a 0-d array an array)
    if dtype.kind in "iu":
        np.rint(out, out=out)
        return out.astype(np.int64).astype(dtype)  # through int64: wraps as numpy's int arithmetic does
    return out.astype(dtype)
