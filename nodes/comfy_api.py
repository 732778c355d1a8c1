"""Every ComfyUI internal the pack relies on beyond the node interface, in one file, each detected by what
ComfyUI offers (a field, a signature, an attribute), never by its version string.

README.md ("ComfyUI APIs we rely on") lists them with the reason; tests/test_comfy_api.py checks each against
the ComfyUI it runs with and fails naming the API. The other node modules reach these internals through here,
or through the stable public surface ComfyUI-GGUF also uses (comfy.ops classes as custom_operations,
comfy.model_patcher.ModelPatcher subclassing, folder_paths, comfy.utils.ProgressBar).

Tested hosts: ComfyUI 0.3.75 and 0.33.0 (README.md, "Tested ComfyUI versions").
"""
from __future__ import annotations

import comfy.model_detection
import torch


class ComfyAPIError(RuntimeError):
    """This ComfyUI lacks, or changed, an internal the pack needs: the message names it and the fix."""


def _missing(api: str, what: str) -> ComfyAPIError:
    return ComfyAPIError(f"ComfyUI API {api}: {what}. This ComfyUI is newer or older than the versions "
                         f"ComfyUI-SVDQuant is tested with (0.3.75, 0.33.0); update ComfyUI-SVDQuant, and report it "
                         f"if the newest version shows this too.")


# ------------------------------------------------------------------------------------------------------------
# model configuration: ComfyUI's own detection on the dense shapes of a quantized state dict
# ------------------------------------------------------------------------------------------------------------

def dense_placeholders(prefix: str, out_features: int, in_features: int, bias: bool,
                       dtype: torch.dtype = torch.float32) -> dict:
    """`<prefix>weight` [N, K] (and `<prefix>bias` [N]) as meta tensors (prefix: "<module name>." or ""): how a quantized Linear looks dense to
    ComfyUI wherever it reads a state dict for keys and shapes (model detection, LoRA key mapping and
    ModelPatcher.add_patches). No data; SVDQuantModelPatcher counts memory without them (_load_list,
    model_size)."""
    out = {f"{prefix}weight": torch.empty((out_features, in_features), dtype=dtype, device="meta")}
    if bias:
        out[f"{prefix}bias"] = torch.empty((out_features,), dtype=dtype, device="meta")
    return out


def dense_shapes(sd: dict, quant_key: str) -> dict:
    """`sd` as ComfyUI's detection sees a dense model: every quantized Linear `<name>.<quant_key>` becomes its
    dense_placeholders; other entries as they are."""
    out = {}
    for k, v in sd.items():
        if k.endswith("." + quant_key):
            out.update(dense_placeholders(k[:-len(quant_key)], v.out_features, v.in_features,
                                          any(getattr(p, "bias", None) is not None for p in v.parts)))
        else:
            out[k] = v
    return out


def unet_config(shapes: dict, known: dict, path: str) -> dict:
    """The unet config ComfyUI's detection (comfy.model_detection.detect_unet_config) derives from the dense
    shapes, with the values the checkpoint knows better laid over it (`known`: detection hard-codes FLUX's
    24 heads and rotary axes, which only hidden size 3072 satisfies). Fields that newer ComfyUI requires and
    the checkpoint does not name (0.33's FluxParams.txt_ids_dims) come from ComfyUI itself."""
    try:
        detected = comfy.model_detection.detect_unet_config(shapes, "")
    except (KeyError, IndexError) as e:   # a family's marker key present, a tensor its rules read absent
        raise ValueError(f"{path}: ComfyUI's model detection failed on this model's layers: it reads {e} from the "
                         f"file's tensors; {_UNDETECTED_FIX} (first keys: {list(shapes)[:4]})") from e
    if detected is None:
        raise ValueError(f"{path}: ComfyUI's model detection (comfy.model_detection.detect_unet_config) recognises "
                         f"no model family in this file's {len(shapes)} tensors (first keys: {list(shapes)[:4]}). "
                         f"Expected a diffusion model's own key names as ComfyUI's 'Load Diffusion Model' reads them, "
                         f"e.g. double_blocks.0.img_attn.qkv (FLUX.1, FLUX.2), transformer_blocks.0.attn.to_q with "
                         f"txt_norm (Qwen-Image), layers.0.attention.qkv with cap_embedder (Z-Image); "
                         f"{_UNDETECTED_FIX}")
    return {**detected, **known}


_UNDETECTED_FIX = ("if the unquantized model loads in ComfyUI's 'Load Diffusion Model', quantize that file with "
                   "'SVDQuant Quantize Model'; otherwise this ComfyUI does not know the model family (a newer "
                   "ComfyUI may)")


def model_config_from_unet_config(config: dict, shapes: dict, path: str):
    """comfy.supported_models class instance for `config` (ComfyUI's own matching rules)."""
    model_config = comfy.model_detection.model_config_from_unet_config(config, shapes)
    if model_config is None:
        raise ValueError(f"{path}: ComfyUI has no model class for this configuration {config}")
    return model_config


# ------------------------------------------------------------------------------------------------------------
# patcher swap (text encoder): carry what ComfyUI's own constructor set
# ------------------------------------------------------------------------------------------------------------

def patcher_like(cls, patcher):
    """A `cls` (ModelPatcher subclass) patcher for the model of a patcher ComfyUI built (comfy.sd.CLIP builds its
    own), before any weight patch was added, carrying over what ComfyUI's constructor set on it: its object
    patches (0.33 adds set_model_compute_dtype's), model options and CLIP flags."""
    if patcher.patches:
        raise ValueError("patcher_like: the patcher already has weight patches; swap it right after building")
    n = cls(patcher.model, load_device=patcher.load_device, offload_device=patcher.offload_device)
    n.object_patches = dict(patcher.object_patches)
    n.model_options = patcher.model_options
    n.hook_mode, n.is_clip = patcher.hook_mode, patcher.is_clip
    if hasattr(patcher, "cached_patcher_init"):     # 0.33: how clone(disable_dynamic=True) rebuilds the model
        n.cached_patcher_init = patcher.cached_patcher_init
    return n


# ------------------------------------------------------------------------------------------------------------
# saving: ComfyUI's save nodes call BaseModel.state_dict_for_saving
# ------------------------------------------------------------------------------------------------------------

def refuse_state_dict_for_saving(model, error: Exception) -> None:
    """Make `model.state_dict_for_saving(...)` (comfy.model_base.BaseModel; what comfy.sd.save_checkpoint
    writes) raise `error`, whatever arguments this ComfyUI passes (0.3.75: clip/vae/clip_vision state dicts;
    0.33: the unet state dict first, positionally)."""
    if not callable(getattr(model, "state_dict_for_saving", None)):
        raise _missing("comfy.model_base.BaseModel.state_dict_for_saving", "missing")

    def state_dict_for_saving(*args, **kwargs):
        raise error

    model.state_dict_for_saving = state_dict_for_saving



# ------------------------------------------------------------------------------------------------------------
# reloading: 0.33's multi-GPU clones (ModelPatcher.deepclone_multigpu) rebuild a model from its loader
# ------------------------------------------------------------------------------------------------------------

def register_reload(patcher, factory, *args) -> None:
    """Tell ComfyUI how to load this model again (`factory(*args)` -> a patcher of the same model), where it
    asks (ModelPatcher.cached_patcher_init, 0.33+: multi-GPU nodes deep-clone a model per device from a fresh
    load). ComfyUI may pass disable_dynamic=...; our patchers are never dynamic, so the factory ignores it."""
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (_reload, (factory, args))


def _reload(factory, args, disable_dynamic=False):
    return factory(*args)
