"""Wan 2.1 at 480p, 81 frames: every quantized Linear shape of a block, time and peak memory per call on the CPU.

    python bench/bench_wan_shape.py                          # Wan 2.1 1.3B, median of 3; ~3 min on 2 idle cores
    python bench/bench_wan_shape.py --models 1.3b,14b        # + the 14B widths, one timed call each after the first

Tokens per sample (issue 17, item 5: the layers see [frames x tokens] activations). Wan 2.1's VAE compresses
time by 4 and space by 8 (its latent format: temporal_downscale_ratio 4, spatial 8), keeping the first frame:
81 frames of 480 x 832 -> 1 + (81 - 1) / 4 = 21 latent frames of 60 x 104. The DiT's patch embedding is a
1 x 2 x 2 convolution (patch_size (1, 2, 2)), so M = 21 · 30 · 52 = 32,760 tokens per sample (x2 when ComfyUI
batches the conditional and unconditional passes). Text: 512 tokens (text_len), projected to the model's width
before the cross-attention's k and v.

Per block (comfy/ldm/wan/model.py WanAttentionBlock): self-attention q, k, v, o and cross-attention q, o are
dim x dim on the video tokens; cross-attention k, v are dim x dim on the 512 text tokens; the FFN is
dim -> ffn_dim, GELU(tanh), ffn_dim -> dim (the down projection's input is post-GELU: a shifted layer, unsigned
activation codes). Wan 2.1 1.3B: dim 1536, ffn 8960, 30 blocks; 14B: dim 5120, ffn 13824, 40 blocks.

Per shape, each in its own child process (tests/peak_rss.py: glibc returns freed blocks at once; resident-memory
growth at the call's peak, from VmHWM reset before the call), bf16 input:
  ours   SVDQuantLinear on the compiled CPU kernels, INT4 rank 32 (random codes: the time does not depend on them);
         peak against the stated bound, nunchaku_core.kernels.cpu_packing.cpu_w4a4_peak_bytes;
  bf16   torch.nn.functional.linear with a dense bf16 weight of the same shape (oneDNN); its peak against its
         output's size (it states no bound);
  tiled  the memory-bounded fallback (SVDQ_BACKEND=tiled: what runs where no kernel does), one call, its peak
         against nunchaku_core.kernels.tiled.tiled_peak_bytes. Its time is the slow path's (fp32 matmul).
Times: the first call is the warm-up; the median of the next --repeats calls (fewer for 14B). Peaks: the first
call's growth (it includes what a first call sets up: thread stacks, the AVX-512 kernel's per-thread block) and
the largest growth of the timed calls. The load average is read before and after each child: the machine is
shared, so the times are what they were under that load, and the ratio of ours to bf16 (measured back to back
in the same run) is the number to read.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from peak_rss import run_child  # noqa: E402

MODELS = {  # Wan 2.1 configs (ComfyUI's detection: dim, ffn_dim, num_heads, num_layers)
    "1.3b": dict(dim=1536, ffn=8960, heads=12, blocks=30),
    "14b": dict(dim=5120, ffn=13824, heads=40, blocks=40),
}
VAE_STRIDE = (4, 8, 8)   # time, height, width
PATCH = (1, 2, 2)
TEXT_TOKENS = 512
RANK = 32


def video_tokens(frames: int, height: int, width: int) -> int:
    """Tokens of one sample (module docstring): latent frames 1 + (frames - 1) / 4, pixels / 8, then the patch."""
    t = 1 + (frames - 1) // VAE_STRIDE[0]
    h, w = height // VAE_STRIDE[1], width // VAE_STRIDE[2]
    return (t // PATCH[0]) * (h // PATCH[1]) * (w // PATCH[2])


def block_layers(cfg: dict, M: int) -> list[tuple[str, int, int, int, bool, int]]:
    """(name, M, N, K, shifted, count per block) of one Wan attention block's Linears."""
    d, f = cfg["dim"], cfg["ffn"]
    return [
        ("self q/k/v/o, cross q/o", M, d, d, False, 6),
        ("cross k/v (text)", TEXT_TOKENS, d, d, False, 2),
        ("ffn up", M, f, d, False, 1),
        ("ffn down (post-GELU)", M, d, f, True, 1),
    ]


