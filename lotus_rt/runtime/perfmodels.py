"""Where StarPU keeps its performance models, and which lotus_rt codelets have been calibrated.

Every lotus_rt codelet has a history-based model named ``lotus_<codelet>``. StarPU measures
tasks of a codelet once a model-aware policy (dm, dmda, dmdas, heft, ...) has asked for their
expected length, and writes the measurements at shutdown to
``<dir>/codelets/<format>/lotus_<codelet>.<host>``, where ``<dir>`` is STARPU_PERF_MODEL_DIR,
or ``$STARPU_HOME/.starpu/sampling`` (STARPU_HOME defaults to HOME). Each entry of such a file
is one task footprint (codelet + data sizes + scalar arguments) with its sample count; StarPU
trusts an entry once it has STARPU_CALIBRATE_MINIMUM samples (10 by default).

This module only reads those text files: ``lotus_models()`` summarises them for ``lotus-rt info``.
"""
from __future__ import annotations

import pathlib
import socket
from dataclasses import dataclass
from typing import Mapping

DEVICE_TYPES = {"0": "cpu", "1": "cuda", "2": "opencl"}


@dataclass(frozen=True)
class ModelSummary:
    codelet: str  # without the "lotus_" prefix
    path: pathlib.Path
    devices: tuple[str, ...]
    footprints: int  # measured task sizes (entries), over every device
    calibrated: int  # entries with at least the calibration minimum of samples
    samples: int


def model_dir(env: Mapping[str, str]) -> pathlib.Path:
    """StarPU's model folder for ``env`` (the variables Settings read: STARPU_*, HOME)."""
    if env.get("STARPU_PERF_MODEL_DIR"):
        return pathlib.Path(env["STARPU_PERF_MODEL_DIR"])
    home = env.get("STARPU_HOME") or env.get("HOME") or str(pathlib.Path.home())
    return pathlib.Path(home) / ".starpu" / "sampling"


def _parse(path: pathlib.Path, minimum: int) -> tuple[tuple[str, ...], int, int, int]:
    devices: list[str] = []
    footprints = calibrated = samples = 0
    lines = path.read_text(errors="replace").splitlines()
    in_entries = False
    for k, line in enumerate(lines):
        if line.startswith("# device type") and k + 1 < len(lines):
            kind = DEVICE_TYPES.get(lines[k + 1].strip(), "other")
            if kind not in devices:
                devices.append(kind)
        if line.startswith("# hash"):
            in_entries = True
            continue
        if in_entries:
            fields = line.split()
            if line.startswith("#") or len(fields) != 8:
                in_entries = False
                continue
            n = int(float(fields[7]))
            footprints += 1
            samples += n
            calibrated += n >= minimum
    return tuple(devices), footprints, calibrated, samples


def lotus_models(env: Mapping[str, str]) -> list[ModelSummary]:
    """The lotus_rt codelet models StarPU saved for this host (empty when none yet)."""
    host = env.get("STARPU_HOSTNAME") or socket.gethostname()
    try:
        minimum = int(env.get("STARPU_CALIBRATE_MINIMUM", "10"))
    except ValueError:
        minimum = 10
    summaries = []
    for path in sorted((model_dir(env) / "codelets").glob(f"*/lotus_*.{host}")):
        devices, footprints, calibrated, samples = _parse(path, minimum)
        codelet = path.name[len("lotus_"):-len(host) - 1]
        summaries.append(ModelSummary(codelet, path, devices, footprints, calibrated, samples))
    return summaries
