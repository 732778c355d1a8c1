"""The memory-bounded fallback (nunchaku_core.kernels.tiled) against nunchaku_core.reference, on the CPU.

(a) codes: the fallback calls reference.quantize_act on chunks of rows; per-token groups make the chunks' codes
    the whole input's, checked here at chunk sizes that split the input unevenly.
(b) output on the same quantized inputs within kernel_bounds.tiled_w4a4_bound (W4A16: w4a16_bound), with tile
    budgets small enough that every dimension is split, and the default budget (one tile).
(c) SQNR against the unquantized layer.
Memory: the peak of torch's allocations during one call at M = 4608, N = 12288, K = 3072 stays within
tiled.tiled_peak_bytes (test_peak_memory_within_stated_bound explains the measurement).
"""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from kernel_bounds import SQNR_CASES, check_sqnr, sqnr_case, tiled_w4a4_bound, w4a16_bound
from nunchaku_core import reference
from nunchaku_core.kernels import tiled
from nunchaku_core.layer import SVDQuantLayer
from peak_rss import torch_peak_allocated
from test_cpu_kernels import W4A4_CASES, W4A16_CASES, random_input, random_layer, random_w4a16

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SMALL_BUDGET = 256  # bytes, below the tile minimum: 1 row quantized at a time, 8 weight rows x 2 output rows per tile


def _split_budget(M: int, K: int, precision: str) -> int:
    """SMALL_BUDGET, or for the M = 255 cases one that quantizes 64 rows at a time (a row at a time is slow, and
    the small-M cases split every loop already)."""
    return SMALL_BUDGET if M <= 17 else (tiled.QUANT_BYTES[precision] + 4) * K * 64


def _split(M: int, N: int, K: int, precision: str) -> tiled.Tiles:
    return tiled.tiles(M, N, K, tiled.WEIGHT_BYTES[precision], tiled.QUANT_BYTES[precision] + 4,
                       _split_budget(M, K, precision))


@pytest.mark.parametrize("case", W4A4_CASES, ids=lambda c: "-".join(map(str, c)))
def test_chunked_quantizer_codes_equal_whole_input(case):
    precision, shifted, M, N, K, R = case
    layer = random_layer(precision, N, K, R, shifted)
    x = random_input(M, K, shifted, torch.bfloat16)
    codes, scales = reference.quantize_act(x, layer)
    step = max(1, _split(M, N, K, precision).TQ)
    parts = [reference.quantize_act(x[m:m + step], layer) for m in range(0, M, step)]
    assert torch.equal(torch.cat([c for c, _ in parts]), codes)
    assert torch.equal(torch.cat([s.float() for _, s in parts]), scales.float())


