"""Packed layouts of the CUDA kernels (csrc/cuda/layout.cuh): packers from the plain layer representation, and the
unpackers tests use to compare kernel outputs with nunchaku_core.reference.

Letters: M tokens, N out features, K in features, G group size, R rank. g = lane // 4, t = lane % 4; nibble j is
bits 4j..4j+3 of a little-endian uint32 word (stored as int32 tensors; torch has no uint32 arithmetic).

W4A4 weight codes (INT4 and NVFP4), int32 [N_pad/128, K/64, 8, 32, 4]:
    word [tn, tk, p, lane, 2*ns + ks], nibble j  =  code[n = 128*tn + 16*p + 8*ns + g,  k = 64*tk + 32*ks + 8*t + j]
  i.e. the B fragments of mma m16n8k64 (PTX ISA), and the same as Nunchaku's file `qweight` (FORMAT.md §4).
  INT4 nibbles are two's complement [-8, 7]; NVFP4 nibbles are e2m1 codes. N_pad = roundup(N, 128), padding 0.
W4A4 weight scales: INT4 fp32 [K/64, N_pad] (the bf16 scales widened, exact). NVFP4 int32 [K/64, N_pad], byte q of
  word [tk, n] = float8_e4m3 scale of (n, group 4*tk + q). The MMA reads them as unsigned ue4m3: must be >= 0.
Activation codes (written by the quantize kernels), int32 [M_pad/16, K/64, 32, 4]:
    word [tm, tk, lane, r], nibble j  =  code[m = 16*tm + g + 8*(r & 1),  k = 64*tk + 32*(r >> 1) + 8*t + j]
  i.e. the A fragments of mma m16n8k64. M_pad = roundup(M, 16); padded rows have codes 0 and scales 0.
Activation scales: INT4 fp32 [K/64, M_pad]; NVFP4 int32 [K/64, M_pad] with 4 e4m3 bytes (groups 4*tk + q).
W4A16 codes: int32 [N, ceil(K/8)], word [n, w] nibble j = code[n, 8*w + j] (0 past K). scales, zeros fp32
  [N, ceil(K/G)].
Low-rank factors, bias, smooth: natural row-major layouts widened to fp32 (exact). NVFP4 out_scale = wtscale·wcscales
  fp32 [N], computed by reference.output_scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import reference
from ..layer import SVDQuantLayer, W4A16Layer

TILE_N = 128      # kTileN
TILE_K = 64       # kTileK
MMA_M = 16        # kMmaM
MAX_RANK = 256    # kMaxRank: the quantize kernels keep a 16 x R fp32 accumulator in shared memory

_SHIFTS = 4 * torch.arange(8)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _nibbles_to_words(nib: torch.Tensor) -> torch.Tensor:
    """[..., 8] values 0..15 -> [...] int32 (bit pattern of the uint32 word)."""
    w = ((nib.to(torch.int64) & 0xF) << _SHIFTS.to(nib.device)).sum(dim=-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _words_to_nibbles(words: torch.Tensor) -> torch.Tensor:
    """[...] int32 -> [..., 8] int64 values 0..15."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    return (w[..., None] >> _SHIFTS.to(words.device)) & 0xF


