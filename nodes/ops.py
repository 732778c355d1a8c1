"""ComfyUI custom_operations for SVDQuant models: ComfyUI builds its own Flux with these ops; every Linear
loads either a stock weight/bias or the quantized layers nodes/checkpoint.py put under
`<layer>.svdquant`, and the quantized ones run through nunchaku_core.linear. Everything else is ComfyUI's.

Linear weights are created at load time, not in __init__: torch.nn.Linear.__init__ would allocate a full
[N, K] weight in the model dtype (fp32 on the CPU, 48 GB for FLUX.1) for every layer that then holds 4-bit
codes instead.
"""
from __future__ import annotations

import dataclasses

import comfy.ops
import torch

from nunchaku_core.layer import SVDQuantLayer
from nunchaku_core.linear import SVDQuantLinear, W4A16Linear

from . import comfy_api
from .checkpoint import QUANT_KEY, QuantizedLinear


def _layer_to(layer, device: torch.device):
    """The same layer with every tensor on `device` (dtypes kept)."""
    moved = {f.name: getattr(layer, f.name).to(device) for f in dataclasses.fields(layer)
             if isinstance(getattr(layer, f.name), torch.Tensor)}
    return dataclasses.replace(layer, **moved)


NO_PATCHES = ((), ())   # lora_patches.signature of (no weight patches, no bias patches)


class _QuantLinear:
    """Mixin for a comfy.ops Linear: stock when loaded from weight/bias, quantized when loaded from a
    QuantizedLinear. The quantized parts are nunchaku_core.linear modules held in `self.parts`; their
    tensors are not parameters (see quantized_nbytes for memory accounting, _apply for device moves)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.has_bias = bias
        self.load_dtype = dtype          # stock weights are cast to it, as copying into a torch Linear does
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
        self.parts = None                # torch.nn.ModuleList of SVDQuantLinear / W4A16Linear once loaded
        self.lora_parts = None           # the same with LoRAs joined (nodes/lora_patches.py), while patched
        self.lora_signature = NO_PATCHES  # the patches lora_parts were built for (nodes/model_patcher.py)
        self.lora_kept = None            # (signature, parts) of the last unpatch, reused if the next load matches
        self.split = "out"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # A quantized Linear lists `weight` (and `bias`) as meta tensors of the dense shape: ComfyUI maps LoRA
        # keys and accepts patches (comfy.lora.model_lora_keys_unet, ModelPatcher.add_patches) only for keys in
        # the state dict. SVDQuantModelPatcher applies those patches to the quantized parts.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.parts is not None:
            destination.update(comfy_api.dense_placeholders(prefix, self.out_features, self.in_features,
                                                            self.has_bias, self.load_dtype or torch.float32))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]
        q = state_dict.get(prefix + QUANT_KEY)
        if q is not None:
            self._load_quantized(q, prefix, error_msgs)
            unexpected_keys.extend(k for k in ours if k != prefix + QUANT_KEY)
            return
        for name in ("weight", "bias") if self.has_bias else ("weight",):
            t = state_dict.get(prefix + name)
            if t is None:
                missing_keys.append(prefix + name)
                continue
            want = (self.out_features, self.in_features) if name == "weight" else (self.out_features,)
            if tuple(t.shape) != want:
                error_msgs.append(f"{prefix}{name}: shape {list(t.shape)}, the model needs {list(want)}")
                continue
            t = t.to(self.load_dtype) if self.load_dtype is not None else t
            setattr(self, name, torch.nn.Parameter(t, requires_grad=False))
        unexpected_keys.extend(k for k in ours if k[len(prefix):] not in ("weight", "bias"))

    def _load_quantized(self, q: QuantizedLinear, prefix: str, error_msgs: list) -> None:
        if (q.out_features, q.in_features) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix[:-1]}: the checkpoint's quantized layer is [N, K] = "
                              f"[{q.out_features}, {q.in_features}], the model needs [{self.out_features}, "
                              f"{self.in_features}]")
            return
        self.parts = torch.nn.ModuleList(
            (SVDQuantLinear if isinstance(p, SVDQuantLayer) else W4A16Linear)(p, backend=q.backend) for p in q.parts)
        self.split = q.split

    def _apply(self, fn, recurse=True):
        # Module.to()/cuda() reach tensors through _apply; the parts' tensors live in plain dataclasses, so
        # move them here. Only the device is taken from fn: a dtype cast must not touch codes or fp8 scales.
        super()._apply(fn, recurse)
        for parts in (self.parts, self.lora_parts):
            for m in parts if parts is not None else ():
                device = fn(torch.empty(0, device=m.device)).device
                if device != m.device:
                    m.layer = _layer_to(m.layer, device)   # a W4A16Linear's LoRA delta moves per call
        return self

    def quantized_tensors(self) -> list[torch.Tensor]:
        """Every tensor the quantized parts keep alive (nunchaku_core.linear drops the unpacked codes once the
        kernel-layout copy exists), LoRA-extended parts included."""
        return [t for parts in (self.parts, self.lora_parts) for m in (parts if parts is not None else ())
                for t in m.held_tensors()]

    def active_parts(self):
        return self.lora_parts if self.lora_parts is not None else self.parts

    def _parts_for(self, x: torch.Tensor):
        """The parts that run x. When ComfyUI offloads this module (lowvram, comfy_cast_weights), they stay on the
        offload device: nunchaku_core.linear packs them for x's device once, keeps that packed copy on the offload
        device and copies it to x's device per call, as ComfyUI copies stock weights (no repacking per call)."""
        return self.active_parts()

    def forward(self, x, *args, **kwargs):
        if self.parts is None:
            return super().forward(x, *args, **kwargs)
        comfy.ops.run_every_op()  # lets ComfyUI interrupt between layers
        parts = list(self._parts_for(x))
        if self.split == "out":
            return parts[0](x) if len(parts) == 1 else torch.cat([m(x) for m in parts], dim=-1)
        # "in": consecutive input slices, one per part; the parts' outputs add up to the fused layer's output
        xs = torch.split(x, [m.in_features for m in parts], dim=-1)
        y = parts[0](xs[0])
        for m, xi in zip(parts[1:], xs[1:]):
            y = y + m(xi)
        return y


