"""`python -m nunchaku_core inspect|dequantize`: output content and clear failures."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from nunchaku_core import reference
from nunchaku_core.formats.dequantize import iter_effective_state_dict
from nunchaku_core.formats.nunchaku import open_nunchaku
from random_checkpoint import write_random_flux

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, "-m", "nunchaku_core", *args], cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ck") / "tiny-int4.safetensors")
    write_random_flux(path, hidden=256, precision="int4", rank=48)
    return path


def test_inspect_reports_precision_rank_layers_and_totals(tiny):
    r = run("inspect", tiny)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "precision:   int4" in out and "rank:        48" in out
    assert "transformer_blocks.0.qkv_proj" in out and "single_transformer_blocks.0.norm.linear" in out
    # the shifted post-GELU layers are marked in the table
    fc2 = next(line for line in out.splitlines() if line.startswith("transformer_blocks.0.mlp_fc2 "))
    assert "yes" in fc2
    assert "total:" in out and "params" in out


def test_dequantize_matches_reference_effective_weights(tiny, tmp_path):
    dst = str(tmp_path / "flux.safetensors")
    r = run("dequantize", tiny, dst, "--dtype", "float32", "--quiet")
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file
    got = load_file(dst)
    with open_nunchaku(tiny) as ck:
        q = ck.svdquant_layer("transformer_blocks.0.mlp_fc2")
        assert torch.equal(got["double_blocks.0.img_mlp.2.weight"], reference.effective_weight(q))
        assert torch.equal(got["double_blocks.0.img_mlp.2.bias"], reference.effective_bias(q))
        parts = [ck.svdquant_layer(f"single_transformer_blocks.0.{n}") for n in ("out_proj", "mlp_fc2")]
        assert torch.equal(got["single_blocks.0.linear2.weight"],
                           torch.cat([reference.effective_weight(p) for p in parts], 1))
        assert len(got) == sum(1 for _ in iter_effective_state_dict(ck))


def test_dequantize_bad_inputs_fail_cleanly_and_leave_no_output(tmp_path, tiny):
    not_svdq = str(tmp_path / "plain.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(8, 8)}, not_svdq)
    truncated = str(tmp_path / "trunc.safetensors")
    with open(tiny, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    for src, words in ((not_svdq, "not an SVDQuant"), (truncated, "trunc")):
        dst = str(tmp_path / "out.safetensors")
        r = run("dequantize", src, dst, "--quiet")
        assert r.returncode == 2, r.stderr
        assert src in r.stderr and words.lower() in r.stderr.lower(), r.stderr
        assert "Traceback" not in r.stderr
        assert sorted(os.listdir(tmp_path)) == ["plain.safetensors", "trunc.safetensors"]  # no output, no partial


def test_dequantize_unwritable_output_is_a_clear_error(tiny, tmp_path):
    r = run("dequantize", tiny, str(tmp_path / "no-such-dir" / "out.safetensors"), "--quiet")
    assert r.returncode == 2 and "no-such-dir" in r.stderr and "Traceback" not in r.stderr


# ComfyUI's per-layer layout (what `quantize` writes by default, any family): a tiny FLUX.1 in BFL names
@pytest.fixture(scope="module")
def comfy_native(tmp_path_factory):
    import flux_models as fm
    from nunchaku_core.quantize.flux import QuantizeOptions
    from nunchaku_core.quantize.model import quantize_model
    d = tmp_path_factory.mktemp("cn")
    dense = fm.random_state_dict(fm.flux_shapes(256, 1, 1, 64, 32, True), std=0.02, seed=4)
    save_file(dense, str(d / "dense.safetensors"))
    quantize_model(d / "dense.safetensors", d / "q.safetensors", options=QuantizeOptions(rank=16, report=False))
    return d / "q.safetensors", dense


def test_inspect_comfy_native_file(comfy_native):
    path, _ = comfy_native
    r = run("inspect", str(path))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "layout:      ComfyUI's per-layer" in out and "family:      flux" in out and "rank:        16" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("double_blocks.", "single_blocks."))}
    assert len(rows) == 13      # FLUX policy on one double and one single block: 10 W4A4 + 3 W4A16
    assert rows["double_blocks.0.img_mlp.2"][1:5] == ["w4a4", "256", "1024", "16"] and "yes" in rows["double_blocks.0.img_mlp.2"]
    assert rows["double_blocks.0.img_mod.lin"][1:6] == ["w4a16", "1536", "256", "-", "64"]
    assert "quantized layers:       13" in out and "total:" in out


def test_dequantize_comfy_native_file(comfy_native, tmp_path):
    """Every quantized layer becomes its effective weight and bias under its own name (shifted layers' bias takes
    back the shift), everything else is copied: the dense model's key set, close to its weights."""
    from safetensors.torch import load_file
    from nunchaku_core.formats.comfy_native import ComfyNativeCheckpoint
    path, dense = comfy_native
    dst = tmp_path / "dense-again.safetensors"
    r = run("dequantize", str(path), str(dst), "--dtype", "float32", "--quiet")
    assert r.returncode == 0, r.stderr
    got = load_file(str(dst))
    assert sorted(got) == sorted(dense)
    ck = ComfyNativeCheckpoint(str(path))
    fc2 = ck.layer("double_blocks.0.img_mlp.2")
    assert fc2.shifted
    assert torch.equal(got["double_blocks.0.img_mlp.2.weight"], reference.effective_weight(fc2))
    assert torch.equal(got["double_blocks.0.img_mlp.2.bias"], reference.effective_bias(fc2))
    mod = ck.layer("single_blocks.0.modulation.lin")
    assert torch.equal(got["single_blocks.0.modulation.lin.weight"], reference.dequantize_w4a16(mod))
    assert torch.equal(got["img_in.weight"], dense["img_in.weight"].float())
    for name in ck.layer_names():      # 4-bit error on N(0, 0.02) weights: well under the weights' own size
        w, w0 = got[f"{name}.weight"], dense[f"{name}.weight"].float()
        assert (w - w0).norm() < 0.2 * w0.norm(), name
        assert torch.allclose(got[f"{name}.bias"], dense[f"{name}.bias"].float(), atol=0.05), name
