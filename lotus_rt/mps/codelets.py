"""The codelets of the DMRG sweeps, defined once per process (module level, like
``lotus_rt.tn.lower``): StarPU keys its C codelets and performance models by these objects."""
from __future__ import annotations

from lotus_rt.kernels import mps as k
from lotus_rt.runtime.core import Codelet

ENV_LEFT = Codelet("mps_env_left", cpu=k.env_left_cpu, cuda=k.env_left_gpu)
ENV_RIGHT = Codelet("mps_env_right", cpu=k.env_right_cpu, cuda=k.env_right_gpu)
BOND_GRAD = Codelet("mps_bond_grad", cpu=k.bond_grad_cpu, cuda=k.bond_grad_gpu)
BOND_HV = Codelet("mps_bond_hv", cpu=k.bond_hv_cpu, cuda=k.bond_hv_gpu)
MERGE = Codelet("mps_merge", cpu=k.merge_cpu, cuda=k.merge_gpu)
CG_INIT = Codelet("mps_cg_init", cpu=k.cg_init_cpu, cuda=k.cg_init_gpu)
CG_STEP = Codelet("mps_cg_step", cpu=k.cg_step_cpu, cuda=k.cg_step_gpu)
GD_STEP = Codelet("mps_gd_step", cpu=k.gd_step_cpu, cuda=k.gd_step_gpu)
SPLIT = Codelet("mps_svd_split", cpu=k.split_cpu, cuda=k.split_gpu)
SPLIT_MATRIX = Codelet("mps_svd_split_matrix", cpu=k.split_matrix_cpu, cuda=k.split_matrix_gpu)
PREDICT = Codelet("mps_predict", cpu=k.predict_cpu, cuda=k.predict_gpu)
ADD = Codelet("mps_add", cpu=k.add_cpu, cuda=k.add_gpu)
LABEL_COPY = Codelet("mps_label_copy", cpu=k.label_copy_cpu, cuda=k.label_copy_gpu)
