"""Codelet bodies (CPU: NumPy, GPU: CuPy) used by lotus_rt's contraction engine and layers."""
