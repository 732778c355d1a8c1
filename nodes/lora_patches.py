"""ComfyUI weight patches (LoRAs) on SVDQuant Linears.

ComfyUI's LoRA loaders put patches on weight keys (comfy.lora.load_lora -> ModelPatcher.add_patches); every entry
of ModelPatcher.patches[key] is (strength, adapter, strength_model, offset, function), and stock ComfyUI adds
them to the dense weight at load time. A quantized Linear has no dense weight. Here its patches become:

- plain LoRA (comfy.weight_adapter.LoRAAdapter: up [n, r], down [r, k], alpha; no DoRA, no LoCon mid): a
  low-rank term ΔW = s·up·downᵀ with s = strength·alpha/r, taken as is. An `offset` (dim 0, start, size) -- how
  ComfyUI maps diffusers' separate to_q/to_k/to_v (and single blocks' proj_mlp) onto the fused qkv / linear1 --
  places up in those rows (zeros elsewhere); dim 1 places down in those input columns;
- anything else (LoHa, LoKr, DoRA, full diffs, "set", GLoRA, OFT/BOFT, a `function`): ComfyUI's own
  comfy.lora.calculate_weight on the dequantized effective weight, and the difference compressed to the
  smallest rank keeping `ENERGY` of its squared Frobenius norm (nunchaku_core.lora.compress_to_lowrank), logged
  per layer with the rank and the relative error. A patch that changes nothing at non-zero strength (ComfyUI
  logged an error computing it) or needs more rank than the kernels take raises LoRAError: never a silent
  no-op;
- bias patches (diff_b, BFL control LoRAs' lora_B.bias): added to the layer's bias exactly (fp32).

The terms of one Linear are then split over its quantized parts (nodes/checkpoint.QuantizedLinear: rows for
"out", input columns for "in") and joined to each part's low-rank branch (SVDQuantLinear.with_lora: D ← [D |
down], U ← [U | s·up], fp32, no re-quantization) or, on a W4A16 modulation part, run beside it as a
LowRankDelta. A part that no term reaches keeps its original module, so strength 0 (terms dropped) and removing
the LoRA are bit-identical to never having applied it.

Cost: a LoRA term costs its rank in the low-rank branch at run time, and joining it costs O((N + K)·r) copies
per layer, independent of the other LoRAs; only the dense path (compression) is expensive, and its result is
cached per layer and patch, so changing another LoRA's strength does not redo it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import comfy.lora
import comfy.weight_adapter
import torch

from nunchaku_core.kernels import cpu_packing
from nunchaku_core import reference
from nunchaku_core.linear import SVDQuantLinear
from nunchaku_core.lora import LowRankDelta, compress_to_lowrank, split_cols, split_rows

log = logging.getLogger("SVDQuant")

ENERGY = float(os.environ.get("SVDQ_LORA_ENERGY", "0.999"))   # kept fraction of ‖ΔW‖²_F for non-low-rank patches


class LoRAError(ValueError):
    """A LoRA patch that cannot be applied to an SVDQuant layer (the message names the key and the fix)."""


@dataclass
class Term:
    """One low-rank contribution to a whole (ComfyUI) Linear: ΔW = scale·up·downᵀ; down [K, r], up [N, r]."""
    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[1]

    def dense(self) -> torch.Tensor:
        """ΔW, fp32 [N, K]."""
        return self.scale * (self.up.float() @ self.down.float().T)


def _file_key(adapter) -> str:
    """The LoRA file's tensor name behind an adapter, for messages."""
    keys = sorted(getattr(adapter, "loaded_keys", ()) or ())
    return keys[0] if keys else type(adapter).__name__


def _target_shape(shape: tuple, offset) -> tuple:
    if offset is None:
        return tuple(shape)
    dim, _, size = offset
    out = list(shape)
    out[dim] = size
    return tuple(out)


def is_plain_lora(patch) -> bool:
    """A LoRAAdapter patch that is exactly up·down (no DoRA, LoCon mid, reshape or function)."""
    _, v, _, _, function = patch
    if type(v) is not comfy.weight_adapter.LoRAAdapter or function is not None:
        return False
    up, down, _, mid, dora, reshape = v.weights
    return mid is None and dora is None and reshape is None and up.dim() == 2 and down.dim() == 2


