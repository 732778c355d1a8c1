"""A Nunchaku SDXL file (nunchaku's naming and packing, tests/nunchaku_sdxl_files.py) in the real host, at the
smallest SDXL whose transformer blocks nunchaku's format can hold: tests/family_models.sdxl_shapes with
channel_mult (1, 2, 2), i.e. levels of 320, 640 and 640 channels and SDXL's transformer depths 0, 0, 2, 2, 10, 10
(24 blocks, all 640 wide; nunchaku's GEMM needs widths that are multiples of 128, which the default 320-wide tiny
SDXL is not). 384 M parameters, 177 M of them 4-bit codes: a 507 MB file.

In this process: the file read through the loader's branch (nodes/checkpoint.load_checkpoint) has exactly the keys
and shapes of the SDXL UNet ComfyUI's own detection picks and builds (on the meta device). Through the session's
server: 'SVDQuant Model Loader' -> TinyFamilyConditioning -> EmptyLatentImage -> KSampler 2 steps -> taesdxl ->
SaveImage succeeds, ComfyUI loads it as SDXL with its 192 quantized Linears (24 blocks x attn1 q, k, v, out,
attn2 q, out, ff in, out) and no missing or unexpected UNet keys, and the image is finite
(no NaN cast warning) and not constant. The effective weights themselves are checked in tests/test_nunchaku_sdxl.py.
"""
from __future__ import annotations

import time

import pytest
import torch

import family_models as fm
import nunchaku_sdxl_files as nf
from comfy_inprocess import import_pack, pack_module
from test_family_models import DECODER, _vae_files, family_graph

SHAPES = fm.sdxl_shapes(channel_mult=(1, 2, 2))


@pytest.fixture(scope="module")
def sdxl_file(comfy_models):
    """Written once into the session's diffusion_models (build and write: 32 s on the 2 shared cores, load average 7;
    1.0 GB peak in this process, released when written)."""
    path = comfy_models / "diffusion_models" / "svdq-int4_r32-tiny-sdxl.safetensors"
    t0 = time.time()
    nf.Builder(SHAPES, seed=0).build().write(path)
    print(f"\nNunchaku SDXL test file: {path.stat().st_size / 2**20:.0f} MB in {time.time() - t0:.1f} s")
    yield path
    path.unlink()


def test_comfy_builds_sdxl_with_exactly_these_keys(sdxl_file):
    import_pack()
    import comfy.model_detection

    fsd, comfy_api = pack_module("checkpoint"), pack_module("comfy_api")
    ck = fsd.load_checkpoint(str(sdxl_file))
    dense = {k: torch.empty(tuple(v.shape), device="meta")
             for k, v in comfy_api.dense_shapes(ck.state_dict, fsd.QUANT_KEY).items()}
    del ck
    mc = comfy.model_detection.model_config_from_unet(dict(dense), "")
    assert type(mc).__name__ == "SDXL", type(mc).__name__
    mc.set_inference_dtype(torch.bfloat16, None)
    model = mc.get_model(dict(dense), "", device=torch.device("meta"))
    want = {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in dense.items()}
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    assert {k: got[k] for k in want if got[k] != want[k]} == {}


def test_renders_through_the_model_loader(sdxl_file, comfy, comfy_models):
    _vae_files(comfy_models)
    graph = family_graph("sdxl", sdxl_file.name, DECODER["sdxl"])
    graph["1"] = {"class_type": "SVDQuantModelLoader", "inputs": {"model_name": sdxl_file.name, "weight_dtype": "default"}}
    log_start = len(comfy.log())
    try:
        t0 = time.time()
        entry = comfy.run(graph)
        seconds = time.time() - t0
        log = comfy.log()[log_start:]
        assert entry["status"]["status_str"] == "success", (comfy.error(entry), log[-3000:])
        images = comfy.images(entry)
        assert [im.shape for im in images] == [(64, 64, 3)]
        assert "Requested to load SDXL\n" in log
        assert "nunchaku layout, 192 quantized Linears) as ComfyUI's SDXL" in log   # 24 blocks x 8 Linears
        assert [line for line in log.splitlines() if "unet missing" in line or "unet unexpected" in line] == []
        assert "invalid value encountered" not in log
        assert images[0].min() != images[0].max()
        print(f"\nNunchaku SDXL through SVDQuant Model Loader: load + 2 steps + decode in {seconds:.1f} s")
    finally:
        comfy.free()
