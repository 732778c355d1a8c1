"""The compiled CPU kernels (csrc/cpu) against nunchaku_core.reference, every ISA variant forced via SVDQ_CPU_ISA.

Three tests per kernel variant (STYLE.md):
  (a) codes:  the activation codes and scales equal reference.quantize_act_* bit for bit (W4A16 has no activation
              quantizer: its codes are checked through the packed layout instead);
  (b) output: the GEMM output on the SAME quantized activations equals reference.gemm_w4a4 + lowrank_branch + bias
              (reference.w4a16_linear) within the rounding bound derived in `_gemm_bound` / `_w4a16_bound`;
  (c) SQNR:   against the unquantized layer, loosely.
Plus bitwise agreement of the variants with each other, across runs and across thread counts.

Needs the built extension (`python setup.py build_ext --inplace`): these tests fail rather than skip without it,
so that CI cannot pass with the kernels untested.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kernel_bounds import SQNR_CASES, check_sqnr, random_input, sqnr_case, sqnr_db
from nunchaku_core import backend, reference
from nunchaku_core.kernels import cpu_packing
from nunchaku_core.layer import SVDQuantLayer, W4A16Layer

_C = backend._C
if _C is None:
    raise ImportError(f"nunchaku_core._C is not built ({backend._C_ERROR}); {backend.BUILD_HINT}")

ISAS = [i for i in backend.CPU_ISAS if _C.cpu_isa_supported(i)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
U = 2.0 ** -24  # unit roundoff of fp32


def gamma(n: int) -> float:
    """Higham's γ_n = n·u / (1 − n·u): |fl(Σ of n terms, any order) − Σ| ≤ γ_{n-1}·Σ|terms|."""
    return n * U / (1 - n * U)


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Forces one variant through the environment variable, as a user would, and returns the resolved name."""
    monkeypatch.setenv("SVDQ_CPU_ISA", request.param)
    resolved = backend.cpu_isa()
    assert resolved == request.param
    return resolved


# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------

def random_layer(precision: str, N: int, K: int, R: int, shifted: bool = False, seed: int = 0) -> SVDQuantLayer:
    """Random codes and scales (not a quantized weight): exercises every code value for tests (a) and (b)."""
    g = torch.Generator().manual_seed(seed)
    G = 64 if precision == "int4" else 16
    if precision == "int4":
        codes = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
        wscales = (torch.rand(N, K // G, generator=g) * 0.05 + 0.005).bfloat16()
    else:
        codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int8)
        wscales = (torch.rand(N, K // G, generator=g) * 0.5 + 0.01).to(torch.float8_e4m3fn)
    nv = precision == "nvfp4"
    return SVDQuantLayer(
        precision, codes, wscales,
        smooth=(torch.rand(K, generator=g) + 0.5).bfloat16(),
        proj_down=(torch.randn(K, R, generator=g) * 0.1).bfloat16(),
        proj_up=(torch.randn(N, R, generator=g) * 0.1).bfloat16(),
        bias=torch.randn(N, generator=g).bfloat16(),
        wtscale=torch.tensor([0.75]).bfloat16() if nv else None,
        wcscales=(torch.rand(N, generator=g) + 0.5).bfloat16() if nv else None,
        shifted=shifted,
    ).validate()




def quantize(x: torch.Tensor, p: cpu_packing.CpuW4A4, isa: str, return_codes: bool = True):
    down = p.proj_down if p.R else None
    if p.precision == "int4":
        act, ascale, acorr, lora = _C.quantize_act_int4_lowrank(x, p.smooth, down, p.shifted, isa)
        return act, ascale, acorr, lora, act
    return _C.quantize_act_nvfp4_lowrank(x, p.smooth, down, return_codes, isa)


def gemm(q, p: cpu_packing.CpuW4A4, dtype: torch.dtype, isa: str) -> torch.Tensor:
    act, ascale, acorr, lora = q[:4]
    lora = lora if p.R else None
    if p.precision == "int4":
        return _C.gemm_w4a4_int4(act, ascale, acorr, lora, p.wcodes, p.wscales, p.proj_up, p.bias, p.N, dtype, isa)
    return _C.gemm_w4a4_nvfp4(act, ascale, acorr, lora, p.wcodes, p.wscales, p.proj_up, p.bias, p.out_scale, p.N,
                              dtype, isa)


# Shapes: awkward M; N = 40 (a partial 16-column block and a partial 64-column tile); K with one group, several
# groups, and a partial 256-input chunk of the quantizers; rank 16 and 48 (and 20: padded to 32).
W4A4_CASES = [
    # precision, shifted, M, N, K, R
    ("int4", False, 1, 40, 64, 16),
    ("int4", False, 3, 40, 192, 48),
    ("int4", False, 17, 40, 320, 20),
    ("int4", False, 255, 40, 128, 16),
    ("int4", True, 3, 40, 64, 48),
    ("int4", True, 17, 40, 320, 16),
    ("int4", True, 255, 40, 128, 48),
    ("nvfp4", False, 1, 40, 16, 16),
    ("nvfp4", False, 3, 40, 48, 48),
    ("nvfp4", False, 17, 40, 272, 20),
    ("nvfp4", False, 255, 40, 64, 16),
]


# ---------------------------------------------------------------------------------------------------------------
# (a) codes
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", W4A4_CASES, ids=lambda c: "-".join(map(str, c)))
def test_quantize_codes_equal_reference(isa, case, dtype):
    precision, shifted, M, N, K, R = case
    layer = random_layer(precision, N, K, R, shifted)
    p = cpu_packing.pack_w4a4(layer)
    x = random_input(M, K, shifted, dtype)
    act, ascale, acorr, lora, codes = quantize(x, p, isa)
    G = layer.group_size
    if precision == "int4":
        ref_codes, ref_scales = reference.quantize_act_int4(x, layer.smooth, shifted)
        assert torch.equal(codes, ref_codes)
        assert torch.equal(ascale.view(torch.int32), ref_scales.view(torch.int32))
        offset = cpu_packing.INT4_OFFSET
    else:
        ref_codes, ref_scales = reference.quantize_act_nvfp4(x, layer.smooth)
        assert torch.equal(codes, ref_codes)
        assert torch.equal(ascale.view(torch.int32), ref_scales.float().view(torch.int32))
        assert torch.equal(act, cpu_packing.e2m1_twice(ref_codes))  # the GEMM operand: 2·value
        offset = cpu_packing.NVFP4_OFFSET
    assert torch.equal(acorr, -offset * act.to(torch.int32).reshape(M, K // G, G).sum(-1))
    # The low-rank down-projection on the raw x: K products summed in fp32, |error| <= γ_K·(|x|·|D|) for both.
    lora_ref = x.float() @ layer.proj_down.float()
    bound = 2 * gamma(K) * (x.float().abs() @ layer.proj_down.float().abs())
    assert torch.all((lora[:, :R] - lora_ref).abs() <= bound)
    assert torch.all(lora[:, R:] == 0)


def test_nvfp4_edge_codes(monkeypatch):
    """Every e2m1 rounding boundary, ties included, and negative values rounding to -0 (code 8)."""
    mags = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.2, 0.8, 2.4, 5.5, 6.0, 1.0, 1.5, 3.0])
    # group absmax 6·scale exactly; then -0 codes; then a scale clamped at 448
    x = torch.stack([mags * 448 / 6, -mags * 448 / 6, -mags * 1e-3 - 1e-9, mags * 1e3])
    smooth = torch.ones(16)
    layer = SVDQuantLayer("nvfp4", torch.zeros(16, 16, dtype=torch.int8), torch.ones(16, 1).to(torch.float8_e4m3fn),
                          smooth, torch.zeros(16, 16), torch.zeros(16, 16))
    p = cpu_packing.pack_w4a4(layer)
    ref_codes, ref_scales = reference.quantize_act_nvfp4(x, smooth)
    for isa in ISAS:
        codes, ascale = quantize(x, p, isa)[4], quantize(x, p, isa)[1]
        assert torch.equal(codes, ref_codes), isa
        assert torch.equal(ascale, ref_scales.float()), isa
    assert (ref_codes == 8).any(), "the case should contain a -0 code"
    assert ref_scales[3].float().item() == 448.0


# ---------------------------------------------------------------------------------------------------------------
# (b) output on the same quantized inputs
# ---------------------------------------------------------------------------------------------------------------

def _gemm_bound(layer: SVDQuantLayer, x: torch.Tensor, codes, scales, y_ref: torch.Tensor, dtype) -> torch.Tensor:
    """|kernel − reference| per output, from the accumulation orders (both compute in fp32):
    - the per-group products t_g = (dot_g·sa)·sw round the same way up to the last multiply (the kernel fuses it
      into an fma): ≤ u·|t_g|; the sum over the K/G groups runs in different orders: ≤ γ_{K/G}·Σ|t_g| each side;
      then one rounding each for ·out_scale: so 2·γ_{K/G+2}·S_main, S_main = Σ_g |t_g|·|out_scale|;
    - the low-rank term: lora = x·D (K products, both sides ≤ γ_K) then ·Uᵀ (R products, ≤ γ_R), the kernel
      chaining it onto the main sum with fmas: 2·γ_{K+R+2}·(|x|·|D|)·|U|ᵀ;
    - the bias add, one rounding each: 2u·(|y| + |bias|);
    - then both round to the output dtype: one ulp of that dtype at |y| (two nearby values can round apart).
    """
    G, Kg = layer.group_size, layer.K // layer.group_size
    M = x.shape[0]
    a = (codes.double() if layer.precision == "int4" else reference.e2m1_decode(codes).double()).reshape(M, Kg, G)
    w = reference.code_values(layer).double().reshape(layer.N, Kg, G)
    t = torch.einsum("mgk,ngk->mng", a, w).abs() * scales.double().abs()[:, None, :] * layer.wscales.double()[None]
    s_main = t.sum(-1) * reference.output_scale(layer).double().abs()
    s_lr = (x.double().abs() @ layer.proj_down.double().abs()) @ layer.proj_up.double().abs().T
    bias = layer.bias.double().abs() if layer.bias is not None else 0
    bound = 2 * gamma(Kg + 2) * s_main + 2 * gamma(layer.K + layer.R + 2) * s_lr + 2 * U * (y_ref.double().abs() + bias)
    if dtype != torch.float32:
        mant = {torch.bfloat16: 8, torch.float16: 11}[dtype]
        ulp = torch.exp2(torch.floor(torch.log2(y_ref.double().abs().clamp(min=2.0 ** -14))) - (mant - 1))
        bound = bound + ulp
    return bound


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", W4A4_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gemm_w4a4_matches_reference_on_same_codes(isa, case, dtype):
    precision, shifted, M, N, K, R = case
    layer = random_layer(precision, N, K, R, shifted)
    p = cpu_packing.pack_w4a4(layer)
    x = random_input(M, K, shifted, dtype)
    q = quantize(x, p, isa)
    y = gemm(q, p, dtype, isa)
    assert y.dtype == dtype and y.shape == (M, N)
    codes, scales = reference.quantize_act(x, layer)
    y_ref = reference.gemm_w4a4(codes, scales, layer) + reference.lowrank_branch(x, layer) + layer.bias.float()
    bound = _gemm_bound(layer, x, codes, scales, y_ref, dtype)
    err = (y.double() - y_ref.to(dtype).double()).abs()
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("case", [W4A4_CASES[2], W4A4_CASES[5], W4A4_CASES[9]], ids=lambda c: c[0] + str(c[1]))
def test_w4a4_variants_agree_bitwise(case):
    """Every variant performs the same fp32 operations (csrc/cpu/kernels.h), so all outputs are bit-identical."""
    precision, shifted, M, N, K, R = case
    layer = random_layer(precision, N, K, R, shifted)
    p = cpu_packing.pack_w4a4(layer)
    x = random_input(M, K, shifted, torch.bfloat16)
    outs = {isa: (quantize(x, p, isa), gemm(quantize(x, p, isa), p, torch.float32, isa)) for isa in ISAS}
    q0, y0 = outs["ref"]
    for isa, (q, y) in outs.items():
        for a, b in zip(q, q0):
            assert torch.equal(a, b), isa
        assert torch.equal(y.view(torch.int32), y0.view(torch.int32)), isa


def test_w4a4_bitwise_across_runs_and_threads():
    """Work is split over M x N tiles, never over K: the thread count cannot change a single bit."""
    layer = random_layer("int4", 200, 512, 32, seed=3)
    p = cpu_packing.pack_w4a4(layer)
    x = random_input(300, 512, False, torch.bfloat16, seed=4)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 1):
            torch.set_num_threads(n)
            results.append(gemm(quantize(x, p, ISAS[-1]), p, torch.float32, ISAS[-1]))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r.view(torch.int32), results[0].view(torch.int32))


def fused(x: torch.Tensor, p: cpu_packing.CpuW4A4, isa: str) -> torch.Tensor:
    """_C.svdquant_linear_*: the quantizer and the GEMM in one call (what nunchaku_core.backend runs)."""
    down = p.proj_down if p.R else None
    if p.precision == "int4":
        return _C.svdquant_linear_int4(x, p.smooth, down, p.shifted, p.wcodes, p.wscales, p.proj_up, p.bias, p.N, isa)
    return _C.svdquant_linear_nvfp4(x, p.smooth, down, p.wcodes, p.wscales, p.proj_up, p.bias, p.out_scale, p.N, isa)


@pytest.mark.parametrize("case", W4A4_CASES + [("int4", False, 1100, 40, 4096, 32), ("nvfp4", False, 300, 40, 256, 0)],
                         ids=lambda c: "-".join(map(str, c)))
def test_fused_layer_call_equals_quantize_then_gemm(case):
    """One call, one parallel region (GEMM tasks wait for the quantizer tasks): the same bits as the two calls, for
    every variant and thread count, in the input's dtype; M = 1100 has several quantizer tasks and row blocks."""
    precision, shifted, M, N, K, R = case
    layer = random_layer(precision, N, K, R, shifted, seed=7)
    p = cpu_packing.pack_w4a4(layer)
    x = random_input(M, K, shifted, torch.bfloat16, seed=8)
    threads = torch.get_num_threads()
    try:
        for isa in ISAS:
            y0 = gemm(quantize(x, p, isa), p, torch.bfloat16, isa)
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                y = fused(x, p, isa)
                assert y.dtype == torch.bfloat16 and torch.equal(y.view(torch.int16), y0.view(torch.int16)), (isa, n)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_narrow_stored_scales_and_branch_give_the_same_bits(isa, precision, src):
    """cpu_packing stores wscales, proj_down and proj_up as bf16, fp16 or fp32 (narrowest_exact); every variant
    widens them to the same fp32 values, so its codes, lora and outputs equal those of an all-fp32 packing."""
    layer = random_layer(precision, 40, 192, 20, seed=9)
    g = torch.Generator().manual_seed(10)
    wide = lambda t: t.float() * (1 + torch.rand(t.shape, generator=g) * 1e-3)  # not bf16/fp16-exact
    changes = dict(proj_down=wide(layer.proj_down).to(src), proj_up=wide(layer.proj_up).to(src))
    if precision == "int4":
        changes["wscales"] = wide(layer.wscales).to(src)
    layer = dataclasses.replace(layer, **changes).validate()
    p = cpu_packing.pack_w4a4(layer)
    expect = torch.bfloat16 if precision == "nvfp4" else src  # NVFP4 scales: 0.25·e4m3 fits bf16
    assert p.wscales.dtype == expect and p.proj_down.dtype == src and p.proj_up.dtype == src
    p32 = dataclasses.replace(p, wscales=p.wscales.float(), proj_down=p.proj_down.float(), proj_up=p.proj_up.float())
    x = random_input(17, 192, False, torch.bfloat16, seed=11)
    for a, b in zip(quantize(x, p, isa), quantize(x, p32, isa)):
        assert torch.equal(a, b)
    y, y32 = fused(x, p, isa), fused(x, p32, isa)
    assert torch.equal(y.view(torch.int16), y32.view(torch.int16))
    assert torch.equal(gemm(quantize(x, p, isa), p, torch.float32, isa),
                       gemm(quantize(x, p32, isa), p32, torch.float32, isa))


