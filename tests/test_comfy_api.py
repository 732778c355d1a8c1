"""One test per ComfyUI internal the pack relies on (README.md, "ComfyUI APIs we rely on"; nodes/comfy_api.py),
against the ComfyUI these tests run with ($SVDQ_COMFYUI). When ComfyUI changes one of them, its test fails
naming the API and what changed, before the end-to-end tests fail somewhere downstream.

Each check probes what the pack does with the API (a call on small inputs, a signature, an attribute), not a
version number.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from comfy_inprocess import import_pack, pack_module
from flux_models import flux_shapes


@pytest.fixture(scope="module")
def comfy():
    import_pack()
    import comfy.lora
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.patcher_extension
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.utils
    import comfy.weight_adapter
    import folder_paths
    return {"lora": comfy.lora, "model_base": comfy.model_base, "detection": comfy.model_detection,
            "mm": comfy.model_management, "patcher": comfy.model_patcher, "ops": comfy.ops,
            "ext": comfy.patcher_extension, "sd": comfy.sd, "base": comfy.supported_models_base,
            "flux_te": comfy.text_encoders.flux, "utils": comfy.utils, "adapter": comfy.weight_adapter,
            "folder_paths": folder_paths}


def takes(fn, *names) -> list:
    """The parameter names among `names` that `fn` does not accept (by name or through **kwargs)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    return [n for n in names if n not in params]


def api(name: str, ok: bool, what: str) -> None:
    assert ok, f"ComfyUI API {name}: {what}"


def _flux_meta_state_dict(hidden=256, guidance=True) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in flux_shapes(hidden, 1, 1, 64, 32, guidance).items()}


# ---- building the model ----------------------------------------------------------------------------------

def test_detect_unet_config(comfy):
    """nodes/comfy_api.unet_config: FLUX's config from the dense shapes of a quantized state dict (meta tensors)."""
    name = "comfy.model_detection.detect_unet_config(state_dict, key_prefix)"
    cfg = comfy["detection"].detect_unet_config(_flux_meta_state_dict(), "")
    api(name, isinstance(cfg, dict) and cfg.get("image_model") == "flux", f"returned {cfg!r} for a FLUX.1 state dict")
    api(name, cfg.get("hidden_size") == 256 and cfg.get("depth") == 1 and cfg.get("guidance_embed") is True,
        f"no longer reads hidden_size/depth/guidance_embed from the shapes: {cfg}")


def test_model_config_from_unet_config(comfy):
    """nodes/comfy_api.model_config_from_unet_config: ComfyUI's supported-model class for the config."""
    name = "comfy.model_detection.model_config_from_unet_config(unet_config, state_dict)"
    sd = _flux_meta_state_dict(guidance=False)
    cfg = {**comfy["detection"].detect_unet_config(sd, ""), "num_heads": 2, "axes_dim": [16, 56, 56]}
    mc = comfy["detection"].model_config_from_unet_config(cfg, sd)
    api(name, type(mc).__name__ == "FluxSchnell", f"picked {type(mc).__name__} for FLUX.1 without guidance_in")
    for attr in ("set_inference_dtype", "get_model", "supported_inference_dtypes", "custom_operations",
                 "unet_config", "process_unet_state_dict"):
        api(f"comfy.supported_models_base.BASE.{attr}", hasattr(mc, attr), "missing (the loader sets or calls it)")
    api("comfy.supported_models_base.BASE.set_inference_dtype(dtype, manual_cast_dtype)",
        not takes(type(mc).set_inference_dtype, "dtype", "manual_cast_dtype"), "signature changed")


def test_base_model_loading_and_saving_hooks(comfy):
    """BaseModel.load_model_weights(sd, unet_prefix) loads our state dict through the custom operations;
    state_dict_for_saving is what ComfyUI's save nodes write (nodes/comfy_api.refuse_state_dict_for_saving)."""
    BaseModel = comfy["model_base"].BaseModel
    api("comfy.model_base.BaseModel.load_model_weights(sd, unet_prefix)",
        not takes(BaseModel.load_model_weights, "sd", "unet_prefix"), "signature changed")
    api("comfy.model_base.BaseModel.state_dict_for_saving", callable(getattr(BaseModel, "state_dict_for_saving", None)),
        "missing: the save refusal hooks it")
    src = inspect.getsource(comfy["sd"].save_checkpoint)
    api("comfy.sd.save_checkpoint", "state_dict_for_saving" in src,
        "no longer writes state_dict_for_saving(): the save refusal (nodes/comfy_api.py) would not be reached")


