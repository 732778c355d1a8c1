"""End to end through a real ComfyUI: one sampling step of the FLUX-width model (hidden 3072, 1 double + 1
single block), SVDQuant INT4 with our loader and kernels vs the same weights unquantized through ComfyUI's
default CPU path (UNETLoader, ComfyUI upcasts bf16 to fp32 on the CPU). Both measured in the same run.

    .venv/bin/python bench/bench_e2e.py [--size 256] [--steps 1,5]

Per-step time = (KSampler time at the larger step count − at the smaller) / (difference), each in its own
prompt on the same warm server, so model loading and first-call packing are not counted. Model memory = server
RSS after the loader ran minus RSS before the prompt (what the loaded model keeps resident), plus ComfyUI's own
accounting (ModelPatcher.model_size, logged by ComfyUI when it loads the model to the device).
Reuses scripts/demo.py's model builder, server wrapper and graph.
"""
from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("svdq_demo", REPO / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)

GB = 1024 ** 3


def measure(comfy: Path, work: Path, loader: dict, size: int, steps: tuple[int, int]) -> dict:
    with demo.Server(comfy, work, demo.free_port()) as srv:
        idle = srv.rss()
        sample = {}
        for i, n in enumerate(steps):
            g = demo.graph(loader, size, n, seed=100 + i, prefix=f"bench{n}")
            times, _ = asyncio.run(demo.run_graph(srv.url, g, on_node=lambda node: setattr(srv, "node", node)))
            sample[n] = times.get("4", 0.0)
            if i == 0:
                loaded = srv.rss()
                load_time = times.get("1", 0.0)
        per_step = (sample[steps[1]] - sample[steps[0]]) / (steps[1] - steps[0])
        return {"per_step": per_step, "load": load_time, "model_rss": loaded - idle, "peak": max(srv.peaks.values()),
                "idle": idle}


def main():
    ap = demo.argument_parser(__doc__, "bench_e2e")
    ap.add_argument("--steps", default="1,5", help="two step counts; the per-step time is their difference")
    ap.add_argument("--rank", type=int, default=32)
    a = ap.parse_args()
    comfy, work = Path(a.comfyui).resolve(), Path(a.work).resolve()
    s1, s2 = (int(s) for s in a.steps.split(","))
    original, quantized = demo.make_models(work / "models", a.rank)
    rows = {}
    for label, loader in (
        ("SVDQuant int4 (ours)", {"class_type": "SVDQuantFluxLoader",
                                  "inputs": {"model_name": quantized.name, "weight_dtype": "default"}}),
        ("ComfyUI default", {"class_type": "UNETLoader", "inputs": {"unet_name": original.name, "weight_dtype": "default"}}),
    ):
        t = time.monotonic()
        rows[label] = measure(comfy, work, loader, a.size, (s1, s2))
        print(f"measured {label} in {time.monotonic() - t:.0f} s", flush=True)
    ours, base = rows["SVDQuant int4 (ours)"], rows["ComfyUI default"]
    print()
    print(f"FLUX-width model (hidden 3072, 1 double + 1 single block), {a.size}x{a.size} latent, euler, CPU, "
          f"per step from {s1} vs {s2} steps")
    print(f"{'':<22} {'s/step':>8} {'load s':>8} {'model RSS':>10} {'peak RSS':>9}")
    for label, r in rows.items():
        print(f"{label:<22} {r['per_step']:>8.3f} {r['load']:>8.2f} {r['model_rss'] / GB:>7.2f} GB {r['peak'] / GB:>6.2f} GB")
    print(f"speed-up per step: {base['per_step'] / ours['per_step']:.2f}x   "
          f"model memory ratio (ours / default): {ours['model_rss'] / base['model_rss']:.2f}   "
          f"peak RSS ratio: {ours['peak'] / base['peak']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
