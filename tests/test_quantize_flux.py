"""The FLUX quantizer end to end on tiny models (hidden 256 = 2 heads of 128): BFL and diffusers inputs,
variant detection, the written file read back with open_nunchaku (effective weights approach the original
as the rank grows, INT4 and NVFP4), calibration files, and every bad input failing cleanly with nothing
left in the output folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nunchaku_core.models import flux
from nunchaku_core import reference as ref
from nunchaku_core.quantize.calibration import CalibrationError, load_calibration, recorder_for_module
from nunchaku_core.models.flux_source import (DIFFUSERS_DOUBLE, DIFFUSERS_DOUBLE_NORMS, DIFFUSERS_SINGLE,
                                       DIFFUSERS_SINGLE_NORMS, open_flux_source)
from nunchaku_core.formats.nunchaku import open_nunchaku
from nunchaku_core.quantize.flux import QuantizeOptions, quantize_flux

from flux_models import flux_shapes

H = 256
FAST = dict(report=False, alphas=(1.0,))     # one candidate per layer: the structure tests need no search


def tiny_bfl(*, depth=1, single=1, guidance=True, in_channels=16, seed=0, dtype=torch.bfloat16) -> dict:
    """BFL state dict with std-1/√K weights, nonzero biases and norm scales (so bias handling is visible)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in flux_shapes(H, depth, single, 64, 32, guidance, in_channels).items():
        if k.endswith(".scale"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith(".bias"):
            t = 0.05 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[1] ** 0.5
        out[k] = t.to(dtype)
    return out


def write(path: Path, sd: dict, metadata=None) -> Path:
    save_file(sd, str(path), metadata=metadata)
    return path


def to_diffusers(sd: dict) -> dict:
    """Inverse of flux_source's diffusers -> BFL mapping (split the fused rows, swap norm_out back)."""
    out = {}
    depth = len({k.split(".")[1] for k in sd if k.startswith("double_blocks.")})
    single = len({k.split(".")[1] for k in sd if k.startswith("single_blocks.")})
    for i in range(depth):
        for bfl, parts in DIFFUSERS_DOUBLE.items():
            for leaf in ("weight", "bias"):
                for part, t in zip(parts, sd[f"double_blocks.{i}.{bfl}.{leaf}"].chunk(len(parts))):
                    out[f"transformer_blocks.{i}.{part}.{leaf}"] = t.clone()
        for bfl, name in DIFFUSERS_DOUBLE_NORMS.items():
            out[f"transformer_blocks.{i}.{name}"] = sd[f"double_blocks.{i}.{bfl}"]
    for i in range(single):
        for bfl, parts in DIFFUSERS_SINGLE.items():
            for leaf in ("weight", "bias"):
                t = sd[f"single_blocks.{i}.{bfl}.{leaf}"]
                sizes = [H, H, H, 4 * H] if len(parts) == 4 else [t.shape[0]]
                for part, c in zip(parts, t.split(sizes)):
                    out[f"single_transformer_blocks.{i}.{part}.{leaf}"] = c.clone()
        for bfl, name in DIFFUSERS_SINGLE_NORMS.items():
            out[f"single_transformer_blocks.{i}.{name}"] = sd[f"single_blocks.{i}.{bfl}"]
    for bfl, diff in flux.UNQUANTIZED:
        for leaf in ("weight", "bias"):
            if f"{bfl}.{leaf}" in sd:
                t = sd[f"{bfl}.{leaf}"]
                out[f"{diff}.{leaf}"] = flux.swap_halves(t).clone() if bfl == flux.SWAPPED else t
    return out


def write_diffusers_folder(folder: Path, sd: dict) -> Path:
    folder.mkdir()
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(folder / name))
        weight_map.update({k: name for k in ks})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux")
    sd = tiny_bfl()
    return d, sd, write(d / "tiny.safetensors", sd)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def original_layers(sd: dict, single: bool = True) -> dict:
    """Nunchaku layer name -> (original W, original b) for every W4A4 layer of the tiny model."""
    out = {}
    for bfl, cpp, _ in flux.DOUBLE_W4A4:
        out[f"transformer_blocks.0.{cpp}"] = (sd[f"double_blocks.0.{bfl}.weight"], sd[f"double_blocks.0.{bfl}.bias"])
    if not single:
        return out
    w1, b1 = sd["single_blocks.0.linear1.weight"], sd["single_blocks.0.linear1.bias"]
    w2, b2 = sd["single_blocks.0.linear2.weight"], sd["single_blocks.0.linear2.bias"]
    p = "single_transformer_blocks.0"
    out[f"{p}.qkv_proj"] = (w1[:3 * H], b1[:3 * H])
    out[f"{p}.mlp_fc1"] = (w1[3 * H:], b1[3 * H:])
    out[f"{p}.out_proj"] = (w2[:, :H], torch.zeros(H))
    out[f"{p}.mlp_fc2"] = (w2[:, H:], b2)
    return out