def test_dtype_choice(comfy):
    """nodes/loader.py picks dtypes as comfy.sd.load_diffusion_model_state_dict does."""
    mm = comfy["mm"]
    missing = takes(mm.unet_dtype, "model_params", "supported_dtypes", "weight_dtype")
    api("comfy.model_management.unet_dtype(model_params=, supported_dtypes=, weight_dtype=)", not missing,
        f"no longer takes {missing}")
    cpu = torch.device("cpu")
    api("comfy.model_management.unet_manual_cast(dtype, device, supported_dtypes)",
        mm.unet_manual_cast(torch.float32, cpu, [torch.bfloat16, torch.float32]) is None,
        "asks for a manual cast of fp32 on the CPU")
    for fn in ("get_torch_device", "unet_offload_device", "text_encoder_offload_device",
               "throw_exception_if_processing_interrupted", "load_models_gpu"):
        api(f"comfy.model_management.{fn}", callable(getattr(mm, fn, None)), "missing")
    api("comfy.model_management.current_loaded_models", isinstance(getattr(mm, "current_loaded_models", None), list),
        "missing or not a list (nodes/text_encoder._unload takes the replaced CLIP patcher out of it)")


# ---- custom operations ---------------------------------------------------------------------------------------

def test_custom_operations_base_classes(comfy):
    """nodes/ops.py: our Linear subclasses ComfyUI's op Linears; stock weights take ComfyUI's own forward."""
    ops = comfy["ops"]
    for cls in ("disable_weight_init", "manual_cast"):
        lin = getattr(getattr(ops, cls, None), "Linear", None)
        api(f"comfy.ops.{cls}.Linear", isinstance(lin, type) and issubclass(lin, torch.nn.Linear),
            "missing or not a torch.nn.Linear")
        api(f"comfy.ops.{cls}.Linear.comfy_cast_weights", hasattr(lin, "comfy_cast_weights"),
            "missing: ComfyUI's partial loading recognises cast-capable modules by it")
    api("comfy.ops.run_every_op", callable(getattr(ops, "run_every_op", None)),
        "missing (our quantized forward calls it so ComfyUI can interrupt between layers)")
    Linear = pack_module("ops").SVDQuantCastOps.Linear
    m = Linear(8, 4, bias=True, dtype=torch.bfloat16)
    m.load_state_dict({"weight": torch.ones(4, 8), "bias": torch.zeros(4)})
    y = m(torch.ones(2, 8))
    api("comfy.ops.manual_cast.Linear.forward", y.dtype == torch.float32 and torch.all(y == 8),
        f"a bf16-stored Linear cast to the fp32 input gave {y.dtype} {y.flatten()[:4]}")


# ---- the ModelPatcher subclass -------------------------------------------------------------------------------

OVERRIDDEN = {   # method -> parameters nodes/model_patcher.py relies on (names, in ComfyUI's order)
    "model_size": (),
    "_load_list": (),
    "add_patches": ("patches", "strength_patch", "strength_model"),
    "add_hook_patches": ("hook", "patches", "strength_patch", "strength_model"),
    "load": ("device_to", "lowvram_model_memory", "force_patch_weights", "full_load"),
    "patch_weight_to_device": ("key", "device_to"),
    "unpatch_model": ("device_to", "unpatch_weights"),
}


@pytest.mark.parametrize("method", sorted(OVERRIDDEN))
def test_model_patcher_methods(comfy, method):
    fn = getattr(comfy["patcher"].ModelPatcher, method, None)
    name = f"comfy.model_patcher.ModelPatcher.{method}"
    api(name, callable(fn), "missing: nodes/model_patcher.py overrides it")
    missing = takes(fn, *OVERRIDDEN[method])
    api(name, not missing, f"no longer takes {missing}")


def test_model_patcher_load_list_entries(comfy):
    """SVDQuantModelPatcher._load_list rewrites entries ending in (module_mem, name, module, params)."""
    ops = comfy["ops"]
    model = torch.nn.Sequential(ops.manual_cast.Linear(8, 4))
    model[0].weight = torch.nn.Parameter(torch.zeros(4, 8))
    model[0].bias = torch.nn.Parameter(torch.zeros(4))
    cpu = torch.device("cpu")
    p = comfy["patcher"].ModelPatcher(model, load_device=cpu, offload_device=cpu)
    for entry in p._load_list():
        *keys, mem, name, module, params = entry
        api("comfy.model_patcher.ModelPatcher._load_list", isinstance(mem, int) and isinstance(name, str)
            and isinstance(module, torch.nn.Module) and all(isinstance(k, (int, bool)) for k in keys),
            f"entries are no longer (sort keys..., module_mem, name, module, params): {entry!r}")
    for attr in ("patches", "object_patches", "model_options", "hook_mode", "is_clip", "load_device",
                 "offload_device", "size"):
        api(f"comfy.model_patcher.ModelPatcher.{attr}", hasattr(p, attr), "missing")
    api("comfy.model_patcher.ModelPatcher.use_ejected", callable(getattr(p, "use_ejected", None)), "missing")


