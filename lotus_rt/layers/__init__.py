"""Layers as task programs: how each layer's forward and backward is cut into tiles and tasks.

    >>> import numpy as np
    >>> from lotus_rt import layers
    >>> program = layers.Program("bi,oi->bo", 1)               # a dense linear layer, no bias
    >>> x, w = np.ones((4, 3)), np.ones((2, 3))
    >>> y, state = layers.forward(program, x, [w], keep=True)
    >>> dx, dw = layers.backward(program, state, np.ones((4, 2)), [True, True])
    >>> y[0, 0], dw[0, 0]
    (3.0, 4.0)

``forward`` picks, from the runtime's settings and the layer's FLOPs, between a fused pass (one
task per batch tile: ``layers.fused``) and a DAG of contraction tasks per tile (``layers.dag``);
``batch_tiles`` (``layers.tiles``) cuts the batch. Arrays are NumPy; the torch side is
``lotus_rt.nn``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lotus_rt.layers import dag, fused
from lotus_rt.layers.program import ConvGeometry, Program, check_parameter_count, program_plans, unfolded_shape
from lotus_rt.layers.tiles import FUSED_SPLIT_FLOPS, batch_tiles, use_fused
from lotus_rt.runtime import runtime

State = dag.State | fused.FusedState

__all__ = ["Program", "ConvGeometry", "forward", "backward", "batch_tiles", "unfolded_shape", "State"]


def forward(program: Program, x: np.ndarray, params: Sequence[np.ndarray], keep: bool) -> tuple[np.ndarray, State | None]:
    """Run the program on ``x``; with ``keep``, also return the State ``backward`` needs."""
    check_parameter_count(program, params)
    rt = runtime()
    settings = rt.settings
    pre, main = program_plans(program, x.shape, [p.shape for p in params], x.dtype, rt)  # validates shapes
    flops = main.flops + (pre.flops if pre is not None else 0.0)
    y = np.empty(main.shape(main.output_node), x.dtype)
    if use_fused(settings, flops):
        tiles = batch_tiles(x.shape[0], flops, len(rt.workers), settings.tile, FUSED_SPLIT_FLOPS)
        return y, fused.forward(rt, program, x, params, y, tiles, keep)
    tiles = batch_tiles(x.shape[0], flops, len(rt.workers), settings.tile)
    return y, dag.forward(rt, program, x, params, y, tiles, keep)


def backward(program: Program, state: State, grad: np.ndarray, needs: Sequence[bool]) -> list[np.ndarray | None]:
    """Gradients for (x, *params) where ``needs`` is True (None elsewhere), as tasks."""
    needs = list(needs) + [False] * (1 + program.n_params - len(needs))
    if isinstance(state, fused.FusedState):
        return fused.backward(state, grad, needs)
    return dag.backward(program, state, grad, needs)