class SVDQuantOps(comfy.ops.disable_weight_init):
    """Weights stored in the model dtype (what ComfyUI picks when no manual cast is needed)."""

    class Linear(_QuantLinear, comfy.ops.disable_weight_init.Linear):
        pass


class SVDQuantCastOps(comfy.ops.manual_cast):
    """Stock weights cast to the compute dtype per call (ComfyUI's manual_cast, e.g. fp8 storage)."""

    class Linear(_QuantLinear, comfy.ops.manual_cast.Linear):
        pass


def pack_for_device(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Run every quantized Linear once on a one-token zero input: nunchaku_core.linear repacks a layer into
    its kernel's layout at the first forward, so this moves that work (and its memory) to load time, where
    ComfyUI's accounting (ModelPatcher.model_size) sees it."""
    with torch.no_grad():
        for m in model.modules():
            if is_quantized(m):
                m(torch.zeros(1, m.in_features, device=device, dtype=dtype))


def operations_for(manual_cast_dtype) -> type:
    return SVDQuantOps if manual_cast_dtype is None else SVDQuantCastOps


def quantized_nbytes(model: torch.nn.Module) -> int:
    """Bytes held by the quantized layers of a model built with these ops, kernel-layout copies included
    (none of it is in the model's state_dict)."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, _QuantLinear):
            for t in m.quantized_tensors():
                if t.data_ptr() not in seen:   # a kernel copy may alias the layer's tensor (e.g. fp32 smooth)
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


def is_quantized(module) -> bool:
    """A Linear of these ops holding quantized parts (its weight / bias in the state dict are meta placeholders)."""
    return isinstance(module, _QuantLinear) and module.parts is not None


def quantized_linears(model: torch.nn.Module) -> list:
    """(name, module) of every Linear holding quantized parts, names as in model.state_dict()."""
    return [(n, m) for n, m in model.named_modules() if is_quantized(m)]
