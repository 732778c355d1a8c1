"""Quantization time and peak memory for full-width FLUX.1 blocks (hidden 3072), extrapolated to FLUX.1-dev.

Builds a random bf16 FLUX.1 file with the real FLUX.1-dev widths (hidden 3072, MLP 12288, T5 context 4096,
CLIP vector 768, guidance) but only `--depth` double and `--depth-single` single blocks, quantizes it in
a fresh child process (so its peak RSS is the quantizer's alone) and reports:
  - seconds per double block and per single block (from the progress callback's timestamps),
  - the child's CPU seconds and peak RSS (VmHWM: getrusage's ru_maxrss would carry over the parent's peak
    through fork + exec), the output size and the source block sizes,
  - FLUX.1-dev (19 double + 38 single blocks): 19·t_double + 38·t_single + the rest, and peak RSS as
    baseline + FLUX.1-dev output size + the measured per-block working set,
  - the machine's load average, because the 2 cores may be shared.

    python bench/bench_quantize.py [--precision int4[,nvfp4]] [--no-report] [--depth 1 --depth-single 1]
    python bench/bench_quantize.py --precision int4,nvfp4 --report both --baseline ../other-checkout --repeats 2

`--baseline DIR` runs the same measurements with DIR's nunchaku_core (another checkout, e.g. the previous
commit) interleaved with this checkout's, on the same model file, and prints this checkout's times over the
baseline's: on a shared machine only such same-run ratios say what a change did. Every run is appended to
bench/results/bench_quantize.jsonl with the commit of the code it ran.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEV_DOUBLE, DEV_SINGLE = 19, 38

RUNNER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
try:
    from nunchaku_core.quantize.flux import QuantizeOptions, quantize_flux
    from nunchaku_core.models.flux_source import SafetensorsFile
except ImportError:                      # a --baseline checkout from before nunchaku_core got its rooms
    from nunchaku_core.quantize_flux import QuantizeOptions, quantize_flux
    from nunchaku_core.flux_source import SafetensorsFile

def output_parts(path):
    f = SafetensorsFile(__import__("pathlib").Path(path))
    parts = {"double": 0, "single": 0, "rest": 0}
    for k, e in f.entries.items():
        n = e["data_offsets"][1] - e["data_offsets"][0]
        kind = "double" if k.startswith("transformer_blocks.") else "single" if k.startswith("single_") else "rest"
        parts[kind] += n
    return parts

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def rss():
    return status("VmRSS")
src, out, precision, rank, report = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6] == "1"
if int(sys.argv[7]) > 0:
    torch.set_num_threads(int(sys.argv[7]))
base = rss()
marks = []
t0 = time.perf_counter(); c0 = time.process_time()
res = quantize_flux(src, out, options=QuantizeOptions(precision=precision, rank=rank, report=report),
                    progress=lambda d, t, what: marks.append((time.perf_counter() - t0, what)))
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "cpu": time.process_time() - c0, "peak_rss": status("VmHWM"),
                  "base_rss": base, "marks": marks, "threads": torch.get_num_threads(),
                  "output_bytes": os.path.getsize(out), "output_parts": output_parts(out)}))
"""


def make_model(path: Path, depth: int, depth_single: int) -> dict:
    """Random bf16 FLUX.1 with dev's widths. Weights N(0, 1/K) with a few 10x input channels (trained FLUX
    linears have outlier columns); the values do not change the work done, only the chosen α."""
    import torch
    from safetensors.torch import save_file

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from flux_models import flux_shapes

    g = torch.Generator().manual_seed(0)
    shapes = flux_shapes(3072, depth, depth_single, 4096, 768, True)
    sd = {}
    for k, shape in shapes.items():
        if len(shape) == 2:
            w = torch.randn(shape, generator=g) / shape[1] ** 0.5
            w[:, torch.randint(0, shape[1], (8,), generator=g)] *= 10
        else:
            w = torch.randn(shape, generator=g) * 0.02 + (1.0 if k.endswith(".scale") else 0.0)
        sd[k] = w.to(torch.bfloat16)
    save_file(sd, str(path))
    block_bytes = {kind: sum(t.numel() * 2 for k, t in sd.items() if k.startswith(f"{kind}_blocks.0."))
                   for kind in ("double", "single")}
    return {"source_bytes": path.stat().st_size, "block_bytes": block_bytes}


