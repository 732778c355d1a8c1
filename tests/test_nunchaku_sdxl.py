"""Nunchaku's SDXL UNet files (nunchaku_core/formats/nunchaku_sdxl.py): files built with nunchaku's naming and packing
(tests/nunchaku_sdxl_files.py) read into ComfyUI's SDXL UNet names, with every quantized layer's effective weight
and bias equal to the expectation computed independently in float64; the file's diffusers names are ComfyUI's own
unet_to_diffusers mapping; the loader's branch (nodes/checkpoint.load_checkpoint); bad files fail naming the file
and the key. ComfyUI building its own SDXL from such a file, and rendering it, are in tests/comfy/test_nunchaku_sdxl_render.py
(the smallest SDXL ComfyUI detects holds 170 M codes).

The model here has SDXL's layout at 128 channels (tests/family_models.sdxl_shapes with channels=128): levels of
128, 128 and 256 channels, two ResBlocks each, transformer depths 0, 0, 1, 1, 2, 1 in the input half, 1, 1, 1 in the
output half's first level (the one that ends with an upsampler after an attention), and a middle block with one
transformer block, as nunchaku's UNet always has; every mapping rule of the reader, 44 M parameters.

Tolerance (as tests/test_nunchaku_dit.py): reference.effective_weight forms main = out_scale·(code·scale)/s, where
code·scale is exact in fp32, /s and ·out_scale round once each, then adds U·Dᵀ (R exact products, R − 1 roundings)
with one more rounding: ≤ (R + 3)·u·(|main| + |U|·|D|ᵀ) elementwise, u = 2^-24. Biases are exact copies (no SDXL
layer is σ-shifted).
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import family_models as fm
import nunchaku_oracle as oracle
import nunchaku_sdxl_files as nf
from comfy_inprocess import checkpoint_module
from nunchaku_core import reference
from nunchaku_core.formats.nunchaku import CheckpointError, open_nunchaku
from nunchaku_core.formats.nunchaku_dit import split_rows
from nunchaku_core.formats.nunchaku_sdxl import SDXL, is_nunchaku_sdxl, read_nunchaku_sdxl
from nunchaku_core.layer import SVDQuantLayer, tensors_equal
from nunchaku_dit_files import Builder as DiTBuilder, assert_checkpoint_holds

U = 2.0 ** -24
SHAPES = nf.with_middle(fm.sdxl_shapes(channel_mult=(1, 1, 2), channels=128, transformer_depth=(0, 0, 1, 1, 2, 1),
                                       output_transformer_depth=(0,) * 6 + (1, 1, 1)))
CASES = [("int4", "cpp"), ("int4", "python"), ("nvfp4", "cpp")]
IDS = [f"{p}-{n}" for p, n in CASES]
BLOCK = "input_blocks.7.1.transformer_blocks.1"          # the second block of a depth-2 attention
FBLOCK = "down_blocks.2.attentions.0.transformer_blocks.1"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(Builder, file) per case, built once (about 3 s each)."""
    cache = {}

    def get(precision="int4", naming="cpp"):
        key = (precision, naming)
        if key not in cache:
            b = nf.Builder(SHAPES, precision, rank=32, seed=len(cache) + 1, naming=naming).build()
            cache[key] = (b, b.write(tmp_path_factory.mktemp("sdxl") / f"sdxl-{precision}-{naming}.safetensors"))
        return cache[key]
    return get


def read(path):
    with open_nunchaku(path) as ck:
        return read_nunchaku_sdxl(ck)


