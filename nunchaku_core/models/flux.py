"""FLUX.1 architecture facts: the name mapping between Nunchaku files and ComfyUI's own Flux (BFL names),
the single-block fusions, and the model configuration in both dialects (diffusers `config`, ComfyUI
`comfy_config`). Tables only, plus small pure functions over them; no file I/O and no numerics.

FORMAT.md §2 is the source for every row here.
"""
from __future__ import annotations

import torch

# W4A4 linears of a double block: (BFL suffix, Nunchaku C++ name, Nunchaku Python name).
DOUBLE_W4A4 = (
    ("img_attn.qkv", "qkv_proj", "attn.to_qkv"),
    ("img_attn.proj", "out_proj", "attn.to_out.0"),
    ("img_mlp.0", "mlp_fc1", "ff.net.0.proj"),
    ("img_mlp.2", "mlp_fc2", "ff.net.2"),
    ("txt_attn.qkv", "qkv_proj_context", "attn.add_qkv_proj"),
    ("txt_attn.proj", "out_proj_context", "attn.to_add_out"),
    ("txt_mlp.0", "mlp_context_fc1", "ff_context.net.0.proj"),
    ("txt_mlp.2", "mlp_context_fc2", "ff_context.net.2"),
)
# W4A16 modulation (adaLN) linears: (BFL suffix, Nunchaku name, interleave S).
DOUBLE_W4A16 = (("img_mod.lin", "norm1.linear", 6), ("txt_mod.lin", "norm1_context.linear", 6))
SINGLE_W4A16 = (("modulation.lin", "norm.linear", 3),)
# RMSNorm scales: (BFL key suffix, Nunchaku C++ key suffix, Nunchaku Python key suffix).
DOUBLE_NORMS = (
    ("img_attn.norm.query_norm.scale", "norm_q.weight", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "norm_k.weight", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "norm_added_q.weight", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "norm_added_k.weight", "attn.norm_added_k.weight"),
)
SINGLE_NORMS = (
    ("norm.query_norm.scale", "norm_q.weight", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "norm_k.weight", "attn.norm_k.weight"),
)
# Single block fusions. linear1 output rows = [qkv_proj (3D) | mlp_fc1 (4D)];
# linear2 input columns = [out_proj (D) | mlp_fc2 (4D)], its bias = b(out_proj) + b(mlp_fc2).
SINGLE_LINEAR1 = (("qkv_proj", 3), ("mlp_fc1", 4))
SINGLE_LINEAR2 = (("out_proj", 1), ("mlp_fc2", 4))
# Unquantized linears (weight and bias): (BFL prefix, diffusers prefix).
UNQUANTIZED = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),  # halves swapped, see swap_halves
)
SWAPPED = "final_layer.adaLN_modulation.1"

# INT4 layers whose inputs follow a GELU and are quantized unsigned with the σ shift (by name, FORMAT.md §1).
SHIFTED_NAMES = frozenset({"mlp_fc2", "mlp_context_fc2", "ff.net.2", "ff_context.net.2"})

DOUBLE_PREFIX = "transformer_blocks"
SINGLE_PREFIX = "single_transformer_blocks"


def is_shifted(layer_name: str) -> bool:
    """True for the post-GELU layers (INT4 files only); layer_name is a full module path."""
    parts = layer_name.split(".")
    return any(".".join(parts[i:]) in SHIFTED_NAMES for i in range(len(parts)))


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers norm_out.linear is (scale, shift); BFL final_layer.adaLN_modulation.1 is (shift, scale).
    The swap is its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def unquantized_keys(available) -> list[tuple[str, str, bool]]:
    """The unquantized tensors of a FLUX.1 Nunchaku file as (BFL key, diffusers key, halves swapped), in
    UNQUANTIZED order. `available`: the file's plain tensor names. The guidance embedder is optional (schnell)
    as a whole; any other missing tensor, or a part of a present guidance embedder, raises KeyError naming it
    (every one of these Linears has a weight and a bias)."""
    guidance = [f"{d}.{s}" for b, d in UNQUANTIZED if b.startswith("guidance_in") for s in ("weight", "bias")]
    has_guidance = any(k in available for k in guidance)   # schnell has no guidance embedder
    out = []
    for bfl, diffusers in UNQUANTIZED:
        if bfl.startswith("guidance_in") and not has_guidance:
            continue
        for suffix in ("weight", "bias"):
            key = f"{diffusers}.{suffix}"
            if key not in available:
                raise KeyError(key)
            out.append((f"{bfl}.{suffix}", key, bfl == SWAPPED))
    return out


