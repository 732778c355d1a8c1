"""Calibration files: per-layer input statistics recorded while a FLUX.1 model samples, for the quantizer.

One `.safetensors` file. For every recorded linear, keyed by its BFL module name
(`double_blocks.3.img_attn.qkv`, `single_blocks.0.linear2`, ...):
  `<module>.max`, `<module>.min`   fp32 [K]  per-channel extremes over every token seen
  `<module>.rows`                  bf16 [M, K] a uniform sample (reservoir) of at most max_rows input rows
                                   (bf16, not fp16: FLUX activations have outliers beyond fp16's range)
  `<module>.count`                 int64 [1] tokens seen
Metadata: `format` = "svdquant-calibration", `version` = "1", `model` = JSON of the model's shape (the
ComfyUI FluxParams fields that decide every layer's K, plus guidance_embed), `fingerprint` = JSON list of
a few weight values (img_in and txt_in corners) so that a file recorded on another model of the same shape
is rejected, and `max_rows`.

The recorder hooks plain torch modules: it works on ComfyUI's Flux (BFL module names) without importing
comfy; nodes/quantize.py attaches it for the duration of one sampling run.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .svdquant import ActStats

FORMAT_NAME = "svdquant-calibration"
FORMAT_VERSION = "1"
SHAPE_FIELDS = ("hidden_size", "depth", "depth_single_blocks", "in_channels", "context_in_dim", "vec_in_dim",
                "guidance_embed")
FINGERPRINT_KEYS = ("img_in.weight", "txt_in.weight")
FINGERPRINT_SIDE = 8
# Relative L2 distance allowed between fingerprints. A float8_e4m3 copy of the same weights is off by at most
# 2^-4 per element (3 mantissa bits), so ≤ 0.0625 overall; 0.1 accepts that and fp16/bf16/fp32 casts, and
# rejects unrelated weights (distance ≈ √2 for independent values of the same scale).
FINGERPRINT_TOLERANCE = 0.1
DEFAULT_MAX_ROWS = 256
# The linears whose inputs the quantizer needs, per block kind (BFL suffixes).
DOUBLE_MODULES = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                  "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
SINGLE_MODULES = ("linear1", "linear2")


class CalibrationError(ValueError):
    """A calibration file is unreadable or belongs to another model."""


def model_shape(model_config: dict) -> dict:
    return {k: model_config[k] for k in SHAPE_FIELDS}


def fingerprint(get: Callable[[str], torch.Tensor]) -> list[float]:
    """A few weight values identifying a model: the top-left corner of img_in and txt_in, fp32."""
    vals = []
    for k in FINGERPRINT_KEYS:
        vals += get(k)[:FINGERPRINT_SIDE, :FINGERPRINT_SIDE].float().flatten().tolist()
    return vals


def fingerprint_distance(a: list[float], b: list[float]) -> float:
    ta, tb = torch.tensor(a), torch.tensor(b)
    if ta.shape != tb.shape:
        return float("inf")
    return ((ta - tb).norm() / ta.norm().clamp(min=1e-30)).item()


class Calibration:
    """A loaded calibration file. stats(module) -> ActStats or None."""

    def __init__(self, path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
        self.path = Path(path)
        self._t = tensors
        self.model = json.loads(metadata["model"])
        self.fingerprint = json.loads(metadata["fingerprint"])
        self.modules = sorted({k.rsplit(".", 1)[0] for k in tensors})

    def stats(self, module: str) -> Optional[ActStats]:
        if f"{module}.rows" not in self._t:
            return None
        return ActStats(self._t[f"{module}.max"], self._t[f"{module}.min"], self._t[f"{module}.rows"])

    def count(self, module: str) -> int:
        return int(self._t[f"{module}.count"].item())

    def check_model(self, model_config: dict, fp: list[float], where: str) -> None:
        """Raise CalibrationError unless this file was recorded on the model described by (config, fp)."""
        want = model_shape(model_config)
        diff = {k: (self.model.get(k), want[k]) for k in SHAPE_FIELDS if self.model.get(k) != want[k]}
        if diff:
            desc = ", ".join(f"{k} {a} in the file vs {b} in the model" for k, (a, b) in diff.items())
            raise CalibrationError(f"{self.path}: calibration recorded on another model ({desc}); record a new one "
                                   f"with this model ({where}) or quantize without --calib (data-free)")
        d = fingerprint_distance(self.fingerprint, fp)
        if d > FINGERPRINT_TOLERANCE:
            raise CalibrationError(f"{self.path}: calibration recorded on a model with other weights (fingerprint "
                                   f"distance {d:.3g} > {FINGERPRINT_TOLERANCE}; same shapes, different model than "
                                   f"{where}); record a new one with this model or quantize without --calib")


def load_calibration(path) -> Calibration:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such calibration file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT_NAME:
                raise CalibrationError(f"{path}: not a calibration file (metadata format = {meta.get('format')!r}, "
                                       f"expected {FORMAT_NAME!r}); record one with the 'SVDQuant Record "
                                       f"Calibration' node")
            if meta.get("version") != FORMAT_VERSION:
                raise CalibrationError(f"{path}: calibration format version {meta.get('version')!r}, this "
                                       f"quantizer reads version {FORMAT_VERSION}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CalibrationError(f"{path}: cannot read as a safetensors calibration file ({e})") from e
    return Calibration(path, tensors, meta)


def save_calibration(path, stats: dict[str, dict[str, torch.Tensor]], *, model_config: dict,
                     fp: list[float], max_rows: int) -> Path:
    """stats: module -> {"max", "min", "rows", "count"}. Written atomically (temporary file + rename)."""
    path = Path(path)
    tensors = {}
    for m, s in stats.items():
        tensors[f"{m}.max"] = s["max"].float().contiguous()
        tensors[f"{m}.min"] = s["min"].float().contiguous()
        tensors[f"{m}.rows"] = s["rows"].to(torch.bfloat16).contiguous()
        tensors[f"{m}.count"] = torch.tensor([int(s["count"])], dtype=torch.int64)
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": json.dumps(model_shape(model_config)),
            "fingerprint": json.dumps(fp), "max_rows": str(max_rows)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class _Reservoir:
    """Per-channel extremes and a uniform sample of at most `cap` rows of everything fed to `add`
    (Vitter's algorithm R; the random choices for a whole batch are drawn at once)."""

    def __init__(self, K: int, cap: int, generator: torch.Generator):
        self.cmax = torch.full((K,), -float("inf"))
        self.cmin = torch.full((K,), float("inf"))
        self.rows = torch.empty(0, K, dtype=torch.bfloat16)
        self.count = 0
        self.cap = cap
        self.g = generator

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])                              # x: [M, K], stays on its device
        M = x.shape[0]
        if M == 0:
            return
        self.cmax = torch.maximum(self.cmax, x.amax(dim=0).float().cpu())
        self.cmin = torch.minimum(self.cmin, x.amin(dim=0).float().cpu())
        free = max(self.cap - self.rows.shape[0], 0)
        if free:
            self.rows = torch.cat([self.rows, x[:free].to("cpu", torch.bfloat16)])
        rest = M - min(free, M)
        if rest:
            # row j of the rest is row number seen + j overall (0-based): keep it with probability
            # cap / (seen + j + 1), in a uniformly chosen slot
            seen = self.count + min(free, M)
            slot = (torch.rand(rest, generator=self.g) * (torch.arange(rest) + seen + 1)).long()
            keep = (slot < self.cap).nonzero().flatten()
            if keep.numel():
                # when several kept rows pick the same slot the last one wins, as in the sequential algorithm
                last = torch.full((self.cap,), -1, dtype=torch.long)
                last.scatter_reduce_(0, slot[keep], keep, reduce="amax")
                filled = (last >= 0).nonzero().flatten()
                src = (last[filled] + min(free, M)).to(x.device)
                self.rows[filled] = x[src].to("cpu", torch.bfloat16)
        self.count += M


