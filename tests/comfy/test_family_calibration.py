"""The calibration recorder on every family in a real sampling run, through the session's server, stock nodes only
around ours: UNETLoader (the unquantized tiny model, tests/family_models.py) -> 'SVDQuant Record Calibration' ->
KSampler -> decode; the file it writes then drives 'SVDQuant Quantize Model' (ComfyUI's layout, calibrated), whose
output 'SVDQuant Model Loader' loads and samples.

Checked: the recording holds exactly the family policy's W4A4 Linears (ComfyUI's module names, which are the file's
key names), each with the tokens the sampling run fed it; the quantizer used it (the file's metadata names it, every
W4A4 layer's smoothing strength is one of the calibrated search grid or none); the calibrated model renders.
FLUX.2 runs where the host allows its tiny width (tests/comfy/test_family_quantized.py says why).

The calibrated quantize -> load -> render half runs for the families whose tiny model here is under
QUANTIZE_MAX_PARAMS: ComfyUI's detection forces Qwen-Image to 380 M and Z-Image to 900 M parameters, and a
calibrated quantization (five smoothing strengths per layer) of those takes about a quarter of an hour on 2 cores.
Their calibrated quantizing runs at reduced widths in tests/test_quantize_model.py (test_calibrated_any_family);
here their recording is checked in the real sampling run.
"""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

import family_models as fm
from nunchaku_core.formats.comfy_native import ComfyNativeCheckpoint
from nunchaku_core.models import policies
from nunchaku_core.quantize import svdquant
from nunchaku_core.quantize.calibration import load_calibration
from test_family_models import DECODER, _flux2_decoder, _vae_files, family_dims, family_graph

FAMILIES = ("qwen_image", "zimage", "flux2")
MAX_ROWS = 64
QUANTIZE_MAX_PARAMS = 10_000_000


@pytest.fixture(scope="module")
def decoders(comfy_models):
    _vae_files(comfy_models)
    return comfy_models


def _ok(comfy, graph, timeout=600) -> dict:
    entry = comfy.run(graph, timeout=timeout)
    assert entry["status"]["status_str"] == "success", json.dumps(comfy.error(entry), indent=1)[:3000]
    return entry


@pytest.mark.parametrize("family", FAMILIES)
def test_record_calibrate_quantize_load(family, comfy, decoders):
    dims = family_dims(family)
    if family == "flux2" and dims["hidden"] == fm.FLUX2_HIDDEN_0375:
        pytest.skip("this ComfyUI's FLUX.2 detection fixes 48 heads (hidden 6144, 1.7 G parameters): recording "
                    "and calibrated quantizing of that model run on hosts that allow the tiny width (0.33)")
    models = decoders
    src = models / "diffusion_models" / f"cal_{family}.safetensors"
    out = models / "diffusion_models" / f"cal_{family}_int4.safetensors"
    cal = models / "svdquant_calibration" / f"cal_{family}.safetensors"
    decoder = _flux2_decoder() if family == "flux2" else DECODER[family]
    fm.write_random_model(family, src, seed=11, **dims)
    try:
        g = family_graph(family, src.name, decoder)
        g["8"] = {"class_type": "SVDQuantRecordCalibration",
                  "inputs": {"model": ["1", 0], "file_name": cal.name, "max_rows": MAX_ROWS}}
        g["4"]["inputs"]["model"] = ["8", 0]
        _ok(comfy, g)
        recording = load_calibration(cal)
        with safe_open(str(src), framework="pt") as f:
            linears = {k[:-len(".weight")]: tuple(f.get_slice(k).get_shape()) for k in f.keys()
                       if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2}
        plan = policies.plan(linears, family)
        assert recording.family == family
        assert set(recording.modules) == set(plan.of("w4a4")), set(recording.modules) ^ set(plan.of("w4a4"))
        assert all(recording.count(m) > 0 for m in recording.modules)
        assert all(recording.stats(m).rows.shape == (min(MAX_ROWS, recording.count(m)), linears[m][1])
                   for m in recording.modules)

        if fm.param_count(fm.family_shapes(family, **dims)) > QUANTIZE_MAX_PARAMS:
            return                                                      # module docstring
        q = {"1": {"class_type": "SVDQuantQuantizeModel",
                   "inputs": {"model_name": src.name, "output_name": out.stem, "precision": "int4", "rank": 16,
                              "calibration": cal.name, "gptq": False, "format": "comfy"}}}
        entry = _ok(comfy, q, timeout=900)
        assert "comfy layout" in entry["outputs"]["1"]["text"][0]
        ck = ComfyNativeCheckpoint(str(out))
        info = json.loads(ck.metadata["svdquant_quantizer"])
        assert info["calibration"] == cal.name and info["family"] == family
        report = json.loads(out.with_name(out.stem + ".quality.json").read_text())
        grid = set(svdquant.ALPHAS_CALIBRATED) | {None}
        assert all(r["alpha"] in grid for r in report["layers"] if r["type"] == "w4a4"), report["layers"][:3]

        g = family_graph(family, out.name, decoder)
        g["1"] = {"class_type": "SVDQuantModelLoader", "inputs": {"model_name": out.name, "weight_dtype": "default"}}
        assert len(comfy.images(_ok(comfy, g))) == 1
        comfy.free()
    finally:
        for p in (src, out, cal, out.with_name(out.stem + ".quality.json")):
            p.unlink(missing_ok=True)
