"""Sampling with a rank-16 LoRA vs without, on the FLUX-width model, through a real ComfyUI.

    .venv/bin/python bench/bench_lora.py [--size 256] [--steps 1,5] [--repeats 5] [--lora-rank 16]

Model: the demo's random FLUX-width model (hidden 3072, 1 double + 1 single block), INT4 rank 32 through our
loader. LoRA: rank 16 on every Linear of the blocks (kohya keys; attention, MLP and modulation), through ComfyUI's
stock LoraLoaderModelOnly. What a LoRA should cost is what its extra rank costs, so the reference is the same
model quantized at rank 32 + 16 = 48 with no LoRA (same 4-bit work, a rank-48 branch). Also ComfyUI's default
path (the unquantized model, stock LoRA merge) for comparison.

All configurations on one server, interleaved round by round (machine load drifts hit them alike). Per
configuration and round: a warm-up 1-step prompt (switches the model in, joins its LoRA), then a 1-step and a
5-step prompt; per-step time = (median 5-step − median 1-step KSampler time) / 4. Then a strength change (a new
LoraLoader output on the same file). "LoRA joins": what our ModelPatcher logged at each load (layers rebuilt,
layers reused, seconds), from the server log.
"""
from __future__ import annotations

import asyncio
import importlib.util
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
    return times.get("4", 0.0)


def measure(comfy: Path, work: Path, configs: list, size: int, steps: tuple[int, int], repeats: int) -> dict:
    """All configurations on one server, round-robin (each round: every configuration once), so a change of
    machine load hits them alike. Per configuration and round: a warm-up 1-step prompt (switches the model in,
    joins its LoRA), then a short and a long prompt; per-step time = (median long − median short) / (difference
    in steps)."""
    s1, s2 = steps
    seed = iter(range(1, 100000))
    short, long_ = ({label: [] for label, _, _ in configs} for _ in range(2))
    with demo.Server(comfy, work, demo.free_port()) as srv:
        def run(loader, lora, n, strength=1.0):
            return ksampler_time(srv, with_lora(demo.graph(loader, size, n, next(seed), "b"), lora, strength))

        for r in range(repeats):
            for label, loader, lora in configs:
                run(loader, lora, 1)
                short[label].append(run(loader, lora, s1))
                long_[label].append(run(loader, lora, s2))
            print(f"round {r + 1}/{repeats}: " + ", ".join(
                f"{k} {(long_[k][-1] - short[k][-1]) / (s2 - s1):.3f}" for k in short), flush=True)
        lora_cfg = next(c for c in configs if c[2] is not None)
        run(lora_cfg[1], lora_cfg[2], 1, 0.5)             # a strength change: the LoRA is joined again
        joins = re.findall(r"SVDQuant LoRA: (\d+) quantized Linears rebuilt, (\d+) reused, in ([0-9.]+) s",
                           srv.log_path.read_text())
    per_round = {k: [(b - a) / (s2 - s1) for a, b in zip(short[k], long_[k])] for k in short}
    return {"per_step": {k: (statistics.median(long_[k]) - statistics.median(short[k])) / (s2 - s1) for k in short},
            "spread": {k: (min(v), max(v)) for k, v in per_round.items()},
            "joins": [(int(a), int(b), float(c)) for a, b, c in joins]}


def main():
    ap = demo.argument_parser(__doc__, "bench_e2e")
    ap.add_argument("--steps", default="1,5", help="short,long step counts; per step = their time difference")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--skip-default", action="store_true", help="skip ComfyUI's default path (unquantized)")
    ap.add_argument("--repeats", type=int, default=5, help="per-step measurements per configuration (median)")
    a = ap.parse_args()
    comfy, work = Path(a.comfyui).resolve(), Path(a.work).resolve()
    steps = tuple(int(x) for x in a.steps.split(","))
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
    t = time.monotonic()
    res = measure(comfy, work, configs, a.size, steps, a.repeats)
    print(f"measured in {time.monotonic() - t:.0f} s")
    print(f"\nFLUX-width model (hidden 3072, 1 double + 1 single block), {a.size}x{a.size}, euler, CPU; per step: (median "
          f"{steps[1]}-step − median {steps[0]}-step KSampler time) / {steps[1] - steps[0]} over {a.repeats} rounds "
          f"(configurations interleaved on one server); min..max: the same per round")
    print(f"{'':<26} {'s/step':>8} {'min..max':>14} {'vs int4 r32':>12}")
    base = res["per_step"]["int4 r32"]
    for label, v in res["per_step"].items():
        lo, hi = res["spread"][label]
        print(f"{label:<26} {v:>8.3f} {lo:>6.3f}..{hi:<6.3f} {v / base:>11.3f}x")
    lo = res["per_step"][f"int4 r32 + LoRA r{a.lora_rank}"]
    r48 = res["per_step"][f"int4 r{32 + a.lora_rank}"]
    print(f"LoRA cost per step: {lo / base:.3f}x of no LoRA; a rank-{32 + a.lora_rank} model without LoRA: "
          f"{r48 / base:.3f}x (what the extra rank implies)")
    j = res["joins"]
    if j:
        print(f"LoRA joins (rebuilt, reused, s): first load {j[0]}, later loads {j[1:-1] if len(j) > 2 else '-'}, "
              f"after the strength change {j[-1]}")


if __name__ == "__main__":
    sys.exit(main())
