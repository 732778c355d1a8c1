"""Checkpoints written by the ORIGINAL Nunchaku tooling (DeepCompressor's converter, see
original_tooling.py) must read, and `dequantize --dtype float32` must reproduce their effective weights
to float32 rounding, with the expected values computed independently in float64.

Tolerance: every expected weight is main + Σ_r up·down where each product and `main` (= out_scale·code·
scale/s) are exact or singly rounded in float32; the sum of R + 1 terms and the division by s round at
most R + 3 times, each by at most u = 2^-24 of the running magnitude, which is bounded by
bound = |main| + Σ_r |up|·|down|. So |ours − expected| ≤ (R + 3)·u·bound, elementwise.
Biases: stored in bf16 by the converter (its rounding is reproduced in the expectation); the effective
bias of shifted layers adds σ·Σ_k main[n, k], a K-term fp32 sum: ≤ (K + 2)·u·(|bias| + σ·Σ|main|).
"""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from original_tooling import SIGMA, Builder

U = 2.0 ** -24
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_against(builder: Builder, out_path: str):
    got = load_file(out_path)
    assert set(got) == set(builder.expected), (sorted(set(got) ^ set(builder.expected)))
    for key, want in builder.expected.items():
        g = got[key]
        assert g.dtype == torch.float32, key
        assert g.shape == want.shape, (key, g.shape, want.shape)
        err = (g.double() - want).abs()
        if key in builder.bounds:
            tol = (builder.rank * 2 + 3) * U * builder.bounds[key]   # linear1/linear2 concatenate two branches
        elif key.endswith(".bias") and key.replace(".bias", ".weight") in builder.bounds:
            K = builder.bounds[key.replace(".bias", ".weight")].shape[1]
            tol = (K + 2) * U * (want.abs() + SIGMA * builder.bounds[key.replace(".bias", ".weight")].sum(1))
        else:
            tol = U * want.abs()   # copies and W4A16 dequantization: exact up to one fp32 rounding
        bad = err > tol
        assert not bad.any(), f"{key}: {int(bad.sum())} elements off, max err {err.max().item():.3g}, " \
                              f"tol there {tol.flatten()[err.flatten().argmax()].item():.3g}"


def dequantize(src: str, dst: str):
    r = subprocess.run([sys.executable, "-m", "nunchaku_core", "dequantize", src, dst, "--dtype", "float32", "--quiet"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("precision,rank", [("int4", 32), ("nvfp4", 32), ("int4", 24)])
def test_dequantize_single_file_from_original_tooling(tmp_path, precision, rank):
    b = Builder(precision, rank, seed=rank).build()
    src = b.write_single_file(str(tmp_path / "svdq.safetensors"))
    dst = str(tmp_path / "flux.safetensors")
    # the converter pads the rank to a multiple of 16; padded columns are zero and change nothing
    b.rank = (rank + 15) // 16 * 16
    dequantize(src, dst)
    check_against(b, dst)


def test_dequantize_legacy_folder_from_original_tooling(tmp_path):
    b = Builder("int4", 32, seed=5, guidance=False).build()
    folder = b.write_legacy_folder(str(tmp_path / "svdq-int4-legacy"))
    dst = str(tmp_path / "flux.safetensors")
    dequantize(folder, dst)
    check_against(b, dst)


def test_original_file_layers_roundtrip_through_our_writer(tmp_path):
    """Reading an original file and writing it with our writer reproduces every packed tensor byte for byte."""
    from nunchaku_core.formats.nunchaku import open_nunchaku, write_nunchaku

    for precision in ("int4", "nvfp4"):
        b = Builder(precision, 32, seed=11).build()
        src = b.write_single_file(str(tmp_path / f"orig-{precision}.safetensors"))
        dst = str(tmp_path / f"ours-{precision}.safetensors")
        with open_nunchaku(src) as ck:
            write_nunchaku(dst, svdquant={n: ck.svdquant_layer(n) for n in ck.svdquant_layer_names()},
                           w4a16={n: ck.w4a16_layer(n) for n in ck.w4a16_layer_names()},
                           plain={n: ck.plain_tensor(n) for n in ck.plain_tensor_names()},
                           config=ck.config, comfy_config=ck.comfy_config, model_class=ck.model_class,
                           quantization_config=ck.quantization_config)
        a, c = load_file(src), load_file(dst)
        assert set(a) == set(c), sorted(set(a) ^ set(c))
        for k in a:
            assert a[k].dtype == c[k].dtype and a[k].shape == c[k].shape, k
            assert torch.equal(a[k].view(torch.uint8), c[k].view(torch.uint8)), k