def block_seconds(marks: list) -> dict:
    """Per block kind: seconds from the previous layer's mark to this block's last layer mark."""
    spans: dict = {}
    prev = 0.0
    for t, what in marks:
        kind = "double" if what.startswith("transformer_blocks.") else "single" if what.startswith("single_") else "rest"
        spans.setdefault(kind, []).append(t - prev)
        prev = t
    return {k: sum(v) for k, v in spans.items()}


def commit_of(root: Path) -> str:
    """Short commit of a checkout, "+dirty" when it has uncommitted changes to tracked files."""
    def git(*a):
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def measure(code: Path, src: Path, out: Path, info: dict, args, precision: str, report: bool) -> dict:
    """One quantization of src in a child process running `code`'s nunchaku_core; the jsonl row."""
    load0 = os.getloadavg()
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(code), str(src), str(out), precision,
                           str(args.rank), "1" if report else "0", str(args.threads)],
                          capture_output=True, text=True, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    load1 = os.getloadavg()
    out.unlink()
    out.with_name(out.name.rsplit(".safetensors", 1)[0] + ".quality.json").unlink(missing_ok=True)

    secs = block_seconds(r["marks"])
    t_double, t_single = secs["double"] / args.depth, secs["single"] / args.depth_single
    cpu_share = r["cpu"] / r["wall"]
    parts = r["output_parts"]
    quant_bytes = r["output_bytes"]
    # FLUX.1-dev has the same unquantized tensors (embedders, final layer) as this file, since the widths are
    # dev's: its output is this file's rest + 19 double + 38 single quantized blocks
    dev_output = (parts["rest"] + DEV_DOUBLE * parts["double"] / args.depth
                  + DEV_SINGLE * parts["single"] / args.depth_single)
    dev_seconds = DEV_DOUBLE * t_double + DEV_SINGLE * t_single + secs.get("rest", 0.0)
    working_set = r["peak_rss"] - r["base_rss"] - quant_bytes
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit_of(code), "baseline": code != ROOT,
        "precision": precision, "rank": args.rank,
        "report": report, "depth": args.depth, "depth_single": args.depth_single,
        "threads": r["threads"], "loadavg_before": load0, "loadavg_after": load1,
        "wall_s": round(r["wall"], 1), "cpu_s": round(r["cpu"], 1), "cpu_share": round(cpu_share, 2),
        "t_double_s": round(t_double, 1), "t_single_s": round(t_single, 1), "t_rest_s": round(secs.get("rest", 0.0), 1),
        "source_bytes": info["source_bytes"], "source_block_bytes": info["block_bytes"], "output_bytes": quant_bytes,
        "output_parts": parts,
        "peak_rss": r["peak_rss"], "base_rss": r["base_rss"], "working_set_bytes": working_set,
        "dev_extrapolated_s": round(dev_seconds), "dev_extrapolated_min": round(dev_seconds / 60, 1),
        # on an idle machine the process would get its cores: wall ≈ cpu / threads (a lower bound: it assumes
        # the CPU time measured under load has no extra spinning)
        "dev_extrapolated_idle_min": round(dev_seconds * cpu_share / r["threads"] / 60, 1),
        "dev_output_bytes": round(dev_output), "dev_peak_rss_bytes": round(r["base_rss"] + dev_output + working_set),
        "dev_bound_bytes": round(dev_output + 2 * info["block_bytes"]["double"]),
    }


