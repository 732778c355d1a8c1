"""From an SVDQuant checkpoint file to what ComfyUI's own Flux needs: a BFL-keyed state dict and the model
configuration (comfy.ldm.flux FluxParams). Names and shapes only; no arithmetic (the tables are in
nunchaku_core/flux.py, the layout readers in nunchaku_core/formats/nunchaku.py and nunchaku_core/comfy_native.py).

Unquantized tensors keep ComfyUI's keys (`img_in.weight`, ...). A quantized Linear `<bfl>` is one entry,
`<bfl>.svdquant` -> QuantizedLinear, which nodes/ops.py's Linear consumes in _load_from_state_dict.
Importable without ComfyUI.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
from safetensors import safe_open

from nunchaku_core import flux
from nunchaku_core.comfy_native import AWQ_FORMAT, ComfyNativeCheckpoint, SVDQUANT_FORMAT
from nunchaku_core.formats.nunchaku import LEGACY_BLOCKS, LEGACY_UNQUANTIZED, CheckpointError, open_nunchaku
from nunchaku_core.layer import SVDQuantLayer, W4A16Layer

try:
    from safetensors import SafetensorError
except ImportError:  # safetensors < 0.4
    from safetensors.safetensors_rust import SafetensorError

QUANT_KEY = "svdquant"
SUPPORTED_FAMILIES = "FLUX.1 (dev, schnell, Fill, Depth, Canny, Kontext)"


@dataclass
class QuantizedLinear:
    """The quantized layers behind one ComfyUI Linear, and how they compose:
    "out": outputs concatenated in order (single block linear1 = qkv_proj ++ mlp_fc1, or one layer);
    "in":  the input split into consecutive slices of each part's K, outputs summed (linear2 = out_proj
           on the attention columns + mlp_fc2 on the MLP columns)."""

    parts: tuple[Union[SVDQuantLayer, W4A16Layer], ...]
    split: str = "out"
    backend: Optional[str] = None   # per-load kernel choice for nunchaku_core.linear (None: its automatic choice)

    @property
    def in_features(self) -> int:
        return sum(p.K for p in self.parts) if self.split == "in" else self.parts[0].K

    @property
    def out_features(self) -> int:
        return self.parts[0].N if self.split == "in" else sum(p.N for p in self.parts)


@dataclass
class FluxCheckpoint:
    state_dict: dict                 # BFL keys -> tensor or QuantizedLinear
    model_config: dict               # ComfyUI Flux parameters (FluxParams + image_model)
    model_class: Optional[str]       # comfy.supported_models class name from comfy_config, if any
    precision: str                   # "int4" | "nvfp4"
    layout: str                      # "nunchaku" | "comfy-native"
    path: str


class NotSVDQuantError(ValueError):
    """The file is readable but holds no SVDQuant layers."""


class UnsupportedModelError(ValueError):
    """An SVDQuant file of a model family this pack cannot build yet."""


# ------------------------------------------------------------------------------------------------------------
# which file is this
# ------------------------------------------------------------------------------------------------------------

def checkpoint_path(path: str) -> str:
    """A legacy Nunchaku folder is listed by ComfyUI as its files; either file means the folder."""
    if os.path.basename(path) in (LEGACY_BLOCKS, LEGACY_UNQUANTIZED):
        return os.path.dirname(path)
    return path


def sniff_layout(path: str) -> str:
    """'nunchaku', 'comfy-native', or raise NotSVDQuantError / CheckpointError (unreadable)."""
    if os.path.isdir(path):
        return "nunchaku"
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the safetensors header ({e}); the file looks truncated, "
                              f"corrupt or is not a .safetensors file") from e
    if any(k.endswith((".qweight", ".wscales")) for k in keys) or "quantization_config" in meta:
        return "nunchaku"
    if any(k.endswith(".comfy_quant") for k in keys) or \
            any(f in meta.get("_quantization_metadata", "") for f in (SVDQUANT_FORMAT, AWQ_FORMAT)):
        return "comfy-native"
    sample = ", ".join(keys[:3])
    raise NotSVDQuantError(
        f"{path}: not an SVDQuant checkpoint: no Nunchaku layers (*.qweight/*.wscales) and no ComfyUI "
        f"svdquant_w4a4 layers (*.comfy_quant) among its {len(keys)} tensors ({sample}, ...). For an "
        f"unquantized or fp8 model use ComfyUI's 'Load Diffusion Model' node.")


def _nunchaku_family(ckpt) -> str:
    """'flux' or the name of the unsupported family, from model_class / config / key names."""
    name = ckpt.model_class or ckpt.config.get("_class_name")   # model_class is what Nunchaku's loaders go by
    if name:
        return "flux" if "flux" in str(name).lower() else str(name)
    keys = ckpt.svdquant_layer_names() + ckpt.plain_tensor_names()
    if any(k.startswith(flux.SINGLE_PREFIX + ".") for k in keys):
        return "flux"
    return "unknown (no model_class metadata and no FLUX single blocks)"


# ------------------------------------------------------------------------------------------------------------
# Nunchaku files -> BFL
# ------------------------------------------------------------------------------------------------------------

def _block_indices(names, prefix: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for n in names if (m := pat.match(n))})


def _from_nunchaku(ckpt) -> dict:
    svdq, w4a16, plain = set(ckpt.svdquant_layer_names()), set(ckpt.w4a16_layer_names()), set(ckpt.plain_tensor_names())
    used: set[str] = set()
    sd: dict = {}

    def take(name: str, pool: set, what: str) -> str:
        if name not in pool:
            raise CheckpointError(f"{ckpt.path}: missing {what} {name!r}; a FLUX.1 Nunchaku file has it in every block")
        used.add(name)
        return name

    def named(block: str, cpp: str, py: str) -> str:
        return f"{block}.{cpp if ckpt.naming == 'cpp' else py}"

    def quantized(bfl: str, parts, split="out"):
        sd[f"{bfl}.{QUANT_KEY}"] = QuantizedLinear(tuple(parts), split)

    names = svdq | w4a16 | plain
    for i in _block_indices(names, flux.DOUBLE_PREFIX):
        block, bfl = f"{flux.DOUBLE_PREFIX}.{i}", f"double_blocks.{i}"
        for suffix, cpp, py in flux.DOUBLE_W4A4:
            quantized(f"{bfl}.{suffix}", [ckpt.svdquant_layer(take(named(block, cpp, py), svdq, "SVDQuant layer"))])
        for suffix, nname, _ in flux.DOUBLE_W4A16:
            quantized(f"{bfl}.{suffix}", [ckpt.w4a16_layer(take(f"{block}.{nname}", w4a16, "W4A16 layer"))])
        for suffix, cpp, py in flux.DOUBLE_NORMS:
            sd[f"{bfl}.{suffix}"] = ckpt.plain_tensor(take(named(block, cpp, py), plain, "tensor"))

    for i in _block_indices(names, flux.SINGLE_PREFIX):
        block, bfl = f"{flux.SINGLE_PREFIX}.{i}", f"single_blocks.{i}"
        quantized(f"{bfl}.linear1", [ckpt.svdquant_layer(take(f"{block}.{n}", svdq, "SVDQuant layer"))
                                     for n, _ in flux.SINGLE_LINEAR1], "out")
        quantized(f"{bfl}.linear2", [ckpt.svdquant_layer(take(f"{block}.{n}", svdq, "SVDQuant layer"))
                                     for n, _ in flux.SINGLE_LINEAR2], "in")
        for suffix, nname, _ in flux.SINGLE_W4A16:
            quantized(f"{bfl}.{suffix}", [ckpt.w4a16_layer(take(f"{block}.{nname}", w4a16, "W4A16 layer"))])
        for suffix, cpp, py in flux.SINGLE_NORMS:
            sd[f"{bfl}.{suffix}"] = ckpt.plain_tensor(take(named(block, cpp, py), plain, "tensor"))

    try:
        unquantized = flux.unquantized_keys(plain)
    except KeyError as e:
        raise CheckpointError(f"{ckpt.path}: missing tensor {e.args[0]!r}; every FLUX.1 Nunchaku file has it") from None
    for bfl_key, key, swapped in unquantized:
        used.add(key)
        value = ckpt.plain_tensor(key)
        sd[bfl_key] = flux.swap_halves(value) if swapped else value

    leftover = sorted(names - used)
    if leftover:
        raise UnsupportedModelError(f"{ckpt.path}: {len(leftover)} layers/tensors have no place in ComfyUI's "
                                    f"FLUX.1 model (first: {leftover[:4]}); is this a FLUX.1 checkpoint?")
    return sd


# ------------------------------------------------------------------------------------------------------------
# ComfyUI-native files (already BFL names) -> BFL
# ------------------------------------------------------------------------------------------------------------

def _from_comfy_native(ckpt: ComfyNativeCheckpoint) -> dict:
    sd: dict = {}
    for name in ckpt.layer_names():
        sd[f"{name}.{QUANT_KEY}"] = QuantizedLinear((ckpt.layer(name),), "out")
    for key in ckpt.plain_tensor_names():
        sd[key] = ckpt.plain_tensor(key)
    if "img_in.weight" not in sd or not any(k.startswith("double_blocks.") for k in sd):
        raise UnsupportedModelError(f"{ckpt.path}: ComfyUI-native SVDQuant file without FLUX keys (img_in, "
                                    f"double_blocks.*); supported: {SUPPORTED_FAMILIES}")
    return sd


# ------------------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------------------

def _shape(sd: dict, bfl: str) -> tuple:
    """[out, in] of a Linear, quantized or not."""
    q = sd.get(f"{bfl}.{QUANT_KEY}")
    if q is not None:
        return q.out_features, q.in_features
    return tuple(sd[f"{bfl}.weight"].shape)


def model_config_from_weights(sd: dict) -> dict:
    """ComfyUI Flux parameters read from the BFL state dict, as comfy's detection reads them, except that
    the head size comes from the q/k norm scale (so non-3072 test models work): in_channels = img_in K / 4
    (16 dev/schnell/Kontext, 32 Depth/Canny, 96 Fill), guidance_embed = guidance_in present."""
    hidden, in_dim = _shape(sd, "img_in")
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    return flux.comfy_model_config(
        hidden_size=hidden, depth=len(_block_indices(sd, "double_blocks")),
        depth_single_blocks=len(_block_indices(sd, "single_blocks")), in_channels=in_dim // 4,
        context_in_dim=_shape(sd, "txt_in")[1], vec_in_dim=_shape(sd, "vector_in.in_layer")[1],
        guidance_embed="guidance_in.in_layer.weight" in sd, num_heads=hidden // head_dim)


# comfy.ldm.flux FluxParams fields with defaults, which comfy_config may set besides comfy_model_config's.
# Other comfy_config keys are dropped: Nunchaku's own node pack writes "disable_unet_model_creation", which
# would stop ComfyUI from building the model we want it to build.
_OPTIONAL_FLUX_PARAMS = ("global_modulation", "mlp_silu_act", "ops_bias", "default_ref_method", "ref_index_scale")


def _model_config(sd: dict, comfy_config: Optional[dict], path: str) -> tuple[dict, Optional[str]]:
    derived = model_config_from_weights(sd)
    if not comfy_config:
        return derived, None
    given = comfy_config.get("model_config", {})
    for k in ("hidden_size", "depth", "depth_single_blocks", "in_channels", "guidance_embed"):
        if k in given and given[k] != derived[k]:
            raise CheckpointError(f"{path}: comfy_config says {k} = {given[k]!r} but the weights say {derived[k]!r}")
    mc = {**derived, **{k: v for k, v in given.items() if k in derived or k in _OPTIONAL_FLUX_PARAMS}}
    mc["image_model"] = "flux"
    return mc, comfy_config.get("model_class")


# ------------------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------------------

def _own_tensors(sd: dict) -> dict:
    """The state dict with its tensors copied out of the checkpoint file. safetensors hands out tensors backed by
    one memory map of the whole file; while any of them lives, every page of the file that loading touched (all
    of it: the 4-bit codes are read to be repacked) counts as the process's resident memory: +0.29 GiB for
    bench/bench_e2e.py's 0.35 GB file (measured 2026-11-22). The layers' `codes` are the exception: the readers
    unpack them into new tensors, and nunchaku_core.linear drops them once it has packed its own copy."""
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.clone()
        elif isinstance(v, QuantizedLinear):
            parts = tuple(dataclasses.replace(p, **{f.name: getattr(p, f.name).clone() for f in dataclasses.fields(p)
                                                    if f.name != "codes" and isinstance(getattr(p, f.name), torch.Tensor)})
                          for p in v.parts)
            out[k] = dataclasses.replace(v, parts=parts)
        else:
            out[k] = v
    return out


def load_flux_checkpoint(path: str) -> FluxCheckpoint:
    """Read an SVDQuant FLUX.1 checkpoint (Nunchaku file or legacy folder, or ComfyUI-native svdquant_w4a4)
    into a BFL-keyed state dict + model config. Errors (ValueError subclasses) name the file and the fix."""
    path = checkpoint_path(path)
    layout = sniff_layout(path)
    if layout == "comfy-native":
        ckpt = ComfyNativeCheckpoint(path)
        if not ckpt.layer_names():
            raise NotSVDQuantError(f"{path}: no svdquant_w4a4 / awq_w4a16 layers listed")
        sd = _own_tensors(_from_comfy_native(ckpt))
        comfy_config = json.loads(ckpt.metadata["comfy_config"]) if "comfy_config" in ckpt.metadata else None
        mc, model_class = _model_config(sd, comfy_config, path)
        return FluxCheckpoint(sd, mc, model_class, "int4", layout, path)

    with open_nunchaku(path) as ckpt:
        family = _nunchaku_family(ckpt)
        if family != "flux":
            raise UnsupportedModelError(f"{path}: SVDQuant model family {family!r} is not supported yet "
                                        f"(supported: {SUPPORTED_FAMILIES})")
        sd = _own_tensors(_from_nunchaku(ckpt))
        mc, model_class = _model_config(sd, ckpt.comfy_config, path)
        return FluxCheckpoint(sd, mc, model_class, ckpt.precision, layout, path)
