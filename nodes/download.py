"""'SVDQuant Download Model': fetch an SVDQuant FLUX checkpoint from the Hugging Face Hub into
models/diffusion_models (unless it is already there) and load it with the SVDQuant FLUX Loader.

The download logic and its error messages live in nunchaku_core.hub; this node only supplies ComfyUI's
folders and progress bar.
"""
from __future__ import annotations

import comfy.utils
import folder_paths

from nunchaku_core import hub

from .loader import DTYPES, load_svdquant_model

MB = 2**20


class SVDQuantDownloadModel:
    @classmethod
    def INPUT_TYPES(cls):
        # Widget order is saved in workflows: append new inputs at the end, never reorder.
        return {"required": {
            "repo_id": ("STRING", {"default": "mit-han-lab/nunchaku-flux.1-dev",
                                   "tooltip": "Hugging Face repository (HF_ENDPOINT selects a mirror)."}),
            "filename": ("STRING", {"default": "svdq-int4_r32-flux.1-dev.safetensors",
                                    "tooltip": "File in the repository. Saved under models/diffusion_models with "
                                               "the same name; an existing file of that name is used as is."}),
            "revision": ("STRING", {"default": "main", "tooltip": "Branch, tag or commit hash."}),
            "weight_dtype": (list(DTYPES), {"tooltip": "As in SVDQuant FLUX Loader."}),
        }}

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "model_name")
    FUNCTION = "download"
    CATEGORY = "SVDQuant"
    DESCRIPTION = ("Downloads an SVDQuant FLUX.1 checkpoint from the Hugging Face Hub into models/diffusion_models "
                   "(once) and loads it. model_name is the name the SVDQuant FLUX Loader lists it under.")

    def download(self, repo_id, filename, revision, weight_dtype):
        dirs = folder_paths.get_folder_paths("diffusion_models")
        bar = None

        def progress(done, total):
            nonlocal bar
            if bar is None:
                bar = comfy.utils.ProgressBar(max(1, total // MB))
            bar.update_absolute(done // MB)

        name = hub.check_filename(filename.strip())
        path = hub.download(repo_id.strip(), name, revision.strip(), dirs, progress)
        return (load_svdquant_model(path, DTYPES[weight_dtype]), name)


NODE_CLASS_MAPPINGS = {"SVDQuantDownloadModel": SVDQuantDownloadModel}
NODE_DISPLAY_NAME_MAPPINGS = {"SVDQuantDownloadModel": "SVDQuant Download Model"}
