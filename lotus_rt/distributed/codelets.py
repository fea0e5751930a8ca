"""The codelets of lotus_rt.distributed's own tasks (bodies in kernels/collective.py)."""
from __future__ import annotations

from lotus_rt.kernels import collective
from lotus_rt.runtime.core import Codelet

ADD_INTO = Codelet("mpi_add_into", cpu=collective.add_into_cpu, cuda=collective.add_into_gpu)
SCALE = Codelet("mpi_scale", cpu=collective.scale_cpu, cuda=collective.scale_gpu)
COPY = Codelet("mpi_copy", cpu=collective.copy_cpu, cuda=collective.copy_gpu)
