"""The Triton kernels (nunchaku_core/kernels/triton_w4a4.py, triton_w4a16.py) run by Triton's interpreter
(TRITON_INTERPRET=1: numpy on the CPU, device tensors are CPU tensors) against the numerics contract,
nunchaku_core/reference.py. Run by tests/test_triton_kernels.py in a process of its own: Triton decides at import
time, for its own standard library too, whether kernels are interpreted or compiled, so one process cannot hold
both kinds (the compile tests need the compiled kind). By hand:
    TRITON_INTERPRET=1 python -m pytest tests/triton_interpreter_cases.py

Three tests per kernel variant (STYLE.md):
  (a) codes:  activation codes and scales equal reference.quantize_act bit for bit (INT4 signed, INT4 shifted,
              NVFP4), including every rounding tie and every float8_e4m3 scale value and midpoint;
  (b) output: the GEMM on the SAME quantized inputs equals reference.gemm_w4a4 + lowrank_branch + bias
              (reference.w4a16_linear) bit for bit when the data make every product and sum exact (checked in
              fp64 first), and within the bound derived next to `w4a4_bound` here / kernel_bounds.w4a16_lowp_bound
              otherwise;
  (c) SQNR:   against the unquantized layer, loosely, and as close to the reference's as (b) implies.
Shapes: M in {1, 3, 17, 255}, K of exactly one group, N not a multiple of the interpreter's tiles (32), rank 0,
16 and 48 (a LoRA-extended branch), W4A16 with K not a multiple of G, odd K, and G without a power-of-two divisor
>= 16 (the per-input scale gather).

What the interpreter cannot show (the bounds below are written to hold on GPUs too, see each): the GPU's order of
fp32 sums inside tl.dot (fp32 "ieee" dots, MMA accumulators), and its tensor cores' fp32 accumulation, which may
truncate instead of rounding (the W4A16 bound uses 2u per addition on the kernel side for that). Everything else is
the same IEEE fp32 operation on both: division is div_rn, no mul+add is contracted (enable_fp_fusion=False; the
compile tests check the PTX), and conversions to bf16 round by integer operations in the kernel
(triton_common.to_bf16_rne) because the interpreter's own fp32->bf16 cast truncates.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from nunchaku_core import reference
from nunchaku_core.layer import SIGMA, SVDQuantLayer, W4A16Layer
from nunchaku_core.packing import bytes_to_nibbles, nibbles_to_bytes
from kernel_bounds import SQNR_CASES, check_sqnr, random_input, sqnr_case, sqnr_db, w4a16_lowp_bound

if os.environ.get("TRITON_INTERPRET") != "1":
    raise ImportError("tests/triton_interpreter_cases.py needs TRITON_INTERPRET=1 in the environment before Python "
                      "starts; tests/test_triton_kernels.py runs it that way")

from nunchaku_core.kernels import triton_w4a4 as w4a4, triton_w4a16 as w4a16  # noqa: E402

U = 2.0 ** -24                                          # fp32 unit roundoff
U16 = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 0.0}   # of the 16-bit dtypes


def gamma(n: int, u: float = U) -> float:
    """Higham's γ_n = n·u/(1 − n·u): a value that passes through n roundings (+, ×, in any order) carries a
    relative error ≤ γ_n, so a sum of such terms is within γ_n·Σ|terms| of the exact sum."""
    return n * u / (1 - n * u)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (bitwise equality, -0 != +0, NaN == NaN of the same payload)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _pow2(shape, lo: int, hi: int, g: torch.Generator) -> torch.Tensor:
    return torch.exp2(torch.randint(lo, hi + 1, shape, generator=g).float())


# ---------------------------------------------------------------------------------------------------------------
# Layers and inputs
# ---------------------------------------------------------------------------------------------------------------

# precision, shifted, M, N, K, R. N = 100 and 37 span 4 and 2 interpreter tiles of 32 with a partial last one;
# K = 64 (int4) / 16 (nvfp4) is exactly one group; R = 48 is a LoRA-extended rank (not a power of two).
W4A4_CASES = [(p, s) + shape for p, s in (("int4", False), ("int4", True))
              for shape in ((1, 100, 128, 16), (3, 100, 128, 0), (17, 37, 64, 48), (255, 100, 192, 16))]
W4A4_CASES += [("nvfp4", False) + shape
               for shape in ((1, 100, 128, 16), (3, 100, 64, 0), (17, 37, 16, 48), (255, 100, 64, 16))]


def case_id(c) -> str:
    return "-".join(str(v) for v in c).replace("True", "shifted").replace("-False", "")


def random_layer(precision: str, N: int, K: int, R: int, shifted: bool = False, seed: int = 0,
                 exact: bool = False) -> SVDQuantLayer:
    """Random codes (every code value), scales, smoothing, low-rank factors and bias. exact=True: power-of-two
    scales, smooth 1, small-integer D, U and bias, so that every product and sum of a forward is exact in fp32."""
    g = torch.Generator().manual_seed(seed)
    G = 64 if precision == "int4" else 16
    nv = precision == "nvfp4"
    if precision == "int4":
        codes = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
        wscales = (_pow2((N, K // G), -2, 0, g) if exact else torch.rand(N, K // G, generator=g) * 0.05 + 0.005)
        wscales = wscales.bfloat16()
    else:
        codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int8)
        wscales = (_pow2((N, K // G), -2, 1, g) if exact else torch.rand(N, K // G, generator=g) * 0.5 + 0.01)
        sign = torch.where(torch.rand(N, K // G, generator=g) < 0.2, -1.0, 1.0)      # negative scales get folded
        wscales = (wscales * sign).to(torch.float8_e4m3fn)
    if exact:
        smooth = torch.ones(K)
        down = torch.randint(-1, 2, (K, R), generator=g).float()
        up = torch.randint(-1, 2, (N, R), generator=g).float()
        bias = torch.randint(-4, 5, (N,), generator=g).float()
        wtscale = torch.tensor([0.5]) if nv else None
        wcscales = _pow2((N,), -1, 1, g) if nv else None
    else:
        smooth = (torch.rand(K, generator=g) + 0.5).bfloat16()
        down = (torch.randn(K, R, generator=g) * 0.1).bfloat16()
        up = (torch.randn(N, R, generator=g) * 0.1).bfloat16()
        bias = torch.randn(N, generator=g).bfloat16()
        wtscale = torch.tensor([0.75]).bfloat16() if nv else None
        wcscales = (torch.rand(N, generator=g) + 0.5).bfloat16() if nv else None
    return SVDQuantLayer(precision, codes, wscales, smooth, down, up, bias=bias, wtscale=wtscale, wcscales=wcscales,
                         shifted=shifted).validate()




def act_codes_bytes(codes: torch.Tensor) -> torch.Tensor:
    """Reference activation codes [M, K] int8 -> the kernels' activation layout uint8 [M, K/2] (module docstring
    of triton_w4a4: low nibble = even k)."""
    return nibbles_to_bytes(codes)


def act_codes_from_bytes(packed: torch.Tensor, layer: SVDQuantLayer) -> torch.Tensor:
    signed = layer.precision == "int4" and not layer.shifted
    return bytes_to_nibbles(packed, signed=signed).view(torch.int8)


# ---------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_w4a4_pack_roundtrip(precision):
    """unpack(pack(x)) == x; NVFP4 with negative group scales comes back sign-folded: same code·scale values,
    scales >= 0 (the FP4 MMA reads them unsigned)."""
    layer = random_layer(precision, 37, 128, 20)
    p = w4a4.pack_w4a4(layer, "cpu")
    assert p.wcodes.shape == (37, 64) and p.wcodes.dtype == torch.uint8
    codes, wscales = w4a4.unpack_w4a4(p)
    if precision == "int4":
        assert torch.equal(codes, layer.codes) and torch.equal(wscales, layer.wscales)
        assert p.wscales.shape == (128 // 64, 37)
    else:
        assert (layer.wscales.float() < 0).any() and not (wscales.float() < 0).any()
        G = 16
        vals = lambda c, s: (reference.e2m1_decode(c).reshape(37, -1, G) * s.float()[..., None]).reshape(37, -1)
        assert torch.equal(bits(vals(codes, wscales)), bits(vals(layer.codes, layer.wscales)))
        assert torch.equal(p.out_scale, reference.output_scale(layer))
    assert torch.equal(p.proj_up, layer.proj_up) and torch.equal(p.proj_down, layer.proj_down)


@pytest.mark.parametrize("K", [64, 97, 200])
def test_w4a16_pack_roundtrip(K):
    layer = random_w4a16(40, K, 64)
    p = w4a16.pack_w4a16(layer, "cpu")
    assert p.qweight.shape == (40, (K + 1) // 2) and p.scales.shape == (math.ceil(K / 64), 40)
    codes, scales, zeros = w4a16.unpack_w4a16(p)
    assert torch.equal(codes, layer.codes) and torch.equal(scales, layer.scales) and torch.equal(zeros, layer.zeros)


# ---------------------------------------------------------------------------------------------------------------
# (a) activation codes and scales
# ---------------------------------------------------------------------------------------------------------------

def _check_quantized(x: torch.Tensor, layer: SVDQuantLayer, p) -> tuple:
    codes, scales, lora = w4a4.quantize_act(x, p)
    ref_codes, ref_scales = reference.quantize_act(x, layer)
    M, K = x.shape
    assert codes.shape == (M, K // 2) and codes.dtype == torch.uint8
    assert scales.dtype == ref_scales.dtype and scales.shape == ref_scales.shape
    assert torch.equal(act_codes_from_bytes(codes, layer), ref_codes)
    assert torch.equal(bits(scales), bits(ref_scales))
    return codes, scales, lora


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", W4A4_CASES, ids=case_id)
def test_quantize_act_equals_reference(case, dtype):
    """Codes and scales bit for bit. lora_act = x·D: both sides sum K products in fp32 in their own order,
    ≤ γ_K·(|x|·|D|) each from the exact value, so ≤ 2·γ_K·(|x|·|D|) apart."""
    precision, shifted, M, N, K, R = case
    layer = random_layer(precision, N, K, R, shifted)
    x = random_input(M, K, shifted, dtype)
    _, _, lora = _check_quantized(x, layer, w4a4.pack_w4a4(layer, "cpu"))
    assert lora.shape == (M, R) and lora.dtype == torch.float32
    ref = x.float() @ layer.proj_down.float()
    bound = 2 * gamma(K) * (x.double().abs() @ layer.proj_down.double().abs())
    assert torch.all((lora.double() - ref.double()).abs() <= bound)


def test_quantize_act_int4_ties_zeros_and_tiny_groups():
    """Round half to even at every .5 (scale exactly 1: absmax 7 signed, 15 shifted), all-zero groups (scale 0,
    codes 0), a zero group next to a non-zero one, and subnormal groups whose scale rounds to 0 or to 1 ulp."""
    K = 128
    halves = torch.arange(-7, 7) + 0.5                                    # 14 ties
    signed = torch.zeros(6, K)
    signed[0, :14], signed[0, 14] = halves, 7.0
    signed[0, 64:78], signed[0, 78] = -halves, -7.0
    signed[2, 64:] = torch.randn(64)                                      # row 1 zero; row 2 first group zero
    signed[3, :2] = torch.tensor([3 * 2.0 ** -149, -2.0 ** -149])         # scale rounds to 0
    signed[4, :2] = torch.tensor([5 * 2.0 ** -149, -3 * 2.0 ** -149])     # scale = 1 ulp, codes up to 5
    signed[5] = torch.randint(-7, 8, (K,)).float() * 0.25
    unsigned = torch.zeros(3, K)
    unsigned[0, :15] = torch.arange(15) + 0.5 - SIGMA                    # t = x + σ = k + 0.5 exactly
    unsigned[0, 15] = 15 - SIGMA
    unsigned[1] = -SIGMA                                                  # t = 0: scale 0
    unsigned[2] = torch.rand(K) * 4
    for shifted, x in ((False, signed), (True, unsigned)):
        layer = random_layer("int4", 8, K, 0, shifted)
        layer.smooth = torch.ones(K)
        _check_quantized(x, layer, w4a4.pack_w4a4(layer, "cpu"))
    ref_codes, ref_scales = reference.quantize_act_int4(signed, torch.ones(K))
    assert ref_scales[0, 0] == 1 and ref_codes[0, :14].tolist() == [-6, -6, -4, -4, -2, -2, 0, 0, 2, 2, 4, 4, 6, 6]
    assert ref_scales[3, 0] == 0 and ref_scales[4, 0] == 2.0 ** -149


def _e4m3_values() -> torch.Tensor:
    """Every finite positive float8_e4m3fn value (bit patterns 1..126), ascending."""
    return torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def test_quantize_act_nvfp4_every_scale_and_code_boundary():
    """Group absmax = 6·v for every e4m3 value v and every midpoint between neighbours (ties to even), halfway
    into the subnormals' underflow to 0, and above 6·448 (the clamp); inside groups of scale 1, every e2m1
    midpoint (ties) and negatives rounding to -0. 6·v and the midpoints are exact in fp32, and 6v/6 = v."""
    v = _e4m3_values()
    mids = (v[1:] + v[:-1]) / 2
    targets = torch.cat([v, mids, torch.tensor([2.0 ** -10, 2.0 ** -11, 3 * 2.0 ** -11, 448.0 + 16, 1e6])])
    G = 16
    n_groups = targets.numel()
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(n_groups, G, generator=g) * 2 - 1) * 6 * targets[:, None]
    x[:, 0] = 6 * targets * torch.where(torch.rand(n_groups, generator=g) < 0.5, -1.0, 1.0)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 6.0])
    special = torch.cat([ties, torch.tensor([-1e-3])])                  # a group of scale 1: ties and a -0 code
    x = torch.cat([x.reshape(-1), special, torch.zeros(G)])              # and an all-zero group
    K = 16 * 8
    x = torch.cat([x, torch.zeros((-x.numel()) % K)]).reshape(-1, K)
    layer = random_layer("nvfp4", 8, K, 0)
    layer.smooth = torch.ones(K)
    _check_quantized(x, layer, w4a4.pack_w4a4(layer, "cpu"))
    ref_codes, ref_scales = reference.quantize_act_nvfp4(x, torch.ones(K))
    flat = ref_scales.float().reshape(-1)
    assert torch.equal(flat[:v.numel()], v)                              # every e4m3 value was produced
    assert (ref_codes == 8).any() and flat.max() == 448.0


def test_interpreted_modules():
    assert w4a4.INTERPRETED and w4a16.INTERPRETED


def test_quantize_act_empty_and_bad_input():
    layer = random_layer("int4", 8, 64, 4)
    p = w4a4.pack_w4a4(layer, "cpu")
    codes, scales, lora = w4a4.quantize_act(torch.zeros(0, 64), p)
    assert codes.shape == (0, 32) and scales.shape == (0, 1) and lora.shape == (0, 4)
    with pytest.raises(ValueError, match=r"expected \[M, K\] = \[M, 64\]"):
        w4a4.quantize_act(torch.zeros(3, 32), p)


# ---------------------------------------------------------------------------------------------------------------
# (b) GEMM on the same quantized inputs
# ---------------------------------------------------------------------------------------------------------------

def exact_act(layer: SVDQuantLayer, M: int, seed: int = 4):
    """Quantized activations with power-of-two scales, and small-integer x for the low-rank branch."""
    g = torch.Generator().manual_seed(seed)
    K = layer.K
    if layer.precision == "int4":
        lo, hi = (0, 16) if layer.shifted else (-7, 8)
        codes = torch.randint(lo, hi, (M, K), generator=g, dtype=torch.int8)
        scales = _pow2((M, K // 64), -2, 0, g)
    else:
        codes = torch.randint(0, 16, (M, K), generator=g, dtype=torch.int8)
        scales = _pow2((M, K // 16), -2, 1, g).to(torch.float8_e4m3fn)
    x = torch.randint(-2, 3, (M, K), generator=g).float()
    return codes, scales, x


def reference_forward64(codes, scales, x, layer: SVDQuantLayer) -> torch.Tensor:
    """The reference forward in fp64 (exact for the exact data): to prove the fp32 one has no rounding."""
    G = layer.group_size
    M, K = codes.shape
    a = (codes.double() if layer.precision == "int4" else reference.e2m1_decode(codes).double())
    a = (a.reshape(M, K // G, G) * scales.double()[..., None]).reshape(M, K)
    w = (reference.code_values(layer).double().reshape(layer.N, K // G, G) * layer.wscales.double()[..., None])
    y = (a @ w.reshape(layer.N, K).T) * reference.output_scale(layer).double()
    return y + (x.double() @ layer.proj_down.double()) @ layer.proj_up.double().T + layer.bias.double()


def reference_gemm(codes, scales, x, layer: SVDQuantLayer) -> torch.Tensor:
    return reference.gemm_w4a4(codes, scales, layer) + reference.lowrank_branch(x, layer) + layer.bias.float()


@pytest.mark.parametrize("case", W4A4_CASES, ids=case_id)
def test_gemm_w4a4_bitwise_on_exact_data(case):
    precision, shifted, M, N, K, R = case
    layer = random_layer(precision, N, K, R, shifted, exact=True)
    codes, scales, x = exact_act(layer, M)
    y_ref = reference_gemm(codes, scales, x, layer)
    assert torch.equal(y_ref.double(), reference_forward64(codes, scales, x, layer)), "test data not exact"
    lora = x @ layer.proj_down.float()
    y = w4a4.gemm_w4a4(act_codes_bytes(codes), scales, lora, w4a4.pack_w4a4(layer, "cpu"))
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert torch.equal(bits(y), bits(y_ref))


def w4a4_bound(layer: SVDQuantLayer, x: torch.Tensor, codes, scales) -> torch.Tensor:
    """|kernel − reference| per output, both in fp32 (before any rounding to the output dtype).

    Both form the same t_g = fl(fl(P_g·sa_g)·sw_g) from the exact group dot product P_g (same IEEE operations:
    no fma, checked in the PTX by the compile tests). Then each side computes
        y = fl(fl(fl(Σ_g t_g)·out_scale + L) + bias),   L = fl(fl(x·D)·Uᵀ)
    with the sums in its own order (reference: torch's; kernel: g ascending; the GPU's dot order for L).
    Every term of y passes through at most n = max(G' − 1, K + R) + 3 roundings (G' = K/G groups; a term of L:
    its product and the K − 1 additions of x·D, one product and R − 1 additions with U; then the three final
    operations), so each side is within γ_n·(|out_scale|·Σ_g|t_g| + (|x|·|D|)·|U|ᵀ + |bias|) of the exact value
    of that expression, and the two sides within twice that. Holds for any summation order, so for the GPU too,
    as long as every fp32 operation rounds (FMA: once) to nearest."""
    G, Kg = layer.group_size, layer.K // layer.group_size
    M = x.shape[0]
    a = (codes.double() if layer.precision == "int4" else reference.e2m1_decode(codes).double()).reshape(M, Kg, G)
    w = reference.code_values(layer).double().reshape(layer.N, Kg, G)
    t = torch.einsum("mgk,ngk->mng", a, w).abs() * scales.double().abs()[:, None, :] \
        * layer.wscales.double().abs()[None]
    s_main = t.sum(-1) * reference.output_scale(layer).double().abs()
    s_lr = (x.double().abs() @ layer.proj_down.double().abs()) @ layer.proj_up.double().abs().T
    n = max(Kg - 1, layer.K + layer.R) + 3
    return 2 * gamma(n) * (s_main + s_lr + layer.bias.double().abs())


@pytest.mark.parametrize("case", W4A4_CASES, ids=case_id)
def test_gemm_w4a4_within_bound_on_reference_codes(case):
    """Random layer, the reference quantizer's codes of a random input (the SAME quantized inputs), lora_act
    = x·D from torch; derived bound in `w4a4_bound`."""
    precision, shifted, M, N, K, R = case
    layer = random_layer(precision, N, K, R, shifted)
    x = random_input(M, K, shifted, torch.float32)
    codes, scales = reference.quantize_act(x, layer)
    y = w4a4.gemm_w4a4(act_codes_bytes(codes), scales, x @ layer.proj_down.float(), w4a4.pack_w4a4(layer, "cpu"))
    y_ref = reference_gemm(codes, scales, x, layer)
    err = (y.double() - y_ref.double()).abs()
    bound = w4a4_bound(layer, x, codes, scales)
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("precision,shifted,K", [("int4", False, 64), ("int4", True, 128), ("nvfp4", False, 32)])
def test_gemm_w4a4_bitwise_on_random_data_with_one_order(precision, shifted, K):
    """With at most two groups and rank 0 the reference's sum has only one order (t_0 + t_1 is commutative), so
    on random data the kernel must give the same bits: this pins the order of the scale products,
    fl(fl(P_g·sa_g)·sw_g), then ·out_scale, then + bias, which the bound above would let slip."""
    M, N = 17, 37
    layer = random_layer(precision, N, K, 0, shifted)
    x = random_input(M, K, shifted, torch.float32)
    codes, scales = reference.quantize_act(x, layer)
    y = w4a4.gemm_w4a4(act_codes_bytes(codes), scales, torch.zeros(M, 0), w4a4.pack_w4a4(layer, "cpu"))
    assert torch.equal(bits(y), bits(reference_gemm(codes, scales, x, layer)))


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_long_rank_in_several_steps(precision):
    """A LoRA-extended branch longer than MAX_BLOCK_R (64) runs in steps of 64 ranks, in the quantizer (extra passes
    over x) and in the GEMM epilogue: rank 130 = 64 + 64 + 2. Exact data: lora_act and y bit for bit."""
    M, N, K, R = 17, 37, 64, 130
    assert R > 2 * w4a4.MAX_BLOCK_R
    layer = random_layer(precision, N, K, R, exact=True)
    p = w4a4.pack_w4a4(layer, "cpu")
    x = exact_layer_input(layer, M, torch.float32)
    codes, scales, lora = w4a4.quantize_act(x, p)
    assert torch.equal(lora, x @ layer.proj_down.float())
    y = w4a4.gemm_w4a4(codes, scales, lora, p)
    ref_codes, ref_scales = reference.quantize_act(x, layer)
    y_ref = reference_gemm(ref_codes, ref_scales, x, layer)
    assert torch.equal(y_ref.double(), reference_forward64(ref_codes, ref_scales, x, layer)), "test data not exact"
    assert torch.equal(bits(y), bits(y_ref))


def test_gemm_w4a4_argument_checks(monkeypatch):
    layer = random_layer("nvfp4", 8, 64, 4)
    p = w4a4.pack_w4a4(layer, "cpu")
    codes, scales, lora = w4a4.quantize_act(torch.randn(3, 64), p)
    with pytest.raises(ValueError, match="'mma' needs an NVFP4 layer on sm_100/sm_120"):
        w4a4.gemm_w4a4(codes, scales, lora, p, nvfp4_path="mma")        # the interpreter has no FP4 MMA
    monkeypatch.setenv("SVDQ_TRITON_NVFP4", "mma")
    with pytest.raises(ValueError, match=r"'mma' \(SVDQ_TRITON_NVFP4\)"):
        w4a4.gemm_w4a4(codes, scales, lora, p)
    monkeypatch.setenv("SVDQ_TRITON_NVFP4", "decode")
    assert w4a4.gemm_w4a4(codes, scales, lora, p).shape == (3, 8)
    with pytest.raises(ValueError, match="scales is"):
        w4a4.gemm_w4a4(codes, scales.float(), lora, p)


# ---------------------------------------------------------------------------------------------------------------
# The whole layer: svdquant_linear
# ---------------------------------------------------------------------------------------------------------------

def exact_layer_input(layer: SVDQuantLayer, M: int, dtype: torch.dtype, seed: int = 5) -> torch.Tensor:
    """x whose quantization is exact: every group's absmax is the largest code (scale exactly 1) and every value
    a code value, so codes = values; for shifted layers x = code − σ (exact in fp32/fp16, not bf16)."""
    g = torch.Generator().manual_seed(seed)
    K, G = layer.K, layer.group_size
    if layer.precision == "int4":
        top = 15 if layer.shifted else 7
        lo = 0 if layer.shifted else -7
        v = torch.randint(lo, top + 1, (M, K // G, G), generator=g).float()
        v[..., 0] = top
        v = v.reshape(M, K) - (SIGMA if layer.shifted else 0.0)
    else:
        v = reference.e2m1_decode(torch.randint(0, 16, (M, K // G, G), generator=g))
        v[..., 0] = 6.0
        v = v.reshape(M, K)
    return v.to(dtype)


@pytest.mark.parametrize("case", W4A4_CASES, ids=case_id)
def test_svdquant_linear_bitwise_on_exact_data(case):
    """quantize_act + gemm_w4a4 end to end, 3-D input, output rounded to bf16 (fp16 for shifted layers, whose x
    needs 11 bits) in the kernel: bit for bit with reference.svdquant_linear when every fp32 step is exact."""
    precision, shifted, M, N, K, R = case
    layer = random_layer(precision, N, K, R, shifted, exact=True)
    dtype = torch.float16 if shifted else torch.bfloat16
    x = exact_layer_input(layer, M, dtype)
    y_ref = reference.svdquant_linear(x[None], layer)
    codes, scales = reference.quantize_act(x, layer)
    assert torch.equal(reference.svdquant_linear(x, layer).double(),
                       reference_forward64(codes, scales, x.float(), layer).to(dtype).double()), "data not exact"
    y = w4a4.svdquant_linear(x[None], w4a4.pack_w4a4(layer, "cpu"))
    assert y.shape == (1, M, N) and y.dtype == dtype
    assert torch.equal(bits(y), bits(y_ref))


LINEAR_CASES = [(W4A4_CASES[0], torch.bfloat16), (W4A4_CASES[2], torch.float32), (W4A4_CASES[3], torch.float16),
                (W4A4_CASES[7], torch.bfloat16), (W4A4_CASES[8], torch.float16), (W4A4_CASES[10], torch.bfloat16),
                (W4A4_CASES[11], torch.float32)]


@pytest.mark.parametrize("case,dtype", LINEAR_CASES, ids=[f"{case_id(c)}-{str(d)[6:]}" for c, d in LINEAR_CASES])
def test_svdquant_linear_within_bound(case, dtype):
    """Random data end to end. The codes equal the reference's (test (a)), so the fp32 results differ by at most
    `w4a4_bound`; both then round to the output dtype: |r(a) − r(b)| ≤ |a − b| + u16·(|a| + |b|)
    ≤ E + u16·(2|b| + E), b the reference's fp32 value."""
    precision, shifted, M, N, K, R = case
    layer = random_layer(precision, N, K, R, shifted)
    x = random_input(M, K, shifted, dtype)
    y = w4a4.svdquant_linear(x, w4a4.pack_w4a4(layer, "cpu"))
    codes, scales = reference.quantize_act(x, layer)
    y32 = reference_gemm(codes, scales, x.float(), layer)
    assert torch.equal(bits(reference.svdquant_linear(x, layer)), bits(y32.to(dtype)))
    e = w4a4_bound(layer, x.float(), codes, scales)
    bound = e + U16[dtype] * (2 * y32.double().abs() + e)
    err = (y.double() - y32.to(dtype).double()).abs()
    assert y.dtype == dtype and torch.all(err <= bound), f"max excess {(err - bound).max().item()}"


