"""Triton kernels of SVDQuant (W4A4) layers, INT4 and NVFP4: the fused activation quantizer with the low-rank
down-projection, and the 4-bit GEMM with out-scale, low-rank up-projection and bias in its epilogue.
The numerics contract is nunchaku_core/reference.py.

    packed = pack_w4a4(layer, device)                       # once per layer and device
    codes, scales, lora_act = quantize_act(x2d, packed)     # x2d: [M, K]
    y = gemm_w4a4(codes, scales, lora_act, packed)          # fp32 [M, N]
    y = svdquant_linear(x, packed)                          # both; x: [..., K] -> [..., N] in x's dtype

Numerics (what is exact and what is not):
- quantize: the reference's IEEE fp32 operations in its order: t = (x + σ)/s, scale = absmax/qmax, v = t/scale
  with correctly rounded division (tl.math.div_rn; `/` compiles to the approximate div.full.f32), round half to
  even as (v + 1.5·2^23) − 1.5·2^23 (exact for |v| < 2^22; |v| ≤ 2·qmax here), e2m1 by the reference's midpoint
  comparisons, e4m3 by integer rounding of the fp32 bits. Every launch passes enable_fp_fusion=False, so no
  mul + add pair becomes an fma. Codes and scales equal reference.quantize_act bit for bit.
- lora_act = x·D: fp32 dot with input_precision="ieee" (no TF32), summed in the dot's order.
- GEMM: per group an exact dot product P_g (INT4: int8 tl.dot into int32; NVFP4 decode path: e2m1 values in
  fp16, fp32 accumulation; every product is a multiple of 1/4 and |P_g| ≤ 16·36, so exact), then
  acc = acc + fl(fl(P_g·sa_g)·sw_g) over g in increasing order, then ·out_scale, + lora_act·Uᵀ (fp32 "ieee" dot),
  + bias. The reference forms the same fl(fl(P_g·sa_g)·sw_g) and sums them in torch's order: equal bit for bit
  when those sums are exact, else within the fp32 summation bound derived in tests/triton_interpreter_cases.py
  (w4a4_bound).
- NVFP4 on FP4 tensor cores (sm_100a/sm_120a, tl.dot_scaled with e4m3 block-16 scales): the MMA applies both
  scales and accumulates in its own order and precision, which the PTX ISA does not specify, so how close it
  comes to the reference is unknown until a GPU run measures it. It is compile-checked, never run, here (Triton
  3.9's interpreter reads every dot_scaled scale byte as e8m0, 2^(b−127), so it cannot check it). The decode path
  is the verified one; SVDQ_TRITON_NVFP4=decode forces it.
- NaN inputs are not handled like torch: the GPU's max.f32 drops a NaN where torch's amax propagates it.

Activation layout (written by quantize_act, read by gemm_w4a4): codes uint8 [M, K/2], byte [m, j] holds
code[m, 2j] in bits 0..3 and code[m, 2j+1] in bits 4..7 (INT4 signed: two's complement nibbles; INT4 shifted:
unsigned 0..15; NVFP4: e2m1 codes). Scales: INT4 fp32 [M, K/64]; NVFP4 float8_e4m3fn [M, K/16]. Row-major, no
padding. The weight layout is documented at pack_w4a4.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from .. import reference
from ..layer import SIGMA, SVDQuantLayer
from ..packing import bytes_to_nibbles, nibbles_to_bytes
from .triton_common import SWIZZLE_M, Tile, config_row, tile_ids, to_bf16_rne

log = logging.getLogger(__name__)


# One table, keyed by target (triton_common.target_key). None: the target has no such path. Untuned: chosen from
# the hardware limits named in each comment, never timed (no GPU here). Constraints: block_m, block_n >= 16 and
# powers of two (tl.dot); quantize.block_k a multiple of 64 (INT4 group); gemm_fp4_mma.block_k >= 64 (one
# m16n8k64 / tcgen05 K step) and a multiple of 32.
#   quantize      one program = block_m rows over all of K (so lora_act needs no atomics), block_k per step.
#   gemm          the INT4 GEMM and the NVFP4 decode path: K advances one scale group (64 / 16) per step.
#   gemm_small_m  M <= 16 (GEMV-like: batch-sized inputs): the smallest M tile tl.dot allows, wider N.
#   gemm_fp4_mma  tl.dot_scaled for NVFP4, only where FP4 tensor cores exist.
CONFIGS: dict[str, dict[str, Optional[Tile]]] = {
    # A100: 164 KB shared memory, int8 mma.sync m16n8k32. 128x128 tiles with 8 warps keep 64x32 outputs per warp;
    # a 64-wide K step is 16 KB of packed operands, so 4 stages fit easily.
    "sm80": {"quantize": Tile(32, 0, 128, 4), "gemm": Tile(128, 128, 0, 8, 4),
             "gemm_small_m": Tile(16, 128, 0, 4, 4), "gemm_fp4_mma": None},
    # GA10x/Ada: same instructions, 100 KB shared memory per block and fewer SMs: 3 stages.
    "sm86": {"quantize": Tile(32, 0, 128, 4), "gemm": Tile(128, 128, 0, 8, 3),
             "gemm_small_m": Tile(16, 128, 0, 4, 3), "gemm_fp4_mma": None},
    # H100: wgmma works on 64-row warpgroup tiles; 128x128 with 8 warps = 2 warpgroups. 228 KB shared memory.
    "sm90": {"quantize": Tile(32, 0, 128, 4), "gemm": Tile(128, 128, 0, 8, 4),
             "gemm_small_m": Tile(16, 128, 0, 4, 4), "gemm_fp4_mma": None},
    # B200: tcgen05 MMA is 128 rows per CTA; the per-group epilogue reads the accumulator back from tensor memory
    # each group, so 4 warps (one per 32 TMEM lanes). FP4 MMA: K = 256 per step = 4 MMAs of 64.
    "sm100": {"quantize": Tile(32, 0, 128, 4), "gemm": Tile(128, 128, 0, 4, 3),
              "gemm_small_m": Tile(16, 128, 0, 4, 3), "gemm_fp4_mma": Tile(128, 128, 256, 4, 3)},
    # RTX 50xx: mma.sync like Ada (int8 m16n8k32, fp4 m16n8k64 block-scaled), 100 KB shared memory.
    "sm120": {"quantize": Tile(32, 0, 128, 4), "gemm": Tile(128, 128, 0, 8, 3),
              "gemm_small_m": Tile(16, 128, 0, 4, 3), "gemm_fp4_mma": Tile(128, 128, 128, 8, 3)},
    # MI300: 64-lane wavefronts, v_mfma_i32_32x32x16_i8; 4 wavefronts cover 128x128 as 2x2 of 64x64. The AMD
    # pipeliner streams through registers: 2 stages.
    "gfx942": {"quantize": Tile(32, 0, 128, 4), "gemm": Tile(128, 128, 0, 4, 2),
               "gemm_small_m": Tile(16, 64, 0, 4, 2), "gemm_fp4_mma": None},
    # RDNA3: 32-lane waves, v_wmma 16x16x16, 64 KB LDS and far fewer matrix units: 64x64 tiles.
    "gfx1100": {"quantize": Tile(32, 0, 128, 4), "gemm": Tile(64, 64, 0, 4, 2),
                "gemm_small_m": Tile(16, 64, 0, 4, 2), "gemm_fp4_mma": None},
    # numpy, one program at a time: tiles small enough that test shapes (N = 100) span several programs, so the
    # masks and tile offsets are exercised, and large enough that the Python loop stays short.
    "interpreter": {"quantize": Tile(32, 0, 128, 1), "gemm": Tile(64, 32, 0, 1),
                    "gemm_small_m": Tile(16, 64, 0, 1), "gemm_fp4_mma": None},
}
SMALL_M = 16      # M at or below which gemm_small_m is used
MAX_BLOCK_R = 64  # low-rank ranks per step: rank 32 (Nunchaku's files) in one, LoRA-extended ranks in several
_ROUND = tl.constexpr(12582912.0)  # 1.5·2^23: (v + _ROUND) − _ROUND rounds half to even to an integer for |v| < 2^22
_SIGMA = tl.constexpr(SIGMA)


# ---- device helpers ---------------------------------------------------------------------------------------------
@triton.jit
def _div(a, b):
    """IEEE a / b, correctly rounded, after broadcasting (tl.math.div_rn does not broadcast). Tensors only."""
    a, b = tl.broadcast(a, b)
    return tl.math.div_rn(a, b)


@triton.jit
def _div_by(a, c: tl.constexpr):
    """IEEE a / c for a constant c."""
    return tl.math.div_rn(a, tl.full(a.shape, c, tl.float32))


@triton.jit
def _e2m1_round(v):
    """fp32 -> e2m1 code 0..15 (int32): reference.e2m1_round's midpoint comparisons, `>` where the lower code is
    even and `>=` where it is odd (ties to even), saturating at 6; the sign bit is set for every v < 0."""
    mag = tl.abs(v)
    code = ((mag > 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32) + (mag > 1.25).to(tl.int32)
            + (mag >= 1.75).to(tl.int32) + (mag > 2.5).to(tl.int32) + (mag >= 3.5).to(tl.int32)
            + (mag > 5.0).to(tl.int32))
    return code | tl.where(v < 0, 8, 0)


@triton.jit
def _e2m1_value(code):
    """e2m1 code 0..15 (int32) -> its value as fp32 (exact): magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6."""
    m = code & 7
    mag = tl.where(m < 4, m.to(tl.float32) * 0.5,
                   tl.where(m < 6, (m - 2).to(tl.float32), (2 * m - 8).to(tl.float32)))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _e4m3_byte(a):
    """fp32 a in [0, 448] (not NaN) -> its float8_e4m3fn bit pattern (int32 0..126), rounded to nearest even as
    torch's .to(torch.float8_e4m3fn). Normal range (a >= 2^-6): drop 20 of fp32's 23 mantissa bits with RNE on
    the integer bits and rebias the exponent (127 -> 7). Subnormal range: multiples of 2^-9, rounded by the
    1.5·2^23 trick on a·2^9 (exact scaling); the result 8 is 2^-6, whose bit pattern is also 8."""
    bits = a.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
    normal = (((bits >> 23) - 120) << 3) | ((bits >> 20) & 7)
    sub = ((a * 512.0 + _ROUND) - _ROUND).to(tl.int32)
    return tl.where(a >= 0.015625, normal, sub)


@triton.jit
def _e4m3_value(b):
    """float8_e4m3fn bit pattern (int32 0..255) -> fp32 value (exact): (8 + m)·2^(E−10) if E > 0, m·2^−9 if E = 0.
    0x7F / 0xFF (NaN) are never written by the quantizer or pack_w4a4."""
    e = (b >> 3) & 15
    m = b & 7
    mant = tl.where(e > 0, m + 8, m).to(tl.float32)
    pow2 = ((tl.maximum(e, 1) + 117) << 23).to(tl.float32, bitcast=True)
    val = mant * pow2
    return tl.where((b & 128) != 0, -val, val)


@triton.jit
def _nibbles(byte_tile):
    """[R, C] uint8 -> [R, 2C] int32 nibbles, low nibble first (column 2j = bits 0..3 of byte j)."""
    b = byte_tile.to(tl.int32)
    return tl.interleave(b & 15, (b >> 4) & 15)


# ---- quantize_act -----------------------------------------------------------------------------------------------
@triton.jit
def _quantize_act_kernel(x_ptr, smooth_ptr, down_ptr, codes_ptr, scales_ptr, lora_ptr, M, K, R,
                         GROUP: tl.constexpr, NVFP4: tl.constexpr, SHIFTED: tl.constexpr, HAS_LORA: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """x [M, K] (bf16/fp16/fp32) -> codes uint8 [M, K/2], scales (INT4 fp32 [M, K/64]; NVFP4 e4m3 bytes [M, K/16]),
    lora fp32 [M, R] = x·D; layouts in the module docstring. D (down_ptr) is pack_w4a4's proj_down [K, R]. Ranks
    0..BLOCK_R are done in the quantizing pass over K; each further BLOCK_R ranks (LoRA-extended branches) take one
    more pass over x (from L2: x is M·K·2 bytes, small beside the weights)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    r_idx = tl.arange(0, BLOCK_R)
    lora = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)                                      # x: [BLOCK_M, BLOCK_K] fp32
        s = tl.load(smooth_ptr + ks, mask=k_ok, other=1.0)
        if SHIFTED:
            t = _div(x + _SIGMA, s[None, :])
        else:
            t = _div(x, s[None, :])
        t = tl.reshape(t, (BLOCK_M, BLOCK_K // GROUP, GROUP))
        amax = tl.max(tl.abs(t), axis=2)                                           # [BLOCK_M, BLOCK_K/G]
        if NVFP4:
            sbyte = _e4m3_byte(tl.minimum(_div_by(amax, 6.0), 448.0))
            scale = _e4m3_value(sbyte)
            q = _e2m1_round(_div(t, tl.where(scale > 0, scale, 1.0)[:, :, None]))
            stored = sbyte.to(tl.uint8)
        else:
            if SHIFTED:
                scale = _div_by(amax, 15.0)
            else:
                scale = _div_by(amax, 7.0)
            v = _div(t, tl.where(scale > 0, scale, 1.0)[:, :, None])
            v = (v + _ROUND) - _ROUND
            if SHIFTED:
                v = tl.minimum(tl.maximum(v, 0.0), 15.0)
            else:
                v = tl.minimum(tl.maximum(v, -7.0), 7.0)
            q = v.to(tl.int32)
            stored = scale
        q = tl.where(scale[:, :, None] > 0, q, 0)
        lo, hi = tl.split(tl.reshape(q, (BLOCK_M, BLOCK_K // 2, 2)))
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        tl.store(codes_ptr + rows64[:, None] * (K // 2) + kb[None, :], ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8),
                 mask=row_ok[:, None] & (kb < K // 2)[None, :])
        kg = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        tl.store(scales_ptr + rows64[:, None] * (K // GROUP) + kg[None, :], stored,
                 mask=row_ok[:, None] & (kg < K // GROUP)[None, :])
        if HAS_LORA:
            d = tl.load(down_ptr + ks[:, None] * R + r_idx[None, :], mask=k_ok[:, None] & (r_idx < R)[None, :],
                        other=0.0).to(tl.float32)                                  # D: [BLOCK_K, BLOCK_R]
            lora += tl.dot(x, d, input_precision="ieee")
    if HAS_LORA:
        tl.store(lora_ptr + rows64[:, None] * R + r_idx[None, :], lora, mask=row_ok[:, None] & (r_idx < R)[None, :])
        for r0 in range(BLOCK_R, R, BLOCK_R):
            rr = r0 + r_idx
            lora = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                x = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                            other=0.0).to(tl.float32)
                d = tl.load(down_ptr + ks[:, None] * R + rr[None, :], mask=k_ok[:, None] & (rr < R)[None, :],
                            other=0.0).to(tl.float32)
                lora += tl.dot(x, d, input_precision="ieee")
            tl.store(lora_ptr + rows64[:, None] * R + rr[None, :], lora, mask=row_ok[:, None] & (rr < R)[None, :])


# ---- GEMM -------------------------------------------------------------------------------------------------------
@triton.jit
def _epilogue(acc, rows, cols, M, N, R, lora_ptr, out_scale_ptr, up_ptr, bias_ptr, y_ptr,
              HAS_OUT_SCALE: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
              OUT_BF16: tl.constexpr):
    """y = acc·out_scale + lora_act·Uᵀ + bias in the reference's order, stored in y's dtype (RNE)."""
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    if HAS_OUT_SCALE:
        acc = acc * tl.load(out_scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_LORA:
        lr = tl.zeros(acc.shape, tl.float32)                                       # L = lora_act·Uᵀ, then acc + L
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < R
            la = tl.load(lora_ptr + rows64[:, None] * R + rr[None, :], mask=row_ok[:, None] & r_ok[None, :],
                         other=0.0)
            up = tl.load(up_ptr + cols.to(tl.int64)[:, None] * R + rr[None, :], mask=col_ok[:, None] & r_ok[None, :],
                         other=0.0).to(tl.float32)                                 # U: [BLOCK_N, BLOCK_R]
            lr += tl.dot(la, tl.trans(up), input_precision="ieee")
        acc = acc + lr
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if OUT_BF16:
        out = to_bf16_rne(acc)
    else:
        out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows64[:, None] * N + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gemm_w4a4_kernel(a_ptr, sa_ptr, lora_ptr, w_ptr, sw_ptr, out_scale_ptr, up_ptr, bias_ptr, y_ptr, M, N, K, R,
                      NVFP4: tl.constexpr, A_SIGNED: tl.constexpr, HAS_OUT_SCALE: tl.constexpr,
                      HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """y [M, N] = Σ_g fl(fl(P_g·sa_g)·sw_g) then the epilogue; one scale group (GROUP inputs) per K step.
    Reads (from the reader's side):
      a_ptr  activation codes uint8 [M, K/2], nibble 0 of byte [m, j] = k 2j, nibble 1 = k 2j+1 (quantize_act);
      sa_ptr INT4: fp32 [M, K/64]; NVFP4: e4m3 bytes [M, K/16];
      w_ptr  weight codes uint8 [N, K/2], the same nibble order (pack_w4a4);
      sw_ptr INT4: [K/64, N] in the model dtype (transposed: one group's scales are contiguous over n);
             NVFP4: e4m3 bytes [N, K/16], all >= 0 (pack_w4a4 moved negative signs into the codes)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    kb = tl.arange(0, GROUP // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for g in range(0, K // GROUP):
        a_bytes = tl.load(a_ptr + rows64[:, None] * (K // 2) + (g * (GROUP // 2) + kb)[None, :],
                          mask=row_ok[:, None], other=0)
        w_bytes = tl.load(w_ptr + cols64[:, None] * (K // 2) + (g * (GROUP // 2) + kb)[None, :],
                          mask=col_ok[:, None], other=0)
        a = _nibbles(a_bytes)                                                      # [BLOCK_M, GROUP] int32 0..15
        w = _nibbles(w_bytes)                                                      # [BLOCK_N, GROUP]
        if NVFP4:
            p = tl.dot(_e2m1_value(a).to(tl.float16), tl.trans(_e2m1_value(w).to(tl.float16)),
                       out_dtype=tl.float32)
            sa = _e4m3_value(tl.load(sa_ptr + rows64 * (K // GROUP) + g, mask=row_ok, other=0).to(tl.int32))
            sw = _e4m3_value(tl.load(sw_ptr + cols64 * (K // GROUP) + g, mask=col_ok, other=0).to(tl.int32))
        else:
            if A_SIGNED:
                a = (a ^ 8) - 8
            w = (w ^ 8) - 8
            p = tl.dot(a.to(tl.int8), tl.trans(w.to(tl.int8)), out_dtype=tl.int32).to(tl.float32)
            sa = tl.load(sa_ptr + rows64 * (K // GROUP) + g, mask=row_ok, other=0.0)
            sw = tl.load(sw_ptr + g * N + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + (p * sa[:, None]) * sw[None, :]
    _epilogue(acc, rows, cols, M, N, R, lora_ptr, out_scale_ptr, up_ptr, bias_ptr, y_ptr,
              HAS_OUT_SCALE, HAS_LORA, HAS_BIAS, BLOCK_R, OUT_BF16)


@triton.jit
def _gemm_w4a4_nvfp4_mma_kernel(a_ptr, sa_ptr, lora_ptr, w_ptr, sw_ptr, out_scale_ptr, up_ptr, bias_ptr, y_ptr,
                                M, N, K, R, HAS_OUT_SCALE: tl.constexpr, HAS_LORA: tl.constexpr,
                                HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                                GROUP_M: tl.constexpr):
    """NVFP4 on FP4 tensor cores: tl.dot_scaled with e2m1 operands (two per byte, low nibble first, exactly the
    layouts _gemm_w4a4_kernel reads: quantize_act's codes and pack_w4a4's weights) and e4m3 scales per 16 inputs
    (sa [M, K/16], sw [N, K/16], bytes reinterpreted as fp8e4nv, which selects the ue4m3 block-16 MMA).
    Scales are the hardware's: the sum order and precision are not the reference's (module docstring)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        kg = k0 // 16 + tl.arange(0, BLOCK_K // 16)
        kb_ok = kb < K // 2
        kg_ok = kg < K // 16
        a = tl.load(a_ptr + rows64[:, None] * (K // 2) + kb[None, :], mask=row_ok[:, None] & kb_ok[None, :], other=0)
        w = tl.load(w_ptr + cols64[:, None] * (K // 2) + kb[None, :], mask=col_ok[:, None] & kb_ok[None, :], other=0)
        sa = tl.load(sa_ptr + rows64[:, None] * (K // 16) + kg[None, :], mask=row_ok[:, None] & kg_ok[None, :],
                     other=0)
        sw = tl.load(sw_ptr + cols64[:, None] * (K // 16) + kg[None, :], mask=col_ok[:, None] & kg_ok[None, :],
                     other=0)
        acc = tl.dot_scaled(a, sa.to(tl.float8e4nv, bitcast=True), "e2m1",
                            tl.trans(w), sw.to(tl.float8e4nv, bitcast=True), "e2m1", acc=acc)
    _epilogue(acc, rows, cols, M, N, R, lora_ptr, out_scale_ptr, up_ptr, bias_ptr, y_ptr,
              HAS_OUT_SCALE, HAS_LORA, HAS_BIAS, BLOCK_R, OUT_BF16)


INTERPRETED = not isinstance(_gemm_w4a4_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 at import


# ---- packing ----------------------------------------------------------------------------------------------------
@dataclass
class TritonW4A4:
    """One SVDQuant layer in the Triton kernels' layout, on one device.

    wcodes    uint8 [N, K/2]: byte [n, j] holds code[n, 2j] in bits 0..3 and code[n, 2j+1] in bits 4..7
              (packing.nibbles_to_bytes). INT4: two's complement nibbles. NVFP4: e2m1 codes, with the sign of a
              negative group scale moved into the codes of that group (negating an e2m1 value is exact).
    wscales   INT4: [K/64, N], the layer's dtype (bf16/fp16/fp32), transposed: row g = the scales of group g.
              NVFP4: uint8 [N, K/16], float8_e4m3fn bit patterns, all >= 0 (the MMA reads them as ue4m3).
    out_scale fp32 [N] = reference.output_scale (wtscale·wcscales) for NVFP4 layers that have either, else None
              (applied after the group sum, as the reference does; it cannot be folded into wscales exactly).
    smooth    fp32 [K]. proj_down [K, R], proj_up [N, R], bias [N]: the layer's tensors (bf16/fp16/fp32 kept,
              widened exactly in the kernels; other dtypes converted to fp32 as the reference's .float() does).
    """

    precision: str
    shifted: bool
    N: int
    K: int
    R: int
    wcodes: torch.Tensor
    wscales: torch.Tensor
    smooth: torch.Tensor
    proj_down: torch.Tensor
    proj_up: torch.Tensor
    bias: Optional[torch.Tensor]
    out_scale: Optional[torch.Tensor]

    @property
    def group_size(self) -> int:
        return 64 if self.precision == "int4" else 16

    @property
    def device(self) -> torch.device:
        return self.wcodes.device


def _kept(t: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        t = t.float()
    return t.to(device).contiguous()


def pack_w4a4(layer: SVDQuantLayer, device: Union[str, torch.device]) -> TritonW4A4:
    """The layer in the kernels' layout (TritonW4A4 documents it) on `device`."""
    layer.validate("pack_w4a4")
    device = torch.device(device)
    codes = layer.codes
    if layer.precision == "int4":
        wscales = layer.wscales.T
        out_scale = None
    else:
        negative = (layer.wscales.view(torch.uint8) & 0x80) != 0                  # [N, K/16]
        flip = negative.repeat_interleave(16, dim=1).to(torch.int8) << 3           # [N, K]
        codes = codes ^ flip
        wscales = layer.wscales.view(torch.uint8) & 0x7F
        has_out = layer.wcscales is not None or layer.wtscale is not None
        out_scale = reference.output_scale(layer) if has_out else None
    return TritonW4A4(
        precision=layer.precision, shifted=layer.shifted, N=layer.N, K=layer.K, R=layer.R,
        wcodes=nibbles_to_bytes(codes).to(device), wscales=wscales.to(device).contiguous(),
        smooth=layer.smooth.float().to(device).contiguous(), proj_down=_kept(layer.proj_down, device),
        proj_up=_kept(layer.proj_up, device), bias=_kept(layer.bias, device),
        out_scale=None if out_scale is None else out_scale.float().to(device).contiguous(),
    )


def unpack_w4a4(packed: TritonW4A4) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of pack_w4a4's weight part: (codes int8 [N, K], wscales [N, K/G]) on packed's device. NVFP4 returns
    the sign-folded codes and |scales| (the same values code·scale as the layer's)."""
    if packed.precision == "int4":
        return bytes_to_nibbles(packed.wcodes, signed=True), packed.wscales.T.contiguous()
    codes = bytes_to_nibbles(packed.wcodes).view(torch.int8)
    return codes, packed.wscales.view(torch.float8_e4m3fn)


# ---- launch wrappers --------------------------------------------------------------------------------------------
def config_for(device: Union[str, torch.device]) -> dict[str, Optional[Tile]]:
    """The tile configurations (a CONFIGS row) for tensors on `device`. CPU tensors run only in the interpreter."""
    return config_row(CONFIGS, device, INTERPRETED)


_said: set = set()


def _block_r(R: int) -> int:
    """Ranks per low-rank step: all of them up to MAX_BLOCK_R (one step), else steps of MAX_BLOCK_R."""
    return max(16, min(MAX_BLOCK_R, triton.next_power_of_2(R)))


def _check_x(x2d: torch.Tensor, packed: TritonW4A4) -> None:
    if x2d.dim() != 2 or x2d.shape[1] != packed.K:
        raise ValueError(f"quantize_act: x has shape {list(x2d.shape)}, expected [M, K] = [M, {packed.K}]")
    if x2d.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"quantize_act: x dtype {x2d.dtype}; the kernels take bfloat16, float16 or float32")
    if x2d.device != packed.device:
        raise ValueError(f"quantize_act: x is on {x2d.device} but the layer was packed for {packed.device}; "
                         f"pack_w4a4(layer, {x2d.device!s})")


def quantize_act(x2d: torch.Tensor, packed: TritonW4A4):
    """x2d [M, K] -> (codes uint8 [M, K/2], scales (INT4 fp32 [M, K/64]; NVFP4 float8_e4m3fn [M, K/16]),
    lora_act fp32 [M, R] = x·D). Codes and scales equal reference.quantize_act's (unpacked); layout: module
    docstring."""
    _check_x(x2d, packed)
    x2d = x2d.contiguous()
    M, K, R, G = x2d.shape[0], packed.K, packed.R, packed.group_size
    nvfp4 = packed.precision == "nvfp4"
    dev = x2d.device
    codes = torch.empty(M, K // 2, dtype=torch.uint8, device=dev)
    scales = torch.empty(M, K // G, dtype=torch.uint8 if nvfp4 else torch.float32, device=dev)
    lora = torch.empty(M, R, dtype=torch.float32, device=dev)
    if M:
        tile = config_for(dev)["quantize"]
        _quantize_act_kernel[(triton.cdiv(M, tile.block_m),)](
            x2d, packed.smooth, packed.proj_down if R else packed.smooth, codes, scales, lora if R else scales,
            M, K, R, GROUP=G, NVFP4=nvfp4, SHIFTED=packed.shifted, HAS_LORA=R > 0,
            BLOCK_M=tile.block_m, BLOCK_K=tile.block_k, BLOCK_R=_block_r(R),
            num_warps=tile.num_warps, enable_fp_fusion=False)
    return codes, scales.view(torch.float8_e4m3fn) if nvfp4 else scales, lora


def gemm_w4a4(codes: torch.Tensor, scales: torch.Tensor, lora_act: torch.Tensor, packed: TritonW4A4,
              out_dtype: torch.dtype = torch.float32, nvfp4_path: Optional[str] = None) -> torch.Tensor:
    """y [M, N] = out_scale·(4-bit term) + lora_act·Uᵀ + bias, in out_dtype (default fp32; rounded once, RNE).
    codes, scales, lora_act as quantize_act returns them. nvfp4_path: "decode" (exact e2m1 decode + fp16 dot, the
    verified path) or "mma" (tl.dot_scaled, sm_100/sm_120 only); unset: SVDQ_TRITON_NVFP4=decode|mma if set, else
    "mma" where the target has it. The path taken is logged once."""
    M, N, K, R, G = codes.shape[0], packed.N, packed.K, packed.R, packed.group_size
    nvfp4 = packed.precision == "nvfp4"
    want = {"codes": ((M, K // 2), torch.uint8), "lora_act": ((M, R), torch.float32),
            "scales": ((M, K // G), torch.float8_e4m3fn if nvfp4 else torch.float32)}
    for name, t in (("codes", codes), ("scales", scales), ("lora_act", lora_act)):
        shape, dtype = want[name]
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != packed.device:
            raise ValueError(f"gemm_w4a4: {name} is {t.dtype} {list(t.shape)} on {t.device}, expected {dtype} "
                             f"{list(shape)} on {packed.device} (as quantize_act returns it)")
    cfg = config_for(codes.device)
    how = "argument"
    if nvfp4_path is None and nvfp4:
        nvfp4_path, how = os.environ.get("SVDQ_TRITON_NVFP4", "").strip().lower(), "SVDQ_TRITON_NVFP4"
    if not nvfp4_path:
        nvfp4_path = "mma" if nvfp4 and cfg["gemm_fp4_mma"] is not None else "decode"
        how = "default for this target"
    if nvfp4_path not in ("decode", "mma") or (nvfp4_path == "mma" and (not nvfp4 or cfg["gemm_fp4_mma"] is None)):
        raise ValueError(f"gemm_w4a4: nvfp4_path {nvfp4_path!r} ({how}) for a {packed.precision} layer on "
                         f"{codes.device}: 'mma' needs an NVFP4 layer on sm_100/sm_120, else use 'decode'")
    if nvfp4 and (nvfp4_path, how) not in _said:
        _said.add((nvfp4_path, how))
        log.info("nunchaku_core Triton NVFP4 GEMM: %s path (%s)", nvfp4_path, how)
    y = torch.empty(M, N, dtype=out_dtype, device=codes.device)
    if M == 0:
        return y
    dummy = packed.smooth  # any valid pointer for operands a constexpr flag switches off
    common = dict(lora_ptr=lora_act if R else dummy, w_ptr=packed.wcodes,
                  sw_ptr=packed.wscales, out_scale_ptr=packed.out_scale if packed.out_scale is not None else dummy,
                  up_ptr=packed.proj_up if R else dummy, bias_ptr=packed.bias if packed.bias is not None else dummy,
                  y_ptr=y, M=M, N=N, K=K, R=R, HAS_OUT_SCALE=packed.out_scale is not None, HAS_LORA=R > 0,
                  HAS_BIAS=packed.bias is not None, OUT_BF16=out_dtype == torch.bfloat16, BLOCK_R=_block_r(R),
                  GROUP_M=SWIZZLE_M)
    sa = scales.view(torch.uint8) if nvfp4 else scales
    if nvfp4_path == "mma":
        tile = cfg["gemm_fp4_mma"]
        grid = (triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_n),)
        _gemm_w4a4_nvfp4_mma_kernel[grid](a_ptr=codes, sa_ptr=sa, **common, BLOCK_M=tile.block_m,
                                          BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, num_warps=tile.num_warps,
                                          num_stages=tile.num_stages, enable_fp_fusion=False)
        return y
    tile = cfg["gemm_small_m" if M <= SMALL_M else "gemm"]
    grid = (triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_n),)
    _gemm_w4a4_kernel[grid](a_ptr=codes, sa_ptr=sa, **common, NVFP4=nvfp4, A_SIGNED=not packed.shifted, GROUP=G,
                            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps,
                            num_stages=tile.num_stages, enable_fp_fusion=False)
    return y


def svdquant_linear(x: torch.Tensor, packed: TritonW4A4, nvfp4_path: Optional[str] = None) -> torch.Tensor:
    """SVDQuant layer forward, as reference.svdquant_linear: x [..., K] (bf16/fp16/fp32) -> [..., N] in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])                                                 # x2: [M, K]
    codes, scales, lora_act = quantize_act(x2, packed)
    y = gemm_w4a4(codes, scales, lora_act, packed, out_dtype=x.dtype, nvfp4_path=nvfp4_path)
    return y.reshape(*x.shape[:-1], packed.N)
