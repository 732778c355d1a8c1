"""LoRA on SVDQuant models through ComfyUI's own LoRA path (comfy.sd.load_lora_for_models, what LoraLoader and
LoraLoaderModelOnly call), ComfyUI imported in-process, tiny random models.

The oracle for what a patch should do is ComfyUI itself: comfy.lora.calculate_weight applied to a zero weight
gives the dense ΔW (and Δb) stock ComfyUI would add to an unquantized layer, offsets and alpha included. Each
quantized Linear's output change y_lora(x) − y_base(x) must equal x·ΔWᵀ + Δb up to fp32 rounding:

    both outputs run the same 4-bit term on the same activations (codes, scales, smoothing are shared, and the
    kernel's result for a column does not depend on the rank), so it cancels except for the roundings of the
    sums it enters. What remains is the low-rank branch (x·D)·Uᵀ over K inputs and R ranks in fp32, and the
    additions of the 4-bit term, the branch and the bias: |err| ≤ γ_{K+R+3}·(|x|·|D|·|U|ᵀ + |y_base| + |y_lora|)
    with γ_n = n·u/(1 − n·u), u = 2^-24, D and U the extended branch (|·| elementwise). For a W4A16 part the
    LoRA runs beside the layer in fp32: ≤ γ_{K+r+2}·(Σ_i |s_i|·|x|·|d_i|·|u_i|ᵀ + |y_base| + |y_lora|).
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

import flux_models as fm
import lora_files
from comfy_inprocess import pack_module

U = 2.0 ** -24


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


@pytest.fixture(scope="module")
def nodes():
    loader = pack_module("loader")
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    return {"loader": loader, "patcher": pack_module("model_patcher"), "patches": pack_module("lora_patches"),
            "ops": pack_module("ops"), "comfy_lora": comfy.lora, "sd": comfy.sd, "mm": comfy.model_management,
            "utils": comfy.utils}


# tiny: hidden 256, 2 double + 2 single blocks; full: the block count ComfyUI needs to recognise XLabs files
TINY = dict(hidden=256, depth=2, depth_single=2)
FULL = dict(hidden=128, depth=19, depth_single=38)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_models")
    return {"tiny": fm.write_random_nunchaku_flux(d / "tiny.safetensors", **TINY, seed=3),
            "full": fm.write_random_nunchaku_flux(d / "full.safetensors", **FULL, seed=4),
            "nvfp4": fm.write_random_nunchaku_flux(d / "nvfp4.safetensors", **TINY, precision="nvfp4", seed=5)}


_loaded = {}


@pytest.fixture(scope="module", autouse=True)
def _release():
    """Drop the module's patchers before the interpreter exits (ComfyUI's ModelPatcher.__del__ fails late in
    shutdown otherwise, noisily)."""
    yield
    import gc
    _loaded.clear()
    gc.collect()


def load(nodes, files, which: str):
    """One patcher per file for the module (loading the 57-block model takes a few seconds)."""
    if which not in _loaded:
        _loaded[which] = nodes["loader"].load_svdquant_model(str(files[which]))
    return _loaded[which]


def _quantized(patcher, nodes) -> dict:
    return dict(nodes["ops"].quantized_linears(patcher.model))


def _inputs(m, g, M=5):
    return torch.randn(M, m.in_features, generator=g)


def _magnitude(m, x) -> torch.Tensor:
    """|x|·|D|·|U|ᵀ summed over the active parts (W4A16 deltas: Σ|s|·|x|·|d|·|u|ᵀ)."""
    from nunchaku_core.linear import SVDQuantLinear
    parts = m.active_parts()
    xs = torch.split(x, [p.in_features for p in parts], dim=-1) if m.split == "in" else [x] * len(parts)
    outs = []
    for p, xp in zip(parts, xs):
        if isinstance(p, SVDQuantLinear):
            layer = p.layer
            mag = (xp.abs() @ layer.proj_down.float().abs()) @ layer.proj_up.float().abs().T
        elif getattr(p, "delta", None) is not None:
            mag = sum(abs(s) * (xp.abs() @ d.float().abs()) @ u.float().abs().T
                      for d, u, s in zip(p.delta.downs, p.delta.ups, p.delta.scales))
        else:
            mag = torch.zeros(xp.shape[0], p.out_features)
        outs.append(mag)
    return torch.cat(outs, dim=-1) if m.split == "out" else sum(outs)


def _rank(m) -> int:
    from nunchaku_core.linear import SVDQuantLinear
    return max([p.rank for p in m.active_parts() if isinstance(p, SVDQuantLinear)] +
               [sum(d.shape[1] for d in p.delta.downs) for p in m.active_parts() if getattr(p, "delta", None)] + [0])


def check_applied(nodes, patched, name: str, m, g) -> float:
    """The Linear's output change against ComfyUI's dense ΔW (module docstring); returns the max error ratio."""
    cl = nodes["comfy_lora"]
    N, K = m.out_features, m.in_features
    dW = cl.calculate_weight(patched.patches.get(f"{name}.weight", []), torch.zeros(N, K), f"{name}.weight")
    db = cl.calculate_weight(patched.patches.get(f"{name}.bias", []), torch.zeros(N), f"{name}.bias")
    x = _inputs(m, g)
    with torch.no_grad():
        y_lora = m(x).float()
        saved, m.lora_parts = m.lora_parts, None
        y_base = m(x).float()
        m.lora_parts = saved
    err = (y_lora - y_base - (x @ dW.T + db)).abs()
    tol = gamma(K + _rank(m) + 3) * (_magnitude(m, x) + y_base.abs() + y_lora.abs())
    assert torch.all(err <= tol), f"{name}: max error {err.max():.3g}, bound {tol.min():.3g}..{tol.max():.3g}"
    assert (x @ dW.T + db).abs().max() > 0, f"{name}: the LoRA does nothing"
    return float((err / tol).max())


def apply_lora(nodes, patcher, lora_sd, strength=0.8, caplog=None):
    patched, _ = nodes["sd"].load_lora_for_models(patcher, None, lora_sd, strength, 0)
    nodes["mm"].load_models_gpu([patched])
    return patched


@pytest.fixture(autouse=True)
def _unload(nodes):
    yield
    nodes["mm"].unload_all_models()


# ---------------------------------------------------------------------------------------------------------
# every format, every key
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(lora_files.FORMATS))
def test_every_format_applies_every_key(nodes, files, fmt, caplog):
    dims = FULL if fmt == "xlabs" else TINY
    patcher = load(nodes, files, "full" if fmt == "xlabs" else "tiny")
    lora_sd, expected = lora_files.FORMATS[fmt](**dims)
    caplog.set_level(logging.WARNING)
    patched = apply_lora(nodes, patcher, lora_sd)
    dropped = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()
               or "NOT LOADED" in r.getMessage() or "ERROR" in r.getMessage()]
    assert not dropped, f"{fmt}: {len(dropped)} LoRA keys dropped, e.g. {dropped[:3]}"
    # weight patches of Linears (0.33 names the q/k norm scales `.weight` too; bfl_control's norms are checked below)
    got = {k[len("diffusion_model."):-len(".weight")]: len(v) for k, v in patched.patches.items()
           if k.endswith(".weight") and isinstance(nodes["utils"].get_attr(patched.model, k[:-len(".weight")]),
                                                   torch.nn.Linear)}
    assert got == expected, f"{fmt}: patches per Linear differ: {set(got.items()) ^ set(expected.items())}"
    quantized = _quantized(patched, nodes)
    g = torch.Generator().manual_seed(0)
    n_quant = 0
    for key in patched.patches:
        name = key.rsplit(".", 1)[0]
        if name in quantized:
            assert quantized[name].lora_parts is not None, f"{fmt}: {name} has patches but no LoRA parts"
            check_applied(nodes, patched, name, quantized[name], g)
            n_quant += 1
        else:   # unquantized: ComfyUI's own path changed the weight
            assert key in patched.backup, f"{fmt}: {key} was not patched by ComfyUI"
    assert n_quant >= len([n for n in expected if n.startswith(("double_blocks", "single_blocks"))])
    if fmt == "bfl_control":   # bias diffs on quantized layers and norm scales replaced
        assert any(k.endswith(".bias") and k.rsplit(".", 1)[0] in quantized for k in patched.patches)
        norm = next(iter(patched.model.model_config.process_unet_state_dict({"single_blocks.0.norm.key_norm.scale": 0})))
        assert f"diffusion_model.{norm}" in patched.patches
    patched.unpatch_model()
    assert all(m.lora_parts is None for m in quantized.values())


def test_nvfp4_layers_take_loras(nodes, files):
    patcher = load(nodes, files, "nvfp4")
    lora_sd, _ = lora_files.kohya(**TINY)
    patched = apply_lora(nodes, patcher, lora_sd)
    g = torch.Generator().manual_seed(1)
    quantized = _quantized(patched, nodes)
    for name, m in quantized.items():
        check_applied(nodes, patched, name, m, g)


# ---------------------------------------------------------------------------------------------------------
# strength 0, removal, stacking, re-use
# ---------------------------------------------------------------------------------------------------------

def _outputs(patcher, nodes, seed=7) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name, m in _quantized(patcher, nodes).items():
            out[name] = m(_inputs(m, g))
    return out


def _bit_identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int32) if a[k].dtype == torch.float32 else a[k],
                                                    b[k].view(torch.int32) if b[k].dtype == torch.float32 else b[k])
                                        for k in a)


def test_strength_zero_and_removal_are_bit_identical(nodes, files):
    patcher = load(nodes, files, "tiny")
    nodes["mm"].load_models_gpu([patcher])
    before = _outputs(patcher, nodes)
    lora_sd, _ = lora_files.diffusers(**TINY)
    zero = apply_lora(nodes, patcher, lora_sd, strength=0.0)   # through add_patches (LoraLoader skips 0 itself)
    assert len(zero.patches) > 0
    assert _bit_identical(_outputs(zero, nodes), before)
    on = apply_lora(nodes, patcher, lora_sd, strength=1.0)
    assert not _bit_identical(_outputs(on, nodes), before)
    nodes["mm"].load_models_gpu([patcher])                     # back to the model without the LoRA
    assert all(m.lora_parts is None for m in _quantized(patcher, nodes).values())
    assert _bit_identical(_outputs(patcher, nodes), before)


def test_stacked_loras_and_changing_one_strength(nodes, files):
    """Two LoRAs (A on double blocks, B on single blocks, C on both) each with its own strength; changing B's
    strength rebuilds only the Linears B touches: the others keep the very same part objects."""
    patcher = load(nodes, files, "tiny")
    a, _ = lora_files.kohya(**TINY, seed=10, only=lambda n: n.startswith("double_blocks"))
    b, _ = lora_files.kohya(**TINY, seed=11, only=lambda n: n.startswith("single_blocks"))
    c, _ = lora_files.bfl(**TINY, seed=12)
    sd = nodes["sd"]
    with_a, _ = sd.load_lora_for_models(patcher, None, a, 0.7, 0)
    with_ac, _ = sd.load_lora_for_models(with_a, None, c, -0.4, 0)
    first, _ = sd.load_lora_for_models(with_ac, None, b, 1.0, 0)
    nodes["mm"].load_models_gpu([first])
    g = torch.Generator().manual_seed(2)
    quantized = _quantized(first, nodes)
    for name, m in quantized.items():
        check_applied(nodes, first, name, m, g)
        assert len(first.patches[f"{name}.weight"]) == 2     # C plus A or B
    parts_before = {n: m.lora_parts for n, m in quantized.items()}
    second, _ = sd.load_lora_for_models(with_ac, None, b, 0.3, 0)   # the same A and C patches, B at 0.3
    nodes["mm"].load_models_gpu([second])
    for name, m in quantized.items():
        same = all(x is y for x, y in zip(m.lora_parts, parts_before[name]))
        assert same == name.startswith("diffusion_model.double_blocks"), name
        check_applied(nodes, second, name, m, g)


# ---------------------------------------------------------------------------------------------------------
# bad LoRAs
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["sd15", "zimage"])
def test_other_family_lora_is_a_clear_error_and_changes_nothing(nodes, files, caplog, which):
    """None of the LoRA's tensors maps onto the model (ComfyUI's key maps; it logs 'lora key not loaded' for
    each and would render the unchanged model): LoRAError naming the LoRA's first tensors and the model's file;
    the model keeps no patch. At strength 0 nothing is asked of the model, and nothing is raised."""
    lora = lora_files.sd15_lora() if which == "sd15" else lora_files.zimage_lora()
    patcher = load(nodes, files, "tiny")
    nodes["mm"].load_models_gpu([patcher])
    before = _outputs(patcher, nodes)
    caplog.set_level(logging.WARNING)
    with pytest.raises(nodes["patches"].LoRAError) as e:
        nodes["sd"].load_lora_for_models(patcher, None, lora, 1.0, 0)
    warned = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(warned) == len(lora), warned
    first = next(iter(lora))
    msg = str(e.value)
    for fragment in (f"none of its {len(lora)} tensors (first: {first}", "maps onto a layer of this model, "
                     f"ComfyUI's Flux loaded from {files['tiny']}", "made for another model family", "Nothing was applied"):
        assert fragment in msg, (fragment, msg)
    assert patcher.patches == {}
    assert _bit_identical(_outputs(patcher, nodes), before)
    zero, _ = nodes["sd"].load_lora_for_models(patcher, None, lora, 0.0, 0)
    assert zero.patches == {}


def test_other_family_lora_partly_mapped_warns(nodes, files, caplog):
    """A Qwen-Image LoRA (its attention keys are FLUX.1's diffusers names) of the model's width, as diffusers saves
    it (transformer. prefix, which both hosts' FLUX.1 key maps know; 0.3.75's has no unprefixed diffusers names):
    ComfyUI maps the attention part and applies it, as stock ComfyUI does; one warning names how many tensors map
    onto nothing. A LoRA that maps whole gives no such line."""
    patcher = load(nodes, files, "tiny")
    caplog.set_level(logging.WARNING)
    lora = {f"transformer.{k}": v for k, v in lora_files.qwen_image_lora(hidden=TINY["hidden"]).items()}
    patched, _ = nodes["sd"].load_lora_for_models(patcher, None, lora, 1.0, 0)
    ours = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SVDQuant: LoRA")]
    assert len(ours) == 1, ours
    assert ("4 of its 20 tensors map onto no layer (first: transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A"
            in ours[0] and "ComfyUI's Flux loaded from" in ours[0]), ours
    assert {k for k in patched.patches} == {f"diffusion_model.double_blocks.0.{s}_attn.{n}.weight"
                                            for s in ("img", "txt") for n in ("qkv", "proj")}
    caplog.clear()
    nodes["sd"].load_lora_for_models(patcher, None, lora_files.kohya(**TINY)[0], 1.0, 0)
    assert not [r for r in caplog.records if r.getMessage().startswith("SVDQuant: LoRA")]


def test_shape_mismatch_is_a_clear_error_and_leaves_the_model(nodes, files):
    patcher = load(nodes, files, "tiny")
    nodes["mm"].load_models_gpu([patcher])
    before = _outputs(patcher, nodes)
    wrong, _ = lora_files.kohya(hidden=512, depth=1, depth_single=1)     # a LoRA for a wider FLUX
    with pytest.raises(nodes["patches"].LoRAError) as e:
        nodes["sd"].load_lora_for_models(patcher, None, wrong, 1.0, 0)
    msg = str(e.value)
    assert "lora_unet_" in msg and "[512" in msg and "another model" in msg and "Nothing was applied" in msg
    assert patcher.patches == {}
    nodes["mm"].load_models_gpu([patcher])
    assert _bit_identical(_outputs(patcher, nodes), before)


# ---------------------------------------------------------------------------------------------------------
# patches that are not low rank
# ---------------------------------------------------------------------------------------------------------

def _dense_patches(kind: str, N: int, K: int, g) -> dict:
    """A LoHa, LoKr, full diff or DoRA entry in a LoRA file for the key prefix 'X'."""
    r = 4
    if kind == "loha":
        return {"X.hada_w1_a": torch.randn(N, r, generator=g) * 0.1, "X.hada_w1_b": torch.randn(r, K, generator=g) * 0.1,
                "X.hada_w2_a": torch.randn(N, r, generator=g) * 0.1, "X.hada_w2_b": torch.randn(r, K, generator=g) * 0.1,
                "X.alpha": torch.tensor(float(r))}
    if kind == "lokr":
        return {"X.lokr_w1": torch.randn(4, 4, generator=g) * 0.1,
                "X.lokr_w2_a": torch.randn(N // 4, 2, generator=g) * 0.1,
                "X.lokr_w2_b": torch.randn(2, K // 4, generator=g) * 0.1}
    if kind == "diff":
        # a low-rank core plus a small full-rank part: compressible at the default energy
        lo = (torch.randn(N, 6, generator=g) @ torch.randn(6, K, generator=g)) * 0.01
        return {"X.diff": lo + torch.randn(N, K, generator=g) * 1e-5}
    if kind == "dora":
        return {"X.lora_up.weight": torch.randn(N, r, generator=g) * 0.1,
                "X.lora_down.weight": torch.randn(r, K, generator=g) * 0.1,
                "X.dora_scale": torch.rand(N, 1, generator=g) + 0.5}
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["loha", "lokr", "diff", "dora"])
def test_non_low_rank_patches_are_compressed_and_logged(nodes, files, kind, caplog):
    """ΔW from ComfyUI's own calculate_weight on the dequantized weight, compressed to the energy threshold:
    the output change is x·ΔWᵀ up to the compression error, ‖ΔW − ΔW_r‖_F ≤ (1 − energy)^½·‖ΔW‖_F. For random
    x (i.i.d. rows) ‖x·Eᵀ‖_F concentrates around ‖x‖·‖E‖_F/√K; we allow 3× the Frobenius bound, plus the fp32
    bound of check_applied."""
    patcher = load(nodes, files, "tiny")
    name = "double_blocks.0.img_mlp.0"
    N, K = 4 * TINY["hidden"], TINY["hidden"]
    g = torch.Generator().manual_seed(9)
    lora_sd = {k.replace("X", f"lora_unet_{name.replace('.', '_')}"): v for k, v in _dense_patches(kind, N, K, g).items()}
    caplog.set_level(logging.INFO, logger="SVDQuant")
    patched = apply_lora(nodes, patcher, lora_sd, strength=0.9)
    key = f"diffusion_model.{name}.weight"
    assert len(patched.patches[key]) == 1
    logged = [r.getMessage() for r in caplog.records if "compressed to rank" in r.getMessage()]
    assert len(logged) == 1 and name in logged[0], logged
    m = _quantized(patched, nodes)[f"diffusion_model.{name}"]
    from nunchaku_core import reference
    w = reference.effective_weight(m.parts[0].layer)
    dW = nodes["comfy_lora"].calculate_weight(patched.patches[key], w.clone(), key) - w
    x = torch.randn(64, K, generator=g)
    with torch.no_grad():
        delta = m(x).float() - m.parts[0](x).float()
    energy = nodes["patches"].ENERGY
    rel = (delta - x @ dW.T).norm() / (x @ dW.T).norm()
    assert rel <= 3 * math.sqrt(1 - energy) + 1e-4, f"{kind}: relative error {rel:.4g}"


def test_uncompressible_patch_is_a_clear_error(nodes, files, monkeypatch):
    """A full-rank random difference at energy 0.999 needs nearly full rank: more than the kernels' rank limit
    would allow is refused with the layer named; the model is not changed."""
    patches = nodes["patches"]
    patcher = load(nodes, files, "tiny")
    nodes["mm"].load_models_gpu([patcher])
    before = _outputs(patcher, nodes)
    monkeypatch.setattr(patches.cpu_packing, "MAX_RANK", 64)
    g = torch.Generator().manual_seed(4)
    lora_sd = {"lora_unet_double_blocks_0_img_mlp_0.diff": torch.randn(1024, 256, generator=g)}
    patched, _ = nodes["sd"].load_lora_for_models(patcher, None, lora_sd, 1.0, 0)
    with pytest.raises(patches.LoRAError, match="double_blocks.0.img_mlp.0.*needs rank"):
        nodes["mm"].load_models_gpu([patched])
    assert all(m.lora_parts is None for m in _quantized(patcher, nodes).values())
    nodes["mm"].unload_all_models()
    nodes["mm"].load_models_gpu([patcher])
    assert _bit_identical(_outputs(patcher, nodes), before)
