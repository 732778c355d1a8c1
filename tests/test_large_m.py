"""Video-sized activations (issue 17, item 5): M in the hundreds of thousands of rows ([frames x tokens]) through
the CPU kernels and the memory-bounded fallback, each allocating within its stated bound:
  CPU W4A4 / W4A16  nunchaku_core.kernels.cpu_packing (module docstring; cpu_w4a4_peak_bytes, cpu_w4a16_peak_bytes)
  tiled             nunchaku_core.kernels.tiled (module docstring; tiled_peak_bytes)
at M = 200_000 and K = N = 256, where the M-proportional terms (output, activation codes, the fallback's fp32
activations) are 82-99 % of the bound. Each measurement runs in a child process (tests/peak_rss.py: resident-memory
growth at the call's peak, with glibc returning freed blocks at once); the CPU paths are also checked against
torch's own allocation count, which must equal the bound's torch-allocated terms exactly.

Slack on resident memory, beyond the bound: PAGE_SLACK for each of the two buffers that may be backed by
transparent huge pages and end in a partly used one (the kernels' empty_output madvises buffers of 32 MiB and more),
plus 256 KiB per thread for stack pages (the quantizer's accumulators, 64 KiB, and the frames above them). Measured
2026-12-07, 2 threads, first call in the child: INT4 177.35-177.37 MiB against a bound of 177.14 MiB.

And rows past the int32 range: csrc/cpu does all index arithmetic in int64 (read on 2026-12-07: every M/N/K,
offset and loop index in the W4A4/W4A16 kernels and bindings.cpp is int64_t; `int` is used only for counts
below 1024 such as rows per micro-kernel and chunk lengths); test_gemm_rows_past_int32_index runs the GEMM where
element M·K of act passes 2^31 and checks those rows bit for bit.
"""
from __future__ import annotations

import pytest
import torch

from nunchaku_core import backend
from peak_rss import PAGE_SLACK, run_child

M_BIG, N_SMALL, K_SMALL, R = 200_000, 256, 256, 32
STACK_SLACK = 256 * 2**10


def _slack(threads: int) -> int:
    return 2 * PAGE_SLACK + threads * STACK_SLACK


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


_W4A4_CHILD = r'''
import json, tempfile, torch
from pathlib import Path
from peak_rss import measure, torch_peak_allocated
from test_cpu_kernels import random_layer
from kernel_bounds import random_input
from nunchaku_core.kernels import cpu_packing
from nunchaku_core.linear import SVDQuantLinear
M, N, K, R, prec = {M}, {N}, {K}, {R}, "{prec}"
m = SVDQuantLinear(random_layer(prec, N, K, R), backend="cpu")
x = random_input(M, K, False, torch.bfloat16)                 # x: [M, K] bf16
y, grow = measure(lambda: m(x))                               # the first call: the threads' blocks are grown in it
tail_equal = torch.equal(y[-17:], m(x[-17:].clone()))         # rows are independent: the last rows alone, bit for bit
del y
with tempfile.TemporaryDirectory() as d:
    torch_bytes = torch_peak_allocated(lambda: m(x), Path(d) / "trace.json")
T = torch.get_num_threads()
print(json.dumps(dict(grow=grow, torch_bytes=torch_bytes, threads=T, tail_equal=tail_equal,
                      bound=cpu_packing.cpu_w4a4_peak_bytes(M, N, K, R, prec, x.dtype),
                      blocks=T * cpu_packing.w4a4_block_bytes(M, K, prec))))
'''


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_cpu_w4a4_peak_within_bound(precision):
    r = run_child(_W4A4_CHILD.format(M=M_BIG, N=N_SMALL, K=K_SMALL, R=R, prec=precision))
    print(f"\ncpu {precision} M={M_BIG}: grew {_mib(r['grow'])}, torch {_mib(r['torch_bytes'])}, "
          f"bound {_mib(r['bound'])} ({r['threads']} threads)")
    assert r["tail_equal"]
    # every torch allocation of the call is one of the bound's terms: output, act, ascale, acorr, lora
    assert r["torch_bytes"] == r["bound"] - r["blocks"]
    assert r["grow"] <= r["bound"] + _slack(r["threads"])
    assert r["grow"] >= 0.9 * r["bound"]   # the measurement sees the call's buffers (they are 99 % of the bound)


_W4A16_CHILD = r'''
import json, tempfile, torch
from pathlib import Path
from peak_rss import measure, torch_peak_allocated
from test_cpu_kernels import random_w4a16
from nunchaku_core.kernels import cpu_packing
from nunchaku_core.linear import W4A16Linear
M, N, K, G = {M}, {N}, {K}, 64
m = W4A16Linear(random_w4a16(N, K, G), backend="cpu")
x = torch.randn(M, K, generator=torch.Generator().manual_seed(5)).bfloat16()
y, grow = measure(lambda: m(x))
tail_equal = torch.equal(y[-17:], m(x[-17:].clone()))
del y
with tempfile.TemporaryDirectory() as d:
    torch_bytes = torch_peak_allocated(lambda: m(x), Path(d) / "trace.json")
print(json.dumps(dict(grow=grow, torch_bytes=torch_bytes, threads=torch.get_num_threads(), tail_equal=tail_equal,
                      bound=cpu_packing.cpu_w4a16_peak_bytes(M, N, K, G, x.dtype))))
'''


def test_cpu_w4a16_peak_within_bound():
    r = run_child(_W4A16_CHILD.format(M=M_BIG, N=N_SMALL, K=K_SMALL))
    print(f"\ncpu w4a16 M={M_BIG}: grew {_mib(r['grow'])}, torch {_mib(r['torch_bytes'])}, bound {_mib(r['bound'])}")
    assert r["tail_equal"]
    assert r["torch_bytes"] == r["bound"]   # output, x widened to fp32, group sums
    assert r["grow"] <= r["bound"] + _slack(r["threads"])
    assert r["grow"] >= 0.9 * r["bound"]


