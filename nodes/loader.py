"""'SVDQuant Model Loader' (every family) and 'SVDQuant FLUX Loader' (the same path, kept for saved workflows):
an SVDQuant checkpoint from models/diffusion_models -> MODEL.

ComfyUI detects and builds its own model (comfy.sd.load_diffusion_model_state_dict's steps): detection sees the
quantized Linears' dense shapes (nodes/comfy_api.dense_shapes), a Nunchaku FLUX.1 file's own configuration overrides
what detection cannot read from the weights (0.3.75 forces hidden size 3072), our custom_operations take the 4-bit
parts, and our ModelPatcher wraps the result. ComfyUI's save nodes refuse the model, naming the file and the fix
(nodes/saving.py).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

import comfy.model_management
import folder_paths
import torch
from nunchaku_core import backend

from . import comfy_api
from .checkpoint import QUANT_KEY, load_checkpoint
from .model_patcher import SOURCE_ATTR, SVDQuantModelPatcher
from .ops import operations_for, pack_for_device, quantized_linears
from .saving import SaveError, flux_save_message

log = logging.getLogger("SVDQuant")

DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _param_count(sd: dict) -> int:
    """Values in the model (a 4-bit code counts as one), for ComfyUI's dtype heuristics."""
    n = 0
    for k, v in sd.items():
        if k.endswith("." + QUANT_KEY):
            n += v.out_features * v.in_features
        else:
            n += v.numel()
    return n


def _plain_dtype(sd: dict):
    for k, v in sd.items():
        if not k.endswith("." + QUANT_KEY) and v.is_floating_point():
            return v.dtype
    return None