def test_lora_machinery(comfy):
    """nodes/lora_patches.py: plain LoRAs are read from LoRAAdapter.weights, others go through calculate_weight."""
    adapter = comfy["adapter"].LoRAAdapter
    up, down = torch.randn(4, 2), torch.randn(2, 8)
    a = adapter({"x.lora_up.weight", "x.lora_down.weight"}, (up, down, 2.0, None, None, None))
    api("comfy.weight_adapter.LoRAAdapter.weights", a.weights[0] is up and a.weights[1] is down and len(a.weights) == 6,
        "no longer (up, down, alpha, mid, dora_scale, reshape)")
    w = torch.zeros(4, 8)
    out = comfy["lora"].calculate_weight([(1.0, a, 1.0, None, None)], w.clone(), "x.weight")
    api("comfy.lora.calculate_weight(patches, weight, key)", torch.allclose(out, up @ down, atol=1e-5),
        "a plain LoRA patch (strength, adapter, strength_model, offset, function) no longer gives alpha/rank·up·down")
    for fn in ("model_lora_keys_unet", "load_lora"):
        api(f"comfy.lora.{fn}", callable(getattr(comfy["lora"], fn, None)), "missing")
    api("comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)",
        not takes(comfy["sd"].load_lora_for_models, "model", "clip", "lora", "strength_model", "strength_clip"),
        "signature changed ('SVDQuant LoRA Stack' calls it)")


def test_calibration_wrapper(comfy):
    """nodes/quantize.py's calibration recorder wraps sampling with an OUTER_SAMPLE wrapper."""
    api("comfy.patcher_extension.WrappersMP.OUTER_SAMPLE", hasattr(comfy["ext"].WrappersMP, "OUTER_SAMPLE"), "missing")
    api("comfy.model_patcher.ModelPatcher.add_wrapper_with_key",
        not takes(comfy["patcher"].ModelPatcher.add_wrapper_with_key, "wrapper_type", "key", "wrapper"),
        "signature changed")


# ---- the text encoder ----------------------------------------------------------------------------------------

def test_text_encoder_construction(comfy):
    """nodes/text_encoder.py builds ComfyUI's own FLUX text encoder with comfy.sd.CLIP."""
    sd, flux_te = comfy["sd"], comfy["flux_te"]
    missing = takes(sd.CLIP.__init__, "target", "embedding_directory", "model_options")
    api("comfy.sd.CLIP(target, embedding_directory=, model_options=)", not missing, f"no longer takes {missing}")
    api("comfy.text_encoders.flux.flux_clip(dtype_t5=)", not takes(flux_te.flux_clip, "dtype_t5"), "signature changed")
    api("comfy.text_encoders.flux.FluxTokenizer(embedding_directory=, tokenizer_data=)",
        not takes(flux_te.FluxTokenizer.__init__, "embedding_directory", "tokenizer_data"), "signature changed")
    api("comfy.sd.detect_te_model / TEModel.CLIP_L", callable(getattr(sd, "detect_te_model", None))
        and hasattr(getattr(sd, "TEModel", None), "CLIP_L"), "missing")
    for method in ("load_sd", "get_sd"):
        api(f"comfy.sd.CLIP.{method}", callable(getattr(sd.CLIP, method, None)), "missing")
    src = inspect.getsource(sd.CLIP.get_sd)
    api("comfy.sd.CLIP.get_sd", "tokenizer.state_dict()" in src,
        "no longer asks the tokenizer for its state dict: the CLIP save refusal (nodes/saving.py) would not be reached")


def test_utils_and_folder_paths(comfy):
    utils, fp = comfy["utils"], comfy["folder_paths"]
    for fn in ("get_attr", "load_torch_file"):
        api(f"comfy.utils.{fn}", callable(getattr(utils, fn, None)), "missing")
    api("comfy.utils.ProgressBar(total).update(n)", callable(getattr(utils.ProgressBar(2), "update", None)), "missing")
    for fn in ("get_filename_list", "get_full_path_or_raise", "get_folder_paths"):
        api(f"folder_paths.{fn}", callable(getattr(fp, fn, None)), "missing")
    api("folder_paths.folder_names_and_paths / models_dir",
        isinstance(getattr(fp, "folder_names_and_paths", None), dict) and isinstance(getattr(fp, "models_dir", None), str),
        "missing ('SVDQuant Quantize Model' registers its calibration folder there)")
