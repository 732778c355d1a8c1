"""Bad checkpoint files, for every reader: a NaN or ±Inf in any float tensor the numerics consume, a missing
bias that FLUX.1 has, and a seeded fuzz of random mutations (header bytes, truncation, NaN, dropped keys, wrong
dtype or shape). Loading either succeeds or raises the pack's own ValueError naming the file; never another
exception. Loads go through what the nodes call: nodes/checkpoint.load_checkpoint (Nunchaku and
ComfyUI-native FLUX files) and open_t5 + every tensor and layer (the 4-bit T5)."""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import flux_models as fm
from comfy_inprocess import checkpoint_module
from nunchaku_core.models import flux
from nunchaku_core.formats.comfy_native import encode_comfy_quant
from nunchaku_core.formats import nunchaku_t5 as nt
from nunchaku_core.formats.finite import FIX
from nunchaku_core.formats.nunchaku import CheckpointError, write_nunchaku
from nunchaku_core.formats.safetensors_stream import DTYPE_NAMES
from nunchaku_core.layer import W4A16Layer



fsd = checkpoint_module()
PACK_ERRORS = (ValueError, CheckpointError, fsd.NotSVDQuantError, fsd.UnsupportedModelError)

DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
D0, S0 = "transformer_blocks.0", "single_transformer_blocks.0"
T5_CONFIG = dict(vocab_size=96, d_model=128, d_kv=32, d_ff=256, num_heads=4, num_layers=2)


