"""'SVDQuant Text Encoder Loader': CLIP-L (ordinary file) + Nunchaku's 4-bit T5 -> CLIP for FLUX.

ComfyUI builds its own Flux text encoder (comfy.text_encoders.flux.flux_clip: CLIP-L SDClipModel + T5XXLModel)
and tokenizer, so CLIPTextEncode and every stock conditioning node work unchanged. What we pass in:
  - custom_operations = nodes/ops.py's SVDQuantCastOps: a T5 Linear loaded from `<name>.svdquant` runs the
    4-bit layer through nunchaku_core (compiled CPU kernel, else the reference); CLIP-L's Linears load their
    stock weights and behave as ComfyUI's manual_cast.
  - `t5xxl_model_config`: SDClipModel merges `<model_name>_model_config` over the JSON config it reads
    (comfy/text_encoders/t5_config_xxl.json), so the T5 sizes come from the file's metadata and any T5 size
    (T5-XXL, or a tiny test model) is built by ComfyUI's own T5 class.
  - for a 4-bit T5, ComfyUI's FluxTokenizer with its save hook raising: CLIPSave and CheckpointSave refuse the
    text encoder, naming the file and the fix (nodes/saving.py).
"""
from __future__ import annotations

import functools
import logging

import comfy.model_management
import comfy.sd
import comfy.text_encoders.flux
import comfy.utils
import folder_paths

from nunchaku_core.formats import nunchaku_t5

from .checkpoint import QUANT_KEY, QuantizedLinear
from .loader import release_freed_heap
from . import comfy_api
from .model_patcher import SVDQuantModelPatcher
from .ops import SVDQuantCastOps
from .saving import SaveRefusingFluxTokenizer, t5_save_message

log = logging.getLogger("SVDQuant")

# Keys of ComfyUI's T5 config that the file's config sets; ComfyUI's T5 class hard-codes the rest.
COMFY_T5_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "dense_act_fn", "is_gated_act",
                 "model_type")
COMFY_T5_FIXED = {"layer_norm_epsilon": 1e-6, "relative_attention_num_buckets": 32,
                  "relative_attention_max_distance": 128}


def _t5_state_dict(t5: nunchaku_t5.T5File) -> dict:
    """ComfyUI T5 state dict: 16-bit tensors as stored, quantized linears as QuantizedLinear under
    `<name>.svdquant` (nodes/ops.py)."""
    sd = {}
    for key in t5.keys:
        if key.rsplit(".", 1)[0] in t5.quantized:
            continue
        if key == "encoder.embed_tokens.weight":      # HF's tied copy of shared.weight; ComfyUI has only `shared`
            if "shared.weight" in t5.keys:
                continue
            sd["shared.weight"] = t5.tensor(key)
        else:
            sd[key] = t5.tensor(key)
    for name in t5.quantized:
        sd[f"{name}.{QUANT_KEY}"] = QuantizedLinear((t5.layer(name),))
    return sd


