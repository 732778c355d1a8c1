"""Memory of FLUX's text encoder in ComfyUI: 4-bit T5-XXL (our loader) vs 16-bit T5-XXL (ComfyUI's own).

Random weights at full T5-XXL shape (24 blocks, d_model 4096, d_ff 10240, 64 heads, vocab 32128; 4.76 B
parameters) plus a real-shaped random CLIP-L. The 4-bit T5 is written to a file in Nunchaku's format and
loaded by 'SVDQuant Text Encoder Loader' (nodes/text_encoder.py); the 16-bit one is ComfyUI's flux_clip built
in memory in fp16 with its stock ops and filled with random values (the same resident bytes as loading
t5xxl_fp16.safetensors, without writing a 9.5 GB file). Each side runs in its own process and reports:

  rss_model   resident set after loading minus before (the encoder itself, both text models); after_encode:
              the same after one CLIPTextEncode (layers that pack for their kernel at the first call grow here);
              rss_file: the file-backed part of the resident set (mapped safetensors pages) after loading
  rss_peak    peak resident set of the process (ru_maxrss) minus the baseline, while loading / after one
              CLIPTextEncode
  size        ComfyUI's own size of the model (ModelPatcher.model_size), what it reserves when loading
  load_s / encode_s   wall time to load / to encode one prompt (CPU, reference or compiled W4A16 kernel)

Usage (ComfyUI's python; needs ~3 GB of disk for the 4-bit file and ~11 GB of free RAM for the fp16 side):
    python bench/bench_t5_memory.py --comfyui /path/to/ComfyUI [--workdir DIR] [--sides int4,fp16] [--no-encode]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24)
PROMPT = "a red fox in a snowy birch forest at golden hour, photograph, shallow depth of field"


def write_clip_l(path: Path) -> None:
    """Random CLIP-L text model, fp16, HF names (as clip_l.safetensors): tests/flux_models.py's."""
    from safetensors.torch import save_file
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    import flux_models
    save_file(flux_models.clip_l_state_dict(), str(path))


