"""Bad inputs in a real ComfyUI (the session's server): each is a clear error naming the file and the key, shown on
the node that failed, and the server keeps running and rendering.

- 'SVDQuant Model Loader' on a ComfyUI-layout file of a family ComfyUI's detection does not know (made-up key
  names), and on one whose per-layer metadata contradicts its tensors;
- a LoRA for another family (Z-Image's, on a quantized FLUX.1: ComfyUI maps none of its tensors and by itself
  would only log 'lora key not loaded' per tensor and render the unchanged model) through ComfyUI's stock
  LoraLoaderModelOnly and through 'SVDQuant LoRA Stack'. The model the loader cached is unchanged afterwards.

The in-process tables are tests/test_bad_files.py (every metadata contradiction), tests/test_generic_loader.py
(undetectable families) and tests/test_lora_comfy.py (LoRAs for other families, partly mapped ones).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import flux_models as fm
import graphs
import lora_files
from nunchaku_core.formats.comfy_native import encode_comfy_quant, svdquant_to_comfy

MODEL_LOADER = "SVDQuantModelLoader"


def model_loader(name: str) -> dict:
    return {"class_type": MODEL_LOADER, "inputs": {"model_name": name, "weight_dtype": "default"}}


@pytest.fixture(scope="module")
def bad(comfy_models) -> dict:
    """A valid comfy-layout FLUX.1 and bad files beside it, by kind -> file name; the LoRA in models/loras."""
    d = comfy_models / "diffusion_models"
    good = fm.write_random_comfy_native_flux(d / "bi_flux_int4.safetensors", seed=2)
    g = torch.Generator().manual_seed(0)
    made_up = {f"mystery_blocks.{i}.mix.{k}": v for i in range(2)
               for k, v in svdquant_to_comfy(fm.random_svdquant_layer(256, 128, 8, "int4", False, g)).items()}
    made_up["mystery_embed.weight"] = torch.zeros(128, 16, dtype=torch.bfloat16)
    save_file(made_up, str(d / "bi_made_up_family.safetensors"))
    with safe_open(str(good), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["double_blocks.0.img_mod.lin.comfy_quant"] = encode_comfy_quant({"format": "svdquant_w4a4"})
    save_file(tensors, str(d / "bi_contradicting.safetensors"))
    save_file(lora_files.zimage_lora(), str(comfy_models / "loras" / "bi_zimage_lora.safetensors"))
    return {"good": good.name, "made_up": "bi_made_up_family.safetensors", "contradicting": "bi_contradicting.safetensors",
            "lora": "bi_zimage_lora.safetensors", "dir": d, "loras": comfy_models / "loras"}


def _image(comfy, graph) -> torch.Tensor:
    entry = comfy.run(graph)
    assert entry["status"]["status_str"] == "success", json.dumps(comfy.error(entry), indent=1)[:3000]
    images = comfy.images(entry)
    assert len(images) == 1
    return torch.from_numpy(images[0].copy())


def _error(comfy, graph) -> dict:
    entry = comfy.run(graph)
    assert entry["status"]["status_str"] == "error", entry["status"]
    return comfy.error(entry)


@pytest.mark.parametrize("kind,fragments", [
    ("made_up", ("ComfyUI's model detection (comfy.model_detection.detect_unet_config) recognises no model family",
                 "first keys: ['mystery_blocks.0.mix.weight'", "Expected a diffusion model's own key names",
                 "double_blocks.0.img_attn.qkv (FLUX.1, FLUX.2)")),
    ("contradicting", ("double_blocks.0.img_mod.lin.comfy_quant says svdquant_w4a4, but the layer has awq_w4a16's "
                       "tensors (double_blocks.0.img_mod.lin.weight_zeros)",
                       "the per-layer metadata contradicts the tensors")),
])
def test_model_loader_bad_file_clear_error_server_survives(comfy, bad, kind, fragments):
    err = _error(comfy, graphs.txt2img(model_loader(bad[kind]), seed=21))
    assert err["node_type"] == MODEL_LOADER
    msg = err["exception_message"]
    for fragment in (f"{bad['dir'] / bad[kind]}: ",) + fragments:
        assert fragment in msg, (fragment, msg)
    assert comfy.alive()
    img = _image(comfy, graphs.txt2img(model_loader(bad["good"]), seed=22))
    assert img.shape == (64, 64, 3)


def _with_lora(graph: dict, lora: str, stack: bool) -> dict:
    g = {k: {**v, "inputs": dict(v["inputs"])} for k, v in graph.items()}
    if stack:
        inputs = {"model": ["1", 0], "lora_1": lora, "strength_1": 1.0}
        for i in range(2, 5):
            inputs[f"lora_{i}"], inputs[f"strength_{i}"] = "None", 1.0
        g["20"] = {"class_type": "SVDQuantLoRAStack", "inputs": inputs}
    else:
        g["20"] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": ["1", 0], "lora_name": lora, "strength_model": 1.0}}
    g["4"]["inputs"]["model"] = ["20", 0]
    return g


@pytest.mark.parametrize("stack", [False, True], ids=["LoraLoaderModelOnly", "SVDQuantLoRAStack"])
def test_other_family_lora_clear_error_model_unchanged(comfy, bad, stack):
    """The error names the LoRA file, its first tensor and the model's file. Then the loader's cached model
    renders a new seed exactly as the same file freshly loaded does: the failed LoRA left nothing on it."""
    base = graphs.txt2img(model_loader(bad["good"]), seed=23)
    _image(comfy, base)
    err = _error(comfy, _with_lora(base, bad["lora"], stack))
    assert err["node_type"] == ("SVDQuantLoRAStack" if stack else "LoraLoaderModelOnly")
    assert err["exception_type"].endswith("LoRAError"), err
    msg = err["exception_message"]
    lora = lora_files.zimage_lora()
    for fragment in (f"LoRA {bad['loras'] / bad['lora']}: none of its {len(lora)} tensors (first: {sorted(lora)[0]}",
                     f"ComfyUI's Flux loaded from {bad['dir'] / bad['good']}", "made for another model family",
                     "Nothing was applied"):
        assert fragment in msg, (fragment, msg)
    assert comfy.alive()
    after = _image(comfy, graphs.txt2img(model_loader(bad["good"]), seed=24))   # the cached model, sampled anew
    comfy.free()                                                                 # drops the node cache too
    fresh = _image(comfy, graphs.txt2img(model_loader(bad["good"]), seed=24))
    assert torch.equal(after, fresh)
