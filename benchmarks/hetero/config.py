"""The hetero scenario's settings: policies, worker mixes, workload sizes (full and --quick), targets."""
from __future__ import annotations

import argparse
import copy
from typing import Any, Sequence

SCENARIO = "hetero"
POLICIES = ("dmda", "dmdas", "eager", "ws", "lws")  # model-based first: the targets are about dmda
QUICK_POLICIES = ("dmda", "eager")
MODEL_POLICIES = ("dmda", "dmdas")  # read the history-based models: calibrated first
CALIBRATION_POLICY = "dmda"
MIXES: dict[str, dict[str, str]] = {
    "cpu": {"STARPU_NCUDA": "0"},
    "gpu": {"STARPU_NCPU": "0", "STARPU_NCUDA": "1"},
    "hybrid": {"STARPU_NCUDA": "1"},
}
SINGLE_DEVICE = ("cpu", "gpu")
WORKLOADS = ("gemm", "tt", "tucker")
# inherited settings a mix must not pick up from the caller's environment (STARPU_NCPU is left to
# the caller: it bounds the CPU workers of the cpu and hybrid mixes)
CLEARED_VARS = ("STARPU_SCHED", "STARPU_CALIBRATE", "STARPU_NCUDA", "STARPU_PERF_MODEL_DIR")

GEMM_CODELET_TARGET = 0.9     # codelet time >= 0.9x cupy.matmul's speed
HYBRID_FLOOR = 1.0            # hybrid dmda vs best single device, every workload
HYBRID_BALANCED_TARGET = 1.1  # ... where balanced
BALANCED_IDEAL = 1.25         # balanced: a perfect split would gain >= 25%
CHECK_ROWS = 64               # GEMM rows checked against float64 NumPy
LAYER_CHAIN = 8               # a layer step's error allowance, in single-GEMM tolerances

FULL = {
    "gemm": {"size": 8192, "tile": 1024, "dtype": "float32"},
    "single_gemm": {"size": 8192, "dtype": "float32", "repeats": 5},
    "tt": {"in_shape": [8, 8, 8, 8], "out_shape": [8, 8, 8, 8], "rank": 16, "batch": 1024, "check_batch": 64},
    "tucker": {"in_channels": 128, "out_channels": 256, "kernel": 3, "ranks": [64, 128], "image": 32,
               "batch": 64, "check_batch": 8},
    "steps": 3, "repeats": 3, "calibration_repeats": 2, "reference_repeats": 5, "timeout": 150.0,
}
QUICK = {
    "gemm": {"size": 256, "tile": 128, "dtype": "float32"},
    "single_gemm": {"size": 512, "dtype": "float32", "repeats": 3},
    "tt": {"in_shape": [4, 4, 4], "out_shape": [4, 4, 4], "rank": 4, "batch": 16, "check_batch": 16},
    "tucker": {"in_channels": 8, "out_channels": 16, "kernel": 3, "ranks": [4, 8], "image": 8,
               "batch": 8, "check_batch": 8},
    "steps": 1, "repeats": 2, "calibration_repeats": 1, "reference_repeats": 3, "timeout": 90.0,
}


def configuration(args: argparse.Namespace) -> dict[str, Any]:
    cfg = copy.deepcopy(QUICK if args.quick else FULL)
    if args.gemm_size:
        cfg["gemm"]["size"] = args.gemm_size
    if args.gemm_tile:
        cfg["gemm"]["tile"] = args.gemm_tile
    if args.dtype:
        cfg["gemm"]["dtype"] = cfg["single_gemm"]["dtype"] = args.dtype
    if args.single_size:
        cfg["single_gemm"]["size"] = args.single_size
    if args.tt_batch:
        cfg["tt"]["batch"] = args.tt_batch
        cfg["tt"]["check_batch"] = min(cfg["tt"]["check_batch"], args.tt_batch)
    if args.conv_batch:
        cfg["tucker"]["batch"] = args.conv_batch
        cfg["tucker"]["check_batch"] = min(cfg["tucker"]["check_batch"], args.conv_batch)
    for key in ("repeats", "steps"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    if args.timeout:
        cfg["timeout"] = args.timeout
    return cfg


def _split(text: str | None, default: Sequence[str], valid: Sequence[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()] if text else list(default)
    unknown = [t for t in items if t not in valid]
    if unknown:
        raise SystemExit(f"hetero: unknown {what} {', '.join(unknown)}; valid: {', '.join(valid)}")
    return items
