"""Quantize a whole FLUX.1 transformer to a Nunchaku SVDQuant checkpoint, streaming one block at a time.

Block by block, layer by layer: read the layer's BFL tensors (flux_source), quantize every W4A4 linear with
quantize.quantize_svdquant (single blocks: linear1 split by rows into qkv_proj | mlp_fc1, linear2 split by
input columns into out_proj | mlp_fc2, mlp_fc2 carrying the bias), the adaLN modulation linears with
quantize_w4a16, pack each layer with the core packer at once and drop the fp tensors. Only packed output is
kept, then the file is written one tensor at a time through a temporary file (formats/safetensors_stream.py),
so peak memory is the output size plus one layer's working set, and an error leaves no output.

A quality report (JSON next to the output + a printed table) lists per layer the relative output error of
naive W4A4 (RTN), smoothing only, SVD only and SVDQuant on the calibration (or synthetic) activations.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..models import flux
from .calibration import Calibration, load_calibration
from ..models.flux_source import FluxSource, open_flux_source
from ..formats.nunchaku import default_quantization_config, natural_key, pack_nunchaku_state_dict
from ..formats.safetensors_stream import write_all
from . import svdquant as _quantize
from .svdquant import quantize_svdquant, quantize_w4a16

MODEL_CLASS = "NunchakuFluxTransformer2dModel"
QUANTIZER_NAME = "nunchaku_core.quantize.flux"
QUANTIZER_VERSION = "1"

Progress = Callable[[int, int, str], None]   # (done, total, what is being worked on)


@dataclass
class QuantizeOptions:
    precision: str = "int4"             # "int4" | "nvfp4"
    rank: int = 32
    gptq: bool = False                  # needs calibration
    report: bool = True                 # measure the four variants per layer (quality report)
    alphas: Optional[tuple] = None      # migration strength grid; None = the quantizer's default
    dtype: torch.dtype = torch.bfloat16  # storage dtype of scales, low-rank, bias, plain layers


@dataclass
class QuantizeResult:
    output: Path
    report_path: Optional[Path]
    layers: list = field(default_factory=list)   # one dict per quantized layer (the report rows)
    seconds: float = 0.0
    variant: str = ""


def check_output_path(out: Path, src: Path) -> None:
    """Fail before any work if the output cannot be written."""
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: the output would overwrite the input model; choose another output path")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; give the output .safetensors file name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{out}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{out}: the folder {parent} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise PermissionError(f"{out}: exists and is not writable")


def _count_layers(src: FluxSource) -> int:
    return src.depth * (len(flux.DOUBLE_W4A4) + len(flux.DOUBLE_W4A16)) + src.depth_single_blocks * 5


class _Block:
    """Quantizes one block, reading each layer's tensors from the source only when it is its turn and packing
    each quantized layer at once, so the fp copies of only one layer (or one fused single-block linear) are
    alive at a time. Collects packed tensors (`packed`) and report rows."""

    def __init__(self, src: FluxSource, opts: QuantizeOptions, calib: Optional[Calibration],
                 tick: Callable[[str], None], packed: dict, rows: list):
        self.src, self.opts, self.calib, self.tick = src, opts, calib, tick
        self.packed, self.rows = packed, rows

    def _read(self, key: str) -> Optional[torch.Tensor]:
        return self.src.read(key) if self.src.has(key) else None

    def _pack(self, svdquant: Optional[dict] = None, w4a16: Optional[dict] = None, plain: Optional[dict] = None) -> None:
        self.packed.update(pack_nunchaku_state_dict(svdquant=svdquant or {}, w4a16=w4a16 or {}, plain=plain or {},
                                                    naming="cpp"))

    def w4a4(self, name: str, bfl: str, w: torch.Tensor, b: Optional[torch.Tensor], stats, kind: str) -> None:
        o = self.opts
        shifted = o.precision == "int4" and flux.is_shifted(name)
        t0 = time.perf_counter()
        layer, rep = quantize_svdquant(w, b, precision=o.precision, rank=o.rank, stats=stats, shifted=shifted,
                                       gptq=o.gptq, alphas=o.alphas, dtype=o.dtype, ablation=o.report)
        self._pack(svdquant={name: layer})
        self.rows.append({"layer": name, "bfl": bfl, "type": kind, "N": layer.N, "K": layer.K,
                          "shifted": shifted, "alpha": rep.alpha, "seconds": round(time.perf_counter() - t0, 3),
                          **{f"err_{k}": v for k, v in rep.errors.items()}})
        self.tick(name)

    def adaln(self, name: str, prefix: str) -> None:
        b = self._read(f"{prefix}.bias")
        layer = quantize_w4a16(self.src.read(f"{prefix}.weight"), None if b is None else b.float(),
                               dtype=self.opts.dtype)
        self._pack(w4a16={name: layer})
        self.tick(name)

    def stats(self, module: str):
        if self.calib is None:
            return None
        return self.calib.stats_for(module, self.src.shape(f"{module}.weight")[1])

    def double(self, i: int) -> None:
        p, b_ = f"{flux.DOUBLE_PREFIX}.{i}", f"double_blocks.{i}"
        for bfl, cpp, _ in flux.DOUBLE_W4A4:
            self.w4a4(f"{p}.{cpp}", f"{b_}.{bfl}", self.src.read(f"{b_}.{bfl}.weight"), self._read(f"{b_}.{bfl}.bias"),
                      self.stats(f"{b_}.{bfl}"), bfl)
        for bfl, name, _ in flux.DOUBLE_W4A16:
            self.adaln(f"{p}.{name}", f"{b_}.{bfl}")
        self._pack(plain={f"{p}.{cpp}": self.src.read(f"{b_}.{bfl}").to(self.opts.dtype)
                          for bfl, cpp, _ in flux.DOUBLE_NORMS})

    def single(self, i: int) -> None:
        p, b_ = f"{flux.SINGLE_PREFIX}.{i}", f"single_blocks.{i}"
        hidden = self.src.hidden_size
        w1, b1 = self.src.read(f"{b_}.linear1.weight"), self._read(f"{b_}.linear1.bias")
        s1 = self.stats(f"{b_}.linear1")
        row = 0
        for name, mult in flux.SINGLE_LINEAR1:                       # rows [qkv (3D) | mlp (4D)]
            rs = slice(row, row + mult * hidden)
            self.w4a4(f"{p}.{name}", f"{b_}.linear1[{rs.start}:{rs.stop}]", w1[rs],
                      None if b1 is None else b1[rs], s1, f"linear1.{name}")
            row = rs.stop
        del w1, b1
        w2, b2 = self.src.read(f"{b_}.linear2.weight"), self._read(f"{b_}.linear2.bias")
        s2 = self.stats(f"{b_}.linear2")
        col = 0
        for name, mult in flux.SINGLE_LINEAR2:                       # input columns [attn (D) | mlp (4D)]
            cs = slice(col, col + mult * hidden)
            # the real bias goes to mlp_fc2, out_proj's is zeros (FORMAT.md §2)
            bias = None if b2 is None else (b2 if name == "mlp_fc2" else torch.zeros_like(b2))
            st = None if s2 is None else s2.columns(cs)
            self.w4a4(f"{p}.{name}", f"{b_}.linear2[:, {cs.start}:{cs.stop}]", w2[:, cs], bias, st,
                      f"linear2.{name}")
            col = cs.stop
        del w2, b2
        for bfl, name, _ in flux.SINGLE_W4A16:
            self.adaln(f"{p}.{name}", f"{b_}.{bfl}")
        self._pack(plain={f"{p}.{cpp}": self.src.read(f"{b_}.{bfl}").to(self.opts.dtype)
                          for bfl, cpp, _ in flux.SINGLE_NORMS})


def quantize_flux(src_path, out_path, *, options: Optional[QuantizeOptions] = None, calib_path=None,
                  progress: Optional[Progress] = None, report_path=None, print_table: bool = False
                  ) -> QuantizeResult:
    """Quantize the FLUX.1 transformer at src_path into a single-file Nunchaku checkpoint at out_path.

    Raises FluxSourceError (not FLUX.1 / already quantized / unsupported dtype), CalibrationError (file of
    another model), ValueError/OSError (output not writable); nothing is written in those cases.
    report_path defaults to `<out>.quality.json` when options.report."""
    o = options or QuantizeOptions()
    if o.precision not in ("int4", "nvfp4"):
        raise ValueError(f"precision {o.precision!r}, expected 'int4' or 'nvfp4'")
    if o.rank < 0:
        raise ValueError(f"rank {o.rank} must be >= 0")
    if o.gptq and calib_path is None:
        raise ValueError("--gptq needs calibration activations (--calib FILE); data-free mode is RTN only")
    src_path, out_path = Path(src_path), Path(out_path)
    check_output_path(out_path, src_path)
    t_start = time.perf_counter()
    src = open_flux_source(src_path)
    known = {f"{bfl}.{leaf}" for bfl, _ in flux.UNQUANTIZED for leaf in ("weight", "bias")}
    unknown = sorted(k for k in src.global_keys() if k not in known)
    if unknown:
        raise ValueError(f"{src_path}: tensors outside the FLUX.1 blocks that Nunchaku has no place for: "
                         f"{', '.join(unknown[:5])}")
    calib = None
    if calib_path is not None:
        calib = load_calibration(calib_path)
        calib.check_source(lambda k: src.read(k) if src.has(k) else None,
                           lambda n: src.shape(f"{n}.weight") if src.has(f"{n}.weight") else None,
                           str(src_path), src.model_config)
    if report_path is None and o.report:
        report_path = out_path.with_name(out_path.name.rsplit(".safetensors", 1)[0] + ".quality.json")

    total = _count_layers(src) + 1
    done = [0]

    def tick(what: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total, what)

    packed: dict[str, torch.Tensor] = {}
    rows: list = []
    blk = _Block(src, o, calib, tick, packed, rows)
    for i in range(src.depth):
        blk.double(i)
    for i in range(src.depth_single_blocks):
        blk.single(i)

    for bfl, diff in flux.UNQUANTIZED:
        for leaf in ("weight", "bias"):
            if src.has(f"{bfl}.{leaf}"):
                t = src.read(f"{bfl}.{leaf}")
                packed[f"{diff}.{leaf}"] = (flux.swap_halves(t) if bfl == flux.SWAPPED else t).to(o.dtype).contiguous()

    mc = src.model_config
    alphas = o.alphas or (_quantize.ALPHAS_CALIBRATED if calib else _quantize.ALPHAS_DATA_FREE)
    info = {"quantizer": QUANTIZER_NAME, "version": QUANTIZER_VERSION, "source": src_path.name,
            "source_layout": src.layout, "variant": src.variant, "precision": o.precision, "rank": o.rank,
            "calibration": None if calib is None else calib.path.name, "gptq": o.gptq, "alphas": list(alphas)}
    metadata = {
        "config": json.dumps(flux.diffusers_config(mc)),
        "comfy_config": json.dumps({"model_class": src.model_class, "model_config": mc}),
        "model_class": MODEL_CLASS,
        "quantization_config": json.dumps(default_quantization_config(o.precision, -(-o.rank // 16) * 16)),
        "svdquant_quantizer": json.dumps(info),
    }
    write_all(out_path, packed, metadata, order=natural_key)
    tick("write")

    result = QuantizeResult(output=out_path, report_path=None, layers=rows,
                            seconds=time.perf_counter() - t_start, variant=src.variant)
    if o.report:
        result.report_path = write_report(report_path, rows, info)
        if print_table:
            print(format_table(rows))
    return result


VARIANTS = (("naive", "naive W4A4"), ("smooth", "smooth only"), ("svd", "SVD only"), ("svdquant", "SVDQuant"))


def write_report(path, rows: list, info: dict) -> Path:
    path = Path(path)
    summary = summarize(rows)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"info": info, "summary": summary, "layers": rows}, indent=1))
    os.replace(tmp, path)
    return path


def summarize(rows: list) -> dict:
    """Mean relative error per layer type and variant."""
    out: dict = {}
    for r in rows:
        t = out.setdefault(r["type"], {"layers": 0})
        t["layers"] += 1
        for v, _ in VARIANTS:
            if f"err_{v}" in r:
                t[v] = t.get(v, 0.0) + r[f"err_{v}"]
    for t in out.values():
        for v, _ in VARIANTS:
            if v in t:
                t[v] /= t["layers"]
    return out


def format_table(rows: list) -> str:
    head = f"{'layer':<44} {'N':>6} {'K':>6} {'alpha':>5} " + " ".join(f"{label:>11}" for _, label in VARIANTS)
    lines = [head, "-" * len(head)]
    for r in rows:
        errs = " ".join(f"{r[f'err_{v}']:>11.4f}" if f"err_{v}" in r else f"{'-':>11}" for v, _ in VARIANTS)
        alpha = "off" if r["alpha"] is None else r["alpha"]              # off: no smoothing won the search
        lines.append(f"{r['layer']:<44} {r['N']:>6} {r['K']:>6} {alpha:>5} {errs}")
    lines.append("")
    lines.append("mean relative output error per layer type:")
    for t, s in summarize(rows).items():
        errs = " ".join(f"{s[v]:>11.4f}" if v in s else f"{'-':>11}" for v, _ in VARIANTS)
        lines.append(f"{t:<44} {s['layers']:>6} {'':>6} {'':>5} {errs}")
    return "\n".join(lines)
