"""Nunchaku's Qwen-Image and Z-Image files (nunchaku_core/formats/nunchaku_dit.py): files built with Nunchaku's
naming and packing, element by element (tests/nunchaku_dit_files.py), read into ComfyUI's own names with every
quantized layer's effective weight and bias equal to the expectation computed independently in float64; the
loader's branch (nodes/checkpoint.load_checkpoint); ComfyUI's own models, in the ComfyUI these tests run
with, have exactly these keys and shapes; bad files fail naming the file and the key.

Tolerance (as tests/test_original_tooling.py): reference.effective_weight forms main = out_scale·(code·scale)/s,
where code·scale is exact in fp32 (a 4-bit integer or e2m1 value times a bf16 or e4m3 scale), /s and ·out_scale
round once each (out_scale = wtscale·wcscales, a product of two bf16 values, is exact), then adds U·Dᵀ (R exact
products, R − 1 roundings) with one more rounding: ≤ (R + 3)·u·(|main| + |U|·|D|ᵀ) elementwise, u = 2^-24.
Biases are exact copies, except that σ-shifted layers add σ·Σ_k main, a K-term fp32 sum:
≤ (K + 2)·u·(|b| + σ·Σ_k |main|). W4A16: q·scale is exact, + zero rounds once: ≤ u·|w|; the original bias
(stored − 1 on the scale chunks, in fp32) is exact.
"""
from __future__ import annotations

import json

import pytest
import torch

from comfy_inprocess import checkpoint_module
from nunchaku_core import reference
from nunchaku_core.formats.nunchaku import CheckpointError, open_nunchaku
from nunchaku_core.formats.nunchaku_dit import QWEN_IMAGE, ZIMAGE, family_of, read_nunchaku_dit, split_rows
from nunchaku_core.layer import SVDQuantLayer, W4A16Layer, tensors_equal
from kernel_bounds import w4a4_bound
from nunchaku_dit_files import SIGMA, Builder, assert_checkpoint_holds

U = 2.0 ** -24
CASES = [(QWEN_IMAGE, "int4", False), (QWEN_IMAGE, "nvfp4", False), (ZIMAGE, "int4", False),
         (ZIMAGE, "nvfp4", False), (ZIMAGE, "int4", True)]
