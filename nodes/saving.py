"""ComfyUI's save nodes on SVDQuant models: refused before any file is written, with the reason and the fix.

What they write: comfy.sd.save_checkpoint (ModelSave, CheckpointSave, ImageOnlyCheckpointSave) writes
`BaseModel.state_dict_for_saving(...)` (0.3.75 directly, 0.33 through ModelPatcher.state_dict_for_saving); CLIPSave
and CheckpointSave write `clip.get_sd()` / `clip.state_dict_for_saving()`. A 4-bit Linear lists
its `weight` / `bias` there as meta placeholders (nodes/ops.py: ComfyUI maps LoRA keys from the state dict), and
safetensors failed on them with "Cannot copy out of meta tensor; no data!" -- CLIPSave only after it had written
the CLIP-L file. The placeholders must stay, so the hooks are on what only saving calls (0.3.75 and 0.33):

- MODEL: `state_dict_for_saving` of the BaseModel our loader built, set on that instance
  (nodes/comfy_api.refuse_state_dict_for_saving, any arguments). Every ModelPatcher
  clone (LoraLoader, ModelSamplingFlux, ...) shares the BaseModel; comfy.sd.save_checkpoint is its only caller.
- CLIP: comfy.sd.CLIP.get_sd (and 0.33's CLIP.state_dict_for_saving) asks the tokenizer for its part of the file (`tokenizer.state_dict()`), and nothing
  else calls that. CLIP.clone() builds a plain comfy.sd.CLIP, so a CLIP subclass or attribute would be lost at the
  first LoraLoader; the tokenizer object is shared by every clone.

save_checkpoint (for the MODEL) and CLIPSave load the model with its patches (force_patch_weights) before asking
for the state dict, so that load still happens (SVDQuantModelPatcher.patch_weight_to_device lets it pass the
4-bit Linears).
"""
from __future__ import annotations

import comfy.text_encoders.flux


class SaveError(ValueError):
    """A ComfyUI save node given an SVDQuant model (the message names the file and the fix)."""


def flux_save_message(path: str, n_quantized: int, dequantize_hint: bool) -> str:
    """dequantize_hint: `python -m nunchaku_core dequantize` reads this file (Nunchaku layout)."""
    dense = (f" (or write this file's dequantized weights: python -m nunchaku_core dequantize {path} "
             f"<output>.safetensors)" if dequantize_hint else "")
    return (f"{path}: an SVDQuant model cannot be saved by ComfyUI's save nodes (ModelSave, CheckpointSave): its "
            f"{n_quantized} 4-bit Linears hold packed 4-bit codes, not the dense weights those nodes write. "
            f"{path} already is the saved 4-bit model: load it again with 'SVDQuant FLUX Loader', and keep LoRAs "
            f"as separate files applied at load (LoraLoader, 'SVDQuant LoRA Stack'). For a dense model, load and "
            f"save the unquantized model instead{dense}. No file was written.")


def t5_save_message(t5_path: str, clip_l_path: str, n_quantized: int) -> str:
    return (f"{t5_path}: a text encoder with this 4-bit T5 cannot be saved by ComfyUI's save nodes (CLIPSave, "
            f"CheckpointSave): its {n_quantized} 4-bit Linears hold packed 4-bit codes, not the dense weights those "
            f"nodes write. {t5_path} already is the saved 4-bit T5 (and {clip_l_path} the CLIP-L): load them again "
            f"with 'SVDQuant Text Encoder Loader', and keep LoRAs as separate files applied at load (LoraLoader). "
            f"For a dense text encoder, load and save the unquantized T5 instead. No file was written.")


class SaveRefusingFluxTokenizer(comfy.text_encoders.flux.FluxTokenizer):
    """ComfyUI's FLUX tokenizer whose state_dict() -- called only by comfy.sd.CLIP.get_sd, i.e. by the save
    nodes -- raises SaveError(save_message)."""

    def __init__(self, save_message: str, embedding_directory=None, tokenizer_data=None):
        super().__init__(embedding_directory=embedding_directory,
                         tokenizer_data={} if tokenizer_data is None else tokenizer_data)
        self.save_message = save_message

    def state_dict(self):
        raise SaveError(self.save_message)
