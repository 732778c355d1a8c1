"""'SVDQuant Model Loader' (nodes/loader.py): ComfyUI's own detection on a quantized file's dense shapes, ComfyUI
in-process. Bad inputs end in errors naming the file."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfy_inprocess import pack_module
from flux_models import random_svdquant_layer
from nunchaku_core.formats.comfy_native import svdquant_to_comfy


def test_undetectable_family_is_a_clear_error(tmp_path):
    loader = pack_module("loader")
    g = torch.Generator().manual_seed(0)
    layer = random_svdquant_layer(128, 128, 8, "int4", False, g)
    tensors = {f"mystery.blocks.0.proj.{k}": v for k, v in svdquant_to_comfy(layer).items()}
    tensors["mystery.embed.weight"] = torch.zeros(128, 16)
    path = tmp_path / "mystery.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=rf"{path}: ComfyUI's model detection does not recognise"):
        loader.load_svdquant_model(str(path))
