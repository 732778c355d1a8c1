"""ComfyUI's save nodes (ModelSave, CheckpointSave, CLIPSave) on our 4-bit models, ComfyUI imported in-process,
tiny random models: refused with SaveError naming the loaded file, the reason and the fix, and no file written
(nodes/saving.py). Before, safetensors died on the 4-bit Linears' meta placeholders ("Cannot copy out of meta
tensor; no data!"), CLIPSave after writing the CLIP-L file. A text encoder whose T5 is 16-bit still saves.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import flux_models as fm
import lora_files
from comfy_inprocess import COMFYUI, pack_module
from nunchaku_core.quantize import t5 as qt
from nunchaku_core.formats import nunchaku_t5 as nt
from test_t5_format import random_t5

TINY = dict(hidden=256, depth=2, depth_single=2)
# vocab 32128: ComfyUI's T5 tokenizer (32100 tokens) must fit; 2 blocks of 7 Linears, all quantized
T5_TINY = dict(vocab_size=32128, d_model=128, d_kv=32, d_ff=256, num_heads=4, num_layers=2)


@pytest.fixture(scope="module")
def nodes():
    loader, te, saving, ops = (pack_module(m) for m in ("loader", "text_encoder", "saving", "ops"))
    import comfy.model_management
    import comfy.sd
    import comfy_extras.nodes_model_merging as merging
    yield {"loader": loader, "te": te, "SaveError": saving.SaveError, "sd": comfy.sd, "merging": merging,
           "quantized_linears": ops.quantized_linears}
    comfy.model_management.unload_all_models()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("save_models")
    flux = fm.write_random_nunchaku_flux(d / "svdq-int4-tiny.safetensors", **TINY, seed=3)
    save_file(fm.clip_l_state_dict(), str(d / "clip_l.safetensors"))
    nt.write_t5(str(d / "t5_fp16.safetensors"), T5_TINY, random_t5(T5_TINY, seed=1), dtype=torch.bfloat16)
    ids = qt.tokenize(qt.DEFAULT_PROMPTS[:4], COMFYUI / "comfy/text_encoders/t5_tokenizer/tokenizer.json")
    qt.quantize_t5(qt.T5Source(d / "t5_fp16.safetensors"), str(d / "t5_int4.safetensors"), ids)
    yield {"flux": str(flux), "clip_l": str(d / "clip_l.safetensors"), "t5_fp16": str(d / "t5_fp16.safetensors"),
           "t5_int4": str(d / "t5_int4.safetensors")}
    shutil.rmtree(d, ignore_errors=True)    # 264 MB (CLIP-L is full size): not kept to the session's end


@pytest.fixture(scope="module")
def flux(nodes, files):
    return nodes["loader"].load_svdquant_model(files["flux"])


@pytest.fixture(scope="module")
def clip_int4(nodes, files):
    return nodes["te"].load_text_encoder(files["t5_int4"], files["clip_l"])


@pytest.fixture(scope="module")
def clip_fp16(nodes, files):
    return nodes["te"].load_text_encoder(files["t5_fp16"], files["clip_l"])


def node(nodes, name, out):
    n = getattr(nodes["merging"], name)()
    n.output_dir = str(out)          # the nodes take ComfyUI's output folder at construction
    return n


def written(out) -> list[str]:
    """Files under the output folder (the save nodes may create its subfolders before failing)."""
    return [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs]


def assert_flux_refused(e, path, n_quantized):
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg                                                  # which model
    assert f"{n_quantized} 4-bit Linears hold packed 4-bit codes, not the dense weights" in msg   # why
    assert f"{path} already is the saved 4-bit model" in msg and "'SVDQuant FLUX Loader'" in msg   # the fix
    assert "LoRAs as separate files applied at load" in msg
    assert "load and save the unquantized model" in msg
    assert f"python -m nunchaku_core dequantize {path} <output>.safetensors" in msg   # a Nunchaku-layout file
    assert msg.endswith("No file was written.")


def assert_t5_refused(e, files):
    msg = str(e.value)
    assert msg.startswith(f"{files['t5_int4']}: a text encoder with this 4-bit T5 cannot be saved"), msg
    assert "14 4-bit Linears hold packed 4-bit codes, not the dense weights" in msg
    assert f"{files['t5_int4']} already is the saved 4-bit T5 (and {files['clip_l']} the CLIP-L)" in msg
    assert "'SVDQuant Text Encoder Loader'" in msg and "LoRAs as separate files applied at load" in msg
    assert "load and save the unquantized T5" in msg and msg.endswith("No file was written.")


# ---------------------------------------------------------------------------------------------------------
# MODEL
# ---------------------------------------------------------------------------------------------------------

def test_model_save_refused(nodes, files, flux, tmp_path):
    with pytest.raises(nodes["SaveError"]) as e:
        node(nodes, "ModelSave", tmp_path).save(flux, "diffusion_models/ComfyUI")
    assert_flux_refused(e, files["flux"], len(nodes["quantized_linears"](flux.model)))
    assert written(tmp_path) == []


def test_model_save_with_lora_refused(nodes, files, flux, tmp_path):
    lora_sd, expected = lora_files.kohya(**TINY)
    patched, _ = nodes["sd"].load_lora_for_models(flux, None, lora_sd, 0.8, 0)   # LoraLoaderModelOnly
    assert len([k for k in patched.patches if k.endswith(".weight")]) == len(expected)   # LoRA keys still map
    with pytest.raises(nodes["SaveError"]) as e:
        node(nodes, "ModelSave", tmp_path).save(patched, "diffusion_models/ComfyUI")
    assert_flux_refused(e, files["flux"], len(nodes["quantized_linears"](flux.model)))
    assert written(tmp_path) == []


def test_partially_loaded_model_with_lora_reaches_the_refusal(nodes, files, flux, tmp_path):
    """On a GPU that cannot hold the whole model, the save nodes' load (force_patch_weights) patches offloaded
    modules' weights one by one; a quantized Linear's has no data (it died with AttributeError: 'NoneType'
    object has no attribute 'to'). The CPU never loads partially, so this calls that load directly."""
    lora_sd, _ = lora_files.kohya(**TINY)
    patched, _ = nodes["sd"].load_lora_for_models(flux, None, lora_sd, 0.8, 0)
    patched.load(torch.device("cpu"), lowvram_model_memory=1, force_patch_weights=True)
    try:
        quantized = [m for m in patched.model.modules() if getattr(m, "parts", None) is not None]
        assert quantized and all(m.lora_parts is not None for m in quantized)    # patches joined to the 4-bit parts
        with pytest.raises(nodes["SaveError"]) as e:
            node(nodes, "ModelSave", tmp_path).save(patched, "diffusion_models/ComfyUI")
        assert_flux_refused(e, files["flux"], len(nodes["quantized_linears"](flux.model)))
    finally:
        patched.unpatch_model()
    assert written(tmp_path) == []


def test_checkpoint_save_refused(nodes, files, flux, clip_fp16, clip_int4, tmp_path):
    save = node(nodes, "CheckpointSave", tmp_path).save
    with pytest.raises(nodes["SaveError"]) as e:                 # our MODEL, a CLIP without 4-bit layers
        save(flux, clip_fp16, None, "checkpoints/ComfyUI")
    assert_flux_refused(e, files["flux"], len(nodes["quantized_linears"](flux.model)))
    with pytest.raises(nodes["SaveError"]) as e:                 # and our 4-bit CLIP: its parts are asked first
        save(flux, clip_int4, None, "checkpoints/ComfyUI")
    assert_t5_refused(e, files)
    assert written(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------------------

def test_clip_save_refused(nodes, files, clip_int4, tmp_path):
    with pytest.raises(nodes["SaveError"]) as e:
        node(nodes, "CLIPSave", tmp_path).save(clip_int4, "clip/ComfyUI")
    assert_t5_refused(e, files)
    assert written(tmp_path) == []          # before: clip/ComfyUI_clip_l_00001_.safetensors, then the crash


def test_clip_save_with_lora_refused(nodes, files, clip_int4, tmp_path):
    """LoraLoader's CLIP side clones the CLIP (comfy.sd.CLIP.clone builds a plain CLIP): the refusal survives."""
    g = torch.Generator().manual_seed(3)
    lora = {"lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.randn(4, 128, generator=g),
            "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.randn(128, 4, generator=g)}
    _, clip = nodes["sd"].load_lora_for_models(None, clip_int4, lora, 0.0, 1.0)
    assert clip is not clip_int4 and len(clip.patcher.patches) == 1
    with pytest.raises(nodes["SaveError"]) as e:
        node(nodes, "CLIPSave", tmp_path).save(clip, "clip/ComfyUI")
    assert_t5_refused(e, files)
    assert written(tmp_path) == []


def test_16bit_t5_text_encoder_still_saves(nodes, clip_fp16, tmp_path):
    node(nodes, "CLIPSave", tmp_path).save(clip_fp16, "clip/ComfyUI")
    names = sorted(os.path.basename(f) for f in written(tmp_path))
    assert names == ["ComfyUI_clip_l_00001_.safetensors", "ComfyUI_t5xxl_00001_.safetensors"]
    with safe_open(str(tmp_path / "clip" / "ComfyUI_t5xxl_00001_.safetensors"), "pt") as f:
        assert "encoder.block.0.layer.0.SelfAttention.q.weight" in f.keys()
