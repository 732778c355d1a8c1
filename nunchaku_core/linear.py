"""Quantized torch modules built from the plain layer representation.

SVDQuantLinear and W4A16Linear hold a layer (nunchaku_core.layer) and run it through the backend dispatcher
(compiled CPU/CUDA kernel where one fits, else the torch reference; see nunchaku_core.backend). The layer is
repacked into the chosen kernel's layout once, at the first forward, and again only if the input's device or the
chosen backend changes.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import backend as _backend
from .layer import SVDQuantLayer, W4A16Layer


class _PackedLinear(torch.nn.Module):
    """Holds one layer and its kernel-layout copy. Once packed for the CPU kernels, only the packed codes are
    kept (backend.Packed); `layer` then rebuilds the full layer on demand, which costs an unpack, so hot paths
    use `device`, `held_tensors()` and in/out_features instead."""

    def __init__(self, layer, backend: Optional[str]):
        super().__init__()
        self._layer = layer.validate()
        self.in_features, self.out_features = layer.K, layer.N
        self.backend = backend  # None: SVDQ_BACKEND or auto
        self._packed: Optional[_backend.Packed] = None

    @property
    def layer(self):
        """The full layer (codes included)."""
        p = self._packed
        if p is not None and p.layer is self._layer and p.kernel is not None:
            return _backend.full_layer(p)  # codes dropped after packing: unpack them from the kernel copy
        return self._layer

    @layer.setter
    def layer(self, layer) -> None:
        """Swap in another layer (a device move, a LoRA-extended layer); it is packed at the next forward."""
        self._layer = layer.validate()
        self.in_features, self.out_features = layer.K, layer.N
        self._packed = None

    @property
    def device(self) -> torch.device:
        return self._layer.proj_up.device if isinstance(self._layer, SVDQuantLayer) else self._layer.scales.device

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this module keeps alive (the layer's, codes only if not dropped, and the kernel copy)."""
        out = [t for f in dataclasses.fields(self._layer)
               if isinstance(t := getattr(self._layer, f.name), torch.Tensor) and not t.is_meta]
        kernel = self._packed.kernel if self._packed is not None else None
        if kernel is not None and dataclasses.is_dataclass(kernel):
            out += [t for f in dataclasses.fields(kernel) if isinstance(t := getattr(kernel, f.name), torch.Tensor)]
        return out

    def _packed_for(self, x: torch.Tensor, pack) -> _backend.Packed:
        chosen = _backend.resolve_backend(x.device, self.backend)
        p = self._packed
        if p is None or p.device != x.device or p.resolved != chosen:
            layer = self.layer
            p = self._packed = pack(layer, x.device, self.backend)
            self._layer = p.layer  # without codes when the kernel copy holds them
        return p


    def _pack_now_if_cpu(self, pack) -> None:
        """Pack at construction for a CPU layer, so a loaded model never holds the 1-byte codes and the
        packed copy at once for longer than one layer."""
        if self.device.type == "cpu":
            self._packed_for(torch.empty(0), pack)


    def _sibling(self, layer, packed: Optional[_backend.Packed]):
        """A module of the same class holding `layer` and `packed` (no packing here)."""
        m = type(self).__new__(type(self))
        _PackedLinear.__init__(m, layer, self.backend)
        m._packed = packed
        return m


class SVDQuantLinear(_PackedLinear):
    def __init__(self, layer: SVDQuantLayer, backend: Optional[str] = None):
        super().__init__(layer, backend)
        self._pack_now_if_cpu(_backend.pack_svdquant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _backend.svdquant_linear(x, self._packed_for(x, _backend.pack_svdquant))

    def with_lora(self, downs, ups, scales, bias: Optional[torch.Tensor]) -> "SVDQuantLinear":
        """with_lowrank for LoRAs: the branch becomes [D | down_i ...], [U | s_i·up_i ...] in fp32
        (nunchaku_core.lora.extend_lowrank; downs[i] [K, r_i], ups[i] [N, r_i]), the bias is `bias`."""
        from .lora import extend_lowrank
        ext = extend_lowrank(self._layer, downs, ups, scales, dtype=torch.float32)
        return self.with_lowrank(ext.proj_down, ext.proj_up, bias)

    @property
    def rank(self) -> int:
        return self._layer.R

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The layer's stored bias (for shifted layers not the effective one: see reference.effective_bias)."""
        return self._layer.bias

    def with_lowrank(self, proj_down: torch.Tensor, proj_up: torch.Tensor, bias: Optional[torch.Tensor]) -> "SVDQuantLinear":
        """A new module whose layer has this low-rank branch and bias (a LoRA-extended layer, see
        nunchaku_core.lora.extend_lowrank); codes, scales and smoothing, packed or not, are shared with this one,
        which is left untouched (dropping the new module restores the original exactly). Only the branch and the
        bias are repacked: O((N + K)·R)."""
        layer = dataclasses.replace(self._layer, proj_down=proj_down, proj_up=proj_up, bias=bias).validate()
        packed = None
        if self._packed is not None:   # not yet packed (a GPU layer before its first call): packs at first use
            packed = _backend.repack_lowrank(self._packed, layer, self.backend)
            layer = packed.layer
        return self._sibling(layer, packed)


class W4A16Linear(_PackedLinear):
    """A weight-only 4-bit layer, optionally with `delta` (nunchaku_core.lora.LowRankDelta: LoRAs that run as a
    separate fp32 low-rank branch; see with_delta)."""

    def __init__(self, layer: W4A16Layer, backend: Optional[str] = None):
        super().__init__(layer, backend)
        self.delta = None
        self._pack_now_if_cpu(_backend.pack_w4a16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _backend.w4a16_linear(x, self._packed_for(x, _backend.pack_w4a16))
        if self.delta is None:
            return y
        return (y.float() + self.delta.apply(x)).to(y.dtype)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self._layer.bias

    def with_delta(self, delta, bias: Optional[torch.Tensor]) -> "W4A16Linear":
        """A new module running this layer with `bias` plus the LoRAs in `delta` (LowRankDelta or None) beside
        it: y = W4A16(x) + Δ(x), added in fp32 and rounded once more to x's dtype. Codes, scales and zeros,
        packed or not, are shared; this module is left untouched."""
        if delta is not None:
            delta.check_layer(self._layer, "W4A16Linear.with_delta")
        layer = dataclasses.replace(self._layer, bias=bias).validate()
        packed = None
        if self._packed is not None:
            packed = _backend.repack_bias(self._packed, layer)
            layer = packed.layer
        m = self._sibling(layer, packed)
        m.delta = delta
        return m

    def held_tensors(self) -> list[torch.Tensor]:
        out = super().held_tensors()
        if self.delta is not None:
            out += list(self.delta.downs) + list(self.delta.ups)
        return out
