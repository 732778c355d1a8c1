"""nunchaku_core/quantize/svdquant.py on single layers: weight quantizers (error bounds derived from the grids), the low-rank
branch (randomized vs exact SVD), the layer build (effective weight, shift compensation), GPTQ, W4A16,
and the fast evaluation forward against reference.svdquant_linear."""
from __future__ import annotations

import pytest
import torch

from nunchaku_core.quantize import svdquant as Q
from nunchaku_core import reference as ref
from nunchaku_core.layer import SIGMA

BF16_U = 2.0 ** -8   # unit roundoff of bf16 (8 significant bits): one rounding is off by at most 2^-8 relative


def decaying_weight(N, K, seed=0, decay=0.5):
    """A weight with a power-law spectrum (σ_i ∝ i^-decay) plus a few outlier input channels, like trained
    linears (random Gaussian matrices have a flat spectrum and no outliers)."""
    g = torch.Generator().manual_seed(seed)
    r = min(N, K)
    U = torch.linalg.qr(torch.randn(N, r, generator=g)).Q
    V = torch.linalg.qr(torch.randn(K, r, generator=g)).Q
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -decay
    w = (U * s) @ V.T
    w[:, torch.randint(0, K, (4,), generator=g)] *= 8.0
    return w / w.abs().max() * 0.3


def outlier_acts(M, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, torch.randint(0, K, (6,), generator=g)] *= 25.0
    return x


