"""The any-family quantizer (nunchaku_core/quantize/model.py) and its policy table (nunchaku_core/models/policies.py)
on a small random FLUX.1 in ComfyUI's key names: the plan, the comfy-native output (read back by the same reader
the loader uses), the copied tensors, the report and the refusals."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import flux_models as fm
from nunchaku_core import reference
from nunchaku_core.formats.comfy_native import ComfyNativeCheckpoint
from nunchaku_core.models import policies
from nunchaku_core.quantize.flux import QuantizeOptions
from nunchaku_core.quantize.model import ModelSourceError, plan_file, quantize_model

SHAPES = fm.flux_shapes(256, 1, 1, 64, 32, True)
LINEARS = {k[:-len(".weight")]: s for k, s in SHAPES.items() if k.endswith(".weight") and len(s) == 2}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("qm") / "flux.safetensors"
    save_file(fm.random_state_dict(SHAPES, std=0.02, seed=1), str(path))
    return path


def test_flux_policy_plan():
    assert policies.family_of(SHAPES) == "flux"
    plan = policies.plan(LINEARS, "flux")
    w4a4 = set(plan.of("w4a4"))
    assert w4a4 == {f"double_blocks.0.{s}_{m}" for s in ("img", "txt") for m in ("attn.qkv", "attn.proj", "mlp.0",
                                                                                 "mlp.2")} \
        | {"single_blocks.0.linear1", "single_blocks.0.linear2"}
    assert {n for n in w4a4 if plan.decisions[n].shifted} == {"double_blocks.0.img_mlp.2", "double_blocks.0.txt_mlp.2"}
    assert set(plan.of("w4a16")) == {"double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin",
                                     "single_blocks.0.modulation.lin"}
    assert "img_in" in plan.of("keep") and "final_layer.adaLN_modulation.1" in plan.of("keep")


def test_default_rule():
    plan = policies.plan({**LINEARS, "blocks.0.tiny": (64, 128), "blocks.1.odd": (512, 300)}, "default")
    d = plan.decisions
    assert d["double_blocks.0.img_attn.qkv"].kind == "w4a4" and not d["double_blocks.0.img_mlp.2"].shifted
    assert d["double_blocks.0.img_mod.lin"].kind == "w4a16" and d["single_blocks.0.modulation.lin"].kind == "w4a16"
    assert d["img_in"].kind == "keep" and "outside" in d["img_in"].reason
    assert d["blocks.0.tiny"].kind == "keep" and "64 < 256" in d["blocks.0.tiny"].reason
    assert d["blocks.1.odd"].kind == "keep" and "multiple of the group size" in d["blocks.1.odd"].reason
    with pytest.raises(ValueError, match="no quantization policy for model family 'nosuch'"):
        policies.plan(LINEARS, "nosuch")


def test_quantize_any_family_to_comfy_native(source, tmp_path):
    out = tmp_path / "q.safetensors"
    steps = []
    res = quantize_model(source, out, options=QuantizeOptions(rank=16), progress=lambda d, t, w: steps.append((d, t)))
    assert steps[-1][0] == steps[-1][1] == 10 + 3 + 1
    ck = ComfyNativeCheckpoint(str(out))
    plan, _ = plan_file(source)
    assert set(ck.layer_names()) == set(plan.of("w4a4")) | set(plan.of("w4a16"))
    src = fm.random_state_dict(SHAPES, std=0.02, seed=1)
    for name in plan.of("w4a4"):
        layer = ck.layer(name)
        assert layer.shifted == plan.decisions[name].shifted and layer.proj_down.shape[1] == 16
        w = src[f"{name}.weight"].float()
        err = (reference.effective_weight(layer) - w).norm() / w.norm()
        assert err < 0.25, f"{name}: relative weight error {err:.3f}"      # INT4 on N(0, 0.02): ~0.1
    with safe_open(str(out), "pt") as f:
        for key in ck.plain_tensor_names():                                  # copied as stored, bit for bit
            assert torch.equal(f.get_tensor(key), src[key]), key
        info = json.loads(f.metadata()["svdquant_quantizer"])
    assert info["family"] == "flux" and info["layers"] == {"w4a4": 10, "w4a16": 3, "kept": 10}
    report = json.loads(res.report_path.read_text())
    assert set(report["info"]["kept"]) == set(plan.of("keep"))
    assert {r["layer"] for r in report["layers"]} == set(plan.of("w4a4"))


@pytest.mark.parametrize("variant,alphas", [("naive", (1.0,)), ("smoothing only", None)])
def test_rank_0_variants_round_trip(source, tmp_path, variant, alphas):
    """The ablation variants bench/bench_family_quality.py writes, in QuantizeOptions: rank 0 (no low-rank branch)
    with alphas (1.0,) (s = 1: naive W4A4) or the default α grid (smoothing only). Read back by the loader's reader
    with an empty low-rank branch; the residual is the whole weight, so the error is plain 4-bit RTN's."""
    out = tmp_path / "q.safetensors"
    quantize_model(source, out, options=QuantizeOptions(rank=0, alphas=alphas, report=False))
    ck = ComfyNativeCheckpoint(str(out))
    src = fm.random_state_dict(SHAPES, std=0.02, seed=1)
    plan, _ = plan_file(source)
    for name in plan.of("w4a4"):
        layer = ck.layer(name)
        assert layer.proj_down.shape[1] == 0 and layer.proj_up.shape[1] == 0, name
        if variant == "naive":
            assert bool((layer.smooth.float() == 1).all()), f"{name}: naive W4A4 has a smoothing vector"
        w = src[f"{name}.weight"].float()
        err = (reference.effective_weight(layer) - w).norm() / w.norm()
        assert err < 0.25, f"{name}: relative weight error {err:.3f}"      # INT4 RTN on N(0, 0.02): ~0.1


