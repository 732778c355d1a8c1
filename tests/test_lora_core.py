"""nunchaku_core.lora against the dense math: W_eff(extended) = W_eff(original) + Σ s·up·downᵀ, and the same
through the reference forward.

Tolerances (u32 = 2^-24, the fp32 unit roundoff; γ_n = n·u32 / (1 − n·u32), Higham's bound for a sum of n
products; u16 = 2^-8, the bf16 unit roundoff):
- W_eff is computed in fp32 as w + U·Dᵀ, so each of the two compared W_eff carries at most
  γ_{R+1}·(|w| + |U|·|D|ᵀ), R its rank (|·| elementwise).
- extend_lowrank stores down and s·up in bf16, one rounding each: every stored product u'·d' is within
  (2·u16 + u16²)·|s·up|·|down| of the exact one. Tests that feed bf16 weights and power-of-two scales have
  no such term (the stored values are exact), and are then held to the fp32 bound alone.
- Forward: the 4-bit term depends only on x, smooth, the shift flag, codes and scales, all shared by the
  two layers, so reference.svdquant_linear computes the very same fp32 value for it in both and it cancels
  in the difference. What is left is the low-rank branch, (x·D)·Uᵀ in fp32: ≤ γ_{K+R}·|x|·|D|·|U|ᵀ, plus
  the two additions of the 4-bit term and the bias, each ≤ u32·|partial sum|.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from nunchaku_core import lora
from nunchaku_core import reference as ref
from nunchaku_core.layer import tensors_equal

from random_checkpoint import random_svdquant, random_w4a16

U32, U16 = 2.0 ** -24, 2.0 ** -8
BF16_PRODUCT = 2 * U16 + U16 ** 2


def gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_lora(N: int, K: int, r: int, g: torch.Generator, exact: bool = False):
    """down [K, r], up [N, r] of LoRA-like size. exact: bf16-representable values (stored without rounding)."""
    down, up = torch.randn(K, r, generator=g) * 0.05, torch.randn(N, r, generator=g) * 0.05
    return (down.bfloat16().float(), up.bfloat16().float()) if exact else (down, up)


def dense(parts):
    """Σ s·up·downᵀ in fp64 and its elementwise magnitude Σ |s·up|·|down|ᵀ (for the bf16 bound)."""
    delta = sum(s * up.double() @ down.double().T for down, up, s in parts)
    mag = sum(abs(s) * up.double().abs() @ down.double().abs().T for down, up, s in parts)
    return delta, mag


def w_eff_bound(layer) -> torch.Tensor:
    """γ_{R+1}·(|w| + |U|·|D|ᵀ): fp32 rounding of reference.effective_weight."""
    w = (ref.dequantize_weight(layer) / layer.smooth.float()[None, :] * ref.output_scale(layer)[:, None]).double()
    lr = layer.proj_up.double().abs() @ layer.proj_down.double().abs().T
    return gamma(layer.R + 1) * (w.abs() + lr)


def assert_w_eff_delta(orig, ext, delta, mag, exact: bool):
    err = (ref.effective_weight(ext).double() - ref.effective_weight(orig).double() - delta).abs()
    tol = w_eff_bound(orig) + w_eff_bound(ext) + (0 if exact else BF16_PRODUCT * mag)
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"


# ------------------------------------------------------------------------------------ extend_lowrank

@pytest.mark.parametrize("precision,shifted", [("int4", False), ("int4", True), ("nvfp4", False)])
def test_extend_matches_dense_weight(precision, shifted):
    g = gen(1)
    layer = random_svdquant(128, 256, 32, precision, g, shifted=shifted)
    down, up = rand_lora(128, 256, 8, g)
    s = 0.3  # strength 0.6 · alpha 4 / rank 8: not a power of two, so s·up rounds in bf16
    ext = lora.extend_lowrank(layer, [down], [up], [s])
    assert ext.R == 40 and ext.proj_down.dtype == layer.proj_down.dtype == torch.bfloat16
    assert ext.codes is layer.codes and ext.wscales is layer.wscales and ext.bias is layer.bias
    assert_w_eff_delta(layer, ext.validate(), *dense([(down, up, s)]), exact=False)


@pytest.mark.parametrize("precision,shifted", [("int4", False), ("int4", True), ("nvfp4", False)])
def test_extend_matches_dense_forward(precision, shifted):
    g = gen(2)
    N, K = 128, 256
    layer = random_svdquant(N, K, 32, precision, g, shifted=shifted)
    parts = [(*rand_lora(N, K, 8, g, exact=True), 0.5), (*rand_lora(N, K, 4, g, exact=True), -0.25)]
    ext = lora.extend_lowrank(layer, [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])
    for M in (1, 3, 17):
        x = torch.randn(M, K, generator=g)
        got = ref.svdquant_linear(x, ext).double() - ref.svdquant_linear(x, layer).double()
        want = x.double() @ dense(parts)[0].T
        four_bit = ref.gemm_w4a4(*ref.quantize_act(x, layer), layer).double().abs()
        bias = layer.bias.double().abs()
        tol = 0
        for lay in (layer, ext):
            branch = x.double().abs() @ lay.proj_down.double().abs() @ lay.proj_up.double().abs().T
            tol = tol + gamma(K + lay.R + 2) * (four_bit + bias + branch)
        assert ((got - want).abs() <= tol).all(), f"M={M}: max excess {((got - want).abs() - tol).max().item():.3g}"


def test_strength_zero_and_removal_are_exact():
    g = gen(3)
    layer = random_svdquant(128, 128, 16, "int4", g)
    before = ref.effective_weight(layer)
    snapshot = random_svdquant(128, 128, 16, "int4", gen(3))     # same seed: a bit-identical copy
    down, up = rand_lora(128, 128, 8, g)
    zero = lora.extend_lowrank(layer, [down], [up], [0.0])
    assert zero is not layer and zero.proj_down is layer.proj_down and torch.equal(ref.effective_weight(zero), before)
    ext = lora.extend_lowrank(layer, [down, down], [up, up], [0.7, 0.0])        # the 0 one is left out
    assert ext.R == 24
    # "removing" = going back to the original object, which extend_lowrank never touched
    assert tensors_equal(layer, snapshot) and torch.equal(ref.effective_weight(layer), before)


def test_stacking_two_loras():
    g = gen(4)
    layer = random_svdquant(128, 192, 32, "int4", g)
    a, b = (*rand_lora(128, 192, 8, g), 0.4), (*rand_lora(128, 192, 16, g), 1.3)
    both = lora.extend_lowrank(layer, [a[0], b[0]], [a[1], b[1]], [a[2], b[2]])
    chained = lora.extend_lowrank(lora.extend_lowrank(layer, [a[0]], [a[1]], [a[2]]), [b[0]], [b[1]], [b[2]])
    assert tensors_equal(both, chained) and both.R == 56
    assert_w_eff_delta(layer, both, *dense([a, b]), exact=False)


def test_extend_rejects_wrong_shapes():
    g = gen(5)
    layer = random_svdquant(128, 128, 16, "int4", g)
    down, up = rand_lora(128, 128, 8, g)
    with pytest.raises(ValueError, match=r"transpose"):
        lora.extend_lowrank(layer, [down.T], [up], [1.0])
    with pytest.raises(ValueError, match=r"one of each"):
        lora.extend_lowrank(layer, [down], [up], [1.0, 1.0])


# ------------------------------------------------------------------------------------ fused outputs

def test_lora_for_rows_qkv_block_diagonal():
    g = gen(6)
    D, K = 64, 128
    layer = random_svdquant(3 * D, K, 16, "int4", g)
    ranks, scales = (4, 8, 2), (0.5, 1.5, -0.75)
    parts, dense_parts = [], []
    for i, (r, s) in enumerate(zip(ranks, scales)):
        down, up = rand_lora(D, K, r, g)
        parts.append((i * D, D, down, up, s))
        full = torch.zeros(3 * D, r)
        full[i * D:(i + 1) * D] = up
        dense_parts.append((down, full, s))
    down, up = lora.lora_for_rows(3 * D, parts)
    assert down.shape == (K, 14) and up.shape == (3 * D, 14)
    # block diagonal: q's columns 0..3 are zero outside rows 0..D, k's 4..11 outside D..2D, v's 12..13 outside 2D..3D
    mask = torch.zeros(3 * D, 14, dtype=torch.bool)
    mask[:D, :4], mask[D:2 * D, 4:12], mask[2 * D:, 12:] = True, True, True
    assert (up[~mask] == 0).all()
    ext = lora.extend_lowrank(layer, [down], [up], [1.0])
    assert_w_eff_delta(layer, ext, *dense(dense_parts), exact=False)


def test_lora_for_rows_overlap_and_bounds():
    g = gen(7)
    d1, u1 = rand_lora(16, 64, 2, g)
    d2, u2 = rand_lora(32, 64, 3, g)
    down, up = lora.lora_for_rows(48, [(0, 16, d1, u1, 1.0), (0, 32, d2, u2, 2.0)])   # both cover rows 0..15
    want = torch.zeros(48, 64, dtype=torch.float64)
    want[:16] += u1.double() @ d1.double().T
    want[:32] += 2.0 * u2.double() @ d2.double().T
    assert torch.allclose(up.double() @ down.double().T, want, rtol=0, atol=gamma(5) * want.abs().max().item())
    with pytest.raises(ValueError, match=r"outside"):
        lora.lora_for_rows(48, [(40, 16, d1, u1, 1.0)])


def test_linear1_split_reproduces_dense_lora():
    g = gen(8)
    D = 64
    qkv, mlp = random_svdquant(3 * D, D, 16, "int4", g), random_svdquant(4 * D, D, 16, "int4", g)
    down, up = rand_lora(7 * D, D, 8, g)
    s = 0.8
    split = lora.split_rows_for_linear1(down, up, D)
    ext = {name: lora.extend_lowrank(lay, [split[name][0]], [split[name][1]], [s])
           for name, lay in (("qkv_proj", qkv), ("mlp_fc1", mlp))}
    delta, mag = dense([(down, up, s)])
    assert_w_eff_delta(qkv, ext["qkv_proj"], delta[:3 * D], mag[:3 * D], exact=False)
    assert_w_eff_delta(mlp, ext["mlp_fc1"], delta[3 * D:], mag[3 * D:], exact=False)


def test_linear1_split_drops_columns_of_other_parts():
    # diffusers-style LoRA on a single block: to_q, to_k, to_v, proj_mlp -> offsets into linear1's 7D rows
    g = gen(9)
    D = 64
    parts = [(0, D, *rand_lora(D, D, 4, g), 1.0), (D, D, *rand_lora(D, D, 4, g), 1.0),
             (2 * D, D, *rand_lora(D, D, 4, g), 1.0), (3 * D, 4 * D, *rand_lora(4 * D, D, 8, g), 1.0)]
    down, up = lora.lora_for_rows(7 * D, parts)
    split = lora.split_rows_for_linear1(down, up, D)
    assert split["qkv_proj"][0].shape == (D, 12) and split["qkv_proj"][1].shape == (3 * D, 12)
    assert split["mlp_fc1"][0].shape == (D, 8) and split["mlp_fc1"][1].shape == (4 * D, 8)
    full = up.double() @ down.double().T
    assert torch.equal(split["qkv_proj"][1].double() @ split["qkv_proj"][0].double().T, full[:3 * D])


def test_linear2_split_reproduces_dense_lora():
    g = gen(10)
    D = 64
    out_proj = random_svdquant(D, D, 16, "int4", g)
    fc2 = random_svdquant(D, 4 * D, 16, "int4", g, shifted=True)
    down, up = rand_lora(D, 5 * D, 8, g, exact=True)
    s = 0.5
    split = lora.split_cols_for_linear2(down, up, D)
    ext_o = lora.extend_lowrank(out_proj, [split["out_proj"][0]], [split["out_proj"][1]], [s])
    ext_f = lora.extend_lowrank(fc2, [split["mlp_fc2"][0]], [split["mlp_fc2"][1]], [s])
    assert ext_o.bias is out_proj.bias and ext_f.bias is fc2.bias
    delta, mag = dense([(down, up, s)])
    assert_w_eff_delta(out_proj, ext_o, delta[:, :D], mag[:, :D], exact=True)
    assert_w_eff_delta(fc2, ext_f, delta[:, D:], mag[:, D:], exact=True)
    with pytest.raises(ValueError, match=r"columns"):
        lora.split_cols_for_linear2(down[:4 * D], up, D)


# ------------------------------------------------------------------------------------ W4A16 layers

def test_lowrank_delta_on_w4a16():
    g = gen(11)
    N, K = 192, 64   # a double block's img_mod.lin at D = 32: 6D rows, original (not interleaved) order
    layer = random_w4a16(N, K, g)
    parts = [(*rand_lora(N, K, 4, g), 0.3), (*rand_lora(N, K, 8, g), -1.1)]
    bf16_parts = [(d.bfloat16(), u.bfloat16(), s) for d, u, s in parts]
    delta = lora.LowRankDelta([p[0] for p in bf16_parts], [p[1] for p in bf16_parts], [p[2] for p in bf16_parts])
    delta.check_layer(layer)
    x = torch.randn(2, 5, K, generator=g)
    got = delta.apply(x)
    assert got.dtype == torch.float32 and got.shape == (2, 5, N)
    # s is applied in fp32 to the bf16 weights as stored: only fp32 rounding, no bf16 rounding of s·up
    want_w, mag = dense([(d.float(), u.float(), s) for d, u, s in bf16_parts])
    x2 = x.reshape(-1, K).double()
    tol = gamma(K + 8 + 3) * (x2.abs() @ mag.T)
    assert ((got.reshape(-1, N).double() - x2 @ want_w.T).abs() <= tol).all()
    # added after the layer's own fp32 forward (≤ γ_{K+1}·(|x|·|W|ᵀ + |b|) on the same fp32 W): the dense layer
    w = ref.dequantize_w4a16(layer).double()
    y = ref.w4a16_linear(x.reshape(-1, K), layer).double() + got.reshape(-1, N).double()
    dense_y = x2 @ (w + want_w).T + layer.bias.double()
    tol_y = tol + gamma(K + 2) * (x2.abs() @ w.abs().T + layer.bias.double().abs())
    assert ((y - dense_y).abs() <= tol_y).all()
    with pytest.raises(ValueError, match=r"\[N, K\] = \[192, 64\]"):
        delta.check_layer(random_w4a16(96, 64, g))
    with pytest.raises(ValueError, match=r"at least one"):
        lora.LowRankDelta([], [], [])


# ------------------------------------------------------------------------------------ compression

def known_spectrum(N: int, K: int, S: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    Q1 = torch.linalg.qr(torch.randn(N, len(S), generator=g, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(K, len(S), generator=g, dtype=torch.float64)).Q
    return (Q1 * S) @ Q2.T


def test_compress_to_lowrank_picks_rank():
    g = gen(12)
    # energies 100, 25, 4, 1 and 60 × 1e-4: cumulative 0.769, 0.9615, 0.9922, 0.99995, 1
    S = torch.tensor([10.0, 5.0, 2.0, 1.0] + [0.01] * 60, dtype=torch.float64)
    w = known_spectrum(96, 128, S, g).float()
    total = float((S ** 2).sum())
    # w is S's matrix rounded to fp32, and the fp32 SVD is backward stable: the singular values it sees are
    # those of w + E, ‖E‖₂ ≤ eps = n·u32·‖w‖_F (n = 128, a generous p(n)). Weyl: each σ moves ≤ eps, so each
    # σ² ≤ 2σ·eps + eps², and the energy fractions move ≤ e_tol; √ of a fraction f moves ≤ e_tol / √f.
    eps = 128 * U32 * total ** 0.5
    e_tol = float((2 * S * eps + eps ** 2).sum()) / total
    for energy, rank in ((0.999, 4), (0.95, 2), (0.99, 3), (0.5, 1)):
        down, up, info = lora.compress_to_lowrank(w, energy=energy)
        assert info["rank"] == rank and down.shape == (128, rank) and up.shape == (96, rank)
        tail = float((S[rank:] ** 2).sum()) / total
        assert abs(info["energy"] - (1 - tail)) <= e_tol
        assert abs(info["rel_error"] - tail ** 0.5) <= e_tol / tail ** 0.5
        # the fp32 factors are another backward error of at most eps
        resid = torch.linalg.norm(w.double() - up.double() @ down.double().T).item() / total ** 0.5
        assert abs(resid - info["rel_error"]) <= e_tol / tail ** 0.5 + 2 * eps / total ** 0.5
    with pytest.raises(ValueError, match=r"needs rank 4 .* max_rank = 3"):
        lora.compress_to_lowrank(w, energy=0.999, max_rank=3, name="blocks.0.qkv")


def test_compress_zero_and_feeds_extend():
    g = gen(13)
    down, up, info = lora.compress_to_lowrank(torch.zeros(64, 64))
    assert info["rank"] == 0 and down.shape == (64, 0)
    layer = random_svdquant(128, 128, 16, "int4", g)
    assert lora.extend_lowrank(layer, [torch.zeros(128, 0)], [torch.zeros(128, 0)], [1.0]).proj_down is layer.proj_down
    w = known_spectrum(128, 128, torch.tensor([0.5, 0.2, 0.1], dtype=torch.float64), g).float()
    down, up, info = lora.compress_to_lowrank(w, energy=0.9999)
    assert info["rank"] == 3
    ext = lora.extend_lowrank(layer, [down], [up], [1.0])
    assert_w_eff_delta(layer, ext, *dense([(down, up, 1.0)]), exact=False)
    with pytest.raises(ValueError, match=r"energy"):
        lora.compress_to_lowrank(w, energy=0.0)


# ---------------------------------------------------------------------------------------------------------
# the quantized modules with LoRAs joined (nunchaku_core.linear), on every backend that runs here
# ---------------------------------------------------------------------------------------------------------

def _backends():
    from nunchaku_core import backend
    return ["reference"] + (["cpu"] if backend.extension_available() else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("precision,shifted", [("int4", False), ("int4", True), ("nvfp4", False)])
def test_module_with_lora_shares_codes_and_matches_a_fresh_pack(backend, precision, shifted):
    """SVDQuantLinear.with_lora repacks only the low-rank branch and the bias; its output must be bit-identical
    to a module built from scratch on the same extended layer (same kernel, same packed data), and the original
    module must be untouched. Ranks 32 + 40 + 9 = 81 (not a multiple of 16)."""
    from nunchaku_core.kernels import cpu_packing
    from nunchaku_core.linear import SVDQuantLinear
    g = gen(11)
    layer = random_svdquant(96, 128, 32, precision, g, shifted=shifted)
    base = SVDQuantLinear(layer, backend=backend)
    x = torch.randn(5, 128, generator=g)
    y0 = base(x)
    parts = [rand_lora(96, 128, 40, g), rand_lora(96, 128, 9, g)]
    bias = torch.randn(96, generator=g) * 0.01
    ext = base.with_lora([d for d, _ in parts], [u for _, u in parts], [0.7, -1.3], bias)
    full = lora.extend_lowrank(layer, [d for d, _ in parts], [u for _, u in parts], [0.7, -1.3], dtype=torch.float32)
    fresh = SVDQuantLinear(dataclasses.replace(full, bias=bias), backend=backend)
    assert ext.rank == 81
    assert torch.equal(ext(x), fresh(x))
    assert torch.equal(base(x), y0)
    if backend == "cpu":
        assert ext._packed.kernel.wcodes is base._packed.kernel.wcodes       # codes shared, not repacked
        fresh_pack = cpu_packing.pack_w4a4(dataclasses.replace(full, bias=bias))
        for name in ("proj_down", "proj_up", "bias"):
            assert torch.equal(getattr(ext._packed.kernel, name), getattr(fresh_pack, name)), name
    # and against the reference forward of the extended layer (fp32 rounding of the branch only: loose check)
    want = ref.svdquant_linear(x, dataclasses.replace(full, bias=bias)).float()
    assert (ext(x) - want).abs().max() <= 1e-3 * want.abs().max()


@pytest.mark.parametrize("backend", _backends())
def test_w4a16_module_with_delta(backend):
    from nunchaku_core.linear import W4A16Linear
    g = gen(12)
    layer = random_w4a16(80, 128, g)
    base = W4A16Linear(layer, backend=backend)
    x = torch.randn(4, 128, generator=g)
    y0 = base(x)
    d, u = rand_lora(80, 128, 6, g)
    delta = lora.LowRankDelta([d], [u], [0.5])
    bias = torch.randn(80, generator=g) * 0.01
    ext = base.with_delta(delta, bias)
    y = ext(x)
    want = W4A16Linear(dataclasses.replace(layer, bias=bias), backend=backend)(x).float() + 0.5 * (x @ d) @ u.T
    assert (y - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(base(x), y0)
    assert torch.equal(ext.with_delta(None, layer.bias)(x), y0)
