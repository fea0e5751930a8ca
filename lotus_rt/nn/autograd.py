"""One torch.autograd.Function for every offloaded layer: torch sees a single op per layer.

``run_program(program, x, *params)`` hands NumPy views of the CPU tensors (zero copy) to
``lotus_rt.layers.forward`` and wraps the result back as a tensor; its backward calls
``lotus_rt.layers.backward`` with the output gradient. Everything in between is tasks on the
runtime; nothing on this path calls a torch convolution or matmul.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lotus_rt import layers


def _as_numpy(tensor: torch.Tensor, what: str) -> np.ndarray:
    if tensor.device.type != "cpu":
        # Not yet: device-resident layer data (runtime.register takes CUDA arrays; the layers'
        # own allocations and the conversion back to torch are host-only so far).
        raise ValueError(f"{what} is on {tensor.device}: offloaded layers take CPU tensors; "
                         "layers on CUDA tensors are not implemented yet (StarPU's CUDA workers "
                         "still run the tasks of CPU-tensor layers)")
    if tensor.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{what} has dtype {tensor.dtype}; offloaded layers take float32 or float64")
    return tensor.detach().contiguous().numpy()


class ProgramFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, program: layers.Program, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        arrays = [_as_numpy(x, "the input")] + [_as_numpy(p, "a parameter") for p in params]
        if len({a.dtype for a in arrays}) != 1:
            raise TypeError(f"input and parameters must share a dtype, got {sorted({str(a.dtype) for a in arrays})}")
        keep = any(ctx.needs_input_grad[1:])  # all False under torch.no_grad()
        y, state = layers.forward(program, arrays[0], arrays[1:], keep=keep)
        ctx.program, ctx.state = program, state
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        state = ctx.state
        if state is None:
            raise RuntimeError("lotus_rt: this layer's forward kept no state (it ran without gradients)")
        grads = layers.backward(ctx.program, state, _as_numpy(grad, "the output gradient"),
                           ctx.needs_input_grad[1:])
        return (None,) + tuple(None if g is None else torch.from_numpy(g) for g in grads)


def run_program(program: layers.Program, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    return ProgramFunction.apply(program, x, *params)
