"""Calibration files: per-layer input statistics recorded while a diffusion model samples, for the quantizer.

One `.safetensors` file. For every recorded Linear, keyed by its name in the model ComfyUI builds (its
`diffusion_model`, i.e. the names of the model file: BFL names for FLUX.1, `transformer_blocks.3.attn.to_q` for
Qwen-Image, ...):
  `<module>.max`, `<module>.min`   fp32 [K]  per-channel extremes over every token seen
  `<module>.rows`                  bf16 [M, K] a uniform sample (reservoir) of at most max_rows input rows
                                   (bf16, not fp16: FLUX activations have outliers beyond fp16's range)
  `<module>.count`                 int64 [1] tokens seen
Metadata (version 2): `format` = "svdquant-calibration", `version` = "2", `family` = the quantization policy's
family (models/policies.py), `linears` = JSON {name: [N, K]} of the recorded Linears, `fingerprint` = JSON
{"keys": [two weight names], "values": [their top-left 8x8 corners]} so that a file recorded on another model
of the same shape is rejected, and `max_rows`. The recorded Linears are the family policy's W4A4 ones: those whose
inputs the quantizer needs.

Version 1 (FLUX.1 only, written before 2026-12-07) is still read: `model` = JSON of the FluxParams fields that decide
every layer's K, fingerprint = a JSON list of the img_in and txt_in corners.

The recorder hooks plain torch modules: it works on any model ComfyUI builds without importing comfy;
nodes/quantize.py attaches it for the duration of each sampling run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..formats.nunchaku import atomic_write, natural_key
from ..models import policies
from .svdquant import ActStats

FORMAT_NAME = "svdquant-calibration"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
V1_SHAPE_FIELDS = ("hidden_size", "depth", "depth_single_blocks", "in_channels", "context_in_dim", "vec_in_dim",
                   "guidance_embed")
V1_FINGERPRINT_KEYS = ("img_in.weight", "txt_in.weight")
FINGERPRINT_SIDE = 8
# Relative L2 distance allowed between fingerprints. A float8_e4m3 copy of the same weights is off by at most
# 2^-4 per element (3 mantissa bits), so ≤ 0.0625 overall; 0.1 accepts that and fp16/bf16/fp32 casts, and
# rejects unrelated weights (distance ≈ √2 for independent values of the same scale).
FINGERPRINT_TOLERANCE = 0.1
DEFAULT_MAX_ROWS = 256


class CalibrationError(ValueError):
    """A calibration file is unreadable or belongs to another model."""


def fingerprint(get: Callable[[str], torch.Tensor], keys=V1_FINGERPRINT_KEYS) -> list[float]:
    """A few weight values identifying a model: the top-left corners of the weights `keys`, fp32."""
    vals = []
    for k in keys:
        vals += get(k)[:FINGERPRINT_SIDE, :FINGERPRINT_SIDE].float().flatten().tolist()
    return vals


def fingerprint_distance(a: list[float], b: list[float]) -> float:
    ta, tb = torch.tensor(a), torch.tensor(b)
    if ta.shape != tb.shape:
        return float("inf")
    return ((ta - tb).norm() / ta.norm().clamp(min=1e-30)).item()


class Calibration:
    """A loaded calibration file. stats(module) -> ActStats or None; check_source() before using it on a model."""

    def __init__(self, path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
        self.path = Path(path)
        self._t = tensors
        self.version = metadata["version"]
        self.modules = sorted({k.rsplit(".", 1)[0] for k in tensors}, key=natural_key)
        if self.version == "1":
            self.family = "flux"
            self.model = json.loads(metadata["model"])
            self.fingerprint_keys, self.fingerprint = list(V1_FINGERPRINT_KEYS), json.loads(metadata["fingerprint"])
            self.linears = {}
        else:
            self.family = metadata["family"]
            self.model = None
            fp = json.loads(metadata["fingerprint"])
            self.fingerprint_keys, self.fingerprint = fp["keys"], fp["values"]
            self.linears = {k: tuple(v) for k, v in json.loads(metadata["linears"]).items()}

    def stats(self, module: str) -> Optional[ActStats]:
        if f"{module}.rows" not in self._t:
            return None
        return ActStats(self._t[f"{module}.max"], self._t[f"{module}.min"], self._t[f"{module}.rows"])

    def count(self, module: str) -> int:
        return int(self._t[f"{module}.count"].item())

    def stats_for(self, module: str, K: int) -> ActStats:
        """The statistics of one Linear about to be quantized, whose input has K features; a missing or misshapen
        entry raises CalibrationError naming the file and the Linear."""
        s = self.stats(module)
        if s is None:
            raise CalibrationError(f"{self.path}: has no statistics for {module}; the recording did not reach this "
                                   f"layer (record a full sampling run with this model)")
        if s.rows.shape[-1] != K:
            raise CalibrationError(f"{self.path}: {module}.rows has {s.rows.shape[-1]} features, the model's Linear "
                                   f"takes K = {K}; recorded on another model")
        return s

    def check_source(self, read: Callable[[str], Optional[torch.Tensor]], shapes: Callable[[str], Optional[tuple]],
                     where: str, model_config: Optional[dict] = None) -> None:
        """Raise CalibrationError unless this file was recorded on the model `where`: read(key) gives one of its
        tensors (None if absent), shapes(linear name) its [N, K] (None if absent). Version 1 files also compare
        the FLUX.1 shape fields of model_config when given."""
        hint = f"record a new one with this model ({where}) or quantize without a calibration (data-free)"
        if self.model is not None and model_config is not None:
            diff = {k: (self.model.get(k), model_config.get(k)) for k in V1_SHAPE_FIELDS
                    if self.model.get(k) != model_config.get(k)}
            if diff:
                desc = ", ".join(f"{k} {a} in the file vs {b} in the model" for k, (a, b) in diff.items())
                raise CalibrationError(f"{self.path}: calibration recorded on another model ({desc}); {hint}")
        for name, shape in self.linears.items():
            have = shapes(name)
            if have is None or tuple(have) != shape:
                found = "has no such Linear" if have is None else f"has it as {list(have)}"
                raise CalibrationError(f"{self.path}: calibration recorded on another model ({name} is {list(shape)} "
                                       f"in the file, the model {found}); {hint}")
        values = []
        for k in self.fingerprint_keys:
            t = read(k)
            if t is None:
                raise CalibrationError(f"{self.path}: calibration recorded on another model (the model has no "
                                       f"{k}); {hint}")
            values += fingerprint(lambda _: t, (k,))
        d = fingerprint_distance(self.fingerprint, values)
        if d > FINGERPRINT_TOLERANCE:
            raise CalibrationError(f"{self.path}: calibration recorded on a model with other weights (fingerprint "
                                   f"distance {d:.3g} > {FINGERPRINT_TOLERANCE}; same shapes, different model than "
                                   f"{where}); {hint}")


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
            if meta.get("version") not in READABLE_VERSIONS:
                raise CalibrationError(f"{path}: calibration format version {meta.get('version')!r}, this "
                                       f"quantizer reads versions {', '.join(READABLE_VERSIONS)}; update the pack")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CalibrationError(f"{path}: cannot read as a safetensors calibration file ({e})") from e
    return Calibration(path, tensors, meta)


def save_calibration(path, stats: dict[str, dict[str, torch.Tensor]], *, family: str, linears: dict,
                     fingerprint_keys: list, fp: list[float], max_rows: int) -> Path:
    """stats: module -> {"max", "min", "rows", "count"}; linears: module -> (N, K). Written atomically (temporary
    file + rename), version 2."""
    path = Path(path)
    tensors = {}
    for m, s in stats.items():
        tensors[f"{m}.max"] = s["max"].float().contiguous()
        tensors[f"{m}.min"] = s["min"].float().contiguous()
        tensors[f"{m}.rows"] = s["rows"].to(torch.bfloat16).contiguous()
        tensors[f"{m}.count"] = torch.tensor([int(s["count"])], dtype=torch.int64)
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "family": family,
            "linears": json.dumps({m: list(linears[m]) for m in stats}),
            "fingerprint": json.dumps({"keys": list(fingerprint_keys), "values": fp}), "max_rows": str(max_rows)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
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


def model_linears(module: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """{name: Linear} of a model's torch Linears (ComfyUI's operations subclass torch.nn.Linear), in natural order."""
    found = {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    return {n: found[n] for n in sorted(found, key=natural_key)}


def recorder_for_module(module: torch.nn.Module, max_rows: int = DEFAULT_MAX_ROWS, family: Optional[str] = None,
                        seed: int = 0) -> "CalibrationRecorder":
    """A recorder for the W4A4 Linears (the family's policy; detected from the parameter names unless given) of an
    unquantized model (ComfyUI's `diffusion_model`, any family)."""
    linears = model_linears(module)
    weights = {n: m.weight for n, m in linears.items()}
    unusable = [n for n, w in weights.items() if w is None or w.device.type == "meta"]
    if unusable:
        raise CalibrationError(f"the model's Linear {unusable[0]} has no dense weight: record the calibration on the "
                               f"unquantized model (load it with 'Load Diffusion Model'), not on an SVDQuant one")
    if not linears:
        raise CalibrationError("the model has no Linear layers to record")
    family = family or policies.family_of(n for n, _ in module.named_parameters())
    plan = policies.plan({n: tuple(w.shape) for n, w in weights.items()}, family)
    names = plan.of("w4a4")
    if not names:
        raise CalibrationError(f"the {family} policy quantizes none of the model's {len(linears)} Linears: "
                               f"nothing to record")
    keys = [f"{n}.weight" for n in list(linears)[:2]]
    fp = fingerprint(lambda k: weights[k[:-len(".weight")]].detach().cpu(), keys)
    return CalibrationRecorder(names, {n: tuple(weights[n].shape) for n in names}, family, keys, fp, max_rows, seed)


class CalibrationRecorder:
    """Records the inputs of a model's W4A4 Linears (`names`) through forward pre-hooks. attach() / detach()
    around sampling runs; stats accumulate across runs; save() writes the file. Make one with
    recorder_for_module()."""

    def __init__(self, names: list, linears: dict, family: str, fingerprint_keys: list, fp: list[float],
                 max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0):
        self.names, self.linears, self.family = list(names), dict(linears), family
        self.fingerprint_keys, self.fp = list(fingerprint_keys), fp
        self.max_rows = max_rows
        self._g = torch.Generator().manual_seed(seed)
        self._res: dict[str, _Reservoir] = {}
        self._handles = []

    def attach(self, model: torch.nn.Module) -> None:
        if self._handles:
            raise RuntimeError("CalibrationRecorder is already attached")
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise CalibrationError(f"the model has no module {missing[0]}: not the model this recorder was made for")
        for n in self.names:
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
        return save_calibration(path, stats, family=self.family, linears=self.linears,
                                fingerprint_keys=self.fingerprint_keys, fp=self.fp, max_rows=self.max_rows)