def test_int4_rtn_codes_and_error_bound():
    w = decaying_weight(256, 512)
    codes, scales, wt = Q.quantize_groups_rtn(w, "int4", clip_ratios=(1.0,))
    assert codes.dtype == torch.int8 and codes.shape == w.shape and wt is None
    assert scales.dtype == torch.bfloat16 and scales.shape == (256, 512 // 64)
    assert codes.min() >= -8 and codes.max() <= 7
    deq = (codes.float().reshape(256, 8, 64) * scales.float()[..., None]).reshape(256, 512)
    # scale = bf16(absmax/7): the largest |w|/scale is ≤ 7·(1 + 2^-8) < 7.5, so nothing clips and every
    # element is within half a step of its code
    step = scales.float().repeat_interleave(64, dim=1)
    assert ((deq - w).abs() <= 0.5 * step * (1 + 1e-6)).all()


def test_clip_search_never_worse_than_absmax():
    w = decaying_weight(256, 512, seed=3)
    for precision in ("int4", "nvfp4"):
        G = 64 if precision == "int4" else 16
        errs = []
        for ratios in ((1.0,), Q.CLIP_RATIOS):
            c, s, wt = Q.quantize_groups_rtn(w, precision, clip_ratios=ratios)
            vals = c.float() if precision == "int4" else ref.e2m1_decode(c)
            scale = s.float() * (wt or 1.0)
            deq = (vals.reshape(256, -1, G) * scale[..., None]).reshape(256, 512)
            errs.append(((deq - w) ** 2).reshape(256, -1, G).sum(-1))
        # per group: the search includes ratio 1.0, so it can only pick something at least as good
        assert (errs[1] <= errs[0] * (1 + 1e-6) + 1e-12).all()


def test_nvfp4_rtn_codes_and_error_bound():
    w = decaying_weight(128, 256)
    codes, scales, wt = Q.quantize_groups_rtn(w, "nvfp4", clip_ratios=(1.0,))
    assert scales.dtype == torch.float8_e4m3fn and scales.shape == (128, 256 // 16)
    assert codes.min() >= 0 and codes.max() <= 15
    assert wt == torch.tensor(wt).to(torch.bfloat16).float().item()      # stored exactly as bf16
    scale = scales.float() * wt                                           # [N, K/16]
    deq = (ref.e2m1_decode(codes).reshape(128, 16, 16) * scale[..., None]).reshape(128, 256)
    # the widest e2m1 gap is 4 -> 6, so rounding is off by at most 1·scale; fp8 rounding of the scale can make
    # |w|/scale reach 6·(1 + 2^-4) = 6.375, which rounds to 6 (error 0.375·scale): within the same bound
    assert ((deq - w).abs() <= scale.repeat_interleave(16, dim=1) * (1 + 1e-6)).all()


def e2m1_bit_classes() -> torch.Tensor:
    """fp32 inputs covering every class e2m1 rounding can tell apart: every exponent (zeros, subnormals,
    normals, ±Inf and NaNs, signalling and quiet) and both signs, with the top 11 mantissa bits all 2048 ways
    and the low 12 bits as 0 (every tie: the midpoints need at most 3 mantissa bits), 1 (just above),
    0xFFF (just below the next, i.e. below every tie), 0x800/0x7FF/0x801 (half-way in the low bits) and 0xFFE.
    7.3 M values."""
    hi = torch.arange(1 << 12, dtype=torch.int64) << 20              # sign, exponent and 3 mantissa bits ...
    mid = torch.arange(1 << 8, dtype=torch.int64) << 12              # ... the next 8 mantissa bits
    lo = torch.tensor([0, 1, 0x7FF, 0x800, 0x801, 0xFFE, 0xFFF], dtype=torch.int64)
    bits = (hi[:, None, None] | mid[None, :, None] | lo[None, None, :]).reshape(-1)
    return (bits - (bits >= 1 << 31) * (1 << 32)).to(torch.int32).view(torch.float32)


def test_e2m1_codes_and_nearest_equal_reference():
    """The quantizer's bit-level e2m1 rounding (quantize.e2m1_codes, and e2m1_nearest_abs_ for the clipping
    search) gives the reference's codes bit for bit, on every input class: ties to even, saturation, the sign
    of negative inputs that round to 0, code 0 for ±0 and every NaN, ±Inf saturating. (All 2^32 bit patterns
    were checked once: bench/README.md.)"""
    t = e2m1_bit_classes()
    want = ref.e2m1_round(t)
    assert torch.equal(Q.e2m1_codes(t), want)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert Q.e2m1_codes(torch.cat([ties, -ties])).tolist() == [0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14]
    a = t.abs()
    near = Q.e2m1_nearest_abs_(a, torch.empty(t.shape, dtype=torch.int32))
    nan = torch.isnan(t)
    assert torch.equal(near[~nan], ref.e2m1_decode(want)[~nan].abs()) and torch.isnan(near[nan]).all()


def test_e2m1_values_and_dequantize_equal_reference():
    codes = torch.arange(16, dtype=torch.int8)
    assert torch.equal(Q.e2m1_values(codes).view(torch.int32), ref.e2m1_decode(codes).view(torch.int32))  # -0.0
    w = decaying_weight(96, 256, seed=21)
    for precision in ("int4", "nvfp4"):
        layer = Q.build_layer(w, None, torch.ones(256), 8, precision)
        assert torch.equal(Q._dequantize_weight(layer), ref.dequantize_weight(layer))


def rtn_plain(w: torch.Tensor, precision: str, clip_ratios=Q.CLIP_RATIOS):
    """quantize_groups_rtn written plainly on the reference's rounding, as the quantizer did before its
    bit-level e2m1 rounding, magnitude search and scratch buffers: per ratio the grouped squared error, a
    strict `<` scan (the earlier ratio wins a tie), then the codes at the chosen scales."""
    N, K = w.shape
    G = 64 if precision == "int4" else 16
    wt = None
    if precision == "nvfp4":
        amax = w.abs().max().item()
        wt = 1.0 if amax == 0 else torch.tensor(amax / (6.0 * 448.0)).to(torch.bfloat16).float().item()

    def scales(gmax):
        if precision == "int4":
            stored = (gmax / 7.0).to(torch.bfloat16)
            return stored, stored.float()
        stored = (gmax / (6.0 * wt)).clamp(max=448.0).to(torch.float8_e4m3fn)
        return stored, stored.float() * wt

    def rounded(u):
        return u.round().clamp(-8, 7) if precision == "int4" else ref.e2m1_decode(ref.e2m1_round(u))

    wg = w.reshape(N, K // G, G)
    gmax = wg.abs().amax(dim=-1)
    best_err, best_idx = None, torch.zeros(N, K // G, dtype=torch.long)
    for i, ratio in enumerate(clip_ratios):
        _, scale = scales(gmax * ratio)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
        err = (rounded(wg / safe) * scale[..., None] - wg).square().sum(dim=-1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_idx[better] = i
    stored, scale = scales(gmax * torch.tensor(clip_ratios, dtype=torch.float32)[best_idx])
    u = wg / torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
    codes = u.round().clamp(-8, 7).to(torch.int8) if precision == "int4" else ref.e2m1_round(u)
    return codes.reshape(N, K), stored, wt


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_rtn_equals_plain_search_on_reference_rounding(monkeypatch, precision):
    """Codes, scales and the tensor scale bit for bit equal to rtn_plain, with an all-zero group, −0.0s,
    subnormals, a group far below the others (NVFP4: its fp8 scale underflows to 0), and several chunks with a
    short last one."""
    w = decaying_weight(200, 512, seed=23)
    w[3] = 0.0
    w[5, :64] = -0.0
    w[7, 64:128] = 1e-41
    w[9, 128:192] *= 1e-6
    monkeypatch.setattr(Q, "CHUNK_ELEMENTS", 48 * 512)                   # 48 rows a chunk: 5 chunks
    codes, stored, wt = Q.quantize_groups_rtn(w, precision)
    want_codes, want_stored, want_wt = rtn_plain(w, precision)
    assert torch.equal(codes, want_codes) and wt == want_wt
    assert torch.equal(stored.view(torch.uint8) if precision == "nvfp4" else stored.view(torch.int16),
                       want_stored.view(torch.uint8) if precision == "nvfp4" else want_stored.view(torch.int16))


@pytest.mark.parametrize("shape", [(3072, 3072), (3072, 12288)])
def test_randomized_svd_matches_exact(shape):
    """The randomized top-R factors (R + 16 sketch columns, 2 power iterations) reach the exact truncated SVD's
    residual ‖W − L1·L2ᵀ‖_F within 0.5 % on FLUX-size weights (3072², and mlp_fc2's 3072 × 12288) with a
    trained-like spectrum σ_i ∝ i^-0.5 over 512 directions. The exact optimum is known by construction
    (Eckart-Young: √Σ_{i>R} σ_i²), so no 3072² SVD is needed.
    Measured excess: 0.26 % (3072²), 0.00 % (3072 × 12288)."""
    N, K = shape
    g = torch.Generator().manual_seed(5)
    r, R = 512, 32
    U = torch.linalg.qr(torch.randn(N, r, generator=g)).Q
    V = torch.linalg.qr(torch.randn(K, r, generator=g)).Q
    sv = torch.arange(1, r + 1, dtype=torch.float32) ** -0.5
    w = (U * sv) @ V.T
    best = sv[R:].square().sum().sqrt()
    L1, L2 = Q.top_singular(w, R)
    got = (w - L1 @ L2.T).norm()
    excess = ((got - best) / best).item()
    assert got >= best * (1 - 1e-4)
    assert excess < 5e-3, f"randomized residual {got:.6g} vs exact {best:.6g} (excess {excess:.2e})"


def test_build_layer_effective_weight_and_full_rank():
    w = decaying_weight(128, 256, seed=7)
    s = Q.smooth_vector(outlier_acts(64, 256).abs().amax(0), w, 0.5)
    errs = []
    for rank in (0, 8, 32, 128):
        layer = Q.build_layer(w, None, s, rank, "int4", exact_svd=True)
        errs.append(((ref.effective_weight(layer) - w).norm() / w.norm()).item())
    assert errs == sorted(errs, reverse=True), errs
    # full rank: the low-rank branch alone is W up to bf16 rounding of U and D, the 4-bit residual only holds
    # those rounding errors (quantized to a few % of themselves)
    assert errs[-1] < 4 * BF16_U, errs


def test_shift_compensation_is_exact_up_to_bf16():
    w = decaying_weight(128, 256, seed=8)
    b = torch.randn(128) * 0.1
    s = Q.smooth_vector(None, w, 0.5)
    layer = Q.build_layer(w, b, s, 16, "int4", shifted=True)
    assert layer.shifted
    # stored bias = bf16(b − σ·rowsum(Deq/s)); effective bias = stored + σ·rowsum(Deq/s) (reference) -> b up
    # to one bf16 rounding of the stored value
    rowsum = (ref.dequantize_weight(layer) / layer.smooth.float()).sum(1)
    bound = (b - SIGMA * rowsum).abs() * BF16_U + 1e-6
    assert ((ref.effective_bias(layer) - b).abs() <= bound).all()


@pytest.mark.parametrize("precision,shifted", [("int4", False), ("int4", True), ("nvfp4", False)])
def test_fast_forward_equals_reference(precision, shifted):
    """Same quantized operands, one fp32 matmul instead of per-group sums: they differ by summation order
    only, |Δ| ≤ K·2^-24·Σ|a·w| per output; bounded here by 1e-5 of the output norm (K = 256)."""
    w = decaying_weight(128, 256, seed=9)
    x = outlier_acts(17, 256)
    if shifted:
        x = torch.nn.functional.gelu(x)
    layer, _ = Q.quantize_svdquant(w, torch.randn(128), precision=precision, rank=16, shifted=shifted,
                                   stats=Q.ActStats(x.amax(0), x.amin(0), x))
    a = ref.svdquant_linear(x, layer)
    b = Q.fast_forward(x, layer)
    assert (a - b).norm() <= 1e-5 * a.norm()


def test_ablation_order_on_outlier_layer():
    """On a layer with outliers in both activations and weights, the paper's order holds per layer:
    SVDQuant < SVD only, SVDQuant < smoothing only < naive."""
    w = decaying_weight(128, 256, seed=11)
    x = outlier_acts(256, 256, seed=12)
    stats = Q.ActStats(x[:128].amax(0), x[:128].amin(0), x[:128])
    for precision in ("int4", "nvfp4"):
        _, rep = Q.quantize_svdquant(w, None, precision=precision, rank=32, stats=stats, ablation=True,
                                     eval_rows=x[128:])
        e = rep.errors
        assert e["svdquant"] < e["svd"] and e["svdquant"] < e["smooth"] < e["naive"], (precision, e)


def test_gptq_lowers_error_on_correlated_inputs():
    g = torch.Generator().manual_seed(13)
    w = decaying_weight(128, 256, seed=14)
    mix = torch.randn(256, 256, generator=g) / 16
    x = torch.randn(512, 256, generator=g) @ mix + outlier_acts(512, 256, seed=15) * 0.1   # correlated channels
    stats = Q.ActStats(x[:384].amax(0), x[:384].amin(0), x[:384])
    for precision in ("int4", "nvfp4"):
        _, rtn = Q.quantize_svdquant(w, None, precision=precision, rank=16, stats=stats, alphas=(0.5,),
                                     eval_rows=x[384:])
        _, gq = Q.quantize_svdquant(w, None, precision=precision, rank=16, stats=stats, alphas=(0.5,), gptq=True,
                                    eval_rows=x[384:])
        assert gq.errors["svdquant"] < rtn.errors["svdquant"], (precision, gq.errors, rtn.errors)


def test_gptq_needs_calibration():
    with pytest.raises(ValueError, match="GPTQ needs calibration"):
        Q.quantize_svdquant(torch.randn(128, 128), None, gptq=True)


def test_data_free_alpha_one_is_no_smoothing():
    w = decaying_weight(128, 256)
    assert torch.equal(Q.smooth_vector(None, w, 1.0), torch.ones(256))
    layer, rep = Q.quantize_svdquant(w, None, rank=16, ablation=True)
    assert rep.alpha in Q.ALPHAS_DATA_FREE
    assert rep.errors["svdquant"] <= rep.errors["svd"] + 1e-7           # α = 1 is one of the candidates


@pytest.mark.parametrize("K", [3072, 200])
def test_w4a16_codes_and_error_bound(K):
    g = torch.Generator().manual_seed(16)
    w = torch.randn(96, K, generator=g) * 0.05
    b = torch.randn(96, generator=g)
    layer = Q.quantize_w4a16(w, b)
    assert layer.codes.dtype == torch.uint8 and layer.codes.max() <= 15
    assert layer.scales.shape == (96, -(-K // 64)) and layer.scales.dtype == torch.bfloat16
    assert torch.equal(layer.bias, b.to(torch.bfloat16))
    deq = ref.dequantize_w4a16(layer)
    cols = torch.arange(K) // 64
    step = layer.scales.float()[:, cols]
    # zero = bf16(min) and scale = bf16((max − min)/15): the grid can miss the group's ends by the two bf16
    # roundings, i.e. by at most half_ulp·(|min| + 15·scale) on top of half a step
    lo = w.reshape(96, -1)
    slack = BF16_U * (layer.zeros.float()[:, cols].abs() + 15 * step) * 2
    assert ((deq - lo).abs() <= 0.5 * step + slack + 1e-7).all()


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_row_chunks_change_nothing(monkeypatch, precision):
    """The quantizer and the error evaluation work a chunk of rows at a time (memory bound): the result is
    bit-identical to one chunk."""
    w = decaying_weight(200, 256, seed=17)
    x = outlier_acts(9, 256)
    shifted = precision == "int4"
    b, s = torch.randn(200), Q.smooth_vector(None, w, 0.5)
    whole = Q.quantize_groups_rtn(w, precision)
    layer = Q.build_layer(w, b, s, 16, precision, shifted=shifted)       # shifted: chunked bias compensation
    y_whole = Q.fast_forward(x, layer)
    monkeypatch.setattr(Q, "CHUNK_ELEMENTS", 48 * 256)                   # 48 rows of K = 256
    assert torch.equal(Q.build_layer(w, b, s, 16, precision, shifted=shifted).bias, layer.bias)
    parts = Q.quantize_groups_rtn(w, precision)
    assert torch.equal(whole[0], parts[0]) and torch.equal(whole[1].float(), parts[1].float()) and whole[2] == parts[2]
    assert torch.allclose(Q.fast_forward(x, layer), y_whole, rtol=0, atol=1e-6 * y_whole.abs().max().item())
    assert (ref.svdquant_linear(x, layer) - y_whole).norm() <= 1e-5 * y_whole.norm()