def load_text_encoder(t5_path: str, clip_l_path: str, embedding_directory=None) -> comfy.sd.CLIP:
    t5 = nunchaku_t5.open_t5(t5_path)                      # header checks: wrong kind / truncated / config
    for k, v in COMFY_T5_FIXED.items():
        if t5.config[k] != v:
            raise ValueError(f"{t5_path}: T5 config {k} = {t5.config[k]}, but ComfyUI's T5 implements only {v}")
    clip_sd = comfy.utils.load_torch_file(clip_l_path, safe_load=True)
    if comfy.sd.detect_te_model(clip_sd) != comfy.sd.TEModel.CLIP_L:
        raise ValueError(f"{clip_l_path}: not a CLIP-L text encoder (no text_model.encoder.layers.0.* keys, or "
                         f"CLIP-G/H sized); FLUX needs clip_l.safetensors here")

    class Target:
        clip = comfy.text_encoders.flux.flux_clip(dtype_t5=t5.dtype)
        # CLIPSave / CheckpointSave would write the 4-bit Linears' meta placeholders (nodes/saving.py)
        tokenizer = (functools.partial(SaveRefusingFluxTokenizer, t5_save_message(t5_path, clip_l_path,
                                                                                  len(t5.quantized)))
                     if t5.quantized else comfy.text_encoders.flux.FluxTokenizer)
        params: dict = {}

    model_options = {
        "custom_operations": SVDQuantCastOps,
        "t5xxl_model_config": {k: t5.config[k] for k in COMFY_T5_KEYS},
        # Built on the offload device; ComfyUI moves it to the load device when encoding (our Linear loads
        # tensors where the file put them, so building on the load device would leave them on the CPU).
        "initial_device": comfy.model_management.text_encoder_offload_device(),
    }
    clip = comfy.sd.CLIP(Target, embedding_directory=embedding_directory, model_options=model_options)
    vocab = len(clip.tokenizer.t5xxl.tokenizer)
    if t5.config["vocab_size"] < vocab:
        raise ValueError(f"{t5_path}: T5 vocab_size {t5.config['vocab_size']} is smaller than ComfyUI's T5 "
                         f"tokenizer ({vocab} tokens)")
    for path, sd, strict in ((clip_l_path, clip_sd, False), (t5_path, _t5_state_dict(t5), True)):
        missing, unexpected = clip.load_sd(sd)
        if missing and strict:           # open_t5 checked every key, so this is a bug, not a user error
            raise ValueError(f"{path}: ComfyUI's T5 lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if missing:
            log.warning("SVDQuant: %s: clip missing: %s", path, missing)    # as ComfyUI's own loaders say
        if unexpected:
            log.debug("SVDQuant: %s: unused keys %s", path, unexpected)
    # our ModelPatcher: memory without the meta placeholders, and LoRAs (LoraLoader's CLIP side) joined to the
    # 4-bit T5 linears instead of being dropped
    stock = clip.patcher
    clip.patcher = comfy_api.patcher_like(SVDQuantModelPatcher, stock)
    _unload(stock)
    comfy_api.register_reload(clip.patcher, _load_text_encoder_patcher, t5_path, clip_l_path, embedding_directory)
    clip.patcher.model_size()
    release_freed_heap()   # the load's transients (each layer unpacked to a byte per code, then repacked)
    log.info("SVDQuant: text encoder %s (T5 %d layers, d_model %d, %d of %d linears 4-bit) + %s, %.2f GiB",
             t5_path, t5.config["num_layers"], t5.config["d_model"], len(t5.quantized),
             len(t5.quantized) + len(t5.plain_linears), clip_l_path, clip.patcher.size / 2**30)
    return clip


def _load_text_encoder_patcher(t5_path: str, clip_l_path: str, embedding_directory=None):
    return load_text_encoder(t5_path, clip_l_path, embedding_directory).patcher


def _unload(patcher) -> None:
    """Take `patcher` out of ComfyUI's loaded models. comfy.sd.CLIP loads the patcher it builds when its load and
    initial devices agree (the CPU); once the loader has swapped in its own patcher, that entry would outlive its
    patcher, and ComfyUI's next cleanup logged "WARNING, memory leak with model FluxClipModel_" and kept it."""
    loaded = comfy.model_management.current_loaded_models
    for i, entry in enumerate(loaded):
        if entry.model is patcher:
            loaded.pop(i).model_unload()
            return


class SVDQuantTextEncoderLoader:
    @classmethod
    def INPUT_TYPES(cls):
        # Widget order is saved in workflows: append new inputs at the end, never reorder.
        names = folder_paths.get_filename_list("text_encoders")
        return {"required": {
            "t5_name": (names, {"tooltip": "Nunchaku 4-bit T5 (e.g. awq-int4-flux.1-t5xxl.safetensors) in "
                                           "models/text_encoders; its config metadata sets the T5 size."}),
            "clip_l_name": (names, {"tooltip": "An ordinary CLIP-L text encoder (clip_l.safetensors)."}),
        }}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "SVDQuant"
    DESCRIPTION = ("Loads CLIP-L and a 4-bit (W4A16, AWQ) T5 as the FLUX text encoder, built from ComfyUI's own "
                   "text-encoder classes: use it with CLIPTextEncode like DualCLIPLoader's 'flux' type.")

    def load(self, t5_name, clip_l_name):
        return (load_text_encoder(folder_paths.get_full_path_or_raise("text_encoders", t5_name),
                                  folder_paths.get_full_path_or_raise("text_encoders", clip_l_name),
                                  folder_paths.get_folder_paths("embeddings")),)


NODE_CLASS_MAPPINGS = {"SVDQuantTextEncoderLoader": SVDQuantTextEncoderLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"SVDQuantTextEncoderLoader": "SVDQuant Text Encoder Loader"}