def test_checkpoint_prefix_is_dropped(tmp_path):
    sd = {f"model.diffusion_model.{k}": v for k, v in fm.random_state_dict(SHAPES, std=0.02, seed=2).items()}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)   # a VAE tensor: not ours to copy
    # an fp8-scaled text encoder beside the unquantized model does not make the model "already quantized"
    sd["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight_scale"] = torch.ones(())
    src = tmp_path / "ckpt.safetensors"
    save_file(sd, str(src))
    quantize_model(src, tmp_path / "q.safetensors", options=QuantizeOptions(rank=8, report=False))
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "img_in.weight" in keys and not any(k.startswith(("model.", "first_stage")) for k in keys)


def test_refusals(source, tmp_path):
    out = tmp_path / "q.safetensors"
    quantize_model(source, out, options=QuantizeOptions(rank=8, report=False))
    with pytest.raises(ModelSourceError, match="already quantized"):
        quantize_model(out, tmp_path / "again.safetensors")
    with pytest.raises(ValueError, match="INT4 only"):
        quantize_model(source, tmp_path / "n.safetensors", options=QuantizeOptions(precision="nvfp4"))
    save_file({"x.weight": torch.zeros(3)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(ModelSourceError, match="no Linear weights"):
        quantize_model(tmp_path / "none.safetensors", tmp_path / "n2.safetensors")
    assert not (tmp_path / "n.safetensors").exists() and not (tmp_path / "n2.safetensors").exists()


# family_models' family -> the policy family (one Wan policy for 2.1 and 2.2)
POLICY_FAMILY = {"wan21_t2v": "wan", "wan22_t2v": "wan"}
# Where a family's policy departs from the role rule of test_family_policies_follow_the_linear_roles, and why
# (each policy's notes say it at length): name pattern (fnmatch) -> decision
ROLE_EXCEPTIONS = {
    "sdxl": {"*.attn2.to_[kv]": "w4a16",       # the text encoders' raw hidden states, few tokens
             "*.emb_layers.1": "keep"},         # ResBlock Linears: only the SpatialTransformers' blocks are quantized
}


@pytest.mark.parametrize("family", ["qwen_image", "zimage", "flux2", "sd3", "chroma", "pixart_sigma", "wan21_t2v",
                                    "wan22_t2v", "sdxl"])
def test_family_policies_follow_the_linear_roles(family):
    """Each family's policy against the roles tests/family_models.py reads from ComfyUI's model code: attention
    (cross-attention included) and MLP Linears W4A4 (the MLP output shifted only when its whole input is a GELU:
    not SDXL's GEGLU product), per-block or shared modulation W4A16, the embedders, final layers, the final
    layer's modulation, Chroma's approximator and SDXL's proj_in / proj_out 16-bit (as for FLUX.1); the
    departures in ROLE_EXCEPTIONS."""
    import fnmatch
    import family_models as fam
    shapes = fam.family_shapes(family)
    assert policies.family_of(shapes) == POLICY_FAMILY.get(family, family)
    linears = {k[:-len(".weight")]: s for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2}
    plan = policies.plan(linears, POLICY_FAMILY.get(family, family))
    final_mod = {"norm_out.linear", "final_layer.adaLN_modulation.1"}
    for name, role, feeder, *_ in fam.linear_layers(family, shapes):
        d = plan.decisions[name]
        want = ("w4a4" if role in ("qkv", "attn_out", "mlp_in", "mlp_out") else
                "w4a16" if role == "mod" and name not in final_mod else "keep")
        want = next((v for p, v in ROLE_EXCEPTIONS.get(family, {}).items() if fnmatch.fnmatchcase(name, p)), want)
        assert d.kind == want, f"{family}: {name} ({role}, fed by {feeder}) is {d.kind}: {d.reason}"
        assert d.shifted == (role == "mlp_out" and feeder.startswith("GELU")), f"{family}: {name} shift"


def test_paper_family_plans():
    """The five families of issue 17, Linear by Linear on their smallest models (which Linear gets what)."""
    import family_models as fam

    def plan_of(family, **dims):
        shapes = fam.family_shapes(family, **dims)
        linears = {k[:-len(".weight")]: s for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2}
        p = policies.plan(linears, policies.family_of(shapes))
        return {n: (d.kind, d.shifted) for n, d in p.decisions.items()}

    W, S, A, K = ("w4a4", False), ("w4a4", True), ("w4a16", False), ("keep", False)
    sd3 = plan_of("sd3", depth=2, x_block_self_attn_layers=(0,))
    assert sd3 == {"t_embedder.mlp.0": K, "t_embedder.mlp.2": K, "y_embedder.mlp.0": K, "y_embedder.mlp.2": K,
                   "context_embedder": K,
                   **{f"joint_blocks.0.{h}.{n}": v for h in ("context_block", "x_block")
                      for n, v in (("attn.qkv", W), ("attn.proj", W), ("mlp.fc1", W), ("mlp.fc2", S),
                                   ("adaLN_modulation.1", A))},
                   "joint_blocks.0.x_block.attn2.qkv": W, "joint_blocks.0.x_block.attn2.proj": W,
                   "joint_blocks.1.context_block.attn.qkv": W, "joint_blocks.1.context_block.adaLN_modulation.1": A,
                   **{f"joint_blocks.1.x_block.{n}": v for n, v in (("attn.qkv", W), ("attn.proj", W), ("mlp.fc1", W),
                                                                   ("mlp.fc2", S), ("adaLN_modulation.1", A))},
                   "final_layer.linear": K, "final_layer.adaLN_modulation.1": K}
    chroma = plan_of("chroma", depth=1, depth_single=1)
    assert {n: v for n, v in chroma.items() if not n.startswith("distilled_guidance_layer.layers.")} == {
        "img_in": K, "txt_in": K, "distilled_guidance_layer.in_proj": K, "distilled_guidance_layer.out_proj": K,
        **{f"double_blocks.0.{s}_{n}": v for s in ("img", "txt")
           for n, v in (("attn.qkv", W), ("attn.proj", W), ("mlp.0", W), ("mlp.2", S))},
        "single_blocks.0.linear1": W, "single_blocks.0.linear2": W, "final_layer.linear": K}
    assert {v for n, v in chroma.items() if n.startswith("distilled_guidance_layer.layers.")} == {K}
    assert plan_of("pixart_sigma") == {
        "t_embedder.mlp.0": K, "t_embedder.mlp.2": K, "t_block.1": A, "y_embedder.y_proj.fc1": K,
        "y_embedder.y_proj.fc2": K, "blocks.0.attn.qkv": W, "blocks.0.attn.proj": W, "blocks.0.cross_attn.q_linear": W,
        "blocks.0.cross_attn.kv_linear": W, "blocks.0.cross_attn.proj": W, "blocks.0.mlp.fc1": W,
        "blocks.0.mlp.fc2": S, "final_layer.linear": K}
    for family in ("wan21_t2v", "wan22_t2v"):
        assert plan_of(family) == {
            "text_embedding.0": K, "text_embedding.2": K, "time_embedding.0": K, "time_embedding.2": K,
            "time_projection.1": A, **{f"blocks.0.{a}.{p}": W for a in ("self_attn", "cross_attn") for p in "qkvo"},
            "blocks.0.ffn.0": W, "blocks.0.ffn.2": S, "head.head": K}
    sdxl = plan_of("sdxl")
    block = "input_blocks.4.1.transformer_blocks.0"
    assert {n[len(block) + 1:]: v for n, v in sdxl.items() if n.startswith(block + ".")} == {
        "attn1.to_q": W, "attn1.to_k": W, "attn1.to_v": W, "attn1.to_out.0": W, "attn2.to_q": W,
        "attn2.to_k": A, "attn2.to_v": A, "attn2.to_out.0": W, "ff.net.0.proj": W, "ff.net.2": W}
    assert sum(n.split(".transformer_blocks.")[0] != n for n in sdxl) == 24 * 10
    assert {v for n, v in sdxl.items() if ".transformer_blocks." not in n} == {K}      # proj_in/out, ResBlocks, embedders


def test_family_detection_does_not_collide():
    """Each family's smallest model is detected as its own policy (Chroma and FLUX.2 carry FLUX.1's detect keys
    too: they come first), and FLUX.1's as FLUX.1."""
    import family_models as fam
    got = {f: policies.family_of(fam.family_shapes(f)) for f in fam.FAMILIES}
    assert got == {f: POLICY_FAMILY.get(f, f) for f in fam.FAMILIES}
    assert policies.family_of(SHAPES) == "flux"


# Reduced widths of the families whose ComfyUI-detectable sizes are forced (380 M / 900 M parameters): the
# policies match key names, so the quantizer treats these as the families they are named after.
# family -> (family_models constants to reduce, write_random_model dims)
REDUCED = {"zimage": ({"ZIMAGE_DIM": 256, "ZIMAGE_FFN": 512}, {}),
           "qwen_image": ({"QWEN_HIDDEN": 256, "QWEN_JOINT_DIM": 256}, {}),
           "flux2": ({}, {"hidden": 128, "depth_single": 1})}


@pytest.mark.parametrize("family", ["zimage", "qwen_image", "flux2"])
def test_calibrated_any_family(family, tmp_path, monkeypatch):
    """A calibration recorded on a family's model (quantize/calibration.py's recorder on a module tree with the
    file's names, fed outlier-heavy inputs) drives quantize_model with GPTQ: the file names the calibration, every
    W4A4 layer's smoothing strength comes from the calibrated grid (or none won), and SVDQuant beats naive W4A4 on
    the recorded activations by far. A calibration of another model, or one that misses a layer, is refused naming
    the file and the Linear. The family's key names at reduced widths (REDUCED; ComfyUI's detection is not
    involved here: tests/comfy/test_family_calibration.py records in a real sampling run at the detected sizes)."""
    import family_models as fam
    from nunchaku_core.quantize import svdquant
    from nunchaku_core.quantize.calibration import CalibrationError, recorder_for_module
    from test_quantize_flux import bfl_modules
    constants, dims = REDUCED[family]
    for name, value in constants.items():
        monkeypatch.setattr(fam, name, value)
    src = tmp_path / f"{family}.safetensors"
    fam.write_random_model(family, src, seed=2, **dims)
    assert fam.param_count(fam.family_shapes(family, **dims)) < 20_000_000
    with safe_open(str(src), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}

    def record(state_dict, path, skip=()):
        module = bfl_modules(state_dict)
        rec = recorder_for_module(module, max_rows=96)
        assert rec.family == family
        rec.attach(module)
        mods, g = dict(module.named_modules()), torch.Generator().manual_seed(0)
        for name in rec.names:
            if name in skip:
                continue
            x = torch.randn(128, mods[name].in_features, generator=g)
            x[:, :3] *= 30                                                  # outlier channels, as real DiTs have
            mods[name](x)
        rec.detach()
        return rec.save(path)

    cal = record(sd, tmp_path / "cal.safetensors")
    out = tmp_path / "q.safetensors"
    res = quantize_model(src, out, options=QuantizeOptions(rank=16, gptq=True), calib_path=cal)
    info = json.loads(ComfyNativeCheckpoint(str(out)).metadata["svdquant_quantizer"])
    assert info["calibration"] == "cal.safetensors" and info["gptq"] is True
    rows = [r for r in res.layers if r["type"] == "w4a4"]
    assert all(r["alpha"] in set(svdquant.ALPHAS_CALIBRATED) | {None} for r in rows)
    mean = {v: sum(r[f"err_{v}"] for r in rows) / len(rows) for v in ("naive", "svdquant")}
    assert mean["svdquant"] < 0.5 * mean["naive"], mean

    other = record({k: v + 1 if v.dim() == 2 else v for k, v in sd.items()}, tmp_path / "other.safetensors")
    with pytest.raises(CalibrationError, match=r"other.safetensors: calibration recorded on a model with other weights"):
        quantize_model(src, tmp_path / "o.safetensors", calib_path=other)
    first = sorted(rows, key=lambda r: r["layer"])[0]["layer"]
    partial = record(sd, tmp_path / "partial.safetensors", skip=(first,))
    with pytest.raises(CalibrationError, match=rf"partial.safetensors: has no statistics for {first}"):
        quantize_model(src, tmp_path / "p.safetensors", calib_path=partial)
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "p.safetensors").exists()
