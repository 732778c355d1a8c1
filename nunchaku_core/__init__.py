"""ComfyUI-independent core of the SVDQuant node pack: numerics, formats, quantizer, kernels dispatch.

Never imports comfy.
"""
from .layer import SIGMA, SVDQuantLayer, W4A16Layer

__all__ = ["SIGMA", "SVDQuantLayer", "W4A16Layer"]
