"""ComfyUI's partial ("lowvram") loading and its dynamic-VRAM setting on SVDQuant models, ComfyUI in-process
(CPU), tiny random FLUX.1 model.

What the CPU can exercise: ModelPatcher.load / patch_model with a small lowvram_model_memory, so ComfyUI marks
modules for per-call casting (comfy_cast_weights, LowVramPatch weight functions for LoRA keys), and
partially_unload / partially_load. Outputs must be bit-identical to a full load, with and without a LoRA: a
quantized Linear computes from its 4-bit parts whatever ComfyUI decided for the module, and its LoRA is joined
to those parts at load in both modes. The sizes ComfyUI budgets with are the quantized parts' real bytes.

What only a GPU exercises (not run here): the load and offload devices differing, so an offloaded quantized
Linear copies its parts to the input's device per call (nodes/ops.py _parts_for); ModelPatcherDynamic's own
load (comfy_aimdo's VBAR on a CUDA device; on a CPU load device ComfyUI itself builds a classic ModelPatcher).
Under a dynamic-VRAM ComfyUI, our loaders keep returning the classic-loading SVDQuantModelPatcher (dynamic
loading streams ComfyUI's own weight tensors through comfy.ops.cast_bias_weight, which 4-bit parts do not go
through), which ComfyUI runs beside its dynamic patchers; the test below forces that setting as main.py does.
"""
from __future__ import annotations

import gc

import pytest
import torch

import flux_models as fm
import lora_files
from comfy_inprocess import pack_module

TINY = dict(hidden=256, depth=2, depth_single=2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    loader = pack_module("loader")
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    path = fm.write_random_nunchaku_flux(tmp_path_factory.mktemp("partial") / "tiny.safetensors", **TINY, seed=21)
    yield {"loader": loader, "ops": pack_module("ops"), "mm": comfy.model_management, "mp": comfy.model_patcher,
           "sd": comfy.sd, "path": str(path)}
    comfy.model_management.unload_all_models()
    gc.collect()


def _inputs(model, seed=0):
    p = model.diffusion_model.params
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(1, p.in_channels, 8, 8, generator=g), timestep=torch.tensor([0.7]),
                context=torch.randn(1, 5, p.context_in_dim, generator=g), y=torch.randn(1, p.vec_in_dim, generator=g),
                guidance=torch.tensor([3.5]))


def _forward(patcher) -> torch.Tensor:
    model = patcher.model
    dtype = model.get_dtype() if model.manual_cast_dtype is None else model.manual_cast_dtype
    kw = {k: v.to(dtype) for k, v in _inputs(model).items()}
    with torch.no_grad():
        return model.diffusion_model(**kw).float()


def _full(env, patcher) -> torch.Tensor:
    env["mm"].unload_all_models()
    env["mm"].load_models_gpu([patcher])
    out = _forward(patcher)
    env["mm"].unload_all_models()
    return out


def _lowvram(env, patcher, budget: int):
    """The model loaded with `budget` bytes for weights: ComfyUI's partial load."""
    env["mm"].unload_all_models()
    cpu = torch.device("cpu")
    patcher.patch_model(cpu, lowvram_model_memory=budget)
    try:
        # modules ComfyUI left offloaded (it marks them so, to restore their cast setting at unpatch)
        cast = [n for n, m in patcher.model.named_modules() if hasattr(m, "prev_comfy_cast_weights")]
        quantized = {n for n, _ in env["ops"].quantized_linears(patcher.model)}
        out = _forward(patcher)
        lora_joined = [n for n, m in env["ops"].quantized_linears(patcher.model) if m.lora_parts is not None]
    finally:
        patcher.unpatch_model(cpu)
    return out, cast, quantized, lora_joined


