"""'SVDQuant LoRA Stack': several LoRAs, each with its own strength, in one node.

It goes through exactly what ComfyUI's LoraLoader does (comfy.sd.load_lora_for_models, one LoRA after another), so
on an SVDQuant model the LoRAs join the quantized layers' low-rank branches (nodes/model_patcher.py) and on any
other model they apply the stock way. Slots set to "None" or strength 0 are skipped. The CLIP input is optional;
when connected, each LoRA's text-encoder part is applied with the same strength (LoraLoader's strength_clip).
"""
from __future__ import annotations

import comfy.sd
import comfy.utils
import folder_paths

SLOTS = 4
NONE = "None"


class SVDQuantLoRAStack:
    def __init__(self):
        self._files: dict = {}        # path -> state dict, for the files used by the last run (as LoraLoader caches)

    @classmethod
    def INPUT_TYPES(cls):
        # Widget order is saved in workflows: append new inputs at the end, never reorder.
        names = [NONE] + folder_paths.get_filename_list("loras")
        required = {"model": ("MODEL",)}
        for i in range(1, SLOTS + 1):
            required[f"lora_{i}"] = (names, {"tooltip": f"LoRA {i} from models/loras (None: slot unused)."})
            required[f"strength_{i}"] = ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                                  "tooltip": f"Strength of LoRA {i} (0: skipped)."})
        return {"required": required, "optional": {"clip": ("CLIP",)}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "apply"
    CATEGORY = "SVDQuant"
    DESCRIPTION = ("Applies up to four LoRAs with their own strengths, the way ComfyUI's LoraLoader does; on SVDQuant "
                   "models they join the 4-bit layers' low-rank branch (no re-quantization).")

    def _load(self, path: str) -> dict:
        if path not in self._files:
            self._files[path] = comfy.utils.load_torch_file(path, safe_load=True)
        return self._files[path]

    def apply(self, model, clip=None, **slots):
        used = set()
        for i in range(1, SLOTS + 1):
            name, strength = slots.get(f"lora_{i}", NONE), float(slots.get(f"strength_{i}", 0.0))
            if name == NONE or strength == 0.0:
                continue
            # named lora_path as in ComfyUI's LoraLoader: an SVDQuant model's LoRA errors name it from there
            lora_path = folder_paths.get_full_path_or_raise("loras", name)
            lora = self._load(lora_path)
            used.add(lora_path)
            model, clip = comfy.sd.load_lora_for_models(model, clip, lora, strength, strength if clip is not None else 0)
        self._files = {p: sd for p, sd in self._files.items() if p in used}
        return (model, clip)


NODE_CLASS_MAPPINGS = {"SVDQuantLoRAStack": SVDQuantLoRAStack}
NODE_DISPLAY_NAME_MAPPINGS = {"SVDQuantLoRAStack": "SVDQuant LoRA Stack"}