def test_int4_data_free_end_to_end(model):
    d, sd, src = model
    out = d / "q_int4.safetensors"
    calls = []
    res = quantize_flux(src, out, options=QuantizeOptions(precision="int4", rank=32),
                        progress=lambda done, total, what: calls.append((done, total)))
    assert calls[-1][0] == calls[-1][1] == 12 + 3 + 1 and [c[0] for c in calls] == list(range(1, 17))
    with open_nunchaku(out) as ck:
        assert ck.precision == "int4" and ck.model_class == "NunchakuFluxTransformer2dModel"
        assert ck.comfy_config["model_class"] == "Flux"
        mc = ck.comfy_config["model_config"]
        assert (mc["hidden_size"], mc["num_heads"], mc["depth"], mc["depth_single_blocks"]) == (H, 2, 1, 1)
        assert ck.quantization_config["rank"] == 32 and ck.config["num_layers"] == 1
        assert json.loads(ck.metadata["svdquant_quantizer"])["variant"].startswith("dev")
        for name, (w, b) in original_layers(sd).items():
            layer = ck.svdquant_layer(name)
            assert layer.shifted == name.endswith(("mlp_fc2", "mlp_context_fc2"))
            assert rel(ref.effective_weight(layer), w) < 0.15, name
            assert rel(ref.effective_bias(layer), b) < 0.01 if b.abs().sum() else True, name
        for bfl, name, _ in flux.DOUBLE_W4A16:
            m = ck.w4a16_layer(f"transformer_blocks.0.{name}")
            assert rel(ref.dequantize_w4a16(m), sd[f"double_blocks.0.{bfl}.weight"]) < 0.15
            # the writer folds the +1 of (1 + scale) into the bf16 bias: one bf16 rounding of b + 1 there
            b = sd[f"double_blocks.0.{bfl}.bias"].float()
            assert ((m.bias - b).abs() <= 2.0 ** -8 * (b.abs() + 1)).all()
        # unquantized layers keep their values (diffusers names; norm_out's halves swapped back)
        assert torch.equal(ck.plain_tensor("x_embedder.weight"), sd["img_in.weight"])
        assert torch.equal(ck.plain_tensor("norm_out.linear.weight"),
                           flux.swap_halves(sd["final_layer.adaLN_modulation.1.weight"]))
        assert torch.equal(ck.plain_tensor("single_transformer_blocks.0.norm_q.weight"),
                           sd["single_blocks.0.norm.query_norm.scale"])
    report = json.loads(res.report_path.read_text())
    assert len(report["layers"]) == 12
    for row in report["layers"]:
        assert {"err_naive", "err_smooth", "err_svd", "err_svdquant"} <= set(row)
        assert row["err_svdquant"] <= row["err_naive"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_round_trip_error_falls_with_rank(tmp_path, precision):
    """Read back from the file, the effective weights approach the original as R grows; at R = 256 the
    256-wide out_proj layers are full rank and only bf16 rounding of U, D is left for the 4-bit residual.
    (One double block only: single blocks share the same per-layer code and are covered above.)"""
    sd = tiny_bfl(single=0)
    src = write(tmp_path / "m.safetensors", sd)
    layers = {n: wb for n, wb in original_layers(sd, single=False).items()}
    errs = {}
    for rank in (0, 32, 256):
        out = tmp_path / f"r{rank}.safetensors"
        quantize_flux(src, out, options=QuantizeOptions(precision=precision, rank=rank, **FAST))
        with open_nunchaku(out) as ck:
            errs[rank] = {n: rel(ref.effective_weight(ck.svdquant_layer(n))[:w.shape[0], :w.shape[1]], w)
                          for n, (w, _) in layers.items()}
    for n in layers:
        seq = [errs[r][n] for r in (0, 32, 256)]
        assert seq == sorted(seq, reverse=True), (n, seq)
    for n in ("transformer_blocks.0.out_proj", "transformer_blocks.0.out_proj_context"):
        assert errs[256][n] < 0.02 * errs[0][n], (n, errs[256][n], errs[0][n])


def test_diffusers_folder_gives_identical_file(model, tmp_path):
    d, sd, src = model
    folder = write_diffusers_folder(tmp_path / "transformer", to_diffusers(sd))
    s = open_flux_source(folder)
    assert s.layout == "diffusers"
    assert torch.equal(s.read("single_blocks.0.linear1.weight"), sd["single_blocks.0.linear1.weight"])
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    quantize_flux(src, a, options=QuantizeOptions(**FAST))
    quantize_flux(tmp_path, b, options=QuantizeOptions(**FAST))          # pipeline folder with transformer/
    with open_nunchaku(a) as ca, open_nunchaku(b) as cb:
        assert ca.svdquant_layer_names() == cb.svdquant_layer_names()
        for n in ca.svdquant_layer_names():
            la, lb = ca.svdquant_layer(n), cb.svdquant_layer(n)
            assert torch.equal(la.codes, lb.codes) and torch.equal(la.proj_up, lb.proj_up), n
        for n in ca.plain_tensor_names():
            assert torch.equal(ca.plain_tensor(n), cb.plain_tensor(n)), n


@pytest.mark.parametrize("kw,model_class,variant", [
    (dict(), "Flux", "dev"),
    (dict(guidance=False), "FluxSchnell", "schnell"),
    (dict(in_channels=96), "FluxInpaint", "Fill"),
    (dict(in_channels=32), "Flux", "Depth/Canny"),
])
def test_variant_detection(tmp_path, kw, model_class, variant):
    sd = tiny_bfl(single=0, **kw)
    src = write(tmp_path / "m.safetensors", {"model.diffusion_model." + k: v for k, v in sd.items()})
    s = open_flux_source(src)
    assert s.layout == "bfl" and s.model_class == model_class and s.variant.startswith(variant)
    assert s.model_config["in_channels"] == kw.get("in_channels", 16)
    assert s.model_config["guidance_embed"] == kw.get("guidance", True)
    out = tmp_path / "q.safetensors"
    quantize_flux(src, out, options=QuantizeOptions(**FAST))
    with open_nunchaku(out) as ck:
        assert ck.comfy_config["model_class"] == model_class
        assert ck.comfy_config["model_config"]["in_channels"] == kw.get("in_channels", 16)
        assert ("time_text_embed.guidance_embedder.linear_1.weight" in ck.plain_tensor_names()) == kw.get("guidance", True)


def test_full_checkpoint_reads_only_the_transformer(tmp_path):
    """A ComfyUI full checkpoint: the transformer under model.diffusion_model., a VAE and an fp8-scaled text
    encoder beside it; only the transformer is read (and the encoder's scale keys do not count as ours)."""
    sd = {"model.diffusion_model." + k: v for k, v in tiny_bfl(single=0).items()}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    sd["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.scale_weight"] = torch.ones(1)
    s = open_flux_source(write(tmp_path / "full.safetensors", sd))
    assert s.layout == "bfl" and s.depth == 1 and s.depth_single_blocks == 0
    assert all(k.startswith(("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer"))
               for k in s.global_keys())


# ---------------------------------------------------------------------------------------------- calibration

def bfl_modules(sd: dict) -> torch.nn.Module:
    """A module tree with BFL names holding the model's linears (enough for the recorder's hooks)."""
    root = torch.nn.Module()
    for k, w in sd.items():
        if not k.endswith(".weight") or w.dim() != 2:
            continue
        parent = root
        parts = k[:-len(".weight")].split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        lin.weight.data = w.float()
        parent.add_module(parts[-1], lin)
    return root


def record(sd: dict, path: Path, steps=3, tokens=96) -> Path:
    m = bfl_modules(sd)
    rec = recorder_for_module(m, max_rows=128)
    assert rec.family == "flux"          # the FLUX.1 policy's W4A4 Linears: what Nunchaku's format quantizes
    assert sorted(rec.names) == sorted([f"double_blocks.0.{s}_{n}" for s in ("img", "txt")
                                        for n in ("attn.proj", "attn.qkv", "mlp.0", "mlp.2")]
                                       + ["single_blocks.0.linear1", "single_blocks.0.linear2"])
    g = torch.Generator().manual_seed(0)
    rec.attach(m)
    mods = dict(m.named_modules())
    for _ in range(steps):          # stand-in for sampling steps: feed every hooked linear some tokens
        for name in rec.names:
            lin = mods[name]
            x = torch.randn(tokens, lin.in_features, generator=g)
            x[:, :4] *= 20                                                 # outlier channels
            if name.endswith(("mlp.2", "linear2")):
                x = torch.nn.functional.gelu(x)
            lin(x)
    rec.detach()
    return rec.save(path)


def test_calibration_file_round_trip(model, tmp_path):
    _, sd, _ = model
    cal = load_calibration(record(sd, tmp_path / "c.safetensors"))
    st = cal.stats("double_blocks.0.img_mlp.2")
    assert st.rows.shape == (128, 4 * H) and cal.count("double_blocks.0.img_mlp.2") == 3 * 96
    assert (st.cmin >= -0.17).all()                                      # GELU outputs
    assert cal.stats("single_blocks.0.linear2").rows.shape == (128, 5 * H)


def test_calibrated_gptq_quantization(model, tmp_path):
    d, sd, src = model
    cal = record(sd, tmp_path / "c.safetensors")
    out = tmp_path / "q.safetensors"
    res = quantize_flux(src, out, options=QuantizeOptions(rank=32, gptq=True, alphas=(0.5,)),
                        calib_path=cal)
    rows = {r["layer"]: r for r in res.layers}
    assert all(r["alpha"] in (0.5, None) for r in rows.values())      # None: no smoothing won
    mean = {v: sum(r[f"err_{v}"] for r in rows.values()) / len(rows) for v in ("naive", "svdquant")}
    assert mean["svdquant"] < 0.5 * mean["naive"], mean
    with open_nunchaku(out) as ck:
        assert len(ck.svdquant_layer_names()) == 12


# ------------------------------------------------------------------------------------------------ bad inputs

def assert_fails_cleanly(tmp_path, src, match, calib=None, out=None, exc=ValueError):
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    out = out or out_dir / "q.safetensors"
    before = sorted(os.listdir(out_dir))
    with pytest.raises(exc, match=match):
        quantize_flux(src, out, options=QuantizeOptions(**FAST), calib_path=calib)
    assert sorted(os.listdir(out_dir)) == before


def test_not_flux(tmp_path):
    src = write(tmp_path / "sdxl.safetensors", {"input_blocks.0.0.weight": torch.zeros(4, 4)})
    assert_fails_cleanly(tmp_path, src, r"sdxl.safetensors: not a FLUX.1 transformer")
    txt = tmp_path / "notes.safetensors"
    txt.write_text("hello, not a model")
    assert_fails_cleanly(tmp_path, txt, r"notes.safetensors: not a safetensors file")


def test_already_quantized(model, tmp_path):
    d, sd, src = model
    q = tmp_path / "q.safetensors"
    quantize_flux(src, q, options=QuantizeOptions(**FAST))
    assert_fails_cleanly(tmp_path, q, r"q.safetensors: already quantized")
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in sd.items()}
    fp8["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    assert_fails_cleanly(tmp_path, write(tmp_path / "scaled.safetensors", fp8), r"already quantized \(scaled_fp8\)")


def test_unsupported_dtype(model, tmp_path):
    _, sd, _ = model
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in sd.items()}
    assert_fails_cleanly(tmp_path, write(tmp_path / "fp8.safetensors", fp8),
                         r"fp8.safetensors: .* has dtype F8_E4M3; the quantizer needs a bf16, fp16 or fp32 model")


