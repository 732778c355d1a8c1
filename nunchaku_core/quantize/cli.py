"""`python -m nunchaku_core quantize IN OUT`: the quantizer's command line (arguments + a tqdm progress bar)."""
from __future__ import annotations

import argparse

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("auto", "comfy", "nunchaku")


def output_format(fmt: str, precision: str) -> str:
    """The layout `auto` means: comfy, unless NVFP4 asks for the FLUX.1 -> Nunchaku path (ComfyUI's svdquant_w4a4
    layout is INT4 only)."""
    if fmt != "auto":
        return fmt
    return "nunchaku" if precision == "nvfp4" else "comfy"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="a diffusion model .safetensors as ComfyUI loads it (with or without the "
                                 "model.diffusion_model. prefix); for --format nunchaku a FLUX.1 transformer, also "
                                 "a diffusers transformer folder")
    p.add_argument("output", help="output .safetensors (single file)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="comfy: ComfyUI's per-layer svdquant_w4a4/awq_w4a16 layout, any model family (INT4); "
                        "nunchaku: Nunchaku's FLUX.1 format (INT4 or NVFP4); auto (default): comfy, unless "
                        "--precision nvfp4 asks for the nunchaku path. Both take --calib and --gptq")
    p.add_argument("--family", help="quantization policy (nunchaku_core/models/policies.py): a family of its table "
                                    "or 'default' for the default rule; by default detected from the tensor names")
    p.add_argument("--precision", choices=("int4", "nvfp4"), default="int4",
                   help="int4: group 64, any GPU since Turing; nvfp4: group 16 + fp8 scales, Blackwell")
    p.add_argument("--rank", type=int, default=32, help="rank R of the 16-bit low-rank branch (default 32)")
    p.add_argument("--calib", metavar="FILE", help="calibration file from the 'SVDQuant Record Calibration' node; "
                                                   "without it the quantizer runs data-free")
    p.add_argument("--gptq", action="store_true", help="GPTQ on the 4-bit residual (needs --calib)")
    p.add_argument("--alphas", metavar="A,B,...", help="migration strength grid for the smoothing search "
                                                       "(default 0.35,0.5,0.65,0.8,0.95 with --calib, 1,0.5 data-free; no smoothing is always tried)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="dtype of scales, low-rank branch and unquantized layers (default bfloat16)")
    p.add_argument("--no-report", action="store_true",
                   help="skip the quality report (per-layer error of RTN / smooth / SVD / SVDQuant); ~1.6x faster data-free")
    p.add_argument("--report", metavar="FILE", help="quality report path (default OUTPUT with .quality.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table")


def main(args) -> int:
    from tqdm import tqdm

    from .flux import QuantizeOptions, quantize_flux
    from .model import quantize_model

    alphas = None
    if args.alphas:
        try:
            alphas = tuple(float(a) for a in args.alphas.split(","))
        except ValueError as e:
            raise ValueError(f"--alphas {args.alphas!r}: expected comma-separated numbers ({e})") from e
        if any(not 0.0 <= a <= 1.0 for a in alphas):
            raise ValueError(f"--alphas {args.alphas!r}: every migration strength must be in [0, 1]")
    opts = QuantizeOptions(precision=args.precision, rank=args.rank, gptq=args.gptq, report=not args.no_report,
                           alphas=alphas, dtype=DTYPES[args.dtype])
    bars = []                                  # made on the first layer, so an early error prints no bar

    def progress(done: int, total: int, what: str) -> None:
        if not bars:
            bars.append(tqdm(desc="quantize", unit="layer", total=total, disable=args.quiet))
        bars[0].update(done - bars[0].n)
        bars[0].set_postfix_str(what, refresh=False)

    fmt = output_format(args.format, args.precision)
    if fmt == "nunchaku" and args.family not in (None, "flux"):
        raise ValueError(f"--family {args.family}: --format nunchaku is FLUX.1 only; use --format comfy")
    try:
        if fmt == "comfy":
            res = quantize_model(args.input, args.output, options=opts, family=args.family, calib_path=args.calib,
                                 progress=progress, report_path=args.report, print_table=not args.quiet)
        else:
            res = quantize_flux(args.input, args.output, options=opts, calib_path=args.calib, progress=progress,
                                report_path=args.report, print_table=not args.quiet)
    finally:
        for b in bars:
            b.close()
    print(f"wrote {res.output} ({fmt} layout, {res.variant}, {args.precision}, rank {args.rank}) in "
          f"{res.seconds:.0f} s")
    if res.report_path:
        print(f"quality report: {res.report_path}")
    return 0