IDS = [f"{f}-{p}{'-skip_refiners' if s else ''}" for f, p, s in CASES]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(Builder, file) per case, built once: the oracle packs element by element (1-4 s a file)."""
    cache = {}

    def get(family, precision, skip):
        key = (family, precision, skip)
        if key not in cache:
            b = Builder(family, precision, rank=16, seed=len(cache) + 1, skip_refiners=skip).build()
            cache[key] = (b, b.write(tmp_path_factory.mktemp("dit") / f"{family}-{precision}.safetensors"))
        return cache[key]
    return get


def read(path):
    with open_nunchaku(path) as ck:
        return read_nunchaku_dit(ck)


def assert_matches(state: dict, b: Builder) -> None:
    assert set(state) == set(b.expected), sorted(set(state) ^ set(b.expected))
    for key, e in b.expected.items():
        got = state[key]
        if e.kind == "plain":
            assert isinstance(got, torch.Tensor) and got.dtype == e.weight.dtype, key
            assert torch.equal(got.view(torch.int16), e.weight.view(torch.int16)), key
            continue
        if e.kind == "w4a16":
            assert isinstance(got, W4A16Layer), key
            w = reference.dequantize_w4a16(got).double()
            assert w.shape == e.weight.shape and ((w - e.weight).abs() <= U * e.weight.abs()).all(), key
            assert torch.equal(got.bias.double(), e.bias), key
            continue
        assert isinstance(got, SVDQuantLayer) and got.precision == b.precision, key
        assert got.shifted == e.shifted, key
        w = reference.effective_weight(got).double()
        assert w.shape == e.weight.shape, (key, w.shape, e.weight.shape)
        err, tol = (w - e.weight).abs(), (b.R + 3) * U * e.mag
        assert (err <= tol).all(), f"{key}: max err {err.max():.3g}, {int((err > tol).sum())} elements off"
        if e.bias is None:
            assert got.bias is None, key
            continue
        bias = reference.effective_bias(got).double()
        tol = (got.K + 2) * U * (e.bias.abs() + SIGMA * e.mag.sum(1)) if e.shifted else 0
        assert ((bias - e.bias).abs() <= tol).all(), key


@pytest.mark.parametrize("family,precision,skip", CASES, ids=IDS)
def test_reads_into_comfy_names(built, family, precision, skip):
    b, path = built(family, precision, skip)
    with open_nunchaku(path) as ck:
        assert family_of(ck) == family
        dit = read_nunchaku_dit(ck)
    assert (dit.family, dit.precision, dit.skip_refiners) == (family, precision, skip)
    assert_matches(dit.state, b)
    shifted = {k for k, v in dit.state.items() if isinstance(v, SVDQuantLayer) and v.shifted}
    if family == QWEN_IMAGE and precision == "int4":      # nunchaku's NunchakuFeedForward: net[2] is unsigned
        assert shifted == {"transformer_blocks.0.img_mlp.net.2", "transformer_blocks.0.txt_mlp.net.2"}
    else:                                                  # Z-Image's w2 follows a SiLU gate; NVFP4 never shifts
        assert not shifted


def test_fused_layers_split_exactly(built):
    """Each part of a split layer is the fused layer's rows (codes, wscales, proj_up, bias, wcscales) with the fused
    layer's smooth and proj_down, bit for bit, for Qwen-Image's to_qkv / add_qkv_proj and Z-Image's w3 | w1."""
    for family, precision, comfy_parts, fused in (
            (QWEN_IMAGE, "nvfp4", ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_qkv"),
            (QWEN_IMAGE, "int4", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "attn.add_qkv_proj"),
            (ZIMAGE, "int4", ("feed_forward.w3", "feed_forward.w1"), "feed_forward.net.0.proj")):
        b, path = built(family, precision, False)
        block = "transformer_blocks.0" if family == QWEN_IMAGE else "layers.0"
        with open_nunchaku(path) as ck:
            whole = ck.svdquant_layer(f"{block}.{fused}")
            dit = read_nunchaku_dit(ck)
        parts = [dit.state[f"{block}.{p}"] for p in comfy_parts]
        assert all(tensors_equal(p, q) for p, q in zip(parts, split_rows(whole, len(parts))))
        n = whole.N // len(parts)
        for i, p in enumerate(parts):
            rows = slice(i * n, (i + 1) * n)
            assert torch.equal(p.codes, whole.codes[rows]) and torch.equal(p.proj_up, whole.proj_up[rows])
            assert torch.equal(p.smooth, whole.smooth) and torch.equal(p.proj_down, whole.proj_down)
            # the same activation codes and low-rank input for every part: the same math per output row, so the
            # part's output is the fused one's rows up to fp32 summation order (kernel_bounds.w4a4_bound)
            x = torch.randn(3, whole.K, generator=torch.Generator().manual_seed(i))
            codes, scales = reference.quantize_act(x, p)
            y = reference.svdquant_linear(x, p)
            err = (y.double() - reference.svdquant_linear(x, whole)[:, rows].double()).abs()
            assert (err <= w4a4_bound(p, x, codes, scales, y, torch.float32)).all()


@pytest.mark.parametrize("family,precision,skip", [CASES[0], CASES[4]], ids=[IDS[0], IDS[4]])
def test_loader_branch(built, family, precision, skip):
    """load_checkpoint: `<ComfyUI Linear>.svdquant` -> QuantizedLinear of one part, plain tensors as read,
    family None (ComfyUI's detection decides) and no FLUX configuration."""
    fsd = checkpoint_module()
    b, path = built(family, precision, skip)
    ck = fsd.load_checkpoint(str(path))
    assert (ck.family, ck.model_config, ck.layout, ck.precision) == (None, {}, "nunchaku", precision)
    dit = read(path)
    assert_checkpoint_holds(ck, dit.state, fsd)


def test_comfy_models_have_these_keys_and_shapes(built):
    """ComfyUI's own QwenImageTransformer2DModel and NextDiT (Z-Image modulation), built on the meta device at the
    test files' sizes, have exactly the dense keys and shapes of what the loader hands ComfyUI, and ComfyUI's
    detection recognises the family from them. Exceptions, both from ComfyUI's model rather than the files:
    0.3.75's NextDiT has a `norm_final.weight` its forward never uses (absent from every Z-Image file), and at a
    test width below 1024 ComfyUI's Z-Image t_embedder is min(dim, 1024) wide inside where diffusers' is 1024
    (the real dim, 3840, has both at 1024)."""
    from comfy_inprocess import import_pack, pack_module
    import_pack()
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    fsd, comfy_api = pack_module("checkpoint"), pack_module("comfy_api")
    ops = comfy.ops.disable_weight_init
    for family, skip in ((QWEN_IMAGE, False), (ZIMAGE, False), (ZIMAGE, True)):
        b, path = built(family, "int4", skip)
        ck = fsd.load_checkpoint(str(path))
        dense = comfy_api.dense_shapes(ck.state_dict, fsd.QUANT_KEY)
        got = {k: tuple(v.shape) for k, v in dense.items()}
        if family == QWEN_IMAGE:
            model = QwenImageTransformer2DModel(num_layers=1, attention_head_dim=128, num_attention_heads=1,
                                                joint_attention_dim=64, in_channels=64, out_channels=16,
                                                device="meta", operations=ops)
        else:
            model = NextDiT(patch_size=2, in_channels=16, dim=b.D, n_layers=1, n_refiner_layers=2, n_heads=1,
                            n_kv_heads=1, multiple_of=128, ffn_dim_multiplier=b.F / b.D, qk_norm=True,
                            cap_feat_dim=64, axes_dims=[32, 48, 48], z_image_modulation=True, pad_tokens_multiple=32,
                            device="meta", operations=ops)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "norm_final.weight"}
        assert set(got) == set(want), sorted(set(got) ^ set(want))
        off = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        assert all(k.startswith("t_embedder.") for k in off), off
        detected = comfy.model_detection.detect_unet_config(dense, "")
        assert detected["image_model"] == ("qwen_image" if family == QWEN_IMAGE else "lumina2"), detected


