"""Memory-bounded fallback for SVDQuant (W4A4) and W4A16 layers on any device torch runs on (MPS, XPU, CUDA
without Triton, the CPU without the compiled kernels): the layer's numerics contract (nunchaku_core.reference)
computed tile by tile, so that no [M, N, K/G] tensor is ever made. The reference's gemm_w4a4 builds one
(per-group dot products, then the scales): 10.9 GB fp32 for M = 4608, N = 12288, K = 3072.

SVDQuant forward, y = out_scale · (Qa(x) · Deq(W)ᵀ) + (x·D)·Uᵀ + bias:
  1. rows of x in chunks of TQ: reference.quantize_act (the contract's quantizer, called as is: per-token
     groups, so chunks of rows give the same codes), reference.dequantize_act into a = [M, K] fp32, and the
     low-rank branch's first half, xd = x·D [M, R] fp32;
  2. weight rows in tiles of TN: reference.dequantize_weight of those rows ([TN, K] fp32), then for output rows
     in tiles of TM: a[tile] @ wᵀ in fp32, · out_scale, + xd[tile] · U[tile]ᵀ, + bias, written into y.

The backend keeps the 4-bit codes two per byte (pack_codes, packing.nibbles_to_bytes: 0.5 bytes per weight on
the device instead of the layer's 1) and passes them as `packed`; each weight tile is unpacked on its own.

fp32 matmul on every device. This path is for correctness and bounded memory, not speed (the fast paths are the
compiled CPU kernels and Triton). A bf16/fp16 matmul would round the dequantized operands themselves: an int4
weight value q·s needs up to 4 + 8 significant bits (bf16 scale) and an activation value q·sa up to 24, so bf16
(8) adds up to 2^-9 relative error per operand, about 100x what the contract's fp32 sums allow. If the process
enables TF32 (torch.backends.cuda.matmul.allow_tf32), CUDA rounds the operands to 11 bits: ~2^-11 relative.

Rounding against reference.gemm_w4a4: that sums the exact per-group integer dot products P_g after scaling,
Σ_g fl(fl(P_g·sa_g)·sw_g); this path scales first, a = fl(qa·sa) (one rounding; q·sw is exact in fp32 for
int4 with bf16/fp16 scales and for e2m1 × e4m3), then sums K products in the matmul's order. Per output:
  |tiled − exact| ≤ γ_{K+2} · |out_scale| · Σ_k |qa_k·sa|·|qw_k·sw|      (a's rounding, K products, K−1 adds,
                                                                          · out_scale)
  |ref − exact|   ≤ γ_{K/G+2} · |out_scale| · Σ_g |P_g·sa_g·sw_g|        (tests/kernel_bounds.py, w4a4 bound)
and the low-rank half-products are the reference's expressions on slices (x·D then ·Uᵀ; the matmul may block
them differently, ≤ γ_{K+R} each side). tests/kernel_bounds.tiled_w4a4_bound adds these up; the test runs it.
W4A16 dequantizes with reference.dequantize_w4a16 (same bits per weight) and sums K products: only the sum's
order differs from the reference, ≤ γ_K each side (tests/kernel_bounds.w4a16_bound covers it).

Transient memory (bytes allocated beyond the input x and the layer, while one call runs), with e_y the bytes of
x's dtype, B the tile budget (`budget`, default TILE_BYTES) and the per-element costs below:
  SVDQuant  peak ≤ e_y·M·N + 4·M·(K + R + K/16) + 4·(K + N)·R + 16·N + max(B, tile minimum)
  W4A16     peak ≤ e_y·M·N + 4·M·K (x in fp32, when x is not fp32) + 16·N + max(B, tile minimum)
(tiled_peak_bytes computes it; the tile minimum is one row of x in phase 1 and 8 weight rows × 1 output row
in phase 2, which exceed B only when K is in the millions; 4·M·K/16 covers the activation scales, whatever their
group.) The output y is counted although it is the result. The terms under B, per element of a tile, counted from the temporaries the reference's expressions
keep alive at once (CPython frees a temporary as soon as its last reference goes):
  QUANT_BYTES  phase 1, per activation element: int4: t, q, zeros_like(q) and torch.where's result, 4 fp32 =
               16; nvfp4: dequantize_act's e2m1_decode keeps the codes as int64 (c and c & 8) beside fp32
               magnitudes: 38. Plus the chunk of x in fp32 for x·D (4).
  WEIGHT_BYTES phase 2, per weight element: int4: code values and scaled values, 2 fp32 = 8; nvfp4: e2m1_decode
               as above (int64 codes, their low bits, magnitudes, negation, result): 21, + 4 for the scaled copy.
               W4A16: codes as fp32, scales and zeros gathered per column, product, sum: 12. Each + 2 for
               the tile's codes unpacked from `packed` (1 byte) beside packing.bytes_to_nibbles' half-size
               temporaries.
  OUT_BYTES    phase 2, per output element of an [TM, TN] tile: the fp32 product and the low-rank term: 8.
The tiles are chosen so that WEIGHT_BYTES·TN·K ≤ B/2 and OUT_BYTES·TM·TN ≤ B/2 (phase 2: the weight tile,
4·TN·K, stays alive beside the output tiles) and (QUANT_BYTES + 4)·TQ·K ≤ B (phase 1). tests/test_tiled.py
measures the peak at M = 4608, N = 12288, K = 3072 against this bound.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import reference
from ..layer import SVDQuantLayer, W4A16Layer
from ..packing import bytes_to_nibbles, nibbles_to_bytes

TILE_BYTES = 64 * 2**20
QUANT_BYTES = {"int4": 16, "nvfp4": 38}
WEIGHT_BYTES = {"int4": 10, "nvfp4": 27, "w4a16": 14}
OUT_BYTES = 8
MIN_TN = 8  # weight rows per tile at the least: a matmul narrower than that is launch overhead only


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Rows of x per quantization chunk (TQ), weight rows per tile (TN), output rows per tile (TM)."""
    TQ: int
    TN: int
    TM: int


