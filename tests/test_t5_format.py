"""formats/nunchaku_t5.py: the 4-bit T5 layout against the per-element oracle, bit-exact write/read round
trips (quantized and plain linears), and an error naming the file, the key, what was found and what was
expected for each bad input: a DiT checkpoint, a CLIP file, a plain T5 without config, a truncated file, and
configs that do not match the weights."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nunchaku_core.formats import nunchaku_t5 as nt
from nunchaku_core.layer import W4A16Layer, tensors_equal
from nunchaku_core.quantize.svdquant import quantize_w4a16

import nunchaku_oracle as oracle

# Tiny T5: every K (128, 256) is a whole number of 128-groups; N a multiple of 4.
TINY = dict(vocab_size=96, d_model=128, d_kv=32, d_ff=256, num_heads=4, num_layers=2)


def random_t5(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 weights of a random T5 encoder, file key -> tensor (linears as `<name>.weight`).
    Linears use T5's own initialisation (std K^-1/2, and q's additionally d_kv^-1/2: T5 folds the attention
    temperature into q), so attention is not saturated. Layer norm weights are log-normal, so some input
    channels are salient as in trained T5s."""
    cfg = nt.normalize_config(cfg)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in nt.plain_shapes(cfg).items():
        sd[k] = torch.randn(s, generator=g).mul(0.7).exp() if "norm" in k else torch.randn(s, generator=g)
    for n, (N, K) in nt.linear_shapes(cfg).items():
        std = K ** -0.5 * (cfg["d_kv"] ** -0.5 if n.endswith(".q") else 1.0)
        sd[f"{n}.weight"] = torch.randn(N, K, generator=g) * std
    return sd


def quantized_tensors(sd: dict, cfg: dict, quantize=lambda name: True) -> dict:
    """write_t5 input: linears quantized (W4A16Layer, group 128) where quantize(name), else weights."""
    out = {k: v for k, v in sd.items() if not k.endswith(".weight") or "norm" in k or "relative" in k
           or k == "shared.weight"}
    for n in nt.linear_shapes(nt.normalize_config(cfg)):
        w = sd[f"{n}.weight"]
        out[n] = quantize_w4a16(w, None, group_size=128) if quantize(n) else w
    return out


@pytest.fixture
def tiny_file(tmp_path):
    sd = random_t5(TINY)
    tensors = quantized_tensors(sd, TINY)
    path = str(tmp_path / "t5_int4.safetensors")
    nt.write_t5(path, TINY, tensors)
    return path, tensors


def rewrite(src: str, dst: str, tensors=None, metadata=None):
    """Copy a file with some tensors / metadata replaced (small files only)."""
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata() or {})
    sd = load_file(src)
    sd.update(tensors or {})
    meta.update(metadata or {})
    save_file({k: v for k, v in sd.items() if v is not None}, dst, metadata=meta)
    return dst


# ---------------------------------------------------------------------------------------------- layout