# ---------------------------------------------------------------------------------------------------------------
# (c) against the unquantized layer
# ---------------------------------------------------------------------------------------------------------------







@pytest.mark.parametrize("precision,shifted", SQNR_CASES)
def test_svdquant_linear_sqnr_against_unquantized(precision, shifted):
    """Against the unquantized layer (kernel_bounds.sqnr_case: floor 13 dB, within 0.05 dB of the reference
    forward, which quantizes identically; (b) bounds the difference far tighter)."""
    layer, x, y_true = sqnr_case(precision, shifted)
    check_sqnr(w4a4.svdquant_linear(x, w4a4.pack_w4a4(layer, "cpu")), layer, x, y_true)


# ---------------------------------------------------------------------------------------------------------------
# W4A16
# ---------------------------------------------------------------------------------------------------------------

def random_w4a16(N: int, K: int, G: int, seed: int = 0, exact: bool = False) -> W4A16Layer:
    """exact=True: power-of-two scales and zeros = −c·scale (c in 0..8), so every w = (q − c)·scale is exact in
    bf16/fp16 (|q − c| < 16), with an integer bias."""
    g = torch.Generator().manual_seed(seed)
    ng = -(-K // G)
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    if exact:
        scales = _pow2((N, ng), -3, 0, g).bfloat16()
        zeros = (-torch.randint(0, 9, (N, ng), generator=g) * scales.float()).bfloat16()
        bias = torch.randint(-4, 5, (N,), generator=g).bfloat16()
    else:
        scales = (torch.rand(N, ng, generator=g) * 0.02 + 0.001).bfloat16()
        zeros = (-7 * scales.float()).bfloat16()  # as the writers store it: −bf16(7·scale)
        bias = torch.randn(N, generator=g).bfloat16()
    return W4A16Layer(codes, scales, zeros, bias, G).validate()


# M, N, K, G: GEMV (M <= 16) and GEMM tiles; a partial last group (K = 200, 130), odd K below two groups,
# group 128 (T5), G = 48 (K steps of 16) and G = 20 (no power-of-two divisor >= 16: per-input scale gather).
W4A16_CASES = [
    (1, 100, 192, 64), (3, 70, 130, 64), (17, 37, 97, 64), (255, 40, 256, 128), (3, 40, 100, 20), (17, 40, 100, 48),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", W4A16_CASES, ids=case_id)
def test_w4a16_bitwise_on_exact_data(case, dtype):
    M, N, K, G = case
    layer = random_w4a16(N, K, G, exact=True)
    x = torch.randint(-3, 4, (M, K), generator=torch.Generator().manual_seed(2)).to(dtype)
    y_ref = reference.w4a16_linear(x, layer)
    w64 = layer.codes.double() * layer.scales.double().repeat_interleave(G, 1)[:, :K] \
        + layer.zeros.double().repeat_interleave(G, 1)[:, :K]
    assert torch.equal(reference.w4a16_linear(x.float(), layer).double(),
                       x.double() @ w64.T + layer.bias.double()), "test data not exact"
    y = w4a16.w4a16_linear(x, w4a16.pack_w4a16(layer, "cpu"))
    assert y.dtype == dtype and y.shape == (M, N)
    assert torch.equal(bits(y), bits(y_ref))



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", W4A16_CASES, ids=case_id)
def test_w4a16_within_bound(case, dtype):
    M, N, K, G = case
    layer = random_w4a16(N, K, G)
    x = (torch.randn(M, K, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    y = w4a16.w4a16_linear(x[None], w4a16.pack_w4a16(layer, "cpu"))[0]
    y32 = reference.w4a16_linear(x.float(), layer)                     # the reference before its final rounding
    err = (y.double() - y32.to(dtype).double()).abs()
    bound = w4a16_lowp_bound(layer, x, y32, dtype)                 # derived in tests/kernel_bounds.py
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("G", [64, 128])
def test_w4a16_sqnr_against_unquantized(G):
    """Asymmetric min-max uint4 per G of Gaussian weights: ≈ 20 dB on the output (activations stay 16-bit).
    Floor 17 dB, and within 0.05 dB of the reference forward."""
    N, K, M = 96, 512, 8
    g = torch.Generator().manual_seed(9)
    W = torch.randn(N, K, generator=g) / math.sqrt(K)
    wg = W.reshape(N, K // G, G)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales, zeros = ((hi - lo) / 15).bfloat16(), lo.bfloat16()
    codes = torch.round((wg - zeros.float()[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8)
    layer = W4A16Layer(codes.reshape(N, K), scales, zeros, torch.zeros(N).bfloat16(), G).validate()
    x = torch.randn(M, K, generator=g).bfloat16()
    y = w4a16.w4a16_linear(x, w4a16.pack_w4a16(layer, "cpu"))
    y_true = x.float() @ W.T
    s_kernel, s_ref = sqnr_db(y, y_true), sqnr_db(reference.w4a16_linear(x, layer), y_true)
    assert s_kernel >= 17.0 and abs(s_kernel - s_ref) <= 0.05
