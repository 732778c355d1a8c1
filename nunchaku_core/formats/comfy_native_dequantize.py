"""A file in ComfyUI's per-layer SVDQuant layout (formats/comfy_native.py, what the quantizer writes by default, any
model family) for the CLI: a per-layer summary from the headers, and its effective dense weights.

Dequantizing writes, under the file's own names, W_eff = Deq(R)/s + U·Dᵀ and the bias that goes with it
(reference.effective_weight / effective_bias: a σ-shifted layer's bias takes back the shift) for every svdquant_w4a4
layer, w = q·scale + zero for every awq_w4a16 layer, and every other tensor as stored; float tensors in the asked
dtype. So ComfyUI's stock 'Load Diffusion Model' loads the result as the family's ordinary model, whose Linears
compute what the 4-bit ones compute without their activation quantization. Written one tensor at a time
(safetensors_stream.py): peak memory is one layer's fp32 working set.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open

from .. import reference
from .comfy_native import AWQ_FORMAT, AWQ_KEYS, OPTIONAL_KEYS, SVDQUANT_KEYS, ComfyNativeCheckpoint
from .nunchaku import natural_key
from .safetensors_stream import DTYPES_BY_NAME, StreamingSafetensorsWriter

_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def is_comfy_native(path) -> bool:
    """A .safetensors file whose layers are listed as ComfyUI quantized layers (`.comfy_quant` tensors or the
    header's `_quantization_metadata`)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return ("_quantization_metadata" in (f.metadata() or {})
                    or any(k.endswith(".comfy_quant") for k in f.keys()))
    except Exception:       # noqa: BLE001 (not a safetensors file: the Nunchaku reader says what it is)
        return False


def _header(path: str) -> dict[str, tuple[tuple, torch.dtype]]:
    with safe_open(path, framework="pt", device="cpu") as f:
        out = {}
        for k in f.keys():
            s = f.get_slice(k)
            out[k] = (tuple(s.get_shape()), DTYPES_BY_NAME[s.get_dtype()])
        return out


def _nbytes(shape: tuple, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def layer_rows(ckpt: ComfyNativeCheckpoint) -> list[dict]:
    """One row per quantized layer from the headers only: name, kind (w4a4 | w4a16), N, K, R, G, shifted, params
    (a 4-bit code counts as one value), bytes (the layer's tensors in the file)."""
    head = _header(ckpt.path)
    rows = []
    for name in sorted(ckpt.layer_names(), key=natural_key):
        conf = ckpt.formats[name]
        suffixes = (AWQ_KEYS if conf["format"] == AWQ_FORMAT else SVDQUANT_KEYS) + OPTIONAL_KEYS
        info = {s: head[f"{name}.{s}"] for s in suffixes if f"{name}.{s}" in head}
        w = info["weight"][0]
        N, K = (w[0] * 128, w[1] * 64) if len(w) == 4 else (w[0], w[1] * 2)      # tile-packed or natural
        params = N * K + sum(math.prod(shape) for s, (shape, _) in info.items() if s != "weight")
        if conf["format"] == AWQ_FORMAT:
            kind, R, G, shifted = "w4a16", 0, int(conf.get("group_size", 64)), False
        else:
            kind, R, G, shifted = "w4a4", info["weight_proj_down"][0][1], 64, bool(conf.get("act_unsigned", False))
        rows.append(dict(name=name, kind=kind, N=N, K=K, R=R, G=G, shifted=shifted, params=params,
                         bytes=sum(_nbytes(shape, dt) for shape, dt in info.values())))
    return rows


def plain_totals(ckpt: ComfyNativeCheckpoint) -> tuple[int, int, int]:
    """(count, params, bytes) of the tensors that are not part of a quantized layer."""
    head = _header(ckpt.path)
    names = ckpt.plain_tensor_names()
    return (len(names), sum(math.prod(head[k][0]) for k in names),
            sum(_nbytes(*head[k]) for k in names))


def dequantize_comfy_native(ckpt: ComfyNativeCheckpoint, out_path, dtype: torch.dtype = torch.bfloat16,
                            progress: Optional[Callable[[int, int, str], None]] = None) -> int:
    """Write the effective dense state dict (module docstring) to out_path; returns the number of tensors."""
    head = _header(ckpt.path)
    rows = {r["name"]: r for r in layer_rows(ckpt)}
    specs: list[tuple[str, torch.dtype, tuple]] = []
    for name, r in rows.items():
        specs.append((f"{name}.weight", dtype, (r["N"], r["K"])))
        if f"{name}.bias" in head or r["shifted"]:       # a shifted layer's effective bias takes back the shift
            specs.append((f"{name}.bias", dtype, (r["N"],)))
    for k in ckpt.plain_tensor_names():
        shape, dt = head[k]
        specs.append((k, dtype if dt in _FLOATS else dt, shape))
    specs.sort(key=lambda e: natural_key(e[0]))
    layer_of = {f"{n}.{leaf}": n for n in rows for leaf in ("weight", "bias")}
    spec_keys = {k for k, _, _ in specs}

    meta = {"source": str(ckpt.path), "format": "dense, dequantized from ComfyUI's svdquant layout"}
    if "svdquant_quantizer" in ckpt.metadata:
        meta["svdquant_quantizer"] = ckpt.metadata["svdquant_quantizer"]
    cached: dict[str, torch.Tensor] = {}          # a layer's weight or bias, made with its other half
    with StreamingSafetensorsWriter(str(out_path), specs, meta) as w:
        for i, (key, dt, _) in enumerate(specs):
            name = layer_of.get(key)
            if name is None:
                t = ckpt.plain_tensor(key)
            elif key in cached:
                t = cached.pop(key)
            else:
                layer = ckpt.layer(name)
                if rows[name]["kind"] == "w4a4":
                    parts = {f"{name}.weight": reference.effective_weight(layer),
                             f"{name}.bias": reference.effective_bias(layer)}
                else:
                    parts = {f"{name}.weight": reference.dequantize_w4a16(layer), f"{name}.bias": layer.bias}
                del layer
                t = parts.pop(key)
                (other, rest), = parts.items()
                if other in spec_keys:
                    cached[other] = rest.to(dtype)
            w.write(key, t.to(dt))
            if progress:
                progress(i + 1, len(specs), key)
    return len(specs)


def quantizer_info(ckpt: ComfyNativeCheckpoint) -> Optional[dict]:
    """The quantizer's JSON in the file's metadata (family, rank, calibration, ...), if it wrote one."""
    raw = ckpt.metadata.get("svdquant_quantizer")
    try:
        return json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None