def tiles(M: int, N: int, K: int, weight_bytes: int, quant_bytes: int, budget: int = TILE_BYTES) -> Tiles:
    """Tile sizes within `budget` bytes (module docstring). TN is a multiple of 64 when it can be (whole cache
    lines of codes and tensor-core-friendly matmul shapes on GPUs)."""
    TQ = max(1, min(M, budget // max(1, quant_bytes * K)))
    TN = max(1, min(N, (budget // 2) // (weight_bytes * K)))
    if 64 <= TN < N:
        TN -= TN % 64
    TN = max(min(N, MIN_TN), TN)
    TM = max(1, min(M, (budget // 2) // (OUT_BYTES * TN)))
    return Tiles(TQ, TN, TM)


def tiled_peak_bytes(M: int, N: int, K: int, R: int, kind: str, out_dtype: torch.dtype,
                     budget: int = TILE_BYTES) -> int:
    """The module docstring's bound on the transient bytes of one call. kind: 'int4', 'nvfp4' or 'w4a16'
    (R is ignored for 'w4a16', whose fp32 copy of x is counted whatever x's dtype)."""
    e_y = torch.empty((), dtype=out_dtype).element_size()
    if kind == "w4a16":
        t = tiles(M, N, K, WEIGHT_BYTES[kind], 0, budget)
        phase2 = WEIGHT_BYTES[kind] * t.TN * K + OUT_BYTES * t.TM * t.TN
        return e_y * M * N + 4 * M * K + 16 * N + max(budget, phase2)
    q = QUANT_BYTES[kind] + 4
    t = tiles(M, N, K, WEIGHT_BYTES[kind], q, budget)
    phase1 = q * t.TQ * K
    phase2 = max(WEIGHT_BYTES[kind] * t.TN * K, 4 * t.TN * K + OUT_BYTES * t.TM * t.TN)
    return e_y * M * N + 4 * M * (K + R + K // 16) + 4 * (K + N) * R + 16 * N + max(budget, phase1, phase2)


def pack_codes(layer) -> torch.Tensor:
    """The layer's codes two per byte, [N, ceil(K/2)] uint8: byte [n, j] holds code [n, 2j] in bits 0..3 and
    code [n, 2j+1] in bits 4..7 (packing.nibbles_to_bytes; INT4 as two's complement nibbles; an odd K is padded
    with one code 0, never read). What the backend keeps in place of the 1-byte codes."""
    codes = layer.codes
    if layer.K % 2:
        codes = torch.cat([codes, torch.zeros(layer.N, 1, dtype=codes.dtype, device=codes.device)], dim=1)
    return nibbles_to_bytes(codes)


def unpack_codes(layer, packed: torch.Tensor, n0: int = 0, n1=None) -> torch.Tensor:
    """Rows n0:n1 of the codes pack_codes packed, in the layer's codes dtype (int8 SVDQuant, uint8 W4A16)."""
    signed = isinstance(layer, SVDQuantLayer) and layer.precision == "int4"
    codes = bytes_to_nibbles(packed[n0:n1], signed=signed)[:, :layer.K]
    return codes.view(torch.int8) if isinstance(layer, SVDQuantLayer) else codes


def _rows(layer: SVDQuantLayer, n0: int, n1: int, packed) -> SVDQuantLayer:
    """Weight rows n0:n1 of the layer (views, not validated): what reference.dequantize_weight and output_scale
    read."""
    codes = layer.codes[n0:n1] if packed is None else unpack_codes(layer, packed, n0, n1)
    return dataclasses.replace(layer, codes=codes, wscales=layer.wscales[n0:n1],
                               proj_up=layer.proj_up[n0:n1], bias=None,
                               wcscales=None if layer.wcscales is None else layer.wcscales[n0:n1])


def svdquant_linear(x: torch.Tensor, layer: SVDQuantLayer, budget: int = TILE_BYTES,
                    packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SVDQuant layer forward, as reference.svdquant_linear, in tiles. x: [..., K] any float dtype -> [..., N]
    in x's dtype. packed: pack_codes(layer), read instead of layer.codes (which may then be a meta tensor)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])                                    # x2: [M, K]
    M, K, N, R = x2.shape[0], layer.K, layer.N, layer.R
    t = tiles(M, N, K, WEIGHT_BYTES[layer.precision], QUANT_BYTES[layer.precision] + 4, budget)
    a = torch.empty(M, K, dtype=torch.float32, device=x.device)     # a: [M, K] fp32, dequantized activations
    xd = torch.empty(M, R, dtype=torch.float32, device=x.device)    # xd: [M, R] fp32, x·D
    down = layer.proj_down.float()
    for m0 in range(0, M, t.TQ):
        xc = x2[m0:m0 + t.TQ]
        codes, scales = reference.quantize_act(xc, layer)
        a[m0:m0 + t.TQ] = reference.dequantize_act(codes, scales, layer.precision)
        del codes, scales
        xd[m0:m0 + t.TQ] = xc.float() @ down
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)           # y: [M, N] in x's dtype
    for n0 in range(0, N, t.TN):
        rows = _rows(layer, n0, n0 + t.TN, packed)
        w = reference.dequantize_weight(rows)                        # w: [TN, K] fp32
        out_scale = reference.output_scale(rows)
        up = rows.proj_up.float()
        bias = None if layer.bias is None else layer.bias[n0:n0 + t.TN].float()
        for m0 in range(0, M, t.TM):
            acc = a[m0:m0 + t.TM] @ w.T                             # acc: [TM, TN] fp32
            acc.mul_(out_scale)
            acc.add_(xd[m0:m0 + t.TM] @ up.T)
            if bias is not None:
                acc.add_(bias)
            y[m0:m0 + t.TM, n0:n0 + t.TN] = acc
            del acc
        del w
    return y.reshape(*shape[:-1], N)


def w4a16_linear(x: torch.Tensor, layer: W4A16Layer, budget: int = TILE_BYTES,
                 packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight-only 4-bit forward, as reference.w4a16_linear, in tiles of weight rows. x: [..., K] -> [..., N]
    in x's dtype. packed: pack_codes(layer), read instead of layer.codes."""
    shape = x.shape
    xf = x.reshape(-1, shape[-1]).float()                            # xf: [M, K] fp32
    M, K, N = xf.shape[0], layer.K, layer.N
    t = tiles(M, N, K, WEIGHT_BYTES["w4a16"], 0, budget)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    for n0 in range(0, N, t.TN):
        n1 = min(N, n0 + t.TN)
        codes = layer.codes[n0:n1] if packed is None else unpack_codes(layer, packed, n0, n1)
        rows = dataclasses.replace(layer, codes=codes, scales=layer.scales[n0:n1],
                                   zeros=layer.zeros[n0:n1], bias=None)
        w = reference.dequantize_w4a16(rows)                         # w: [TN, K] fp32
        bias = None if layer.bias is None else layer.bias[n0:n1].float()
        for m0 in range(0, M, t.TM):
            acc = xf[m0:m0 + t.TM] @ w.T
            if bias is not None:
                acc.add_(bias)
            y[m0:m0 + t.TM, n0:n1] = acc
            del acc
        del w
    return y.reshape(*shape[:-1], N)
