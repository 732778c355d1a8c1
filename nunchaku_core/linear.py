"""Quantized torch modules built from the plain layer representation.

SVDQuantLinear and W4A16Linear hold a layer (nunchaku_core.layer) and run it through the backend dispatcher
(compiled CPU/CUDA kernel where one fits, else the torch reference; see nunchaku_core.backend). The layer is
repacked into the chosen kernel's layout once, at the first forward, and again only if the input's device or the
chosen backend changes.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backend as _backend
from .layer import SVDQuantLayer, W4A16Layer


class _PackedLinear(torch.nn.Module):
    def __init__(self, layer, backend: Optional[str]):
        super().__init__()
        self.layer = layer.validate()
        self.in_features, self.out_features = layer.K, layer.N
        self.backend = backend  # None: SVDQ_BACKEND or auto
        self._packed: Optional[_backend.Packed] = None

    def _packed_for(self, x: torch.Tensor, pack) -> _backend.Packed:
        chosen = _backend.resolve_backend(x.device, self.backend)
        p = self._packed
        if p is None or p.device != x.device or p.resolved != chosen or p.layer is not self.layer:
            p = self._packed = pack(self.layer, x.device, self.backend)
        return p


class SVDQuantLinear(_PackedLinear):
    def __init__(self, layer: SVDQuantLayer, backend: Optional[str] = None):
        super().__init__(layer, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _backend.svdquant_linear(x, self._packed_for(x, _backend.pack_svdquant))


class W4A16Linear(_PackedLinear):
    def __init__(self, layer: W4A16Layer, backend: Optional[str] = None):
        super().__init__(layer, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _backend.w4a16_linear(x, self._packed_for(x, _backend.pack_w4a16))
