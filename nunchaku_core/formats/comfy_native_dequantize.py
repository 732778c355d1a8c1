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


def _info(ckpt: ComfyNativeCheckpoint, key: str) -> tuple[tuple, torch.dtype]:
    shape, name = ckpt.tensor_info(key)
    return shape, DTYPES_BY_NAME[name]


def _nbytes(shape: tuple, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def layer_rows(ckpt: ComfyNativeCheckpoint) -> list[dict]:
    """One row per quantized layer from the header only: name, kind (w4a4 | w4a16), N, K, R, G, shifted, has_bias,
    params (a 4-bit code counts as one value), bytes (the layer's tensors in the file)."""
    rows = []
    for name in sorted(ckpt.layer_names(), key=natural_key):
        conf = ckpt.formats[name]
        suffixes = (AWQ_KEYS if conf["format"] == AWQ_FORMAT else SVDQUANT_KEYS) + OPTIONAL_KEYS
        info = {s: _info(ckpt, f"{name}.{s}") for s in suffixes if ckpt.has_tensor(f"{name}.{s}")}
        w = info["weight"][0]
        N, K = (w[0] * 128, w[1] * 64) if len(w) == 4 else (w[0], w[1] * 2)      # tile-packed or natural
        params = N * K + sum(math.prod(shape) for s, (shape, _) in info.items() if s != "weight")
        if conf["format"] == AWQ_FORMAT:
            kind, R, G, shifted = "w4a16", 0, int(conf.get("group_size", 64)), False
        else:
            kind, R, G, shifted = "w4a4", info["weight_proj_down"][0][1], 64, bool(conf.get("act_unsigned", False))
        rows.append(dict(name=name, kind=kind, N=N, K=K, R=R, G=G, shifted=shifted, has_bias="bias" in info,
                         params=params, bytes=sum(_nbytes(shape, dt) for shape, dt in info.values())))
    return rows


def plain_totals(ckpt: ComfyNativeCheckpoint) -> tuple[int, int, int]:
    """(count, params, bytes) of the tensors that are not part of a quantized layer."""
    infos = [_info(ckpt, k) for k in ckpt.plain_tensor_names()]
    return len(infos), sum(math.prod(shape) for shape, _ in infos), sum(_nbytes(*i) for i in infos)


def dequantize_comfy_native(ckpt: ComfyNativeCheckpoint, out_path, dtype: torch.dtype = torch.bfloat16,
                            progress: Optional[Callable[[int, int, str], None]] = None) -> int:
    """Write the effective dense state dict (module docstring) to out_path, each layer's weight then its bias, then
    the other tensors; returns the number of tensors."""
    rows = layer_rows(ckpt)
    plain = {k: _info(ckpt, k) for k in ckpt.plain_tensor_names()}
    # a shifted layer always gets a bias: its effective bias takes back the shift
    biased = {r["name"] for r in rows if r["has_bias"] or r["shifted"]}
    specs = []
    for r in rows:
        specs.append((f"{r['name']}.weight", dtype, (r["N"], r["K"])))
        if r["name"] in biased:
            specs.append((f"{r['name']}.bias", dtype, (r["N"],)))
    specs += [(k, dtype if dt in _FLOATS else dt, shape) for k, (shape, dt) in plain.items()]

    meta = {"source": str(ckpt.path), "format": "dense, dequantized from ComfyUI's svdquant layout"}
    if "svdquant_quantizer" in ckpt.metadata:
        meta["svdquant_quantizer"] = ckpt.metadata["svdquant_quantizer"]
    done = 0
    with StreamingSafetensorsWriter(str(out_path), specs, meta) as w:
        def put(key: str, t: torch.Tensor, dt: torch.dtype) -> None:
            nonlocal done
            w.write(key, t.to(dt))
            done += 1
            if progress:
                progress(done, len(specs), key)

        for r in rows:
            layer = ckpt.layer(r["name"])
            if r["kind"] == "w4a4":
                weight, bias = reference.effective_weight(layer), reference.effective_bias(layer)
            else:
                weight, bias = reference.dequantize_w4a16(layer), layer.bias
            put(f"{r['name']}.weight", weight, dtype)
            if r["name"] in biased:
                put(f"{r['name']}.bias", bias, dtype)
        for k, (_, dt) in plain.items():
            put(k, ckpt.plain_tensor(k), dtype if dt in _FLOATS else dt)
    return len(specs)


def quantizer_info(ckpt: ComfyNativeCheckpoint) -> Optional[dict]:
    """The quantizer's JSON in the file's metadata (family, rank, calibration, ...), if it wrote one."""
    raw = ckpt.metadata.get("svdquant_quantizer")
    try:
        return json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None
