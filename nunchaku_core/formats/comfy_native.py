"""ComfyUI's native SVDQuant layout (FORMAT.md §6): read it into, and write it from, the plain layers.

The layout is comfy-kitchen's (PyPI `comfy-kitchen`, `tensor/svdquant_w4a4.py` and `tensor/awq_w4a16.py`,
read at version 0.2.40). Each quantized Linear `<layer>` of ComfyUI's own model (BFL names for FLUX) stores

    <layer>.weight                int8  [N, K/2]   two 4-bit codes per byte, column 2j in bits 0..3,
                                                  column 2j+1 in bits 4..7 ("natural" row-major)
    <layer>.weight_scale          [K/G, N]         per-group scales, model dtype
    <layer>.bias                  [N]              optional
    <layer>.comfy_quant           uint8 [bytes]    UTF-8 JSON, {"format": ..., ...}

plus, for `"format": "svdquant_w4a4"` (INT4 only, G = 64):
    <layer>.weight_proj_down      [K, R]   D, acts on the raw input
    <layer>.weight_proj_up        [N, R]   U
    <layer>.weight_smooth_factor  [K]      divides the activations
    JSON "act_unsigned": true     the σ-shifted post-GELU layers (FORMAT.md §1)
and for `"format": "awq_w4a16"` (modulation layers, "group_size" in the JSON, default 64):
    <layer>.weight_zeros          [K/G, N]  with w = (q − 8)·scale + zeros, q the unsigned code 0..15.

A tile-packed variant ("layout": "kitchen_tile_packed_w4a4") stores weight [N/128, K/64, 32, 128],
weight_scale [N/128, K/64, 128] and weight_proj_up [N/128, R, 128]; see _untile_*.
Older files list the layers in the safetensors metadata `_quantization_metadata` instead of
`.comfy_quant` tensors ({"format_version": "1.0", "layers": {name: {"format": ...}}}); both are read.

Unconfirmed: which row order and bias a comfy-native FLUX modulation layer uses. We assume ComfyUI's own
(original rows, original bias without the folded +1), because ComfyUI's Modulation computes (1 + scale)
itself and comfy-kitchen has no knowledge of Nunchaku's interleave.
"""
from __future__ import annotations

import json
import math
from typing import Iterable, Optional

import torch
from safetensors import safe_open

from .finite import require_finite
from ..layer import SVDQuantLayer, W4A16Layer
from ..packing import bytes_to_nibbles, nibbles_to_bytes

SVDQUANT_FORMAT = "svdquant_w4a4"
AWQ_FORMAT = "awq_w4a16"
TILE_PACKED = "kitchen_tile_packed_w4a4"
_TILE_N = 128       # tile-packed: output channels per tile
_TILE_QUADS = 32    # tile-packed: rows of a tile are 4·quad + interleave
_AWQ_ZERO_POINT = 8  # comfy-kitchen's AWQ dequantizes (q − 8)·scale + zeros

# Tensor suffixes of one layer, after "<layer>.".
SVDQUANT_KEYS = ("weight", "weight_scale", "weight_proj_down", "weight_proj_up", "weight_smooth_factor")
AWQ_KEYS = ("weight", "weight_scale", "weight_zeros")
OPTIONAL_KEYS = ("bias",)


INCONSISTENT = "the file was edited or written by a broken converter; re-quantize it"
# Tensors only one of the two formats has: one of the other's in a layer means its metadata names the wrong format.
_ONLY = {SVDQUANT_FORMAT: ("weight_proj_down", "weight_proj_up", "weight_smooth_factor"),
         AWQ_FORMAT: ("weight_zeros",)}


def _fail(where: str, msg: str) -> ValueError:
    return ValueError(f"{where}: {msg}")


# --------------------------------------------------------------------------------------------------------
# per-layer JSON
# --------------------------------------------------------------------------------------------------------

