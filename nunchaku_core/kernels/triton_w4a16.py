"""Triton kernel of weight-only 4-bit (W4A16) layers: y = x·(q·scale + zero)ᵀ + bias, a GEMM for token-sized M
(T5) and the same kernel with a GEMV-shaped tile for batch-sized M (adaLN modulation). The numerics contract is
nunchaku_core/reference.py (dequantize_w4a16, w4a16_linear).

    packed = pack_w4a16(layer, device)     # once per layer and device
    y = w4a16_linear(x, packed)            # x: [..., K] -> [..., N] in x's dtype

Numerics: each weight is dequantized in registers with the reference's two fp32 operations, w = fl(fl(q·scale) +
zero) (launched with enable_fp_fusion=False, so never one fma). For bf16/fp16 x the tensor-core dot then takes w
rounded to x's dtype (RNE) and accumulates in fp32: that rounding, ≤ 2^-8 relative for bf16 and 2^-11 for fp16
per weight, is the one difference from the reference beyond fp32 summation order (the bound is derived in
tests/test_triton_kernels.py; exact when w is representable in x's dtype). For fp32 x the dot is an fp32 "ieee"
dot (no TF32, no tensor cores): only the summation order differs. The bias is added in fp32, one rounding to x's
dtype at the store. The weight layout is documented at pack_w4a16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ..layer import W4A16Layer
from ..packing import bytes_to_nibbles, nibbles_to_bytes
from .triton_common import SWIZZLE_M, Tile, config_row, tile_ids, to_bf16_rne


# One table, keyed by target (triton_common.target_key). Untuned: chosen from the hardware limits named in each
# comment, never timed (no GPU here). block_k is an upper bound: the kernel takes the largest power of two <= it
# that divides G, so that one K step lies in one scale group (G = 64 adaLN, 128 T5).
#   gemm  M > SMALL_M (T5 at token count).
#   gemv  M <= SMALL_M (adaLN modulation at batch size): the smallest M tile tl.dot allows; the weight stream is
#         the cost, so narrow N tiles give many programs (N = 18432 for FLUX: 288 programs of 64).
CONFIGS: dict[str, dict[str, Tile]] = {
    # A100: 164 KB shared memory, bf16 mma.sync m16n8k16.
    "sm80": {"gemm": Tile(128, 128, 64, 8, 4), "gemv": Tile(16, 64, 128, 4, 4)},
    # GA10x/Ada: 100 KB shared memory: one stage fewer.
    "sm86": {"gemm": Tile(128, 128, 64, 8, 3), "gemv": Tile(16, 64, 128, 4, 3)},
    # H100: 128-row tiles for two 64-row wgmma warpgroups; the 16-row GEMV tile falls back to mma.sync.
    "sm90": {"gemm": Tile(128, 128, 64, 8, 4), "gemv": Tile(16, 64, 128, 4, 4)},
    # B200: tcgen05 128-row MMA.
    "sm100": {"gemm": Tile(128, 128, 64, 4, 3), "gemv": Tile(16, 64, 128, 4, 3)},
    # RTX 50xx: mma.sync, 100 KB shared memory.
    "sm120": {"gemm": Tile(128, 128, 64, 8, 3), "gemv": Tile(16, 64, 128, 4, 3)},
    # MI300: 64-lane wavefronts, v_mfma_f32_32x32x8 bf16/f16; register-streamed pipelining: 2 stages.
    "gfx942": {"gemm": Tile(128, 128, 64, 4, 2), "gemv": Tile(16, 64, 128, 4, 2)},
    # RDNA3: v_wmma 16x16x16, 64 KB LDS.
    "gfx1100": {"gemm": Tile(64, 64, 64, 4, 2), "gemv": Tile(16, 64, 128, 4, 2)},
    # numpy: several programs per test shape (masks exercised), few loop trips.
    "interpreter": {"gemm": Tile(32, 32, 64, 1), "gemv": Tile(16, 64, 64, 1)},
}
SMALL_M = 16
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _gemm_w4a16_kernel(x_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr, y_ptr, M, N, K, G,
                       HAS_BIAS: tl.constexpr, ONE_GROUP_PER_STEP: tl.constexpr, X_DTYPE: tl.constexpr,
                       BF16_DOT_AS_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y [M, N] = x [M, K] · wᵀ + bias. Reads (from the reader's side; writer: pack_w4a16):
      w_ptr       uint8 [N, ceil(K/2)]: nibble 0 (bits 0..3) of byte [n, j] = code of (n, k 2j), nibble 1 = k 2j+1;
      scales_ptr, zeros_ptr  [ceil(K/G), N] (layer dtype), row g = group g (inputs gG .. gG+G-1) over all n.
    ONE_GROUP_PER_STEP: BLOCK_K divides G, so a step's scales are one row; else they are gathered per input.
    X_DTYPE: "fp32" (fp32 "ieee" dot), "fp16" or "bf16" (w rounded to that dtype, RNE; tensor-core dot, fp32
    accumulation). BF16_DOT_AS_F32 (interpreter only: numpy has no bf16 and would multiply the raw bits): the same
    bf16 operands widened to fp32 (exact) for an fp32 dot, i.e. exact products summed in fp32 as the MMA does."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    K2 = (K + 1) // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        wb = tl.load(w_ptr + cols.to(tl.int64)[:, None] * K2 + kb[None, :], mask=col_ok[:, None] & (kb < K2)[None, :],
                     other=0).to(tl.int32)
        q = tl.interleave(wb & 15, (wb >> 4) & 15).to(tl.float32)                  # q: [BLOCK_N, BLOCK_K]
        if ONE_GROUP_PER_STEP:
            g = k0 // G
            s = tl.load(scales_ptr + g * N + cols, mask=col_ok, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + g * N + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = q * s[:, None] + z[:, None]
        else:
            at = (ks // G)[None, :] * N + cols[:, None]
            both_ok = col_ok[:, None] & k_ok[None, :]
            s = tl.load(scales_ptr + at, mask=both_ok, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + at, mask=both_ok, other=0.0).to(tl.float32)
            w = q * s + z
        w = tl.where(k_ok[None, :], w, 0.0)                                         # w: [BLOCK_N, BLOCK_K] fp32
        if X_DTYPE == "fp32":
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        elif X_DTYPE == "fp16":
            acc = tl.dot(x, tl.trans(w.to(tl.float16)), acc)
        elif BF16_DOT_AS_F32:
            acc += tl.dot(x.to(tl.float32), tl.trans(to_bf16_rne(w).to(tl.float32)), input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(to_bf16_rne(w)), acc)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if X_DTYPE == "bf16":
        out = to_bf16_rne(acc)
    else:
        out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows64[:, None] * N + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


INTERPRETED = not isinstance(_gemm_w4a16_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 at import


@dataclass
class TritonW4A16:
    """One W4A16 layer in the Triton kernel's layout, on one device.

    qweight  uint8 [N, ceil(K/2)]: byte [n, j] holds code[n, 2j] in bits 0..3 and code[n, 2j+1] in bits 4..7
             (packing.nibbles_to_bytes; unsigned 0..15; an odd K is padded with one code 0, never read).
    scales, zeros  [ceil(K/G), N] in the layer's dtype (bf16/fp16/fp32; others converted to fp32), transposed:
             row g holds group g (inputs g·G .. g·G + G − 1) of every output channel.
    bias     [N] (layer dtype) or None.
    """

    N: int
    K: int
    group_size: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: Optional[torch.Tensor]

    @property
    def device(self) -> torch.device:
        return self.qweight.device


def _kept(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.bfloat16, torch.float16, torch.float32) else t.float()


def pack_w4a16(layer: W4A16Layer, device: Union[str, torch.device]) -> TritonW4A16:
    """The layer in the kernel's layout (TritonW4A16 documents it) on `device`."""
    layer.validate("pack_w4a16")
    device = torch.device(device)
    codes = layer.codes
    if layer.K % 2:
        codes = torch.cat([codes, torch.zeros(layer.N, 1, dtype=codes.dtype, device=codes.device)], dim=1)
    return TritonW4A16(
        N=layer.N, K=layer.K, group_size=layer.group_size, qweight=nibbles_to_bytes(codes).to(device),
        scales=_kept(layer.scales).T.contiguous().to(device), zeros=_kept(layer.zeros).T.contiguous().to(device),
        bias=None if layer.bias is None else _kept(layer.bias).contiguous().to(device),
    )


