"""Quantized torch modules built from the plain layer representation.

SVDQuantLinear and W4A16Linear hold a layer (nunchaku_core.layer) and run it through the backend
dispatcher (compiled CPU/CUDA kernel where one fits, else the torch reference).
"""
from __future__ import annotations

import torch

from . import reference
from .layer import SVDQuantLayer, W4A16Layer


class SVDQuantLinear(torch.nn.Module):
    def __init__(self, layer: SVDQuantLayer):
        super().__init__()
        self.layer = layer.validate()
        self.in_features, self.out_features = layer.K, layer.N

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.svdquant_linear(x, self.layer)


class W4A16Linear(torch.nn.Module):
    def __init__(self, layer: W4A16Layer):
        super().__init__()
        self.layer = layer.validate()
        self.in_features, self.out_features = layer.K, layer.N

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.w4a16_linear(x, self.layer)
