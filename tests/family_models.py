"""Tiny random diffusion models beyond FLUX.1, in ComfyUI's own key names, sized to the smallest that
ComfyUI's detection (comfy/model_detection.py detect_unet_config) maps to the family's supported-model class in
both test hosts (0.3.75 and 0.33.0), plus the Linear layers of each family and their roles.

`<family>_shapes(...)` -> {key: shape} for a native (un-prefixed, "diffusion_models/") checkpoint;
`write_random_model(family, path, seed, dtype)` writes one (weights N(0, std), biases 0, norm scales 1, like
tests/flux_models.py); `LINEAR_ROLES[family]` lists every Linear as (pattern, role, what feeds it) for the
per-family quantization policy, and `linear_layers(family, shapes)` applies it (each 2-D weight matched by exactly
one pattern). Decoders for the graphs: `write_taesd` (any latent channel count) and `write_taehv`.
Only torch, safetensors and nunchaku_core's streaming writer. Every Linear's K here is a multiple of 64 (one int4
group), the free widths (text, pooled, FFN) included.

Forced sizes (a value ComfyUI hard-codes in detection or in the model's defaults, not read from the weights)
are named at each family with their source lines as "0.3.75:<line> / 0.33:<line>" of comfy/model_detection.py
unless another file is named. Parameter counts of the defaults are in DEFAULT_PARAMS (file size: 2 bytes each
in bf16, 1 in fp8, plus a header of a few kB).
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from nunchaku_core.formats.safetensors_stream import StreamingSafetensorsWriter

# family name -> (ComfyUI supported-model class the detection must pick, model_base class the MODEL wraps)
SUPPORTED_MODEL = {
    "qwen_image": ("QwenImage", "QwenImage"),
    "zimage": ("ZImage", "Lumina2"),
    "flux2": ("Flux2", "Flux2"),
    "sd3": ("SD3", "SD3"),
    "chroma": ("Chroma", "Chroma"),
    "pixart_sigma": ("PixArtSigma", "PixArt"),
    "wan21_t2v": ("WAN21_T2V", "WAN21"),
    "wan22_t2v": ("WAN22_T2V", "WAN22"),
    "sdxl": ("SDXL", "SDXL"),
}
FAMILIES = tuple(SUPPORTED_MODEL)

# Parameters of family_shapes(family) with default dims (FLUX.2: 0.3.75's forced 6144 width, 1 double block;
# 1,057,536 at 0.33's smallest, hidden 128 with one double and one single block).
DEFAULT_PARAMS = {"qwen_image": 380_354_624, "zimage": 898_921_856, "flux2": 1_703_805_440, "sd3": 1_138_496,
                  "chroma": 505_429_568, "pixart_sigma": 36_988_960, "wan21_t2v": 905_792, "wan22_t2v": 938_688,
                  "sdxl": 131_628_484}


def _linear(shapes: dict, name: str, k: int, n: int, bias: bool = True) -> None:
    shapes[f"{name}.weight"] = (n, k)
    if bias:
        shapes[f"{name}.bias"] = (n,)


# --- Qwen-Image ---------------------------------------------------------------------------------------------
# Detected by `txt_norm.weight` (0.3.75:613 / 0.33:951; 0.33 first sends txt_norm 2560 + proj_out 128 to
# Mage-Flow, 0.33:944). Read from the weights: in_channels = img_in K (64 = 16 latent channels x 2x2 patch),
# num_layers = count of transformer_blocks.N. Everything else is QwenImageTransformer2DModel's default
# (comfy/ldm/qwen_image/model.py 0.3.75:297-301 / 0.33:346-350): attention_head_dim 128 x num_attention_heads 24
# => hidden 3072, joint_attention_dim 3584 (txt_norm / txt_in K), out_channels 16, patch 2, MLP x4 (GELU tanh).
QWEN_HIDDEN, QWEN_HEAD_DIM, QWEN_JOINT_DIM = 3072, 128, 3584


def qwen_image_shapes(num_layers: int = 1, in_channels: int = 64) -> dict[str, tuple]:
    D, F = QWEN_HIDDEN, 4 * QWEN_HIDDEN
    s: dict[str, tuple] = {}
    _linear(s, "img_in", in_channels, D)
    s["txt_norm.weight"] = (QWEN_JOINT_DIM,)
    _linear(s, "txt_in", QWEN_JOINT_DIM, D)
    _linear(s, "time_text_embed.timestep_embedder.linear_1", 256, D)
    _linear(s, "time_text_embed.timestep_embedder.linear_2", D, D)
    for i in range(num_layers):
        p = f"transformer_blocks.{i}"
        for side in ("img", "txt"):
            _linear(s, f"{p}.{side}_mod.1", D, 6 * D)
            _linear(s, f"{p}.{side}_mlp.net.0.proj", D, F)
            _linear(s, f"{p}.{side}_mlp.net.2", F, D)
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            _linear(s, f"{p}.attn.{proj}", D, D)
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            s[f"{p}.attn.{norm}.weight"] = (QWEN_HEAD_DIM,)
    _linear(s, "norm_out.linear", D, 2 * D)
    _linear(s, "proj_out", D, in_channels)     # 2*2*out_channels(16) = 64
    return s


# --- Z-Image (ComfyUI: Lumina2 NextDiT, supported model ZImage) -----------------------------------------
# Detected as Lumina 2 by `cap_embedder.1.weight` (0.3.75:414; 0.33:576 also needs
# `noise_refiner.0.attention.k_norm.weight`); it is Z-Image only if dim == 3840 (0.3.75:432 / 0.33:598, and the
# ZImage class matches "dim": 3840, comfy/supported_models.py 0.3.75:1020 / 0.33:1205): dim 3840 is forced, and
# with it n_heads 30 (head 128), n_kv_heads 30, ffn_dim_multiplier 8/3 (=> 10240, multiple_of 256), axes
# [32, 48, 48], z_image_modulation (adaLN from a 256-wide t embedding). Not read either: n_refiner_layers 2
# (NextDiT default, comfy/ldm/lumina/model.py 0.3.75:362 / 0.33:449) for noise_refiner and context_refiner.
# Read: cap_feat_dim (cap_embedder.1 K; 2560 in the real model), n_layers, cap_pad_token => pad_tokens_multiple 32.
# 0.3.75's NextDiT also has `norm_final.weight`, unused by its forward and absent from real Z-Image files (0.33
# comments it out): 0.3.75 logs "unet missing: ['norm_final.weight']" for any real Z-Image, and for these.
ZIMAGE_DIM, ZIMAGE_HEAD_DIM, ZIMAGE_FFN, ZIMAGE_REFINERS = 3840, 128, 10240, 2


def zimage_shapes(n_layers: int = 1, cap_feat_dim: int = 64, pad_tokens: bool = True) -> dict[str, tuple]:
    D, F = ZIMAGE_DIM, ZIMAGE_FFN
    s: dict[str, tuple] = {}
    _linear(s, "x_embedder", 16 * 2 * 2, D)

    def block(p: str, modulation: bool) -> None:
        _linear(s, f"{p}.attention.qkv", D, 3 * D, bias=False)
        _linear(s, f"{p}.attention.out", D, D, bias=False)
        s[f"{p}.attention.q_norm.weight"] = (ZIMAGE_HEAD_DIM,)
        s[f"{p}.attention.k_norm.weight"] = (ZIMAGE_HEAD_DIM,)
        _linear(s, f"{p}.feed_forward.w1", D, F, bias=False)
        _linear(s, f"{p}.feed_forward.w2", F, D, bias=False)
        _linear(s, f"{p}.feed_forward.w3", D, F, bias=False)
        for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            s[f"{p}.{norm}.weight"] = (D,)
        if modulation:
            _linear(s, f"{p}.adaLN_modulation.0", 256, 4 * D)

    for i in range(ZIMAGE_REFINERS):
        block(f"noise_refiner.{i}", True)
        block(f"context_refiner.{i}", False)
    _linear(s, "t_embedder.mlp.0", 256, 1024)
    _linear(s, "t_embedder.mlp.2", 1024, 256)
    s["cap_embedder.0.weight"] = (cap_feat_dim,)
    _linear(s, "cap_embedder.1", cap_feat_dim, D)
    for i in range(n_layers):
        block(f"layers.{i}", True)
    _linear(s, "final_layer.linear", D, 16 * 2 * 2)
    _linear(s, "final_layer.adaLN_modulation.1", 256, D)
    if pad_tokens:
        s["x_pad_token"] = (1, D)
        s["cap_pad_token"] = (1, D)
    return s


# --- FLUX.2 (BFL names, as FLUX.1) ------------------------------------------------------------------------
# Detected as Flux by `double_blocks.0.img_attn.norm.key_norm.scale` + `img_in.weight`, FLUX.2 by
# `double_stream_modulation_img.lin.weight` (0.3.75:203 / 0.33:265). Forced: axes_dim [32]*4 (head 128),
# mlp_ratio 3.0 (SiLU-gated: mlp in N = 6*hidden), out_channels 128, patch 1, no biases anywhere (ops_bias False,
# qkv_bias False), global modulation (three shared Modulation layers, none per block), theta 2000.
# 0.3.75 also forces num_heads 48 (0.3.75:206) and Flux.__init__ requires hidden/num_heads == sum(axes_dim) = 128:
# hidden 6144 is forced there. 0.33 computes num_heads = hidden // 128 (0.33:314): hidden 128 (one head) works.
# Read: hidden (img_in N), in_channels (img_in K = 128), context_in_dim (txt_in K; 15360 in FLUX.2 dev),
# guidance_embed (guidance_in present: dev yes, klein no), depth, depth_single_blocks.
FLUX2_HEAD_DIM, FLUX2_LATENT = 128, 128
FLUX2_HIDDEN_0375 = 48 * FLUX2_HEAD_DIM    # 6144


def flux2_shapes(hidden: int = FLUX2_HIDDEN_0375, depth: int = 1, depth_single: int = 0, context_dim: int = 64,
                 guidance: bool = True) -> dict[str, tuple]:
    D, F = hidden, 3 * hidden
    s: dict[str, tuple] = {}
    _linear(s, "img_in", FLUX2_LATENT, D, bias=False)
    _linear(s, "txt_in", context_dim, D, bias=False)
    for emb in ("time_in",) + (("guidance_in",) if guidance else ()):
        _linear(s, f"{emb}.in_layer", 256, D, bias=False)
        _linear(s, f"{emb}.out_layer", D, D, bias=False)
    _linear(s, "double_stream_modulation_img.lin", D, 6 * D, bias=False)
    _linear(s, "double_stream_modulation_txt.lin", D, 6 * D, bias=False)
    _linear(s, "single_stream_modulation.lin", D, 3 * D, bias=False)
    for i in range(depth):
        p = f"double_blocks.{i}"
        for side in ("img", "txt"):
            _linear(s, f"{p}.{side}_attn.qkv", D, 3 * D, bias=False)
            _linear(s, f"{p}.{side}_attn.proj", D, D, bias=False)
            _linear(s, f"{p}.{side}_mlp.0", D, 2 * F, bias=False)
            _linear(s, f"{p}.{side}_mlp.2", F, D, bias=False)
            for norm in ("query_norm", "key_norm"):
                s[f"{p}.{side}_attn.norm.{norm}.scale"] = (FLUX2_HEAD_DIM,)
    for i in range(depth_single):
        p = f"single_blocks.{i}"
        _linear(s, f"{p}.linear1", D, 3 * D + 2 * F, bias=False)
        _linear(s, f"{p}.linear2", D + F, D, bias=False)
        for norm in ("query_norm", "key_norm"):
            s[f"{p}.norm.{norm}.scale"] = (FLUX2_HEAD_DIM,)
    _linear(s, "final_layer.linear", D, FLUX2_LATENT, bias=False)
    _linear(s, "final_layer.adaLN_modulation.1", D, 2 * D, bias=False)
    return s


# --- SD3 / SD3.5 (MMDiT, SAI names) ---------------------------------------------------------------------
# Detected by `joint_blocks.0.context_block.attn.qkv.weight` (0.3.75:54 / 0.33:54); the SD3 class matches
# in_channels 16 (x_embedder.proj K). depth = x_embedder.proj N // 64 (0.3.75:63 / 0.33:63) and MMDiT sets
# hidden = 64*depth, heads = depth, joint blocks = depth (comfy/ldm/modules/diffusionmodules/mmdit.py
# 0.3.75:809-812 / 0.33:810-813): the block count is tied to the width. depth 1 is legal (hidden 64, one block
# whose context half is pre_only); depth 2 is the default so that a full context block (proj, MLP) exists.
# Read: context_embedder (in = 4096 T5 in SD3), y_embedder (adm 2048), pos_embed (max size = sqrt(P)),
# ln_q => qk_norm "rms" (SD3.5), x_block.attn2 layers (SD3.5 Medium's MMDiT-X).
def sd3_shapes(depth: int = 2, context_dim: int = 64, adm_dim: int = 64, pos_embed_max_size: int = 16,
               qk_norm: bool = True, x_block_self_attn_layers: tuple = ()) -> dict[str, tuple]:
    D, F = 64 * depth, 4 * 64 * depth
    s: dict[str, tuple] = {"x_embedder.proj.weight": (D, 16, 2, 2), "x_embedder.proj.bias": (D,),
                           "pos_embed": (1, pos_embed_max_size ** 2, D)}
    _linear(s, "t_embedder.mlp.0", 256, D)
    _linear(s, "t_embedder.mlp.2", D, D)
    _linear(s, "y_embedder.mlp.0", adm_dim, D)
    _linear(s, "y_embedder.mlp.2", D, D)
    _linear(s, "context_embedder", context_dim, D)
    for i in range(depth):
        for half in ("context_block", "x_block"):
            p = f"joint_blocks.{i}.{half}"
            pre_only = half == "context_block" and i == depth - 1
            attn2 = half == "x_block" and i in x_block_self_attn_layers
            for a in ("attn",) + (("attn2",) if attn2 else ()):
                _linear(s, f"{p}.{a}.qkv", D, 3 * D)
                if not pre_only:
                    _linear(s, f"{p}.{a}.proj", D, D)
                if qk_norm:
                    s[f"{p}.{a}.ln_q.weight"] = (64,)
                    s[f"{p}.{a}.ln_k.weight"] = (64,)
            if not pre_only:
                _linear(s, f"{p}.mlp.fc1", D, F)
                _linear(s, f"{p}.mlp.fc2", F, D)
            _linear(s, f"{p}.adaLN_modulation.1", D, (9 if attn2 else 2 if pre_only else 6) * D)
    _linear(s, "final_layer.linear", D, 2 * 2 * 16)
    _linear(s, "final_layer.adaLN_modulation.1", D, 2 * D)
    return s


# --- Chroma (FLUX.1-schnell derived, BFL names) -----------------------------------------------------------
# Detected as Flux by `double_blocks.0.img_attn.norm.key_norm.scale` + `img_in.weight`, Chroma by
# `distilled_guidance_layer.norms.0.scale`. Forced (0.3.75:253-258 / 0.33:321-326): in_channels 64, the
# approximator (distilled_guidance_layer) in_dim 64, hidden_dim 5120, n_layers 5 and out_dim 3072, which is the
# width of every modulation vector: hidden 3072 is forced in both hosts (0.3.75 also forces num_heads 24 with
# axes [16, 56, 56], 0.3.75:221). FLUX.1 blocks without their own modulation, qkv_bias, MLP x4 GELU.
# Read: context_in_dim (txt_in K; 4096 T5), depth, depth_single_blocks.
CHROMA_HIDDEN, CHROMA_APPROX, CHROMA_APPROX_LAYERS = 3072, 5120, 5


def chroma_shapes(depth: int = 1, depth_single: int = 0, context_dim: int = 64) -> dict[str, tuple]:
    D, F, A = CHROMA_HIDDEN, 4 * CHROMA_HIDDEN, CHROMA_APPROX
    s: dict[str, tuple] = {}
    _linear(s, "img_in", 64, D)
    _linear(s, "txt_in", context_dim, D)
    _linear(s, "distilled_guidance_layer.in_proj", 64, A)
    for i in range(CHROMA_APPROX_LAYERS):
        _linear(s, f"distilled_guidance_layer.layers.{i}.in_layer", A, A)
        _linear(s, f"distilled_guidance_layer.layers.{i}.out_layer", A, A)
        s[f"distilled_guidance_layer.norms.{i}.scale"] = (A,)
    _linear(s, "distilled_guidance_layer.out_proj", A, D)
    for i in range(depth):
        p = f"double_blocks.{i}"
        for side in ("img", "txt"):
            _linear(s, f"{p}.{side}_attn.qkv", D, 3 * D)
            _linear(s, f"{p}.{side}_attn.proj", D, D)
            _linear(s, f"{p}.{side}_mlp.0", D, F)
            _linear(s, f"{p}.{side}_mlp.2", F, D)
            for norm in ("query_norm", "key_norm"):
                s[f"{p}.{side}_attn.norm.{norm}.scale"] = (128,)
    for i in range(depth_single):
        p = f"single_blocks.{i}"
        _linear(s, f"{p}.linear1", D, 3 * D + F)
        _linear(s, f"{p}.linear2", D + F, D)
        for norm in ("query_norm", "key_norm"):
            s[f"{p}.norm.{norm}.scale"] = (128,)
    _linear(s, "final_layer.linear", D, 64)
    return s


# --- PixArt-Sigma (original PixArt names) -----------------------------------------------------------------
# Detected by `t_block.1.weight` (0.3.75:342 / 0.33:456), Sigma (not Alpha) when `ar_embedder.mlp.0.weight` is
# absent. Forced: hidden 1152, num_heads 16, in_channels 4, patch 2 (0.3.75:344-348 / 0.33:458-462); and from
# PixArtMS's defaults (comfy/ldm/pixart/pixartms.py 0.3.75:80-83 / 0.33:80-83) caption_channels 4096 (T5-XXL,
# y_proj K) and learn_sigma (8 output channels). Read: depth, model_max_length (y_embedding rows). `pos_embed`
# is left out: PixArtMS computes its sin-cos embedding and has no such parameter (the key would be unexpected).
PIXART_HIDDEN, PIXART_CAPTION = 1152, 4096


def pixart_sigma_shapes(depth: int = 1, max_length: int = 8) -> dict[str, tuple]:
    D = PIXART_HIDDEN
    s: dict[str, tuple] = {"x_embedder.proj.weight": (D, 4, 2, 2), "x_embedder.proj.bias": (D,)}
    _linear(s, "t_embedder.mlp.0", 256, D)
    _linear(s, "t_embedder.mlp.2", D, D)
    _linear(s, "t_block.1", D, 6 * D)
    _linear(s, "y_embedder.y_proj.fc1", PIXART_CAPTION, D)
    _linear(s, "y_embedder.y_proj.fc2", D, D)
    s["y_embedder.y_embedding"] = (max_length, PIXART_CAPTION)
    for i in range(depth):
        p = f"blocks.{i}"
        _linear(s, f"{p}.attn.qkv", D, 3 * D)
        _linear(s, f"{p}.attn.proj", D, D)
        _linear(s, f"{p}.cross_attn.q_linear", D, D)
        _linear(s, f"{p}.cross_attn.kv_linear", D, 2 * D)
        _linear(s, f"{p}.cross_attn.proj", D, D)
        _linear(s, f"{p}.mlp.fc1", D, 4 * D)
        _linear(s, f"{p}.mlp.fc2", 4 * D, D)
        s[f"{p}.scale_shift_table"] = (6, D)
    _linear(s, "final_layer.linear", D, 2 * 2 * 8)
    s["final_layer.scale_shift_table"] = (2, D)
    return s


# --- Wan 2.1 / 2.2 text-to-video (Wan names) ----------------------------------------------------------------
# Detected by `head.modulation` (0.3.75:446 / 0.33:728); t2v when no img_emb / vace / camera / audio keys.
# num_heads = dim // 128 (0.3.75:453 / 0.33:735): dim 128 is one head. Read: dim, ffn_dim, num_layers, in_dim
# (patch_embedding K), out_dim (head N / 4). WAN22_T2V (the 5B TI2V model) is the t2v model with out_dim 48.
# Forced by WanModel's defaults (comfy/ldm/wan/model.py 0.3.75:400-401 / 0.33:422-423): text_dim 4096 (umT5),
# freq_dim 256; patch (1, 2, 2). 0.33 also lays a safetensors metadata "config" JSON's "transformer" over it.
WAN_TEXT_DIM = 4096


def wan_shapes(dim: int = 128, ffn_dim: int = 256, num_layers: int = 1, in_dim: int = 16,
               out_dim: int = 16) -> dict[str, tuple]:
    s: dict[str, tuple] = {"patch_embedding.weight": (dim, in_dim, 1, 2, 2), "patch_embedding.bias": (dim,)}
    _linear(s, "text_embedding.0", WAN_TEXT_DIM, dim)
    _linear(s, "text_embedding.2", dim, dim)
    _linear(s, "time_embedding.0", 256, dim)
    _linear(s, "time_embedding.2", dim, dim)
    _linear(s, "time_projection.1", dim, 6 * dim)
    for i in range(num_layers):
        p = f"blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                _linear(s, f"{p}.{attn}.{proj}", dim, dim)
            s[f"{p}.{attn}.norm_q.weight"] = (dim,)
            s[f"{p}.{attn}.norm_k.weight"] = (dim,)
        s[f"{p}.norm3.weight"] = (dim,)
        s[f"{p}.norm3.bias"] = (dim,)
        _linear(s, f"{p}.ffn.0", dim, ffn_dim)
        _linear(s, f"{p}.ffn.2", ffn_dim, dim)
        s[f"{p}.modulation"] = (1, 6, dim)
    _linear(s, "head.head", dim, 4 * out_dim)
    s["head.modulation"] = (1, 2, dim)
    return s


# --- SDXL (ldm UNet names, as SDXL checkpoints' model.diffusion_model.*) ------------------------------------
# Detected by `input_blocks.0.0.weight` (the UNet fallback at the end of detect_unet_config, 0.3.75:620 /
# 0.33:1144), which derives the whole UNet config from the keys. The SDXL class matches only these
# (comfy/supported_models.py SDXL.unet_config, 0.3.75:185-192 / 0.33:202-209): model_channels 320,
# use_linear_in_transformer, context_dim 2048 (attn2.to_k K), adm_in_channels 2816 (label_emb K) and
# transformer_depth [0, 0, 2, 2, 10, 10] (three levels of two ResBlocks; 24 transformer blocks in the input
# half). Free, so minimal here: channel_mult (1, 1, 1) instead of (1, 2, 4) (every level 320 wide, 5 heads of 64),
# no middle block (transformer_depth_middle -2, as KOALA has), no transformers in the output half.
SDXL_CHANNELS, SDXL_CONTEXT, SDXL_ADM, SDXL_TEMB = 320, 2048, 2816, 1280
SDXL_TRANSFORMER_DEPTH = (0, 0, 2, 2, 10, 10)


def sdxl_shapes(channel_mult: tuple = (1, 1, 1), middle: bool = False,
                output_transformer_depth: tuple = (0,) * 9, channels: int = SDXL_CHANNELS,
                transformer_depth: tuple = SDXL_TRANSFORMER_DEPTH) -> dict[str, tuple]:
    """channels / transformer_depth other than SDXL's give the same layout at other sizes, which ComfyUI's
    detection does not take for SDXL (tests of a reader's name mapping use them)."""
    C, E = channels, SDXL_TEMB
    s: dict[str, tuple] = {}

    def conv(name, cin, cout, k=3):
        s[f"{name}.weight"] = (cout, cin, k, k)
        s[f"{name}.bias"] = (cout,)

    def norm(name, c):
        s[f"{name}.weight"] = (c,)
        s[f"{name}.bias"] = (c,)

    def resblock(p, cin, cout):
        norm(f"{p}.in_layers.0", cin)
        conv(f"{p}.in_layers.2", cin, cout)
        _linear(s, f"{p}.emb_layers.1", E, cout)
        norm(f"{p}.out_layers.0", cout)
        conv(f"{p}.out_layers.3", cout, cout)
        if cin != cout:
            conv(f"{p}.skip_connection", cin, cout, k=1)

    def transformer(p, c, depth):
        norm(f"{p}.norm", c)
        _linear(s, f"{p}.proj_in", c, c)
        for j in range(depth):
            b = f"{p}.transformer_blocks.{j}"
            for a, kv in (("attn1", c), ("attn2", SDXL_CONTEXT)):
                _linear(s, f"{b}.{a}.to_q", c, c, bias=False)
                _linear(s, f"{b}.{a}.to_k", kv, c, bias=False)
                _linear(s, f"{b}.{a}.to_v", kv, c, bias=False)
                _linear(s, f"{b}.{a}.to_out.0", c, c)
            _linear(s, f"{b}.ff.net.0.proj", c, 8 * c)     # GEGLU: value | gate, 4c each
            _linear(s, f"{b}.ff.net.2", 4 * c, c)
            for n in ("norm1", "norm2", "norm3"):
                norm(f"{b}.{n}", c)
        _linear(s, f"{p}.proj_out", c, c)

    _linear(s, "time_embed.0", C, E)
    _linear(s, "time_embed.2", E, E)
    _linear(s, "label_emb.0.0", SDXL_ADM, E)
    _linear(s, "label_emb.0.2", E, E)
    conv("input_blocks.0.0", 4, C)
    chans, ch, i = [C], C, 1
    depth = iter(transformer_depth)
    for level, mult in enumerate(channel_mult):
        for _ in range(2):
            resblock(f"input_blocks.{i}.0", ch, C * mult)
            ch = C * mult
            d = next(depth)
            if d:
                transformer(f"input_blocks.{i}.1", ch, d)
            chans.append(ch)
            i += 1
        if level != len(channel_mult) - 1:
            conv(f"input_blocks.{i}.0.op", ch, ch)
            chans.append(ch)
            i += 1
    if middle:
        resblock("middle_block.0", ch, ch)
    out_depth = list(output_transformer_depth)
    i = 0
    for level, mult in reversed(list(enumerate(channel_mult))):
        for r in range(3):
            resblock(f"output_blocks.{i}.0", ch + chans.pop(), C * mult)
            ch = C * mult
            layer = 1
            d = out_depth.pop()
            if d:
                transformer(f"output_blocks.{i}.1", ch, d)
                layer = 2
            if level and r == 2:
                conv(f"output_blocks.{i}.{layer}.conv", ch, ch)
            i += 1
    norm("out.0", ch)
    conv("out.2", C, 4)
    return s


def family_shapes(family: str, **dims) -> dict[str, tuple]:
    match family:
        case "qwen_image":
            return qwen_image_shapes(**dims)
        case "zimage":
            return zimage_shapes(**dims)
        case "flux2":
            return flux2_shapes(**dims)
        case "sd3":
            return sd3_shapes(**dims)
        case "chroma":
            return chroma_shapes(**dims)
        case "pixart_sigma":
            return pixart_sigma_shapes(**dims)
        case "wan21_t2v":
            return wan_shapes(**dims)
        case "wan22_t2v":
            return wan_shapes(**{"in_dim": 48, "out_dim": 48, **dims})
        case "sdxl":
            return sdxl_shapes(**dims)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def _is_norm_scale(key: str, shape: tuple) -> bool:
    """1-D weights are norm scales in every family here (Linear weights are 2-D, convs 4-D/5-D)."""
    return key.endswith(".scale") or (key.endswith(".weight") and len(shape) == 1)


def random_state_dict(shapes: dict, std: float, seed: int, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Weights N(0, std), biases 0, norm scales 1; other parameters (pad tokens, Wan/PixArt modulation tables,
    positional embeddings) N(0, std). Sampled straight in bf16 (or the float dtype asked for; fp8 is cast from
    bf16): 1.8x faster than fp32 randn * std for the 1.7 G-parameter FLUX.2 (measured, 2 cores)."""
    g = torch.Generator().manual_seed(seed)
    work = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
    out = {}
    for key, shape in shapes.items():
        if key.endswith(".bias"):
            t = torch.zeros(shape, dtype=work)
        elif _is_norm_scale(key, shape):
            t = torch.ones(shape, dtype=work)
        else:
            t = torch.empty(shape, dtype=work).normal_(0.0, std, generator=g)
        out[key] = t.to(dtype)
    return out


def write_random_model(family: str, path: Path, seed: int = 0, dtype=torch.bfloat16, std: float = 0.02,
                       **dims) -> Path:
    shapes = family_shapes(family, **dims)
    sd = random_state_dict(shapes, std, seed, dtype)
    save_file(sd, str(path), metadata={"test_model": f"random {family}, ComfyUI names, dims {dims or 'default'}"})
    return path


def write_random_model_fp8(family: str, fp8_path: Path, bf16_path: Optional[Path] = None, seed: int = 0,
                           std: float = 0.02, **dims) -> None:
    """A random model (as random_state_dict) whose every value is a float8_e4m3fn, one tensor at a time (peak
    memory one tensor: FLUX.2 at 0.3.75's forced width is 2.2 G parameters). fp8_path stores it in float8_e4m3fn:
    ComfyUI's UNETLoader with weight_dtype fp8_e4m3fn loads exactly these values (casting an fp8 value to fp8 is
    the identity). bf16_path, when given, stores the same values widened to bf16, exactly: what the quantizer
    reads (it takes 16- and 32-bit floats). So the quantized model and the stock-loaded reference come from
    one set of weights, at 1 byte per parameter in the server."""
    shapes = family_shapes(family, **dims)
    meta = {"test_model": f"random {family}, ComfyUI names, dims {dims or 'default'}, values in float8_e4m3fn"}
    g = torch.Generator().manual_seed(seed)
    writers = [StreamingSafetensorsWriter(str(fp8_path), [(k, torch.float8_e4m3fn, s) for k, s in shapes.items()], meta)]
    if bf16_path is not None:
        writers.append(StreamingSafetensorsWriter(str(bf16_path), [(k, torch.bfloat16, s) for k, s in shapes.items()],
                                                  meta))
    with contextlib.ExitStack() as stack:
        for w in writers:
            stack.enter_context(w)
        for key, shape in shapes.items():
            if key.endswith(".bias"):
                t = torch.zeros(shape, dtype=torch.float8_e4m3fn)
            elif _is_norm_scale(key, shape):
                t = torch.ones(shape, dtype=torch.float8_e4m3fn)
            else:
                t = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=g).to(torch.float8_e4m3fn)
            writers[0].write(key, t)
            if bf16_path is not None:
                writers[1].write(key, t.to(torch.bfloat16))


def param_count(shapes: dict) -> int:
    return sum(math.prod(s) for s in shapes.values())


# --- Linear layers and their roles -------------------------------------------------------------------------
# Roles: qkv (attention input projections), attn_out (input: attention output), mlp_in (input: normed and
# modulated hidden), mlp_out (input: the MLP activation, named in the third column), mod (adaLN / modulation:
# input is SiLU(conditioning vector), output shifts/scales/gates), embed (input/time/text/guidance embedders),
# final (output projection), approx (Chroma's modulation approximator MLP), proj (SDXL's SpatialTransformer
# in/out projections). Third column: what feeds the Linear.
# Patterns are fnmatch over the key without ".weight"; "*" also crosses dots.
LINEAR_ROLES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "qwen_image": (
        ("img_in", "embed", "patchified latent"),
        ("txt_in", "embed", "RMSNorm(text hidden states)"),
        ("time_text_embed.timestep_embedder.linear_1", "embed", "sinusoidal timestep"),
        ("time_text_embed.timestep_embedder.linear_2", "embed", "SiLU"),
        ("transformer_blocks.*.img_mod.1", "mod", "SiLU(temb)"),
        ("transformer_blocks.*.txt_mod.1", "mod", "SiLU(temb)"),
        ("transformer_blocks.*.attn.to_[qkv]", "qkv", "LayerNorm + modulate (image)"),
        ("transformer_blocks.*.attn.add_[qkv]_proj", "qkv", "LayerNorm + modulate (text)"),
        ("transformer_blocks.*.attn.to_out.0", "attn_out", "joint attention (image tokens)"),
        ("transformer_blocks.*.attn.to_add_out", "attn_out", "joint attention (text tokens)"),
        ("transformer_blocks.*_mlp.net.0.proj", "mlp_in", "LayerNorm + modulate"),
        ("transformer_blocks.*_mlp.net.2", "mlp_out", "GELU(tanh)"),
        ("norm_out.linear", "mod", "SiLU(temb)"),
        ("proj_out", "final", "LayerNorm + modulate"),
    ),
    "zimage": (
        ("x_embedder", "embed", "patchified latent"),
        ("cap_embedder.1", "embed", "RMSNorm(text hidden states)"),
        ("t_embedder.mlp.0", "embed", "sinusoidal timestep"),
        ("t_embedder.mlp.2", "embed", "SiLU"),
        ("*.attention.qkv", "qkv", "RMSNorm * (1 + scale) (context_refiner: RMSNorm only)"),
        ("*.attention.out", "attn_out", "attention"),
        ("*.feed_forward.w1", "mlp_in", "RMSNorm * (1 + scale); gate branch"),
        ("*.feed_forward.w3", "mlp_in", "RMSNorm * (1 + scale); up branch"),
        ("*.feed_forward.w2", "mlp_out", "SiLU(w1 x) * w3 x"),
        ("*.adaLN_modulation.0", "mod", "t embedding (256), no SiLU before it"),
        ("final_layer.adaLN_modulation.1", "mod", "SiLU(t embedding)"),
        ("final_layer.linear", "final", "LayerNorm * (1 + scale)"),
    ),
    "flux2": (
        ("img_in", "embed", "latent tokens (patch 1)"),
        ("txt_in", "embed", "text hidden states"),
        ("time_in.in_layer", "embed", "sinusoidal timestep"),
        ("guidance_in.in_layer", "embed", "sinusoidal guidance"),
        ("*_in.out_layer", "embed", "SiLU"),
        ("double_stream_modulation_*.lin", "mod", "SiLU(vec), shared by all double blocks"),
        ("single_stream_modulation.lin", "mod", "SiLU(vec), shared by all single blocks"),
        ("double_blocks.*_attn.qkv", "qkv", "LayerNorm + modulate"),
        ("double_blocks.*_attn.proj", "attn_out", "joint attention"),
        ("double_blocks.*_mlp.0", "mlp_in", "LayerNorm + modulate; N = gate | up"),
        ("double_blocks.*_mlp.2", "mlp_out", "SiLU(gate) * up"),
        ("single_blocks.*.linear1", "qkv", "LayerNorm + modulate; N = qkv | gate | up (fused)"),
        ("single_blocks.*.linear2", "attn_out", "concat(attention, SiLU(gate) * up): mixed inputs"),
        ("final_layer.adaLN_modulation.1", "mod", "SiLU(vec)"),
        ("final_layer.linear", "final", "LayerNorm + modulate"),
    ),
    "sd3": (
        ("t_embedder.mlp.0", "embed", "sinusoidal timestep"),
        ("t_embedder.mlp.2", "embed", "SiLU"),
        ("y_embedder.mlp.0", "embed", "pooled text (CLIP-L + CLIP-G)"),
        ("y_embedder.mlp.2", "embed", "SiLU"),
        ("context_embedder", "embed", "text hidden states (CLIP + T5)"),
        ("joint_blocks.*.attn.qkv", "qkv", "LayerNorm + modulate"),
        ("joint_blocks.*.attn2.qkv", "qkv", "LayerNorm + modulate (MMDiT-X second attention)"),
        ("joint_blocks.*.attn.proj", "attn_out", "joint attention"),
        ("joint_blocks.*.attn2.proj", "attn_out", "x-only self attention"),
        ("joint_blocks.*.mlp.fc1", "mlp_in", "LayerNorm + modulate"),
        ("joint_blocks.*.mlp.fc2", "mlp_out", "GELU(tanh)"),
        ("joint_blocks.*.adaLN_modulation.1", "mod", "SiLU(t + y embedding)"),
        ("final_layer.adaLN_modulation.1", "mod", "SiLU(t + y embedding)"),
        ("final_layer.linear", "final", "LayerNorm + modulate"),
    ),
    "chroma": (
        ("img_in", "embed", "patchified latent"),
        ("txt_in", "embed", "text hidden states (T5)"),
        ("distilled_guidance_layer.in_proj", "approx", "timestep/guidance/index sinusoids"),
        ("distilled_guidance_layer.layers.*.in_layer", "approx", "RMSNorm"),
        ("distilled_guidance_layer.layers.*.out_layer", "approx", "SiLU"),
        ("distilled_guidance_layer.out_proj", "approx", "residual stream; output = every modulation vector"),
        ("double_blocks.*_attn.qkv", "qkv", "LayerNorm + modulate"),
        ("double_blocks.*_attn.proj", "attn_out", "joint attention"),
        ("double_blocks.*_mlp.0", "mlp_in", "LayerNorm + modulate"),
        ("double_blocks.*_mlp.2", "mlp_out", "GELU(tanh)"),
        ("single_blocks.*.linear1", "qkv", "LayerNorm + modulate; N = qkv | mlp (fused)"),
        ("single_blocks.*.linear2", "attn_out", "concat(attention, GELU(tanh) mlp): mixed inputs"),
        ("final_layer.linear", "final", "LayerNorm + modulate"),
    ),
    "pixart_sigma": (
        ("t_embedder.mlp.0", "embed", "sinusoidal timestep"),
        ("t_embedder.mlp.2", "embed", "SiLU"),
        ("t_block.1", "mod", "SiLU(t embedding); one table for all blocks (+ per-block scale_shift_table)"),
        ("y_embedder.y_proj.fc1", "embed", "text hidden states (T5)"),
        ("y_embedder.y_proj.fc2", "embed", "GELU(tanh)"),
        ("blocks.*.attn.qkv", "qkv", "LayerNorm + modulate"),
        ("blocks.*.attn.proj", "attn_out", "self attention"),
        ("blocks.*.cross_attn.q_linear", "qkv", "hidden (residual stream, no norm)"),
        ("blocks.*.cross_attn.kv_linear", "qkv", "caption embedding (y_embedder output)"),
        ("blocks.*.cross_attn.proj", "attn_out", "cross attention"),
        ("blocks.*.mlp.fc1", "mlp_in", "LayerNorm + modulate"),
        ("blocks.*.mlp.fc2", "mlp_out", "GELU(tanh)"),
        ("final_layer.linear", "final", "LayerNorm + modulate"),
    ),
    "wan21_t2v": (
        ("text_embedding.0", "embed", "text hidden states (umT5)"),
        ("text_embedding.2", "embed", "GELU(tanh)"),
        ("time_embedding.0", "embed", "sinusoidal timestep"),
        ("time_embedding.2", "embed", "SiLU"),
        ("time_projection.1", "mod", "SiLU(time embedding); shared by all blocks (+ per-block modulation)"),
        ("blocks.*.self_attn.[qkv]", "qkv", "LayerNorm + modulate"),
        ("blocks.*.self_attn.o", "attn_out", "self attention"),
        ("blocks.*.cross_attn.q", "qkv", "LayerNorm (affine, norm3) of hidden"),
        ("blocks.*.cross_attn.[kv]", "qkv", "text embedding (text_embedding output)"),
        ("blocks.*.cross_attn.o", "attn_out", "cross attention"),
        ("blocks.*.ffn.0", "mlp_in", "LayerNorm + modulate"),
        ("blocks.*.ffn.2", "mlp_out", "GELU(tanh)"),
        ("head.head", "final", "LayerNorm + modulate"),
    ),
}
LINEAR_ROLES["wan22_t2v"] = LINEAR_ROLES["wan21_t2v"]
LINEAR_ROLES["sdxl"] = (
    ("time_embed.0", "embed", "sinusoidal timestep"),
    ("time_embed.2", "embed", "SiLU"),
    ("label_emb.0.0", "embed", "pooled CLIP-G (1280) + 6 size/crop sinusoids (ADM)"),
    ("label_emb.0.2", "embed", "SiLU"),
    ("*.emb_layers.1", "mod", "SiLU(time + label embedding); added to the ResBlock's conv features"),
    ("*.proj_in", "proj", "GroupNorm(conv features)"),
    ("*.proj_out", "proj", "transformer blocks' output"),
    ("*.attn1.to_[qkv]", "qkv", "LayerNorm (norm1)"),
    ("*.attn2.to_q", "qkv", "LayerNorm (norm2)"),
    ("*.attn2.to_[kv]", "qkv", "text hidden states (CLIP-L + CLIP-G, 2048)"),
    ("*.attn[12].to_out.0", "attn_out", "attention"),
    ("*.ff.net.0.proj", "mlp_in", "LayerNorm (norm3); N = value | gate (GEGLU)"),
    ("*.ff.net.2", "mlp_out", "value * GELU(gate)"),
)


def linear_layers(family: str, shapes: dict) -> list[tuple[str, str, str, int, int]]:
    """(name, role, input, N, K) for every Linear (2-D weight) of `shapes`, in key order; raises if a Linear
    matches no pattern of LINEAR_ROLES[family] or more than one."""
    out = []
    for key, shape in shapes.items():
        if not (key.endswith(".weight") and len(shape) == 2) or key.endswith(("_token", "y_embedding")):
            continue
        name = key[: -len(".weight")]
        hits = [r for r in LINEAR_ROLES[family] if fnmatch.fnmatchcase(name, r[0])]
        if len(hits) != 1:
            raise ValueError(f"{family}: Linear {name} {shape} matches {len(hits)} role patterns "
                             f"({[h[0] for h in hits]}); LINEAR_ROLES needs exactly one")
        out.append((name, hits[0][1], hits[0][2], shape[0], shape[1]))
    return out


# --- Decoders for the end-to-end graphs --------------------------------------------------------------------
def taesd_shapes(latent_channels: int, flux2: bool = False) -> tuple[dict, dict]:
    """ComfyUI's TAESD (comfy/taesd/taesd.py) Encoder / Decoder for `latent_channels`, 64 channels, 3 stages; the
    layout of taesd (4), taesdxl (4), taesd3 (16) and taef1 (16). nn.Sequential indices; a Block is
    conv-ReLU-conv-ReLU-conv. 0.3.75 builds it for any channel count; 0.33 builds its FLUX.2 variant for 128
    (flux2=True: 32 inner channels, GroupNorm "pool" in the encoder's last and the decoder's first three Blocks)."""
    enc, dec = {}, {}

    def conv(d, idx, cin, cout, bias=True):
        d[f"{idx}.weight"] = (cout, cin, 3, 3)
        if bias:
            d[f"{idx}.bias"] = (cout,)

    def block(d, idx, gn=False):
        for j in (0, 2, 4):
            conv(d, f"{idx}.conv.{j}", 64, 64)
        if gn:   # 0.33's use_midblock_gn: 1x1 conv to 256, GroupNorm(4), ReLU, 1x1 conv back
            d[f"{idx}.pool.0.weight"] = (256, 64, 1, 1)
            d[f"{idx}.pool.1.weight"] = (256,)
            d[f"{idx}.pool.1.bias"] = (256,)
            d[f"{idx}.pool.3.weight"] = (64, 256, 1, 1)
    gn = flux2
    ch = 32 if flux2 else latent_channels
    conv(enc, 0, 3, 64)
    block(enc, 1)
    for stage in range(3):
        base = 2 + 4 * stage
        conv(enc, base, 64, 64, bias=False)
        for j in range(1, 4):
            block(enc, base + j, gn and stage == 2)
    conv(enc, 14, 64, ch)
    conv(dec, 1, ch, 64)
    for stage in range(3):
        base = 3 + 5 * stage
        for j in range(3):
            block(dec, base + j, gn and stage == 0)
        conv(dec, base + 4, 64, 64, bias=False)
    block(dec, 18)
    conv(dec, 19, 64, 3)
    return enc, dec


def taef2_shapes() -> tuple[dict, dict]:
    """0.33's TAESD for FLUX.2 (EncoderFlux2 / DecoderFlux2, loaded by VAELoader "taef2"): the TAESD layout with
    32 channels and GroupNorm mid blocks; 128 latent channels are a 2x2 space-to-depth of 32."""
    return taesd_shapes(128, flux2=True)


def taehv_shapes(latent_channels: int) -> dict:
    """ComfyUI's TAEHV (comfy/taesd/taehv.py; lighttaew2_1 = 16 channels, lighttaew2_2 = 48 with 2x2 patches)
    encoder + decoder. Same keys in 0.3.75 and 0.33 (their time strides differ in code but give the same
    TPool/TGrow conv widths). `decoder.22.bias` is the key ComfyUI's VAE detection looks for."""
    patch = 2 if latent_channels in (48, 32) else 1
    img = 3 * patch * patch
    s: dict = {}

    def conv(idx, cin, cout, k=3, bias=True):
        s[f"{idx}.weight"] = (cout, cin, k, k)
        if bias:
            s[f"{idx}.bias"] = (cout,)

    def memblock(idx, n):
        conv(f"{idx}.conv.0", 2 * n, n)
        conv(f"{idx}.conv.2", n, n)
        conv(f"{idx}.conv.4", n, n)

    conv("encoder.0", img, 64)
    for stage, t in enumerate((2, 2, 1)):
        base = 2 + 5 * stage
        conv(f"encoder.{base}.conv", 64 * t, 64, k=1, bias=False)      # TPool
        conv(f"encoder.{base + 1}", 64, 64, bias=False)                # strided conv
        for j in range(2, 5):
            memblock(f"encoder.{base + j}", 64)
    conv("encoder.17", 64, latent_channels)
    n_f = (256, 128, 64, 64)
    conv("decoder.1", latent_channels, n_f[0])
    for stage, t in enumerate((1, 2, 2)):
        base = 3 + 6 * stage
        for j in range(3):
            memblock(f"decoder.{base + j}", n_f[stage])
        conv(f"decoder.{base + 4}.conv", n_f[stage], n_f[stage] * t, k=1, bias=False)   # TGrow
        conv(f"decoder.{base + 5}", n_f[stage], n_f[stage + 1], bias=False)
    conv("decoder.22", n_f[3], img)
    return s


def _random_conv_sd(shapes: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in shapes.items():
        if k.endswith(".bias"):
            sd[k] = torch.zeros(s)
        elif len(s) == 1:
            sd[k] = torch.ones(s)
        else:
            sd[k] = torch.randn(s, generator=g) * 0.05
    return sd


def write_taesd(path: Path, latent_channels: int, seed: int = 1) -> Path:
    """One file with taesd_encoder./taesd_decoder. keys: ComfyUI's VAELoader loads it from models/vae/ as a TAESD
    whose latent channel count is that of taesd_decoder.1 (comfy/sd.py)."""
    enc, dec = taesd_shapes(latent_channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {f"taesd_encoder.{k}": v for k, v in _random_conv_sd(enc, seed).items()}
    sd.update({f"taesd_decoder.{k}": v for k, v in _random_conv_sd(dec, seed + 1).items()})
    sd.update(vae_scale=torch.tensor(1.0), vae_shift=torch.tensor(0.0))   # TAESD's parameters (identity)
    save_file(sd, str(path))
    return path


def write_taesd_pair(vae_approx: Path, name: str, latent_channels: int, seed: int = 1) -> None:
    """vae_approx/<name>_encoder.safetensors + <name>_decoder.safetensors, as VAELoader lists "taesd3", "taesdxl",
    "taef2" (0.33) only when both exist."""
    vae_approx.mkdir(parents=True, exist_ok=True)
    pair = taef2_shapes() if name == "taef2" else taesd_shapes(latent_channels)
    for i, (part, shapes) in enumerate(zip(("encoder", "decoder"), pair)):
        save_file(_random_conv_sd(shapes, seed + i), str(vae_approx / f"{name}_{part}.safetensors"))


def write_taehv(path: Path, latent_channels: int, seed: int = 1) -> Path:
    """A TAEHV file (fp32: ComfyUI reads an fp16 one as HunyuanVideo's taehv and a non-fp16 one as lighttaew2_1,
    whose latents need no scaling), loaded from models/vae/ or as vae_approx/lighttaew2_*.safetensors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_random_conv_sd(taehv_shapes(latent_channels), seed), str(path))
    return path