def _storage_dtype(sd: dict, compute: torch.dtype, chosen_by_user: bool) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype the unquantized weights are stored in, manual-cast compute dtype or None). When ComfyUI computes in
    a wider float than the file holds (fp32 on the CPU for a bf16 file), keep the file's dtype and let ComfyUI's
    manual_cast widen each weight per call: the widening is exact, so the outputs are the same bits as with
    weights widened at load, and the unquantized layers (49 M values, 0.09 GiB in bf16, in bench/bench_e2e.py's
    FLUX-width model) take half the memory."""
    plain = _plain_dtype(sd)
    if not chosen_by_user and compute == torch.float32 and plain in (torch.bfloat16, torch.float16):
        return plain, torch.float32
    return compute, None


def release_freed_heap() -> None:
    """Give the pages that loading freed back to the OS. Loading reads every layer, unpacks its codes to one
    byte each and repacks them (nunchaku_core.linear); glibc keeps the freed blocks in its heap (its mmap
    threshold rises to the largest freed block, up to 32 MiB), so they stayed resident: 0.15 GiB of the
    0.56 GiB bench/bench_e2e.py's FLUX-width 1+1-block model added to the process, 0.41 GiB after the trim
    (measured 2026-11-22). No-op where the C library has no malloc_trim."""
    gc.collect()   # tensors of the load that only reference cycles still hold
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def load_svdquant_model(path: str, dtype: torch.dtype | None = None) -> SVDQuantModelPatcher:
    requested_dtype = dtype
    ck = load_checkpoint(path)
    sd = ck.state_dict
    shapes = comfy_api.dense_shapes(sd, QUANT_KEY)
    model_config = comfy_api.model_config_from_unet_config(comfy_api.unet_config(shapes, ck.model_config, path),
                                                          shapes, path)
    if ck.model_class and ck.model_class != type(model_config).__name__:
        log.info("SVDQuant: %s: comfy_config names %s, ComfyUI's rules pick %s for in_channels=%s",
                 path, ck.model_class, type(model_config).__name__, ck.model_config["in_channels"])

    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    supported = list(model_config.supported_inference_dtypes)
    chosen_by_user = dtype is not None
    if dtype is None:
        dtype = comfy.model_management.unet_dtype(model_params=_param_count(sd), supported_dtypes=supported,
                                                  weight_dtype=_plain_dtype(sd))
    manual_cast_dtype = comfy.model_management.unet_manual_cast(dtype, load_device, supported)
    if manual_cast_dtype is None:
        dtype, manual_cast_dtype = _storage_dtype(sd, dtype, chosen_by_user)
    model_config.set_inference_dtype(dtype, manual_cast_dtype)
    model_config.custom_operations = operations_for(manual_cast_dtype)

    kernel, why = backend.choose_backend(load_device)   # once per load; every backend runs INT4 and NVFP4
    log.info("SVDQuant: %s: quantized layers on %s run on the %s backend: %s", path, load_device, kernel, why)

    model = model_config.get_model({}, "")
    model = model.to(offload_device)
    setattr(model, SOURCE_ATTR, path)       # named by the patcher's LoRA errors
    model.load_model_weights(sd, "")
    # ModelSave / CheckpointSave would write the 4-bit Linears' meta placeholders (nodes/saving.py)
    comfy_api.refuse_state_dict_for_saving(
        model, SaveError(flux_save_message(path, len(quantized_linears(model)), ck.layout == "nunchaku")))
    if load_device == offload_device:
        pack_for_device(model.diffusion_model, load_device, manual_cast_dtype or dtype)
    sd = ck.state_dict = {}   # the model holds the checkpoint's tensors now; drop the dict's references first
    release_freed_heap()
    cfg = model_config.unet_config
    log.info("SVDQuant: loaded %s (%s, %s layout, %d quantized Linears) as ComfyUI's %s (%s)", path, ck.precision,
             ck.layout, len(quantized_linears(model)), type(model_config).__name__,
             ", ".join(f"{k} {cfg[k]}" for k in ("hidden_size", "depth", "depth_single_blocks", "guidance_embed",
                                                  "n_layers", "num_layers", "dim") if k in cfg))
    patcher = SVDQuantModelPatcher(model, load_device=load_device, offload_device=offload_device)
    comfy_api.register_reload(patcher, load_svdquant_model, path, requested_dtype)
    return patcher


class SVDQuantFluxLoader:
    @classmethod
    def INPUT_TYPES(cls):
        # Widget order is saved in workflows: append new inputs at the end, never reorder.
        return {"required": {
            "model_name": (folder_paths.get_filename_list("diffusion_models"),
                           {"tooltip": "An SVDQuant FLUX.1 checkpoint (Nunchaku INT4/NVFP4 file or folder, or "
                                       "ComfyUI-native svdquant_w4a4) in models/diffusion_models."}),
            "weight_dtype": (list(DTYPES), {"tooltip": "dtype of the unquantized layers and activations; "
                                                       "default lets ComfyUI pick for the device."}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "SVDQuant"
    DESCRIPTION = "Loads an SVDQuant (4-bit) FLUX.1 model into ComfyUI's own Flux."

    def load(self, model_name, weight_dtype):
        path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        return (load_svdquant_model(path, DTYPES[weight_dtype]),)


class SVDQuantModelLoader(SVDQuantFluxLoader):
    """One loader for every family: ComfyUI detects the model from the quantized layers' dense shapes and builds
    it with our custom operations. The FLUX loader above is the same path; it stays for saved workflows."""

    @classmethod
    def INPUT_TYPES(cls):
        types = super().INPUT_TYPES()
        types["required"]["model_name"][1]["tooltip"] = (
            "An SVDQuant model in models/diffusion_models: ComfyUI's native svdquant_w4a4 layout of any model "
            "family ComfyUI detects (what 'SVDQuant Quantize Model' writes), or a Nunchaku file: FLUX.1 (file or "
            "folder), Qwen-Image, Z-Image or the SDXL UNet.")
        return types

    DESCRIPTION = ("Loads an SVDQuant (4-bit) diffusion model of any family ComfyUI knows: ComfyUI detects and "
                   "builds its own model; the 4-bit Linears run our kernels.")


NODE_CLASS_MAPPINGS = {"SVDQuantFluxLoader": SVDQuantFluxLoader, "SVDQuantModelLoader": SVDQuantModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"SVDQuantFluxLoader": "SVDQuant FLUX Loader", "SVDQuantModelLoader": "SVDQuant Model Loader"}