def decode_comfy_quant(t: torch.Tensor, where: str) -> dict:
    """`<layer>.comfy_quant` uint8 tensor -> dict. Raises naming the layer when it is not JSON."""
    try:
        conf = json.loads(bytes(t.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(where, f"comfy_quant is not UTF-8 JSON ({e})") from e
    if isinstance(conf, str):  # some writers store the bare format name
        conf = {"format": conf}
    if not isinstance(conf, dict) or "format" not in conf:
        raise _fail(where, f"comfy_quant {conf!r} has no 'format'")
    return conf


def encode_comfy_quant(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf, separators=(",", ":")).encode("utf-8")), dtype=torch.uint8)


# --------------------------------------------------------------------------------------------------------
# nibble codecs (natural layout: column 2j in the low nibble of byte j)
# --------------------------------------------------------------------------------------------------------

def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] 4-bit values (int4 in [-8, 7] or uint4 in [0, 15], any int dtype) -> int8 [N, K/2]."""
    return nibbles_to_bytes(codes).view(torch.int8)


def unpack_nibbles(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """int8/uint8 [N, K/2] -> [N, K]: int8 in [-8, 7] when signed, else uint8 in [0, 15]."""
    return bytes_to_nibbles(packed.contiguous().view(torch.uint8), signed)


# --------------------------------------------------------------------------------------------------------
# tile-packed -> natural (comfy-kitchen's kitchen_tile_packed_w4a4)
# --------------------------------------------------------------------------------------------------------

def _untile_weight(w: torch.Tensor) -> torch.Tensor:
    """[N/128, K/64, 32, 128] int8 -> natural [N, K/2]. Within a tile, the 128 bytes of quad q are
    4 interleaved rows (row 4q + i) × 32 bytes (64 columns of group tk)."""
    tn, tk = w.shape[0], w.shape[1]
    t = w.reshape(tn, tk, _TILE_QUADS, 4, 32).permute(0, 2, 3, 1, 4)   # [tn, q, i, tk, byte]
    return t.reshape(tn * _TILE_N, tk * 32)


def _untile_scales(s: torch.Tensor) -> torch.Tensor:
    """[N/128, K/64, 128] -> natural [K/64, N]."""
    return s.permute(1, 0, 2).reshape(s.shape[1], s.shape[0] * _TILE_N)


def _untile_proj_up(u: torch.Tensor) -> torch.Tensor:
    """[N/128, R, 128] -> [N, R]."""
    return u.permute(0, 2, 1).reshape(u.shape[0] * _TILE_N, u.shape[1])


# --------------------------------------------------------------------------------------------------------
# one layer
# --------------------------------------------------------------------------------------------------------

def _need(tensors: dict, key: str, where: str) -> torch.Tensor:
    if key not in tensors:
        raise _fail(where, f"missing tensor '{key}' (have {sorted(tensors)})")
    return tensors[key]


def _shape_error(where: str, key: str, t: torch.Tensor, want: str, why: str) -> ValueError:
    """`where` is "<file>: <layer>", so the message names the file's own key, "<file>: <layer>.<key>"."""
    return ValueError(f"{where}.{key} has shape {list(t.shape)}, expected {want} {why}; the layer's tensors do not "
                      f"fit together: {INCONSISTENT}")