_TILED_CHILD = r'''
import json, torch
from peak_rss import measure
from test_cpu_kernels import random_w4a16
from test_tiled import _big_layer
from nunchaku_core.kernels import tiled
from nunchaku_core.linear import SVDQuantLinear, W4A16Linear
M, N, K, R, kind = {M}, {N}, {K}, {R}, "{kind}"
if kind == "w4a16":
    m = W4A16Linear(random_w4a16(N, K, 64), backend="tiled")
else:
    m = SVDQuantLinear(_big_layer(kind, N, K, R), backend="tiled")
x = torch.randn(M, K, generator=torch.Generator().manual_seed(5)).bfloat16()
y, grow = measure(lambda: m(x))
print(json.dumps(dict(grow=grow, threads=torch.get_num_threads(), finite=bool(torch.isfinite(y).all()),
                      shape=list(y.shape), bound=tiled.tiled_peak_bytes(M, N, K, R, kind, x.dtype))))
'''


@pytest.mark.parametrize("kind", ["int4", "nvfp4", "w4a16"])
def test_tiled_peak_within_bound(kind):
    """The fallback at M = 200_000: its bound is dominated by the fp32 dequantized activations (4·M·K) and the
    output, not by the 64 MiB tile budget."""
    r = run_child(_TILED_CHILD.format(M=M_BIG, N=N_SMALL, K=K_SMALL, R=R, kind=kind))
    print(f"\ntiled {kind} M={M_BIG}: grew {_mib(r['grow'])}, bound {_mib(r['bound'])}")
    assert r["finite"] and r["shape"] == [M_BIG, N_SMALL]
    assert r["grow"] <= r["bound"] + _slack(r["threads"])


_OVERFLOW_CHILD = r'''
import json, torch
from nunchaku_core import backend
from nunchaku_core.kernels import cpu_packing
from test_cpu_kernels import random_layer
from kernel_bounds import random_input
_C = backend._C
K, N, B, blocks, prec = {K}, {N}, {B}, {blocks}, "{prec}"
M = B * blocks
layer = random_layer(prec, N, K, 0)
p = cpu_packing.pack_w4a4(layer)
isa = "{isa}"
quant = _C.quantize_act_int4_lowrank if prec == "int4" else _C.quantize_act_nvfp4_lowrank
q = quant(random_input(B, K, False, torch.bfloat16), p.smooth, None, False, isa)
act, ascale, acorr = q[0], q[1], q[2]                       # one block of B rows: act int8 [B, K]
want = _C.gemm_w4a4_int4(act, ascale, acorr, None, p.wcodes, p.wscales, p.proj_up, p.bias, N, torch.bfloat16, isa) \
    if prec == "int4" else _C.gemm_w4a4_nvfp4(act, ascale, acorr, None, p.wcodes, p.wscales, p.proj_up, p.bias,
                                              p.out_scale, N, torch.bfloat16, isa)
big = [torch.empty(M, *t.shape[1:], dtype=t.dtype) for t in (act, ascale, acorr)]
for t, small in zip(big, (act, ascale, acorr)):
    t.view(blocks, *small.shape).copy_(small.expand(blocks, *small.shape))   # the block repeated, no temporary
if prec == "int4":
    y = _C.gemm_w4a4_int4(*big, None, p.wcodes, p.wscales, p.proj_up, p.bias, N, torch.bfloat16, isa)
else:
    y = _C.gemm_w4a4_nvfp4(*big, None, p.wcodes, p.wscales, p.proj_up, p.bias, p.out_scale, N, torch.bfloat16, isa)
first_past = (2**31 + K - 1) // K                            # the first row whose act offset m·K passes 2^31
rows = y.view(blocks, B, N)
mismatched = [b for b in range(blocks) if not torch.equal(rows[b], want)]
print(json.dumps(dict(M=M, act_bytes=act.numel() // B * M, first_past=first_past, mismatched=mismatched[:10],
                      isa=isa)))
'''


@pytest.mark.parametrize("isa", ["ref", "avx2", "avx512vnni"])
def test_gemm_rows_past_int32_index(isa):
    """act int8 [M, K] with M·K > 2^31 (K = 256, M = 8_396_800: 2.15 GB of activation codes, ~2.7 GB in all), a
    4096-row block repeated: every output block must equal the block computed alone, bit for bit, including those
    past row 2^31 / K. The GEMM alone (not the whole layer): a bf16 x of that size would be 4.3 GB."""
    K, N, B = 256, 16, 4096
    blocks = -(-(2**31 // K + B) // B)        # one block more than reaches element 2^31
    need = blocks * B * (K + 8 * K // 64 + 2 * N)
    available = status_meminfo("MemAvailable")
    if available < 2 * need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB in one process and leaves room for the machine's other jobs: "
                    f"MemAvailable is {available / 2**30:.1f} GiB, under twice that")
    if not backend._C.cpu_isa_supported(isa):
        pytest.skip(f"this CPU has no {isa}")
    r = run_child(_OVERFLOW_CHILD.format(K=K, N=N, B=B, blocks=blocks, prec="int4", isa=isa))
    print(f"\ngemm int4 ({r['isa']}) M={r['M']} K={K}: act {r['act_bytes'] / 2**30:.2f} GiB, rows from "
          f"{r['first_past']} past element 2^31")
    assert r["act_bytes"] > 2**31 and r["M"] > r["first_past"]
    assert r["mismatched"] == []


def status_meminfo(key: str) -> int:
    """A line of /proc/meminfo in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/meminfo has no {key} line")
