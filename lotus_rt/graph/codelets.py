"""The codelets of the whole-model graph: torch's kernels on the tasks' buffers (kernels/torch_ops.py)."""
from __future__ import annotations

from lotus_rt.kernels import torch_ops as ops
from lotus_rt.runtime.core import Codelet


def _codelet(name: str, body: str) -> Codelet:
    cpu, cuda = ops.BODIES[body]
    return Codelet(name, cpu=cpu, cuda=cuda)


CONV = _codelet("conv", "conv_forward")
CONV_DX = _codelet("conv_dx", "conv_backward_input")
CONV_DW = _codelet("conv_dw", "conv_backward_weight")
LINEAR = _codelet("linear", "linear_forward")
LINEAR_DX = _codelet("linear_dx", "linear_backward_input")
LINEAR_DW = _codelet("linear_dw", "linear_backward_weight")
RELU = _codelet("relu", "relu_forward")
RELU_DX = _codelet("relu_dx", "relu_backward")
GELU = _codelet("gelu", "gelu_forward")
GELU_DX = _codelet("gelu_dx", "gelu_backward")
DROPOUT = _codelet("dropout", "scale_forward")
DROPOUT_DX = _codelet("dropout_dx", "scale_backward")
MAXPOOL = _codelet("maxpool", "maxpool_forward")
MAXPOOL_DX = _codelet("maxpool_dx", "maxpool_backward")
AVGPOOL = _codelet("avgpool", "avgpool_forward")
AVGPOOL_DX = _codelet("avgpool_dx", "avgpool_backward")
ADD = _codelet("add", "add_forward")
PASS_DX = _codelet("pass_dx", "pass_gradient")
CAT = _codelet("cat", "cat_forward")
SLICE_DX = _codelet("slice_dx", "slice_gradient")
BN_PARTIAL = _codelet("bn_partial", "bn_partial")
BN_COMBINE = _codelet("bn_combine", "bn_combine")
BN_FINALIZE = _codelet("bn_finalize", "bn_finalize")
BN_EVAL_STATS = _codelet("bn_eval_stats", "bn_eval_stats")
BN_NORMALIZE = _codelet("bn_normalize", "bn_normalize")
BN_DX_PARTIAL = _codelet("bn_dx_partial", "bn_backward_partial")
BN_DX = _codelet("bn_dx", "bn_backward_input")
BN_DPARAMS = _codelet("bn_dparams", "bn_param_grads")
ADD_INTO = _codelet("add_into", "add_into")
COPY = _codelet("copy", "copy")