def write_t5(path: Path) -> Path:
    """A random 4-bit T5 (every linear W4A16, group 128; no quantizer needed)."""
    g = torch.Generator().manual_seed(3)
    cfg = nt.normalize_config(T5_CONFIG)
    tensors = {k: (1 + 0.1 * torch.randn(s, generator=g)) if "norm" in k else torch.randn(s, generator=g)
               for k, s in nt.plain_shapes(cfg).items()}
    for name, (N, K) in nt.linear_shapes(cfg).items():
        scales = torch.rand(N, -(-K // 128), generator=g) * 0.01 + 0.001
        tensors[name] = W4A16Layer(codes=torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8),
                                   scales=scales, zeros=-7.5 * scales, group_size=128)
    nt.write_t5(str(path), cfg, tensors)
    return path


def load(kind: str, path: Path) -> None:
    """Read the file completely, as the nodes do."""
    if kind != "t5":
        fsd.load_checkpoint(str(path))
        return
    f = nt.open_t5(str(path))
    for key in f.keys:
        if key.rsplit(".", 1)[0] not in f.quantized:
            f.tensor(key)
    for name in f.quantized:
        f.layer(name)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("valid")
    out = {
        "int4": fm.write_random_nunchaku_flux(d / "int4.safetensors", hidden=128, precision="int4"),
        "nvfp4": fm.write_random_nunchaku_flux(d / "nvfp4.safetensors", hidden=128, precision="nvfp4"),
        "comfy": fm.write_random_comfy_native_flux(d / "comfy.safetensors", hidden=128),
        "t5": write_t5(d / "t5.safetensors"),
    }
    # Python key naming (FORMAT.md §2): layer and norm names as well as the field suffixes; smooth_orig kept
    svdq, w4a16, plain = fm.random_flux_layers(hidden=128)
    for _, cpp, py in flux.DOUBLE_W4A4:
        svdq[f"{D0}.{py}"] = svdq.pop(f"{D0}.{cpp}")
    for _, cpp, py in flux.DOUBLE_NORMS:
        plain[f"{D0}.{py}"] = plain.pop(f"{D0}.{cpp}")
    for _, cpp, py in flux.SINGLE_NORMS:
        plain[f"{S0}.{py}"] = plain.pop(f"{S0}.{cpp}")
    for layer in svdq.values():
        layer.smooth_orig = layer.smooth.clone()
    mc = flux.comfy_model_config(hidden_size=128, depth=1, depth_single_blocks=1, in_channels=16,
                                 context_in_dim=64, vec_in_dim=32, guidance_embed=True)
    out["python"] = write_nunchaku(d / "python.safetensors", svdquant=svdq, w4a16=w4a16, plain=plain,
                                   config=flux.diffusers_config(mc), naming="python",
                                   comfy_config={"model_class": "Flux", "model_config": mc},
                                   model_class="NunchakuFluxTransformer2dModel")
    return out


def kind_of(name: str) -> str:
    return "t5" if name == "t5" else "flux"


# ---------------------------------------------------------------------------------------------------------
# editing files
# ---------------------------------------------------------------------------------------------------------

def read_header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return 8 + n, json.loads(data[8: 8 + n])


def poke(src: Path, dst: Path, key: str, index: int, value: float) -> None:
    """Copy src to dst with element `index` (flat, as stored) of tensor `key` set to value."""
    start, header = read_header(src)
    dtype = DTYPES[header[key]["dtype"]]
    raw = torch.tensor([value]).to(dtype).view(torch.uint8)
    at = start + header[key]["data_offsets"][0] + index * raw.numel()
    data = bytearray(src.read_bytes())
    data[at: at + raw.numel()] = bytes(raw.tolist())
    dst.write_bytes(bytes(data))


def rewrite(src: Path, dst: Path, edit) -> None:
    """Copy src to dst with its tensors dict passed through edit(tensors) (small files only)."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)


def expect_error(kind: str, path: Path, *fragments: str) -> str:
    with pytest.raises(PACK_ERRORS) as info:
        load(kind, path)
    msg = str(info.value)
    assert type(info.value) in PACK_ERRORS, (type(info.value), msg)
    for f in (str(path),) + fragments:
        assert f in msg, (f, msg)
    return msg


# ---------------------------------------------------------------------------------------------------------
# NaN / ±Inf in each kind of float tensor
# ---------------------------------------------------------------------------------------------------------

NONFINITE_CASES = [
    # Nunchaku, C++ naming (FORMAT.md §2): W4A4 layers
    ("int4", f"{D0}.qkv_proj.wscales"), ("int4", f"{D0}.qkv_proj.smooth"), ("int4", f"{D0}.mlp_fc2.lora_down"),
    ("int4", f"{S0}.out_proj.lora_up"), ("int4", f"{S0}.mlp_fc2.bias"),
    ("nvfp4", f"{D0}.mlp_fc1.wtscale"), ("nvfp4", f"{D0}.mlp_fc1.wcscales"), ("nvfp4", f"{S0}.qkv_proj.smooth"),
    # W4A16 adaLN layers
    ("int4", f"{D0}.norm1.linear.wscales"), ("int4", f"{D0}.norm1_context.linear.wzeros"),
    ("int4", f"{S0}.norm.linear.bias"),
    # unquantized tensors: embedders, norms
    ("int4", "x_embedder.bias"), ("int4", "context_embedder.weight"), ("int4", f"{D0}.norm_added_q.weight"),
    ("nvfp4", "norm_out.linear.weight"),
    # Nunchaku, Python naming
    ("python", f"{D0}.attn.to_qkv.proj_down"), ("python", f"{D0}.ff.net.2.proj_up"),
    ("python", f"{D0}.attn.to_out.0.smooth_factor"),
    # ComfyUI-native svdquant_w4a4 / awq_w4a16 / plain
    ("comfy", "double_blocks.0.img_attn.qkv.weight_scale"), ("comfy", "double_blocks.0.img_mlp.2.weight_smooth_factor"),
    ("comfy", "single_blocks.0.linear1.weight_proj_down"), ("comfy", "single_blocks.0.linear2.weight_proj_up"),
    ("comfy", "double_blocks.0.txt_attn.proj.bias"), ("comfy", "double_blocks.0.img_mod.lin.weight_scale"),
    ("comfy", "single_blocks.0.modulation.lin.weight_zeros"), ("comfy", "double_blocks.0.txt_mod.lin.bias"),
    ("comfy", "img_in.weight"), ("comfy", "single_blocks.0.norm.key_norm.scale"),
    # 4-bit T5
    ("t5", "encoder.block.0.layer.0.SelfAttention.q.scales"),
    ("t5", "encoder.block.1.layer.1.DenseReluDense.wo.scaled_zeros"),
    ("t5", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("t5", "encoder.final_layer_norm.weight"), ("t5", "shared.weight"),
]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("name,key", NONFINITE_CASES)
def test_nonfinite_refused(files, tmp_path, name, key, value):
    path = tmp_path / f"bad_{name}.safetensors"
    with safe_open(str(files[name]), "pt") as f:
        shape = f.get_slice(key).get_shape()
    index = min(5, torch.Size(shape).numel() - 1)
    poke(files[name], path, key, index, value)
    msg = expect_error(kind_of(name), path, f"{path}: {key} holds 1 NaN/Inf value of", FIX)
    where = [int(i) for i in torch.unravel_index(torch.tensor(index), shape)]
    assert f"first at stored index {where}: " in msg, msg


def test_float8_nan_refused(files, tmp_path):
    """NVFP4 weight scales are float8_e4m3fn, which has NaN (bits S.1111.111) but no Inf."""
    key = f"{S0}.mlp_fc2.wscales"
    path = tmp_path / "bad_fp8.safetensors"
    start, header = read_header(files["nvfp4"])
    assert header[key]["dtype"] == "F8_E4M3"
    data = bytearray(files["nvfp4"].read_bytes())
    at = start + header[key]["data_offsets"][0]
    data[at + 3], data[at + 7] = 0x7F, 0xFF
    path.write_bytes(bytes(data))
    expect_error("flux", path, f"{key} holds 2 NaN/Inf values of", "first at stored index [0, 3]: nan", FIX)


def test_smooth_orig_is_not_checked(files, tmp_path):
    """smooth_orig is carried through files but unused at run time: a NaN there harms no image."""
    path = tmp_path / "orig.safetensors"
    poke(files["python"], path, f"{D0}.attn.to_qkv.smooth_factor_orig", 0, float("nan"))
    load("flux", path)


@pytest.mark.parametrize("name", ["int4", "nvfp4", "python", "comfy", "t5"])
def test_valid_files_load(files, name):
    load(kind_of(name), files[name])


# ---------------------------------------------------------------------------------------------------------
# a missing bias that FLUX.1 has
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,key,message", [
    ("int4", f"{D0}.qkv_proj.bias", "FLUX.1's double_blocks.0.img_attn.qkv is a Linear with a bias"),
    ("nvfp4", f"{D0}.mlp_context_fc2.bias", "FLUX.1's double_blocks.0.txt_mlp.2 is a Linear with a bias"),
    ("int4", f"{S0}.out_proj.bias", "FLUX.1's single_blocks.0.linear2 is a Linear with a bias"),
    ("int4", f"{D0}.norm1_context.linear.bias", "FLUX.1's double_blocks.0.txt_mod.lin is a Linear with a bias"),
    ("python", f"{D0}.ff_context.net.0.proj.bias", "FLUX.1's double_blocks.0.txt_mlp.0 is a Linear with a bias"),
    ("int4", "x_embedder.bias", "missing tensor 'x_embedder.bias'"),
    ("int4", "time_text_embed.guidance_embedder.linear_2.bias",
     "missing tensor 'time_text_embed.guidance_embedder.linear_2.bias'"),
    ("comfy", "double_blocks.0.img_attn.qkv.bias", "double_blocks.0.img_attn.qkv.bias is missing"),
    ("comfy", "single_blocks.0.modulation.lin.bias", "single_blocks.0.modulation.lin.bias is missing"),
    ("comfy", "final_layer.linear.bias", "final_layer.linear.bias is missing"),
    ("comfy", "guidance_in.in_layer.bias", "guidance_in.in_layer.bias is missing"),
])
def test_missing_bias_refused(files, tmp_path, name, key, message):
    path = tmp_path / f"nobias_{name}.safetensors"
    rewrite(files[name], path, lambda t: t.pop(key))
    expect_error("flux", path, message)


def test_architecture_table_matches_test_model_builder():
    """flux.bfl_shapes (what the loader checks against) equals flux_models.flux_shapes, written separately."""
    for hidden, depth, single, guidance, in_ch in ((3072, 19, 38, True, 16), (256, 2, 3, False, 96)):
        mc = flux.comfy_model_config(hidden_size=hidden, depth=depth, depth_single_blocks=single, in_channels=in_ch,
                                     context_in_dim=4096, vec_in_dim=768, guidance_embed=guidance)
        assert flux.bfl_shapes(mc) == fm.flux_shapes(hidden, depth, single, 4096, 768, guidance, in_ch)


def _set(key, fn):
    def edit(t):
        t[key] = fn(t[key]).contiguous()
    return edit


@pytest.mark.parametrize("name,edit,message", [
    ("int4", _set("proj_out.weight", lambda t: t.to(torch.int8)),
     "proj_out.weight has shape [64, 128] int8, expected [64, 128] floating point for FLUX.1 with hidden_size 128"),
    ("int4", _set(f"{S0}.norm_k.weight", lambda t: t[:-1]),
     f"{S0}.norm_k.weight has shape [127] bfloat16, expected [128] floating point"),
    ("int4", _set("norm_out.linear.bias", lambda t: t[:-1]),
     "norm_out.linear.bias has shape [255], expected [2·hidden_size"),
    ("python", _set(f"{D0}.attn.norm_q.weight", lambda t: t[:-1]),
     f"{D0}.attn.norm_q.weight has shape [127], expected [head_dim] with head_dim dividing hidden_size 128"),
    ("comfy", _set("double_blocks.0.img_mod.lin.weight_zeros", lambda t: t[:-1]),
     "double_blocks.0.img_mod.lin: weight_scale is [2, 768] and weight_zeros [1, 768], expected both [K/G, N]"),
    ("comfy", _set("single_blocks.0.linear1.weight_scale", lambda t: t[None]),
     "single_blocks.0.linear1: weight is [896, 64] and weight_scale [1, 2, 896], expected [N, K/2] and [K/64, N]"),
    ("comfy", _set("double_blocks.0.txt_attn.qkv.weight_proj_up", lambda t: t.to(torch.int32)),
     "double_blocks.0.txt_attn.qkv: weight_proj_up is torch.int32 [384, 16], expected a floating-point tensor"),
    ("comfy", lambda t: t.pop("txt_in.weight"), "txt_in.weight is missing"),
    ("comfy", lambda t: [t.pop(k) for k in list(t) if k.startswith("single_blocks.0.linear2.")],
     "single_blocks.0.linear2.weight is missing: FLUX.1 with hidden_size 128"),
])
def test_wrong_shape_dtype_or_missing_refused(files, tmp_path, name, edit, message):
    path = tmp_path / f"bad_{name}.safetensors"
    rewrite(files[name], path, edit)
    expect_error("flux", path, message)


# ---------------------------------------------------------------------------------------------------------
# ComfyUI's per-layer layout: metadata (comfy_quant / _quantization_metadata) that contradicts the tensors
# ---------------------------------------------------------------------------------------------------------

QKV, MOD = "double_blocks.0.img_attn.qkv", "double_blocks.0.img_mod.lin"   # svdquant_w4a4 [384, 128], awq [768, 128]


def _json(key: str, conf: dict):
    def edit(t, meta):
        t[key] = encode_comfy_quant(conf)
    return edit


def _shape(key, fn):
    def edit(t, meta):
        _set(key, fn)(t)
    return edit


def _listed_in_header(extra: dict):
    """The layers listed in the header's _quantization_metadata (the older form) instead of comfy_quant tensors,
    with `extra` laid over the list."""
    def edit(t, meta):
        layers = {k[: -len(".comfy_quant")]: json.loads(bytes(t.pop(k).tolist()).decode())
                  for k in list(t) if k.endswith(".comfy_quant")}
        meta["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": {**layers, **extra}})
    return edit


# edit(tensors, metadata) makes one contradiction; the error must contain every fragment (and the file's path)
@pytest.mark.parametrize("edit,fragments", [
    # the format named contradicts the tensors present
    (_json(f"{MOD}.comfy_quant", {"format": "svdquant_w4a4"}),
     (f"{MOD}.comfy_quant says svdquant_w4a4, but the layer has awq_w4a16's tensors ({MOD}.weight_zeros) and lacks "
      f"{MOD}.weight_proj_down", "the per-layer metadata contradicts the tensors")),
    (_json(f"{QKV}.comfy_quant", {"format": "awq_w4a16", "group_size": 64}),
     (f"{QKV}.comfy_quant says awq_w4a16, but the layer has svdquant_w4a4's tensors ({QKV}.weight_proj_down",
      f"and lacks {QKV}.weight_zeros")),
    (_listed_in_header({QKV: {"format": "awq_w4a16"}}),
     (f"_quantization_metadata lists {QKV} as awq_w4a16, but the layer has svdquant_w4a4's tensors",)),
    # group size against the scales
    (_json(f"{MOD}.comfy_quant", {"format": "awq_w4a16", "group_size": 32}),
     (f"{MOD}.weight_scale has shape [2, 768], expected [K/G, N] = [4, 768] for {MOD}.weight [768, 64] (N = 768, "
      f"K = 128) and group_size 32 (these scales fit group_size 64, but comfy_quant says 32",)),
    (_json(f"{QKV}.comfy_quant", {"format": "svdquant_w4a4", "group_size": 128}),
     (f"{QKV}: its per-layer metadata says svdquant_w4a4 with group_size 128, but svdquant_w4a4 (int4) has group "
      f"size 64 only",)),
    # a listed layer without tensors; tensors of a layer that is not listed
    (_json("double_blocks.0.ghost.comfy_quant", {"format": "svdquant_w4a4"}),
     ("double_blocks.0.ghost.comfy_quant says svdquant_w4a4, but the file has no tensor double_blocks.0.ghost.*",)),
    (_listed_in_header({"double_blocks.0.ghost": {"format": "awq_w4a16"}}),
     ("_quantization_metadata lists double_blocks.0.ghost as awq_w4a16, but the file has no tensor "
      "double_blocks.0.ghost.*",)),
    (lambda t, meta: t.pop(f"{QKV}.comfy_quant"),
     (f"is a tensor of a quantized layer, but the file has no {QKV}.comfy_quant",)),
    # weight_scale against weight; the low-rank factors and smoothing against N, K and R
    (_shape(f"{QKV}.weight_scale", lambda t: t[:, :-1]),
     (f"{QKV}.weight_scale has shape [2, 383], expected [K/64, N] = [2, 384] for {QKV}.weight [384, 64]",)),
    (_shape(f"{QKV}.weight_scale", lambda t: torch.cat([t, t])),
     (f"{QKV}.weight_scale has shape [4, 384], expected [K/64, N] = [2, 384]",)),
    (_shape(f"{MOD}.weight_zeros", lambda t: t[:, :-1]),
     (f"{MOD}: weight_scale is [2, 768] and weight_zeros [2, 767], expected both [K/G, N]",)),
    (_shape(f"{QKV}.weight", lambda t: t[:, :-1]),
     (f"{QKV}.weight has shape [384, 63]: K = 126 input features is not a multiple of svdquant_w4a4's group size",)),
    (_shape(f"{QKV}.weight_proj_down", lambda t: t[:-1]),
     (f"{QKV}.weight_proj_down has shape [127, 16], expected [K, R] = [128, R]",)),
    (_shape(f"{QKV}.weight_proj_up", lambda t: t[:-1]),
     (f"{QKV}.weight_proj_up has shape [383, 16], expected [N, R] = [384, 16]",)),
    (_shape(f"{QKV}.weight_proj_up", lambda t: t[:, :-1]),
     (f"{QKV}.weight_proj_up has shape [384, 15], expected [N, R] = [384, 16]", "R from weight_proj_down")),
    (_shape(f"{QKV}.weight_smooth_factor", lambda t: t[:-1]),
     (f"{QKV}.weight_smooth_factor has shape [127], expected [K] = [128]",)),
], ids=["svdquant-says-awq-tensors", "awq-says-svdquant-tensors", "header-awq-for-svdquant", "awq-group-size",
        "svdquant-group-size", "listed-no-tensors", "header-listed-no-tensors", "tensors-not-listed",
        "scale-N", "scale-K", "awq-zeros-N", "weight-K", "proj-down-K", "proj-up-N", "proj-up-R", "smooth-K"])
def test_comfy_layer_metadata_contradicting_tensors_refused(files, tmp_path, edit, fragments):
    """Each a ValueError naming the file and the key, before any layer is built (nodes/checkpoint.py reads
    every layer through nunchaku_core.formats.comfy_native as 'SVDQuant Model Loader' does, whatever the family)."""
    path = tmp_path / "contradicts.safetensors"
    with safe_open(str(files["comfy"]), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    expect_error("flux", path, *fragments)


# ---------------------------------------------------------------------------------------------------------
# fuzz: random mutations of valid files
# ---------------------------------------------------------------------------------------------------------

MUTATIONS = ("header_bytes", "truncate", "nan", "drop_key", "dtype", "shape", "data_bytes")
FUZZ_FILES = ("int4", "nvfp4", "comfy", "t5")
FUZZ_RUNS = 144
# Keys a file may lack: NVFP4's per-tensor and per-channel scales (a missing one means 1, FORMAT.md §1) and
# smooth_orig (unused at run time).
OPTIONAL = (".wtscale", ".wcscales", ".smooth_orig")


def mutate(src: Path, dst: Path, rng: random.Random) -> tuple[str, str]:
    """One random mutation of src written to dst; returns (mutation, detail)."""
    data = src.read_bytes()
    start, header = read_header(src)
    keys = sorted(k for k in header if k != "__metadata__")
    what = MUTATIONS[rng.randrange(len(MUTATIONS))]
    if what == "header_bytes":
        out = bytearray(data)
        spots = [rng.randrange(start) for _ in range(rng.randint(1, 4))]
        for i in spots:
            out[i] = rng.randrange(256)
        dst.write_bytes(bytes(out))
        return what, str(spots)
    if what == "truncate":
        n = rng.randrange(len(data))
        dst.write_bytes(data[:n])
        return what, str(n)
    if what == "data_bytes":
        out = bytearray(data)
        spots = [rng.randrange(start, len(data)) for _ in range(rng.randint(1, 16))]
        for i in spots:
            out[i] = rng.randrange(256)
        dst.write_bytes(bytes(out))
        return what, str(spots)
    key = keys[rng.randrange(len(keys))]
    if what == "nan":
        floats = [k for k in keys if header[k]["dtype"] in ("BF16", "F16", "F32")]
        key = floats[rng.randrange(len(floats))]
        start_byte, end_byte = header[key]["data_offsets"]
        n = (end_byte - start_byte) // DTYPES[header[key]["dtype"]].itemsize
        poke(src, dst, key, rng.randrange(n), rng.choice([float("nan"), float("inf"), float("-inf")]))
        return what, key
    if what == "drop_key":
        rewrite(src, dst, lambda t: t.pop(key))
        return what, key
    if what == "dtype":
        to = rng.choice([torch.float32, torch.float16, torch.int8, torch.int32, torch.uint8])

        def edit(t):
            t[key] = t[key].to(to)
        rewrite(src, dst, edit)
        return what, f"{key} -> {to}"

    def reshape(t):   # "shape": never a no-op
        x = t[key]
        choice = rng.randrange(4 if x.dim() > 1 else 3)
        if choice == 0:
            t[key] = x.unsqueeze(0)
        elif choice == 1 and x.dim() and x.shape[0] > 1:
            t[key] = x[:-1].contiguous()
        elif choice == 3:
            t[key] = x.reshape(-1)
        else:
            t[key] = torch.cat([x, x[:1]]) if x.dim() else x.reshape(1, 1)
    rewrite(src, dst, reshape)
    return what, key


def test_fuzz(files, tmp_path):
    rng = random.Random(20261122)
    outcomes = {}
    for run in range(FUZZ_RUNS):
        name = FUZZ_FILES[run % len(FUZZ_FILES)]
        path = tmp_path / f"fuzz{run}_{name}.safetensors"
        what, detail = mutate(files[name], path, rng)
        try:
            load(kind_of(name), path)
            result = "loaded"
        except Exception as e:   # noqa: BLE001 - the point of the test: which exception, and its message
            assert type(e) in PACK_ERRORS, f"run {run} {name} {what} {detail}: {type(e).__name__}: {e}"
            assert str(path) in str(e), f"run {run} {name} {what} {detail}: message without the path: {e}"
            result = "refused"
        if what == "nan" and not detail.endswith(".smooth_orig"):
            assert result == "refused", f"run {run} {name}: NaN/Inf in {detail} loaded"
        if what == "drop_key" and not detail.endswith(OPTIONAL):
            assert result == "refused", f"run {run} {name}: a file without {detail} loaded"
        outcomes[what, result] = outcomes.get((what, result), 0) + 1
        path.unlink()
    assert {what for what, _ in outcomes} == set(MUTATIONS), outcomes        # every kind of mutation was tried