def test_fused_layer_call_empty_input_and_bad_layout():
    layer = random_layer("int4", 40, 128, 16)
    p = cpu_packing.pack_w4a4(layer)
    assert fused(torch.randn(0, 128), p, ISAS[-1]).shape == (0, 40)
    with pytest.raises(RuntimeError, match=r"svdquant_linear_int4: wcodes .*pack_w4a4"):
        _C.svdquant_linear_int4(torch.randn(2, 128), p.smooth, p.proj_down, False, p.wcodes[:, :-1].contiguous(),
                                p.wscales, p.proj_up, p.bias, 40, "ref")
    with pytest.raises(RuntimeError, match=r"svdquant_linear_int4: wscales is Int .*float32, bfloat16 or float16"):
        _C.svdquant_linear_int4(torch.randn(2, 128), p.smooth, p.proj_down, False, p.wcodes, p.wscales.int(),
                                p.proj_up, p.bias, 40, "ref")
    with pytest.raises(RuntimeError, match="svdquant_linear_int4: K = 100 is not a multiple of the group size 64"):
        _C.svdquant_linear_int4(torch.randn(2, 100), p.smooth, p.proj_down, False, p.wcodes, p.wscales, p.proj_up,
                                p.bias, 40, "ref")


@pytest.mark.parametrize("precision,shifted", [("int4", False), ("int4", True), ("nvfp4", False)])
def test_w4a4_many_row_blocks_agree_bitwise(precision, shifted):
    """M large enough for several row blocks of tile_plan (K = 4096: 256 rows each, the last one partial), which
    bindings.cpp hands out a row block per task and the AVX-512 kernel repacks per row block (Rows layout)."""
    M, N, K = 1100, 40, 4096
    layer = random_layer(precision, N, K, 32, shifted, seed=5)
    p = cpu_packing.pack_w4a4(layer)
    x = random_input(M, K, shifted, torch.bfloat16, seed=6)
    q = quantize(x, p, "ref")
    y0 = gemm(q, p, torch.float32, "ref")
    for isa in ISAS[1:]:
        y = gemm(q, p, torch.float32, isa)
        assert torch.equal(y.view(torch.int32), y0.view(torch.int32)), isa