@pytest.mark.parametrize("budget", [SMALL_BUDGET, tiled.TILE_BYTES], ids=["split", "one-tile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", W4A4_CASES, ids=lambda c: "-".join(map(str, c)))
def test_svdquant_matches_reference_within_bound(case, dtype, budget):
    precision, shifted, M, N, K, R = case
    layer = random_layer(precision, N, K, R, shifted)
    x = random_input(M, K, shifted, dtype)
    if budget == SMALL_BUDGET:
        budget = _split_budget(M, K, precision)
        t = _split(M, N, K, precision)
        assert M == 1 or t.TQ < M and (M > 17 or t.TN < N and t.TM < M), t   # the tile loops run more than once
    y = tiled.svdquant_linear(x.reshape(1, M, K), layer, budget=budget).reshape(M, N)
    assert y.dtype == dtype and y.shape == (M, N)
    codes, scales = reference.quantize_act(x, layer)
    y_ref = reference.gemm_w4a4(codes, scales, layer) + reference.lowrank_branch(x, layer) + layer.bias.float()
    err = (y.double() - y_ref.to(dtype).double()).abs()
    bound = tiled_w4a4_bound(layer, x, codes, scales, y_ref, dtype)
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("precision,shifted", SQNR_CASES)
def test_svdquant_sqnr_against_unquantized(precision, shifted):
    """(c) loosely: kernel_bounds.sqnr_case, as every kernel's test (floor 13 dB, within 0.05 dB of the reference
    forward, which quantizes identically)."""
    layer, x, y_true = sqnr_case(precision, shifted)
    check_sqnr(tiled.svdquant_linear(x, layer, budget=SMALL_BUDGET), layer, x, y_true)


@pytest.mark.parametrize("budget", [SMALL_BUDGET, tiled.TILE_BYTES], ids=["split", "one-tile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", W4A16_CASES, ids=lambda c: "-".join(map(str, c)))
def test_w4a16_matches_reference_within_bound(case, dtype, budget):
    M, N, K, G = case
    layer = random_w4a16(N, K, G)
    x = (torch.randn(M, K, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    y = tiled.w4a16_linear(x, layer, budget=budget)
    assert y.dtype == dtype and y.shape == (M, N)
    y_ref = reference.w4a16_linear(x.float(), layer)
    err = (y.double() - y_ref.to(dtype).double()).abs()
    bound = w4a16_bound(layer, x.float(), y_ref, dtype)
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item()}"


def _peak_allocated(fn, tmp_path) -> int:
    """peak_rss.torch_peak_allocated: torch's allocations, exactly. Resident memory is no good measure in this
    process: glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MiB) in its heaps, so RSS rose
    213 MiB with MALLOC_MMAP_THRESHOLD_=65536 and 267-285 MiB without for the same call (2026-12-07), and it moves
    with what ran before (tests/test_large_m.py measures RSS in a child with that threshold set)."""
    return torch_peak_allocated(fn, tmp_path / "trace.json")


def _big_layer(precision: str, N: int, K: int, R: int) -> SVDQuantLayer:
    g = torch.Generator().manual_seed(3)
    nv = precision == "nvfp4"
    G = 16 if nv else 64
    codes = torch.randint(0 if nv else -8, 16 if nv else 8, (N, K), generator=g, dtype=torch.int8)
    ws = torch.rand(N, K // G, generator=g) * 0.05 + 0.005
    return SVDQuantLayer(precision, codes, ws.to(torch.float8_e4m3fn) if nv else ws.bfloat16(),
                         smooth=(torch.rand(K, generator=g) + 0.5).bfloat16(),
                         proj_down=(torch.randn(K, R, generator=g) * 0.1).bfloat16(),
                         proj_up=(torch.randn(N, R, generator=g) * 0.1).bfloat16(),
                         bias=torch.randn(N, generator=g).bfloat16(),
                         wtscale=torch.tensor([0.75]).bfloat16() if nv else None,
                         wcscales=(torch.rand(N, generator=g) + 0.5).bfloat16() if nv else None).validate()


def test_peak_memory_within_stated_bound(tmp_path):
    """M = 4608 (a 1024² FLUX image's tokens + 512 text tokens), N = 12288, K = 3072 (FLUX's fused qkv + MLP
    width), INT4 rank 32, bf16 input: the peak stays within tiled_peak_bytes (232 MiB with the 64 MiB default
    budget, 108 MiB of it the output; 211.0 MiB measured on 2026-12-07) where reference.gemm_w4a4's [M, N, K/G]
    fp32 tensor alone is 10.9 GB. 9-16 s on 2 shared cores."""
    M, N, K, R = 4608, 12288, 3072, 32
    layer = _big_layer("int4", N, K, R)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(4)).bfloat16()
    out = {}
    t0 = time.monotonic()
    packed = tiled.pack_codes(layer)   # as the backend runs it: codes two per byte, unpacked per tile
    peak = _peak_allocated(lambda: out.setdefault("y", tiled.svdquant_linear(x, layer, packed=packed)), tmp_path)
    seconds = time.monotonic() - t0
    bound = tiled.tiled_peak_bytes(M, N, K, R, "int4", x.dtype)
    print(f"\ntiled int4 M={M} N={N} K={K}: peak {peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB, "
          f"output {M * N * 2 / 2**20:.0f} MiB, {seconds:.1f} s")
    assert out["y"].shape == (M, N) and torch.isfinite(out["y"]).all()
    assert peak <= bound
    assert M * N * (K // 64) * 4 > 40 * bound        # what the tiles avoid


@pytest.mark.parametrize("kind", ["int4", "nvfp4", "w4a16"])
def test_peak_memory_with_small_budget(kind, tmp_path):
    """A 1 MiB budget on a 1024 x 2048 layer: the tile terms, not the output, dominate the bound, so its
    per-element costs (QUANT_BYTES, WEIGHT_BYTES, OUT_BYTES) are what is checked."""
    M, N, K, R, budget = 300, 1024, 2048, 32, 2**20
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(6))
    if kind == "w4a16":
        layer = random_w4a16(N, K, 64)
        packed = tiled.pack_codes(layer)
        fn = lambda: tiled.w4a16_linear(x, layer, budget=budget, packed=packed)   # noqa: E731
    else:
        layer = _big_layer(kind, N, K, R)
        packed = tiled.pack_codes(layer)
        fn = lambda: tiled.svdquant_linear(x, layer, budget=budget, packed=packed)   # noqa: E731
    peak = _peak_allocated(fn, tmp_path)
    bound = tiled.tiled_peak_bytes(M, N, K, R, kind, x.dtype, budget)
    print(f"\ntiled {kind} M={M} N={N} K={K} budget 1 MiB: peak {peak / 2**20:.2f} MiB, bound {bound / 2**20:.2f} MiB")
    assert peak <= bound, f"{peak} > {bound}"


@pytest.mark.parametrize("kind", ["int4", "int4-shifted", "nvfp4", "w4a16-odd-K"])
def test_packed_codes_give_the_same_bits(kind):
    """The backend keeps the codes two per byte (tiled.pack_codes) and the tiles unpack their rows: the same
    outputs bit for bit as from the 1-byte codes, and unpack_codes(pack_codes) is the identity."""
    if kind == "w4a16-odd-K":
        layer = random_w4a16(40, 197, 64)
        x = torch.randn(5, 197, generator=torch.Generator().manual_seed(2))
        run = tiled.w4a16_linear
    else:
        precision, shifted = kind.split("-")[0], kind.endswith("shifted")
        layer = random_layer(precision, 40, 128, 16, shifted)
        x = random_input(17, 128, shifted, torch.bfloat16)
        run = tiled.svdquant_linear
    packed = tiled.pack_codes(layer)
    assert packed.dtype == torch.uint8 and packed.shape == (layer.N, (layer.K + 1) // 2)
    assert torch.equal(tiled.unpack_codes(layer, packed), layer.codes)
    assert tiled.unpack_codes(layer, packed).dtype == layer.codes.dtype
    meta = dataclasses.replace(layer, codes=torch.empty(layer.codes.shape, dtype=layer.codes.dtype, device="meta"))
    assert torch.equal(run(x, meta, budget=SMALL_BUDGET, packed=packed), run(x, layer, budget=SMALL_BUDGET))
