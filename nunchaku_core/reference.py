"""The numerics contract: plain torch reference for SVDQuant (W4A4) and W4A16 layers.

Every kernel (CPU SIMD, CUDA) is tested against these functions on the same quantized inputs, and they are
the fallback that runs when no compiled kernel fits the device. Readability beats speed here; the only
vectorisation is torch's own. All arithmetic is fp32; rounding is round-half-to-even (torch.round).

Activation quantization (per token, FORMAT.md §1), for the [M, K] input x:
  int4 signed     t = x / s,        scale = absmax(t_group64) / 7,  q = clamp(round(t / scale), -7, 7)
  int4 unsigned   t = (x + σ) / s,  scale = absmax(t_group64) / 15, q = clamp(round(t / scale), 0, 15)
  nvfp4           t = x / s,        scale = e4m3(min(absmax(t_group16) / 6, 448)), q = e2m1_round(t / scale)
Every step is one fp32 operation in this order (x and s are widened to fp32 first), so a kernel that
performs the same IEEE operations produces the same codes bit for bit. A group whose scale is 0 gets
codes 0 (no division by zero).

The original CUDA kernels multiply by an approximate reciprocal of the scale and accumulate the per-group
integer sums in bf16; this reference divides exactly and accumulates in fp32, which is strictly more
accurate. Outputs compared with theirs differ by that.
"""
from __future__ import annotations

import torch

from .layer import SIGMA, SVDQuantLayer, W4A16Layer

# e2m1 magnitudes indexed by the low 3 bits of a code; bit 3 is the sign.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Midpoints between neighbouring magnitudes. At a tie the value goes to the even code, so the comparison is
# `>` where the lower code is even (0, 2, 4, 6) and `>=` where it is odd (1, 3, 5).
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
FP8_E4M3_MAX = 448.0


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to the nearest e2m1 code (ties to even, saturating at ±6). Returns int8 codes 0..15.
    The sign bit is set for every negative input, also when the magnitude rounds to 0 (as hardware
    cvt.rn.satfinite.e2m1 does)."""
    mag = v.abs()
    code = torch.zeros(v.shape, dtype=torch.int8, device=v.device)
    for i, mid in enumerate(_E2M1_MIDPOINTS):
        code += (mag >= mid if i % 2 else mag > mid).to(torch.int8)
    return code | ((v < 0).to(torch.int8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """int8/uint8 e2m1 codes 0..15 -> fp32 values."""
    c = codes.to(torch.int64)
    mag = E2M1_VALUES.to(codes.device)[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def _groups(t: torch.Tensor, group: int) -> torch.Tensor:
    M, K = t.shape
    if K % group:
        raise ValueError(f"K = {K} is not a multiple of the activation group size {group}")
    return t.reshape(M, K // group, group)


def smooth_act(x: torch.Tensor, smooth: torch.Tensor, shifted: bool) -> torch.Tensor:
    """t = (x + σ·shifted) / s in fp32. x: [M, K], smooth: [K]."""
    t = x.float()
    if shifted:
        t = t + SIGMA
    return t / smooth.float()


def quantize_act_int4(x: torch.Tensor, smooth: torch.Tensor, shifted: bool = False):
    """x: [M, K] -> (codes int8 [M, K], scales fp32 [M, K/64]). Signed codes in [-7, 7], or unsigned
    [0, 15] for shifted layers."""
    t = _groups(smooth_act(x, smooth, shifted), 64)                  # [M, K/64, 64] fp32
    qmax = 15.0 if shifted else 7.0
    scale = t.abs().amax(dim=-1) / qmax                              # [M, K/64]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(t / safe[..., None])
    q = q.clamp(0, 15) if shifted else q.clamp(-7, 7)
    q = torch.where(scale[..., None] > 0, q, torch.zeros_like(q))
    return q.to(torch.int8).reshape(x.shape[0], -1), scale


def quantize_act_nvfp4(x: torch.Tensor, smooth: torch.Tensor):
    """x: [M, K] -> (e2m1 codes int8 [M, K], scales float8_e4m3fn [M, K/16])."""
    t = _groups(smooth_act(x, smooth, False), 16)                    # [M, K/16, 16] fp32
    scale8 = (t.abs().amax(dim=-1) / 6.0).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    scale = scale8.float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = e2m1_round(t / safe[..., None])
    q = torch.where(scale[..., None] > 0, q, torch.zeros_like(q))
    return q.reshape(x.shape[0], -1), scale8


def quantize_act(x: torch.Tensor, layer: SVDQuantLayer):
    """The activation quantizer the layer's precision and shift call for."""
    if layer.precision == "int4":
        return quantize_act_int4(x, layer.smooth, layer.shifted)
    return quantize_act_nvfp4(x, layer.smooth)


