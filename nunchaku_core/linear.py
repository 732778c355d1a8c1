"""Quantized torch modules built from the plain layer representation.

SVDQuantLinear and W4A16Linear hold a layer (nunchaku_core.layer) and run it through the backend dispatcher
(nunchaku_core.backend: compiled CPU kernels, Triton, the tiled fallback, ...). Packing into the chosen kernel's
layout happens once per device:
- resident: an input on the layer's own device uses `_packed`, packed at the first forward (at construction on
  the CPU) and again only when the chosen backend changes or the layer moves (Module.to / ComfyUI's model moves go
  through the `layer` setter: one repack per move, never per call);
- offloaded: an input on another device (ComfyUI's lowvram mode leaves a module on the offload device and runs it
  on the GPU, nodes/ops.py) is packed for that device once, and the packed copy is kept on the layer's own device
  (`_staged`); each call copies that kernel-layout copy to the input's device, as ComfyUI copies a stock module's
  weights per call. The staged copy is the kernel's bytes (~0.53 bytes per weight for INT4), held in addition
  to the resident one on the offload device (for the reference backend: the layer itself).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import backend as _backend
from .layer import SVDQuantLayer, W4A16Layer


def _layer_to(layer, device: torch.device):
    """The same layer with every tensor on `device` (dtypes kept)."""
    return dataclasses.replace(layer, **{f.name: t.to(device) for f in dataclasses.fields(layer)
                                         if isinstance(t := getattr(layer, f.name), torch.Tensor)})


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
        self._staged: dict = {}  # (device, backend) -> Packed for inputs on that device, tensors on self.device

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
        self._staged = {}

    @property
    def device(self) -> torch.device:
        return self._layer.proj_up.device if isinstance(self._layer, SVDQuantLayer) else self._layer.scales.device

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this module keeps alive (the layer's, codes only if not dropped, and the kernel copy)."""
        out = [t for f in dataclasses.fields(self._layer)
               if isinstance(t := getattr(self._layer, f.name), torch.Tensor) and not t.is_meta]
        for p in ([self._packed] if self._packed is not None else []) + list(self._staged.values()):
            for obj in (p.kernel, p.layer if p is not self._packed else None):
                if isinstance(obj, torch.Tensor):   # the tiled fallback's packed codes
                    out.append(obj)
                elif obj is not None and dataclasses.is_dataclass(obj):
                    out += [t for f in dataclasses.fields(obj)
                            if isinstance(t := getattr(obj, f.name), torch.Tensor) and not t.is_meta]
        return out

    def _packed_for(self, x: torch.Tensor, pack) -> _backend.Packed:
        chosen = _backend.resolve_backend(x.device, self.backend)
        if x.device != self.device:
            return _backend.packed_to(self._staged_for(x.device, chosen, pack), x.device)
        p = self._packed
        if p is None or p.device != x.device or p.resolved != chosen:
            layer = self.layer
            p = self._packed = pack(layer, x.device, self.backend)
            self._layer = p.layer  # without codes when the kernel copy holds them
        return p

    def _staged_for(self, device: torch.device, chosen: str, pack) -> _backend.Packed:
        """The layer packed for inputs on `device`, kept on self.device (module docstring: offloaded)."""
        key = (device, chosen)
        p = self._staged.get(key)
        if p is None:
            p = pack(_layer_to(self.layer, device), device, self.backend)
            if p.kernel is None:   # the reference reads the layer itself: nothing to keep but the layer
                p = _backend.Packed(p.backend, p.resolved, self.device, self.layer)
            else:
                p = _backend.packed_to(p, self.device)
            self._staged[key] = p
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
