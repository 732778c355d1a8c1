"""The CUDA kernels' packed layouts (nunchaku_core/kernels/cuda_packing.py, csrc/cuda/layout.cuh).

No GPU here, so the kernels themselves never run. What can be checked on the CPU:
  1. unpack(pack(x)) == x for every packed operand, at awkward shapes;
  2. each packer puts every element where the documented closed form (layout.cuh, FORMAT.md §4) says;
  3. reading the packed buffers the way the kernels do (same word indices) and placing the nibbles by the PTX ISA's
     fragment tables for mma m16n8k64 (A, B, C) and its block-scale selectors reproduces reference.gemm_w4a4.
Test 3 is an emulation written from the PTX tables, not a run of the kernels: it catches layout and indexing
mistakes, not compiler or hardware ones.
"""
from __future__ import annotations

import pytest
import torch

from nunchaku_core.kernels import cuda_packing as cp
from nunchaku_core import reference
from nunchaku_core.layer import SVDQuantLayer, W4A16Layer

EPS32 = 2.0 ** -24   # unit roundoff of fp32
LANES = torch.arange(32)
G_, T_ = LANES // 4, LANES % 4


def nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 words [...] -> [..., 8] int64 nibbles, nibble j = bits 4j..4j+3 (written independently of cp)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    return torch.stack([(w >> (4 * j)) & 0xF for j in range(8)], dim=-1)


def sext(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v >= 8, v - 16, v)


def rand_int4(*shape, gen):
    return torch.randint(-8, 8, shape, generator=gen, dtype=torch.int8)


def rand_e4m3(*shape, gen):
    return (torch.rand(shape, generator=gen) * 3 + 0.01).to(torch.float8_e4m3fn)


