"""The loader without a server: ComfyUI imported in-process, tiny (hidden 256) random checkpoints.

Checks that every ComfyUI Linear ends up holding the right checkpoint layer (against the effective-weight
export of nunchaku_core.formats.dequantize, an independent name mapping that tests/test_original_tooling.py checks
against the original packer), the configuration each FLUX variant gets, the ComfyUI-native layout, memory
accounting and the error messages for bad files.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

from nunchaku_core import reference
from nunchaku_core.formats.comfy_native import (decode_comfy_quant, svdquant_from_comfy, svdquant_to_comfy, w4a16_from_comfy,
                                        w4a16_to_comfy)
from nunchaku_core.formats.dequantize import iter_effective_state_dict
from nunchaku_core.formats.nunchaku import CheckpointError, open_nunchaku
from nunchaku_core.layer import tensors_equal

import flux_models as fm
from comfy_inprocess import pack_module

U32 = 2.0 ** -24   # fp32 unit roundoff


@pytest.fixture(scope="module")
def pack():
    """ComfyUI (CPU) and this repository imported as a custom-node package, as ComfyUI would."""
    return pack_module("loader")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return {
        "int4": fm.write_random_nunchaku_flux(d / "int4.safetensors"),
        "nvfp4": fm.write_random_nunchaku_flux(d / "nvfp4.safetensors", precision="nvfp4"),
        "native": fm.write_random_comfy_native_flux(d / "native.safetensors"),
        "dir": d,
    }


def _linears(model):
    from comfy.ldm.flux.model import Flux
    dm = model.diffusion_model
    assert isinstance(dm, Flux)
    return {n: m for n, m in dm.named_modules() if hasattr(m, "parts")}


# ---------------------------------------------------------------------------------------------------------
# every Linear holds the right layer
# ---------------------------------------------------------------------------------------------------------

def test_linears_match_effective_weights(pack, files, caplog):
    """Each quantized Linear applied to random x vs x·W_effᵀ + b_eff from the dequantized export.

    Tolerance (int4): the only difference is activation rounding. Per token m and group g the rounding error
    of t = (x + σ·shifted)/s is e ~ U(−a/2, a/2) with a = sa[m, g] the activation scale (no clipping: the
    scale is absmax/qmax), independent across elements, so E‖Δ‖² = Σ_m Σ_g a²/12 · Σ_n Σ_{k∈g} Deq[n, k]²
    (Deq: dequantized codes, already in the smoothed domain). ‖Δ‖² is a sum of thousands of such terms, so
    it sits within a few per cent of its mean; we allow 2× the expected RMS. Putting a wrong layer in a
    Linear (another layer, unswapped halves, parts in the wrong order) changes the output by about ‖y‖,
    5-10× more than this.
    W4A16 and plain layers see identical fp32 operands: only summation order differs, ≤ K·u·Σ|x||w| per entry.
    """
    caplog.set_level(logging.WARNING)
    patcher = pack.load_svdquant_model(str(files["int4"]))
    assert not [r for r in caplog.records if "unet missing" in r.message or "unet unexpected" in r.message]
    with open_nunchaku(files["int4"]) as ck:
        eff = dict(iter_effective_state_dict(ck, torch.float32))
    g = torch.Generator().manual_seed(1)
    checked = 0
    for name, m in _linears(patcher.model).items():
        W, b = eff[f"{name}.weight"], eff[f"{name}.bias"]
        x = torch.randn(7, W.shape[1], generator=g)
        if name.endswith(("mlp.2", "linear2")):
            x = torch.nn.functional.gelu(x, approximate="tanh")   # what those layers see in the model
        with torch.no_grad():
            y = m(x).float()
        y_eff = x @ W.T + b
        if m.parts is None or not hasattr(m.parts[0].layer, "smooth"):
            bound = (x.abs() @ W.abs().T) * W.shape[1] * U32 + b.abs() * U32
            assert torch.all((y - y_eff).abs() <= bound), name
        else:
            expected = 0.0
            xs = torch.split(x, [p.layer.K for p in m.parts], dim=-1) if m.split == "in" else [x] * len(m.parts)
            for part, xp in zip(m.parts, xs):
                _, sa = reference.quantize_act(xp, part.layer)                            # [M, K/64]
                deq2 = reference.dequantize_weight(part.layer).pow(2)                     # [N, K]
                per_group = deq2.reshape(part.layer.N, -1, 64).sum(dim=(0, 2))           # [K/64]
                expected += float((sa.pow(2) / 12 * per_group).sum())
            err = (y - y_eff).norm().item()
            assert err <= 2 * math.sqrt(expected), f"{name}: ‖Δ‖ = {err:.4g}, expected ≈ {math.sqrt(expected):.4g}"
            assert err < 0.5 * y_eff.norm().item(), name
        checked += 1
    assert checked == 8 + 2 + 3 + 6 + 2 + 2  # 1 double (8 W4A4, 2 mod), 1 single (3), embedders 6, img/txt_in, final 2
    sd = patcher.model.diffusion_model.state_dict()
    # BFL names as this ComfyUI renames them at load (0.33: q/k norms `.scale` -> `.weight`)
    eff = patcher.model.model_config.process_unet_state_dict(dict(eff))
    for key in ("img_in.weight", "final_layer.adaLN_modulation.1.weight", "double_blocks.0.img_attn.norm.key_norm.scale",
                "single_blocks.0.norm.query_norm.scale", "guidance_in.out_layer.bias"):
        key = next(iter(patcher.model.model_config.process_unet_state_dict({key: None})))
        assert torch.equal(sd[key].float(), eff[key]), key


def test_forward_and_sampling_objects(pack, files):
    """The loaded model runs ComfyUI's own Flux forward; ComfyUI's model wrapper and sampling are stock."""
    import comfy.model_base
    import comfy.model_sampling
    patcher = pack.load_svdquant_model(str(files["int4"]))
    assert type(patcher.model) is comfy.model_base.Flux
    assert isinstance(patcher.model.model_sampling, comfy.model_sampling.ModelSamplingFlux)
    x = torch.randn(1, 16, 8, 8)
    out = patcher.model.apply_model(x, torch.tensor([0.7]), c_crossattn=torch.randn(1, 8, 64),
                                    y=torch.randn(1, 32), guidance=torch.tensor([3.5]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_model_size_counts_quantized_tensors(pack, files):
    import comfy.model_management
    patcher = pack.load_svdquant_model(str(files["int4"]))
    sd = patcher.model.state_dict()
    # quantized Linears list weight/bias as data-free meta tensors of the dense shape (for ComfyUI's LoRA key
    # maps); ComfyUI's module_size would count them as dense, our model_size must not
    meta = {k: v for k, v in sd.items() if v.is_meta}
    quantized = {n for n, m in _linears(patcher.model).items() if m.parts is not None}
    assert {k.rsplit(".", 1)[0] for k in meta} == {f"diffusion_model.{n}" for n in quantized}
    assert comfy.model_management.module_size(patcher.model) > patcher.model_size()
    plain = sum(v.numel() * v.element_size() for v in sd.values() if not v.is_meta)
    parts = [p for m in _linears(patcher.model).values() if m.parts is not None for p in m.parts]
    held = sum(t.numel() * t.element_size() for p in parts for t in p.held_tensors())
    assert held > plain > 0
    # packed at load: the unpacked 1-byte codes are dropped, only the kernel's nibble-packed copy stays
    assert all(p._layer.codes.is_meta for p in parts)
    codes = sum(p._packed.kernel.wcodes.numel() for p in parts)
    assert codes == sum((p.out_features + 15) // 16 * 16 * ((p.in_features + 7) // 8 * 8) // 2 for p in parts)
    assert plain < patcher.model_size() <= plain + held
    clone = patcher.clone()
    assert type(clone) is type(patcher) and clone.model_size() == patcher.model_size()


def test_device_move_keeps_codes_and_dtypes(pack, files):
    patcher = pack.load_svdquant_model(str(files["nvfp4"]))
    patcher.model.to("meta")
    layers = [p.layer for m in _linears(patcher.model).values() if m.parts is not None for p in m.parts]
    assert layers and all(layer.codes.device.type == "meta" for layer in layers)
    assert {layer.codes.dtype for layer in layers} <= {torch.int8, torch.uint8}
    assert any(getattr(layer, "wscales", None) is not None and layer.wscales.dtype == torch.float8_e4m3fn
               for layer in layers)


# ---------------------------------------------------------------------------------------------------------
# configuration from comfy_config or from the weights
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,kw,cls", [
    ("dev", {}, "Flux"),
    ("schnell", {"guidance": False}, "FluxSchnell"),
    ("fill", {"in_channels": 96}, "FluxInpaint"),
    ("depth", {"in_channels": 32}, "Flux"),
    ("dev, no comfy_config", {"comfy_config": False}, "Flux"),
])
def test_variant_model_class(pack, files, variant, kw, cls):
    path = fm.write_random_nunchaku_flux(files["dir"] / f"{variant}.safetensors", **kw)
    patcher = pack.load_svdquant_model(str(path))
    assert type(patcher.model.model_config).__name__ == cls
    params = patcher.model.diffusion_model.params
    assert (params.hidden_size, params.num_heads, params.in_channels) == (256, 2, kw.get("in_channels", 16))
    assert params.guidance_embed == kw.get("guidance", True)


def test_legacy_folder_and_foreign_comfy_config_keys(pack, files):
    """A legacy Nunchaku folder, picked as ComfyUI lists it (one of its files); its comfy_config carries the
    keys Nunchaku's own node pack writes (disable_unet_model_creation would stop ComfyUI building the model)."""
    folder = fm.write_random_nunchaku_flux(files["dir"] / "legacy", legacy_folder=True,
                                           comfy_extra={"disable_unet_model_creation": True, "unknown": 1})
    patcher = pack.load_svdquant_model(str(folder / "transformer_blocks.safetensors"))
    assert patcher.model.diffusion_model.params.hidden_size == 256