def describe(row: dict) -> str:
    gib = 2 ** 30
    return (f"{row['precision']} rank {row['rank']} {'with' if row['report'] else 'without'} quality report, "
            f"{row['commit']}{' (baseline)' if row['baseline'] else ''}, {row['threads']} threads, load average "
            f"{row['loadavg_before'][0]:.1f} -> {row['loadavg_after'][0]:.1f}\n"
            f"  measured: double block {row['t_double_s']:.1f} s, single block {row['t_single_s']:.1f} s, rest "
            f"{row['t_rest_s']:.1f} s; wall {row['wall_s']:.0f} s, CPU {row['cpu_s']:.0f} s ({row['cpu_share']:.2f} cores)\n"
            f"  memory: peak RSS {row['peak_rss'] / gib:.2f} GiB = base {row['base_rss'] / gib:.2f} + output "
            f"{row['output_bytes'] / gib:.2f} + working set {row['working_set_bytes'] / gib:.2f} GiB "
            f"(one source double block is {row['source_block_bytes']['double'] / gib:.2f} GiB)\n"
            f"  FLUX.1-dev: {row['dev_extrapolated_min']:.1f} min at this load ({row['dev_extrapolated_idle_min']} min "
            f"with the cores to itself), output {row['dev_output_bytes'] / gib:.2f} GiB, peak RSS "
            f"{row['dev_peak_rss_bytes'] / gib:.2f} GiB (bound output + 2 blocks = {row['dev_bound_bytes'] / gib:.2f} GiB)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="int4", help="int4, nvfp4 or both comma-separated")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--no-report", action="store_true", help="without the quality report (default: with)")
    ap.add_argument("--report", choices=("yes", "no", "both"), default=None, help="overrides --no-report")
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--depth-single", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the child (default: torch's)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another checkout whose nunchaku_core runs interleaved with this one's")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="where the ~1 GB model and the output go (default: a temp dir)")
    args = ap.parse_args()
    precisions = args.precision.split(",")
    if any(p not in ("int4", "nvfp4") for p in precisions):
        ap.error(f"--precision {args.precision!r}: expected int4, nvfp4 or int4,nvfp4")
    report = args.report or ("no" if args.no_report else "yes")
    reports = {"yes": [True], "no": [False], "both": [False, True]}[report]
    codes = [ROOT] + ([args.baseline.resolve()] if args.baseline else [])
    if args.baseline and not any((args.baseline / "nunchaku_core" / f).exists()
                                 for f in ("quantize/flux.py", "quantize_flux.py")):
        ap.error(f"--baseline {args.baseline}: no nunchaku_core/quantize/flux.py there; pass a checkout of this repository")

    res_dir = ROOT / "bench" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        src, out = Path(d) / "flux-fullwidth.safetensors", Path(d) / "out.safetensors"
        info = make_model(src, args.depth, args.depth_single)
        for _ in range(args.repeats):
            for precision in precisions:
                for rep in reports:
                    # alternate which code goes first, so a load drift does not always hit the same one
                    order = codes if len(rows) % 2 == 0 else codes[::-1]
                    for code in order:
                        row = measure(code, src, out, info, args, precision, rep)
                        rows.append(row)
                        with open(res_dir / "bench_quantize.jsonl", "a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(describe(row), flush=True)
    if args.baseline:
        print("\nthis checkout's time / the baseline's, per pair measured back to back (wall; CPU):")
        for precision in precisions:
            for rep in reports:
                new = [r for r in rows if r["precision"] == precision and r["report"] == rep and not r["baseline"]]
                old = [r for r in rows if r["precision"] == precision and r["report"] == rep and r["baseline"]]
                pairs = ", ".join(f"{n['wall_s'] / o['wall_s']:.2f}; {n['cpu_s'] / o['cpu_s']:.2f}" for n, o in zip(new, old))
                print(f"  {precision} {'report' if rep else 'no report'}: {pairs}; FLUX.1-dev min (new vs baseline): "
                      f"{min(r['dev_extrapolated_min'] for r in new)} vs {min(r['dev_extrapolated_min'] for r in old)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