def test_int4_gemm_paths_on_handmade_codes():
    """The AVX-512 INT4 GEMM picks, per row block, the 16·a operand path (signed codes, every scale / 16 exact) or
    the plain one (a code above 7, or a scale whose /16 is inexact). Hand-made codes force each case; every path
    must give the reference GEMM's bits."""
    N, K, R = 40, 256, 16
    layer = random_layer("int4", N, K, R, seed=7)
    p = cpu_packing.pack_w4a4(layer)
    g = torch.Generator().manual_seed(8)
    M, groups = 20, K // 64
    lora = torch.randn(M, 16, generator=g)
    cases = {
        "signed": (torch.randint(-7, 8, (M, K), generator=g), torch.rand(M, groups, generator=g) + 0.1),
        "unsigned codes": (torch.randint(0, 16, (M, K), generator=g), torch.rand(M, groups, generator=g) + 0.1),
        "one code 8": (torch.randint(-7, 8, (M, K), generator=g), torch.rand(M, groups, generator=g) + 0.1),
        "code -8": (torch.randint(-8, 8, (M, K), generator=g), torch.rand(M, groups, generator=g) + 0.1),
        "subnormal scale": (torch.randint(-7, 8, (M, K), generator=g), torch.rand(M, groups, generator=g) + 0.1),
    }
    cases["one code 8"][0][5, 77] = 8
    # Row 3: every scale subnormal with low mantissa bits set, whose / 16 loses them (the plain path must be taken);
    # no low-rank input and no bias for that row's outputs to hide the difference in.
    cases["subnormal scale"][1][3] = torch.tensor([3.0e-39, 1.1e-39, 7.7e-40, 2.9e-39])
    cases["subnormal scale"][1][4, 2] = 0.0
    lora[3] = 0.0
    p = dataclasses.replace(p, bias=None)
    for name, (codes, ascale) in cases.items():
        act = codes.to(torch.int8).contiguous()
        acorr = (-8 * act.view(M, groups, 64).sum(-1, dtype=torch.int32)).contiguous()
        q = (act, ascale.float().contiguous(), acorr, lora)
        y0 = gemm(q, p, torch.float32, "ref")
        for isa in ISAS[1:]:
            y = gemm(q, p, torch.float32, isa)
            assert torch.equal(y.view(torch.int32), y0.view(torch.int32)), (name, isa)