# ---- 1. round trips ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,K", [(1, 64), (128, 64), (200, 192), (384, 128)])
def test_w4a4_weight_round_trip(N, K):
    gen = torch.Generator().manual_seed(N * 1000 + K)
    codes = rand_int4(N, K, gen=gen)
    packed = cp.pack_w4a4_codes(codes)
    assert packed.dtype == torch.int32 and packed.shape == ((N + 127) // 128, K // 64, 8, 32, 4)
    assert torch.equal(cp.unpack_w4a4_codes(packed, N, K, signed=True), codes)
    e2m1 = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.int8)
    assert torch.equal(cp.unpack_w4a4_codes(cp.pack_w4a4_codes(e2m1), N, K, signed=False), e2m1)

    ws = torch.rand(N, K // 64, generator=gen).to(torch.bfloat16)
    assert torch.equal(cp.unpack_int4_wscales(cp.pack_int4_wscales(ws), N), ws.float())
    ws8 = rand_e4m3(N, K // 16, gen=gen)
    back = cp.unpack_nvfp4_wscales(cp.pack_nvfp4_wscales(ws8), N)
    assert torch.equal(back.view(torch.uint8), ws8.view(torch.uint8))


@pytest.mark.parametrize("M,K", [(1, 64), (3, 128), (17, 192), (255, 64)])
def test_activation_round_trip(M, K):
    gen = torch.Generator().manual_seed(M * 1000 + K)
    signed = torch.randint(-7, 8, (M, K), generator=gen, dtype=torch.int8)
    unsigned = torch.randint(0, 16, (M, K), generator=gen, dtype=torch.int8)
    packed = cp.pack_act_codes(signed)
    assert packed.shape == ((M + 15) // 16, K // 64, 32, 4)
    assert torch.equal(cp.unpack_act_codes(packed, M, K, signed=True), signed)
    assert torch.equal(cp.unpack_act_codes(cp.pack_act_codes(unsigned), M, K, signed=False), unsigned)
    sc = torch.rand(M, K // 64, generator=gen)
    assert torch.equal(cp.unpack_act_scales_int4(cp.pack_act_scales_int4(sc), M), sc)
    sc8 = rand_e4m3(M, K // 16, gen=gen)
    back = cp.unpack_act_scales_nvfp4(cp.pack_act_scales_nvfp4(sc8), M)
    assert torch.equal(back.view(torch.uint8), sc8.view(torch.uint8))


@pytest.mark.parametrize("N,K", [(1, 8), (6, 3072 + 5), (17, 100)])
def test_w4a16_round_trip(N, K):
    gen = torch.Generator().manual_seed(N + K)
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    packed = cp.pack_w4a16_codes(codes)
    assert packed.shape == (N, (K + 7) // 8)
    assert torch.equal(cp.unpack_w4a16_codes(packed, K), codes)
    assert (nibbles(packed).reshape(N, -1)[:, K:] == 0).all(), "nibbles past K must be 0"


def test_negative_nvfp4_scale_is_refused():
    ws = torch.tensor([[1.0, -0.5, 2.0, 1.0]]).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="ue4m3"):
        cp.pack_nvfp4_wscales(ws)


# ---- 2. closed forms -------------------------------------------------------------------------------------------
def test_weight_codes_follow_the_closed_form():
    """word ((((tn*K/64 + tk)*8 + p)*32 + lane)*4 + 2*ns + ks), nibble j = code[128tn + 16p + 8ns + g, 64tk + 32ks + 8t + j]."""
    N, K = 256, 128
    codes = rand_int4(N, K, gen=torch.Generator().manual_seed(1))
    flat = nibbles(cp.pack_w4a4_codes(codes).reshape(-1))               # [words, 8]
    u = torch.arange(flat.shape[0])
    ks, ns, lane = u % 2, (u // 2) % 2, (u // 4) % 32
    p, tk, tn = (u // 128) % 8, (u // 1024) % (K // 64), u // (1024 * (K // 64))
    for j in range(8):
        n = 128 * tn + 16 * p + 8 * ns + lane // 4
        k = 64 * tk + 32 * ks + 8 * (lane % 4) + j
        assert torch.equal(sext(flat[:, j]), codes[n, k].to(torch.int64))


def test_activation_codes_follow_the_closed_form():
    """word (((tm*K/64 + tk)*32 + lane)*4 + r), nibble j = code[16tm + g + 8(r&1), 64tk + 32(r>>1) + 8t + j]."""
    M, K = 32, 192
    codes = torch.randint(-7, 8, (M, K), generator=torch.Generator().manual_seed(2), dtype=torch.int8)
    flat = nibbles(cp.pack_act_codes(codes).reshape(-1))
    v = torch.arange(flat.shape[0])
    r, lane, tk, tm = v % 4, (v // 4) % 32, (v // 128) % (K // 64), v // (128 * (K // 64))
    for j in range(8):
        m = 16 * tm + lane // 4 + 8 * (r & 1)
        k = 64 * tk + 32 * (r >> 1) + 8 * (lane % 4) + j
        assert torch.equal(sext(flat[:, j]), codes[m, k].to(torch.int64))


def test_nvfp4_scale_words_hold_four_groups_little_endian():
    N, K = 130, 128
    ws8 = rand_e4m3(N, K // 16, gen=torch.Generator().manual_seed(3))
    words = cp.pack_nvfp4_wscales(ws8).to(torch.int64) & 0xFFFFFFFF   # [K/64, N_pad]
    raw = ws8.view(torch.uint8).to(torch.int64)
    for q in range(4):
        assert torch.equal((words[:, :N] >> (8 * q)) & 0xFF, raw[:, q::4].T)
    assert (words[:, N:] == 0).all()


# ---- 3. the kernels' reading side, emulated from the PTX fragment tables ---------------------------------------
def a_fragment_tile(words: torch.Tensor) -> torch.Tensor:
    """words [32 lanes, 4 regs] -> the 16 x 64 A tile of mma m16n8k64 (PTX ISA: element a_i is register i // 8,
    nibble i % 8; row g for i < 8 or 16 <= i < 24 else g + 8; column 8t + (i & 7), + 32 for i >= 16)."""
    nib = nibbles(words)
    A = torch.zeros(16, 64, dtype=torch.int64)
    for i in range(32):
        row = G_ + (0 if (i < 8 or 16 <= i < 24) else 8)
        col = 8 * T_ + (i & 7) + (32 if i >= 16 else 0)
        A[row, col] = nib[:, i // 8, i % 8]
    return A


def b_fragment_tile(reg0: torch.Tensor, reg1: torch.Tensor) -> torch.Tensor:
    """Two B registers per lane -> the 64 x 8 B tile (b_i: register i // 8, nibble i % 8; row 8t + (i & 7),
    + 32 for i >= 8; column g)."""
    nib = torch.stack([nibbles(reg0), nibbles(reg1)], dim=1)
    B = torch.zeros(64, 8, dtype=torch.int64)
    for i in range(16):
        B[8 * T_ + (i & 7) + (32 if i >= 8 else 0), G_] = nib[:, i // 8, i % 8]
    return B


def emulate_gemm_w4a4(precision, act_words, act_scales, unsigned, M, N, K, wcodes, wscales, out_scale):
    """The 4-bit term of gemm_w4a4_int4 / gemm_w4a4_nvfp4 as the kernels index their buffers. fp32 [M, N]."""
    M_pad, N_pad, KT = (M + 15) // 16 * 16, (N + 127) // 128 * 128, K // 64
    aw, ww = act_words.reshape(-1), wcodes.reshape(-1)
    sa_flat, sw_flat = act_scales.reshape(-1), wscales.reshape(-1)
    out = torch.zeros(M_pad, N_pad)
    value = (lambda v: v.float()) if precision == "int4" else reference.e2m1_decode
    for tm in range(M_pad // 16):
        for tn in range(N_pad // 128):
            acc = torch.zeros(16, 128, dtype=torch.float32 if precision == "int4" else torch.float64)
            for tk in range(KT):
                a = a_fragment_tile(aw[((tm * KT + tk) * 32 + LANES)[:, None] * 4 + torch.arange(4)])
                a = value(a if unsigned or precision == "nvfp4" else sext(a))
                if precision == "int4":
                    sa = sa_flat[tk * M_pad + 16 * tm + torch.arange(16)]
                else:
                    # SF_A word of each lane (kernel: row g + 8*(lane & 1)); PTX thread-id-a = 0 takes row g's scales
                    # from lane 4g (t == 0) and row g + 8's from lane 4g + 1 (t == 1); byte q scales k 16q..16q+15.
                    sfa_words = sa_flat[tk * M_pad + 16 * tm + G_ + 8 * (LANES & 1)]
                    src = torch.cat([4 * torch.arange(8), 4 * torch.arange(8) + 1])
                    sa = torch.stack([(sfa_words[src] >> (8 * q)) & 0xFF for q in range(4)], 1)   # [16 rows, 4]
                    sa = sa.to(torch.uint8).view(torch.float8_e4m3fn).double()
                for p in range(8):
                    b4 = ww[(((tn * KT + tk) * 256) + p * 32 + LANES)[:, None] * 4 + torch.arange(4)]
                    for ns in range(2):
                        j = 2 * p + ns
                        b = b_fragment_tile(b4[:, 2 * ns], b4[:, 2 * ns + 1])
                        cols = 8 * j + torch.arange(8)
                        if precision == "int4":
                            d = (a.double() @ sext(b).double()).float()   # exact integers
                            sw = sw_flat[tk * N_pad + 128 * tn + cols]
                            acc[:, cols] += (d * sa[:, None]) * sw[None, :]
                        else:
                            # SF_B: lane 4c (t == 0) passes column c's word, which the kernel reads at 8j + g.
                            sfb_words = sw_flat[tk * N_pad + 128 * tn + 8 * j + G_][4 * torch.arange(8)]
                            sb = torch.stack([(sfb_words >> (8 * q)) & 0xFF for q in range(4)], 0)   # [4, 8 cols]
                            sb = sb.to(torch.uint8).view(torch.float8_e4m3fn).double()
                            bv = value(b).double()
                            for q in range(4):
                                ks = slice(16 * q, 16 * q + 16)
                                acc[:, cols] += (a[:, ks].double() * sa[:, q:q + 1]) @ (bv[ks] * sb[q:q + 1])
            out[16 * tm:16 * tm + 16, 128 * tn:128 * tn + 128] = acc.float()
    return out[:M, :N] * out_scale[None, :]


def make_layer(precision, N, K, shifted, gen):
    R = 16
    if precision == "int4":
        codes, wscales = rand_int4(N, K, gen=gen), (torch.rand(N, K // 64, generator=gen) + 0.1).to(torch.bfloat16)
        extra = {}
    else:
        codes, wscales = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.int8), rand_e4m3(N, K // 16, gen=gen)
        extra = {"wcscales": (torch.rand(N, generator=gen) + 0.5).to(torch.bfloat16),
                 "wtscale": torch.tensor([0.75], dtype=torch.bfloat16)}
    return SVDQuantLayer(precision=precision, codes=codes, wscales=wscales,
                         smooth=(torch.rand(K, generator=gen) + 0.5).to(torch.bfloat16),
                         proj_down=torch.randn(K, R, generator=gen).to(torch.bfloat16),
                         proj_up=torch.randn(N, R, generator=gen).to(torch.bfloat16),
                         shifted=shifted, **extra).validate()


@pytest.mark.parametrize("precision,shifted", [("int4", False), ("int4", True), ("nvfp4", False)])
@pytest.mark.parametrize("M", [1, 17])
def test_packed_operands_feed_the_mma_the_reference_product(precision, shifted, M):
    N, K = 200, 192
    gen = torch.Generator().manual_seed(M * 7 + shifted + (precision == "nvfp4") * 3)
    layer = make_layer(precision, N, K, shifted, gen)
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
    codes, scales = reference.quantize_act(x, layer)
    want = reference.gemm_w4a4(codes, scales, layer)

    w = cp.pack_svdquant_layer(layer)
    act_words = cp.pack_act_codes(codes)
    act_scales = cp.pack_act_scales_int4(scales) if precision == "int4" else cp.pack_act_scales_nvfp4(scales)
    out_scale = w.out_scale if w.out_scale is not None else torch.ones(N)
    got = emulate_gemm_w4a4(precision, act_words, act_scales, shifted, M, N, K, w.wcodes, w.wscales, out_scale)

    # Both sides form the same per-group terms exactly (INT4: the same fp32 ops; NVFP4: products exact in fp32 and
    # fp64); they differ only in the order of the sum over the K/G groups: at most (K/G)·u·Σ|terms| apart,
    # then scaled by out_scale, plus one rounding of the product.
    G = layer.group_size
    a_abs = reference.dequantize_act(codes, scales, precision).abs().double()
    w_abs = reference.dequantize_weight(layer).abs().double()
    bound = (K // G) * EPS32 * (a_abs @ w_abs.T) * out_scale.double().abs()[None, :] + EPS32 * want.double().abs()
    assert ((got.double() - want.double()).abs() <= bound).all()
    assert (got != 0).any()


def test_pack_svdquant_layer_widens_exactly():
    gen = torch.Generator().manual_seed(5)
    layer = make_layer("nvfp4", 130, 128, False, gen)
    w = cp.pack_svdquant_layer(layer)
    assert torch.equal(w.out_scale, layer.wcscales.float() * 0.75)
    assert torch.equal(w.proj_down, layer.proj_down.float()) and torch.equal(w.smooth, layer.smooth.float())
    assert torch.equal(cp.unpack_w4a4_codes(w.wcodes, 130, 128, signed=False), layer.codes)


def test_w4a16_layer_packing():
    gen = torch.Generator().manual_seed(6)
    N, K, G = 12, 200, 64
    layer = W4A16Layer(codes=torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8),
                       scales=torch.rand(N, 4, generator=gen).to(torch.bfloat16),
                       zeros=torch.rand(N, 4, generator=gen).to(torch.bfloat16), group_size=G)
    w = cp.pack_w4a16_layer(layer)
    assert torch.equal(cp.unpack_w4a16_codes(w.qweight, K), layer.codes)
    assert w.scales.dtype == torch.float32 and torch.equal(w.scales, layer.scales.float())
    with pytest.raises(ValueError, match="multiple of 8"):
        cp.pack_w4a16_layer(W4A16Layer(codes=layer.codes, scales=torch.ones(N, 67), zeros=torch.ones(N, 67),
                                       group_size=3))
