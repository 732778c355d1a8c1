"""LoRA on SVDQuant layers: the ComfyUI-independent math.

A LoRA adds ΔW = s·up·downᵀ (s = strength·alpha/rank) to a weight. An SVDQuant layer already computes a
16-bit low-rank branch U·(Dᵀ·x) on the raw input (FORMAT.md §1), so the LoRA joins that branch:

    D ← [D | down_1 | down_2 ...]      U ← [U | s_1·up_1 | s_2·up_2 ...]

and the 4-bit residual, the smoothing, the σ shift and the bias stay as they are (no re-quantization; the
low-rank branch acts on raw x, so shifted layers need no bias change either). Layers are never modified:
`extend_lowrank` returns a new layer that shares the 4-bit tensors, so removing every LoRA means going back to
the original object, bit for bit.

Conventions (ours, not the LoRA files'): down is [K, r] (the layer's D layout; a file's `lora_down.weight` is
[r, K] and must be transposed), up is [N, r], and the scale is applied to up.

Also here: placing LoRAs on row slices of a fused output (q, k, v of `img_attn.qkv`), splitting a LoRA of
ComfyUI's fused single-block `linear1` / `linear2` over the two SVDQuant layers that hold them, a separate
fp32 low-rank branch for W4A16 (modulation) layers, and SVD compression of non-low-rank patches.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from .models import flux
from .layer import SVDQuantLayer, W4A16Layer


def _check_part(where: str, down: torch.Tensor, up: torch.Tensor, K: int, N: int) -> None:
    if down.dim() != 2 or up.dim() != 2 or down.shape[0] != K or up.shape[0] != N or down.shape[1] != up.shape[1]:
        raise ValueError(f"{where}: down {list(down.shape)} / up {list(up.shape)}, expected down [K, r] = [{K}, r] "
                         f"and up [N, r] = [{N}, r] with the same r (a file's lora_down.weight is [r, K]: transpose it)")


def extend_lowrank(layer: SVDQuantLayer, downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor],
                   scales: Sequence[float], dtype: Optional[torch.dtype] = None) -> SVDQuantLayer:
    """A new layer whose low-rank branch also carries the LoRAs: D ← [D | down_i ...], U ← [U | s_i·up_i ...].

    downs[i]: [K, r_i], ups[i]: [N, r_i], any float dtype; scales[i] = strength·alpha/rank.
    The layer is not modified; the new one shares every tensor except proj_down / proj_up. Parts with scale 0
    or rank 0 are left out (strength 0 is then exactly the original W_eff, at no run-time cost).

    Dtype: `dtype` if given (the whole branch, original columns included, is converted to it), else the layer's
    low-rank dtype (bf16 in every file we know). s·up is formed in fp32 and rounded once, so with bf16 each
    new element of U and D carries one rounding (relative ≤ 2^-8) and each element of the added ΔW is within
    (2·2^-8 + 2^-16)·Σ_r |s·up|·|down| of the exact one. That is far below the 4-bit residual's error (an
    int4 step is 1/7 of a group's absmax). With dtype=float32 (what the ComfyUI LoRA path uses: the CPU
    kernels keep the branch in fp32 anyway) bf16 or fp32 LoRA weights are stored exactly and only s·up rounds,
    once, to fp32; the original bf16 columns convert to fp32 exactly, so strength 0 stays the original W_eff.
    """
    if not (len(downs) == len(ups) == len(scales)):
        raise ValueError(f"extend_lowrank: {len(downs)} downs, {len(ups)} ups, {len(scales)} scales; expected one "
                         f"of each per LoRA")
    dtype, device = dtype or layer.proj_down.dtype, layer.proj_down.device
    new_d, new_u = [layer.proj_down.to(dtype)], [layer.proj_up.to(dtype)]
    for i, (down, up, s) in enumerate(zip(downs, ups, scales)):
        _check_part(f"extend_lowrank: LoRA {i}", down, up, layer.K, layer.N)
        if s == 0 or down.shape[1] == 0:
            continue
        new_d.append(down.to(device=device, dtype=dtype))
        new_u.append((up.to(device=device, dtype=torch.float32) * float(s)).to(dtype))   # one rounding of s·up
    if len(new_d) == 1:
        return dataclasses.replace(layer, proj_down=new_d[0], proj_up=new_u[0])
    return dataclasses.replace(layer, proj_down=torch.cat(new_d, dim=1), proj_up=torch.cat(new_u, dim=1))


def lora_for_rows(N: int, parts: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRAs on row slices of a fused [N, K] output -> one (down [K, Σr], up [N, Σr]) fp32 pair, scales folded
    into up (pass scale 1 to extend_lowrank).

    parts: (offset, size, down [K, r], up [size, r], scale), ComfyUI's offset patch (dim 0, offset, size).
    Part i's up fills rows offset..offset+size of its own columns, zeros elsewhere: q, k and v with different
    down matrices become a block-diagonal arrangement of the concatenated branch (Σr columns, not max r).
    Parts may overlap in rows (two LoRAs on q add up).
    """
    if not parts:
        raise ValueError("lora_for_rows: no parts")
    K = parts[0][2].shape[0]
    downs, ups = [], []
    for i, (offset, size, down, up, scale) in enumerate(parts):
        if offset < 0 or size <= 0 or offset + size > N:
            raise ValueError(f"lora_for_rows: part {i} rows {offset}..{offset + size} lie outside the fused output "
                             f"of {N} rows")
        _check_part(f"lora_for_rows: part {i} (offset {offset})", down, up, K, size)
        block = up.new_zeros((N, up.shape[1]), dtype=torch.float32)                      # block: [N, r_i]
        block[offset:offset + size] = up.float() * float(scale)
        downs.append(down.float())
        ups.append(block)
    return torch.cat(downs, dim=1), torch.cat(ups, dim=1)


