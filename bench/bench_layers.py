"""Per-layer CPU benchmark of the fused SVDQuant W4A4 layer (not a test; ratios measured in the same run).

    python bench/bench_layers.py              # full FLUX table, 3-10 min on 2 cores
    python bench/bench_layers.py --quick      # M in {1, 16, 256}, two shapes, a couple of minutes

For each M x (N, K) it times, on the same random INT4 layer (rank 32, bias, group 64; shifted, i.e. unsigned
activation codes, for the K = 4N shape, as FLUX's MLP down projections are):
  ours       nunchaku_core.linear.SVDQuantLinear forward (fused activation quantization + low-rank down, then the
             W4A4 GEMM with group scales, low-rank up and bias in its epilogue), input bf16 and fp32;
  F.linear   torch.nn.functional.linear with a dense weight of the same shape, bf16 and fp32;
  kitchen    comfy-kitchen's eager SVDQuant path (PyPI comfy-kitchen, F.linear on its QuantizedTensor with
             TensorCoreSVDQuantW4A4Layout, the path ComfyUI takes on CPU), bf16, if it is installed;
and reports the speed-ups and our achieved int8 ops/s (2·M·N·K / time of the whole layer) against the VNNI peak
measured in the same run: _C.vnni_peak_macs runs a loop of independent vpdpbusd zmm instructions on every torch
thread (64 multiply-accumulates each = 128 int8 ops). `floor` is a lower bound on the time of any implementation
of the numerics contract at that peak (contract_floor_seconds), `ceil` = F.linear bf16's time / floor the highest
ratio against it that the run allowed, and %floor = floor / our time. Each time is the best of back-to-back runs
after a warm-up (warm caches): --repeats runs, or as many as fill --min-seconds for fast cases; for M <= 16 a
second table repeats ours and bf16 F.linear with the caches flushed before every run (the weights then come from
memory, as inside a model).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nunchaku_core import backend  # noqa: E402
from nunchaku_core.layer import SVDQuantLayer  # noqa: E402
from nunchaku_core.linear import SVDQuantLinear  # noqa: E402

FLUX_SHAPES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288)]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,16,256,4096", help="comma-separated token counts M")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in FLUX_SHAPES), help="NxK,NxK,...")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (best of)")
    ap.add_argument("--max-seconds", type=float, default=20.0,
                    help="cap one measurement's total time: fewer repeats for slow cases (at least 1)")
    ap.add_argument("--min-seconds", type=float, default=1.0,
                    help="fast cases repeat until they fill this much time (best of all those runs)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--no-kitchen", action="store_true", help="skip comfy-kitchen")
    ap.add_argument("--quick", action="store_true", help="M = 1,16,256 on 3072x3072 and 12288x3072")
    return ap.parse_args()


_FLUSH = None


def flush_caches() -> None:
    """Evict the caches: write 64 MiB (twice this CPU's L3), so the next call reads its weights from memory."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(64 << 20, dtype=torch.uint8)
    _FLUSH.add_(1)


def timed(fn, repeats: int, max_seconds: float, cold: bool = False, min_seconds: float = 1.0) -> float:
    """Best wall time of fn() over `repeats` runs after one warm-up, or over as many as fill min_seconds when
    that is more (fast layers: hundreds to thousands of runs), and fewer when the runs would pass max_seconds.
    Back to back the caches stay warm (the layer's weights, 4.7-19 MB, stay in L3); with cold=True the caches are
    flushed before each run (outside the timed part), as for a layer inside a model. Best-of, because the
    development machines are shared: single runs swing by 10-20 % and whole seconds by up to 2x when a neighbour
    is busy, and seven runs of a 0.3 ms layer cover 2 ms of that. Ours and the baselines get the same rule."""
    t0 = time.perf_counter()
    fn()
    first = max(time.perf_counter() - t0, 1e-9)
    per_run = first + (0.01 if cold else 0.0)   # a flush writes 64 MiB
    n = max(1, min(max(repeats, int(min_seconds / per_run)), int(max_seconds / per_run)))
    best = math.inf
    for _ in range(n):
        if cold:
            flush_caches()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def random_layer(N: int, K: int, R: int, seed: int = 0, shifted: bool = False) -> SVDQuantLayer:
    g = torch.Generator().manual_seed(seed)
    return SVDQuantLayer(
        "int4", torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8),
        (torch.rand(N, K // 64, generator=g) * 0.02 + 0.001).bfloat16(),
        smooth=(torch.rand(K, generator=g) + 0.5).bfloat16(),
        proj_down=(torch.randn(K, R, generator=g) * 0.05).bfloat16(),
        proj_up=(torch.randn(N, R, generator=g) * 0.05).bfloat16(),
        bias=torch.randn(N, generator=g).bfloat16(), shifted=shifted,
    ).validate()


def contract_floor_seconds(M: int, N: int, K: int, R: int, peak_macs: float) -> float:
    """A lower bound on the time of one INT4 layer on this CPU, from the instructions the numerics contract
    (csrc/cpu/kernels.h, nunchaku_core/reference.py) needs on the two pipes that vpdpbusd saturates at peak_macs:
      vpdpbusd     M·N·K / 64          64 int8 multiply-accumulates each;
      group scale  2·M·(N/16)·(K/64)   acc = fma(float(dot)·ascale, wscale, acc) per 16 outputs and group of 64:
                                       one vmulps and one vfmadd (the rounded product is part of the contract);
      up-proj      M·(N/16)·R          fp32 fma over r per 16 outputs;
      down-proj    M·K·ceil(R/16)      fp32 fma over k per 16 ranks.
    On this Zen 5 vmulps and vfmadd take vpdpbusd's pipes one for one (bench/vnni_ports.cpp, README "Where the
    time goes"); everything else a kernel does (loads, unpacking, broadcasts, conversions, the quantizer's
    divisions, memory traffic, threading) is left out, so the bound is optimistic."""
    ops = M * N * K / 64 + 2 * M * (N / 16) * (K / 64) + M * (N / 16) * R + M * K * math.ceil(R / 16)
    return ops / (peak_macs / 64)


def kitchen_linear(layer: SVDQuantLayer):
    """comfy-kitchen's eager path on the same quantized layer, or (None, reason)."""
    try:
        import comfy_kitchen as ck  # noqa: F401
        from comfy_kitchen.tensor.base import QuantizedTensor
        from comfy_kitchen.tensor.svdquant_w4a4 import TensorCoreSVDQuantW4A4Layout
    except ImportError as e:
        return None, f"comfy-kitchen not importable: {e}"
    c = layer.codes.to(torch.int16)
    qweight = ((c[:, 0::2] & 0xF) | ((c[:, 1::2] & 0xF) << 4)).to(torch.int8)   # [N, K/2], low nibble = even k
    params = TensorCoreSVDQuantW4A4Layout.Params(
        scale=layer.wscales.T.contiguous(), orig_dtype=torch.bfloat16, orig_shape=(layer.N, layer.K),
        proj_down=layer.proj_down, proj_up=layer.proj_up, smooth_factor=layer.smooth, act_unsigned=layer.shifted)
    qt = QuantizedTensor(qweight, "TensorCoreSVDQuantW4A4Layout", params)
    return (lambda x: F.linear(x, qt, layer.bias)), None


def fmt(t: float) -> str:
    return f"{t * 1e3:9.2f}" if t < 10 else f"{t:8.1f}s"


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if backend.resolve_backend("cpu") != "cpu":
        sys.exit("the compiled CPU kernels are not available: " + backend.BUILD_HINT)
    Ms = [1, 16, 256] if args.quick else [int(m) for m in args.m.split(",")]
    shapes = [(3072, 3072), (12288, 3072)] if args.quick else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    isa = backend.cpu_isa()
    threads = torch.get_num_threads()
    # best of eight 0.25 s readings: a neighbour's burst lowers one reading, never raises it, and a low peak would
    # make `floor` too high and `ceil` too low
    peak_macs = max(backend._C.vnni_peak_macs(0.25) for _ in range(8)) if isa == "avx512vnni" else float("nan")
    print(f"# CPU kernels: {isa}, torch threads: {threads}, torch {torch.__version__}")
    print(f"# VNNI peak (measured, vpdpbusd zmm on {threads} threads, best of 8 x 0.25 s): "
          f"{peak_macs / 1e9:.0f} GMAC/s = {2 * peak_macs / 1e12:.2f} int8 TOPS")
    print(f"# times in ms, best of back-to-back runs (warm caches): --repeats {args.repeats} or as many as fill "
          f"--min-seconds {args.min_seconds:g}; ratios = their time / ours (> 1: ours faster)")
    print("# K = 4N layers (FLUX's MLP down projections) are shifted: unsigned activation codes, as in FLUX")
    print("# floor: contract_floor_seconds at that peak; ceil = F.lin_bf16 / floor, the best ratio this run allowed;"
          " %floor = floor / ours_bf16")
    cols = ("M", "N", "K", "ours_bf16", "F.lin_bf16", "x_bf16", "ours_fp32", "F.lin_fp32", "x_fp32", "kitchen",
            "x_kitch", "TOPS", "%peak", "floor", "ceil", "%floor")
    print(" ".join(f"{c:>10}" for c in cols))
    kitchen_note = None
    cold = []
    for N, K in shapes:
        layer = random_layer(N, K, args.rank, shifted=K == 4 * N)
        mod = SVDQuantLinear(layer)
        w16 = torch.randn(N, K).bfloat16()
        w32 = w16.float()
        b16, b32 = layer.bias, layer.bias.float()
        kitchen, why = (None, "--no-kitchen") if args.no_kitchen else kitchen_linear(layer)
        kitchen_note = kitchen_note or why
        for M in Ms:
            x16 = torch.randn(M, K).bfloat16()
            x32 = x16.float()
            def t(fn, cold=False):
                return timed(fn, args.repeats, args.max_seconds, cold=cold, min_seconds=args.min_seconds)
            t_ours16 = t(lambda: mod(x16))
            t_lin16 = t(lambda: F.linear(x16, w16, b16))
            t_ours32 = t(lambda: mod(x32))
            t_lin32 = t(lambda: F.linear(x32, w32, b32))
            t_kit = t(lambda: kitchen(x16)) if kitchen is not None else float("nan")
            floor = contract_floor_seconds(M, N, K, args.rank, peak_macs)
            if M <= 16:
                t_cold = t(lambda: mod(x16), cold=True)
                t_cold_lin = t(lambda: F.linear(x16, w16, b16), cold=True)
                cold.append((M, N, K, t_cold, t_cold_lin, floor))
            tops = 2 * M * N * K / t_ours16 / 1e12
            row = [f"{M:>10}", f"{N:>10}", f"{K:>10}", fmt(t_ours16), fmt(t_lin16), f"{t_lin16 / t_ours16:10.2f}",
                   fmt(t_ours32), fmt(t_lin32), f"{t_lin32 / t_ours32:10.2f}",
                   fmt(t_kit) if kitchen is not None else f"{'-':>10}",
                   f"{t_kit / t_ours16:10.2f}" if kitchen is not None else f"{'-':>10}",
                   f"{tops:10.3f}"]
            if math.isnan(peak_macs):   # no VNNI peak on this CPU: no %peak, floor, ceil
                row += ["-"] * 4
            else:
                row += [f"{100 * tops * 1e12 / (2 * peak_macs):10.1f}", fmt(floor), f"{t_lin16 / floor:10.2f}",
                        f"{100 * floor / t_ours16:10.1f}"]
            print(" ".join(f"{c:>10}" for c in row), flush=True)
            if kitchen is not None and M <= 16:  # the two implementations compute the same layer
                d = (kitchen(x16).float() - mod(x16).float()).abs().max().item()
                scale = mod(x16).float().abs().max().item()
                if d > 0.05 * scale:
                    print(f"#   warning: comfy-kitchen and ours differ by {d:.3g} (output max {scale:.3g})")
    if kitchen_note:
        print(f"# comfy-kitchen skipped: {kitchen_note}")
    if cold:
        print("# cold caches (64 MiB written before each run, as for a layer inside a model), bf16 input:")
        print(" ".join(f"{c:>10}" for c in ("M", "N", "K", "ours_bf16", "F.lin_bf16", "x_bf16", "ceil")))
        for M, N, K, t, t_lin, floor in cold:
            ceil = "-" if math.isnan(floor) else f"{t_lin / floor:.2f}"   # no VNNI peak (forced or missing ISA)
            print(" ".join(f"{c:>10}" for c in (M, N, K, fmt(t).strip(), fmt(t_lin).strip(), f"{t_lin / t:.2f}", ceil)))


if __name__ == "__main__":
    main()
