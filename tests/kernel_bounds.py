"""Rounding bounds of the kernels against nunchaku_core.reference on the same quantized inputs, shared by the tests
and bench/gpu_check.py (so a GPU run checks exactly what the CPU tests check), and the SQNR case every kernel's test
runs against the unquantized layer (sqnr_case). Plain torch, no extension needed.

Every bound is per output element, in float64, and derived next to its formula; γ_n is Higham's
|fl(Σ of n terms, any order) − Σ| ≤ γ_{n−1}·Σ|terms|.
"""
from __future__ import annotations

import math

import torch

from nunchaku_core import reference
from nunchaku_core.layer import SIGMA, SVDQuantLayer, W4A16Layer

U = 2.0 ** -24  # unit roundoff of fp32


def gamma(n: int) -> float:
    """Higham's γ_n = n·u / (1 − n·u)."""
    return n * U / (1 - n * U)


def output_ulp(y_ref: torch.Tensor, dtype: torch.dtype):
    """One ulp of `dtype` at |y_ref| (0 for fp32): two fp32 values within a bound can round one ulp apart."""
    if dtype == torch.float32:
        return 0.0
    mant = {torch.bfloat16: 8, torch.float16: 11}[dtype]
    return torch.exp2(torch.floor(torch.log2(y_ref.double().abs().clamp(min=2.0 ** -14))) - (mant - 1))


def _terms(layer: SVDQuantLayer, x: torch.Tensor, codes, scales):
    """(S_main [M, N]: Σ_g |P_g·sa_g·sw_g|·|out_scale|, S_abs: Σ_k |a_k|·|w_k|·|out_scale|, S_lr: (|x|·|D|)·|U|ᵀ),
    float64. P_g are the per-group integer (or e2m1) dot products, a = qa·sa and w = qw·sw per element."""
    G, Kg = layer.group_size, layer.K // layer.group_size
    M = x.shape[0]
    qa = (codes.double() if layer.precision == "int4" else reference.e2m1_decode(codes).double()).reshape(M, Kg, G)
    qw = reference.code_values(layer).double().reshape(layer.N, Kg, G)
    sa, sw = scales.double().abs(), layer.wscales.double().abs()
    out_scale = reference.output_scale(layer).double().abs()
    t = torch.einsum("mgk,ngk->mng", qa, qw).abs() * sa[:, None, :] * sw[None]
    s_main = t.sum(-1) * out_scale
    s_abs = ((qa.abs() * sa[..., None]).reshape(M, -1) @ (qw.abs() * sw[..., None]).reshape(layer.N, -1).T) * out_scale
    s_lr = (x.double().abs() @ layer.proj_down.double().abs()) @ layer.proj_up.double().abs().T
    return s_main, s_abs, s_lr