def test_lowvram_partial_load_matches_full_load(env):
    patcher = env["loader"].load_svdquant_model(env["path"])
    full = _full(env, patcher)
    out, cast, quantized, _ = _lowvram(env, patcher, budget=patcher.model_size() // 2)
    assert patcher.model.model_lowvram is False     # unpatched again
    assert cast and set(cast) & quantized, "ComfyUI offloaded no quantized Linear: the budget tests nothing"
    assert len(set(cast) & quantized) < len(quantized), "nothing fitted: the budget tests only one side"
    assert torch.equal(out, full), f"lowvram output differs from the full load by {(out - full).abs().max():.3g}"


def test_lowvram_partial_load_with_lora_matches_full_load(env):
    # fp32 unquantized layers: a full load adds ComfyUI's LoRA to their stored weights (rounded to the storage
    # dtype), a partial load per call in fp32; only in fp32 storage are both the same bits (README, LoRA)
    patcher = env["loader"].load_svdquant_model(env["path"], torch.float32)
    base = _full(env, patcher)
    lora_sd, _ = lora_files.kohya(**TINY, seed=22)
    patched, _ = env["sd"].load_lora_for_models(patcher, None, lora_sd, 0.9, 0)
    full = _full(env, patched)
    assert not torch.equal(full, base), "the LoRA changed nothing"
    out, cast, quantized, joined = _lowvram(env, patched, budget=1)     # everything offloaded
    assert quantized <= set(cast)
    assert set(joined) == quantized, "a quantized Linear ran without its LoRA under lowvram"
    assert torch.equal(out, full), f"lowvram + LoRA differs from the full load by {(out - full).abs().max():.3g}"
    assert torch.equal(_full(env, patcher), base), "removing the LoRA is not bit-identical"


def test_partially_unload_and_load_again(env):
    patcher = env["loader"].load_svdquant_model(env["path"], torch.float32)   # fp32: as in the test above
    lora_sd, _ = lora_files.bfl(**TINY, seed=23)
    patched, _ = env["sd"].load_lora_for_models(patcher, None, lora_sd, 0.6, 0)
    full = _full(env, patched)
    env["mm"].load_models_gpu([patched])
    cpu = torch.device("cpu")
    freed = patched.partially_unload(cpu, memory_to_free=patched.model_size() // 2)
    assert freed > 0
    assert torch.equal(_forward(patched), full)
    patched.partially_load(cpu, extra_memory=patched.model_size())
    assert torch.equal(_forward(patched), full)
    env["mm"].unload_all_models()


def test_budget_counts_the_quantized_bytes(env):
    """ComfyUI's per-module sizes (ModelPatcher._load_list) and model size are the 4-bit parts' real bytes,
    not the dense placeholders' (a quarter or less of bf16)."""
    patcher = env["loader"].load_svdquant_model(env["path"])
    ops = env["ops"]
    quantized = dict(ops.quantized_linears(patcher.model))
    seen = 0
    for *keys, mem, name, module, params in patcher._load_list():
        if name in quantized:
            assert mem == ops.quantized_nbytes(module)
            assert mem < module.out_features * module.in_features * 2, (name, mem)   # < bf16 even at width 256
            seen += 1
    assert seen == len(quantized)
    dense = sum(t.nelement() * t.element_size() for t in patcher.model.state_dict().values())
    assert patcher.model_size() < dense


def test_dynamic_vram_setting_keeps_the_classic_patcher(env, monkeypatch):
    """main.py turns dynamic VRAM on by replacing comfy.model_patcher.CoreModelPatcher with ModelPatcherDynamic
    (0.33+, default on NVIDIA with torch >= 2.8). Forced here: the loader still returns SVDQuantModelPatcher, a
    classic ModelPatcher, whose LoRA joins and whose output is unchanged."""
    mp = env["mp"]
    dynamic = getattr(mp, "ModelPatcherDynamic", None)
    if dynamic is not None:
        monkeypatch.setattr(mp, "CoreModelPatcher", dynamic)
    reference = _full(env, env["loader"].load_svdquant_model(env["path"]))
    patcher = env["loader"].load_svdquant_model(env["path"])
    assert type(patcher).__name__ == "SVDQuantModelPatcher"
    assert not getattr(patcher, "is_dynamic", lambda: False)()   # is_dynamic: 0.33+
    assert torch.equal(_full(env, patcher), reference)
    lora_sd, _ = lora_files.kohya(**TINY, seed=24)
    patched, _ = env["sd"].load_lora_for_models(patcher, None, lora_sd, 1.0, 0)
    assert type(patched) is type(patcher)
    env["mm"].load_models_gpu([patched])
    assert all(m.lora_parts is not None for _, m in env["ops"].quantized_linears(patched.model))
    assert not torch.equal(_forward(patched), reference)
    env["mm"].unload_all_models()