def write_t5_int4(path: Path) -> None:
    """Random 4-bit T5-XXL, streamed layer by layer: random qweight words (uniform random bits are uniform
    uint4 codes), scales ~2e-3, scaled zeros -7.5·scale (weights uniform in about ±0.015)."""
    import torch
    sys.path.insert(0, str(REPO))
    from nunchaku_core.formats import nunchaku_t5 as nt
    cfg = nt.normalize_config(T5_XXL)
    linears = nt.linear_shapes(cfg)
    g = torch.Generator().manual_seed(0)
    with nt.T5Writer(str(path), cfg, linears, torch.bfloat16) as w:
        for key in w.order:
            name, suffix = key.rsplit(".", 1)
            if name in linears:
                if suffix == "qweight":
                    N, K = linears[name]
                    Gp = -(-K // 128 // 8) * 8
                    scales = (torch.rand(Gp, N, generator=g) * 2e-3 + 1e-3).to(torch.bfloat16)
                    w.put_packed(name, {"qweight": torch.randint(-2**15, 2**15, (N // 4, K), generator=g,
                                                                 dtype=torch.int16),
                                        "scales": scales, "scaled_zeros": (-7.5 * scales.float()).to(torch.bfloat16)})
            elif "norm" in key:
                w.put_tensor(key, torch.ones(nt.plain_shapes(cfg)[key]))
            else:
                w.put_tensor(key, torch.randn(nt.plain_shapes(cfg)[key], generator=g))


PROBE = r"""
import importlib.util, json, resource, sys, time
comfyui, repo, mode, t5, clip_l, prompt = sys.argv[1:7]
sys.path.insert(0, comfyui)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import gc, psutil, torch
import nodes, comfy.sd, comfy.text_encoders.flux, comfy.utils
spec = importlib.util.spec_from_file_location("ComfyUI-SVDQuant", repo + "/__init__.py")
pack = importlib.util.module_from_spec(spec); sys.modules["ComfyUI-SVDQuant"] = pack; spec.loader.exec_module(pack)
te = sys.modules["ComfyUI-SVDQuant.nodes.text_encoder"]
ops = sys.modules["ComfyUI-SVDQuant.nodes.ops"]
proc = psutil.Process()
gc.collect(); rss0 = proc.memory_info().rss; peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.time()
if mode == "int4":
    clip = te.load_text_encoder(t5, clip_l)
else:
    class Target:
        clip = comfy.text_encoders.flux.flux_clip(dtype_t5=torch.float16)
        tokenizer = comfy.text_encoders.flux.FluxTokenizer
        params = {}
    clip = comfy.sd.CLIP(Target, model_options={"dtype": torch.float16})
    clip.load_sd(comfy.utils.load_torch_file(clip_l, safe_load=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in clip.cond_stage_model.t5xxl.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))
load_s = time.time() - t0
gc.collect(); rss1 = proc.memory_info().rss
peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
out = {"mode": mode, "rss_model": rss1 - rss0, "rss_file": proc.memory_info().shared,
       "rss_peak_load": peak_load, "size": clip.patcher.model_size(),
       "load_s": load_s,
       "t5_quantized_bytes": ops.quantized_nbytes(clip.cond_stage_model),
       "t5_state_dict_bytes": comfy.model_management.module_size(clip.cond_stage_model.t5xxl),
       "clip_l_bytes": comfy.model_management.module_size(clip.cond_stage_model.clip_l)}
if prompt:
    t0 = time.time()
    (cond,) = nodes.CLIPTextEncode().encode(clip, prompt)
    out["encode_s"] = time.time() - t0
    gc.collect(); out["rss_after_encode"] = proc.memory_info().rss - rss0
    out["cond_shape"] = list(cond[0][0].shape)
out["rss_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
print("RESULT " + json.dumps(out))
"""


def run(comfyui: str, mode: str, t5: Path, clip_l: Path, encode: bool) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, comfyui, str(REPO), mode, str(t5), str(clip_l),
                        PROMPT if encode else ""], capture_output=True, text=True, cwd=comfyui)
    if r.returncode != 0:
        raise SystemExit(f"{mode} probe failed:\n{r.stderr[-4000:]}")
    return json.loads([line for line in r.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", required=True, help="ComfyUI checkout (run this script with its python)")
    p.add_argument("--workdir", help="where the random model files go (default: a temp dir, removed after)")
    p.add_argument("--sides", default="int4,fp16", help="which to measure (default %(default)s; fp16 needs "
                                                        "~11 GB of free RAM)")
    p.add_argument("--no-encode", action="store_true", help="only load, do not run CLIPTextEncode")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        d = Path(d)
        t0 = time.time()
        write_clip_l(d / "clip_l.safetensors")
        if "int4" in args.sides:
            write_t5_int4(d / "t5xxl_int4.safetensors")
            print(f"wrote random models in {time.time() - t0:.0f} s; 4-bit T5-XXL file "
                  f"{(d / 't5xxl_int4.safetensors').stat().st_size / 2**30:.2f} GiB")
        results = []
        if "int4" in args.sides:
            results.append(run(args.comfyui, "int4", d / "t5xxl_int4.safetensors", d / "clip_l.safetensors",
                               not args.no_encode))
        if "fp16" in args.sides:
            import psutil
            free = psutil.virtual_memory().available / 2**30
            if free < 14:
                print(f"skipping the fp16 side: {free:.1f} GiB available, it needs ~11 GiB plus headroom")
            else:
                results.append(run(args.comfyui, "fp16", d / "t5xxl_int4.safetensors", d / "clip_l.safetensors",
                                   not args.no_encode))
    gib = 2 ** 30
    print("| T5-XXL | rss_model (file-backed) GiB | after encode GiB | peak load / encode GiB | ComfyUI size GiB | "
          "4-bit T5 linears GiB | load s | encode s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['rss_model'] / gib:.2f} ({r['rss_file'] / gib:.2f}) | "
              f"{r.get('rss_after_encode', float('nan')) / gib:.2f} | "
              f"{r['rss_peak_load'] / gib:.2f} / {r['rss_peak'] / gib:.2f} | "
              f"{r['size'] / gib:.2f} | "
              f"{r['t5_quantized_bytes'] / gib:.2f} | {r['load_s']:.1f} | {r.get('encode_s', float('nan')):.1f} |")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