def _nonzero_columns(t: torch.Tensor) -> torch.Tensor:
    """Columns of t [*, r] that are not all zero (an all-zero column contributes nothing to up·downᵀ)."""
    return (t != 0).any(dim=0).nonzero().flatten()


def _split(down: torch.Tensor, up: torch.Tensor, sizes: Sequence[tuple[str, int]], along: str) -> dict:
    """Cut a LoRA into consecutive slices of up's rows (along="rows") or down's rows (along="cols", the layer's
    input columns); the other factor is shared. Rank columns whose sliced factor is all zero are dropped."""
    sliced = up if along == "rows" else down
    total = sum(n for _, n in sizes)
    if sliced.shape[0] != total or down.shape[1] != up.shape[1]:
        what, label = ("up", "rows") if along == "rows" else ("down", "columns")
        raise ValueError(f"split_{along}: up {list(up.shape)} / down {list(down.shape)}, expected {what} [{total}, r] "
                         f"({label} {dict(sizes)}) and the same r in both")
    out, start = {}, 0
    for name, n in sizes:
        part = sliced[start:start + n]
        keep = _nonzero_columns(part)
        out[name] = (down[:, keep], part[:, keep]) if along == "rows" else (part[:, keep], up[:, keep])
        start += n
    return out


def split_rows(down: torch.Tensor, up: torch.Tensor, sizes: Sequence[tuple[str, int]]) -> dict:
    """A LoRA on a layer whose output rows are the concatenation of several layers' -> one LoRA per layer.

    down [K, r], up [Σ size, r]; sizes: (name, rows) in row order. Each layer gets the shared down and its row
    slice of up; rank columns whose up slice is all zero (a LoRA made by lora_for_rows for another slice) are
    dropped, so q/k/v LoRAs do not widen mlp_fc1's branch. Returns {name: (down [K, r'], up [rows, r'])}.
    """
    return _split(down, up, sizes, "rows")


def split_cols(down: torch.Tensor, up: torch.Tensor, sizes: Sequence[tuple[str, int]]) -> dict:
    """A LoRA on a layer whose input columns are the concatenation of several layers' inputs (and whose output
    is their sum) -> one LoRA per layer: each gets its slice of down's rows and the shared up. The bias is not
    part of a LoRA. down [Σ size, r], up [N, r]; rank columns whose down slice is all zero are dropped.
    Returns {name: (down [size, r'], up [N, r'])}."""
    return _split(down, up, sizes, "cols")


def split_rows_for_linear1(down: torch.Tensor, up: torch.Tensor, D: int) -> dict:
    """FLUX single block `linear1` (rows [qkv 3D | mlp 4D]) -> {"qkv_proj": ..., "mlp_fc1": ...}."""
    return split_rows(down, up, [(name, mult * D) for name, mult in flux.SINGLE_LINEAR1])


def split_cols_for_linear2(down: torch.Tensor, up: torch.Tensor, D: int) -> dict:
    """FLUX single block `linear2` (input columns [attn D | mlp 4D]) -> {"out_proj": ..., "mlp_fc2": ...}."""
    return split_cols(down, up, [(name, mult * D) for name, mult in flux.SINGLE_LINEAR2])