def unpack_w4a16(packed: TritonW4A16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of pack_w4a16's weight part: (codes uint8 [N, K], scales [N, ceil(K/G)], zeros [N, ceil(K/G)])."""
    codes = bytes_to_nibbles(packed.qweight)[:, :packed.K].contiguous()
    return codes, packed.scales.T.contiguous(), packed.zeros.T.contiguous()


def config_for(device: Union[str, torch.device]) -> dict[str, Tile]:
    """The tile configurations (a CONFIGS row) for tensors on `device`. CPU tensors run only in the interpreter."""
    return config_row(CONFIGS, device, INTERPRETED)


def _step_k(block_k: int, G: int) -> int:
    """The largest power of two <= block_k dividing G, or 0 when that is below 16 (tl.dot's minimum K)."""
    step = block_k
    while step >= 16 and G % step:
        step //= 2
    return step if step >= 16 else 0


def w4a16_linear(x: torch.Tensor, packed: TritonW4A16) -> torch.Tensor:
    """Weight-only 4-bit layer forward, as reference.w4a16_linear: x [..., K] -> [..., N] in x's dtype."""
    if x.shape[-1] != packed.K or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"w4a16_linear: x is {x.dtype} {list(x.shape)}, expected bfloat16/float16/float32 "
                         f"[..., K = {packed.K}]")
    if x.device != packed.device:
        raise ValueError(f"w4a16_linear: x is on {x.device} but the layer was packed for {packed.device}; "
                         f"pack_w4a16(layer, {x.device!s})")
    x2 = x.reshape(-1, packed.K).contiguous()                                       # x2: [M, K]
    M, N, K, G = x2.shape[0], packed.N, packed.K, packed.group_size
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        tile = config_for(x.device)["gemv" if M <= SMALL_M else "gemm"]
        step = _step_k(tile.block_k, G)
        grid = (triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_n),)
        _gemm_w4a16_kernel[grid](
            x2, packed.qweight, packed.scales, packed.zeros, packed.bias if packed.bias is not None else packed.scales,
            y, M, N, K, G, HAS_BIAS=packed.bias is not None, ONE_GROUP_PER_STEP=step > 0,
            X_DTYPE=_DTYPE_NAMES[x.dtype], BF16_DOT_AS_F32=INTERPRETED, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
            BLOCK_K=step or tile.block_k, GROUP_M=SWIZZLE_M, num_warps=tile.num_warps, num_stages=tile.num_stages,
            enable_fp_fusion=False)
    return y.reshape(*x.shape[:-1], N)
