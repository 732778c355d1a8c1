"""packing.py: unpack(pack(x)) == x for every layout, packed bytes == the per-element oracle's, and a few
positions worked out by hand from FORMAT.md §4."""
from __future__ import annotations

import pytest
import torch

from nunchaku_core import packing as P
from nunchaku_core import reference as ref
from nunchaku_core.layer import SVDQuantLayer, W4A16Layer, tensors_equal

import nunchaku_oracle as oracle

SHAPES = [(128, 128), (256, 384), (384, 256)]
RANKS = [16, 32, 48, 64]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def rand_codes(N, K, precision, gen):
    lo, hi = (-8, 8) if precision == "int4" else (0, 16)
    return torch.randint(lo, hi, (N, K), dtype=torch.int8, generator=gen)


def rand_fp8(shape, gen):
    # every finite e4m3 bit pattern except NaN (0x7f / 0xff), so the byte permutation is fully exercised
    b = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    b = torch.where((b & 0x7F) == 0x7F, b ^ 1, b)
    return b.view(torch.float8_e4m3fn)


def rand_bf16(shape, gen):
    return torch.randn(shape, generator=gen).to(torch.bfloat16)


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_qweight(N, K, precision):
    gen = torch.Generator().manual_seed(N * 7 + K)
    codes = rand_codes(N, K, precision, gen)
    packed = P.pack_w4a4_qweight(codes, precision)
    assert packed.dtype == torch.int8 and packed.shape == (N, K // 2)
    assert torch.equal(P.unpack_w4a4_qweight(packed, precision), codes)
    assert same_bits(packed, oracle.qweight(codes))


def test_qweight_by_hand():
    # K = 128. Element n = 9, k = 70: n = 16·0 + 8·1 + 1 -> tn 0, p 0, ns 1, lane//4 = 1;
    # k = 64·1 + 32·0 + 8·0 + 6 -> tk 1, ks 0, lane%4 = 0, j 6. lane = 4.
    # u = ((((0·2 + 1)·8 + 0)·32 + 4)·4 + 2·1 + 0) = 1042; nibble 6 = byte 4·1042 + 3, low half.
    codes = torch.zeros(128, 128, dtype=torch.int8)
    codes[9, 70] = -3                                    # two's complement nibble 0xD
    codes[0, 1] = 7                                      # word 0, nibble 1: byte 0, high half
    b = bits(P.pack_w4a4_qweight(codes, "int4")).reshape(-1)
    assert int(b[4 * 1042 + 3]) == 0xD
    assert int(b[0]) == 0x70
    assert int(b.count_nonzero()) == 2


@pytest.mark.parametrize("N,K", SHAPES)
def test_wscales_int4(N, K):
    gen = torch.Generator().manual_seed(N + K)
    ws = rand_bf16((N, K // 64), gen)
    packed = P.pack_wscales_int4(ws)
    assert packed.shape == (K // 64, N)
    assert same_bits(P.unpack_wscales_int4(packed), ws)
    assert same_bits(packed, oracle.wscales_int4(ws))


def test_wscales_int4_by_hand():
    # memory [N/128][K/64][128]; position 16a + 4b + 2c + d holds channel 16a + 8c + 2b + d.
    # Channel 8 (a 0, c 1, b 0, d 0) of group 1 with N = 256, K = 128: memory (0·2 + 1)·128 + 2 = 130.
    ws = torch.zeros(256, 2, dtype=torch.bfloat16)
    ws[8, 1] = 5.0
    flat = P.pack_wscales_int4(ws).reshape(-1)
    assert flat[130] == 5.0 and int(flat.count_nonzero()) == 1


@pytest.mark.parametrize("N,K", SHAPES)
def test_wscales_nvfp4(N, K):
    gen = torch.Generator().manual_seed(N + 3 * K)
    ws = rand_fp8((N, K // 16), gen)
    packed = P.pack_wscales_nvfp4(ws)
    assert packed.shape == (K // 16, N) and packed.dtype == torch.float8_e4m3fn
    assert same_bits(P.unpack_wscales_nvfp4(packed), ws)
    assert same_bits(packed, oracle.wscales_nvfp4(ws))


def test_wscales_nvfp4_by_hand():
    # Channel n = 32·1 + 8·2 + 3 = 51 (s 1, lane%4 2, lane//4 3 -> lane 14), group 5 = 4·1 + 1 (tk 1, q 1),
    # K = 128 (K/64 = 2): byte ((0·2 + 1)·32 + 14)·16 + 4·1 + 1 = 741.
    ws = torch.zeros(128, 8).to(torch.float8_e4m3fn)
    ws[51, 5] = 2.0
    flat = bits(P.pack_wscales_nvfp4(ws)).reshape(-1)
    assert int(flat[741]) == int(bits(torch.tensor([2.0]).to(torch.float8_e4m3fn))[0])
    assert int(flat.count_nonzero()) == 1


@pytest.mark.parametrize("C", [128, 256, 384])
def test_permute_channels(C):
    v = rand_bf16((C,), torch.Generator().manual_seed(C))
    p = P.permute_channels(v)
    assert same_bits(P.unpermute_channels(p), v)
    assert same_bits(p, oracle.perm128(v))
    # stored position 4 (a 0, b 1, c 0, d 0) holds channel 2
    assert same_bits(p[4:5], v[2:3]) and same_bits(p[128 + 2:128 + 3], v[128 + 8:128 + 9])


@pytest.mark.parametrize("R", RANKS)
@pytest.mark.parametrize("dim", [128, 256, 384])
def test_lora(R, dim):
    gen = torch.Generator().manual_seed(R * 1000 + dim)
    D = rand_bf16((dim, R), gen)
    pd = P.pack_lora_down(D)
    assert pd.shape == (dim, R)
    assert same_bits(P.unpack_lora_down(pd), D)
    assert same_bits(pd, oracle.lora_down(D))
    pu = P.pack_lora_up(D)
    assert same_bits(P.unpack_lora_up(pu), D)
    assert same_bits(pu, oracle.lora_up(D))


def test_lora_by_hand():
    # offset ((c·R/16 + rr)·32 + lane)·8 + 4np + 2kp + e. R = 32; offset 1·256 + 5·8 + 4 + 0 + 1 = 301:
    # c 0, rr 1, lane 5, np 1, kp 0, e 1. down: D[2·1 + 1, 16 + 8 + 1] = D[3, 25]; up: U[8 + 1, 16 + 2 + 1] = U[9, 19].
    M = torch.zeros(128, 32, dtype=torch.bfloat16)
    M[3, 25] = 1.0
    assert P.pack_lora_down(M).reshape(-1)[301] == 1.0
    M = torch.zeros(128, 32, dtype=torch.bfloat16)
    M[9, 19] = 1.0
    assert P.pack_lora_up(M).reshape(-1)[301] == 1.0


def test_lora_rank_padding():
    gen = torch.Generator().manual_seed(5)
    D = rand_bf16((128, 20), gen)
    pd = P.pack_lora_down(D)
    assert pd.shape == (128, 32)
    assert same_bits(P.unpack_lora_down(pd, 20), D)
    assert torch.count_nonzero(P.unpack_lora_down(pd)[:, 20:]) == 0
    pu = P.pack_lora_up(D)
    assert same_bits(P.unpack_lora_up(pu, 20), D)
    padded = torch.cat([D, torch.zeros(128, 12, dtype=D.dtype)], dim=1)
    assert same_bits(pd, oracle.lora_down(padded)) and same_bits(pu, oracle.lora_up(padded))


@pytest.mark.parametrize("N,K", [(24, 64), (12, 128), (8, 192)])
def test_awq(N, K):
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=torch.Generator().manual_seed(N + K))
    q32 = P.pack_awq_qweight(codes)
    q16 = P.pack_awq_qweight(codes, dtype=torch.int16)
    assert q32.shape == (N // 4, K // 2) and q32.dtype == torch.int32
    assert q16.shape == (N // 4, K) and torch.equal(q32.view(torch.int16), q16)
    assert same_bits(q16, oracle.awq_int16(codes))
    assert torch.equal(P.unpack_awq_qweight(q32), codes) and torch.equal(P.unpack_awq_qweight(q16), codes)


def test_awq_by_hand():
    # int16 column t = 64kc + 16rr + 8h + b, nibble i holds n = 4g4 + rr, k = 64kc + 32h + 8i + b.
    # n = 6 (g4 1, rr 2), k = 64 + 32 + 16 + 3 = 115 (kc 1, h 1, i 2, b 3): column 64 + 32 + 8 + 3 = 107, bits 8..11.
    codes = torch.zeros(8, 128, dtype=torch.uint8)
    codes[6, 115] = 9
    q = P.pack_awq_qweight(codes, dtype=torch.int16)
    assert int(q[1, 107]) == 9 << 8 and int(q.count_nonzero()) == 1


def test_awq_k_not_multiple_of_64():
    codes = torch.randint(0, 16, (12, 100), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    q = P.pack_awq_qweight(codes)
    assert q.shape == (3, 64)                             # K padded to 128 with code 0
    assert torch.equal(P.unpack_awq_qweight(q, 100), codes)
    assert torch.count_nonzero(P.unpack_awq_qweight(q)[:, 100:]) == 0


@pytest.mark.parametrize("S", [3, 6])
def test_interleave_and_fold(S):
    D = 4
    rows = torch.arange(S * D)                            # original row r = j·D + d
    stored = P.interleave_rows(rows, S)
    assert stored.tolist() == oracle.interleave(rows.tolist(), S)
    for d in range(D):
        for j in range(S):
            assert int(stored[d * S + j]) == j * D + d
    assert torch.equal(P.deinterleave_rows(stored, S), rows)
    bias = torch.zeros(S * D)
    folded = P.fold_one(bias, S)
    chunks = [j for j in range(S) if folded[j * D] == 1.0]
    assert chunks == list(oracle.SCALE_CHUNKS[S])
    assert torch.equal(P.unfold_one(folded, S), bias)


def _rand_layer(precision, N, K, R, gen, shifted=False):
    G = 64 if precision == "int4" else 16
    ws = rand_bf16((N, K // G), gen).abs() if precision == "int4" else rand_fp8((N, K // G), gen)
    nv = precision == "nvfp4"
    return SVDQuantLayer(
        precision=precision, codes=rand_codes(N, K, precision, gen), wscales=ws,
        smooth=rand_bf16((K,), gen).abs() + 0.5, proj_down=rand_bf16((K, R), gen), proj_up=rand_bf16((N, R), gen),
        bias=rand_bf16((N,), gen), wtscale=torch.tensor([0.5], dtype=torch.bfloat16) if nv else None,
        wcscales=rand_bf16((N,), gen) if nv else None, shifted=shifted, smooth_orig=rand_bf16((K,), gen))


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_svdquant_layer_round_trip(precision):
    layer = _rand_layer(precision, 256, 384, 32, torch.Generator().manual_seed(2))
    t = P.pack_svdquant_layer(layer)
    back = P.unpack_svdquant_layer(t, precision)
    assert tensors_equal(back, layer)


def test_pad_svdquant_layer_keeps_outputs():
    # N = 200, K = 192 pad to 256: padded weight entries are 0 (code 0, D rows 0), so the effective weight's
    # top-left block is unchanged and the rest is exactly 0.
    gen = torch.Generator().manual_seed(3)
    layer = _rand_layer("int4", 200, 192, 20, gen)
    t = P.pack_svdquant_layer(layer)
    back = P.unpack_svdquant_layer(t, "int4", R=20)
    assert (back.N, back.K, back.R) == (256, 256, 20)
    W, Wb = ref.effective_weight(layer), ref.effective_weight(back)
    assert torch.equal(Wb[:200, :192], W)
    assert torch.count_nonzero(Wb[200:]) == 0 and torch.count_nonzero(Wb[:, 192:]) == 0
    assert torch.equal(back.smooth[192:], torch.ones(64, dtype=torch.bfloat16))
    assert torch.equal(back.wscales[200:], torch.ones(56, 4, dtype=torch.bfloat16))
    assert torch.count_nonzero(back.bias[200:]) == 0


def test_w4a16_layer_round_trip():
    gen = torch.Generator().manual_seed(4)
    N, K = 6 * 64, 64
    # bias values on a 1/64 grid in [-1, 1): bias + 1 is exact in bf16, so the folded +1 round-trips
    bias = torch.randint(-64, 64, (N,), generator=gen).float() / 64
    layer = W4A16Layer(codes=torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen),
                       scales=rand_bf16((N, 1), gen), zeros=rand_bf16((N, 1), gen), bias=bias)
    t = P.pack_w4a16_layer(layer, 6)                       # group rows padded to 16 with zeros, as DeepCompressor
    assert t["qweight"].shape == (N // 4, K // 2) and t["wscales"].shape == (16, N)
    assert torch.count_nonzero(t["wscales"][1:]) == 0 and torch.count_nonzero(t["wzeros"][1:]) == 0
    assert tensors_equal(P.unpack_w4a16_layer(t, 6), layer)
    t = P.pack_w4a16_layer(layer, 6, group_rows_multiple=1)  # exactly ceil(K/64) rows, as Nunchaku's C++
    assert t["wscales"].shape == (1, N) and t["wzeros"].shape == (1, N)
    assert tensors_equal(P.unpack_w4a16_layer(t, 6), layer)