def test_output_not_writable(model, tmp_path):
    _, _, src = model
    assert_fails_cleanly(tmp_path, src, r"the folder .*missing does not exist", out=tmp_path / "missing" / "q.safetensors")
    assert_fails_cleanly(tmp_path, src, r"is a folder", out=tmp_path / "out")
    assert_fails_cleanly(tmp_path, src, r"would overwrite the input", out=src)


def test_output_write_error_leaves_nothing(model, tmp_path, monkeypatch):
    """A failure while writing (disk full, I/O error) removes the partial file."""
    _, _, src = model
    from nunchaku_core.formats import safetensors_stream

    def boom(self, name, tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_stream.StreamingSafetensorsWriter, "write", boom)
    assert_fails_cleanly(tmp_path, src, r"No space left", exc=OSError)


def test_calibration_from_another_model(model, tmp_path):
    d, sd, src = model
    wider = {k: (torch.cat([v, v], dim=1) if k == "double_blocks.0.img_mlp.2.weight" else v) for k, v in sd.items()}
    wide = record(wider, tmp_path / "wide.safetensors")
    assert_fails_cleanly(tmp_path, src, r"wide.safetensors: calibration recorded on another model "
                                        r"\(double_blocks.0.img_mlp.2 is \[\d+, \d+\] in the file, the model has it as",
                         calib=wide, exc=CalibrationError)
    other_weights = record(tiny_bfl(seed=1), tmp_path / "seed1.safetensors")
    assert_fails_cleanly(tmp_path, src, r"seed1.safetensors: calibration recorded on a model with other weights",
                         calib=other_weights, exc=CalibrationError)
    not_calib = write(tmp_path / "nc.safetensors", {"a": torch.zeros(1)})
    assert_fails_cleanly(tmp_path, src, r"nc.safetensors: not a calibration file", calib=not_calib)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    assert_fails_cleanly(tmp_path, src, r"garbage.safetensors: cannot read as a safetensors calibration file",
                         calib=garbage)


