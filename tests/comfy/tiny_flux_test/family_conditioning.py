"""Test-only node: random CONDITIONING for any diffusion model family, without its text encoder.

The real encoders cannot be tiny (Qwen2.5-VL 7B for Qwen-Image, Qwen3 4B for Z-Image, Mistral 24B / Qwen3 for
FLUX.2, T5-XXL for Chroma / PixArt / SD3, umT5 for Wan). This node reads the text width the loaded MODEL expects
from its modules' in_features (not from weight shapes, which a quantized Linear may pack) and returns what the
family's CLIPTextEncode would: [[hidden states [1, tokens, width], extras]], where extras carry the keys that
model_base.<Family>.extra_conds / encode_adm read:

  Flux (FLUX.1)      pooled_output [1, vec_in_dim] (encode_adm reads it), guidance
  Flux2              pooled_output None (0.3.75's Flux.encode_adm indexes kwargs["pooled_output"]; the
                     Mistral / Qwen3 encoders return None), guidance (used when the model has guidance_in);
                     extra_conds left-pads the text to 512 tokens
  Chroma             pooled_output None (same encode_adm), guidance (Chroma's default 0)
  QwenImage          pooled_output None; attention_mask when tokens are masked (0.33 uses it)
  Lumina2 (Z-Image)  attention_mask when tokens are masked (num_tokens comes from it or from the length)
  SD3                pooled_output [1, adm_in_channels] (CLIP-L + CLIP-G pooled, 2048 in SD3)
  SDXL               pooled_output [1, adm_in_channels - 1536] (CLIP-G pooled, 1280; encode_adm adds the
                     size / crop embeddings, width and height defaulting to 768)
  PixArt             nothing else (Sigma has no micro-conditions)
  WAN21 / WAN22      nothing else (t2v)

`masked_tokens` > 0 masks that many trailing tokens (an attention_mask of ones and zeros, int64 like the
encoders' token masks) for the families whose encoders return masks.
"""
import torch


def _text_width(base) -> tuple[str, int, int | None]:
    """(model_base class name, context width, pooled width or None) of a loaded comfy.model_base model."""
    kind = type(base).__name__
    dm = base.diffusion_model
    match kind:
        case "Flux" | "Flux2" | "Chroma":
            return kind, dm.params.context_in_dim, getattr(dm.params, "vec_in_dim", None)
        case "QwenImage":
            return kind, dm.txt_in.in_features, None
        case "Lumina2":
            return kind, dm.cap_embedder[1].in_features, None
        case "SD3":
            return kind, dm.context_embedder.in_features, dm.y_embedder.mlp[0].in_features
        case "PixArt":
            return kind, dm.y_embedder.y_proj.fc1.in_features, None
        case "WAN21" | "WAN22":
            return kind, dm.text_embedding[0].in_features, None
        case "SDXL":   # the ADM vector is the pooled CLIP-G output + 6 size/crop sinusoids of 256
            return kind, base.model_config.unet_config["context_dim"], base.adm_channels - 6 * 256
    raise ValueError(f"TinyFamilyConditioning: no random conditioning for {kind} ({type(dm).__name__}); "
                     "add its text width and extra_conds keys to tests/comfy/tiny_flux_test/family_conditioning.py")


class TinyFamilyConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffff}),
            "masked_tokens": ("INT", {"default": 0, "min": 0, "max": 511}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, model, tokens, guidance, seed, masked_tokens):
        kind, width, pooled_width = _text_width(model.model)
        g = torch.Generator().manual_seed(seed)
        ctx = torch.randn((1, tokens, width), generator=g)   # ctx: [1, tokens, width] fp32, as encoders return
        extras = {}
        if kind in ("Flux", "Flux2", "Chroma", "QwenImage", "SD3", "SDXL"):
            extras["pooled_output"] = None if pooled_width is None else torch.randn((1, pooled_width), generator=g)
        if kind in ("Flux", "Flux2", "Chroma"):
            extras["guidance"] = guidance
        if masked_tokens and kind in ("QwenImage", "Lumina2", "Flux2"):
            mask = torch.ones((1, tokens), dtype=torch.int64)
            mask[:, max(1, tokens - masked_tokens):] = 0
            extras["attention_mask"] = mask
        return ([[ctx, extras]],)