@pytest.mark.parametrize("N,K", [(8, 128), (4, 192), (12, 384)])
def test_pack_matches_oracle_and_round_trips(N, K):
    """qweight equals the per-element closed form of FORMAT.md §4; scales/zeros are [Gp, N] with Gp the
    group count padded to 8 by zero rows; unpack(pack(x)) == x bit for bit, also for a short last group."""
    g = torch.Generator().manual_seed(N * K)
    layer = W4A16Layer(codes=torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8),
                       scales=torch.rand(N, -(-K // 128), generator=g).to(torch.bfloat16),
                       zeros=torch.randn(N, -(-K // 128), generator=g).to(torch.bfloat16), group_size=128)
    packed = nt.pack_t5_linear(layer, torch.bfloat16)
    assert torch.equal(packed["qweight"], oracle.awq_int16(layer.codes))
    G = layer.scales.shape[1]
    assert packed["scales"].shape == (8, N) and packed["scaled_zeros"].shape == (8, N)
    assert torch.equal(packed["scales"][:G], layer.scales.T) and not packed["scales"][G:].any()
    assert torch.equal(packed["scaled_zeros"][:G], layer.zeros.T) and not packed["scaled_zeros"][G:].any()
    assert tensors_equal(nt.unpack_t5_linear(packed, K), layer)


def test_file_round_trip(tiny_file):
    path, tensors = tiny_file
    f = nt.open_t5(path)
    assert f.config == nt.normalize_config(TINY)
    assert f.dtype == torch.bfloat16 and f.plain_linears == []
    assert f.quantized == list(nt.linear_shapes(f.config))
    for name in f.quantized:
        assert tensors_equal(f.layer(name), tensors[name])
    for key in nt.plain_shapes(f.config):
        assert torch.equal(f.tensor(key), tensors[key].to(torch.bfloat16))
    meta = f.metadata
    assert json.loads(meta["quantization_config"])["weight"]["group_size"] == 128
    assert json.loads(meta["config"])["feed_forward_proj"] == "gated-gelu"
    with safe_open(path, "pt") as h:                                     # the stored form itself
        q = h.get_slice("encoder.block.1.layer.1.DenseReluDense.wo.qweight")
        assert (q.get_dtype(), q.get_shape()) == ("I16", [32, 256])
        assert h.get_slice("encoder.block.0.layer.0.SelfAttention.q.scales").get_shape() == [8, 128]


def test_plain_linears_and_hf_config_names(tmp_path):
    """Linears without .qweight stay 16-bit; an HF-style config (feed_forward_proj, no dense_act_fn) and a
    ReLU T5 without a gate are understood."""
    cfg = dict(TINY, feed_forward_proj="relu")
    sd = random_t5(cfg)
    tensors = quantized_tensors(sd, cfg, quantize=lambda n: ".SelfAttention." in n)
    path = str(tmp_path / "mixed.safetensors")
    nt.write_t5(path, cfg, tensors, dtype=torch.float16)
    f = nt.open_t5(path)
    assert f.config["dense_act_fn"] == "relu" and not f.config["is_gated_act"]
    assert f.dtype == torch.float16
    assert all(".DenseReluDense." in n for n in f.plain_linears) and len(f.plain_linears) == 4
    assert torch.equal(f.tensor("encoder.block.1.layer.1.DenseReluDense.wi.weight"),
                       sd["encoder.block.1.layer.1.DenseReluDense.wi.weight"].half())


# ---------------------------------------------------------------------------------------------- errors

def test_dit_checkpoint_is_rejected(tmp_path):
    path = str(tmp_path / "svdq-int4-flux.1-dev.safetensors")
    save_file({"transformer_blocks.0.qkv_proj.qweight": torch.zeros(128, 64, dtype=torch.int8)}, path,
              metadata={"config": json.dumps({"_class_name": "FluxTransformer2DModel", "num_layers": 1}),
                        "comfy_config": "{}", "model_class": "NunchakuFluxTransformer2dModel"})
    with pytest.raises(ValueError, match=r"svdq-int4-flux.1-dev.safetensors: this is a FLUX diffusion-model "
                                         r"\(DiT\) checkpoint.*SVDQuant Flux Loader"):
        nt.open_t5(path)


def test_clip_and_plain_t5_are_rejected(tmp_path):
    clip = str(tmp_path / "clip_l.safetensors")
    save_file({"text_model.final_layer_norm.weight": torch.ones(8)}, clip)
    with pytest.raises(ValueError, match="clip_l.safetensors: this is a CLIP text encoder"):
        nt.open_t5(clip)
    plain = str(tmp_path / "t5xxl_fp16.safetensors")
    save_file({k: v.half() for k, v in random_t5(TINY).items()}, plain)
    with pytest.raises(ValueError, match="t5xxl_fp16.safetensors: this T5 file has no 'config' metadata.*quantize-t5"):
        nt.open_t5(plain)


def test_truncated_file(tiny_file, tmp_path):
    path, _ = tiny_file
    data = open(path, "rb").read()
    for n, cut in (("short", len(data) - 1000), ("header", 50)):
        bad = tmp_path / f"{n}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"{n}.safetensors: not a readable .safetensors file.*truncated"):
            nt.open_t5(str(bad))


@pytest.mark.parametrize("change,message", [
    ({"d_ff": 512}, r"encoder.block.0.layer.1.DenseReluDense.wi_0.qweight has shape \[64, 128\], expected "
                    r"int16 \[N/4, K\] for N=512, K=128: \[128, 128\] \(from the file's T5 config: .*d_ff=512"),
    ({"num_layers": 1}, r"unexpected tensors \['encoder.block.1.*the file has 2 blocks but config num_layers = 1"),
    ({"num_layers": 3}, r"missing tensor encoder.block.2.layer.0.layer_norm.weight"),
    ({"vocab_size": 32128}, r"shared.weight has shape \[96, 128\], expected a 16-bit tensor \[32128, 128\]"),
    ({"num_heads": 2, "d_kv": 64}, r"relative_attention_bias.weight has shape \[32, 4\], expected .* \[32, 2\]"),
    ({"dense_act_fn": "silu"}, r"dense_act_fn 'silu' is not supported"),
])
def test_config_mismatch(tiny_file, tmp_path, change, message):
    path, _ = tiny_file
    cfg = nt.hf_config(dict(nt.normalize_config(TINY), **change))
    bad = rewrite(path, str(tmp_path / "bad.safetensors"), metadata={"config": json.dumps(cfg)})
    with pytest.raises(ValueError, match="bad.safetensors: .*" + message):
        nt.open_t5(bad)


def test_wrong_dtype_and_short_scales(tiny_file, tmp_path):
    path, _ = tiny_file
    name = "encoder.block.0.layer.0.SelfAttention.k"
    bad = rewrite(path, str(tmp_path / "dtype.safetensors"),
                  {f"{name}.qweight": torch.zeros(32, 128, dtype=torch.int32)})
    with pytest.raises(ValueError, match=f"dtype.safetensors: {name}.qweight has dtype torch.int32, expected int16"):
        nt.open_t5(bad)
    bad = rewrite(path, str(tmp_path / "rows.safetensors"),
                  {f"{name}.scales": torch.zeros(0, 128, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match=rf"rows.safetensors: {name}.scales has shape \[0, 128\], "
                                         rf"expected at least \[1, 128\]"):
        nt.open_t5(bad)


def test_writer_refuses_incomplete_input(tmp_path):
    tensors = quantized_tensors(random_t5(TINY), TINY)
    del tensors["encoder.final_layer_norm.weight"]
    with pytest.raises(ValueError, match=r"write_t5 is missing \['encoder.final_layer_norm.weight'\]"):
        nt.write_t5(str(tmp_path / "x.safetensors"), TINY, tensors)
    assert not list(tmp_path.iterdir())                                  # no partial output left behind