def _bytes_to_words(b: torch.Tensor) -> torch.Tensor:
    """[..., 4] uint8 -> [...] int32, byte q in bits 8q..8q+7."""
    w = (b.to(torch.int64) << (8 * torch.arange(4, device=b.device))).sum(dim=-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    return ((w[..., None] >> (8 * torch.arange(4, device=words.device))) & 0xFF).to(torch.uint8)


def _sign_extend(nib: torch.Tensor) -> torch.Tensor:
    return torch.where(nib >= 8, nib - 16, nib)


def _pad_rows(t: torch.Tensor, rows: int, value=0) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = torch.full((rows - t.shape[0],) + tuple(t.shape[1:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


def _check_k(K: int, where: str) -> None:
    if K % TILE_K:
        raise ValueError(f"{where}: K = {K} is not a multiple of {TILE_K}; the CUDA W4A4 kernels work in k64 tiles "
                         f"(pad K with zero weights and smooth 1, or use the CPU/reference path)")


# ---- W4A4 weights ---------------------------------------------------------------------------------------------
def pack_w4a4_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes: [N, K] int8 (INT4 values or e2m1 codes) -> int32 [N_pad/128, K/64, 8, 32, 4]."""
    N, K = codes.shape
    _check_k(K, "pack_w4a4_codes")
    c = _pad_rows(codes, _round_up(N, TILE_N)).to(torch.int64) & 0xF
    # n = 128*tn + 16*p + 8*ns + g ; k = 64*tk + 32*ks + 8*t + j
    c = c.reshape(-1, 8, 2, 8, K // TILE_K, 2, 4, 8)               # [tn, p, ns, g, tk, ks, t, j]
    c = c.permute(0, 4, 1, 3, 6, 2, 5, 7)                          # [tn, tk, p, g, t, ns, ks, j]
    return _nibbles_to_words(c.reshape(c.shape[0], K // TILE_K, 8, 32, 4, 8))


def unpack_w4a4_codes(words: torch.Tensor, N: int, K: int, signed: bool) -> torch.Tensor:
    """Inverse of pack_w4a4_codes: int8 [N, K]; signed=True for INT4, False for e2m1 codes."""
    nib = _words_to_nibbles(words).reshape(-1, K // TILE_K, 8, 8, 4, 2, 2, 8)   # [tn, tk, p, g, t, ns, ks, j]
    nib = nib.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(-1, K)[:N]
    return (_sign_extend(nib) if signed else nib).to(torch.int8)


def pack_int4_wscales(wscales: torch.Tensor) -> torch.Tensor:
    """wscales: [N, K/64] bf16/fp16/fp32 -> fp32 [K/64, N_pad] (padding 0)."""
    N = wscales.shape[0]
    return _pad_rows(wscales.float(), _round_up(N, TILE_N)).T.contiguous()


def unpack_int4_wscales(packed: torch.Tensor, N: int) -> torch.Tensor:
    return packed.T[:N].contiguous()


def pack_nvfp4_wscales(wscales: torch.Tensor) -> torch.Tensor:
    """wscales: [N, K/16] float8_e4m3fn -> int32 [K/64, N_pad], 4 scale bytes (groups 4*tk + q) per word."""
    N, KG = wscales.shape
    if (wscales.float() < 0).any():
        raise ValueError("pack_nvfp4_wscales: negative float8_e4m3 weight scales; the sm_120 MMA reads scales as "
                         "unsigned ue4m3. Fold the sign into the e2m1 codes before packing")
    b = _pad_rows(wscales.view(torch.uint8), _round_up(N, TILE_N))
    return _bytes_to_words(b.reshape(b.shape[0], KG // 4, 4)).T.contiguous()


def unpack_nvfp4_wscales(packed: torch.Tensor, N: int) -> torch.Tensor:
    b = _words_to_bytes(packed.T[:N])                               # [N, K/64, 4]
    return b.reshape(N, -1).contiguous().view(torch.float8_e4m3fn)


# ---- activations (written by the quantize kernels; packers exist for tests) ------------------------------------
def pack_act_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes: [M, K] int8 -> int32 [M_pad/16, K/64, 32, 4]."""
    M, K = codes.shape
    _check_k(K, "pack_act_codes")
    c = _pad_rows(codes, _round_up(M, MMA_M)).to(torch.int64) & 0xF
    # m = 16*tm + 8*mh + g ; k = 64*tk + 32*kh + 8*t + j ; r = 2*kh + mh
    c = c.reshape(-1, 2, 8, K // TILE_K, 2, 4, 8)                  # [tm, mh, g, tk, kh, t, j]
    c = c.permute(0, 3, 2, 5, 4, 1, 6)                             # [tm, tk, g, t, kh, mh, j]
    return _nibbles_to_words(c.reshape(c.shape[0], K // TILE_K, 32, 4, 8))


def unpack_act_codes(words: torch.Tensor, M: int, K: int, signed: bool) -> torch.Tensor:
    """Inverse of pack_act_codes: int8 [M, K]. signed=True for INT4 signed codes, False for unsigned / e2m1."""
    nib = _words_to_nibbles(words).reshape(-1, K // TILE_K, 8, 4, 2, 2, 8)   # [tm, tk, g, t, kh, mh, j]
    nib = nib.permute(0, 5, 2, 1, 4, 3, 6).reshape(-1, K)[:M]
    return (_sign_extend(nib) if signed else nib).to(torch.int8)


def pack_act_scales_int4(scales: torch.Tensor) -> torch.Tensor:
    """scales: [M, K/64] fp32 -> fp32 [K/64, M_pad] (padding 0)."""
    return _pad_rows(scales.float(), _round_up(scales.shape[0], MMA_M)).T.contiguous()


def unpack_act_scales_int4(packed: torch.Tensor, M: int) -> torch.Tensor:
    return packed.T[:M].contiguous()


def pack_act_scales_nvfp4(scales: torch.Tensor) -> torch.Tensor:
    """scales: [M, K/16] float8_e4m3fn -> int32 [K/64, M_pad]."""
    M, KG = scales.shape
    b = _pad_rows(scales.view(torch.uint8), _round_up(M, MMA_M))
    return _bytes_to_words(b.reshape(b.shape[0], KG // 4, 4)).T.contiguous()


def unpack_act_scales_nvfp4(packed: torch.Tensor, M: int) -> torch.Tensor:
    return _words_to_bytes(packed.T[:M]).reshape(M, -1).contiguous().view(torch.float8_e4m3fn)


# ---- W4A16 ----------------------------------------------------------------------------------------------------
def pack_w4a16_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes: [N, K] uint8 0..15 -> int32 [N, ceil(K/8)] (nibbles past K are 0)."""
    N, K = codes.shape
    c = torch.zeros(N, _round_up(K, 8), dtype=torch.int64, device=codes.device)
    c[:, :K] = codes.to(torch.int64)
    return _nibbles_to_words(c.reshape(N, -1, 8))


def unpack_w4a16_codes(words: torch.Tensor, K: int) -> torch.Tensor:
    return _words_to_nibbles(words).reshape(words.shape[0], -1)[:, :K].to(torch.uint8)


# ---- whole layers ---------------------------------------------------------------------------------------------
@dataclass
class CudaSVDQuantWeights:
    """The device operands of quantize_act_*_lowrank + gemm_w4a4_* (csrc/cuda/ops.cuh) for one layer."""

    precision: str
    shifted: bool
    N: int
    K: int
    R: int
    wcodes: torch.Tensor               # int32 [N_pad/128, K/64, 8, 32, 4]
    wscales: torch.Tensor              # INT4 fp32 [K/64, N_pad]; NVFP4 int32 [K/64, N_pad]
    smooth: torch.Tensor               # fp32 [K]
    proj_down: torch.Tensor            # fp32 [K, R]
    proj_up: torch.Tensor              # fp32 [N, R]
    bias: Optional[torch.Tensor]       # fp32 [N]
    out_scale: Optional[torch.Tensor]  # fp32 [N] = wtscale·wcscales (reference.output_scale); NVFP4 only, None = 1


def pack_svdquant_layer(layer: SVDQuantLayer, where: str = "SVDQuantLayer") -> CudaSVDQuantWeights:
    layer.validate(where)
    _check_k(layer.K, where)
    if layer.R > MAX_RANK:
        raise ValueError(f"{where}: rank {layer.R} exceeds the CUDA kernels' limit {MAX_RANK}; use the CPU path")
    nvfp4 = layer.precision == "nvfp4"

    def f32(t):
        return None if t is None else t.float().contiguous()

    return CudaSVDQuantWeights(
        precision=layer.precision, shifted=layer.shifted, N=layer.N, K=layer.K, R=layer.R,
        wcodes=pack_w4a4_codes(layer.codes),
        wscales=pack_nvfp4_wscales(layer.wscales) if nvfp4 else pack_int4_wscales(layer.wscales),
        smooth=f32(layer.smooth), proj_down=f32(layer.proj_down), proj_up=f32(layer.proj_up), bias=f32(layer.bias),
        out_scale=(reference.output_scale(layer).contiguous()
                   if nvfp4 and (layer.wcscales is not None or layer.wtscale is not None) else None),
    )


@dataclass
class CudaW4A16Weights:
    """The device operands of gemm_w4a16 (csrc/cuda/ops.cuh) for one layer."""

    N: int
    K: int
    group_size: int
    qweight: torch.Tensor              # int32 [N, ceil(K/8)]
    scales: torch.Tensor               # fp32 [N, ceil(K/G)]
    zeros: torch.Tensor                # fp32 [N, ceil(K/G)]
    bias: Optional[torch.Tensor]       # fp32 [N]


def pack_w4a16_layer(layer: W4A16Layer, where: str = "W4A16Layer") -> CudaW4A16Weights:
    layer.validate(where)
    if layer.group_size % 8:
        raise ValueError(f"{where}: group size {layer.group_size} is not a multiple of 8, which the CUDA W4A16 "
                         f"kernel needs (one group per packed word)")
    return CudaW4A16Weights(
        N=layer.N, K=layer.K, group_size=layer.group_size, qweight=pack_w4a16_codes(layer.codes),
        scales=layer.scales.float().contiguous(), zeros=layer.zeros.float().contiguous(),
        bias=None if layer.bias is None else layer.bias.float().contiguous(),
    )
