"""ComfyUI nodes of the quantizer: 'SVDQuant Quantize Model' (a diffusion model file from models/diffusion_models
-> an SVDQuant checkpoint in the same folder: ComfyUI's per-layer layout for any family, or Nunchaku's for FLUX.1)
and 'SVDQuant Record Calibration' (a MODEL patch that records activation statistics of any model family while an
ordinary sampling workflow runs, for the quantizer's --calib).

Thin: paths, progress and wiring here; all work in nunchaku_core.quantize (model, flux, calibration). comfy and
folder_paths are imported inside the functions, so this module imports without ComfyUI (tests).
"""
from __future__ import annotations

import logging
import os

from nunchaku_core.quantize.cli import FORMATS, output_format

log = logging.getLogger("SVDQuant")

CALIB_FOLDER = "svdquant_calibration"     # models/svdquant_calibration/*.safetensors
NO_CALIBRATION = "none (data-free)"


def _calibration_folder() -> str:
    """Register models/svdquant_calibration with ComfyUI's folder_paths (once) and return its path."""
    import folder_paths

    if CALIB_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[CALIB_FOLDER] = (
            [os.path.join(folder_paths.models_dir, CALIB_FOLDER)], {".safetensors"})
    return folder_paths.get_folder_paths(CALIB_FOLDER)[0]


def _file_name(name: str, what: str) -> str:
    """A plain file name ending in .safetensors; no folders, so nothing is written outside the models folder."""
    name = name.strip()
    if not name or os.path.basename(name) != name or name in (".", ".."):
        raise ValueError(f"{what} {name!r}: give a plain file name without folders (it is written into the models folder)")
    return name if name.endswith(".safetensors") else name + ".safetensors"


class SVDQuantQuantizeModel:
    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        _calibration_folder()
        return {"required": {
            "model_name": (folder_paths.get_filename_list("diffusion_models"),
                           {"tooltip": "a bf16/fp16/fp32 diffusion model file ComfyUI loads (FLUX.1 and its fine-tunes, "
                                       "or any other family: see the format input); .safetensors, a whole "
                                       "checkpoint's diffusion model, a .pth release (read as plain tensors), or a "
                                       "diffusers-layout PixArt transformer"}),
            "output_name": ("STRING", {"default": "svdq-int4-flux",
                                       "tooltip": "file name, written into the source model's diffusion_models folder"}),
            "precision": (["int4", "nvfp4"], {"tooltip": "int4: GPUs before Blackwell and CPU; nvfp4: Blackwell"}),
            "rank": ("INT", {"default": 32, "min": 0, "max": 512, "step": 16,
                             "tooltip": "rank of the 16-bit low-rank branch"}),
            "calibration": ([NO_CALIBRATION] + folder_paths.get_filename_list(CALIB_FOLDER),
                            {"tooltip": "a file recorded with 'SVDQuant Record Calibration'; none = data-free"}),
            "gptq": ("BOOLEAN", {"default": False, "tooltip": "GPTQ on the 4-bit residual (needs calibration)"}),
            "format": (list(FORMATS), {"default": "auto", "tooltip":
                       "comfy: ComfyUI's per-layer svdquant_w4a4 layout, any model family (INT4); "
                       "nunchaku: Nunchaku's FLUX.1 format (INT4 or NVFP4); auto: comfy unless nvfp4. Both take a "
                       "calibration and GPTQ"}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("checkpoint",)
    OUTPUT_NODE = True
    FUNCTION = "quantize"
    CATEGORY = "SVDQuant"
    DESCRIPTION = ("Quantize a diffusion model to an SVDQuant 4-bit checkpoint (ComfyUI's layout for any family, "
                   "Nunchaku's for FLUX.1), with a quality report next to it.")

    def quantize(self, model_name, output_name, precision, rank, calibration, gptq, format="auto"):
        import comfy.model_management
        import comfy.utils
        import folder_paths
        from nunchaku_core.quantize.flux import QuantizeOptions, format_table, quantize_flux
        from nunchaku_core.quantize.model import quantize_model

        src = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        # next to the source: that is a diffusion_models folder the user picked (with extra model paths the
        # first registered one may be another disk)
        out = os.path.join(os.path.dirname(src), _file_name(output_name, "output_name"))
        calib = None
        if calibration != NO_CALIBRATION:
            _calibration_folder()
            calib = folder_paths.get_full_path_or_raise(CALIB_FOLDER, calibration)
        bar = comfy.utils.ProgressBar(1)

        def progress(done: int, total: int, what: str) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(done, total)

        fmt = output_format(format, precision)
        options = QuantizeOptions(precision=precision, rank=rank, gptq=gptq)
        if fmt == "comfy":
            res = quantize_model(src, out, options=options, calib_path=calib, progress=progress)
        else:
            res = quantize_flux(src, out, options=options, calib_path=calib, progress=progress)
        log.info("SVDQuant: wrote %s (%s layout, %s) in %.0f s\n%s", out, fmt, res.variant, res.seconds,
                 format_table(res.layers))
        name = os.path.basename(out)
        return {"ui": {"text": [f"{name}: {fmt} layout, {res.variant}, {precision}, rank {rank}; "
                                f"report {res.report_path}"]},
                "result": (name,)}


class SVDQuantRecordCalibration:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the unquantized model (any family, from 'Load Diffusion Model') to be "
                                           "quantized later"}),
            "file_name": ("STRING", {"default": "calibration",
                                     "tooltip": "written into models/svdquant_calibration after every sampling run"}),
            "max_rows": ("INT", {"default": 256, "min": 16, "max": 4096,
                                 "tooltip": "activation rows kept per layer (uniform sample over all tokens)"}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "SVDQuant"
    DESCRIPTION = ("Records per-layer activation statistics while the returned model samples; run your usual "
                   "prompts, then pick the file in 'SVDQuant Quantize Model'. Statistics accumulate over runs.")

    def patch(self, model, file_name, max_rows):
        import comfy.patcher_extension
        from nunchaku_core.quantize.calibration import recorder_for_module

        path = os.path.join(_calibration_folder(), _file_name(file_name, "file_name"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        recorder = recorder_for_module(model.model.diffusion_model, max_rows)

        def record(executor, *args, **kwargs):
            recorder.attach(executor.class_obj.model_patcher.model.diffusion_model)
            try:
                out = executor(*args, **kwargs)
            finally:
                recorder.detach()
            recorder.save(path)
            log.info("SVDQuant: calibration %s now holds %d tokens per layer", path, recorder.tokens)
            return out

        patched = model.clone()
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "svdquant_calibration", record)
        return (patched,)


NODE_CLASS_MAPPINGS = {
    "SVDQuantQuantizeModel": SVDQuantQuantizeModel,
    "SVDQuantRecordCalibration": SVDQuantRecordCalibration,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SVDQuantQuantizeModel": "SVDQuant Quantize Model",
    "SVDQuantRecordCalibration": "SVDQuant Record Calibration",
}
