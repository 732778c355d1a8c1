"""Export the effective weights of a Nunchaku FLUX checkpoint as a BFL/ComfyUI Flux state dict.

W4A4 layers become W_eff = out_scale·Deq(R)/s + U·Dᵀ with the effective bias (FORMAT.md §1), W4A16
modulation layers their dequantized weights, the single block's `linear1`/`linear2` are reassembled from
their parts, and the unquantized layers are renamed (FORMAT.md §2). ComfyUI's stock "Load Diffusion
Model" loads the result. Written one tensor at a time (StreamingSafetensorsWriter), so memory stays at
one layer however large the model.
"""
from __future__ import annotations

import json
import re
from typing import Callable, Iterator

import torch

from ..models import flux
from .. import reference
from .nunchaku import NunchakuCheckpoint
from .safetensors_stream import StreamingSafetensorsWriter

Producer = Callable[[], torch.Tensor]


def _block_indices(names: list[str], prefix: str) -> list[int]:
    pat = re.compile(rf"^{prefix}\.(\d+)\.")
    return sorted({int(m.group(1)) for n in names if (m := pat.match(n))})


def _w4a4_name(ckpt: NunchakuCheckpoint, block: str, cpp: str, py: str) -> str:
    """The layer's module path in this file (C++ or Python naming)."""
    return f"{block}.{cpp if ckpt.naming == 'cpp' else py}"