# ---------------------------------------------------------------------------------------------------------
# Bad files: CheckpointError naming the file and the key
# ---------------------------------------------------------------------------------------------------------

def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        read(path)
    for f in (str(path),) + fragments:
        assert f in str(info.value), (f, str(info.value))


def test_error_missing_layer_and_tensors(built, tmp_path):
    b, _ = built(QWEN_IMAGE, "int4", False)
    cut = {k: v for k, v in b.tensors.items() if not k.startswith("transformer_blocks.0.attn.to_add_out.")}
    expect_error(b.write(tmp_path / "a.safetensors", cut), "transformer_blocks.0.attn.to_add_out.qweight is missing")
    cut = {k: v for k, v in b.tensors.items() if k != "transformer_blocks.0.attn.to_out.0.bias"}
    expect_error(b.write(tmp_path / "b.safetensors", cut), "transformer_blocks.0.attn.to_out.0.bias is missing")
    cut = {k: v for k, v in b.tensors.items() if k != "txt_norm.weight"}
    expect_error(b.write(tmp_path / "c.safetensors", cut), "txt_norm.weight is missing")
    cut = {k: v for k, v in b.tensors.items() if k != "transformer_blocks.0.attn.to_qkv.proj_up"}
    expect_error(b.write(tmp_path / "d.safetensors", cut), "transformer_blocks.0.attn.to_qkv.proj_up is missing")
    z, _ = built(ZIMAGE, "int4", True)
    cut = {k: v for k, v in z.tensors.items() if k != "noise_refiner.1.attention.to_k.weight"}
    with pytest.raises(CheckpointError, match="noise_refiner.1.attention.to_k.weight is missing"):
        read(z.write(tmp_path / "e.safetensors", cut))


def test_error_wrong_shape(built, tmp_path):
    """A fused qkv whose rows are not 3·hidden (hidden from img_in) cannot be split onto ComfyUI's q, k, v."""
    b, _ = built(QWEN_IMAGE, "int4", False)
    other = Builder(QWEN_IMAGE, "int4", rank=16, seed=99)
    name = "transformer_blocks.0.attn.to_qkv"
    other.svdquant(name, 2 * b.D, b.D, bias=True)
    path = b.write(tmp_path / "s.safetensors", {**b.tensors, **other.tensors})
    expect_error(path, name, f"is a [N, K] = [{2 * b.D}, {b.D}] layer, expected [{3 * b.D}, {b.D}]")


@pytest.mark.parametrize("key", ["transformer_blocks.0.attn.norm_k.weight", "transformer_blocks.0.img_mod.1.wzeros",
                                 "transformer_blocks.0.img_mlp.net.2.proj_up", "proj_out.bias"])
def test_error_nan(built, tmp_path, key):
    b, _ = built(QWEN_IMAGE, "int4", False)
    t = b.tensors[key].clone()
    t.view(-1)[3] = float("nan")
    expect_error(b.write(tmp_path / "n.safetensors", {**b.tensors, key: t}), key, "NaN/Inf")


def test_error_unknown_layer_and_naming(built, tmp_path):
    b, _ = built(QWEN_IMAGE, "int4", False)
    extra = {k.replace("attn.to_out.0.", "attn.extra."): v.clone() for k, v in b.tensors.items()
             if ".attn.to_out.0." in k}
    expect_error(b.write(tmp_path / "u.safetensors", {**b.tensors, **extra}), "no place in ComfyUI's Qwen-Image",
                 "transformer_blocks.0.attn.extra")
    cpp = {k.replace(".proj_down", ".lora_down").replace(".proj_up", ".lora_up")
            .replace(".smooth_factor_orig", ".smooth_orig").replace(".smooth_factor", ".smooth"): v
           for k, v in b.tensors.items()}
    expect_error(b.write(tmp_path / "c.safetensors", cpp), "C++ key naming")


def test_error_skip_refiners_disagrees(built, tmp_path):
    b, _ = built(ZIMAGE, "int4", False)
    md = b.metadata()
    qc = json.loads(md["quantization_config"])
    qc["skip_refiners"] = True
    path = b.write(tmp_path / "k.safetensors", metadata={**md, "quantization_config": json.dumps(qc)})
    expect_error(path, "skip_refiners = True but the refiner blocks are quantized")


def test_error_not_these_families(built, tmp_path):
    b, _ = built(QWEN_IMAGE, "int4", False)
    md = {**b.metadata(), "model_class": "NunchakuSanaTransformer2DModel",
          "config": json.dumps({"_class_name": "SanaTransformer2DModel"})}
    tensors = {k: v for k, v in b.tensors.items() if k != "txt_norm.weight"}
    path = b.write(tmp_path / "f.safetensors", tensors, md)
    with open_nunchaku(path) as ck:
        assert family_of(ck) is None
    expect_error(path, "not a Nunchaku Qwen-Image or Z-Image checkpoint", "NunchakuSanaTransformer2DModel")
