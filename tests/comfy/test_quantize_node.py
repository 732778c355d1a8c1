"""'SVDQuant Quantize Model' inside a real ComfyUI: the node is registered with its widgets in order, a graph
with only this node quantizes a tiny FLUX.1 (hidden 256; the quantizer reads any width) into the source's diffusion_models folder, in Nunchaku's
layout and in ComfyUI's (the default, then loaded by 'SVDQuant Model Loader' and sampled), and a bad output name fails with our message while the server
keeps running. The algorithm and the calibration recorder are tested without a server
(tests/test_quantize*.py)."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

import flux_models as fm
from graphs import txt2img
from nunchaku_core.formats.comfy_native import ComfyNativeCheckpoint
from nunchaku_core.formats.nunchaku import open_nunchaku

NODE = "SVDQuantQuantizeModel"


def quantize_graph(model_name: str, output_name: str, rank: int = 16, fmt: str = "auto") -> dict:
    return {"1": {"class_type": NODE, "inputs": {"model_name": model_name, "output_name": output_name,
                                                 "precision": "int4", "rank": rank,
                                                 "calibration": "none (data-free)", "gptq": False,
                                                 "format": fmt}}}


@pytest.fixture(scope="module")
def source(comfy_models) -> str:
    shapes = fm.flux_shapes(256, 1, 1, 64, 32, True)
    path = comfy_models / "diffusion_models" / "svdq_quantize_src.safetensors"
    save_file(fm.random_state_dict(shapes, 0.02, seed=3), str(path))
    return path.name


def test_node_is_registered(comfy):
    info = comfy._call(f"/object_info/{NODE}")[NODE]
    assert info["display_name"] == "SVDQuant Quantize Model"
    # widget order is part of saved workflows: append-only
    assert list(info["input"]["required"]) == ["model_name", "output_name", "precision", "rank", "calibration", "gptq",
                                               "format"]
    assert info["output"] == ["STRING"] and info["output_node"] is True


def test_quantize_in_comfyui(comfy, comfy_models, source):
    entry = comfy.run(quantize_graph(source, "svdq_quantized_by_node", fmt="nunchaku"), timeout=900)
    assert entry["status"]["status_str"] == "success", json.dumps(comfy.error(entry), indent=1)[:3000]
    out = comfy_models / "diffusion_models" / "svdq_quantized_by_node.safetensors"
    with open_nunchaku(out) as ck:
        assert ck.precision == "int4" and ck.quantization_config["rank"] == 16
        assert ck.comfy_config["model_config"]["hidden_size"] == 256
        assert len(ck.svdquant_layer_names()) == 12
    assert (comfy_models / "diffusion_models" / "svdq_quantized_by_node.quality.json").is_file()
    assert "svdq_quantized_by_node.safetensors" in entry["outputs"]["1"]["text"][0]


def test_quantize_to_comfy_layout_and_load(comfy, comfy_models, source):
    """The default format: ComfyUI's per-layer layout, which the SVDQuant Model Loader loads and samples."""
    entry = comfy.run(quantize_graph(source, "svdq_quantized_comfy"), timeout=900)
    assert entry["status"]["status_str"] == "success", json.dumps(comfy.error(entry), indent=1)[:3000]
    assert "comfy layout" in entry["outputs"]["1"]["text"][0]
    ck = ComfyNativeCheckpoint(str(comfy_models / "diffusion_models" / "svdq_quantized_comfy.safetensors"))
    assert len([n for n in ck.layer_names() if ck.layer_format(n) == "svdquant_w4a4"]) == 10
    graph = txt2img({"class_type": "SVDQuantModelLoader",
                     "inputs": {"model_name": "svdq_quantized_comfy.safetensors", "weight_dtype": "default"}}, steps=2)
    entry = comfy.run(graph)
    assert entry["status"]["status_str"] == "success", json.dumps(comfy.error(entry), indent=1)[:3000]
    assert comfy.images(entry)[0].shape == (64, 64, 3)


def test_bad_output_name_is_refused_and_server_survives(comfy, comfy_models, source):
    entry = comfy.run(quantize_graph(source, "../escape"))
    assert entry["status"]["status_str"] == "error"
    err = comfy.error(entry)
    assert err["node_type"] == NODE and "plain file name" in err["exception_message"], err
    assert not (comfy_models / "escape.safetensors").exists()
    assert comfy.alive()
