"""formats/nunchaku.py: reading oracle-built files, bit-exact write/read round trips (single file, legacy
folder, both namings, INT4 and NVFP4), awkward legal shapes, and a CheckpointError naming the file and the
key for every bad input."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from nunchaku_core import reference as ref
from nunchaku_core.formats.nunchaku import CheckpointError, open_nunchaku, write_nunchaku
from nunchaku_core.layer import SVDQuantLayer, W4A16Layer, tensors_equal

import nunchaku_oracle as oracle

CONFIG = {"_class_name": "FluxTransformer2DModel", "num_layers": 1, "num_single_layers": 1}
COMFY = {"model_class": "Flux", "model_config": {"hidden_size": 128}}
MODEL_CLASS = "NunchakuFluxTransformer2dModel"

# (cpp name, python name, N, K) of a tiny FLUX-like model with D = 128, plus two out-of-order blocks for the
# natural sort. mlp_fc2 / ff.net.2 are the shifted layers.
SVDQ_NAMES = [
    ("transformer_blocks.0.qkv_proj", "transformer_blocks.0.attn.to_qkv", 384, 128),
    ("transformer_blocks.0.mlp_fc2", "transformer_blocks.0.ff.net.2", 128, 256),
    ("transformer_blocks.10.out_proj", "transformer_blocks.10.attn.to_out.0", 128, 128),
    ("transformer_blocks.2.out_proj", "transformer_blocks.2.attn.to_out.0", 128, 128),
    ("single_transformer_blocks.0.mlp_fc2", "single_transformer_blocks.0.mlp_fc2", 128, 256),
]
W4A16_NAMES = [("transformer_blocks.0.norm1.linear", 6), ("single_transformer_blocks.0.norm.linear", 3)]


def bits(t):
    return t.contiguous().view(torch.uint8)


def rand_bf16(shape, gen):
    return torch.randn(shape, generator=gen).to(torch.bfloat16)


def rand_fp8(shape, gen):
    return (torch.rand(shape, generator=gen) * 4 + 0.25).to(torch.float8_e4m3fn)


def make_svdq(precision, N, K, R, gen, shifted=False, optional=True):
    G = 64 if precision == "int4" else 16
    lo, hi = (-8, 8) if precision == "int4" else (0, 16)
    nv = precision == "nvfp4"
    return SVDQuantLayer(
        precision=precision,
        codes=torch.randint(lo, hi, (N, K), dtype=torch.int8, generator=gen),
        wscales=rand_bf16((N, K // G), gen).abs() if not nv else rand_fp8((N, K // G), gen),
        smooth=rand_bf16((K,), gen).abs() + 0.5,
        proj_down=rand_bf16((K, R), gen), proj_up=rand_bf16((N, R), gen),
        bias=rand_bf16((N,), gen) if optional else None,
        wtscale=torch.tensor([0.75], dtype=torch.bfloat16) if nv and optional else None,
        wcscales=rand_bf16((N,), gen) if nv and optional else None,
        shifted=shifted and precision == "int4",
        smooth_orig=rand_bf16((K,), gen) if optional else None)


def make_w4a16(N, K, gen):
    # bias on a 1/64 grid in [-1, 1): bias + 1 (the folded scale chunks) is exact in bf16
    G = -(-K // 64)
    return W4A16Layer(codes=torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen),
                      scales=rand_bf16((N, G), gen), zeros=rand_bf16((N, G), gen),
                      bias=torch.randint(-64, 64, (N,), generator=gen).float() / 64)


def make_model(precision, naming="cpp", R=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    svdq = {}
    for cpp, py, N, K in SVDQ_NAMES:
        name = cpp if naming == "cpp" else py
        svdq[name] = make_svdq(precision, N, K, R, gen, shifted=name.endswith(("mlp_fc2", "ff.net.2")))
    w4a16 = {name: make_w4a16(S * 128, 128, gen) for name, S in W4A16_NAMES}
    plain = {"x_embedder.weight": rand_bf16((128, 64), gen), "x_embedder.bias": rand_bf16((128,), gen),
             "transformer_blocks.0.norm_q.weight": rand_bf16((16,), gen),
             "proj_out.weight": rand_bf16((64, 128), gen)}
    return svdq, w4a16, plain


def write_model(path, model, naming="cpp", legacy=False):
    svdq, w4a16, plain = model
    return write_nunchaku(path, svdquant=svdq, w4a16=w4a16, plain=plain, config=CONFIG, comfy_config=COMFY,
                          model_class=MODEL_CLASS, naming=naming, legacy_folder=legacy)


def assert_model_equal(ck, model):
    svdq, w4a16, plain = model
    assert set(ck.svdquant_layer_names()) == set(svdq)
    assert set(ck.w4a16_layer_names()) == set(w4a16)
    assert set(ck.plain_tensor_names()) == set(plain)
    for name, layer in svdq.items():
        got = ck.svdquant_layer(name)
        assert tensors_equal(got, layer), name
    for name, layer in w4a16.items():
        assert tensors_equal(ck.w4a16_layer(name), layer), name
    for name, t in plain.items():
        assert torch.equal(bits(ck.plain_tensor(name)), bits(t)), name


def oracle_state_dict(model, naming="cpp", group_rows=16):
    svdq, w4a16, plain = model
    sd = {}
    for name, layer in svdq.items():
        sd.update(oracle.svdquant_tensors(name, layer, naming))
    for name, S in W4A16_NAMES:
        if name in w4a16:
            sd.update(oracle.w4a16_tensors(name, w4a16[name], S, group_rows=group_rows))
    sd.update(plain)
    return sd


# ---------------------------------------------------------------------------------------------------------
# Reading files built by the oracle, and the writer's bytes against the oracle's
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision,naming", [("int4", "cpp"), ("nvfp4", "python")])
def test_reader_on_oracle_file(tmp_path, precision, naming):
    model = make_model(precision, naming, seed=1)
    path = tmp_path / "oracle.safetensors"
    oracle.write(path, oracle_state_dict(model, naming), oracle.metadata(CONFIG, COMFY, MODEL_CLASS, precision, 32))
    with open_nunchaku(path) as ck:
        assert (ck.precision, ck.naming, ck.model_class) == (precision, naming, MODEL_CLASS)
        assert ck.config == CONFIG and ck.comfy_config == COMFY
        assert ck.quantization_config["rank"] == 32
        assert_model_equal(ck, model)
        shifted = {n for n in ck.svdquant_layer_names() if ck.svdquant_layer(n).shifted}
        want = {"transformer_blocks.0.mlp_fc2" if naming == "cpp" else "transformer_blocks.0.ff.net.2",
                "single_transformer_blocks.0.mlp_fc2"} if precision == "int4" else set()
        assert shifted == want


@pytest.mark.parametrize("precision,naming", [("int4", "python"), ("nvfp4", "cpp")])
def test_writer_bytes_equal_oracle(tmp_path, precision, naming):
    model = make_model(precision, naming, seed=2)
    path = write_model(tmp_path / "ours.safetensors", model, naming)
    want = oracle_state_dict(model, naming)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(want)
        for k, t in want.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(bits(got), bits(t)), k
        md = f.metadata()
    assert json.loads(md["config"]) == CONFIG and json.loads(md["comfy_config"]) == COMFY
    assert md["model_class"] == MODEL_CLASS
    want_md = oracle.metadata(CONFIG, COMFY, MODEL_CLASS, precision, 32)
    assert json.loads(md["quantization_config"]) == json.loads(want_md["quantization_config"])


def test_reader_precision_from_wscales_dtype(tmp_path):
    """No quantization_config (legacy): float8 wscales mean nvfp4."""
    model = make_model("nvfp4", seed=3)
    path = tmp_path / "noqc.safetensors"
    oracle.write(path, oracle_state_dict(model), {"config": json.dumps(CONFIG)})
    with open_nunchaku(path) as ck:
        assert ck.precision == "nvfp4" and ck.quantization_config is None and ck.comfy_config is None
        assert_model_equal(ck, model)


# ---------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
@pytest.mark.parametrize("naming", ["cpp", "python"])
@pytest.mark.parametrize("legacy", [False, True])
def test_round_trip(tmp_path, precision, naming, legacy):
    model = make_model(precision, naming, seed=4)
    path = write_model(tmp_path / ("legacy" if legacy else "m.safetensors"), model, naming, legacy)
    if legacy:
        assert sorted(os.listdir(path)) == ["comfy_config.json", "config.json", "transformer_blocks.safetensors",
                                            "unquantized_layers.safetensors"]
    with open_nunchaku(path) as ck:
        assert (ck.precision, ck.naming) == (precision, naming)
        assert ck.config == CONFIG and ck.comfy_config == COMFY
        assert ck.model_class == (None if legacy else MODEL_CLASS)
        assert_model_equal(ck, model)
    assert not [f for f in os.listdir(tmp_path if not legacy else path) if f.endswith(".tmp")]


@pytest.mark.parametrize("R", [16, 48, 64])
@pytest.mark.parametrize("N,K", [(128, 384), (384, 256), (256, 128)])
def test_round_trip_shapes(tmp_path, R, N, K):
    gen = torch.Generator().manual_seed(R + N + K)
    layer = make_svdq("int4", N, K, R, gen, optional=False)
    path = write_nunchaku(tmp_path / "s.safetensors", svdquant={"blocks.0.proj": layer}, w4a16={}, plain={},
                          config={}, comfy_config=None, model_class="X")
    with open_nunchaku(path) as ck:
        assert tensors_equal(ck.svdquant_layer("blocks.0.proj"), layer)
        s = ck.layer_summary("blocks.0.proj")
    got = (s["kind"], s["N"], s["K"], s["R"], s["G"], s["precision"], s["shifted"])
    assert got == ("svdquant", N, K, R, 64, "int4", False)
    # codes N·K + wscales N·K/64 + smooth K + lora (N + K)·R; bytes: N·K/2 + 2·(the rest)
    rest = N * K // 64 + K + (N + K) * R
    assert s["params"] == N * K + rest and s["bytes"] == N * K // 2 + 2 * rest


def test_padded_layer_reads_back_padded(tmp_path):
    """N = 200, K = 192 are padded to 256 by the writer; the effective weight keeps its values in the
    top-left block and is 0 elsewhere; a rank of 20 is stored as 32."""
    gen = torch.Generator().manual_seed(6)
    layer = make_svdq("nvfp4", 200, 192, 20, gen)
    path = write_nunchaku(tmp_path / "p.safetensors", svdquant={"blocks.0.proj": layer}, w4a16={}, plain={},
                          config={}, comfy_config=None, model_class="X")
    with open_nunchaku(path) as ck:
        got = ck.svdquant_layer("blocks.0.proj")
        assert ck.quantization_config["rank"] == 32
    assert (got.N, got.K, got.R) == (256, 256, 32)
    W, Wg = ref.effective_weight(layer), ref.effective_weight(got)
    assert torch.equal(Wg[:200, :192], W)
    assert torch.count_nonzero(Wg[200:]) == 0 and torch.count_nonzero(Wg[:, 192:]) == 0
    assert torch.equal(ref.effective_bias(got)[:200], ref.effective_bias(layer))


def test_effective_weight_by_hand(tmp_path):
    """One nonzero code: W_eff[n, k] = code·scale/s[k] + Σ_r U[n, r]·D[k, r], computed by hand."""
    N = K = 128
    codes = torch.zeros(N, K, dtype=torch.int8)
    codes[5, 70] = -3
    ws = torch.ones(N, K // 64, dtype=torch.bfloat16)
    ws[5, 1] = 0.5
    smooth = torch.ones(K, dtype=torch.bfloat16)
    smooth[70] = 4.0
    D = torch.zeros(K, 16, dtype=torch.bfloat16)
    U = torch.zeros(N, 16, dtype=torch.bfloat16)
    D[3, 7], U[9, 7] = 2.0, 0.25
    layer = SVDQuantLayer("int4", codes, ws, smooth, D, U, bias=torch.zeros(N, dtype=torch.bfloat16))
    path = tmp_path / "hand.safetensors"
    oracle.write(path, oracle.svdquant_tensors("blocks.0.proj", layer), {})
    with open_nunchaku(path) as ck:
        W = ref.effective_weight(ck.svdquant_layer("blocks.0.proj"))
    want = torch.zeros(N, K)
    want[5, 70] = -3 * 0.5 / 4.0
    want[9, 3] = 0.25 * 2.0
    assert torch.equal(W, want)


def test_w4a16_interleave_and_plus_one_by_hand(tmp_path):
    """Stored tensors built by hand (stored row order): stored row d·S + j must come back as original row
    j·D + d, and the bias of the scale chunks (1 and 4) loses its +1."""
    S, D, K = 6, 8, 64                                    # N = 48, one group
    N = S * D
    stored_codes = torch.tensor([[(d * S + j) % 16] * K for d in range(D) for j in range(S)], dtype=torch.uint8)
    stored_scales = torch.tensor([[float(d * S + j)] for d in range(D) for j in range(S)], dtype=torch.bfloat16)
    stored_bias = torch.tensor([10.0 * j + d for d in range(D) for j in range(S)], dtype=torch.bfloat16)
    name = "transformer_blocks.0.norm1.linear"
    sd = {f"{name}.qweight": oracle.awq_int16(stored_codes).view(torch.int32),
          f"{name}.wscales": stored_scales.T.contiguous(), f"{name}.wzeros": -stored_scales.T.contiguous(),
          f"{name}.bias": stored_bias,
          "transformer_blocks.0.qkv_proj." + "x": torch.zeros(1)}   # a stray plain tensor
    qkv = make_svdq("int4", 128, 128, 16, torch.Generator().manual_seed(0))
    sd.update(oracle.svdquant_tensors("transformer_blocks.0.qkv_proj", qkv))
    path = tmp_path / "w.safetensors"
    oracle.write(path, sd, {})
    with open_nunchaku(path) as ck:
        layer = ck.w4a16_layer(name)
        assert "transformer_blocks.0.qkv_proj.x" in ck.plain_tensor_names()
    for j in range(S):
        for d in range(D):
            r = j * D + d
            assert int(layer.codes[r, 0]) == (d * S + j) % 16
            assert float(layer.scales[r, 0]) == d * S + j and float(layer.zeros[r, 0]) == -(d * S + j)
            assert float(layer.bias[r]) == 10.0 * j + d - (1.0 if j in (1, 4) else 0.0)
    assert layer.bias.dtype == torch.float32 and layer.codes.shape == (N, K)


@pytest.mark.parametrize("K,group_rows", [(64, 0), (64, 16), (100, 0), (192, 16)])
def test_w4a16_groups(tmp_path, K, group_rows):
    """One group (K = 64); K = 100 (ceil groups: stored with K padded to 128, codes 0 there); group rows
    padded to 16 by some writers (only ceil(K/64) are read)."""
    gen = torch.Generator().manual_seed(K)
    name = "single_transformer_blocks.0.norm.linear"
    layer = make_w4a16(3 * K, K, gen)
    if K % 64:
        written = write_nunchaku(tmp_path / "k.safetensors", svdquant={}, w4a16={name: layer}, plain={},
                                 config={}, comfy_config=None, model_class="X",
                                 quantization_config={"method": "svdquant", "weight": {"dtype": "int4"}})
        with open_nunchaku(written) as ck:
            got = ck.w4a16_layer(name)
        assert got.codes.shape == (3 * K, 128) and torch.count_nonzero(got.codes[:, K:]) == 0
        assert torch.equal(got.codes[:, :K], layer.codes)
        assert tensors_equal(W4A16Layer(got.codes[:, :K].contiguous(), got.scales, got.zeros, got.bias), layer)
        assert torch.equal(ref.dequantize_w4a16(got)[:, :K], ref.dequantize_w4a16(layer))
        return
    sd = oracle.w4a16_tensors(name, layer, 3, group_rows=group_rows)
    sd.update(oracle.svdquant_tensors("single_transformer_blocks.0.qkv_proj",
                                      make_svdq("int4", 128, 128, 16, gen)))
    path = tmp_path / "g.safetensors"
    oracle.write(path, sd, {})
    with open_nunchaku(path) as ck:
        assert tensors_equal(ck.w4a16_layer(name), layer)
        s = ck.layer_summary(name)
    assert (s["kind"], s["N"], s["K"], s["G"]) == ("w4a16", 3 * K, K, 64)


def test_plain_and_kind(tmp_path):
    model = make_model("int4", seed=7)
    path = write_model(tmp_path / "m.safetensors", model)
    with open_nunchaku(path) as ck:
        assert ck.svdquant_layer_names() == [           # natural order: block 2 before block 10
            "single_transformer_blocks.0.mlp_fc2", "transformer_blocks.0.mlp_fc2", "transformer_blocks.0.qkv_proj",
            "transformer_blocks.2.out_proj", "transformer_blocks.10.out_proj"]
        assert ck.w4a16_layer_names() == ["single_transformer_blocks.0.norm.linear", "transformer_blocks.0.norm1.linear"]
        assert ck.layer_kind("transformer_blocks.0.qkv_proj") == "svdquant"
        assert ck.layer_kind("transformer_blocks.0.norm1.linear") == "w4a16"
        assert ck.layer_kind("x_embedder.weight") == "plain"
        s = ck.layer_summary("x_embedder.weight")
        assert (s["kind"], s["N"], s["K"], s["params"], s["bytes"]) == ("plain", 128, 64, 128 * 64, 2 * 128 * 64)
        with pytest.raises(KeyError):
            ck.layer_kind("nope")


def test_writer_leaves_nothing_on_error(tmp_path):
    svdq, w4a16, plain = make_model("int4", seed=8)
    svdq["transformer_blocks.0.qkv_proj"].shifted = True          # contradicts the name rule readers use
    with pytest.raises(ValueError, match="shifted"):
        write_model(tmp_path / "bad.safetensors", (svdq, w4a16, plain))
    svdq["transformer_blocks.0.qkv_proj"].shifted = False
    with pytest.raises(ValueError):                                # safetensors refuses non-str metadata
        write_nunchaku(tmp_path / "bad.safetensors", svdquant=svdq, w4a16=w4a16, plain=plain, config=CONFIG,
                       comfy_config=COMFY, model_class=MODEL_CLASS, extra_metadata={"x": 1})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: CheckpointError naming the file and the key, and nothing else
# ---------------------------------------------------------------------------------------------------------

def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        with open_nunchaku(path) as ck:
            for n in ck.svdquant_layer_names():
                ck.svdquant_layer(n)
    msg = str(info.value)
    assert type(info.value) is CheckpointError
    for f in (str(path),) + fragments:
        assert f in msg, (f, msg)
    return msg


def small_state_dict(naming="cpp"):
    layer = make_svdq("int4", 128, 256, 32, torch.Generator().manual_seed(9))
    return oracle.svdquant_tensors("blocks.0.proj", layer, naming)


def test_error_truncated(tmp_path):
    path = tmp_path / "t.safetensors"
    oracle.write(path, small_state_dict(), oracle.metadata(CONFIG, COMFY, MODEL_CLASS, "int4", 32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    expect_error(path, "truncated")
    path.write_bytes(data[:6])
    expect_error(path, "truncated")


def test_error_wrong_dtype(tmp_path):
    path = tmp_path / "d.safetensors"
    sd = small_state_dict()
    sd["blocks.0.proj.qweight"] = sd["blocks.0.proj.qweight"].view(torch.uint8)
    oracle.write(path, sd, {})
    expect_error(path, "blocks.0.proj.qweight", "uint8", "expected [N, K/2] = [128, 128] int8 for int4 group 64")
    sd = small_state_dict("python")
    sd["blocks.0.proj.smooth_factor"] = sd["blocks.0.proj.smooth_factor"].float().to(torch.float8_e4m3fn)
    oracle.write(path, sd, {})
    expect_error(path, "blocks.0.proj.smooth_factor", "float8_e4m3fn")


def test_error_wrong_shape(tmp_path):
    path = tmp_path / "s.safetensors"
    sd = small_state_dict()
    sd["blocks.0.proj.qweight"] = torch.zeros(128, 100, dtype=torch.int8)
    oracle.write(path, sd, {})
    expect_error(path, "blocks.0.proj.qweight has shape [128, 100] int8, expected [N, K/2] = [128, 128] int8")


def test_error_missing_key(tmp_path):
    path = tmp_path / "m.safetensors"
    sd = small_state_dict("python")
    del sd["blocks.0.proj.proj_up"]
    oracle.write(path, sd, {})
    expect_error(path, "blocks.0.proj.proj_up", "missing")


def test_error_inconsistent_rank(tmp_path):
    path = tmp_path / "r.safetensors"
    sd = small_state_dict()
    sd["blocks.0.proj.lora_up"] = torch.zeros(128, 16, dtype=torch.bfloat16)
    oracle.write(path, sd, {})
    expect_error(path, "blocks.0.proj.lora_up", "blocks.0.proj.lora_down", "inconsistent rank")


def test_error_not_svdquant(tmp_path):
    path = tmp_path / "plain.safetensors"
    oracle.write(path, {"model.weight": torch.zeros(4, 4)}, {})
    expect_error(path, "not an SVDQuant/Nunchaku checkpoint", "model.weight")


@pytest.mark.parametrize("field", ["config", "comfy_config", "quantization_config"])
def test_error_corrupt_metadata(tmp_path, field):
    path = tmp_path / "j.safetensors"
    md = oracle.metadata(CONFIG, COMFY, MODEL_CLASS, "int4", 32)
    md[field] = md[field][:-3]
    oracle.write(path, small_state_dict(), md)
    expect_error(path, f"metadata field '{field}'", "not valid JSON")


def test_error_legacy_corrupt_config(tmp_path):
    model = make_model("int4", seed=10)
    folder = write_model(tmp_path / "legacy", model, legacy=True)
    (folder / "comfy_config.json").write_text("{oops")
    expect_error(folder, "comfy_config.json", "not valid JSON")
    os.unlink(folder / "unquantized_layers.safetensors")
    expect_error(folder, "unquantized_layers.safetensors")


def test_open_and_summaries_read_headers_only(tmp_path, monkeypatch):
    """Opening, validating and layer_summary never load tensor data (lazy, memory-bounded reading)."""
    from nunchaku_core.formats.nunchaku import NunchakuCheckpoint
    path = write_model(tmp_path / "m.safetensors", make_model("nvfp4", seed=11))

    def no_loading(self, key):
        raise AssertionError(f"tensor data of {key} was read")

    monkeypatch.setattr(NunchakuCheckpoint, "_load", no_loading)
    with open_nunchaku(path) as ck:
        for n in ck.svdquant_layer_names() + ck.w4a16_layer_names() + ck.plain_tensor_names():
            assert ck.layer_summary(n)["bytes"] > 0