@dataclasses.dataclass(frozen=True, eq=False)
class LowRankDelta:
    """LoRAs beside a W4A16 (modulation) layer: Δy = Σ_i s_i·(x·down_i)·up_iᵀ in fp32, added to the layer's
    output. A W4A16 layer has no low-rank branch to join, and re-quantizing its 4-bit weight would change it.

    downs[i]: [K, r_i], ups[i]: [N, r_i], kept in the dtype they came in (no rounding of s·up: the scale is an
    fp32 multiply at run time). Rows are in the original order, as W4A16Layer's and ComfyUI's
    `modulation.lin` / `img_mod.lin` weights; a kernel that stores the rows interleaved (FORMAT.md §3) must
    permute the result, or up's rows, the same way. The folded +1 of the scale chunks lives in the bias and is
    not touched.
    """

    downs: tuple
    ups: tuple
    scales: tuple

    def __post_init__(self):
        for f in ("downs", "ups", "scales"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        if not self.downs or not (len(self.downs) == len(self.ups) == len(self.scales)):
            raise ValueError(f"LowRankDelta: {len(self.downs)} downs, {len(self.ups)} ups, {len(self.scales)} scales; "
                             f"expected at least one LoRA and one of each per LoRA")
        K, N = self.downs[0].shape[0], self.ups[0].shape[0]
        for i, (d, u) in enumerate(zip(self.downs, self.ups)):
            _check_part(f"LowRankDelta: LoRA {i}", d, u, K, N)

    @property
    def N(self) -> int:
        return self.ups[0].shape[0]

    @property
    def K(self) -> int:
        return self.downs[0].shape[0]

    def check_layer(self, layer: W4A16Layer, where: str = "LowRankDelta") -> "LowRankDelta":
        if (layer.N, layer.K) != (self.N, self.K):
            raise ValueError(f"{where}: LoRA is [N, K] = [{self.N}, {self.K}], the layer is [{layer.N}, {layer.K}]")
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] any float dtype -> Δy: [..., N] fp32. Add it to the layer output before the final cast."""
        x2 = x.reshape(-1, x.shape[-1]).float()                                        # x2: [M, K] fp32
        dy = x2.new_zeros(x2.shape[0], self.N)
        for d, u, s in zip(self.downs, self.ups, self.scales):
            dy = dy + float(s) * ((x2 @ d.to(x2.device, torch.float32)) @ u.to(x2.device, torch.float32).T)
        return dy.reshape(*x.shape[:-1], self.N)


def compress_to_lowrank(delta_w: torch.Tensor, energy: float = 0.999, max_rank: Optional[int] = None,
                        name: str = "delta") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A non-low-rank patch (LoKr, LoHa, full weight diff) ΔW [N, K] -> (down [K, r], up [N, r], info) fp32 with
    up·downᵀ = the best rank-r approximation (exact SVD, √σ on each side as quantize.top_singular).

    r is the smallest rank whose singular values keep ≥ `energy` of ‖ΔW‖_F²; a zero ΔW gives r = 0.
    info = {"rank", "full_rank", "energy" (kept fraction), "rel_error" (‖ΔW − up·downᵀ‖_F / ‖ΔW‖_F)}.
    Raises ValueError when r would exceed max_rank: truncating further would silently change the LoRA.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"compress_to_lowrank({name}): energy = {energy}, expected a fraction in (0, 1]")
    if delta_w.dim() != 2:
        raise ValueError(f"compress_to_lowrank({name}): ΔW has shape {list(delta_w.shape)}, expected [N, K]")
    N, K = delta_w.shape
    U, S, Vh = torch.linalg.svd(delta_w.float(), full_matrices=False)
    e = S.double() ** 2                                                                # spectrum energy, fp64 sums
    total = float(e.sum())
    if total == 0.0:
        r, kept = 0, 1.0
    else:
        cum = torch.cumsum(e, 0) / total
        # the last value of cum can round just below 1; count it as 1 so energy = 1 always finds a rank
        cum[-1] = 1.0
        r = int((cum < energy).sum()) + 1
        kept = float(cum[r - 1])
    if max_rank is not None and r > max_rank:
        at_max = float(e[:max_rank].sum()) / total
        raise ValueError(f"compress_to_lowrank({name}): ΔW [{N}, {K}] needs rank {r} to keep {energy:.4%} of its "
                         f"energy, more than max_rank = {max_rank} (which keeps {at_max:.4%}); raise max_rank or "
                         f"lower energy")
    root = S[:r].sqrt()
    info = {"rank": r, "full_rank": min(N, K), "energy": kept, "rel_error": max(0.0, 1.0 - kept) ** 0.5}
    return Vh[:r].T * root, U[:, :r] * root, info