def test_bf16_weight_dtype(pack, files):
    patcher = pack.load_svdquant_model(str(files["int4"]), torch.bfloat16)
    assert patcher.model.get_dtype() == torch.bfloat16
    assert patcher.model.diffusion_model.img_in.weight.dtype == torch.bfloat16
    out = patcher.model.apply_model(torch.randn(1, 16, 4, 4), torch.tensor([0.5]), c_crossattn=torch.randn(1, 3, 64),
                                    y=torch.randn(1, 32), guidance=torch.tensor([3.5]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("env,runs", [(None, "cpu"), ("tiled", "tiled")])
@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_load_logs_the_backend_once(pack, files, caplog, monkeypatch, precision, env, runs):
    """One log line per load names the backend that runs the quantized layers and why
    (nunchaku_core.backend.choose_backend); sampling calls add none; every backend runs both precisions, so the
    layers keep the automatic choice (None) and run on it."""
    if env is None:
        monkeypatch.delenv("SVDQ_BACKEND", raising=False)
    else:
        monkeypatch.setenv("SVDQ_BACKEND", env)
    caplog.set_level(logging.INFO)
    patcher = pack.load_svdquant_model(str(files[precision]))
    for _ in range(2):
        out = patcher.model.apply_model(torch.randn(1, 16, 4, 4), torch.tensor([0.5]),
                                        c_crossattn=torch.randn(1, 3, 64), y=torch.randn(1, 32),
                                        guidance=torch.tensor([3.5]))
        assert torch.isfinite(out).all()
    said = [r.message for r in caplog.records if "quantized layers on" in r.message]
    assert len(said) == 1 and f"quantized layers on cpu run on the {runs} backend: " in said[0], said
    parts = [p for m in _linears(patcher.model).values() if m.parts is not None for p in m.parts]
    assert {p.backend for p in parts} == {None}
    assert {p._packed.backend for p in parts} == {runs}


def test_int4_keeps_automatic_backend(pack, files):
    patcher = pack.load_svdquant_model(str(files["int4"]))
    parts = [p for m in _linears(patcher.model).values() if m.parts is not None for p in m.parts]
    assert {p.backend for p in parts} == {None}


# ---------------------------------------------------------------------------------------------------------
# ComfyUI-native layout (comfy-kitchen)
# ---------------------------------------------------------------------------------------------------------

def test_comfy_native_svdquant_roundtrip():
    g = torch.Generator().manual_seed(3)
    layer = fm.random_svdquant_layer(256, 128, 16, "int4", True, g)
    t = svdquant_to_comfy(layer)
    assert t["weight"].shape == (256, 64) and t["weight_scale"].shape == (2, 256)
    assert decode_comfy_quant(t["comfy_quant"], "x") == {"format": "svdquant_w4a4", "group_size": 64, "act_unsigned": True}
    # the nibble order comfy-kitchen documents: column 2j in bits 0..3 of byte j
    assert (t["weight"][5, 3].item() & 0xF) == (layer.codes[5, 6].item() & 0xF)
    back = svdquant_from_comfy({k: v for k, v in t.items() if k != "comfy_quant"},
                               decode_comfy_quant(t["comfy_quant"], "x"), "x")
    assert tensors_equal(back, layer)


def test_comfy_native_tile_packed_equals_natural():
    """Tile-packed tensors built element by element from comfy-kitchen's description: weight byte
    [tn, tk, q, 32·i + b] = natural[128·tn + 4·q + i, 32·tk + b]; scale [tn, tk, j] = natural[tk, 128·tn + j];
    proj_up [tn, r, j] = U[128·tn + j, r]."""
    g = torch.Generator().manual_seed(4)
    layer = fm.random_svdquant_layer(256, 128, 16, "int4", False, g)
    nat = svdquant_to_comfy(layer)
    w, s, u = nat["weight"], nat["weight_scale"], nat["weight_proj_up"]
    tw = torch.empty(2, 2, 32, 128, dtype=torch.int8)
    for tn in range(2):
        for tk in range(2):
            for q in range(32):
                for i in range(4):
                    tw[tn, tk, q, 32 * i:32 * i + 32] = w[128 * tn + 4 * q + i, 32 * tk:32 * tk + 32]
    ts = torch.stack([torch.stack([s[tk, 128 * tn:128 * tn + 128] for tk in range(2)]) for tn in range(2)])
    tu = torch.stack([u[128 * tn:128 * tn + 128].T for tn in range(2)])
    tiled = {**nat, "weight": tw, "weight_scale": ts, "weight_proj_up": tu}
    back = svdquant_from_comfy(tiled, {"format": "svdquant_w4a4", "layout": "kitchen_tile_packed_w4a4"}, "x")
    assert tensors_equal(back, layer)


def test_comfy_native_awq_matches_kitchen_formula():
    """comfy-kitchen dequantizes w = (q − 8)·scale + zeros; ours is q·scale + zeros'. Both evaluated in fp32
    from the same stored bf16 scale and zeros: each side is 2-3 fp32 roundings of terms bounded by
    |q·s| + 8|s| + |z|, so they agree to 4·u times that."""
    g = torch.Generator().manual_seed(5)
    t = w4a16_to_comfy(fm.random_w4a16_layer(192, 128, g))
    layer = w4a16_from_comfy(t, decode_comfy_quant(t["comfy_quant"], "x"), "x")
    q = layer.codes.float()
    s = t["weight_scale"].float().t().repeat_interleave(64, dim=1)
    z = t["weight_zeros"].float().t().repeat_interleave(64, dim=1)
    kitchen = (q - 8) * s + z
    ours = reference.dequantize_w4a16(layer)
    assert torch.all((kitchen - ours).abs() <= 4 * U32 * (q * s + 8 * s.abs() + z.abs()))


def test_comfy_native_file_loads(pack, files, caplog):
    caplog.set_level(logging.WARNING)
    patcher = pack.load_svdquant_model(str(files["native"]))
    assert not [r for r in caplog.records if "unet missing" in r.message or "unet unexpected" in r.message]
    assert type(patcher.model.model_config).__name__ == "Flux"
    linears = _linears(patcher.model)
    assert linears["single_blocks.0.linear2"].parts[0].layer.K == 5 * 256
    out = patcher.model.apply_model(torch.randn(1, 16, 4, 4), torch.tensor([0.5]), c_crossattn=torch.randn(1, 3, 64),
                                    y=torch.randn(1, 32), guidance=torch.tensor([3.5]))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------------------------

def test_not_svdquant(pack, files):
    path = fm.write_flux_bfl(files["dir"] / "plain.safetensors", hidden=256)
    with pytest.raises(ValueError, match="not an SVDQuant checkpoint.*Load Diffusion Model"):
        pack.load_svdquant_model(str(path))


def test_truncated(pack, files):
    data = files["int4"].read_bytes()
    for n, what in ((len(data) // 2, "data cut"), (100, "header cut")):
        path = files["dir"] / f"truncated_{n}.safetensors"
        path.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=str(path)):
            pack.load_svdquant_model(str(path))


def test_unsupported_family(pack, files):
    path = fm.write_random_nunchaku_flux(files["dir"] / "sana.safetensors",
                                         model_class="NunchakuSanaTransformer2DModel", comfy_config=False)
    with pytest.raises(ValueError, match="NunchakuSanaTransformer2DModel.*not supported yet"):
        pack.load_svdquant_model(str(path))