def _check_svdquant_shapes(t: dict, where: str) -> None:
    """Natural-layout svdquant_w4a4 tensors against the N and K that `weight` [N, K/2] gives, and the rank R that
    `weight_proj_down` [K, R] gives, each error naming the file's key (layer.validate would name our own
    fields, transposed)."""
    w = t["weight"]
    N, K = w.shape[0], 2 * w.shape[1]
    of = f"for {where.rsplit(': ', 1)[-1]}.weight {list(w.shape)} (N = {N}, K = {K})"
    if K % 64:
        raise ValueError(f"{where}.weight has shape {list(w.shape)}: K = {K} input features is not a multiple of "
                         f"svdquant_w4a4's group size 64; {INCONSISTENT}")
    s = t["weight_scale"]
    if tuple(s.shape) != (K // 64, N):
        raise _shape_error(where, "weight_scale", s, f"[K/64, N] = [{K // 64}, {N}]", of)
    down = t["weight_proj_down"]
    if down.dim() != 2 or down.shape[0] != K:
        raise _shape_error(where, "weight_proj_down", down, f"[K, R] = [{K}, R]", of)
    R = down.shape[1]
    up = t["weight_proj_up"]
    if tuple(up.shape) != (N, R):
        raise _shape_error(where, "weight_proj_up", up, f"[N, R] = [{N}, {R}]", f"{of} and R from weight_proj_down")
    if tuple(t["weight_smooth_factor"].shape) != (K,):
        raise _shape_error(where, "weight_smooth_factor", t["weight_smooth_factor"], f"[K] = [{K}]", of)
    if t.get("bias") is not None and tuple(t["bias"].shape) != (N,):
        raise _shape_error(where, "bias", t["bias"], f"[N] = [{N}]", of)


def _check_awq_shapes(t: dict, G: int, where: str) -> None:
    """awq_w4a16 tensors against `weight` [N, K/2] and the JSON's group size G; scales that fit another group size
    are named as such (the JSON and the tensors disagree)."""
    w = t["weight"]
    N, K = w.shape[0], 2 * w.shape[1]
    of = f"for {where.rsplit(': ', 1)[-1]}.weight {list(w.shape)} (N = {N}, K = {K}) and group_size {G}"
    groups = math.ceil(K / G)
    for key in ("weight_scale", "weight_zeros"):
        s = t[key]
        if tuple(s.shape) == (groups, N):
            continue
        hint = ""
        if s.dim() == 2 and s.shape[1] == N and s.shape[0] and K % s.shape[0] == 0:
            hint = (f" (these scales fit group_size {K // s.shape[0]}, but comfy_quant says {G}: the per-layer "
                    f"metadata contradicts the tensors)")
        raise _shape_error(where, key, s, f"[K/G, N] = [{groups}, {N}]", of + hint)
    if t.get("bias") is not None and tuple(t["bias"].shape) != (N,):
        raise _shape_error(where, "bias", t["bias"], f"[N] = [{N}]", of)


def _require_floats(tensors: dict, where: str) -> None:
    """Scales, zeros, smoothing, low-rank factors and bias are floating point (`weight` holds the codes)."""
    for k in SVDQUANT_KEYS[1:] + AWQ_KEYS[1:] + OPTIONAL_KEYS:
        t = tensors.get(k)
        if t is not None and not t.is_floating_point():
            raise _fail(where, f"{k} is {t.dtype} {list(t.shape)}, expected a floating-point tensor")


def svdquant_from_comfy(tensors: dict[str, torch.Tensor], conf: dict, where: str) -> SVDQuantLayer:
    """Tensors of one svdquant_w4a4 layer (keys are the suffixes above) -> SVDQuantLayer (int4)."""
    if conf.get("group_size", 64) != 64:
        raise ValueError(f"{where}: its per-layer metadata says svdquant_w4a4 with group_size {conf['group_size']!r}, "
                         f"but svdquant_w4a4 (int4) has group size 64 only: the per-layer metadata contradicts the "
                         f"format; {INCONSISTENT}")
    basis = conf.get("lowrank_branch_input_basis", "raw")
    if basis != "raw":
        raise _fail(where, f"lowrank_branch_input_basis {basis!r}: only 'raw' (D acts on the unsmoothed input) is "
                           f"supported")
    w, s, up = (_need(tensors, k, where) for k in ("weight", "weight_scale", "weight_proj_up"))
    _require_floats(tensors, where)
    if w.dtype not in (torch.int8, torch.uint8):
        raise _fail(where, f"weight is {w.dtype} {list(w.shape)}, expected int8 [N, K/2] (int4 codes)")
    if conf.get("layout", "natural") == TILE_PACKED or w.dim() == 4:
        tiled = (w.dim() == 4 and w.shape[2:] == (_TILE_QUADS, _TILE_N) and s.shape == (*w.shape[:2], _TILE_N)
                 and up.dim() == 3 and up.shape[0] == w.shape[0] and up.shape[2] == _TILE_N)
        if not tiled:
            raise _fail(where, f"tile-packed layer has weight {list(w.shape)}, weight_scale {list(s.shape)}, "
                               f"weight_proj_up {list(up.shape)}; expected [N/128, K/64, 32, 128], "
                               f"[N/128, K/64, 128], [N/128, R, 128]")
        w, s, up = _untile_weight(w), _untile_scales(s), _untile_proj_up(up)
    if w.dim() != 2 or s.dim() != 2:
        raise _fail(where, f"weight is {list(w.shape)} and weight_scale {list(s.shape)}, expected [N, K/2] and "
                           f"[K/64, N]")
    _check_svdquant_shapes({**tensors, "weight": w, "weight_scale": s, "weight_proj_up": up,
                            "weight_proj_down": _need(tensors, "weight_proj_down", where),
                            "weight_smooth_factor": _need(tensors, "weight_smooth_factor", where)}, where)
    layer = SVDQuantLayer(
        precision="int4",
        codes=unpack_nibbles(w, signed=True),
        wscales=s.t().contiguous(),                                   # [K/64, N] -> [N, K/64]
        smooth=_need(tensors, "weight_smooth_factor", where),
        proj_down=_need(tensors, "weight_proj_down", where),
        proj_up=up.contiguous(),
        bias=tensors.get("bias"),
        shifted=bool(conf.get("act_unsigned", False)),
    )
    return layer.validate(where)


def w4a16_from_comfy(tensors: dict[str, torch.Tensor], conf: dict, where: str) -> W4A16Layer:
    """Tensors of one awq_w4a16 layer -> W4A16Layer. comfy-kitchen's w = (q − 8)·s + z becomes our
    w = q·s + zeros with zeros = z − 8·s, kept in fp32: the two forms then differ by fp32 rounding only
    (tests/test_ops_unit.py bounds it)."""
    G = conf.get("group_size", 64)
    if isinstance(G, bool) or not isinstance(G, (int, float)) or G != int(G) or G <= 0:
        raise _fail(where, f"awq_w4a16 group_size {G!r}, expected a positive integer")
    G = int(G)
    w, s, z = (_need(tensors, k, where) for k in AWQ_KEYS)
    _require_floats(tensors, where)
    if w.dim() != 2 or w.dtype not in (torch.int8, torch.uint8):
        raise _fail(where, f"weight is {w.dtype} {list(w.shape)}, expected int8 [N, K/2] (uint4 codes)")
    if s.dim() != 2 or z.shape != s.shape:
        raise _fail(where, f"weight_scale is {list(s.shape)} and weight_zeros {list(z.shape)}, expected both "
                           f"[K/G, N]")
    _check_awq_shapes(tensors, G, where)
    s32, z32 = s.t().float(), z.t().float()                          # [K/G, N] -> [N, K/G]
    layer = W4A16Layer(codes=unpack_nibbles(w, signed=False), scales=s32,
                       zeros=z32 - _AWQ_ZERO_POINT * s32, bias=tensors.get("bias"), group_size=G)
    return layer.validate(where)


def svdquant_to_comfy(layer: SVDQuantLayer) -> dict[str, torch.Tensor]:
    """SVDQuantLayer (int4) -> natural-layout tensors keyed by suffix, plus `comfy_quant`."""
    if layer.precision != "int4":
        raise ValueError(f"ComfyUI's svdquant_w4a4 is int4 only; this layer is {layer.precision}")
    out = {
        "weight": pack_nibbles(layer.codes),
        "weight_scale": layer.wscales.t().contiguous(),
        "weight_proj_down": layer.proj_down.contiguous(),
        "weight_proj_up": layer.proj_up.contiguous(),
        "weight_smooth_factor": layer.smooth.contiguous(),
    }
    if layer.bias is not None:
        out["bias"] = layer.bias
    conf = {"format": SVDQUANT_FORMAT, "group_size": 64}
    if layer.shifted:
        conf["act_unsigned"] = True
    out["comfy_quant"] = encode_comfy_quant(conf)
    return out


def w4a16_to_comfy(layer: W4A16Layer, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """W4A16Layer -> comfy-kitchen awq_w4a16 tensors (zeros shifted back by 8·scale, stored in `dtype`)."""
    if layer.K % layer.group_size:
        raise ValueError(f"awq_w4a16 needs K a multiple of the group size, got K = {layer.K}, G = {layer.group_size}")
    s = layer.scales.float()
    out = {
        "weight": pack_nibbles(layer.codes),
        "weight_scale": s.t().to(dtype).contiguous(),
        "weight_zeros": (layer.zeros.float() + _AWQ_ZERO_POINT * s).t().to(dtype).contiguous(),
        "comfy_quant": encode_comfy_quant({"format": AWQ_FORMAT, "group_size": layer.group_size}),
    }
    if layer.bias is not None:
        out["bias"] = layer.bias
    return out


# --------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------

def quantized_layer_formats(keys: Iterable[str], metadata: Optional[dict], read_tensor) -> dict[str, dict]:
    """{layer name: comfy_quant dict} from `<layer>.comfy_quant` tensors, else `_quantization_metadata`.
    read_tensor(key) loads one tensor (only the small JSON tensors are read)."""
    out = {}
    for k in keys:
        if k.endswith(".comfy_quant"):
            name = k[: -len(".comfy_quant")]
            out[name] = decode_comfy_quant(read_tensor(k), name)
    if not out and metadata and "_quantization_metadata" in metadata:
        try:
            layers = json.loads(metadata["_quantization_metadata"])
        except json.JSONDecodeError as e:
            raise ValueError(f"_quantization_metadata is not JSON ({e})") from e
        layers = layers.get("layers", {}) if isinstance(layers, dict) else None
        if not isinstance(layers, dict):
            raise ValueError("_quantization_metadata has no 'layers' object ({name: {\"format\": ...}})")
        out = {name: (c if isinstance(c, dict) else {"format": c}) for name, c in layers.items()}
        no_format = [name for name, c in out.items() if "format" not in c]
        if no_format:
            raise ValueError(f"_quantization_metadata: layer {no_format[0]} has no 'format'")
    return out


class ComfyNativeCheckpoint:
    """Lazy reader of a safetensors file in ComfyUI's native svdquant layout: quantized layers by name,
    everything else as plain tensors. Errors are ValueError naming the file and the layer."""

    def __init__(self, path: str):
        self.path = str(path)
        self._f = safe_open(self.path, framework="pt", device="cpu")
        self.metadata = self._f.metadata() or {}
        keys = list(self._f.keys())
        try:
            self.formats = quantized_layer_formats(keys, self.metadata, self._f.get_tensor)
        except ValueError as e:
            raise ValueError(f"{self.path}: {e}") from e
        bad = {n: c["format"] for n, c in self.formats.items() if c["format"] not in (SVDQUANT_FORMAT, AWQ_FORMAT)}
        if bad:
            first = next(iter(bad.items()))
            raise ValueError(f"{self.path}: {len(bad)} layers use ComfyUI quantization formats other than "
                             f"{SVDQUANT_FORMAT}/{AWQ_FORMAT} (first: {first[0]} = {first[1]!r}); load this file "
                             f"with ComfyUI's 'Load Diffusion Model' instead")
        self._keys = set(keys)
        # where the per-layer formats come from, for messages: "<layer>.comfy_quant" tensors or the header's JSON
        self._listed_in = "comfy_quant" if any(k.endswith(".comfy_quant") for k in keys) else "_quantization_metadata"
        owned = {f"{name}.{s}" for name in self.formats for s in SVDQUANT_KEYS + AWQ_KEYS + OPTIONAL_KEYS
                 + ("comfy_quant",)}
        self._plain = [k for k in keys if k not in owned]
        unlisted = [k for k in self._plain if k.endswith(tuple(f".{s}" for s in SVDQUANT_KEYS[1:] + AWQ_KEYS[1:]))]
        if unlisted:
            layer = unlisted[0].rsplit(".", 1)[0]
            missing = f"the file has no {layer}.comfy_quant" if self._listed_in == "comfy_quant" else \
                f"_quantization_metadata does not list {layer}"
            raise ValueError(f"{self.path}: {unlisted[0]} is a tensor of a quantized layer, but {missing} "
                             f"({len(unlisted)} such tensors in the file); the per-layer metadata is missing for "
                             f"that layer: {INCONSISTENT}")

    def layer_names(self) -> list[str]:
        return sorted(self.formats)

    def layer_format(self, name: str) -> str:
        return self.formats[name]["format"]

    def layer(self, name: str):
        conf = self.formats[name]
        fmt = conf["format"]
        where = f"{self.path}: {name}"
        present = [s for s in SVDQUANT_KEYS + AWQ_KEYS[2:] + OPTIONAL_KEYS if f"{name}.{s}" in self._keys]
        said = f"{name}.comfy_quant says {fmt}" if self._listed_in == "comfy_quant" else \
            f"_quantization_metadata lists {name} as {fmt}"
        if not present:
            raise ValueError(f"{self.path}: {said}, but the file has no tensor {name}.* (expected {name}.weight, "
                             f"{name}.weight_scale, ...); the per-layer metadata names a layer that is not there: "
                             f"{INCONSISTENT}")
        other = AWQ_FORMAT if fmt == SVDQUANT_FORMAT else SVDQUANT_FORMAT
        foreign = [f"{name}.{s}" for s in _ONLY[other] if s in present]
        if foreign:
            lacking = [f"{name}.{s}" for s in _ONLY[fmt] if s not in present]
            raise ValueError(f"{self.path}: {said}, but the layer has {other}'s tensors ({', '.join(foreign)})"
                             + (f" and lacks {', '.join(lacking)}" if lacking else "")
                             + f": the per-layer metadata contradicts the tensors; {INCONSISTENT}")
        suffixes = SVDQUANT_KEYS if fmt == SVDQUANT_FORMAT else AWQ_KEYS
        tensors = {}
        for s in suffixes + OPTIONAL_KEYS:
            key = f"{name}.{s}"
            if key in self._keys:
                tensors[s] = self._read(key)
        if fmt == SVDQUANT_FORMAT:
            return svdquant_from_comfy(tensors, conf, where)
        return w4a16_from_comfy(tensors, conf, where)

    def plain_tensor_names(self) -> list[str]:
        return list(self._plain)

    def has_tensor(self, key: str) -> bool:
        return key in self._keys

    def tensor_info(self, key: str) -> tuple[tuple, str]:
        """(shape, safetensors dtype name such as "BF16") from the header, without reading the data."""
        s = self._f.get_slice(key)
        return tuple(s.get_shape()), s.get_dtype()

    def plain_tensor(self, name: str) -> torch.Tensor:
        return self._read(name)

    def _read(self, key: str) -> torch.Tensor:
        """One tensor's data; a float tensor holding NaN/Inf raises ValueError naming the file and the key."""
        t = self._f.get_tensor(key)
        require_finite(t, f"{self.path}: {key}")
        return t
