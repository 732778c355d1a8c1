"""Kernels written in Python: the Triton kernels and the memory-bounded tiled fallback."""
