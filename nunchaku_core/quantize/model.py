"""Quantize any diffusion model file ComfyUI loads into ComfyUI's own per-layer SVDQuant layout (formats/comfy_native.py:
`svdquant_w4a4` / `awq_w4a16` layers with a `comfy_quant` JSON each, ComfyUI's key names), streaming one Linear
at a time.

Which Linear becomes what comes from the per-family policy table (models/policies.py; a family without an
entry gets the stated default rule). Every W4A4 Linear goes through svdquant.quantize_svdquant (data-free on
synthetic activations, or on the inputs a calibration file recorded in a real sampling run: smoothing searched on
them, optionally GPTQ), every W4A16 one through svdquant.quantize_w4a16, and
is converted to its comfy-native tensors at once, so peak memory is the output plus one layer's fp32 working
set. Everything else is copied as stored. The output keeps the names ComfyUI's model uses (models/model_source.py:
a `model.diffusion_model.` prefix is dropped, a diffusers-layout PixArt is renamed and its split q/k/v fused; a
`.pth` is read too), so ComfyUI's own detection recognises the model from the dense shapes of its layers.

INT4 only: ComfyUI's svdquant_w4a4 layout has no NVFP4 variant (FLUX.1 NVFP4 goes through quantize/flux.py into
Nunchaku's format).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from ..formats.comfy_native import svdquant_to_comfy, w4a16_to_comfy
from ..formats.nunchaku import natural_key
from ..formats.safetensors_stream import write_all
from ..models import policies
from ..models.model_source import ModelSource, ModelSourceError, open_model_source
from .svdquant import quantize_svdquant, quantize_w4a16
from .calibration import load_calibration
from .flux import Progress, QuantizeOptions, QuantizeResult, check_output_path, format_table, write_report

QUANTIZER_NAME = "nunchaku_core.quantize.model"
QUANTIZER_VERSION = "1"
_QUANTIZED_MARKERS = (".qweight", ".wscales", ".comfy_quant", ".weight_scale")
__all__ = ["ModelSourceError", "plan_file", "quantize_model"]


def _linears(src: ModelSource) -> dict:
    """{Linear name: (N, K)} for every float 2-D `<name>.weight`."""
    return {k[:-len(".weight")]: src.shape(k) for k in src.keys
            if k.endswith(".weight") and len(src.shape(k)) == 2 and src.dtype_str(k) in ("BF16", "F16", "F32")}


def plan_file(src_path, family: Optional[str] = None) -> tuple[policies.Plan, ModelSource]:
    """(the per-Linear plan, the opened model) for a model file."""
    src_path = Path(src_path)
    src = open_model_source(src_path)
    # the model's keys only: a whole checkpoint may hold an fp8-scaled text encoder beside an unquantized model
    done = [k for k in src.keys if k.endswith(_QUANTIZED_MARKERS)]
    if done:
        raise ModelSourceError(f"{src_path}: already quantized ({done[0]}); quantize the unquantized model")
    linears = _linears(src)
    if not linears:
        raise ModelSourceError(f"{src_path}: no Linear weights (2-D float `*.weight` tensors) among its "
                               f"{len(src.keys)} tensors; is this a diffusion model file?")
    family = family or policies.family_of(src.keys)
    return policies.plan(linears, family), src


def quantize_model(src_path, out_path, *, options: Optional[QuantizeOptions] = None, family: Optional[str] = None,
                   calib_path=None, progress: Optional[Progress] = None, report_path=None,
                   print_table: bool = False) -> QuantizeResult:
    """Quantize the model at src_path into a comfy-native SVDQuant file at out_path (module docstring).
    calib_path: a calibration file recorded on this model (quantize/calibration.py), or None for data-free.
    report_path defaults to `<out>.quality.json` when options.report; it also lists every kept Linear and why."""
    o = options or QuantizeOptions()
    if o.precision != "int4":
        raise ValueError(f"precision {o.precision!r}: ComfyUI's svdquant_w4a4 layout is INT4 only (NVFP4: FLUX.1 "
                         f"into Nunchaku's format, `quantize --format nunchaku`)")
    if o.gptq and calib_path is None:
        raise ValueError("GPTQ needs calibration activations (--calib FILE); data-free mode is RTN only")
    if o.rank < 0:
        raise ValueError(f"rank {o.rank} must be >= 0")
    src_path, out_path = Path(src_path), Path(out_path)
    check_output_path(out_path, src_path)
    t_start = time.perf_counter()
    plan, src = plan_file(src_path, family)
    w4a4, w4a16 = set(plan.of("w4a4")), set(plan.of("w4a16"))
    if not w4a4:
        raise ModelSourceError(f"{src_path}: the {plan.family} policy quantizes none of its {len(plan.decisions)} "
                               f"Linears (K must be a multiple of {policies.GROUP}); nothing to do")
    calib = None
    if calib_path is not None:
        calib = load_calibration(calib_path)
        calib.check_source(src.read, lambda n: src.shape(f"{n}.weight") if f"{n}.weight" in src else None,
                           str(src_path))
    total, done = len(w4a4) + len(w4a16) + 1, [0]

    def tick(what: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total, what)

    out: dict[str, torch.Tensor] = {}
    rows: list = []
    consumed: set = set()
    for name in sorted(w4a4 | w4a16, key=natural_key):
        w, b = src.read(f"{name}.weight"), src.read(f"{name}.bias")
        consumed.update((f"{name}.weight", f"{name}.bias"))
        t0 = time.perf_counter()
        if name in w4a4:
            d = plan.decisions[name]
            stats = None if calib is None else calib.stats_for(name, w.shape[1])
            layer, rep = quantize_svdquant(w, b, precision="int4", rank=min(o.rank, *w.shape), shifted=d.shifted,
                                           stats=stats, gptq=o.gptq, alphas=o.alphas, dtype=o.dtype,
                                           ablation=o.report)
            tensors = svdquant_to_comfy(layer)
            rows.append({"layer": name, "type": "w4a4", "N": layer.N, "K": layer.K, "shifted": d.shifted,
                         "alpha": rep.alpha, "seconds": round(time.perf_counter() - t0, 3),
                         **{f"err_{k}": v for k, v in rep.errors.items()}})
        else:
            tensors = w4a16_to_comfy(quantize_w4a16(w, None if b is None else b.float(), dtype=o.dtype), o.dtype)
        del w, b
        out.update({f"{name}.{suffix}": t.contiguous() for suffix, t in tensors.items()})
        tick(name)
    for mk in src.keys:
        if mk not in consumed:
            out[mk] = src.read(mk).contiguous()

    info = {"quantizer": QUANTIZER_NAME, "version": QUANTIZER_VERSION, "source": src_path.name,
            "family": plan.family, "precision": o.precision, "rank": o.rank,
            "calibration": None if calib is None else calib.path.name, "gptq": o.gptq, "source_layout": src.layout,
            "layers": {"w4a4": len(w4a4), "w4a16": len(w4a16), "kept": len(plan.of("keep"))}}
    if src.dropped:     # a converted layout's tensors ComfyUI's model has no place for (it drops them too)
        info["dropped"] = src.dropped
    metadata = {"svdquant_quantizer": json.dumps(info)}
    write_all(out_path, out, metadata, order=natural_key)
    tick("write")

    result = QuantizeResult(output=out_path, report_path=None, layers=rows, seconds=time.perf_counter() - t_start,
                            variant=plan.family)
    if o.report:
        if report_path is None:
            report_path = out_path.with_name(out_path.name.rsplit(".safetensors", 1)[0] + ".quality.json")
        kept = {n: d.reason for n, d in plan.decisions.items() if d.kind == "keep"}
        result.report_path = write_report(report_path, rows, {**info, "kept": kept,
                                                               "w4a16": sorted(w4a16, key=natural_key)})
        if print_table:
            print(format_table(rows))
    return result
