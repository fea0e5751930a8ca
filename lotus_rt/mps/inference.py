"""Scores of a trained MPS for a batch of samples, as one task per batch tile.

Each ``mps_predict`` task walks the whole chain for its samples: left environments from site 0
to the centre, right environments from site N-1 to the centre (normalised per sample, as in
training), then contracts both with the labelled centre. The site tensors are registered as one
read-only (N, D, d, D) array shared by every tile.
"""
from __future__ import annotations

import numpy as np

from lotus_rt.mps import codelets as cl
from lotus_rt.mps import features
from lotus_rt.mps.environments import tile_ranges
from lotus_rt.mps.state import MPSState
from lotus_rt.runtime import Runtime


def scores(rt: Runtime, state: MPSState, pixels: np.ndarray, feature_map: str, ntiles: int) -> np.ndarray:
    """(n, L) scores of ``pixels`` (n, N) in [0, 1]; the arg-max over L is the predicted class."""
    feats = features.sample_major(pixels, feature_map, state.dtype)
    out = np.empty((feats.shape[0], state.n_labels), dtype=state.dtype)
    handles = [rt.register(state.sites), rt.register(state.center)]
    try:
        for t, (a, b) in enumerate(tile_ranges(feats.shape[0], ntiles)):
            hf, ho = rt.register(feats[a:b]), rt.register(out[a:b])
            handles += [hf, ho]
            rt.submit(cl.PREDICT, (hf, "R"), (handles[0], "R"), (handles[1], "R"), (ho, "W"),
                      name=f"predict[{t}]", center_site=state.center_site)
        rt.wait()
    finally:
        for h in handles:
            h.unregister()
    return out
