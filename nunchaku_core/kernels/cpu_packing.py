"""Our CPU kernels' packed layout: packers from the plain layer representation (nunchaku_core.layer), and unpackers
for the round-trip tests. The reader is csrc/cpu/*.cpp; the constants below are csrc/layout.h's, checked against
the built extension by nunchaku_core.backend. Packing runs once per layer, at load (first use).

Letters: N out features, K in features, R rank, G group size, NB = ceil(N/16) column blocks, R16 = roundup(R, 16).

W4A4 (SVDQuantLayer, INT4 and NVFP4):
  wcodes    uint8 [NB, K/8, 64]. Chunk (nb, s) holds columns 16·nb .. 16·nb+15 and inputs 8·s .. 8·s+7:
            byte 4·c + j (c = 0..15, j = 0..3): low nibble = (n = 16·nb + c, k = 8·s + j),
                                                high nibble = (n, k = 8·s + 4 + j).
            The low nibbles of a chunk are one vpdpbusd operand (column c = dword c, four inputs per dword), the
            high nibbles the next. Nibble = w + 8 for INT4 (unsigned 0..15); the raw e2m1 code for NVFP4 (the
            kernel maps it to 2·value + 12). Columns past N: INT4 nibble 8 (w = 0), NVFP4 code 0.
  wscales   [NB, K/G, 16]: (nb, g, c) = scale of column 16·nb + c in group g. NVFP4: 0.25 · e4m3 scale (exact;
            the kernel's integer dot of doubled e2m1 values is 4x the true one). Padding 0.
  smooth    fp32 [K]; proj_down [K, R16] (zero columns past R); proj_up [NB, R, 16] ((nb, r, c) =
            U[16·nb + c, r], padding 0); bias fp32 [NB·16] (padding 0) or None; out_scale fp32 [NB·16]
            (NVFP4 wcscales·wtscale, computed as reference.output_scale does; padding 1) or None.
  wscales, proj_down and proj_up are stored in the narrowest of bf16, fp16 and fp32 that holds all their values
  exactly (`narrowest_exact`): bf16 for bf16 checkpoints and NVFP4 scales, fp32 for LoRA-extended branches. The
  kernels widen them to the same fp32 values, so the outputs do not depend on it; a cold M = 1 layer reads
  their bytes from memory beside the 4-bit codes (3072 x 3072: 1.4 MB in fp32, 0.7 MB in bf16, codes 4.7 MB).
W4A16 (W4A16Layer):
  wcodes    uint8 [NB, ceil(K/8), 64]. Chunk (nb, s): byte 16·j + c (j = 0..3, c = 0..15): low nibble =
            (n = 16·nb + c, k = 8·s + 2·j), high nibble = (n, k = 8·s + 2·j + 1). Unsigned codes; 0 past N and K.
  scales, zeros  [NB, ceil(K/G), 16] ((nb, g, c) for column 16·nb + c), each in the narrowest of bf16/fp16/fp32
            that holds it exactly (as the W4A4 arrays above); padding 0. bias fp32 [NB·16] or None.

Memory of one call (bytes allocated beyond the input x and the packed layer; read from csrc/bindings.cpp and
csrc/cpu/gemm_w4a4_avx512vnni.cpp; cpu_w4a4_peak_bytes / cpu_w4a16_peak_bytes compute it), e_y the bytes of x's
dtype (the output's), T torch's intra-op threads:
  W4A4   e_y·M·N (the output y) + M·K (act, int8: one byte per code, not nibble-packed)
         + 8·M·K/G (ascale fp32, acorr int32) + 4·M·R16 (lora = x·D, fp32) + T·S(K)
  W4A16  e_y·M·N + 4·M·K (x widened to fp32; 0 when x is already fp32 and contiguous) + 4·M·ceil(K/G) (xs)
  (+ e_x·M·K for a non-contiguous x, which the bindings copy.) S(K), the AVX-512 GEMM's per-thread activation
  block (RowBlock: one tile row block of act, ascale, acorr repacked for the micro-kernel), is P·K + 8·P·K/G
  bytes, each part rounded up to 64, P = 6·ceil(min(M, tile_rows(K)) / 6) ≤ 258 rows: it depends on K only, is
  kept by each thread between calls (grown to the largest K seen, never shrunk): 0.43 MiB (INT4) / 0.57 MiB
  (NVFP4) at K = 1536, at most 1.16 / 1.54 MiB for K from 4096 to 16384 (tile_rows keeps P·K near 1 MiB). The other variants (ref, avx2) read act in place and have no block. Besides these, each
  thread's stack holds the quantizer's accumulators (≤ 16 rows x MAX_RANK fp32 = 64 KiB). All index arithmetic
  in csrc/cpu is int64 (tests/test_large_m.py runs rows past element 2^31 of act), so M is bounded by memory
  only: at Wan 2.1 480p (M = 32760, bf16) a 1536 -> 8960 layer allocates 587 MB of output, 50 MB of codes,
  6 MB of scales and 4 MB of x·D, a bound of 618.7 MiB; measured 617.9 MiB (bench/results/bench_wan_shape.txt).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..layer import SVDQuantLayer, W4A16Layer
from ..packing import bytes_to_nibbles, nibbles_to_bytes
from ..reference import e2m1_decode, output_scale

BLOCK_N = 16       # columns per block
STEP_K = 8         # inputs per 64-byte chunk
CHUNK_BYTES = 64
GROUP_INT4 = 64
GROUP_NVFP4 = 16
INT4_OFFSET = 8    # INT4 nibble = w + 8
NVFP4_OFFSET = 12  # NVFP4 operand = 2·value + 12
RANK_ALIGN = 16
MAX_RANK = 1024    # kMaxRank16: the quantizers keep 4 rows x R16 fp32 accumulators on the stack
TILE_N = 64        # columns per parallel tile (informational; the kernels own the tiling)


MICRO_ROWS = 6     # kMR of csrc/cpu/gemm_w4a4_avx512vnni.cpp: its row blocks are padded to multiples of this


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def tile_rows(K: int) -> int:
    """csrc/layout.h tile_rows: GEMM rows per tile, up to 1 MiB of int8 activation rows, 4..256."""
    r = (1 << 20) // max(K, 1) // 4 * 4
    return min(256, max(4, r))


def _round64(n: int) -> int:
    return _ceil_div(n, 64) * 64


def w4a4_block_bytes(M: int, K: int, precision: str) -> int:
    """S(K) of the module docstring: one thread's AVX-512 activation block (RowBlock) for a call of M rows."""
    G = GROUP_INT4 if precision == "int4" else GROUP_NVFP4
    padded = MICRO_ROWS * _ceil_div(min(M, tile_rows(K)), MICRO_ROWS)
    return _round64(padded * K) + 2 * _round64(padded * (K // G) * 4)


def cpu_w4a4_peak_bytes(M: int, N: int, K: int, R: int, precision: str, x_dtype: torch.dtype,
                        threads: Optional[int] = None) -> int:
    """The module docstring's bound on what one W4A4 call allocates (x contiguous), the threads' activation
    blocks included (threads: torch.get_num_threads() when None)."""
    G = GROUP_INT4 if precision == "int4" else GROUP_NVFP4
    e_y = torch.empty((), dtype=x_dtype).element_size()
    R16 = _ceil_div(R, RANK_ALIGN) * RANK_ALIGN
    T = torch.get_num_threads() if threads is None else threads
    return e_y * M * N + M * K + 8 * M * (K // G) + 4 * M * R16 + T * w4a4_block_bytes(M, K, precision)


def cpu_w4a16_peak_bytes(M: int, N: int, K: int, G: int, x_dtype: torch.dtype) -> int:
    """The module docstring's bound on what one W4A16 call allocates (x contiguous)."""
    e_y = torch.empty((), dtype=x_dtype).element_size()
    widened = 0 if x_dtype == torch.float32 else 4 * M * K
    return e_y * M * N + widened + 4 * M * _ceil_div(K, G)


def _pad_rows(t: torch.Tensor, rows: int, value: float = 0) -> torch.Tensor:
    """Pad dim 0 of t to `rows` with `value`."""
    if t.shape[0] == rows:
        return t
    pad = torch.full((rows - t.shape[0], *t.shape[1:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


def _blocked(t: torch.Tensor, NB: int) -> torch.Tensor:
    """[NB·16, X] -> [NB, X, 16]: per column block, the X values of its 16 columns side by side."""
    return t.reshape(NB, BLOCK_N, -1).permute(0, 2, 1).contiguous()


def _unblocked(t: torch.Tensor, N: int) -> torch.Tensor:
    """Inverse of _blocked, cut to N rows: [NB, X, 16] -> [N, X]."""
    return t.permute(0, 2, 1).reshape(-1, t.shape[1])[:N]


@dataclass
class CpuW4A4:
    precision: str
    N: int
    K: int
    R: int
    shifted: bool
    wcodes: torch.Tensor
    wscales: torch.Tensor
    smooth: torch.Tensor
    proj_down: torch.Tensor
    proj_up: torch.Tensor
    bias: Optional[torch.Tensor]
    out_scale: Optional[torch.Tensor]


@dataclass
class CpuW4A16:
    N: int
    K: int
    group_size: int
    wcodes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: Optional[torch.Tensor]


def narrowest_exact(t: torch.Tensor) -> torch.Tensor:
    """t (fp32 values) as bf16, else fp16, else fp32: the first of them that round-trips every value exactly."""
    t = t.float()
    for dtype in (torch.bfloat16, torch.float16):
        narrow = t.to(dtype)
        if torch.equal(narrow.float(), t):
            return narrow.contiguous()
    return t.contiguous()


def pack_w4a4(layer: SVDQuantLayer) -> CpuW4A4:
    """SVDQuantLayer -> the CPU kernels' layout (module docstring). Tensors go to the CPU."""
    layer = layer.validate()
    N, K, R = layer.N, layer.K, layer.R
    NB = _ceil_div(N, BLOCK_N)
    codes = layer.codes.cpu().view(torch.uint8)     # int4: two's complement, so (w + 8) & 0xF = byte ^ 8
    nib = (codes ^ INT4_OFFSET) if layer.precision == "int4" else codes
    # [N, s, h, j] -> [N, s, j, h] -> bytes [N, s, j] (h = 0 low nibble, 1 high), padded to NB·16 rows (INT4
    # nibble 8: w = 0), then [NB, c, s, j] -> [NB, s, c, j]: byte 4c + j of chunk (nb, s)
    nib = nib.reshape(N, K // STEP_K, 2, 4).transpose(2, 3)
    pad = INT4_OFFSET * 0x11 if layer.precision == "int4" else 0
    byte = _pad_rows(nibbles_to_bytes(nib).reshape(N, K // STEP_K * 4), NB * BLOCK_N, pad)
    dwords = byte.reshape(NB, BLOCK_N, K // STEP_K * 4).view(torch.int32)  # the 4 bytes j of one (n, s) as a word
    wcodes = dwords.transpose(1, 2).contiguous().view(torch.uint8).reshape(NB, K // STEP_K, CHUNK_BYTES)
    wscales = layer.wscales.cpu().float()
    if layer.precision == "nvfp4":
        wscales = wscales * 0.25
    wscales = narrowest_exact(_blocked(_pad_rows(wscales, NB * BLOCK_N), NB))
    proj_down, proj_up, bias = _pack_lowrank_bias(layer, NB)
    out_scale = None
    if layer.wtscale is not None or layer.wcscales is not None:
        out_scale = _pad_rows(output_scale(layer).cpu(), NB * BLOCK_N, 1.0).contiguous()
    return CpuW4A4(layer.precision, N, K, R, layer.shifted, wcodes, wscales, layer.smooth.cpu().float().contiguous(),
                   proj_down, proj_up, bias, out_scale)


def _pack_lowrank_bias(layer: SVDQuantLayer, NB: int) -> tuple:
    """proj_down [K, R16], proj_up [NB, R, 16] (narrowest_exact) and bias [NB·16] fp32 (or None) in the layout
    above."""
    K, R = layer.K, layer.R
    R16 = _ceil_div(R, RANK_ALIGN) * RANK_ALIGN
    proj_down = torch.zeros(K, R16)
    proj_down[:, :R] = layer.proj_down.cpu().float()
    proj_down = narrowest_exact(proj_down)
    proj_up = narrowest_exact(_blocked(_pad_rows(layer.proj_up.cpu().float(), NB * BLOCK_N), NB))
    bias = None if layer.bias is None else _pad_rows(layer.bias.cpu().float(), NB * BLOCK_N)
    return proj_down, proj_up, bias


def repack_w4a4_lowrank(p: CpuW4A4, layer: SVDQuantLayer) -> CpuW4A4:
    """A packed layer whose low-rank branch and bias are `layer`'s (e.g. a LoRA-extended layer), everything else
    shared with `p` (codes, scales, smoothing are not copied). `layer` must differ from p's only in proj_down,
    proj_up and bias: that is what makes applying a LoRA cost O((N + K)·R), not a repack of the 4-bit codes."""
    if (layer.N, layer.K, layer.precision, layer.shifted) != (p.N, p.K, p.precision, p.shifted):
        raise ValueError(f"repack_w4a4_lowrank: layer [N, K] = [{layer.N}, {layer.K}] {layer.precision} "
                         f"shifted={layer.shifted} does not match the packed [{p.N}, {p.K}] {p.precision} "
                         f"shifted={p.shifted}")
    proj_down, proj_up, bias = _pack_lowrank_bias(layer, p.wcodes.shape[0])
    return dataclasses.replace(p, R=layer.R, proj_down=proj_down, proj_up=proj_up, bias=bias)


def unpack_w4a4_codes(p: CpuW4A4) -> torch.Tensor:
    """Inverse of the code packing: [N, K] int8 (int4 values, or e2m1 codes 0..15)."""
    NB = p.wcodes.shape[0]
    nib = bytes_to_nibbles(p.wcodes.reshape(NB, p.K // STEP_K, BLOCK_N, 4)).unflatten(-1, (4, 2))  # [NB, s, c, j, h]
    nib = nib.view(torch.int8).permute(0, 2, 1, 4, 3).reshape(NB * BLOCK_N, p.K)[: p.N]   # 0..15
    return nib - INT4_OFFSET if p.precision == "int4" else nib


def unpack_w4a4_scales(p: CpuW4A4) -> torch.Tensor:
    """Inverse of the scale packing: [N, K/G] fp32 (NVFP4: the e4m3 value, the 0.25 undone)."""
    s = _unblocked(p.wscales.float(), p.N)
    return s * 4.0 if p.precision == "nvfp4" else s


def unpack_w4a4_proj_up(p: CpuW4A4) -> torch.Tensor:
    return _unblocked(p.proj_up.float(), p.N)


def pack_w4a16(layer: W4A16Layer) -> CpuW4A16:
    """W4A16Layer -> the CPU kernels' layout (module docstring). Tensors go to the CPU."""
    layer = layer.validate()
    N, K, G = layer.N, layer.K, layer.group_size
    if G % STEP_K:
        raise ValueError(f"W4A16 group size {G} is not a multiple of {STEP_K}: the CPU kernels cannot run it")
    NB, S = _ceil_div(N, BLOCK_N), _ceil_div(K, STEP_K)
    nib = torch.zeros(NB * BLOCK_N, S * STEP_K, dtype=torch.uint8)
    nib[:N, :K] = layer.codes.cpu()
    # [NB·16, s, j, h] -> bytes [NB·16, s, j] (h = 0 low nibble, 1 high), then [NB, c, s, j] -> [NB, s, j, c]:
    # byte 16j + c of chunk (nb, s)
    byte = nibbles_to_bytes(nib)
    wcodes = byte.reshape(NB, BLOCK_N, S, 4).permute(0, 2, 3, 1).reshape(NB, S, CHUNK_BYTES)
    scales = narrowest_exact(_blocked(_pad_rows(layer.scales.cpu().float(), NB * BLOCK_N), NB))
    zeros = narrowest_exact(_blocked(_pad_rows(layer.zeros.cpu().float(), NB * BLOCK_N), NB))
    bias = None if layer.bias is None else _pad_rows(layer.bias.cpu().float(), NB * BLOCK_N)
    return CpuW4A16(N, K, G, wcodes, scales, zeros, bias)


def repack_w4a16_bias(p: CpuW4A16, bias: Optional[torch.Tensor]) -> CpuW4A16:
    """A packed W4A16 layer with another bias [N] (or None), codes/scales/zeros shared with `p`."""
    if bias is not None and tuple(bias.shape) != (p.N,):
        raise ValueError(f"repack_w4a16_bias: bias {list(bias.shape)}, the layer has N = {p.N}")
    NB = p.wcodes.shape[0]
    return dataclasses.replace(p, bias=None if bias is None else _pad_rows(bias.cpu().float(), NB * BLOCK_N))


def unpack_w4a16_codes(p: CpuW4A16) -> torch.Tensor:
    """Inverse of the W4A16 code packing: [N, K] uint8."""
    NB, S = p.wcodes.shape[:2]
    nib = bytes_to_nibbles(p.wcodes.reshape(NB, S, 4, BLOCK_N)).unflatten(-1, (BLOCK_N, 2))  # [NB, s, j, c, h]
    return nib.permute(0, 3, 1, 2, 4).reshape(NB * BLOCK_N, S * STEP_K)[: p.N, : p.K]


def unpack_w4a16_scales(p: CpuW4A16) -> tuple[torch.Tensor, torch.Tensor]:
    return _unblocked(p.scales.float(), p.N), _unblocked(p.zeros.float(), p.N)


def e2m1_twice(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes -> 2·value as int8 (the NVFP4 activation operand the quantize kernel writes)."""
    return (e2m1_decode(codes) * 2).to(torch.int8)
