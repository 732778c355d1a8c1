"""The SVDQuant algorithm on one linear layer: smoothing search, low-rank SVD branch, 4-bit residual
(round-to-nearest or GPTQ), and the W4A16 weight-only quantizer for modulation layers.

Letters: N out features, K in features, R rank, G group size, M activation rows. W is [N, K] (y = x·Wᵀ + b).

One SVDQuant layer (FORMAT.md §1), built from W, the smoothing vector s [K] and rank R:
  1. s is rounded to the storage dtype first, so everything below is exact for the stored s.
  2. Ŵ = W·diag(s) (what the 4-bit GEMM sees after the activations are divided by s).
  3. Top-R SVD of Ŵ: Ŵ ≈ L1·L2ᵀ. Because Nunchaku's low-rank branch acts on the RAW input x, the smoothing
     is folded into the down projection: U = L1, D = L2 / s (then rounded to the storage dtype).
  4. The residual is taken against the ROUNDED branch, so bf16 rounding of U and D lands in the residual
     that gets quantized: Rs = (W − U·Dᵀ)·diag(s), quantized per group (INT4 G=64 or NVFP4 G=16).
  5. W_eff = Deq(Rs)/s + U·Dᵀ (reference.effective_weight).
Every quantize/dequantize goes through reference.py (or uses the same IEEE steps on weights, which the
reference does not quantize), so the layers we emit are exactly what the reference forward computes with.

Shifted (post-GELU) INT4 layers quantize (x + σ)/s unsigned. We compensate the shift with the quantized
weights, bias = b − σ·Σ_k Deq[n,k]/s[k], so the effective bias (reference.effective_bias) equals b up to
the storage rounding. The original tool stores b − σ·(W − U·Dᵀ)·1 instead, whose effective bias is off by
σ·rowsum(W_eff − W) (FORMAT.md §1); that file layout is the same, only the compensation is exact here.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from .. import reference
from ..layer import GROUP_SIZE, SIGMA, SVDQuantLayer, W4A16Layer

# Clipping ratios tried per weight group (scale = ratio · absmax / qmax); each group keeps the ratio with the
# lowest squared error. 1.0 is plain absmax RTN; the smaller ratios trade one clipped outlier for a finer grid.
# Measured on MiniLM (SVDQuant output error, 12 layers): ratio 1 only 0.0917 (int4) / 0.0747 (nvfp4); these
# three 0.0867 / 0.0724; five (1, .95, .9, .85, .8) 0.0863 / 0.0719 at 5/3 of the cost.
CLIP_RATIOS = (1.0, 0.9, 0.8)
# Migration strengths tried with calibration data (s = a^α / w^(1−α)), plus s = 1. On MiniLM's real
# activations the chosen α is mostly 0.65-0.95 (bench/results/ablation_minilm.md).
ALPHAS_CALIBRATED = (0.35, 0.5, 0.65, 0.8, 0.95)
# Data-free: a = 1, so α = 1 is "no smoothing" and α = 0.5 flattens weight columns by w^(−1/2).
ALPHAS_DATA_FREE = (1.0, 0.5)
SYNTHETIC_ROWS = 64
GPTQ_DAMP = 0.01     # fraction of mean(diag H) added to the diagonal (the GPTQ paper's default)
GPTQ_BLOCK = 128     # columns per lazy-update block; a multiple of both group sizes
# Elements per step of the weight quantizers and of the error evaluation (whole output rows, at least one):
# bounds their temporaries. The RTN search holds three fp32/int32 scratch tensors of the chunk's size, the error
# evaluation's decode two (int32 index, fp32 values): with 2^22 elements, 48 MB and 32 MB. Smaller chunks
# (2^18, 2^20) were no faster on one thread and slower on two (one OpenMP barrier per torch op; measured with
# the scratch reuse below on a shared 2-core machine).
CHUNK_ELEMENTS = 2 ** 22


def _row_chunks(N: int, K: int):
    step = max(1, CHUNK_ELEMENTS // K)
    return (slice(n0, min(n0 + step, N)) for n0 in range(0, N, step))


@dataclass
class ActStats:
    """Calibration statistics of one layer's input: per-channel extremes over every token seen, plus a
    bounded sample of rows. rows: [M, K] (any float dtype); cmax, cmin: [K]."""

    cmax: torch.Tensor
    cmin: torch.Tensor
    rows: torch.Tensor

    def absmax(self, shifted: bool) -> torch.Tensor:
        """max |x + σ·shifted| per channel, fp32 [K]."""
        off = SIGMA if shifted else 0.0
        return torch.maximum((self.cmax.float() + off).abs(), (self.cmin.float() + off).abs())

    def columns(self, cols: slice) -> "ActStats":
        """The statistics of an input-column slice (single blocks' linear2 split into out_proj | mlp_fc2)."""
        return ActStats(self.cmax[cols], self.cmin[cols], self.rows[:, cols])


@dataclass
class LayerReport:
    """What the quantizer chose for one layer and how well it did (relative output errors)."""

    alpha: Optional[float]
    errors: dict = field(default_factory=dict)   # variant name -> ‖Wx − Ŵx‖/‖Wx‖


# ---------------------------------------------------------------------------------------------- low rank

@contextmanager
def one_thread():
    """Run small LAPACK calls and per-column loops on one thread. With two OpenMP threads every call ends at
    a barrier that waits for the other thread, which on a shared machine may be descheduled for a whole time
    slice: a 768 x 48 QR measured 0.5 ms on one thread and 6-90 ms on two under load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def top_singular(w: torch.Tensor, rank: int, *, niter: int = 2, oversample: int = 16, exact: bool = False,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-R factors of w [N, K] fp32: (L1 [N, R], L2 [K, R]) with L1·L2ᵀ ≈ the best rank-R approximation.
    The singular values are split evenly (√σ on each side).

    Randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4) with R + oversample columns and
    `niter` power iterations, re-orthonormalised every half step. tests/test_quantize.py measures its
    residual ‖w − L1·L2ᵀ‖_F against the exact truncated SVD on FLUX-sized weights. Exact SVD is used when
    asked or when the sketch would not be much smaller than the matrix."""
    N, K = w.shape
    if rank == 0:
        return w.new_zeros(N, 0), w.new_zeros(K, 0)
    q = min(rank + oversample, N, K)
    if exact or 2 * q >= min(N, K):
        with one_thread():
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        root = S[:rank].sqrt()
        return U[:, :rank] * root, Vh[:rank].T * root
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(K, q, generator=g, dtype=w.dtype)               # omega: [K, q]

    def orth(a: torch.Tensor) -> torch.Tensor:
        with one_thread():
            return torch.linalg.qr(a).Q

    Q = orth(w @ omega)                                                  # Q: [N, q]
    for _ in range(niter):
        Q = orth(w @ orth(w.T @ Q))                                      # inner: [K, q]
    B = Q.T @ w                                                          # B: [q, K] sketch
    with one_thread():
        Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    root = S[:rank].sqrt()
    return (Q @ Ub[:, :rank]) * root, Vh[:rank].T * root


# ------------------------------------------------------------------------------------- weight quantizers

def _grouped(w: torch.Tensor, G: int) -> torch.Tensor:
    N, K = w.shape
    return w.reshape(N, K // G, G)


def _int4_codes(wg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric int4 codes [-8, 7] of grouped weights wg [N, K/G, G] for scales [N, K/G] (already rounded to
    the storage dtype, as fp32). A zero scale gives codes 0 (wg is 0 there: the scale is its absmax)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (wg / safe[..., None]).round_().clamp_(-8, 7)


def _nvfp4_codes(wg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (int8 0..15) for grouped weights and the full per-group scale (fp8 scale · wtscale)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return e2m1_codes(wg / safe[..., None])


def _scales_for(gmax: torch.Tensor, precision: str, dtype: torch.dtype, wtscale: Optional[float]):
    """Group absmax [..] -> (stored scale tensor, its fp32 value as applied to codes)."""
    if precision == "int4":
        stored = (gmax / 7.0).to(dtype)
        return stored, stored.float()
    stored = (gmax / (6.0 * wtscale)).clamp(max=reference.FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return stored, stored.float() * wtscale


# e2m1 rounding on fp32 bits. e2m1 is a float with one mantissa bit: magnitudes 0, .5, 1, 1.5 (step 0.5),
# 2, 3 (step 1), 4, 6 (step 2). Adding C = 2^(max(e, 0) + 22), where 2^e <= a < 2^(e+1), leaves an fp32
# whose last mantissa bit weighs exactly that step, so the fp32 addition itself rounds a to the grid, half to
# even; even multiples of the step are the even e2m1 codes, which is the reference's tie rule (ties at 0.25,
# 1.25, 2.5, 5 go down, at 0.75, 1.75, 3.5 up). Inputs are clamped to 6 first (everything above 5 is code 7).
# The mantissa of a + C then holds the step count m, and the code is m + 2e. Every step is one in-place torch
# pass with no torch.where (~10x slower than an arithmetic pass on this CPU, measured): with the reference's
# seven compare passes and its int64 decode, an NVFP4 layer cost 4x its INT4 search (bench/README.md).
_EXP_MASK = 0x7F800000
_EXP_ONE, _EXP_FOUR = 0x3F800000, 0x40800000       # the exponent fields of 1.0 and 4.0
_EXP_PLUS_22 = 22 << 23                            # adds 22 to an exponent field
_CODE_BIAS = (_EXP_ONE + _EXP_PLUS_22) >> 22       # (C's bits >> 22) − this = 2e


def _e2m1_offset_(a: torch.Tensor, c: torch.Tensor) -> None:
    """In place: a (fp32 magnitudes >= 0) becomes min(a, 6) + C, rounded to e2m1's grid; c (int32, a's shape)
    receives C's bits. a − C is then the nearest e2m1 magnitude. A NaN stays NaN (c stays finite)."""
    a.clamp_(max=6.0)
    torch.bitwise_and(a.view(torch.int32), _EXP_MASK, out=c)
    c.clamp_(_EXP_ONE, _EXP_FOUR).add_(_EXP_PLUS_22)
    a.add_(c.view(torch.float32))


def e2m1_nearest_abs_(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """In place: fp32 magnitudes a -> the magnitude of reference.e2m1_decode(reference.e2m1_round(a)), for the
    clipping search (NaN stays NaN). c: int32 scratch of a's shape. Returns a."""
    _e2m1_offset_(a, c)
    return a.sub_(c.view(torch.float32))                                 # exact: both are on C's grid


def _e2m1_codes_(t: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """e2m1_codes into scratch: a (fp32) and c (int32) of t's shape, t unchanged. Returns int32 codes (a's
    memory)."""
    torch.abs(t, out=a).nan_to_num_(nan=0.0, posinf=6.0)                # NaN -> 0, as the reference's compares
    _e2m1_offset_(a, c)
    m = a.view(torch.int32).sub_(c)                                      # m: steps above 0 in C's grid
    m.add_(c.bitwise_right_shift_(22).sub_(_CODE_BIAS))                  # + 2e
    return m.add_(torch.lt(t, 0.0, out=c), alpha=8)                     # sign bit for t < 0 (not for -0.0)


def e2m1_codes(t: torch.Tensor) -> torch.Tensor:
    """reference.e2m1_round(t) bit for bit (int8 codes 0..15; ties to even, saturating at ±6, sign bit for every
    t < 0, code 0 for NaN and ±0). tests/test_quantize.py checks ties, their neighbours, every exponent, zeros,
    subnormals, ±Inf and NaNs; all 2^32 fp32 bit patterns were checked once (bench/README.md)."""
    a = torch.empty_like(t, dtype=torch.float32)
    return _e2m1_codes_(t, a, torch.empty(t.shape, dtype=torch.int32, device=t.device)).to(torch.int8)


# e2m1 values indexed by the whole code (bit 3 = sign), -0.0 at code 8 as reference.e2m1_decode gives it.
_E2M1_SIGNED = torch.cat([reference.E2M1_VALUES, -reference.E2M1_VALUES])


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """reference.e2m1_decode(codes) bit for bit, through an int32 index instead of int64 (1/2 the bytes)."""
    flat = torch.index_select(_E2M1_SIGNED.to(codes.device), 0, codes.reshape(-1).to(torch.int32))
    return flat.reshape(codes.shape)


def _code_values(codes: torch.Tensor, precision: str) -> torch.Tensor:
    return codes.float() if precision == "int4" else e2m1_values(codes)


def nvfp4_tensor_scale(w: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> float:
    """The per-tensor NVFP4 weight scale: the largest group scale lands on the top of float8_e4m3 (448)."""
    amax = torch.maximum(w.max(), w.min().neg()).item()                 # max |w| without an |w| temporary
    if amax == 0:
        return 1.0
    return torch.tensor(amax / (6.0 * reference.FP8_E4M3_MAX)).to(dtype).float().item()


def quantize_groups_rtn(w: torch.Tensor, precision: str, *, dtype: torch.dtype = torch.bfloat16,
                        wtscale: Optional[float] = None, clip_ratios: Sequence[float] = CLIP_RATIOS):
    """Round-to-nearest group quantization of w [N, K] fp32 with a per-group clipping search.
    Returns (codes int8 [N, K], wscales [N, K/G] (dtype for int4, float8_e4m3fn for nvfp4), wtscale or None).
    Rows are independent (apart from NVFP4's per-tensor scale, fixed first), so they are processed a chunk of
    CHUNK_ELEMENTS at a time: the temporaries stay bounded whatever the layer size. The chunk's three scratch
    tensors are allocated once per call and every pass writes into them: on the development machine a fresh
    chunk-sized tensor cost more in page faults than the arithmetic done in it."""
    N, K = w.shape
    G = GROUP_SIZE[precision]
    if precision == "nvfp4" and wtscale is None:
        wtscale = nvfp4_tensor_scale(w, dtype)
    codes = torch.empty(N, K, dtype=torch.int8)
    stored = torch.empty(N, K // G, dtype=dtype if precision == "int4" else torch.float8_e4m3fn)
    size = min(N, max(1, CHUNK_ELEMENTS // K)) * K
    scratch = (torch.empty(size), torch.empty(size), torch.empty(size, dtype=torch.int32))
    for rows in _row_chunks(N, K):
        stored[rows] = _rtn_rows(w[rows], codes[rows], precision, dtype, wtscale, clip_ratios, scratch)
    return codes, stored, wtscale


def _group_absmax(wg: torch.Tensor, aw: Optional[torch.Tensor]) -> torch.Tensor:
    """max |w| per group, [n, K/G], from wg [n, K/G, G] (and aw = |wg| when the caller has it). The max is exact
    in any order, so this is |wg|.amax(-1) bit for bit: for G = 16 a tree of halving torch.maximum (amax over an
    innermost 16 is not vectorised: 2.6x slower, measured), for G = 64 max(amax, −amin) without the |wg|
    temporary, abs_ turning an all-zero group's −0 into the +0 that |wg|.amax gives."""
    if aw is None:
        return torch.maximum(wg.amax(dim=-1), wg.amin(dim=-1).neg_()).abs_()
    m = aw
    while m.shape[-1] > 1:
        h = m.shape[-1] // 2
        m = torch.maximum(m[..., :h], m[..., h:])
    return m[..., 0]


def _rtn_rows(w: torch.Tensor, codes: torch.Tensor, precision: str, dtype: torch.dtype, wtscale: Optional[float],
              clip_ratios: Sequence[float], scratch: tuple) -> torch.Tensor:
    """quantize_groups_rtn on a few rows: writes codes [n, K] (a view of the output), returns the stored scales.
    The search keeps only each group's best ratio index and rounds once more at the end with the chosen scales:
    cheaper than carrying the best codes through every candidate. NVFP4 searches on magnitudes: e2m1 is
    symmetric and IEEE rounding too, so (q·scale − w)² is the same float for |q|, |w| as for q, w."""
    G = GROUP_SIZE[precision]
    n, K = w.shape
    wg = _grouped(w, G)                                                  # wg: [n, K/G, G]
    buf, aw, bits = (t[:n * K].view(wg.shape) for t in scratch)          # fp32, fp32, int32 scratch
    nvfp4 = precision == "nvfp4"
    if nvfp4:
        torch.abs(wg, out=aw)                                            # aw: |wg|, the NVFP4 search's input
    gmax = _group_absmax(wg, aw if nvfp4 else None)                      # gmax: [n, K/G]
    if len(clip_ratios) > 1:
        best_err = ratios = None
        for ratio in clip_ratios:
            _, scale = _scales_for(gmax * ratio, precision, dtype, wtscale)
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
            if nvfp4:
                e2m1_nearest_abs_(torch.div(aw, safe, out=buf), bits)
                buf.mul_(scale[..., None]).sub_(aw)
            else:
                torch.div(wg, safe, out=buf)
                buf.round_().clamp_(-8, 7).mul_(scale[..., None]).sub_(wg)
            err = buf.square_().sum(dim=-1)                              # [n, K/G]
            if best_err is None:
                best_err, ratios = err, torch.full_like(err, ratio)
            else:                                                        # strict: the earlier ratio wins a tie
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                ratios.masked_fill_(better, ratio)
    else:
        ratios = clip_ratios[0]
    stored, scale = _scales_for(gmax * ratios, precision, dtype, wtscale)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
    torch.div(wg, safe, out=buf)
    if nvfp4:
        codes.copy_(_e2m1_codes_(buf, aw, bits).view(codes.shape))
    else:
        codes.copy_(buf.round_().clamp_(-8, 7).view(codes.shape))
    return stored


def quantize_groups_gptq(w: torch.Tensor, H: torch.Tensor, precision: str, *,
                         dtype: torch.dtype = torch.bfloat16, wtscale: Optional[float] = None,
                         damp: float = GPTQ_DAMP, clip_ratios: Sequence[float] = CLIP_RATIOS):
    """GPTQ (Frantar et al. 2022) with static groups: columns are quantized left to right and each column's
    rounding error is spread over the not-yet-quantized columns through the inverse Hessian. A group's
    scale is chosen (same clipping search as RTN) from the updated weights when the group starts.

    w: [N, K] fp32, H: [K, K] fp32 = E[t·tᵀ] of the inputs the 4-bit GEMM sees. Same returns as
    quantize_groups_rtn."""
    N, K = w.shape
    G = GROUP_SIZE[precision]
    if precision == "nvfp4" and wtscale is None:
        wtscale = nvfp4_tensor_scale(w, dtype)
    W = w.clone()
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)   # upper Cholesky factor of H⁻¹
    codes = torch.empty(N, K, dtype=torch.int8)
    stored_scales = []
    for b0 in range(0, K, GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, K)
        W1 = W[:, b0:b1].clone()
        E1 = torch.empty_like(W1)
        Hi = Hinv[b0:b1, b0:b1]
        with one_thread():
            _gptq_block(W1, E1, Hi, codes[:, b0:b1], stored_scales, precision, G, dtype, wtscale, clip_ratios)
        W[:, b1:] -= E1 @ Hinv[b0:b1, b1:]
    return codes, torch.cat(stored_scales, dim=1), wtscale


def _gptq_block(W1, E1, Hi, codes, stored_scales, precision, G, dtype, wtscale, clip_ratios) -> None:
    """GPTQ inside one lazy-update block: W1 [N, B] is updated in place, E1 [N, B] receives the scaled errors,
    codes [N, B] (a view into the full codes) the int8 codes, stored_scales one [N, 1] scale per group."""
    N = W1.shape[0]
    for g0 in range(0, W1.shape[1], G):
        gw = W1[:, g0:g0 + G]                                              # gw: [N, G], updated weights
        _, s_stored, _ = quantize_groups_rtn(gw.contiguous(), precision, dtype=dtype, wtscale=wtscale,
                                             clip_ratios=clip_ratios)
        stored_scales.append(s_stored)
        scale = s_stored.float() * (wtscale if precision == "nvfp4" else 1.0)   # [N, 1]
        for j in range(g0, g0 + G):
            col = W1[:, j]
            qcol = (_int4_codes if precision == "int4" else _nvfp4_codes)(col[:, None, None], scale).reshape(N)
            codes[:, j] = qcol.to(torch.int8)
            deq = _code_values(qcol, precision) * scale[:, 0]
            err = (col - deq) / Hi[j, j]
            W1[:, j:] -= err[:, None] * Hi[j, j:][None, :]
            E1[:, j] = err


# ------------------------------------------------------------------------------------------ smoothing

def smooth_vector(act_absmax: Optional[torch.Tensor], w: torch.Tensor, alpha: float,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """s_k = a_k^α / w_k^(1−α) (SmoothQuant), a = per-channel activation absmax (1 when data-free), w_k =
    max_n |W[n, k]|. Normalised to geometric mean 1 so neither side drifts in magnitude, clamped away from 0
    for dead channels, and rounded to the storage dtype (the stored s is the one everything is built on).
    Returns fp32 [K]."""
    wmax = torch.maximum(w.amax(dim=0), w.amin(dim=0).neg_()).abs_()    # |w|.amax(0) without an |w| temporary
    wmax = wmax.clamp(min=wmax.max().clamp(min=1e-30) * 1e-5)
    log_s = -(1.0 - alpha) * wmax.log()
    if act_absmax is not None:
        a = act_absmax.float()
        a = a.clamp(min=a.max().clamp(min=1e-30) * 1e-5)
        log_s = log_s + alpha * a.log()
    log_s = log_s - log_s.mean()
    return log_s.exp().to(dtype).float()


# ------------------------------------------------------------------------------------------ one layer

def build_layer(w: torch.Tensor, bias: Optional[torch.Tensor], smooth: torch.Tensor, rank: int, precision: str,
                *, shifted: bool = False, hessian: Optional[torch.Tensor] = None,
                dtype: torch.dtype = torch.bfloat16, exact_svd: bool = False) -> SVDQuantLayer:
    """One SVDQuant layer for a given smoothing vector (fp32 [K], already dtype-rounded) and rank.
    hessian (optional, [K, K] of the smoothed inputs) switches the residual from RTN to GPTQ."""
    w = w.float()
    N, K = w.shape
    if shifted and precision != "int4":
        raise ValueError("the σ shift exists only for int4 layers")
    unsmoothed = bool((smooth == 1).all())                               # s = 1: skip two full passes
    ws = w if unsmoothed else w * smooth[None, :]                        # ws: [N, K], smoothed weight
    L1, L2 = top_singular(ws, rank, exact=exact_svd)
    up = L1.to(dtype)                                                    # U: [N, R]
    down = (L2 / smooth[:, None]).to(dtype)                              # D: [K, R], acts on raw x
    if rank == 0:
        resid = ws                                                       # Rs: [N, K], smoothed domain
    else:                                                                # W − U·Dᵀ, into ws's memory if any
        resid = torch.addmm(w, up.float(), down.float().T, alpha=-1.0, out=None if unsmoothed else ws)
        del ws
        if not unsmoothed:
            resid *= smooth[None, :]
    if hessian is not None:
        codes, wscales, wtscale = quantize_groups_gptq(resid, hessian, precision, dtype=dtype)
    else:
        codes, wscales, wtscale = quantize_groups_rtn(resid, precision, dtype=dtype)
    layer = SVDQuantLayer(
        precision=precision, codes=codes, wscales=wscales, smooth=smooth.to(dtype), proj_down=down,
        proj_up=up, bias=None, wtscale=None if wtscale is None else torch.tensor([wtscale]).to(dtype),
        shifted=shifted, smooth_orig=smooth.to(dtype))
    b = bias.float() if bias is not None else None
    if shifted:
        rowsum = torch.empty(N)                                          # Σ_k Deq[n,k]/s[k], [N]
        for rows in _row_chunks(N, K):
            part = replace(layer, codes=layer.codes[rows], wscales=layer.wscales[rows], proj_up=layer.proj_up[rows])
            rowsum[rows] = (reference.dequantize_weight(part) / smooth[None, :]).sum(dim=1)
        b = (b if b is not None else torch.zeros(N)) - SIGMA * rowsum
    layer.bias = None if b is None else b.to(dtype)
    return layer.validate()


def fast_forward(x: torch.Tensor, layer: SVDQuantLayer) -> torch.Tensor:
    """The reference forward computed as (dequantized activations)·(dequantized weights)ᵀ: the same
    quantized operands as reference.svdquant_linear, one fp32 matmul per chunk of output channels instead
    of the per-group einsum (they differ only by fp32 summation order). x: [M, K] -> fp32 [M, N]."""
    codes, scales = reference.quantize_act(x, layer)
    a = reference.dequantize_act(codes, scales, layer.precision)         # a: [M, K] fp32
    y = reference.lowrank_branch(x, layer)                               # y: [M, N] fp32
    if layer.bias is not None:
        y += layer.bias.float()
    for rows in _row_chunks(layer.N, layer.K):
        part = replace(layer, codes=layer.codes[rows], wscales=layer.wscales[rows], proj_up=layer.proj_up[rows],
                       bias=None, wcscales=None if layer.wcscales is None else layer.wcscales[rows])
        w = _dequantize_weight(part)                                     # w: [rows, K] fp32
        if part.wtscale is not None or part.wcscales is not None:
            w *= reference.output_scale(part)[:, None]
        y[:, rows] += a @ w.T
    return y


def _dequantize_weight(layer: SVDQuantLayer) -> torch.Tensor:
    """reference.dequantize_weight bit for bit (the same products), with e2m1_values' int32 lookup and the
    scaling in place."""
    N, K, G = layer.N, layer.K, layer.group_size
    w = _code_values(layer.codes, layer.precision)                       # w: [N, K] fp32
    w.reshape(N, K // G, G).mul_(layer.wscales.float()[..., None])
    return w


def relative_error(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], layer: SVDQuantLayer,
                   ref: Optional[torch.Tensor] = None) -> float:
    """‖Wx − Ŵx‖/‖Wx‖ where Ŵx is the quantized layer's output minus the ORIGINAL bias, so a wrong shift
    compensation shows up as error. ref: x·Wᵀ when the caller already has it (one per candidate otherwise)."""
    x = x.float()
    if ref is None:
        ref = x @ w.float().T                                            # [M, N]
    out = fast_forward(x, layer)
    if bias is not None:
        out = out - bias.float()
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def synthetic_rows(K: int, shifted: bool, M: int = SYNTHETIC_ROWS, seed: int = 0) -> torch.Tensor:
    """Activations for data-free mode: standard normal rows, through GELU for post-GELU layers. [M, K] fp32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    return torch.nn.functional.gelu(x, approximate="tanh") if shifted else x


def hessian_of(rows: torch.Tensor, smooth: torch.Tensor, shifted: bool) -> torch.Tensor:
    """E[t·tᵀ] of the smoothed (and shifted) inputs t = (x + σ·shifted)/s, fp32 [K, K]."""
    t = reference.smooth_act(rows, smooth, shifted)
    return t.T @ t / t.shape[0]


def quantize_svdquant(w: torch.Tensor, bias: Optional[torch.Tensor], *, precision: str = "int4", rank: int = 32,
                      stats: Optional[ActStats] = None, shifted: bool = False, gptq: bool = False,
                      alphas: Optional[Sequence[float]] = None, dtype: torch.dtype = torch.bfloat16,
                      eval_rows: Optional[torch.Tensor] = None, ablation: bool = False
                      ) -> tuple[SVDQuantLayer, LayerReport]:
    """SVDQuant one layer. w: [N, K], bias: [N] or None, any float dtype.

    With `stats`, α is searched on stats.rows (the output error of the full quantized layer, activation
    quantization included) and smoothing uses the recorded per-channel absmax. Without, data-free: a = 1 and
    the search runs on synthetic rows. GPTQ (needs stats) re-quantizes the residual at the chosen α.

    `ablation` adds the paper's ablation on the same activations: naive W4A4 (RTN, no smoothing, rank 0),
    smoothing only (α searched the same way, rank 0) and SVD only (no smoothing, rank R), all RTN. Errors
    are measured on `eval_rows` (default: the search rows). The report always holds "svdquant"."""
    w = w.float()
    N, K = w.shape
    if precision == "nvfp4":
        shifted = False
    if gptq and stats is None:
        raise ValueError("GPTQ needs calibration activations (stats); data-free mode is RTN only")
    if stats is not None:
        rows, act = stats.rows.float(), stats.absmax(shifted)
        alphas = ALPHAS_CALIBRATED if alphas is None else alphas
    else:
        rows, act = synthetic_rows(K, shifted), None
        alphas = ALPHAS_DATA_FREE if alphas is None else alphas
    held_out = eval_rows is not None
    evals = eval_rows.float() if held_out else rows
    # W·x of the search and evaluation rows, the same for every candidate
    ref_rows = rows @ w.T                                                # [M, N]
    ref_evals = evals @ w.T if held_out else ref_rows
    ones = torch.ones(K)
    # (α or "ones", rank) -> [search error, eval error, α, s, layer]. Built once per distinct (s, rank):
    # data-free α = 1 is s = 1, which is also the naive and SVD-only smoothing. Only the best rank-R layer is
    # kept; the others are dropped as soon as they lose (a 12288 x 3072 layer is 40 MB of int8 codes).
    cache: dict = {}
    best: list = []

    smooths: dict = {None: ones}                                         # α -> s, each computed once

    def candidate(alpha: Optional[float], r: int) -> list:
        if alpha not in smooths:
            smooths[alpha] = smooth_vector(act, w, alpha, dtype)
        s = smooths[alpha]
        key = ("ones" if torch.equal(s, ones) else alpha, r)
        if key not in cache:
            layer = build_layer(w, bias, s, r, precision, shifted=shifted, dtype=dtype)
            err = relative_error(rows, w, bias, layer, ref_rows)
            entry = [err, relative_error(evals, w, bias, layer, ref_evals) if held_out else err, alpha, s, None]
            if r == rank and (not best or err < best[0][0]):
                if best:
                    best[0][4] = None
                entry[4] = layer
                best[:] = [entry]
            cache[key] = entry
        return cache[key]

    # s = 1 (α None) is always a candidate: smoothing is kept only where it beats no smoothing on the search
    # rows (with the ablation on, these builds are the naive and SVD-only ones, so they come for free)
    grid = list(alphas) + [None]
    for a in grid:
        candidate(a, rank)
    _, eval_err, alpha, s, layer = best[0]
    report = LayerReport(alpha=alpha)
    if gptq:
        layer = build_layer(w, bias, s, rank, precision, shifted=shifted, dtype=dtype,
                            hessian=hessian_of(rows, s, shifted))
        report.errors["svdquant"] = relative_error(evals, w, bias, layer, ref_evals)
    else:
        report.errors["svdquant"] = eval_err
    if ablation:
        report.errors["naive"] = candidate(None, 0)[1]
        report.errors["smooth"] = min((candidate(a, 0) for a in grid), key=lambda c: c[0])[1]
        report.errors["svd"] = candidate(None, rank)[1]
    return layer, report


# ------------------------------------------------------------------------------------------ W4A16

def quantize_w4a16(w: torch.Tensor, bias: Optional[torch.Tensor], *, group_size: int = 64,
                   dtype: torch.dtype = torch.bfloat16) -> W4A16Layer:
    """Asymmetric uint4 per (row, group): scale = (max − min)/15, zero = min, both rounded to dtype first;
    codes = clamp(round((w − zero)/scale), 0, 15) so that w ≈ codes·scale + zero (reference.dequantize_w4a16).
    A short last group (K not a multiple of G) is padded with its own first column, which moves neither
    its min nor its max. w: [N, K] in the ORIGINAL row order; bias stays the original bias. In row chunks
    (an 18432 x 3072 adaLN weight would otherwise need ~1 GB of fp32 temporaries)."""
    N, K = w.shape
    G = group_size
    ng = math.ceil(K / G)
    codes = torch.empty(N, K, dtype=torch.uint8)
    scales = torch.empty(N, ng, dtype=dtype)
    zeros = torch.empty(N, ng, dtype=dtype)
    for rows in _row_chunks(N, K):
        codes[rows], scales[rows], zeros[rows] = _w4a16_rows(w[rows].float(), G, dtype)
    return W4A16Layer(codes=codes, scales=scales, zeros=zeros,
                      bias=None if bias is None else bias.to(dtype), group_size=G).validate()


def _w4a16_rows(w: torch.Tensor, G: int, dtype: torch.dtype):
    n, K = w.shape
    ng = math.ceil(K / G)
    pad = ng * G - K
    wp = torch.cat([w, w[:, (ng - 1) * G:][:, :1].expand(n, pad)], dim=1) if pad else w
    wg = wp.reshape(n, ng, G)                                            # wg: [n, ceil(K/G), G]
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15.0).to(dtype)
    zero = lo.to(dtype)
    sf = scale.float()
    safe = torch.where(sf > 0, sf, torch.ones_like(sf))
    q = ((wg - zero.float()[..., None]) / safe[..., None]).round_().clamp_(0, 15)
    q = torch.where(sf[..., None] > 0, q, torch.zeros_like(q))
    return q.reshape(n, ng * G)[:, :K].to(torch.uint8), scale, zero