def check_patch(key: str, patch, shape: tuple, quantized: bool) -> None:
    """Raise LoRAError for a patch whose shapes cannot apply to a weight of `shape` (what stock ComfyUI would log
    and skip), and, on a quantized layer, for patch kinds it cannot take. Called before any patch is stored."""
    strength, v, strength_model, offset, function = patch
    target = _target_shape(shape, offset)
    where = f"{key}{'' if offset is None else f' rows {offset[1]}..{offset[1] + offset[2]}'}"
    if isinstance(v, comfy.weight_adapter.LoRAAdapter) and v.weights[5] is None:
        up, down = v.weights[0], v.weights[1]
        n, k = up.shape[0], down.flatten(start_dim=1).shape[1]
        if up.shape[1] != down.shape[0] or n * k != torch.Size(target).numel() or n != target[0]:
            raise LoRAError(
                f"LoRA tensor {_file_key(v)}: up {list(up.shape)} x down {list(down.shape)} gives a [{n}, {k}] "
                f"update, but the model's {where} is {list(target)}. The LoRA was made for another model (another "
                f"FLUX variant or width); use a LoRA made for this model. Nothing was applied.")
    elif isinstance(v, tuple) and len(v) == 2 and v[0] == "diff" and not (len(v[1]) > 1 and v[1][1].get("pad_weight")):
        if tuple(v[1][0].shape) != target:
            raise LoRAError(f"LoRA patch for {where}: a full difference of shape {list(v[1][0].shape)}, the model's "
                            f"weight is {list(target)}. The LoRA was made for another model. Nothing was applied.")
    if not quantized:
        return
    if strength_model != 1.0:
        raise LoRAError(f"{key}: a patch with strength_model = {strength_model} (model merging) on an SVDQuant layer; "
                        f"merging quantized models is not supported, merge the unquantized models and quantize the "
                        f"result")
    if isinstance(v, list) or (isinstance(v, tuple) and len(v) == 2 and v[0] == "model_as_lora"):
        raise LoRAError(f"{key}: a model-merge patch ({'nested' if isinstance(v, list) else v[0]}) on an SVDQuant "
                        f"layer is not supported; merge the unquantized models and quantize the result")


def _lora_term(patch, N: int, K: int) -> Term:
    """A plain LoRA patch on an [N, K] Linear -> its Term (offset placement, scale = strength·alpha/rank)."""
    strength, v, _, offset, _ = patch
    up, down, alpha = v.weights[0], v.weights[1], v.weights[2]
    r = down.shape[0]
    scale = float(strength) * (alpha / r if alpha is not None else 1.0)
    down_t = down.T                                                       # [k, r]
    if offset is not None:
        dim, start, size = offset
        full = torch.zeros((N if dim == 0 else K, r), dtype=up.dtype)
        if dim == 0:
            full[start:start + size] = up
            up = full
        else:
            full[start:start + size] = down_t
            down_t = full
    return Term(down_t, up, scale)


def _dense_weight(parts, split: str) -> torch.Tensor:
    """The effective fp32 weight of the whole Linear (its parts' W_eff side by side), for patches that need it."""
    ws = [reference.effective_weight(m.layer) if isinstance(m, SVDQuantLinear) else reference.dequantize_w4a16(m.layer)
          for m in parts]
    return torch.cat(ws, dim=1 if split == "in" else 0).float().cpu()


def _dense_term(patch, weight: torch.Tensor, key: str, energy: float, max_rank: int) -> tuple[Term, torch.Tensor]:
    """A non-low-rank patch through ComfyUI's calculate_weight on `weight` (fp32 [N, K]) -> (its compressed Term,
    the exact patched weight)."""
    strength, v = patch[0], patch[1]
    patched = comfy.lora.calculate_weight([patch], weight.clone(), key)
    delta = patched - weight
    if strength != 0 and not bool(delta.any()):
        raise LoRAError(f"{key}: the {getattr(v, 'name', v[0] if isinstance(v, tuple) else type(v).__name__)} patch "
                        f"({_file_key(v)}) changed nothing at strength {strength}; ComfyUI could not compute it (see "
                        f"the error logged above). Nothing was applied.")
    try:
        down, up, info = compress_to_lowrank(delta, energy, max_rank, name=key)
    except ValueError as e:
        raise LoRAError(f"{e}. Set SVDQ_LORA_ENERGY lower (now {energy}) to accept a larger approximation error, or "
                        f"use a LoRA of a low-rank kind (plain LoRA) for SVDQuant models.") from e
    log.info("SVDQuant LoRA: %s: %s patch compressed to rank %d of %d (energy %.5f, relative error %.3g)", key,
             getattr(v, "name", type(v).__name__), info["rank"], info["full_rank"], info["energy"], info["rel_error"])
    return Term(down, up, 1.0), patched


def _effective_bias(m) -> torch.Tensor:
    """A part's bias as the layer output sees it, fp32 [N] (shifted SVDQuant layers: reference.effective_bias)."""
    if isinstance(m, SVDQuantLinear):
        return reference.effective_bias(m.layer).float().cpu()
    return m.bias.float().cpu() if m.bias is not None else torch.zeros(m.out_features)


