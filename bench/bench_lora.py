"""Sampling with a rank-16 LoRA vs without, on the FLUX-width model, through a real ComfyUI.

    .venv/bin/python bench/bench_lora.py [--size 256] [--steps 1,5] [--lora-rank 16]

Model: the demo's random FLUX-width model (hidden 3072, 1 double + 1 single block), INT4 rank 32 through our
loader. LoRA: rank 16 on every Linear of the blocks (kohya keys; attention, MLP and modulation), through ComfyUI's
stock LoraLoaderModelOnly. What a LoRA should cost is what its extra rank costs, so the reference is the same
model quantized at rank 32 + 16 = 48 with no LoRA (same 4-bit work, a rank-48 branch). Also ComfyUI's default
path (the unquantized model, stock LoRA merge) for comparison.

Per configuration, on one warm server: a first 1-step prompt (loads the model, applies the LoRA), then --repeats
pairs of 1-step and N-step prompts that reuse the loaded, patched model; per-step time is the median of their
difference / (N − 1). Then a strength change (a new LoraLoader output on the same file). "LoRA joins s": the time
our ModelPatcher spent joining the LoRA into the quantized layers at each load, from the server log (the first
load, then the strength change).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("svdq_demo", REPO / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)
sys.path.insert(0, str(REPO / "tests"))
import lora_files  # noqa: E402


def with_lora(g: dict, lora: str | None, strength: float) -> dict:
    if lora is None:
        return g
    g = {k: {**v, "inputs": dict(v["inputs"])} for k, v in g.items()}
    g["20"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                              "strength_model": strength}}
    g["4"]["inputs"]["model"] = ["20", 0]
    return g


def ksampler_time(srv, g) -> float:
    times, _ = asyncio.run(demo.run_graph(srv.url, g, on_node=lambda node: setattr(srv, "node", node)))
    return times.get("4", 0.0) + times.get("20", 0.0)


def measure(comfy: Path, work: Path, loader: dict, lora: str | None, size: int, steps: tuple[int, int],
            repeats: int) -> dict:
    s1, s2 = steps
    seed = iter(range(1, 1000))
    with demo.Server(comfy, work, demo.free_port()) as srv:
        run = lambda n, strength=1.0: ksampler_time(  # noqa: E731
            srv, with_lora(demo.graph(loader, size, n, next(seed), "b"), lora, strength))
        run(s1)                                           # load the model and apply the LoRA
        per_step = []
        for _ in range(repeats):
            one, many = run(s1), run(s2)
            per_step.append((many - one) / (s2 - s1))
        if lora is not None:
            run(s1, 0.5)                                  # a strength change: the LoRA is joined again
        joins = [float(m) for m in re.findall(r"SVDQuant LoRA: \d+ quantized Linears rebuilt, \d+ reused, in "
                                               r"([0-9.]+) s", srv.log_path.read_text())]
        return {"per_step": statistics.median(per_step), "spread": (min(per_step), max(per_step)), "joins": joins}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("SVDQ_COMFYUI", str(REPO / ".comfyui" / "ComfyUI")))
    ap.add_argument("--work", default=str(REPO / "out" / "bench_e2e"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", default="1,5")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--skip-default", action="store_true", help="skip ComfyUI's default path (unquantized)")
    ap.add_argument("--repeats", type=int, default=3, help="per-step measurements per configuration (median)")
    a = ap.parse_args()
    comfy, work = Path(a.comfyui).resolve(), Path(a.work).resolve()
    steps = tuple(int(s) for s in a.steps.split(","))
    original, q32 = demo.make_models(work / "models", 32)
    _, q48 = demo.make_models(work / "models", 32 + a.lora_rank)
    loras = work / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    lora = f"bench_flux3072_r{a.lora_rank}.safetensors"
    if not (loras / lora).exists():
        from safetensors.torch import save_file
        sd, _ = lora_files.kohya(3072, 1, 1, rank=a.lora_rank, std=0.004, seed=7,
                                 only=lambda n: n.startswith(("double_blocks", "single_blocks")))
        save_file(sd, str(loras / lora))
    ours = lambda p: {"class_type": "SVDQuantFluxLoader", "inputs": {"model_name": p.name, "weight_dtype": "default"}}  # noqa: E731
    stock = {"class_type": "UNETLoader", "inputs": {"unet_name": original.name, "weight_dtype": "default"}}
    configs = [("int4 r32", ours(q32), None), (f"int4 r32 + LoRA r{a.lora_rank}", ours(q32), lora),
               (f"int4 r{32 + a.lora_rank}", ours(q48), None)]
    if not a.skip_default:
        configs += [("default (unquantized)", stock, None), (f"default + LoRA r{a.lora_rank}", stock, lora)]
    rows = {}
    for label, loader, lr in configs:
        t = time.monotonic()
        rows[label] = measure(comfy, work, loader, lr, a.size, steps, a.repeats)
        print(f"measured {label} in {time.monotonic() - t:.0f} s", flush=True)
    print(f"\nFLUX-width model (hidden 3072, 1 double + 1 single block), {a.size}x{a.size}, euler, CPU; per step from "
          f"{steps[0]} vs {steps[1]} steps; one run")
    print(f"{'':<26} {'s/step (median)':>15} {'min..max':>14} {'LoRA joins s':>14}")
    for label, r in rows.items():
        joins = ", ".join(f"{j:.3f}" for j in r["joins"]) if r["joins"] else "-"
        print(f"{label:<26} {r['per_step']:>15.3f} {r['spread'][0]:>6.3f}..{r['spread'][1]:<6.3f} {joins:>14}")
    base, lo, r48 = rows["int4 r32"], rows[f"int4 r32 + LoRA r{a.lora_rank}"], rows[f"int4 r{32 + a.lora_rank}"]
    print(f"LoRA cost per step: {lo['per_step'] / base['per_step']:.3f}x of no LoRA; a rank-{32 + a.lora_rank} model "
          f"without LoRA: {r48['per_step'] / base['per_step']:.3f}x (what the extra rank implies)")


if __name__ == "__main__":
    sys.exit(main())
