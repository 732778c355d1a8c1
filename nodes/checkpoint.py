"""From an SVDQuant checkpoint file to the state dict ComfyUI builds its own model from, for every family: ComfyUI's
per-layer layout (already ComfyUI's keys, any family: ComfyUI's detection picks the model), Nunchaku's FLUX.1 files
(mapped to BFL keys, with the FluxParams read from the weights) and Nunchaku's Qwen-Image / Z-Image / SDXL files
(mapped to ComfyUI's keys). Names and shapes only; no arithmetic (the tables are in nunchaku_core/models/flux.py,
nunchaku_core/formats/nunchaku_dit.py and nunchaku_sdxl.py, the layout readers in nunchaku_core/formats/).

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

from nunchaku_core.models import flux
from nunchaku_core.formats.comfy_native import AWQ_FORMAT, ComfyNativeCheckpoint, SVDQUANT_FORMAT
from nunchaku_core.formats.nunchaku import LEGACY_BLOCKS, LEGACY_UNQUANTIZED, CheckpointError, open_nunchaku
from nunchaku_core.formats.nunchaku_dit import family_of as nunchaku_dit_family, read_nunchaku_dit
from nunchaku_core.formats.nunchaku_sdxl import is_nunchaku_sdxl, read_nunchaku_sdxl
from nunchaku_core.layer import SVDQuantLayer, W4A16Layer

try:
    from safetensors import SafetensorError
except ImportError:  # safetensors < 0.4
    from safetensors.safetensors_rust import SafetensorError

QUANT_KEY = "svdquant"
INCOMPLETE = "the file is incomplete or was written by a broken converter; re-download or re-quantize it"
SUPPORTED_FAMILIES = "FLUX.1 (dev, schnell, Fill, Depth, Canny, Kontext), Qwen-Image (and Edit), Z-Image, SDXL"


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
class SVDQuantCheckpoint:
    state_dict: dict                 # BFL keys -> tensor or QuantizedLinear
    model_config: dict               # ComfyUI Flux parameters (FluxParams + image_model); {} for other families
    model_class: Optional[str]       # comfy.supported_models class name from comfy_config, if any
    precision: str                   # "int4" | "nvfp4"
    layout: str                      # "nunchaku" | "comfy-native"
    path: str
    family: Optional[str] = "flux"   # None: a comfy-native file of another family, for ComfyUI to detect


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


def _from_nunchaku(ckpt) -> tuple[dict, dict]:
    """(BFL state dict, {BFL key or Linear: the file's key or layers}, for error messages)."""
    svdq, w4a16, plain = set(ckpt.svdquant_layer_names()), set(ckpt.w4a16_layer_names()), set(ckpt.plain_tensor_names())
    used: set[str] = set()
    sd: dict = {}
    file_keys: dict[str, str] = {}

    def take(name: str, pool: set, what: str) -> str:
        if name not in pool:
            raise CheckpointError(f"{ckpt.path}: missing {what} {name!r}; a FLUX.1 Nunchaku file has it in every block")
        used.add(name)
        return name

    def named(block: str, cpp: str, py: str) -> str:
        return f"{block}.{cpp if ckpt.naming == 'cpp' else py}"

    def layer(name: str, bfl: str, w4a16_layer: bool):
        """One quantized layer, with its bias: every Linear of FLUX.1 has one (qkv_bias=True), and Nunchaku's
        converter stores one for every quantized layer, zeros for single blocks' out_proj (checked against
        DeepCompressor's output, tests/original_tooling.py)."""
        q = ckpt.w4a16_layer(take(name, w4a16, "W4A16 layer")) if w4a16_layer else \
            ckpt.svdquant_layer(take(name, svdq, "SVDQuant layer"))
        if q.bias is None:
            raise CheckpointError(f"{ckpt.file_of(name)}: {name}.bias is missing: FLUX.1's {bfl} is a Linear with a "
                                  f"bias and Nunchaku files store one for every quantized layer; {INCOMPLETE}")
        return q

    def quantized(bfl: str, names: list[str], split: str = "out", w4a16_layer: bool = False) -> None:
        sd[f"{bfl}.{QUANT_KEY}"] = QuantizedLinear(tuple(layer(n, bfl, w4a16_layer) for n in names), split)
        file_keys[bfl] = " + ".join(names)

    def tensor(bfl_key: str, key: str) -> torch.Tensor:
        file_keys[bfl_key] = take(key, plain, "tensor")
        sd[bfl_key] = ckpt.plain_tensor(key)
        return sd[bfl_key]

    names = svdq | w4a16 | plain
    for i in _block_indices(names, flux.DOUBLE_PREFIX):
        block, bfl = f"{flux.DOUBLE_PREFIX}.{i}", f"double_blocks.{i}"
        for suffix, cpp, py in flux.DOUBLE_W4A4:
            quantized(f"{bfl}.{suffix}", [named(block, cpp, py)])
        for suffix, nname, _ in flux.DOUBLE_W4A16:
            quantized(f"{bfl}.{suffix}", [f"{block}.{nname}"], w4a16_layer=True)
        for suffix, cpp, py in flux.DOUBLE_NORMS:
            tensor(f"{bfl}.{suffix}", named(block, cpp, py))

    for i in _block_indices(names, flux.SINGLE_PREFIX):
        block, bfl = f"{flux.SINGLE_PREFIX}.{i}", f"single_blocks.{i}"
        quantized(f"{bfl}.linear1", [f"{block}.{n}" for n, _ in flux.SINGLE_LINEAR1], "out")
        quantized(f"{bfl}.linear2", [f"{block}.{n}" for n, _ in flux.SINGLE_LINEAR2], "in")
        for suffix, nname, _ in flux.SINGLE_W4A16:
            quantized(f"{bfl}.{suffix}", [f"{block}.{nname}"], w4a16_layer=True)
        for suffix, cpp, py in flux.SINGLE_NORMS:
            tensor(f"{bfl}.{suffix}", named(block, cpp, py))

    try:
        unquantized = flux.unquantized_keys(plain)
    except KeyError as e:
        raise CheckpointError(f"{ckpt.path}: missing tensor {e.args[0]!r}; every FLUX.1 Nunchaku file has it") from None
    for bfl_key, key, swapped in unquantized:
        value = tensor(bfl_key, key)
        if swapped:
            if value.dim() == 0 or value.shape[0] % 2:
                raise CheckpointError(f"{ckpt.file_of(key)}: {key} has shape {list(value.shape)}, expected "
                                      f"[2·hidden_size, ...] (the scale and shift halves of the final adaLN)")
            sd[bfl_key] = flux.swap_halves(value)

    leftover = sorted(names - used)
    if leftover:
        raise UnsupportedModelError(f"{ckpt.path}: {len(leftover)} layers/tensors have no place in ComfyUI's "
                                    f"FLUX.1 model (first: {leftover[:4]}); is this a FLUX.1 checkpoint?")
    return sd, file_keys


# ------------------------------------------------------------------------------------------------------------
# ComfyUI-native files (already BFL names) -> BFL
# ------------------------------------------------------------------------------------------------------------

def _is_flux(names) -> bool:
    """FLUX.1's keys: img_in, double blocks and vector_in (FLUX.2 and Chroma, with the same block names, have no
    vector_in)."""
    return (("img_in.weight" in names or "img_in" in names) and any(k.startswith("double_blocks.") for k in names)
            and any(k.startswith("vector_in.") for k in names))


# A whole checkpoint's keys (ComfyUI's CheckpointSave writes the diffusion model under this prefix, beside the
# text encoders and the VAE); ComfyUI's 'Load Diffusion Model' takes the diffusion model out of such a file
# (comfy.sd.load_diffusion_model_state_dict, "Allow loading unets from checkpoint files"), and so do we.
CHECKPOINT_PREFIX = "model.diffusion_model."


def _from_comfy_native(ckpt: ComfyNativeCheckpoint) -> dict:
    """The file's layers and tensors under their own (ComfyUI) names: BFL for FLUX.1, the model's own for any
    other family. In a whole checkpoint only the diffusion model's, without CHECKPOINT_PREFIX."""
    sd: dict = {}
    prefix = CHECKPOINT_PREFIX if any(n.startswith(CHECKPOINT_PREFIX) for n in ckpt.layer_names()) else ""
    for name in ckpt.layer_names():
        if name.startswith(prefix):
            sd[f"{name[len(prefix):]}.{QUANT_KEY}"] = QuantizedLinear((ckpt.layer(name),), "out")
    for key in ckpt.plain_tensor_names():
        if key.startswith(prefix):
            sd[key[len(prefix):]] = ckpt.plain_tensor(key)
    return sd


# ------------------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------------------

def _linear_shape(sd: dict, bfl: str, where: str, file_keys: dict) -> tuple[int, int]:
    """[out, in] of a Linear, quantized or not."""
    q = sd.get(f"{bfl}.{QUANT_KEY}")
    if q is not None:
        return q.out_features, q.in_features
    key = f"{bfl}.weight"
    t = sd.get(key)
    if t is None:
        raise CheckpointError(f"{where}: {file_keys.get(key, key)} is missing; every FLUX.1 model has it")
    if t.dim() != 2:
        raise CheckpointError(f"{where}: {file_keys.get(key, key)} has shape {list(t.shape)}, expected a Linear's "
                              f"weight [N, K]")
    return tuple(t.shape)


def model_config_from_weights(sd: dict, where: str = "state dict", file_keys: Optional[dict] = None) -> dict:
    """ComfyUI Flux parameters read from the BFL state dict, as comfy's detection reads them, except that
    the head size comes from the q/k norm scale (so non-3072 test models work): in_channels = img_in K / 4
    (16 dev/schnell/Kontext, 32 Depth/Canny, 96 Fill), guidance_embed = guidance_in present.
    A tensor these are read from that is missing or of the wrong rank raises CheckpointError naming `where`."""
    file_keys = file_keys or {}
    hidden, in_dim = _linear_shape(sd, "img_in", where, file_keys)
    key = "double_blocks.0.img_attn.norm.query_norm.scale"
    norm = sd.get(key)
    if norm is None or norm.dim() != 1 or not norm.shape[0] or hidden % norm.shape[0]:
        found = "is missing" if norm is None else f"has shape {list(norm.shape)}"
        raise CheckpointError(f"{where}: {file_keys.get(key, key)} {found}, expected [head_dim] with head_dim "
                              f"dividing hidden_size {hidden}")
    return flux.comfy_model_config(
        hidden_size=hidden, depth=len(_block_indices(sd, "double_blocks")),
        depth_single_blocks=len(_block_indices(sd, "single_blocks")), in_channels=in_dim // 4,
        context_in_dim=_linear_shape(sd, "txt_in", where, file_keys)[1],
        vec_in_dim=_linear_shape(sd, "vector_in.in_layer", where, file_keys)[1],
        guidance_embed=any(k.startswith("guidance_in.") for k in sd), num_heads=hidden // norm.shape[0])


def _describe(mc: dict) -> str:
    return (f"FLUX.1 with hidden_size {mc['hidden_size']}, depth {mc['depth']}, depth_single_blocks "
            f"{mc['depth_single_blocks']}, in_channels {mc['in_channels']}, guidance_embed {mc['guidance_embed']}")


def _check_architecture(sd: dict, mc: dict, where: str, file_keys: dict) -> None:
    """Every tensor ComfyUI's FLUX.1 loads is present, floating point and of its shape, and every Linear has its
    bias (flux.bfl_shapes). ComfyUI loads a state dict non-strictly: a missing tensor would stay uninitialised
    and a missing bias zero, with only a log line."""
    for key, shape in flux.bfl_shapes(mc).items():
        layer, _, leaf = key.rpartition(".")
        q = sd.get(f"{layer}.{QUANT_KEY}")
        name = file_keys.get(layer if q is not None else key, key)
        if q is not None:
            if leaf == "weight" and (q.out_features, q.in_features) != shape:
                raise CheckpointError(f"{where}: {name} is a quantized [N, K] = [{q.out_features}, {q.in_features}] "
                                      f"layer, expected {list(shape)} for {_describe(mc)}")
            if leaf == "bias" and any(p.bias is None for p in q.parts):
                raise CheckpointError(f"{where}: {layer}.bias is missing: FLUX.1's {layer} is a Linear with a "
                                      f"bias; {INCOMPLETE}")
            continue
        t = sd.get(key)
        if t is None:
            what = f"FLUX.1's {layer} is a Linear with a bias" if leaf == "bias" else f"{_describe(mc)} has it"
            raise CheckpointError(f"{where}: {name} is missing: {what}; {INCOMPLETE}")
        if not t.is_floating_point() or tuple(t.shape) != shape:
            raise CheckpointError(f"{where}: {name} has shape {list(t.shape)} {str(t.dtype).replace('torch.', '')}, "
                                  f"expected {list(shape)} floating point for {_describe(mc)}")


# comfy.ldm.flux FluxParams fields with defaults, which comfy_config may set besides comfy_model_config's.
# Other comfy_config keys are dropped: Nunchaku's own node pack writes "disable_unet_model_creation", which
# would stop ComfyUI from building the model we want it to build.
_OPTIONAL_FLUX_PARAMS = ("global_modulation", "mlp_silu_act", "ops_bias", "default_ref_method", "ref_index_scale")


def _model_config(sd: dict, comfy_config: Optional[dict], path: str, file_keys: dict) -> tuple[dict, Optional[str]]:
    derived = model_config_from_weights(sd, path, file_keys)
    if not comfy_config:
        return derived, None
    given = comfy_config.get("model_config", {})
    if not isinstance(given, dict):
        raise CheckpointError(f"{path}: comfy_config's model_config is a JSON {type(given).__name__}, expected an "
                              f"object of ComfyUI Flux parameters")
    for k in ("hidden_size", "depth", "depth_single_blocks", "in_channels", "guidance_embed", "context_in_dim",
              "vec_in_dim", "num_heads"):
        if k in given and given[k] != derived[k]:
            raise CheckpointError(f"{path}: comfy_config says {k} = {given[k]!r} but the weights say {derived[k]!r}")
    for k, v in given.items():   # a value of the wrong type would fail later, far from the file's name
        want = type(derived[k]) if k in derived else object
        if not isinstance(v, want) and not (want is float and type(v) is int):
            raise CheckpointError(f"{path}: comfy_config says {k} = {v!r}, expected a {want.__name__}")
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


def _comfy_config(metadata: dict, path: str) -> Optional[dict]:
    raw = metadata.get("comfy_config")
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata field 'comfy_config' is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: metadata field 'comfy_config' holds a JSON {type(value).__name__}, "
                              f"expected a JSON object")
    return value


def load_checkpoint(path: str) -> SVDQuantCheckpoint:
    """Read an SVDQuant FLUX.1 checkpoint (Nunchaku file or legacy folder, or ComfyUI-native svdquant_w4a4)
    into a BFL-keyed state dict + model config; a Nunchaku Qwen-Image / Z-Image file or a ComfyUI-native file of
    another family into ComfyUI's own names with family=None. Errors (ValueError subclasses) name the file and
    the fix."""
    path = checkpoint_path(path)
    layout = sniff_layout(path)
    if layout == "comfy-native":
        ckpt = ComfyNativeCheckpoint(path)
        if not ckpt.layer_names():
            raise NotSVDQuantError(f"{path}: no svdquant_w4a4 / awq_w4a16 layers listed")
        sd = _own_tensors(_from_comfy_native(ckpt))
        comfy_config = _comfy_config(ckpt.metadata, path)
        if not _is_flux(sd.keys() | {k.rsplit(".", 1)[0] for k in sd}):
            # any other family: ComfyUI's own detection builds it from the layers' dense shapes (nodes/loader.py)
            # and its own loading reports missing or unexpected keys
            model_class = comfy_config.get("model_class") if comfy_config else None
            return SVDQuantCheckpoint(sd, {}, model_class, "int4", layout, path, family=None)
        mc, model_class = _model_config(sd, comfy_config, path, {})
        _check_architecture(sd, mc, path, {})
        return SVDQuantCheckpoint(sd, mc, model_class, "int4", layout, path)

    with open_nunchaku(path) as ckpt:
        family = _nunchaku_family(ckpt)
        if family != "flux" and (nunchaku_dit_family(ckpt) is not None or is_nunchaku_sdxl(ckpt)):
            # Qwen-Image / Z-Image / SDXL: the layers under ComfyUI's own names; ComfyUI's detection builds the model
            # from their dense shapes (nodes/loader.py) and its own loading reports missing or unexpected keys
            dit = read_nunchaku_dit(ckpt) if nunchaku_dit_family(ckpt) is not None else read_nunchaku_sdxl(ckpt)
            sd = {}
            for k, v in dit.state.items():
                quantized = isinstance(v, (SVDQuantLayer, W4A16Layer))
                sd[f"{k}.{QUANT_KEY}" if quantized else k] = QuantizedLinear((v,), "out") if quantized else v
            return SVDQuantCheckpoint(_own_tensors(sd), {}, None, dit.precision, layout, path, family=None)
        if family != "flux":
            raise UnsupportedModelError(f"{path}: SVDQuant model family {family!r} is not supported yet "
                                        f"(supported: {SUPPORTED_FAMILIES})")
        sd, file_keys = _from_nunchaku(ckpt)
        sd = _own_tensors(sd)
        mc, model_class = _model_config(sd, ckpt.comfy_config, path, file_keys)
        _check_architecture(sd, mc, path, file_keys)
        return SVDQuantCheckpoint(sd, mc, model_class, ckpt.precision, layout, path)