def recorder_for_module(module: torch.nn.Module, model_config: dict, max_rows: int = DEFAULT_MAX_ROWS
                        ) -> "CalibrationRecorder":
    """A recorder for a FLUX.1 torch module with BFL parameter names (ComfyUI's `diffusion_model`) and its
    ComfyUI unet_config (FluxParams fields)."""
    if model_config.get("image_model", "flux") != "flux":
        raise CalibrationError(f"the model is {model_config.get('image_model')!r}; calibration is recorded for "
                               f"FLUX.1 models only")
    missing = [k for k in SHAPE_FIELDS if k not in model_config]
    if missing:
        raise CalibrationError(f"the model configuration has no {missing[0]}; is this a FLUX.1 model?")
    params = dict(module.named_parameters())
    absent = [k for k in FINGERPRINT_KEYS if k not in params]
    if absent:
        raise CalibrationError(f"the model has no parameter {absent[0]}; expected a FLUX.1 model with BFL names")
    return CalibrationRecorder(model_config, fingerprint(lambda k: params[k].detach().cpu()), max_rows)


class CalibrationRecorder:
    """Records the inputs of a FLUX.1 module tree's quantizable linears (BFL names) through forward
    pre-hooks. attach() / detach() around sampling runs; stats accumulate across runs; save() writes the file.

    model: the torch Flux module (ComfyUI's `model.diffusion_model`), model_config: ComfyUI FluxParams as a
    dict (flux.comfy_model_config fields), fp: fingerprint(...) of its weights."""

    def __init__(self, model_config: dict, fp: list[float], max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0):
        self.model_config = model_config
        self.fp = fp
        self.max_rows = max_rows
        self._g = torch.Generator().manual_seed(seed)
        self._res: dict[str, _Reservoir] = {}
        self._handles = []

    @staticmethod
    def module_names(depth: int, depth_single: int) -> list[str]:
        return ([f"double_blocks.{i}.{m}" for i in range(depth) for m in DOUBLE_MODULES]
                + [f"single_blocks.{i}.{m}" for i in range(depth_single) for m in SINGLE_MODULES])

    def attach(self, model: torch.nn.Module) -> None:
        if self._handles:
            raise RuntimeError("CalibrationRecorder is already attached")
        modules = dict(model.named_modules())
        names = self.module_names(self.model_config["depth"], self.model_config["depth_single_blocks"])
        missing = [n for n in names if n not in modules]
        if missing:
            raise CalibrationError(f"the model has no module {missing[0]} (expected a FLUX.1 model with BFL "
                                   f"module names, depth {self.model_config['depth']})")
        for n in names:
            self._handles.append(modules[n].register_forward_pre_hook(self._hook(n)))

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            res = self._res.get(name)
            if res is None:
                res = self._res[name] = _Reservoir(x.shape[-1], self.max_rows, self._g)
            res.add(x)
        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def tokens(self) -> int:
        return min((r.count for r in self._res.values()), default=0)

    def save(self, path) -> Path:
        if not self._res:
            raise CalibrationError("nothing recorded: run a sampling workflow through the recording model first")
        stats = {n: {"max": r.cmax, "min": r.cmin, "rows": r.rows, "count": r.count} for n, r in self._res.items()}
        return save_calibration(path, stats, model_config=self.model_config, fp=self.fp, max_rows=self.max_rows)
