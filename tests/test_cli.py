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
