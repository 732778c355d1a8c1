"""Per family, on the tiny random models the tests use: how close the quantized diffusion model's output is to
the unquantized model's (SNR in dB, tests/model_quality.py), for naive W4A4 (no smoothing, no low-rank branch),
smoothing only, SVDQuant INT4 rank 32, and NVFP4 SVDQuant rank 32 where the quantizer writes it (FLUX.1, into
Nunchaku's format), next to the null model's threshold for the SVDQuant INT4 file (μ − 3s of NULL_DRAWS draws).
ComfyUI in this process ($SVDQ_COMFYUI, default .comfyui/ComfyUI), CPU.

    SVDQ_COMFYUI=.comfyui/0.33.0/ComfyUI .comfyui/0.33.0/venv/bin/python bench/bench_family_quality.py
    python bench/bench_family_quality.py --families flux2,qwen_image --out /tmp/q.md

Variants (nunchaku_core.quantize.flux.QuantizeOptions, data-free; the any-family quantizer is INT4 only):
  naive      rank 0, alphas (1.0,): s = 1 and no low-rank branch, plain RTN W4A4 with per-group scales
  smooth     rank 0, the default α grid (the quantizer keeps s = 1 where no α beats it)
  svdquant   rank 32, the default α grid
  nvfp4      as svdquant in NVFP4 (FLUX.1 only: quantize_flux; quantize_model writes ComfyUI's INT4 layout)
Models: FLUX.1 hidden 3072 (1 double + 1 single block, ComfyUI fixes 24 heads) through quantize_flux; Qwen-Image,
Z-Image (tests/family_models.py dims) and FLUX.2 (hidden 1024 where the width is free, 1 double + 1 single block)
through quantize_model; SD3, Chroma, PixArt-Sigma, Wan 2.1 / 2.2 T2V and SDXL at the dims and weight std of
tests/comfy/test_family_quantized.py (PAPER_DIMS, PAPER_STD). --append adds this run's tables after the file's
existing ones instead of replacing them. FLUX.2 on a host that
forces hidden 6144 (0.3.75) is 2.2 G parameters, four quantizations of it take most of an hour on 2 cores: left
out there unless --big-flux2.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "comfy")]
os.environ.setdefault("SVDQ_COMFYUI", str(ROOT / ".comfyui" / "ComfyUI"))

import family_models as fm  # noqa: E402
import model_quality as mq  # noqa: E402
from flux_models import write_flux_bfl  # noqa: E402
from nunchaku_core.quantize.flux import QuantizeOptions, quantize_flux  # noqa: E402
from nunchaku_core.quantize.model import quantize_model  # noqa: E402

FAMILIES = ("flux", "qwen_image", "zimage", "flux2", "sd3", "chroma", "pixart_sigma", "wan21_t2v", "wan22_t2v", "sdxl")
RANK = 32
NULL_DRAWS = 4
VARIANTS = {
    "naive": dict(precision="int4", rank=0, alphas=(1.0,)),
    "smooth": dict(precision="int4", rank=0),
    "svdquant": dict(precision="int4", rank=RANK),
    "nvfp4": dict(precision="nvfp4", rank=RANK),
}
LABEL = {"naive": "naive W4A4 (rank 0, no smoothing)", "smooth": "smoothing only (rank 0)",
         "svdquant": f"SVDQuant INT4 (rank {RANK})", "nvfp4": f"SVDQuant NVFP4 (rank {RANK})"}


def write_source(family: str, path: Path, big_flux2: bool) -> dict:
    """The unquantized file (bf16, seed 5 as tests/comfy/test_family_quantized.py); returns its dims."""
    if family == "flux":
        write_flux_bfl(path, hidden=3072, depth=1, depth_single=1, seed=0)
        return {"hidden": 3072, "depth": 1, "depth_single": 1}
    from test_family_models import family_dims
    import test_family_quantized as tq
    if family in tq.PAPER_DIMS:
        dims = tq._dims(family)
        fm.write_random_model(family, path, seed=5, std=tq.PAPER_STD.get(family, 0.02), **dims)
        return {**dims, "std": tq.PAPER_STD.get(family, 0.02)}
    dims = family_dims(family)
    if family == "flux2" and dims["hidden"] == fm.FLUX2_HIDDEN_0375:
        if not big_flux2:
            return {}
        dims = {"hidden": fm.FLUX2_HIDDEN_0375, "depth_single": 1}
    elif family == "flux2":       # free width: 1024 as tests/comfy/test_family_quantized.py (WIDE_FLUX2 says why)
        dims = {"hidden": 8 * fm.FLUX2_HEAD_DIM, "depth_single": 1}
    fm.write_random_model(family, path, seed=5, **dims)
    return dims


def quantize(family: str, src: Path, out: Path, variant: str) -> float:
    t0 = time.perf_counter()
    options = QuantizeOptions(report=False, **VARIANTS[variant])
    (quantize_flux if family == "flux" else quantize_model)(src, out, options=options)
    return time.perf_counter() - t0


def measure_family(family: str, work: Path, big_flux2: bool) -> dict:
    from comfy_inprocess import pack_module
    loader, ops = pack_module("loader"), pack_module("ops")     # first: puts ComfyUI's `comfy` on sys.path
    import comfy.model_management as mm
    import comfy.sd
    src = work / f"{family}.safetensors"
    dims = write_source(family, src, big_flux2)
    if not dims and family == "flux2":
        return {"family": family, "skipped": "this host forces FLUX.2 hidden 6144 (2.2 G parameters); --big-flux2"}
    dense = comfy.sd.load_diffusion_model(str(src), model_options={"dtype": torch.bfloat16})
    mm.load_models_gpu([dense])
    inputs = mq.fixed_inputs(dense.model, family)
    f_d = mq.model_output(dense, inputs)
    rows, null = {}, None
    for variant in VARIANTS:
        if variant == "nvfp4" and family != "flux":
            continue
        q = work / f"{family}_{variant}.safetensors"
        seconds = quantize(family, src, q, variant)
        quantized = loader.load_svdquant_model(str(q))
        mm.load_models_gpu([quantized, dense])
        modules = dict(ops.quantized_linears(quantized.model))
        recorded, _ = mq.record_linear_inputs(dense, list(modules), inputs)
        errors = mq.matched_errors(modules, recorded)
        del recorded
        f_q = mq.model_output(quantized, inputs)
        e = [le.e for le in errors]
        rows[variant] = {"snr": mq.snr_db(f_q, f_d), "layer_err_mean": sum(e) / len(e), "layer_err_max": max(e),
                         "linears": len(e), "quantize_s": seconds}
        if variant == "svdquant":
            model = mq.NullModel(dense, errors)
            snrs = [mq.snr_db(model.run(model.draw(1000 + i), lambda: mq.model_output(dense, inputs)), f_d)
                    for i in range(NULL_DRAWS)]
            null = {"snrs": snrs, "threshold": mq.threshold(snrs), "mean_std": mq.mean_std(snrs)}
        mm.unload_all_models()
        del quantized, modules
        q.unlink()
        mm.load_models_gpu([dense])
        print(f"{family} {variant}: {rows[variant]['snr']:.2f} dB, per-layer error "
              f"{rows[variant]['layer_err_mean']:.3f} mean / {rows[variant]['layer_err_max']:.3f} max, "
              f"quantized in {seconds:.0f} s", flush=True)
    mm.unload_all_models()
    src.unlink()
    return {"family": family, "dims": dims, "rows": rows, "null": null}


def host() -> str:
    import comfyui_version  # ComfyUI's own version file, importable once its tree is on sys.path
    return f"ComfyUI {comfyui_version.__version__}, torch {torch.__version__}, {platform.machine()}, " \
           f"{os.cpu_count()} CPUs"


def markdown(results: list, command: str, seconds: float) -> str:
    out = [
        "# Model-output SNR per family: naive W4A4 vs smoothing vs SVDQuant (tiny random models)", "",
        f"Host: {host()}. Date: {datetime.date.today().isoformat()}. Wall time {seconds / 60:.1f} min "
        f"(2 cores shared with other jobs).", "", f"    {command}", "",
        "SNR = 10·log10(‖f_d‖² / ‖f_q − f_d‖²) of the diffusion model's own output (velocity / noise prediction) on",
        "one fixed input (64x64-image latent at the schedule's midpoint, random conditioning), quantized f_q vs the",
        "same model unquantized f_d (bf16 weights, fp32 compute); higher is closer. Per-layer error: ‖Q(x) − y‖ / ‖y‖",
        "of each quantized Linear on the inputs it sees in that forward (mean / max). Null model: the unquantized",
        "model with each Linear's SVDQuant INT4 error replaced by Gaussian noise of the same size",
        f"(tests/model_quality.py); threshold μ − 3s over {NULL_DRAWS} draws, what tests/comfy/test_family_quantized.py",
        "requires (there at rank 16).", "",
        "What random tiny weights can show: that each variant's 4-bit error, layer by layer and through one or two",
        "blocks of the real ComfyUI forward, adds up as measured here, and that the files load and run. What they",
        "cannot show: SVDQuant's gain on real models. Its low-rank branch absorbs the few large singular values and",
        "smoothing the outlier channels that trained weights and real activations have; i.i.d. Gaussian weights",
        "(std 0.02, or the std in a family's dims) have a flat spectrum and no outlier channels, and the data-free α search sees synthetic",
        "activations, so on these models the three INT4 variants are expected to differ by little. The ablation on a",
        "real transformer with real activations is bench/results/ablation_minilm.md. The SNR's absolute value also",
        "depends on how much of the output bypasses the quantized Linears (the unquantized input and output",
        "projections), which differs per family and width: compare variants within a family, not across.", "",
    ]
    for r in results:
        out += [f"## {r['family']}", ""]
        if "skipped" in r:
            out += [f"Not measured: {r['skipped']}.", ""]
            continue
        out += [f"dims {r['dims'] or 'defaults'} (tests/family_models.py / tests/flux_models.py)", "",
                "| variant | output SNR (dB) | per-layer error mean / max | Linears | quantize (s) |",
                "|---|---|---|---|---|"]
        for v, row in r["rows"].items():
            out.append(f"| {LABEL[v]} | {row['snr']:.2f} | {row['layer_err_mean']:.3f} / {row['layer_err_max']:.3f} "
                       f"| {row['linears']} | {row['quantize_s']:.0f} |")
        n = r["null"]
        mu, s = n["mean_std"]
        out += [f"| null model of SVDQuant INT4 | {mu:.2f} ± {s:.2f} (draws "
                f"{', '.join(f'{x:.2f}' for x in n['snrs'])}) | threshold μ − 3s = {n['threshold']:.2f} | | |", ""]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "family_quality.md"))
    ap.add_argument("--big-flux2", action="store_true", help="FLUX.2 at hidden 6144 where the host forces it")
    ap.add_argument("--append", action="store_true", help="keep --out's tables and add this run's after them")
    args = ap.parse_args()
    families = args.families.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"--families: unknown {unknown}; choose from {', '.join(FAMILIES)}")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    results = []
    command = ("SVDQ_COMFYUI=" + os.environ["SVDQ_COMFYUI"] + " python bench/bench_family_quality.py " +
               " ".join(sys.argv[1:])).strip()
    before = Path(args.out).read_text() + "\n" if args.append and Path(args.out).exists() else ""
    with tempfile.TemporaryDirectory(prefix="family_quality-") as tmp:
        for family in families:                      # the table is rewritten after each family
            results.append(measure_family(family, Path(tmp), args.big_flux2))
            text = markdown(results, command, time.perf_counter() - t0)
            Path(args.out).write_text(before + text)
    print(text)


if __name__ == "__main__":
    main()