def w4a4_bound(layer: SVDQuantLayer, x: torch.Tensor, codes, scales, y_ref: torch.Tensor, dtype) -> torch.Tensor:
    """|kernel − reference| for a kernel that forms the same per-group products as reference.gemm_w4a4 (the CPU
    kernels; Triton's decode path), both in fp32:
    - the per-group products t_g = (P_g·sa)·sw round the same way up to the last multiply (a kernel may fuse it
      into an fma): ≤ u·|t_g|; the sum over the K/G groups runs in different orders: ≤ γ_{K/G}·Σ|t_g| each side;
      then one rounding each for ·out_scale: so 2·γ_{K/G+2}·S_main, S_main = Σ_g |t_g|·|out_scale|;
    - the low-rank term: lora = x·D (K products, both sides ≤ γ_K) then ·Uᵀ (R products, ≤ γ_R), a kernel
      chaining it onto the main sum with fmas: 2·γ_{K+R+2}·(|x|·|D|)·|U|ᵀ;
    - the bias add, one rounding each: 2u·(|y| + |bias|);
    - then both round to the output dtype: one ulp of that dtype at |y| (two nearby values can round apart)."""
    s_main, _, s_lr = _terms(layer, x, codes, scales)
    bias = layer.bias.double().abs() if layer.bias is not None else 0
    return (2 * gamma(layer.K // layer.group_size + 2) * s_main + 2 * gamma(layer.K + layer.R + 2) * s_lr
            + 2 * U * (y_ref.double().abs() + bias) + output_ulp(y_ref, dtype))


def tiled_w4a4_bound(layer: SVDQuantLayer, x: torch.Tensor, codes, scales, y_ref: torch.Tensor,
                     dtype, kernel_u: float = U) -> torch.Tensor:
    """|tiled − reference| (nunchaku_core.kernels.tiled, which multiplies dequantized activations by dequantized
    weights, K products in one fp32 sum):
    - tiled: a = fl(qa·sa) (u), w = fl(qw·sw) (exact for int4 with bf16/fp16 scales and for e2m1 × e4m3; u with
      fp32 scales), K products (u) summed (γ_{K−1}), ·out_scale (u): ≤ γ_{K+3}·S_abs, S_abs = Σ_k |a_k·w_k|·|os|;
    - reference: ≤ γ_{K/G+2}·S_main as in w4a4_bound (S_main ≤ S_abs);
    - the low-rank term, bias and output rounding as in w4a4_bound (the same expressions on row/column slices,
      which a matmul may block differently).
    kernel_u = 2u for a kernel whose fp32 accumulator may truncate instead of rounding (tensor-core MMA, e.g.
    Triton's NVFP4 tl.dot_scaled path, which also applies both block scales inside the sum, as tiled does)."""
    s_main, s_abs, s_lr = _terms(layer, x, codes, scales)
    bias = layer.bias.double().abs() if layer.bias is not None else 0
    g_kernel = (layer.K + 3) * kernel_u / (1 - (layer.K + 3) * kernel_u)
    return (g_kernel * s_abs + gamma(layer.K // layer.group_size + 2) * s_main
            + 2 * gamma(layer.K + layer.R + 2) * s_lr + 2 * U * (y_ref.double().abs() + bias)
            + output_ulp(y_ref, dtype))


def w4a16_bound(layer: W4A16Layer, x: torch.Tensor, y_ref: torch.Tensor, dtype) -> torch.Tensor:
    """The reference dequantizes (w = q·s + z: 2 roundings, ≤ 2u·(|q·s| + |z|)) then sums K products (γ_K); a
    kernel summing x·q per group (γ_G), scaling it and adding z·Σx (γ_G + 2 roundings, then K/G group terms), or
    the tiled path summing x·w in another order: all within γ_{K+4}·Σ_k |x_k|·(|q_k·s| + |z|) of the exact value.
    Bias: 2u·(|y| + |bias|); the output dtype: one ulp."""
    cols = torch.arange(layer.K) // layer.group_size
    mag = layer.codes.double() * layer.scales.double()[:, cols].abs() + layer.zeros.double()[:, cols].abs()
    bias = layer.bias.double().abs() if layer.bias is not None else 0
    return (2 * gamma(layer.K + 4) * (x.double().abs() @ mag.T) + 2 * U * (y_ref.double().abs() + bias)
            + output_ulp(y_ref, dtype))


def w4a16_lowp_bound(layer: W4A16Layer, x: torch.Tensor, y32: torch.Tensor, dtype) -> torch.Tensor:
    """|kernel − reference| after both round to x's dtype, for a kernel that dequantizes w = fl(fl(q·s) + z) as
    the reference does, then rounds w to x's 16-bit dtype for a tensor-core dot with fp32 accumulation (Triton's
    W4A16 kernel on bf16/fp16 inputs):
    |w̃ − w| ≤ u16·|w|; tensor cores may truncate (2u per addition). With S = Σ_k|x_k||w_k|,
        E = u16·S + γ_{K+1}(2u)·(1 + u16)·S + γ_{K+1}(u)·S + (γ_{K+1}(2u) + γ_{K+1}(u))·|bias|
    (the bias add: one rounding each side) and after rounding both to the output dtype E + u16·(2|y| + E), from
    |r(a) − r(b)| ≤ |a − b| + u16·(|a| + |b|). y32: the reference before its final rounding.
    For fp32 x, u16 = 0 (an fp32 dot: only the order of the sums differs)."""
    u16 = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 0.0}[dtype]
    cols = torch.arange(layer.K) // layer.group_size
    w = (layer.codes.float() * layer.scales.float()[:, cols] + layer.zeros.float()[:, cols]).double()
    S = x.double().abs() @ w.abs().T
    K = layer.K
    g2, g1 = (K + 1) * 2 * U / (1 - (K + 1) * 2 * U), gamma(K + 1)
    bias = layer.bias.double().abs() if layer.bias is not None else 0
    e = u16 * S + g2 * (1 + u16) * S + g1 * S + (g2 + g1) * bias
    return e + u16 * (2 * y32.double().abs() + e)


# ---- inputs ------------------------------------------------------------------------------------------------------
def random_input(M: int, K: int, shifted: bool, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """x: [M, K] with the awkward rows the quantizers must get right: an all-zero row (scale 0 -> codes 0), exact
    halves (round-half-to-even ties), tiny negatives (NVFP4 -0 codes) and huge values (NVFP4 scale clamp at 448;
    smaller in fp16, whose outputs would overflow)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2
    if shifted:
        x = torch.nn.functional.gelu(x)
    if M >= 3:
        x[1] = 0.0
        x[2] = torch.randint(-16, 17, (K,), generator=g) * 0.5
    if M >= 17:
        x[3] = -torch.rand(K, generator=g) * 1e-3
        x[4] = torch.randn(K, generator=g) * (30 if dtype == torch.float16 else 1e4)
    return x.to(dtype)


# ---- the SQNR case: a kernel against the unquantized layer -------------------------------------------------------
# 4-bit symmetric absmax quantization of Gaussian data per 64 (int4: step ≈ 2.5σ/7, noise step²/12 ≈ 0.01σ²,
# ≈ 20 dB per operand) or per 16 with e2m1 (similar), weights and activations independent: ≈ 16-17 dB on the output.
# The floor is SQNR_FLOOR_DB; and a kernel must be within SQNR_REF_DB of the reference forward, which quantizes
# identically (a kernel bug large enough to hide in the quantization noise would show there).
SQNR_CASES = [("int4", False), ("int4", True), ("nvfp4", False)]
SQNR_FLOOR_DB, SQNR_REF_DB = 13.0, 0.05


def sqnr_db(y: torch.Tensor, y_true: torch.Tensor) -> float:
    return 10 * math.log10(y_true.double().pow(2).sum().item() / (y.double() - y_true.double()).pow(2).sum().item())


def quantized_from_float(W: torch.Tensor, b: torch.Tensor, precision: str, R: int, shifted: bool) -> SVDQuantLayer:
    """A small SVDQuant quantizer: rank-R SVD branch, the residual times smooth in 4 bits (absmax per group)."""
    N, K = W.shape
    g = torch.Generator().manual_seed(5)
    smooth = (torch.rand(K, generator=g) + 0.5).bfloat16()
    Uf, S, Vh = torch.linalg.svd(W, full_matrices=False)
    up, down = (Uf[:, :R] * S[:R]).bfloat16(), Vh[:R].T.contiguous().bfloat16()
    res = (W - up.float() @ down.float().T) * smooth.float()[None, :]        # Deq target: res·s
    G = 64 if precision == "int4" else 16
    rg = res.reshape(N, K // G, G)
    if precision == "int4":
        wscales = (rg.abs().amax(-1) / 7).bfloat16()
        codes = torch.round(rg / wscales.float()[..., None]).clamp(-8, 7).to(torch.int8).reshape(N, K)
        layer = SVDQuantLayer("int4", codes, wscales, smooth, down, up, bias=b.bfloat16(), shifted=shifted)
    else:
        wscales = (rg.abs().amax(-1) / 6).to(torch.float8_e4m3fn)
        codes = reference.e2m1_round(rg / wscales.float()[..., None]).reshape(N, K)
        layer = SVDQuantLayer("nvfp4", codes, wscales, smooth, down, up, bias=b.bfloat16(),
                              wcscales=torch.ones(N).bfloat16())
    if shifted:  # the stored bias compensates the σ shift (FORMAT.md §1)
        comp = SIGMA * (reference.dequantize_weight(layer) / smooth.float()[None, :]).sum(1)
        layer.bias = (b - comp).bfloat16()
    return layer.validate()


def sqnr_case(precision: str, shifted: bool):
    """(layer, x [64, 256], y_true = x·Wᵀ + b) for one of SQNR_CASES: Gaussian W [96, 256] and x, rank 16."""
    M, N, K, R = 64, 96, 256, 16
    g = torch.Generator().manual_seed(6)
    W = torch.randn(N, K, generator=g) / math.sqrt(K)
    b = torch.randn(N, generator=g) * 0.1
    layer = quantized_from_float(W, b, precision, R, shifted)
    x = torch.randn(M, K, generator=g)
    if shifted:
        x = torch.nn.functional.gelu(x)
    return layer, x, x @ W.T + b


def check_sqnr(y: torch.Tensor, layer: SVDQuantLayer, x: torch.Tensor, y_true: torch.Tensor) -> None:
    """A kernel's output y on sqnr_case's inputs: at least SQNR_FLOOR_DB, within SQNR_REF_DB of the reference's."""
    s_kernel, s_ref = sqnr_db(y, y_true), sqnr_db(reference.svdquant_linear(x, layer), y_true)
    assert s_kernel >= SQNR_FLOOR_DB, f"{s_kernel:.2f} dB < {SQNR_FLOOR_DB} dB"
    assert abs(s_kernel - s_ref) <= SQNR_REF_DB, f"kernel {s_kernel:.3f} dB, reference {s_ref:.3f} dB"