def test_version1_calibration_still_read(model, tmp_path):
    """Files recorded before the any-family format (version 1: FLUX.1 shape fields + img_in/txt_in fingerprint)
    still drive the quantizer, and their shape check still names the field."""
    d, sd, src = model
    v2 = record(sd, tmp_path / "v2.safetensors")
    with safe_open(str(v2), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    shape = flux.comfy_model_config(hidden_size=H, depth=1, depth_single_blocks=1, in_channels=16, context_in_dim=64,
                                    vec_in_dim=32, guidance_embed=True, num_heads=2)
    fields = ("hidden_size", "depth", "depth_single_blocks", "in_channels", "context_in_dim", "vec_in_dim",
              "guidance_embed")
    fp = [x for k in ("img_in.weight", "txt_in.weight") for x in sd[k][:8, :8].float().flatten().tolist()]
    meta = {"format": "svdquant-calibration", "version": "1", "model": json.dumps({k: shape[k] for k in fields}),
            "fingerprint": json.dumps(fp), "max_rows": "128"}
    v1 = tmp_path / "v1.safetensors"
    save_file(tensors, str(v1), metadata=meta)
    assert load_calibration(v1).version == "1"
    quantize_flux(src, tmp_path / "q.safetensors", options=QuantizeOptions(**FAST), calib_path=v1)
    save_file(tensors, str(v1), metadata={**meta, "model": json.dumps({**{k: shape[k] for k in fields},
                                                                       "guidance_embed": False})})
    assert_fails_cleanly(tmp_path, src, r"v1.safetensors: calibration recorded on another model "
                                        r"\(guidance_embed False in the file vs True", calib=v1, exc=CalibrationError)


def test_gptq_without_calibration(model, tmp_path):
    _, _, src = model
    with pytest.raises(ValueError, match="--gptq needs calibration"):
        quantize_flux(src, tmp_path / "q.safetensors", options=QuantizeOptions(gptq=True))
    assert not (tmp_path / "q.safetensors").exists()


def test_cli(model, tmp_path, capsys):
    from nunchaku_core.cli import main
    _, _, src = model
    out = tmp_path / "cli.safetensors"
    assert main(["quantize", str(src), str(out), "--precision", "nvfp4", "--rank", "16", "--alphas", "1",
                 "--no-report", "--quiet"]) == 0
    with open_nunchaku(out) as ck:
        assert ck.precision == "nvfp4" and ck.quantization_config["rank"] == 16
    assert main(["quantize", str(out), str(tmp_path / "again.safetensors"), "--quiet"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "again.safetensors").exists()