def bfl_shapes(mc: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of ComfyUI's FLUX.1 (comfy.ldm.flux.model.Flux, BFL keys) -> its shape, for the parameters
    mc (comfy_model_config): each Linear's `.weight` [N, K] and `.bias` [N] (every FLUX.1 Linear has a bias:
    qkv_bias and ComfyUI's ops_bias are True), and each q/k RMSNorm `.scale` [head_dim]."""
    D, F, p2 = mc["hidden_size"], int(mc["hidden_size"] * mc["mlp_ratio"]), mc["patch_size"] ** 2
    head_dim = D // mc["num_heads"]
    embed = {"img_in": (D, mc["in_channels"] * p2), "txt_in": (D, mc["context_in_dim"]),
             "time_in.in_layer": (D, 256), "time_in.out_layer": (D, D), "guidance_in.in_layer": (D, 256),
             "guidance_in.out_layer": (D, D), "vector_in.in_layer": (D, mc["vec_in_dim"]),
             "vector_in.out_layer": (D, D), "final_layer.linear": (mc["out_channels"] * p2, D), SWAPPED: (2 * D, D)}
    linears = {b: embed[b] for b, _ in UNQUANTIZED if mc["guidance_embed"] or not b.startswith("guidance_in")}
    norms = []
    double = {"mod.lin": (6 * D, D), "attn.qkv": (3 * D, D), "attn.proj": (D, D), "mlp.0": (F, D), "mlp.2": (D, F)}
    for i in range(mc["depth"]):
        linears.update({f"double_blocks.{i}.{side}_{n}": s for side in ("img", "txt") for n, s in double.items()})
        norms += [f"double_blocks.{i}.{b}" for b, _, _ in DOUBLE_NORMS]
    for i in range(mc["depth_single_blocks"]):
        linears.update({f"single_blocks.{i}.linear1": (3 * D + F, D), f"single_blocks.{i}.linear2": (D, D + F),
                        f"single_blocks.{i}.modulation.lin": (3 * D, D)})
        norms += [f"single_blocks.{i}.{b}" for b, _, _ in SINGLE_NORMS]
    out: dict[str, tuple[int, ...]] = {}
    for name, (N, K) in linears.items():
        out[f"{name}.weight"], out[f"{name}.bias"] = (N, K), (N,)
    out.update({k: (head_dim,) for k in norms})
    return out


def comfy_model_config(*, hidden_size: int, depth: int, depth_single_blocks: int, in_channels: int,
                       context_in_dim: int, vec_in_dim: int, guidance_embed: bool, num_heads: int | None = None,
                       axes_dim: list[int] | None = None, theta: int = 10000, out_channels: int = 16) -> dict:
    """ComfyUI's Flux parameters (comfy.ldm.flux.model.FluxParams), as `comfy_config["model_config"]`.
    in_channels = img_in.weight.shape[1] // 4, as ComfyUI's detection reads it (16 for dev/schnell, 96 for
    Fill, 32 for Depth/Canny); out_channels stays 16 (latent channels)."""
    head_dim = 128
    num_heads = num_heads or hidden_size // head_dim
    if axes_dim is None:
        axes_dim = [16, 56, 56] if hidden_size // num_heads == 128 else _split_axes(hidden_size // num_heads)
    return {
        "image_model": "flux", "in_channels": in_channels, "out_channels": out_channels,
        "vec_in_dim": vec_in_dim, "context_in_dim": context_in_dim, "hidden_size": hidden_size,
        "mlp_ratio": 4.0, "num_heads": num_heads, "depth": depth, "depth_single_blocks": depth_single_blocks,
        "axes_dim": axes_dim, "theta": theta, "patch_size": 2, "qkv_bias": True, "guidance_embed": guidance_embed,
    }


def _split_axes(head_dim: int) -> list[int]:
    """Rotary axes for a non-standard head size: FLUX splits 128 as 16/56/56; keep the first axis 1/8 and
    split the rest evenly (each even)."""
    first = max(2, (head_dim // 8) // 2 * 2)
    rest = head_dim - first
    second = rest // 2 // 2 * 2
    return [first, second, rest - second]


def diffusers_config(mc: dict) -> dict:
    """The diffusers FluxTransformer2DModel config JSON (Nunchaku's `config` metadata) for ComfyUI params."""
    return {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": mc["hidden_size"] // mc["num_heads"],
        "axes_dims_rope": list(mc["axes_dim"]),
        "guidance_embeds": bool(mc["guidance_embed"]),
        "in_channels": mc["in_channels"] * 4,
        "joint_attention_dim": mc["context_in_dim"],
        "num_attention_heads": mc["num_heads"],
        "num_layers": mc["depth"],
        "num_single_layers": mc["depth_single_blocks"],
        "out_channels": None if mc["out_channels"] == mc["in_channels"] else mc["out_channels"] * 4,
        "patch_size": 1,
        "pooled_projection_dim": mc["vec_in_dim"],
    }


def model_class_for(mc: dict) -> str:
    """ComfyUI supported-model class name recorded in comfy_config."""
    return "Flux" if mc["guidance_embed"] else "FluxSchnell"