def test_vectorized_packers_equal_the_oracle():
    """tests/nunchaku_sdxl_files.py's packers and nunchaku_oracle.py's element-by-element loops give the same bytes,
    for INT4 and NVFP4 layers of two 128-row tiles, two 64-column tiles and rank 32, in both key namings."""
    g = torch.Generator().manual_seed(7)
    N, K, R = 256, 128, 32
    for precision in ("int4", "nvfp4"):
        int4 = precision == "int4"
        layer = SimpleNamespace(
            precision=precision,
            codes=torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8) if int4
            else torch.randint(0, 16, (N, K), generator=g, dtype=torch.int8),
            wscales=torch.rand(N, K // 64, generator=g).to(torch.bfloat16) if int4
            else (torch.rand(N, K // 16, generator=g) * 4).to(torch.float8_e4m3fn),
            smooth=torch.rand(K, generator=g).to(torch.bfloat16), smooth_orig=torch.rand(K, generator=g).to(torch.bfloat16),
            proj_down=torch.randn(K, R, generator=g).to(torch.bfloat16),
            proj_up=torch.randn(N, R, generator=g).to(torch.bfloat16), bias=torch.randn(N, generator=g).to(torch.bfloat16),
            wtscale=None if int4 else torch.tensor([0.5], dtype=torch.bfloat16),
            wcscales=None if int4 else torch.rand(N, generator=g).to(torch.bfloat16))
        for naming in ("cpp", "python"):
            ours, theirs = nf.svdquant_tensors("x", layer, naming), oracle.svdquant_tensors("x", layer, naming)
            assert set(ours) == set(theirs)
            for k in theirs:
                assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
                assert torch.equal(ours[k].view(torch.uint8), theirs[k].contiguous().view(torch.uint8)), k


def test_diffusers_names_are_comfyuis():
    """The test files' names (nunchaku_sdxl_files.diffusers_names, written LDM -> diffusers) are what ComfyUI's own
    comfy.utils.unet_to_diffusers maps onto each LDM key, for the config ComfyUI's detection reads from SHAPES."""
    from comfy_inprocess import import_pack
    import_pack()
    import comfy.model_detection
    import comfy.utils

    meta = {k: torch.empty(s, device="meta") for k, s in SHAPES.items()}
    config = comfy.model_detection.detect_unet_config(meta, "")
    comfy_map = comfy.utils.unet_to_diffusers(config)
    to_diffusers = {}
    for d, ldm in comfy_map.items():
        to_diffusers.setdefault(ldm, set()).add(d)
    ours = nf.diffusers_names(SHAPES)
    assert set(ours) == set(SHAPES)
    off = {k: (ours[k], sorted(to_diffusers.get(k, ()))) for k in SHAPES if ours[k] not in to_diffusers.get(k, ())}
    assert not off, off


def assert_matches(dit, b: nf.Builder) -> None:
    assert set(dit.state) == set(b.expected), sorted(set(dit.state) ^ set(b.expected))
    for key in b.expected:
        got, want = dit.state[key], b.expected_value(key)
        if want[0] == "plain":
            assert isinstance(got, torch.Tensor) and got.dtype == want[1].dtype, key
            assert torch.equal(got.view(torch.int16), want[1].view(torch.int16)), key
            continue
        _, weight, bias, mag = want
        assert isinstance(got, SVDQuantLayer) and got.precision == b.precision and not got.shifted, key
        w = reference.effective_weight(got).double()
        assert w.shape == weight.shape, (key, w.shape, weight.shape)
        err, tol = (w - weight).abs(), (b.R + 3) * U * mag
        assert (err <= tol).all(), f"{key}: max err {err.max():.3g}, {int((err > tol).sum())} elements off"
        if bias is None:
            assert got.bias is None, key
        else:
            assert torch.equal(reference.effective_bias(got).double(), bias), key


@pytest.mark.parametrize("precision,naming", CASES, ids=IDS)
def test_reads_into_comfy_names(built, precision, naming):
    b, path = built(precision, naming)
    with open_nunchaku(path) as ck:
        assert is_nunchaku_sdxl(ck) and ck.naming == naming
        dit = read_nunchaku_sdxl(ck)
    assert (dit.family, dit.precision) == (SDXL, precision)
    assert_matches(dit, b)
    quantized = [k for k, v in dit.state.items() if isinstance(v, SVDQuantLayer)]
    assert len(quantized) == 8 * 9        # 9 transformer blocks: q, k, v, attn1 out, attn2 q, attn2 out, ff in, ff out


def test_fused_qkv_split_exactly(built):
    """attn1's to_q, to_k, to_v are the rows of the file's to_qkv (codes, wscales, proj_up) with its smooth and
    proj_down, bit for bit."""
    b, path = built()
    with open_nunchaku(path) as ck:
        whole = ck.svdquant_layer(f"{FBLOCK}.attn1.to_qkv")
        dit = read_nunchaku_sdxl(ck)
    parts = [dit.state[f"{BLOCK}.attn1.to_{p}"] for p in "qkv"]
    assert all(tensors_equal(p, q) for p, q in zip(parts, split_rows(whole, 3)))
    n = whole.N // 3
    for i, p in enumerate(parts):
        assert torch.equal(p.codes, whole.codes[i * n:(i + 1) * n]) and torch.equal(p.smooth, whole.smooth)
        assert torch.equal(p.proj_down, whole.proj_down) and p.bias is None


def test_loader_branch(built):
    """load_checkpoint: `<ComfyUI Linear>.svdquant` -> QuantizedLinear of one part, plain tensors as read, family
    None (ComfyUI's detection decides) and no FLUX configuration."""
    fsd = checkpoint_module()
    b, path = built()
    ck = fsd.load_checkpoint(str(path))
    assert (ck.family, ck.model_config, ck.layout, ck.precision) == (None, {}, "nunchaku", "int4")
    dit = read(path)
    assert_checkpoint_holds(ck, dit.state, fsd)


def test_fp16_plain_tensors_kept(tmp_path):
    """A file whose 16-bit tensors are fp16 (nunchaku casts whatever it finds to its own dtype) reads them
    unchanged."""
    shapes = fm.sdxl_shapes(channel_mult=(1, 1), channels=128, transformer_depth=(0, 1, 0, 0))
    b = nf.Builder(shapes, plain_dtype=torch.float16, rank=16, seed=3).build()
    assert_matches(read(b.write(tmp_path / "fp16.safetensors")), b)


# ---------------------------------------------------------------------------------------------------------
# Bad files: CheckpointError naming the file and the key
# ---------------------------------------------------------------------------------------------------------

def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        read(path)
    for f in (str(path),) + fragments:
        assert f in str(info.value), (f, str(info.value))


def without(tensors: dict, prefix: str) -> dict:
    return {k: v for k, v in tensors.items() if not k.startswith(prefix)}


def test_error_missing(built, tmp_path):
    b, _ = built()
    for i, (cut, fragment) in enumerate((
            (f"{FBLOCK}.attn2.to_q.", f"{FBLOCK}.attn2.to_q.qweight is missing"),
            (f"{FBLOCK}.ff.net.2.bias", f"{FBLOCK}.ff.net.2.bias is missing"),
            (f"{FBLOCK}.attn2.to_k.weight", f"{FBLOCK}.attn2.to_k.weight is missing"),
            (f"{FBLOCK}.norm3.weight", f"{FBLOCK}.norm3.weight is missing"),
            ("mid_block.resnets.1.conv2.weight", "mid_block.resnets.1.conv2.weight is missing"),
            ("add_embedding.linear_1.weight", "add_embedding.linear_1.weight is missing"),
            ("down_blocks.0.downsamplers.0.conv.bias", "down_blocks.0.downsamplers.0.conv.bias is missing"),
            (f"{FBLOCK}.attn1.to_qkv.lora_up", f"{FBLOCK}.attn1.to_qkv.lora_up is missing"))):
        expect_error(b.write(tmp_path / f"m{i}.safetensors", without(b.tensors, cut)), fragment)


def test_error_wrong_shape(built, tmp_path):
    """A fused qkv whose rows are not 3·D (D from the attention's proj_in) cannot be split onto to_q, to_k, to_v;
    attn2's 16-bit to_k must be D rows."""
    b, _ = built()
    other = nf.Builder(SHAPES, seed=99)
    name = f"{FBLOCK}.attn1.to_qkv"
    other._svdquant(name, 2 * 256, 256, bias=False)
    path = b.write(tmp_path / "s.safetensors", {**without(b.tensors, f"{name}."), **other.tensors})
    expect_error(path, name, "is a [N, K] = [512, 256] layer, expected [768, 256]")
    key = f"{FBLOCK}.attn2.to_k.weight"
    path = b.write(tmp_path / "k.safetensors", {**b.tensors, key: torch.zeros(128, 2048, dtype=torch.bfloat16)})
    expect_error(path, key, "has 128 rows, expected 256")


def test_error_bias_where_sdxl_has_none(built, tmp_path):
    b, _ = built()
    key = f"{FBLOCK}.attn1.to_qkv.bias"
    expect_error(b.write(tmp_path / "b.safetensors", {**b.tensors, key: torch.zeros(768, dtype=torch.bfloat16)}),
                 key, "has no bias")


def test_error_unquantized_or_unknown(built, tmp_path):
    """A 16-bit to_q where nunchaku has its fused to_qkv; a tensor the mapping does not place (a fork's shifted
    conv); an adaLN W4A16 layer, which no SDXL file has."""
    b, _ = built()
    name = f"{FBLOCK}.attn1.to_qkv"
    plain = {f"{FBLOCK}.attn1.to_{p}.weight": torch.zeros(256, 256, dtype=torch.bfloat16) for p in "qkv"}
    expect_error(b.write(tmp_path / "u.safetensors", {**without(b.tensors, f"{name}."), **plain}),
                 f"{name}.qweight is missing")
    key = "down_blocks.0.resnets.0.conv1.shift"
    expect_error(b.write(tmp_path / "x.safetensors", {**b.tensors, key: torch.zeros(1, 1, 1, 1, dtype=torch.bfloat16)}),
                 "no place in ComfyUI's SDXL UNet", key)
    adaln = DiTBuilder("qwen_image", seed=5)
    adaln.w4a16("up_blocks.0.attentions.0.norm_ada", 6 * 128, 128)
    expect_error(b.write(tmp_path / "w.safetensors", {**b.tensors, **adaln.tensors}),
                 "up_blocks.0.attentions.0.norm_ada is a W4A16 layer")


def test_error_nan(built, tmp_path):
    b, _ = built()
    for i, key in enumerate((f"{FBLOCK}.ff.net.0.proj.lora_down", "conv_out.weight")):
        t = b.tensors[key].clone()
        t.view(-1)[5] = float("nan")
        expect_error(b.write(tmp_path / f"n{i}.safetensors", {**b.tensors, key: t}), key, "NaN/Inf")


def test_not_sdxl(built, tmp_path):
    """Recognised by model_class / config, else by conv_in and down_blocks' transformer layers; a file with neither
    is not SDXL, and the SDXL reader says so."""
    b, _ = built()
    md = {**b.metadata(), "model_class": "NunchakuSanaTransformer2DModel",
          "config": json.dumps({"_class_name": "SanaTransformer2DModel"})}
    path = b.write(tmp_path / "f.safetensors", without(b.tensors, "conv_in."), md)
    with open_nunchaku(path) as ck:
        assert not is_nunchaku_sdxl(ck)
    expect_error(path, "not a Nunchaku SDXL checkpoint", "NunchakuSanaTransformer2DModel")
    md = {k: v for k, v in b.metadata().items() if k not in ("model_class", "config")}
    with open_nunchaku(b.write(tmp_path / "g.safetensors", metadata=md)) as ck:
        assert is_nunchaku_sdxl(ck)