def plan(ckpt: NunchakuCheckpoint, dtype: torch.dtype) -> list[tuple[str, tuple, Producer]]:
    """Every output tensor as (BFL key, shape, producer), in file order. Shapes come from layer summaries,
    so planning loads no quantized tensor data."""
    out: list[tuple[str, tuple, Producer]] = []
    used: set[str] = set()
    svdq = set(ckpt.svdquant_layer_names())
    w4a16 = set(ckpt.w4a16_layer_names())
    plain = set(ckpt.plain_tensor_names())

    def shape_of(layer: str) -> tuple[int, int]:
        s = ckpt.layer_summary(layer)
        return s["N"], s["K"]

    def need(name: str, pool: set[str], what: str) -> str:
        if name not in pool:
            raise ValueError(f"{ckpt.path}: missing {what} {name!r} needed for the Flux export")
        used.add(name)
        return name

    def w_eff(name):
        return lambda: reference.effective_weight(ckpt.svdquant_layer(name)).to(dtype)

    def b_eff(name):
        return lambda: reference.effective_bias(ckpt.svdquant_layer(name)).to(dtype)

    def w4a16_weight(name):
        return lambda: reference.dequantize_w4a16(ckpt.w4a16_layer(name)).to(dtype)

    def w4a16_bias(name):
        def make():
            layer = ckpt.w4a16_layer(name)
            return (layer.bias.float() if layer.bias is not None else torch.zeros(layer.N)).to(dtype)
        return make

    def copy(name, transform=None):
        def make():
            t = ckpt.plain_tensor(name)
            t = transform(t) if transform else t
            return t.to(dtype) if t.is_floating_point() else t
        return make

    def add_w4a16(bfl_prefix: str, name: str):
        N, K = shape_of(need(name, w4a16, "W4A16 layer"))
        out.append((f"{bfl_prefix}.weight", (N, K), w4a16_weight(name)))
        out.append((f"{bfl_prefix}.bias", (N,), w4a16_bias(name)))

    all_names = sorted(svdq | w4a16 | plain)
    for i in _block_indices(all_names, flux.DOUBLE_PREFIX):
        block, bfl = f"{flux.DOUBLE_PREFIX}.{i}", f"double_blocks.{i}"
        for b_suffix, cpp, py in flux.DOUBLE_W4A4:
            name = need(_w4a4_name(ckpt, block, cpp, py), svdq, "SVDQuant layer")
            N, K = shape_of(name)
            out.append((f"{bfl}.{b_suffix}.weight", (N, K), w_eff(name)))
            out.append((f"{bfl}.{b_suffix}.bias", (N,), b_eff(name)))
        for b_suffix, nname, _ in flux.DOUBLE_W4A16:
            add_w4a16(f"{bfl}.{b_suffix}", f"{block}.{nname}")
        for b_suffix, cpp, py in flux.DOUBLE_NORMS:
            key = need(f"{block}.{cpp if ckpt.naming == 'cpp' else py}", plain, "tensor")
            out.append((f"{bfl}.{b_suffix}", tuple(ckpt.plain_tensor(key).shape), copy(key)))

    for i in _block_indices(all_names, flux.SINGLE_PREFIX):
        block, bfl = f"{flux.SINGLE_PREFIX}.{i}", f"single_blocks.{i}"
        parts1 = [need(f"{block}.{n}", svdq, "SVDQuant layer") for n, _ in flux.SINGLE_LINEAR1]
        parts2 = [need(f"{block}.{n}", svdq, "SVDQuant layer") for n, _ in flux.SINGLE_LINEAR2]
        shapes1 = [shape_of(p) for p in parts1]
        shapes2 = [shape_of(p) for p in parts2]
        n1, k1 = sum(s[0] for s in shapes1), shapes1[0][1]
        n2, k2 = shapes2[0][0], sum(s[1] for s in shapes2)
        out.append((f"{bfl}.linear1.weight", (n1, k1), lambda p=parts1: torch.cat([w_eff(n)() for n in p], 0)))
        out.append((f"{bfl}.linear1.bias", (n1,), lambda p=parts1: torch.cat([b_eff(n)() for n in p], 0)))
        out.append((f"{bfl}.linear2.weight", (n2, k2), lambda p=parts2: torch.cat([w_eff(n)() for n in p], 1)))
        # linear2's bias is the sum: each part contributes its own effective bias (out_proj's is zero in
        # files from the original tooling, where mlp_fc2 carries the real bias).
        out.append((f"{bfl}.linear2.bias", (n2,), lambda p=parts2: sum(
            reference.effective_bias(ckpt.svdquant_layer(n)) for n in p).to(dtype)))
        for b_suffix, nname, _ in flux.SINGLE_W4A16:
            add_w4a16(f"{bfl}.{b_suffix}", f"{block}.{nname}")
        for b_suffix, cpp, py in flux.SINGLE_NORMS:
            key = need(f"{block}.{cpp if ckpt.naming == 'cpp' else py}", plain, "tensor")
            out.append((f"{bfl}.{b_suffix}", tuple(ckpt.plain_tensor(key).shape), copy(key)))

    try:
        unquantized = flux.unquantized_keys(plain)
    except KeyError as e:
        raise ValueError(f"{ckpt.path}: missing tensor {e.args[0]!r} needed for the Flux export") from None
    for bfl_key, key, swapped in unquantized:
        used.add(key)
        out.append((bfl_key, tuple(ckpt.plain_tensor(key).shape), copy(key, flux.swap_halves if swapped else None)))

    leftover = sorted((svdq | w4a16 | plain) - used)
    if leftover:
        raise ValueError(f"{ckpt.path}: {len(leftover)} tensors/layers have no place in a FLUX.1 state dict "
                         f"(first: {leftover[:5]}); is this a FLUX.1 checkpoint?")
    return out


def iter_effective_state_dict(ckpt: NunchakuCheckpoint, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """(BFL key, tensor) pairs, one at a time."""
    for key, _, make in plan(ckpt, dtype):
        yield key, make()


def dequantize_file(ckpt: NunchakuCheckpoint, out_path: str, dtype: torch.dtype = torch.bfloat16,
                    progress: Callable[[int, int, str], None] | None = None) -> int:
    """Write the effective Flux state dict to out_path; returns the number of tensors written."""
    entries = plan(ckpt, dtype)
    meta = {"source": str(ckpt.path), "format": "flux-bfl-dequantized-from-svdquant"}
    if ckpt.comfy_config:
        meta["comfy_config"] = json.dumps(ckpt.comfy_config)
    specs = [(k, dtype, shape) for k, shape, _ in entries]
    with StreamingSafetensorsWriter(out_path, specs, meta) as w:
        for i, (key, _, make) in enumerate(entries):
            w.write(key, make())
            if progress:
                progress(i + 1, len(entries), key)
    return len(entries)