def _bias_delta(patches, parts, split: str, key: str) -> Optional[torch.Tensor]:
    """The change of the Linear's effective bias from its bias patches, fp32 [N], or None."""
    if not patches:
        return None
    N = parts[0].out_features if split == "in" else sum(m.out_features for m in parts)
    simple = all(isinstance(p[1], tuple) and len(p[1]) in (1, 2) and (len(p[1]) == 1 or p[1][0] == "diff")
                 and p[2] == 1.0 and p[3] is None and p[4] is None for p in patches)
    if simple:   # the common case (diff_b): strength·diff, no need to know the bias itself
        total = torch.zeros(N)
        for p in patches:
            diff = p[1][0] if len(p[1]) == 1 else p[1][1][0]
            total += float(p[0]) * diff.float().cpu()
        return total
    biases = [_effective_bias(m) for m in parts]
    b = torch.cat(biases) if split == "out" else torch.stack(biases).sum(dim=0)   # "in": the parts' outputs add
    return comfy.lora.calculate_weight(list(patches), b.clone(), key) - b


class _Ref:
    """An object compared by identity, and kept alive (so an id is never reused while a signature holds it)."""
    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Ref) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def signature(patches) -> tuple:
    """What a patch list is, for reuse and caching: the adapters (by identity), strengths, offsets, functions."""
    return tuple((_Ref(p[1]), float(p[0]), float(p[2]), p[3], _Ref(p[4])) for p in patches)


class DenseCache:
    """Compressed Terms of non-low-rank patches, per layer key and patch sequence up to that patch (the dense
    weight depends on the patches before it). keep_only_used() drops what the last load did not use."""

    def __init__(self):
        self._d: dict = {}
        self._used: set = set()

    def get(self, key, make):
        """make() once per key (keys hold their adapters: see signature)."""
        self._used.add(key)
        if key not in self._d:
            self._d[key] = make()
        return self._d[key]

    def keep_only_used(self) -> None:
        self._d = {k: v for k, v in self._d.items() if k in self._used}
        self._used = set()


def build_lora_parts(module, weight_patches, bias_patches, key: str, cache: DenseCache,
                     energy: float = ENERGY) -> Optional[list]:
    """The parts of a quantized ComfyUI Linear (nodes/ops.py _QuantLinear) with these patches joined, or None
    when they change nothing (every strength 0). `module` is not modified."""
    parts, split = list(module.parts), module.split
    N, K = module.out_features, module.in_features
    base_rank = max((m.rank for m in parts if isinstance(m, SVDQuantLinear)), default=0)
    terms: list[Term] = []
    dense_w = None                    # the exact patched weight so far, once a dense patch needs it
    for i, patch in enumerate(weight_patches):
        if is_plain_lora(patch):
            t = _lora_term(patch, N, K)
            if dense_w is not None and t.scale != 0:
                dense_w = dense_w + t.dense()
        else:
            if dense_w is None:
                dense_w = _dense_weight(parts, split)
                for t0 in terms:
                    dense_w = dense_w + t0.dense()
            budget = cpu_packing.MAX_RANK - base_rank - sum(t0.rank for t0 in terms)
            w_in = dense_w
            t, dense_w = cache.get((key, signature(weight_patches[:i + 1])),
                                   lambda: _dense_term(patch, w_in, key, energy, budget))
        if t.scale != 0 and t.rank > 0:
            terms.append(t)
    db = _bias_delta(bias_patches, parts, split, key)
    if db is not None and not bool(db.any()):
        db = None
    if not terms and db is None:
        return None
    return _split_over_parts(parts, split, terms, db)


def _split_over_parts(parts, split: str, terms: list, db: Optional[torch.Tensor]) -> list:
    """The Linear's terms and bias change cut over its parts (nunchaku_core.lora.split_rows / split_cols), each
    part joined with its share; parts nothing reaches stay the very same modules."""
    sizes = [(j, m.in_features if split == "in" else m.out_features) for j, m in enumerate(parts)]
    cut = split_cols if split == "in" else split_rows
    shares = [cut(t.down, t.up, sizes) for t in terms]
    out, start = [], 0
    for j, m in enumerate(parts):
        mine = [(*s[j], t.scale) for s, t in zip(shares, terms) if s[j][0].shape[1]]
        downs, ups, scales = (list(x) for x in zip(*mine)) if mine else ([], [], [])
        bias = m.bias
        if db is not None and (split == "out" or j == 0):
            part_db = db[start:start + sizes[j][1]] if split == "out" else db
            bias = ((bias.float().cpu() if bias is not None else torch.zeros(m.out_features)) + part_db).to(m.device)
        start += sizes[j][1]
        if not downs and bias is m.bias:
            out.append(m)
        elif isinstance(m, SVDQuantLinear):
            out.append(m.with_lora(downs, ups, scales, bias.float() if bias is not None else None))
        else:
            delta = LowRankDelta([d.to(m.device) for d in downs], [u.to(m.device) for u in ups], scales) if downs \
                else None
            out.append(m.with_delta(delta, bias))
    return out
