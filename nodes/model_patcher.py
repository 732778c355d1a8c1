"""ModelPatcher for SVDQuant models: ComfyUI's own patcher, plus what the quantized Linears (nodes/ops.py) need.

- LoRA through the stock path. A quantized Linear lists its `weight` / `bias` in the state dict as meta tensors
  (nodes/ops.py), so comfy.lora.model_lora_keys_unet maps every Flux LoRA format onto it and add_patches
  stores the patches as usual: LoraLoader, LoraLoaderModelOnly and any pack that calls add_patches work
  unchanged. add_patches here first checks every patch's shapes against the model (a mismatched LoRA raises
  LoRAError naming the tensor, and nothing is stored). At load, after ComfyUI patched the unquantized weights,
  each quantized Linear with patches gets LoRA-extended parts (nodes/lora_patches.py); unpatching drops them,
  which restores the original modules exactly. A Linear whose patches did not change since the last load keeps
  its extended parts, so changing one LoRA's strength re-joins only the layers that LoRA touches.
- A LoRA none of whose tensors ComfyUI maps onto the model (one for another family: ComfyUI itself only logs
  "lora key not loaded" per tensor and renders the unchanged model) raises LoRAError naming the LoRA file, its
  first tensors and the model's file; a LoRA that maps onto the text encoder only (LoraLoader) still passes.
- Saving: ComfyUI's save nodes load the model with force_patch_weights, which patches an offloaded (lowvram)
  module's dense weight; a quantized Linear has none, so it is skipped and the save's own error (nodes/saving.py)
  is reached.
- Memory: the meta entries are not memory; the quantized parts' tensors are (quantized_nbytes), for the
  model's size and for ComfyUI's per-module load list.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional

import comfy.model_management
import comfy.model_patcher
import comfy.utils

from .lora_patches import DenseCache, LoRAError, build_lora_parts, check_patch, signature
from .ops import NO_PATCHES, is_quantized, quantized_linears, quantized_nbytes

log = logging.getLogger("SVDQuant")


def _bytes_without_meta(module) -> int:
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values() if not t.is_meta)


def _split_key(k):
    """add_patches' key forms: 'key', (key, offset) or (key, offset, function)."""
    if isinstance(k, str):
        return k, None, None
    return k[0], k[1], (k[2] if len(k) > 2 else None)


# The attribute nodes/loader.py sets on the diffusion model it builds: the file it was loaded from, for messages.
SOURCE_ATTR = "svdquant_source"


def _lora_being_loaded(max_frames: int = 8) -> tuple[Optional[str], list]:
    """(LoRA file, its tensor names) of the LoRA whose patches are being added, from the calling frames: ComfyUI
    hands add_patches only the patches it could map, never the file or the keys it could not. Read from the
    locals of comfy.sd.load_lora_for_models (`lora`, the file's tensors) and of ComfyUI's LoraLoader or our
    LoRA Stack (`lora_path`). Best effort, for the message only: (None, []) where the callers differ."""
    path, keys = None, []
    frame = sys._getframe(2)    # 0: here, 1: add_patches, 2: its caller (load_lora_for_models)
    for _ in range(max_frames):
        if frame is None:
            break
        local = frame.f_locals
        if not keys and frame.f_code.co_name == "load_lora_for_models" and isinstance(local.get("lora"), dict):
            keys = list(local["lora"])
        if path is None and isinstance(local.get("lora_path"), str):
            path = local["lora_path"]
        frame = frame.f_back
    return path, keys


def _nothing_mapped(model, source: str, path: Optional[str], keys: list) -> str:
    """The message for a LoRA none of whose tensors maps onto the model (ComfyUI's LoRA key maps gave nothing)."""
    tensors = f"none of its {len(keys)} tensors (first: {', '.join(keys[:3])})" if keys else "none of its tensors"
    return (f"{f'LoRA {path}' if path else 'this LoRA'}: {tensors} maps onto a layer of this model, ComfyUI's "
            f"{type(model.model_config).__name__} loaded from {source}: the LoRA was made for another model family. "
            f"Use a LoRA made for this model; ComfyUI's log lists each of its tensors as 'lora key not loaded'. "
            f"Nothing was applied.")


def _warn_partly_mapped(model, source: str, patches: dict, path: Optional[str], keys: list) -> None:
    """One warning line when some of the LoRA's tensors map onto no layer (of the model, or of the text encoder
    LoraLoader also patches) while others do: a LoRA for another family can match some layers by name and shape
    (Qwen-Image's transformer_blocks.N.attn.to_q is FLUX.1's diffusers name for double block N's q rows, 3072
    wide in both) and ComfyUI then applies that part with only its per-tensor 'lora key not loaded' lines.
    The tensors ComfyUI used are the LoRA adapters' loaded_keys; a patch without them (a "diff") says nothing,
    and then nothing is logged."""
    used: set = set()
    for v in patches.values():
        if not hasattr(v, "loaded_keys"):
            return
        used |= set(v.loaded_keys)
    unused = [k for k in keys if k not in used and not k.endswith((".alpha", ".dora_scale"))]
    if unused:
        log.warning("SVDQuant: LoRA %s: %d of its %d tensors map onto no layer (first: %s) and %d patches apply: if "
                    "the LoRA was made for another model family, those still change this model, ComfyUI's %s loaded "
                    "from %s", path or "(file unknown)", len(unused), len(keys), ", ".join(unused[:3]), len(patches),
                    type(model.model_config).__name__, source)