CHILD = r'''
import json, statistics, time, torch
import torch.nn.functional as F
from peak_rss import measure, status_bytes
from bench_layers import random_layer
from nunchaku_core.kernels import cpu_packing, tiled
from nunchaku_core.linear import SVDQuantLinear
M, N, K, R, shifted, impl, repeats = {M}, {N}, {K}, {R}, {shifted}, "{impl}", {repeats}
g = torch.Generator().manual_seed(1)
x = torch.empty(M, K, dtype=torch.bfloat16)                  # x: [M, K] bf16, filled in chunks (no fp32 copy)
for m0 in range(0, M, 4096):
    c = torch.randn(min(4096, M - m0), K, generator=g)
    x[m0:m0 + 4096] = (F.gelu(c, approximate="tanh") if shifted else c).bfloat16()
if impl == "bf16":
    w = (torch.randn(N, K, generator=g) * 0.02).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    fn = lambda: F.linear(x, w, b)
    held, bound = w.nbytes + b.nbytes, 2 * M * N
else:
    m = SVDQuantLinear(random_layer(N, K, R, shifted=shifted), backend="cpu" if impl == "ours" else "tiled")
    fn = lambda: m(x)
    held = sum(t.nbytes for t in m.held_tensors())
    bound = (cpu_packing.cpu_w4a4_peak_bytes(M, N, K, R, "int4", x.dtype) if impl == "ours"
             else tiled.tiled_peak_bytes(M, N, K, R, "int4", x.dtype))
times = []
def timed():
    t0 = time.perf_counter()
    y = fn()
    times.append(time.perf_counter() - t0)
    return y
y, first_grow = measure(timed)
assert y.shape == (M, N) and y.dtype == x.dtype
del y
grows = []
for _ in range(repeats):
    y, grow = measure(timed)
    grows.append(grow)
    del y
print(json.dumps(dict(first_s=times[0], median_s=statistics.median(times[1:]) if repeats else None, times=times,
                      first_grow=first_grow, steady_grow=max(grows) if grows else None, bound=bound, held=held,
                      hwm=status_bytes("VmHWM"), threads=torch.get_num_threads())))
'''


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def measure_one(M: int, N: int, K: int, shifted: bool, impl: str, repeats: int) -> dict:
    before = loadavg()
    r = run_child(CHILD.format(M=M, N=N, K=K, R=RANK, shifted=shifted, impl=impl, repeats=repeats), timeout=1800,
                  folders=("tests", "bench"))
    r["load"] = f"{before} -> {loadavg()}"
    return r


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def ms(s) -> str:
    return "-" if s is None else f"{s * 1e3:.1f}"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="1.3b", help="comma-separated: 1.3b, 14b")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--repeats", type=int, default=9,
                    help="timed calls after the first (1.3B; with 3, the slower warm-up calls set the median)")
    ap.add_argument("--repeats-14b", type=int, default=3, help="timed calls after the first (14B)")
    ap.add_argument("--impls", default="ours,bf16,tiled")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_wan_shape.txt"))
    args = ap.parse_args()
    M = video_tokens(args.frames, args.height, args.width)
    impls = args.impls.split(",")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lines = [
        f"bench_wan_shape.py {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
        f"{cpu_name()}, {os.cpu_count()} cores",
        f"command: python bench/bench_wan_shape.py {' '.join(sys.argv[1:])}",
        f"Wan 2.1 {args.frames} frames {args.height}x{args.width}: latent {1 + (args.frames - 1) // 4}x"
        f"{args.height // 8}x{args.width // 8}, patch 1x2x2 -> M = {M} tokens per sample; text {TEXT_TOKENS}",
        f"load average at start: {loadavg()} (shared machine: times were taken under this load; read the ratios)",
        "",
    ]
    print("\n".join(lines), flush=True)
    results = {}
    for name in args.models.split(","):
        cfg = MODELS[name]
        repeats = args.repeats if name == "1.3b" else args.repeats_14b
        header = (f"Wan 2.1 {name}: dim {cfg['dim']}, ffn {cfg['ffn']}, {cfg['blocks']} blocks; INT4 rank {RANK}; "
                  f"times: median of {repeats} after a first call")
        table = [header, "| layer | M | N x K | impl | first ms | median ms | x bf16 | peak first MiB | "
                         "peak steady MiB | bound MiB | peak/bound | weights MiB | load (1/5/15 min) |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        print(header, flush=True)
        per_block = {impl: 0.0 for impl in impls}
        for layer, m, n, k, shifted, count in block_layers(cfg, M):
            row = {}
            for impl in impls:
                row[impl] = measure_one(m, n, k, shifted, impl, 0 if impl == "tiled" else repeats)
            for impl, r in row.items():
                t = r["median_s"] if r["median_s"] is not None else r["first_s"]
                per_block[impl] += count * t
                base = row.get("bf16")
                ratio = "-" if impl == "bf16" or base is None else f"{(base['median_s'] or base['first_s']) / t:.2f}"
                peak = r["first_grow"] if r["steady_grow"] is None else max(r["first_grow"], r["steady_grow"])
                cells = [layer + (f" x{count}" if count > 1 else ""), str(m), f"{n}x{k}", impl, ms(r["first_s"]),
                         ms(r["median_s"]), ratio, mib(r["first_grow"]), mib(r["steady_grow"]), mib(r["bound"]),
                         f"{peak / r['bound']:.3f}", mib(r["held"]), r["load"]]
                table.append("| " + " | ".join(cells) + " |")
                print(table[-1], flush=True)
                results.setdefault(name, []).append(dict(layer=layer, M=m, N=n, K=k, impl=impl, **r))
        total = [f"per block (sum of count x time): " + ", ".join(f"{i} {per_block[i]:.2f} s" for i in impls)]
        if "ours" in per_block and "bf16" in per_block:
            total.append(f"ours vs bf16 per block: {per_block['bf16'] / per_block['ours']:.2f}x; one forward of "
                         f"{cfg['blocks']} blocks, one sample: ours {per_block['ours'] * cfg['blocks']:.1f} s, bf16 "
                         f"{per_block['bf16'] * cfg['blocks']:.1f} s (Linears only)")
        table += [""] + total + [""]
        print("\n".join(total), flush=True)
        lines += table
    lines.append(f"load average at end: {loadavg()}")
    lines.append("raw: " + json.dumps(results))
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
