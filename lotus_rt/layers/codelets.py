"""The codelets of the layer passes beside the contraction ones (``lotus_rt.tn.lower``)."""
from __future__ import annotations

from lotus_rt.kernels import conv as conv_kernels
from lotus_rt.kernels import fused as fused_kernels
from lotus_rt.runtime.core import Codelet

UNFOLD = Codelet("conv_unfold", cpu=conv_kernels.unfold_cpu, cuda=conv_kernels.unfold_gpu)
FOLD = Codelet("conv_fold", cpu=conv_kernels.fold_cpu, cuda=conv_kernels.fold_gpu)
BIAS_ADD = Codelet("bias_add", cpu=conv_kernels.bias_add_cpu, cuda=conv_kernels.bias_add_gpu)
BIAS_GRAD = Codelet("bias_grad", cpu=conv_kernels.bias_grad_cpu, cuda=conv_kernels.bias_grad_gpu)
FUSED_FORWARD = Codelet("layer_forward", cpu=fused_kernels.forward_cpu, cuda=fused_kernels.forward_gpu)
FUSED_BACKWARD = Codelet("layer_backward", cpu=fused_kernels.backward_cpu, cuda=fused_kernels.backward_gpu)