# ---------------------------------------------------------------------------------------------------------------
# (c) against the unquantized layer
# ---------------------------------------------------------------------------------------------------------------







@pytest.mark.parametrize("precision,shifted", SQNR_CASES)
def test_w4a4_sqnr_against_unquantized(isa, precision, shifted):
    """Against the unquantized layer (kernel_bounds.sqnr_case: ≈ 16-17 dB expected, floor 13 dB, within 0.05 dB of
    the reference forward, derivation there)."""
    layer, x, y_true = sqnr_case(precision, shifted)
    p = cpu_packing.pack_w4a4(layer)
    check_sqnr(gemm(quantize(x, p, isa), p, torch.float32, isa), layer, x, y_true)


# ---------------------------------------------------------------------------------------------------------------
# W4A16
# ---------------------------------------------------------------------------------------------------------------

def random_w4a16(N: int, K: int, G: int, seed: int = 0) -> W4A16Layer:
    g = torch.Generator().manual_seed(seed)
    ng = -(-K // G)
    scales = (torch.rand(N, ng, generator=g) * 0.02 + 0.001).bfloat16()
    zeros = (-7 * scales.float()).bfloat16()  # as stored by the writers: −bf16(7·scale)
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    return W4A16Layer(codes, scales, zeros, torch.randn(N, generator=g).bfloat16(), G).validate()


W4A16_CASES = [  # M, N, K, G: one group, a partial last group, odd K, group 128 (T5)
    (1, 40, 64, 64),
    (3, 40, 200, 64),
    (17, 40, 197, 64),
    (255, 40, 384, 128),
]


@pytest.mark.parametrize("case", W4A16_CASES, ids=lambda c: "-".join(map(str, c)))
def test_w4a16_codes_roundtrip_packed_layout(case):
    """(a) for W4A16: there is no activation quantizer; the integer codes the kernel reads are the layer's."""
    M, N, K, G = case
    layer = random_w4a16(N, K, G)
    p = cpu_packing.pack_w4a16(layer)
    assert torch.equal(cpu_packing.unpack_w4a16_codes(p), layer.codes)
    s, z = cpu_packing.unpack_w4a16_scales(p)
    assert torch.equal(s, layer.scales.float()) and torch.equal(z, layer.zeros.float())


def _w4a16_bound(layer: W4A16Layer, x: torch.Tensor, y_ref: torch.Tensor, dtype) -> torch.Tensor:
    """The reference dequantizes (w = q·s + z: 2 roundings, ≤ 2u·(|q·s| + |z|)) then sums K products (γ_K); the
    kernel sums x·q exactly-ordered per group (γ_G), scales it and adds z·Σx (γ_{G}+ 2 roundings, then K/G group
    terms): both are within γ_{K+4}·Σ_k |x_k|·(|q_k·s| + |z|) of the exact value. Bias: 2u·(|y| + |bias|); the
    output dtype: one ulp."""
    G = layer.group_size
    cols = torch.arange(layer.K) // G
    mag = layer.codes.double() * layer.scales.double()[:, cols].abs() + layer.zeros.double()[:, cols].abs()
    bound = 2 * gamma(layer.K + 4) * (x.double().abs() @ mag.T) + 2 * U * (y_ref.double().abs() + layer.bias.double().abs())
    if dtype != torch.float32:
        mant = {torch.bfloat16: 8, torch.float16: 11}[dtype]
        bound = bound + torch.exp2(torch.floor(torch.log2(y_ref.double().abs().clamp(min=2.0 ** -14))) - (mant - 1))
    return bound


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", W4A16_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gemm_w4a16_matches_reference(isa, case, dtype):
    M, N, K, G = case
    layer = random_w4a16(N, K, G)
    p = cpu_packing.pack_w4a16(layer)
    x = (torch.randn(M, K, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    y = _C.gemm_w4a16(x, p.wcodes, p.scales, p.zeros, p.bias, N, G, isa)
    assert y.dtype == dtype and y.shape == (M, N)
    y_ref = reference.w4a16_linear(x.float(), layer)
    err = (y.double() - y_ref.to(dtype).double()).abs()
    bound = _w4a16_bound(layer, x.float(), y_ref, dtype)
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_w4a16_narrow_stored_scales_give_the_same_bits(isa, src):
    """pack_w4a16 stores scales and zeros as bf16, fp16 or fp32 (narrowest_exact); every variant widens them to
    the same fp32 values, so the output equals that of an all-fp32 packing bit for bit."""
    layer = random_w4a16(40, 197, 64, seed=12)
    g = torch.Generator().manual_seed(13)
    wide = lambda t: t.float() * (1 + torch.rand(t.shape, generator=g) * 1e-3)  # not bf16/fp16-exact
    layer = dataclasses.replace(layer, scales=wide(layer.scales).to(src), zeros=wide(layer.zeros).to(src)).validate()
    p = cpu_packing.pack_w4a16(layer)
    assert p.scales.dtype == src and p.zeros.dtype == src
    x = torch.randn(17, 197, generator=torch.Generator().manual_seed(14)).bfloat16()
    y = _C.gemm_w4a16(x, p.wcodes, p.scales, p.zeros, p.bias, 40, 64, isa)
    y32 = _C.gemm_w4a16(x, p.wcodes, p.scales.float(), p.zeros.float(), p.bias, 40, 64, isa)
    assert torch.equal(y.view(torch.int16), y32.view(torch.int16))


def test_w4a16_variants_and_threads_agree_bitwise():
    layer = random_w4a16(100, 384, 128, seed=7)
    p = cpu_packing.pack_w4a16(layer)
    x = torch.randn(70, 384, generator=torch.Generator().manual_seed(8)).bfloat16()
    threads = torch.get_num_threads()
    outs = []
    try:
        for isa in ISAS:
            for n in (1, 2):
                torch.set_num_threads(n)
                outs.append(_C.gemm_w4a16(x, p.wcodes, p.scales, p.zeros, p.bias, 100, 128, isa))
    finally:
        torch.set_num_threads(threads)
    for y in outs[1:]:
        assert torch.equal(y, outs[0])


@pytest.mark.parametrize("G", [64, 128])
def test_w4a16_sqnr_against_unquantized(isa, G):
    """Asymmetric min-max uint4 per G of Gaussian weights: range ≈ 5σ (G = 64) to 5.5σ (G = 128) over 15 steps,
    noise step²/12 ≈ 0.01σ²: ≈ 20 dB on the weights and on the output (activations stay 16-bit). Floor 17 dB, and
    within 0.05 dB of the reference forward."""
    N, K, M = 96, 512, 8
    g = torch.Generator().manual_seed(9)
    W = torch.randn(N, K, generator=g) / math.sqrt(K)
    wg = W.reshape(N, K // G, G)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / 15).bfloat16()
    zeros = lo.bfloat16()
    codes = torch.round((wg - zeros.float()[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8)
    layer = W4A16Layer(codes.reshape(N, K), scales, zeros, torch.zeros(N).bfloat16(), G).validate()
    x = torch.randn(M, K, generator=g)
    p = cpu_packing.pack_w4a16(layer)
    y = _C.gemm_w4a16(x, p.wcodes, p.scales, p.zeros, p.bias, N, G, isa)
    y_true = x @ W.T
    s_kernel, s_ref = sqnr_db(y, y_true), sqnr_db(reference.w4a16_linear(x, layer), y_true)
    assert s_kernel >= 17.0
    assert abs(s_kernel - s_ref) <= 0.05


# ---------------------------------------------------------------------------------------------------------------
# Packing and argument checks
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_w4a4_pack_roundtrip(precision):
    layer = random_layer(precision, 40, 128, 20)
    p = cpu_packing.pack_w4a4(layer)
    assert torch.equal(cpu_packing.unpack_w4a4_codes(p), layer.codes)
    assert torch.equal(cpu_packing.unpack_w4a4_scales(p), layer.wscales.float())
    assert torch.equal(cpu_packing.unpack_w4a4_proj_up(p), layer.proj_up.float())
    assert p.wcodes.shape == (3, 128 // 8, 64) and p.proj_down.shape == (128, 32)


def test_bad_packed_shape_names_op_and_fix():
    layer = random_layer("int4", 40, 128, 16)
    p = cpu_packing.pack_w4a4(layer)
    q = quantize(torch.randn(2, 128), p, "ref")
    with pytest.raises(RuntimeError, match=r"gemm_w4a4_int4: wcodes .*pack_w4a4"):
        _C.gemm_w4a4_int4(q[0], q[1], q[2], q[3], p.wcodes[:, :-1].contiguous(), p.wscales, p.proj_up, p.bias, 40,
                          torch.float32, "ref")
    with pytest.raises(RuntimeError, match="not one of ref, avx2, avx512vnni"):
        quantize(torch.randn(2, 128), p, "sse9")