def dequantize_act(codes: torch.Tensor, scales: torch.Tensor, precision: str) -> torch.Tensor:
    """Inverse of quantize_act: fp32 [M, K] (the smoothed, shifted activations as the GEMM sees them)."""
    G = 64 if precision == "int4" else 16
    vals = codes.float() if precision == "int4" else e2m1_decode(codes)
    M, K = codes.shape
    return (vals.reshape(M, K // G, G) * scales.float()[..., None]).reshape(M, K)


def code_values(layer: SVDQuantLayer) -> torch.Tensor:
    """Weight codes as fp32 values (int4 integers or e2m1 values), [N, K]."""
    return layer.codes.float() if layer.precision == "int4" else e2m1_decode(layer.codes)


def dequantize_weight(layer: SVDQuantLayer) -> torch.Tensor:
    """Deq(R): fp32 [N, K] = code value × group scale. Excludes wtscale/wcscales (see output_scale)."""
    N, K, G = layer.N, layer.K, layer.group_size
    return (code_values(layer).reshape(N, K // G, G) * layer.wscales.float()[..., None]).reshape(N, K)


def output_scale(layer: SVDQuantLayer) -> torch.Tensor:
    """Per-output-channel factor wtscale·wcscales[n] of the 4-bit term, fp32 [N] (ones for int4)."""
    s = torch.ones(layer.N, device=layer.codes.device)
    if layer.wcscales is not None:
        s = s * layer.wcscales.float()
    if layer.wtscale is not None:
        s = s * layer.wtscale.float()
    return s


def effective_weight(layer: SVDQuantLayer) -> torch.Tensor:
    """W_eff = out_scale · Deq(R) / s + U·Dᵀ, fp32 [N, K] (FORMAT.md §1)."""
    w = dequantize_weight(layer) / layer.smooth.float()[None, :] * output_scale(layer)[:, None]
    return w + layer.proj_up.float() @ layer.proj_down.float().T


def effective_bias(layer: SVDQuantLayer) -> torch.Tensor:
    """The bias that makes W_eff·x + b_eff equal the layer output up to quantization error, fp32 [N].
    For shifted layers the stored bias compensates the σ shift: b_eff = bias + σ·Σ_k Deq[n,k]/s[k]."""
    b = layer.bias.float() if layer.bias is not None else torch.zeros(layer.N, device=layer.codes.device)
    if layer.shifted:
        b = b + SIGMA * (dequantize_weight(layer) / layer.smooth.float()[None, :]).sum(dim=1) * output_scale(layer)
    return b


def gemm_w4a4(act_codes: torch.Tensor, act_scales: torch.Tensor, layer: SVDQuantLayer) -> torch.Tensor:
    """The 4-bit term on already-quantized activations: fp32 [M, N].

    out[m, n] = out_scale[n] · Σ_g (Σ_{k∈g} qa[m,k]·qw[n,k]) · sa[m,g] · sw[n,g]
    The inner sums are exact (integers for int4; multiples of 1/4 below 2^24 for nvfp4), so only the
    scale products and the sum over groups round.
    """
    M, K = act_codes.shape
    N, G = layer.N, layer.group_size
    a = (act_codes.float() if layer.precision == "int4" else e2m1_decode(act_codes)).reshape(M, K // G, G)
    w = code_values(layer).reshape(N, K // G, G)
    partial = torch.einsum("mgk,ngk->mng", a, w)                      # exact per-group dot products
    scaled = partial * act_scales.float()[:, None, :] * layer.wscales.float()[None, :, :]
    return scaled.sum(dim=-1) * output_scale(layer)[None, :]


def lowrank_branch(x: torch.Tensor, layer: SVDQuantLayer) -> torch.Tensor:
    """U·(Dᵀ·x) on the raw input, fp32 [M, N]."""
    return (x.float() @ layer.proj_down.float()) @ layer.proj_up.float().T


def svdquant_linear(x: torch.Tensor, layer: SVDQuantLayer) -> torch.Tensor:
    """Reference SVDQuant layer forward. x: [..., K] any float dtype -> [..., N] in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])                                    # x2: [M, K]
    codes, scales = quantize_act(x2, layer)
    y = gemm_w4a4(codes, scales, layer) + lowrank_branch(x2, layer)
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], layer.N)


def dequantize_w4a16(layer: W4A16Layer) -> torch.Tensor:
    """w = q·scale + zero per (row, group), fp32 [N, K]. K need not be a multiple of G."""
    G = layer.group_size
    cols = torch.arange(layer.K, device=layer.codes.device) // G
    return layer.codes.float() * layer.scales.float()[:, cols] + layer.zeros.float()[:, cols]


def w4a16_linear(x: torch.Tensor, layer: W4A16Layer) -> torch.Tensor:
    """Reference W4A16 forward: y = x·wᵀ + bias in fp32, returned in x's dtype."""
    y = x.float() @ dequantize_w4a16(layer).T
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype)
