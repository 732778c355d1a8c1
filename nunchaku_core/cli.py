"""`python -m nunchaku_core`: inspect, dequantize (Nunchaku FLUX.1 files and ComfyUI-layout files of any family),
quantize, quantize-t5."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _inspect_comfy_native(path) -> int:
    from .formats.comfy_native import ComfyNativeCheckpoint
    from .formats.comfy_native_dequantize import layer_rows, plain_totals, quantizer_info

    ckpt = ComfyNativeCheckpoint(path)
    info = quantizer_info(ckpt) or {}
    rows = layer_rows(ckpt)
    print(f"file:        {ckpt.path}")
    print("layout:      ComfyUI's per-layer svdquant_w4a4 / awq_w4a16 (loads in 'SVDQuant Model Loader')")
    print(f"family:      {info.get('family', '(not recorded)')}")
    print(f"quantizer:   {json.dumps(info) if info else '(not recorded)'}")
    ranks = sorted({r["R"] for r in rows if r["R"]})
    print(f"rank:        {', '.join(map(str, ranks)) or '-'}")
    print()
    print(f"{'layer':<48} {'kind':<7} {'N':>6} {'K':>6} {'R':>4} {'G':>4} {'shift':>5} {'params':>12} {'bytes':>11}")
    for r in rows:
        print(f"{r['name']:<48} {r['kind']:<7} {r['N']:>6} {r['K']:>6} {r['R'] or '-':>4} {r['G']:>4} "
              f"{'yes' if r['shifted'] else '':>5} {r['params']:>12,} {_human(r['bytes']):>11}")
    n_plain, plain_params, plain_bytes = plain_totals(ckpt)
    q_params, q_bytes = sum(r["params"] for r in rows), sum(r["bytes"] for r in rows)
    print()
    print(f"quantized layers:   {len(rows):>6}  {q_params:>14,} params  {_human(q_bytes):>11}")
    print(f"unquantized tensors:{n_plain:>6}  {plain_params:>14,} params  {_human(plain_bytes):>11}")
    print(f"total:              {'':>6}  {q_params + plain_params:>14,} params  {_human(q_bytes + plain_bytes):>11}")
    return 0


def cmd_inspect(args) -> int:
    from .formats.comfy_native_dequantize import is_comfy_native
    from .formats.nunchaku import open_nunchaku

    if is_comfy_native(args.file):
        return _inspect_comfy_native(args.file)

    with open_nunchaku(args.file) as ckpt:
        print(f"file:        {ckpt.path}")
        print(f"model_class: {ckpt.model_class}")
        print(f"precision:   {ckpt.precision}")
        print(f"naming:      {ckpt.naming}")
        qc = ckpt.quantization_config
        print(f"quantization_config: {json.dumps(qc) if qc is not None else '(none)'}")
        if ckpt.comfy_config:
            print(f"comfy_config: {json.dumps(ckpt.comfy_config)}")
        if args.metadata:
            for k, v in sorted(ckpt.metadata.items()):
                print(f"metadata[{k}] = {v}")
        rows = [ckpt.layer_summary(n) | {"name": n} for n in ckpt.svdquant_layer_names() + ckpt.w4a16_layer_names()]
        ranks = sorted({r["R"] for r in rows if r.get("R")})
        print(f"rank:        {', '.join(map(str, ranks)) or '-'}")
        print()
        print(f"{'layer':<48} {'kind':<7} {'N':>6} {'K':>6} {'R':>4} {'G':>4} {'shift':>5} {'params':>12} {'bytes':>11}")
        for r in rows:
            print(f"{r['name']:<48} {r['kind']:<7} {r['N']:>6} {r['K']:>6} {r.get('R') or '-':>4} {r['G']:>4} "
                  f"{'yes' if r.get('shifted') else '':>5} {r['params']:>12,} {_human(r['bytes']):>11}")
        plain_params = plain_bytes = 0
        for name in ckpt.plain_tensor_names():
            s = ckpt.layer_summary(name)
            plain_params += s["params"]
            plain_bytes += s["bytes"]
        q_params = sum(r["params"] for r in rows)
        q_bytes = sum(r["bytes"] for r in rows)
        print()
        print(f"quantized layers:   {len(rows):>6}  {q_params:>14,} params  {_human(q_bytes):>11}")
        print(f"unquantized tensors:{len(ckpt.plain_tensor_names()):>6}  {plain_params:>14,} params  {_human(plain_bytes):>11}")
        print(f"total:              {'':>6}  {q_params + plain_params:>14,} params  {_human(q_bytes + plain_bytes):>11}")
    return 0


def cmd_dequantize(args) -> int:
    from tqdm import tqdm

    from .formats.comfy_native import ComfyNativeCheckpoint
    from .formats.comfy_native_dequantize import dequantize_comfy_native, is_comfy_native
    from .formats.dequantize import dequantize_file
    from .formats.nunchaku import open_nunchaku

    bar = tqdm(desc="dequantize", unit="tensor", disable=args.quiet)

    def progress(done, total, key):
        bar.total = total
        bar.update(1)
        bar.set_postfix_str(key, refresh=False)

    if is_comfy_native(args.input):
        n = dequantize_comfy_native(ComfyNativeCheckpoint(args.input), args.output, DTYPES[args.dtype], progress)
    else:
        with open_nunchaku(args.input) as ckpt:
            n = dequantize_file(ckpt, args.output, DTYPES[args.dtype], progress)
    bar.close()
    print(f"wrote {n} tensors ({args.dtype}) to {args.output}")
    return 0


def _add_module_command(sub, argv, name: str, help: str, module: str) -> None:
    """A subcommand implemented in another module (add_arguments(parser), main(args) -> int). The module
    is imported only when that subcommand runs, so `inspect` never pays for the quantizer's imports."""
    s = sub.add_parser(name, help=help)
    if argv and argv[0] == name:
        mod = importlib.import_module(f".{module}", __package__)
        mod.add_arguments(s)
        s.set_defaults(func=mod.main)


def build_parser(argv=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nunchaku_core", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="metadata, precision, rank, per-layer table, parameter and byte counts")
    s.add_argument("file", help="Nunchaku FLUX.1 .safetensors file or legacy folder, or a file in ComfyUI's "
                                "per-layer layout (what `quantize` writes by default, any family)")
    s.add_argument("--metadata", action="store_true", help="also print every raw metadata field")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("dequantize", help="write the effective weights as a dense state dict ComfyUI loads: a "
                                          "Nunchaku FLUX.1 file as a BFL Flux, a ComfyUI-layout file under its own names")
    s.add_argument("input", help="Nunchaku FLUX.1 .safetensors file or legacy folder, or a file in ComfyUI's "
                                 "per-layer layout")
    s.add_argument("output", help="output .safetensors (loads in ComfyUI's 'Load Diffusion Model')")
    s.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_dequantize)

    _add_module_command(sub, argv, "quantize", "quantize a diffusion model to an SVDQuant checkpoint",
                        "quantize.cli")
    _add_module_command(sub, argv, "quantize-t5", "quantize a T5 encoder to the 4-bit W4A16 (AWQ) format",
                        "quantize.t5")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # our format/validation errors and unreadable/unwritable paths
        print(f"error: {e}", file=sys.stderr)
        return 2