class SVDQuantModelPatcher(comfy.model_patcher.ModelPatcher):
    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = _bytes_without_meta(self.model) + quantized_nbytes(self.model)
        return self.size

    def _load_list(self, *args, **kwargs):
        """ComfyUI's per-module load list with a quantized Linear's real size in place of its dense placeholders'.
        Entries end in (module_mem, name, module, params) and start with sort keys (0.3.75 and 0.33's classic load:
        the offload size, which equals module_mem here; 0.33's dynamic load: derived keys, left as they are)."""
        out = []
        for *keys, mem, n, m, params in super()._load_list(*args, **kwargs):
            if is_quantized(m):
                real = quantized_nbytes(m)
                keys = [real if type(k) is int and k == mem else k for k in keys]
                mem = real
            out.append((*keys, mem, n, m, params))
        return out

    # ---- LoRA ---------------------------------------------------------------------------------------------

    def _quantized_keys(self) -> dict:
        """'<module>.weight' / '.bias' key -> the quantized Linear, for this model."""
        out = {}
        for name, m in quantized_linears(self.model):
            out[f"{name}.weight"] = out[f"{name}.bias"] = m
        return out

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        source = getattr(self.model, SOURCE_ATTR, None)   # set by the diffusion-model loader, not the text encoder's
        lora = None
        if source is not None and strength_patch != 0 and sys._getframe(1).f_code.co_name == "load_lora_for_models":
            lora = _lora_being_loaded()
            if not patches:
                raise LoRAError(_nothing_mapped(self.model, source, *lora))
        with self.use_ejected():
            model_sd = self.model.state_dict()
            quantized = self._quantized_keys()
            for k, v in patches.items():
                key, offset, function = _split_key(k)
                if key in model_sd:
                    check_patch(key, (strength_patch, v, strength_model, offset, function),
                                tuple(model_sd[key].shape), key in quantized)
        added = super().add_patches(patches, strength_patch, strength_model)
        if lora is not None:
            _warn_partly_mapped(self.model, source, patches, *lora)
        return added

    def add_hook_patches(self, hook, patches, strength_patch=1.0, strength_model=1.0):
        quantized = self._quantized_keys()
        hit = [_split_key(k)[0] for k in patches if _split_key(k)[0] in quantized]
        if hit:
            raise LoRAError(f"hook LoRAs (Create Hook LoRA / Set Model Hooks) on SVDQuant layers are not supported "
                            f"({len(hit)} keys, first {hit[0]}); use LoraLoader / LoraLoaderModelOnly or 'SVDQuant "
                            f"LoRA Stack', which apply to the whole sampling run")
        return super().add_hook_patches(hook, patches, strength_patch, strength_model)

    def load(self, device_to=None, *args, **kwargs):
        super().load(device_to, *args, **kwargs)
        with self.use_ejected():
            self._patch_quantized()

    def patch_weight_to_device(self, key, device_to=None, *args, **kwargs):
        # A quantized Linear has no dense weight / bias to patch: load() joins its patches to the 4-bit parts.
        # ComfyUI's load() asks for one only for an offloaded (lowvram) module under force_patch_weights, i.e.
        # from the save nodes (and LoRA extraction); unhandled, that died on the placeholder (AttributeError:
        # 'NoneType' object has no attribute 'to') before the save's own error (nodes/saving.py) could name the fix.
        # The other arguments differ between ComfyUI versions (0.33 added return_weight, force_cast): passed on.
        module_name, _, _ = key.rpartition(".")
        if module_name and is_quantized(comfy.utils.get_attr(self.model, module_name)):
            return None
        return super().patch_weight_to_device(key, device_to, *args, **kwargs)

    def _patch_quantized(self) -> None:
        """Give each quantized Linear its LoRA-extended parts for self.patches (all or none: on an error no
        module changes and the error propagates). Parts built for the same patches before the last unpatch are
        reused, so only the Linears whose patches changed are rebuilt."""
        cache = getattr(self.model, "_svdq_lora_cache", None)
        if cache is None:
            cache = self.model._svdq_lora_cache = DenseCache()
        linears = quantized_linears(self.model)
        todo, reuse = [], []
        for name, m in linears:
            wp = self.patches.get(f"{name}.weight", [])
            bp = self.patches.get(f"{name}.bias", [])
            sig = (signature(wp), signature(bp))
            if sig == m.lora_signature:
                continue
            if m.lora_kept is not None and m.lora_kept[0] == sig:
                reuse.append((m, m.lora_kept[1], sig))
            else:
                todo.append((name, m, wp, bp, sig))
        new = []
        t0 = time.perf_counter()
        if todo:
            pbar = comfy.utils.ProgressBar(len(todo))
            for name, m, wp, bp, sig in todo:
                parts = build_lora_parts(m, wp, bp, f"{name}.weight", cache) if sig != NO_PATCHES else None
                new.append((m, None if parts is None else type(m.parts)(parts), sig))
                pbar.update(1)
        for m, parts, sig in reuse + new:
            m.lora_parts, m.lora_signature = parts, sig
        for _, m in linears:
            m.lora_kept = None
        cache.keep_only_used()
        if todo or reuse:
            log.info("SVDQuant LoRA: %d quantized Linears rebuilt, %d reused, in %.3f s", len(todo), len(reuse),
                     time.perf_counter() - t0)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            # back to the original parts (bit-exact: they were never modified); the extended ones are kept
            # until the next load, which reuses those whose patches did not change
            for _, m in quantized_linears(self.model):
                if m.lora_parts is not None:
                    m.lora_kept = (m.lora_signature, m.lora_parts)
                m.lora_parts, m.lora_signature = None, NO_PATCHES
        return super().unpatch_model(device_to, unpatch_weights)

