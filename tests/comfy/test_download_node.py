"""'SVDQuant Download Model' inside a real ComfyUI, without network: a file already in
models/diffusion_models is loaded as is (the hub is not asked), and a bad file name fails with
nunchaku_core.hub's message while the server keeps running. The download itself is tested against a
stand-in hub in tests/test_hub.py."""
from __future__ import annotations

import json

import pytest

import flux_models as fm
import graphs

NODE = "SVDQuantDownloadModel"


def downloader(filename: str) -> dict:
    return {"class_type": NODE, "inputs": {"repo_id": "mit-han-lab/nunchaku-flux.1-dev", "filename": filename,
                                           "revision": "main", "weight_dtype": "default"}}


@pytest.fixture(scope="module")
def present(comfy_models) -> str:
    return fm.write_random_nunchaku_flux(comfy_models / "diffusion_models" / "svdq_download_present.safetensors").name


def test_node_is_registered(comfy):
    info = comfy._call(f"/object_info/{NODE}")[NODE]
    assert info["display_name"] == "SVDQuant Download Model"
    # widget order is part of saved workflows: append-only
    assert list(info["input"]["required"]) == ["repo_id", "filename", "revision", "weight_dtype"]
    assert info["output"] == ["MODEL", "STRING"]


def test_present_file_loads_without_the_hub(comfy, present):
    entry = comfy.run(graphs.txt2img(downloader(present), seed=11))
    assert entry["status"]["status_str"] == "success", json.dumps(comfy.error(entry), indent=1)[:3000]
    assert comfy.images(entry)[0].shape == (64, 64, 3)
    assert f"{present} already present, not downloading" in comfy.log()


def test_bad_filename_is_refused_and_server_survives(comfy, present):
    entry = comfy.run(graphs.txt2img(downloader("../../etc/passwd"), seed=12))
    assert entry["status"]["status_str"] == "error"
    err = comfy.error(entry)
    assert err["node_type"] == NODE and "expected a relative path" in err["exception_message"], err
    assert comfy.alive()
