"""Every codelet lotus_rt submits, with fresh random arguments: shared by tests/test_gpu.py and
the StarPU subprocesses it starts (so it imports nothing from conftest).

A :class:`Case` is a codelet (CPU body, CUDA body), its arrays with their access modes, its
keyword arguments, and ``chain``: how many GEMMs feed one output (tolerances scale with it).
Operands are scaled so that each GEMM output is of order one (``kernels/precision.tolerance``
assumes that).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lotus_rt.kernels import contract, conv
import lotus_rt
from lotus_rt import layers
from lotus_rt.layers import codelets
from lotus_rt.layers.fused import fused_program
from lotus_rt.tn.lower import ADD, PAIR, UNARY
from lotus_rt.workloads import GEMM, GEMM_ACC

# (a indices, b indices, out indices): plain, stored transposed (either operand), output
# swapped, batched, and the shapes the layers produce (1x1 convolution, weight gradient summed
# over samples, a TT core step).
PAIR_EQUATIONS = ["ik,kj->ij", "ki,kj->ij", "ik,jk->ij", "ik,kj->ji", "bik,bkj->bij", "bki,bkj->bji",
                  "nchw,cr->nrhw", "nohw,nchw->oc", "zac,xaiy->zcxiy"]
SIZES = dict(i=24, j=20, k=48, b=3, n=2, c=5, h=6, w=7, r=4, o=6, z=3, a=8, x=2, y=3)


@dataclass
class Case:
    name: str
    codelet: Any
    arrays: list[np.ndarray]
    modes: list[str]
    kwargs: dict[str, Any] = field(default_factory=dict)
    chain: int = 1

    @property
    def outputs(self) -> list[int]:
        return [k for k, mode in enumerate(self.modes) if mode != "R"]

    def run(self, body: str, xp: Any = np) -> list[np.ndarray]:
        """Run the ``body`` ("cpu" or "cuda") on copies of the arrays (moved to ``xp``'s
        device); returns the outputs as NumPy arrays."""
        arrays = [xp.asarray(a.copy()) for a in self.arrays]
        getattr(self.codelet, body)(*arrays, **self.kwargs)
        return [np.asarray(arrays[k].get() if hasattr(arrays[k], "get") else arrays[k]) for k in self.outputs]


def _normal(rng: np.random.Generator, shape, dtype, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(dtype)


def pair_case(rng: np.random.Generator, dtype, equation: str, slices: bool = False) -> Case:
    lhs, out_idx = equation.split("->")
    a_idx, b_idx = lhs.split(",")
    contracted = [i for i in a_idx if i in b_idx and i not in out_idx]
    scale = math.prod(SIZES[i] for i in contracted) ** -0.25
    a = _normal(rng, [SIZES[i] for i in a_idx], dtype, scale)
    b = _normal(rng, [SIZES[i] for i in b_idx], dtype, scale)
    out = np.zeros([SIZES[i] for i in out_idx], dtype)
    kwargs: dict[str, Any] = {"spec": contract.pair_spec(a_idx, b_idx, out_idx)}
    if slices:  # a slab of a whole registered operand, as batch tiles read them
        kwargs.update(a_slice=(0, 2, 9), out_slice=(out_idx.index(a_idx[0]), 2, 9))
    return Case(f"pair {equation}{' sliced' if slices else ''}", PAIR, [a, b, out], ["R", "R", "W"], kwargs)


# (program, parameter shapes, input shape, output shape) of a Tucker-2 convolution (the layer's
# own program: 1x1, 3x3 with stride (2, 1) and padding 1, 1x1, bias) and of a two-core TT linear
# layer (the r_0 = r_2 = 1 indices x and w summed away, bias over the two output axes).
TUCKER = (layers.Program("rijnpq,srij,os->nopq", 2, pre="nchw,cr->nrhw", n_pre=1, bias=True,
                             conv=layers.ConvGeometry((3, 3), (2, 1), (1, 1), (1, 1))),
          [(6, 4), (5, 4, 3, 3), (7, 5), (7,)], (3, 6, 9, 8), (3, 7, 5, 8))
TT = (layers.Program("zab,xaiy,ybjw->zij", 2, bias=True, bias_axis=1, bias_span=2),
      [(1, 4, 3, 2), (2, 5, 4, 1), (3, 4)], (6, 4, 5), (6, 3, 4))


def fused_cases(rng: np.random.Generator, dtype) -> list[Case]:
    cases = []
    for label, (program, shapes, x_shape, y_shape) in (("tucker", TUCKER), ("tt", TT)):
        x = _normal(rng, x_shape, dtype, 0.5)
        packed = np.concatenate([_normal(rng, s, dtype, 0.5).reshape(-1) for s in shapes])
        kwargs = {"program": fused_program(program, x_shape, shapes, dtype, lotus_rt.runtime()),
                  "key": label, "precision": "auto"}
        cases.append(Case(f"fused forward {label}", codelets.FUSED_FORWARD, [x, packed, np.zeros(y_shape, dtype)],
                          ["R", "R", "W"], kwargs, chain=4))
        grad = _normal(rng, y_shape, dtype)
        needs = tuple([True] * (1 + len(shapes)))
        cases.append(Case(f"fused backward {label}", codelets.FUSED_BACKWARD,
                          [x, packed, grad, np.zeros_like(x), np.zeros_like(packed)],
                          ["R", "R", "R", "W", "W"], dict(kwargs, needs=needs), chain=8))
    return cases


def cases(rng: np.random.Generator, dtype) -> list[Case]:
    """One case per codelet (several for the pairwise contraction), fresh random inputs."""
    dtype = np.dtype(dtype)
    out = [pair_case(rng, dtype, eq) for eq in PAIR_EQUATIONS]
    out.append(pair_case(rng, dtype, "ik,kj->ij", slices=True))
    m = _normal(rng, (SIZES["i"], SIZES["j"]), dtype)
    out.append(Case("unary ij->j", UNARY, [m, np.zeros(SIZES["j"], dtype)], ["R", "W"],
                    {"spec": contract.UnarySpec("einsum", "ij->j")}))
    out.append(Case("unary broadcast j->ij", UNARY, [m[0].copy(), np.zeros_like(m)], ["R", "W"],
                    {"spec": contract.broadcast_spec("j", "ij")}))
    out.append(Case("add", ADD, [m, _normal(rng, m.shape, dtype)], ["R", "RW"]))
    k = 64
    a, b = _normal(rng, (32, k), dtype, k ** -0.25), _normal(rng, (k, 40), dtype, k ** -0.25)
    out.append(Case("gemm", GEMM, [a, b, np.zeros((32, 40), dtype)], ["R", "R", "W"]))
    out.append(Case("gemm_acc", GEMM_ACC, [a, b, _normal(rng, (32, 40), dtype)], ["R", "R", "RW"]))
    geometry = dict(kernel=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    x = _normal(rng, (2, 3, 9, 8), dtype)
    cols_shape = conv.columns_shape(x.shape, **geometry)
    out.append(Case("conv unfold", codelets.UNFOLD, [x, np.zeros(cols_shape, dtype)], ["R", "W"], geometry))
    out.append(Case("conv fold", codelets.FOLD, [_normal(rng, cols_shape, dtype), np.zeros_like(x)],
                    ["R", "W"], geometry))
    y = _normal(rng, (2, 5, 4, 3), dtype)
    out.append(Case("bias add", codelets.BIAS_ADD, [_normal(rng, (5,), dtype), y], ["R", "RW"],
                    {"axis": 1, "span": 1}))
    out.append(Case("bias grad", codelets.BIAS_GRAD, [y, np.zeros(5, dtype)], ["R", "W"], {"axis": 1, "span": 1}))
    return out + fused_cases(rng, dtype)
