"""'SVDQuant Model Loader' (nodes/loader.py): ComfyUI's own detection on a quantized file's dense shapes, ComfyUI
in-process. Bad inputs end in errors naming the file."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfy_inprocess import pack_module
from flux_models import random_svdquant_layer
from nunchaku_core.formats.comfy_native import svdquant_to_comfy


def _quantized(prefix: str, N: int = 128, K: int = 128) -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"{prefix}.{k}": v for k, v in svdquant_to_comfy(random_svdquant_layer(N, K, 8, "int4", False, g)).items()}


@pytest.mark.parametrize("tensors,message", [
    # key names of no family ComfyUI knows
    ({**_quantized("mystery.blocks.0.proj"), "mystery.embed.weight": torch.zeros(128, 16)},
     r"recognises no model family in this file's \d+ tensors \(first keys: \['mystery\.blocks\.0\.proj\.weight'.*"
     r"Expected a diffusion model's own key names .*double_blocks\.0\.img_attn\.qkv \(FLUX\.1, FLUX\.2\)"),
    # Qwen-Image's marker (txt_norm) without the tensors its detection reads (img_in)
    ({**_quantized("transformer_blocks.0.attn.to_q"), "txt_norm.weight": torch.ones(128)},
     r"failed on this model's layers: it reads 'img_in\.weight' from the file's tensors; "
     r"if the unquantized model loads in ComfyUI's 'Load Diffusion Model'"),
], ids=["made-up-keys", "marker-without-its-tensors"])
def test_undetectable_family_is_a_clear_error(tmp_path, tensors, message):
    loader = pack_module("loader")
    path = tmp_path / "mystery.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=rf"{path}: ComfyUI's model detection .*{message}"):
        loader.load_svdquant_model(str(path))


def test_whole_checkpoint_prefix_is_read_as_load_diffusion_model_reads_it(tmp_path):
    """A ComfyUI-layout file with every diffusion-model key under model.diffusion_model. (what ComfyUI's
    CheckpointSave writes) loads as the unprefixed file does; the text encoder's and VAE's keys are left out."""
    from safetensors import safe_open
    from comfy_inprocess import checkpoint_module
    from flux_models import write_random_comfy_native_flux
    fsd = checkpoint_module()
    plain = write_random_comfy_native_flux(tmp_path / "plain.safetensors", hidden=128)
    with safe_open(str(plain), "pt") as f:
        tensors = {f"model.diffusion_model.{k}": f.get_tensor(k) for k in f.keys()}
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4)
    tensors["cond_stage_model.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    prefixed = tmp_path / "prefixed.safetensors"
    save_file(tensors, str(prefixed))
    a, b = fsd.load_checkpoint(str(plain)), fsd.load_checkpoint(str(prefixed))
    assert a.state_dict.keys() == b.state_dict.keys() and a.model_config == b.model_config
    loader = pack_module("loader")
    patcher = loader.load_svdquant_model(str(prefixed))
    assert type(patcher.model.model_config).__name__ == "Flux"
