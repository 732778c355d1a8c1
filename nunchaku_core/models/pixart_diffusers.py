"""PixArt-Alpha/Sigma transformer names: diffusers (`PixArtTransformer2DModel`, e.g. the `transformer/` file of
PixArt-alpha/PixArt-Sigma-XL-2-1024-MS) -> the original PixArt names ComfyUI's model uses (comfy/ldm/pixart).

ComfyUI's 'Load Diffusion Model' converts such a file on load; the quantizer converts it on read, so its output
has the names ComfyUI's detection recognises (`t_block.1.weight`, `blocks.N.cross_attn.kv_linear.weight`) and
4-bit layers where ComfyUI's model has its Linears. Conformance with ComfyUI's own conversion
(comfy.model_detection.convert_diffusers_mmdit) is tested on both hosts (tests/test_model_source.py).

Fused layers are the diffusers parts concatenated along the output rows, in the listed order: self-attention
q, k, v -> attn.qkv; cross-attention k, v -> cross_attn.kv_linear.
"""
from __future__ import annotations

from .flux_source import count_blocks

# Detection: keys that only a diffusers-layout PixArt transformer has (ComfyUI's test, model_detection.py).
DETECT = ("adaln_single.emb.timestep_embedder.linear_1.bias", "pos_embed.proj.bias")

# Per block: PixArt module -> the diffusers modules whose rows it concatenates (weight and bias alike).
BLOCK_LINEARS = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.proj": ("attn1.to_out.0",),
    "cross_attn.q_linear": ("attn2.to_q",),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": ("attn2.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
}
BLOCK_TENSORS = {"scale_shift_table": "scale_shift_table"}

# Outside the blocks: PixArt module -> diffusers module (weight and bias), and single tensors.
TOP_LINEARS = {
    "x_embedder.proj": "pos_embed.proj",                   # a Conv2d, renamed only
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "final_layer.linear": "proj_out",
    # PixArt-Alpha's micro-conditions (Sigma has none)
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
}
TOP_TENSORS = {"y_embedder.y_embedding": "caption_projection.y_embedding",
               "final_layer.scale_shift_table": "scale_shift_table"}


def is_pixart_diffusers(keys) -> bool:
    keys = set(keys)
    return all(k in keys for k in DETECT)


def name_map(keys) -> dict[str, tuple[str, ...]]:
    """{PixArt key: (diffusers keys concatenated along dim 0, in order)} for the tensors present in `keys`
    (a diffusers PixArt file's keys). A fused layer with only some of its parts present raises ValueError
    naming the missing part, as does a missing block. Keys of the file this map does not name are left out, as ComfyUI leaves them."""
    have = set(keys)
    out: dict[str, tuple[str, ...]] = {}

    def add(target: str, parts: tuple[str, ...]) -> None:
        present = [p in have for p in parts]
        if all(present):
            out[target] = parts
        elif any(present):
            missing = parts[present.index(False)]
            raise ValueError(f"{target} is made of {', '.join(parts)}, but {missing} is missing")

    for i in range(count_blocks(have, "transformer_blocks.")):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for module, parts in BLOCK_LINEARS.items():
            for leaf in ("weight", "bias"):
                add(f"{dst}{module}.{leaf}", tuple(f"{src}{p}.{leaf}" for p in parts))
        for name, part in BLOCK_TENSORS.items():
            add(dst + name, (src + part,))
    for module, part in TOP_LINEARS.items():
        for leaf in ("weight", "bias"):
            add(f"{module}.{leaf}", (f"{part}.{leaf}",))
    for name, part in TOP_TENSORS.items():
        add(name, (part,))
    return out
