"""ModelPatcher for SVDQuant models. The only behaviour that differs from ComfyUI's: the quantized layers'
tensors are not in the model's state_dict, so ComfyUI's size (module_size over state_dict) would count only
the unquantized layers and under-reserve memory when loading the model.
"""
from __future__ import annotations

import comfy.model_management
import comfy.model_patcher

from .ops import quantized_nbytes


class SVDQuantModelPatcher(comfy.model_patcher.ModelPatcher):
    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = comfy.model_management.module_size(self.model) + quantized_nbytes(self.model)
        return self.size
