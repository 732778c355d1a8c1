"""Nunchaku SVDQuant checkpoints (FORMAT.md §2-4): lazy, validating reader and atomic writer.

Reading: `open_nunchaku(path)` takes a v1 single `.safetensors` file or a legacy folder
(`transformer_blocks.safetensors` + `unquantized_layers.safetensors` [+ `config.json`, `comfy_config.json`]).
Opening reads only the safetensors headers, classifies every key and validates every quantized tensor's
dtype and shape; tensor data is read one layer at a time, on request (a 7 GB file needs about one layer
of extra RAM, not the file's size). Every problem with a file raises CheckpointError naming the file, the
key, what was found and what was expected; a NaN or ±Inf in a float tensor when that tensor is read
(formats/finite.py).

Writing: `write_nunchaku(...)` packs plain layers (`layer.py`) with `packing.py` and writes one file (or a
legacy folder) through a temporary file and os.replace, so an error leaves no partial output.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

try:
    from safetensors import SafetensorError
except ImportError:  # safetensors < 0.4 only exports it from the Rust module
    from safetensors.safetensors_rust import SafetensorError

from .. import packing
from ..layer import GROUP_SIZE, SVDQuantLayer, W4A16Layer
from .finite import require_finite

LEGACY_BLOCKS = "transformer_blocks.safetensors"
LEGACY_UNQUANTIZED = "unquantized_layers.safetensors"

# Logical field (C++ name) -> key suffix in each naming (FORMAT.md §2 table).
SVDQ_KEYS = {
    "cpp": {f: f for f in ("qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up",
                           "wtscale", "wcscales")},
    "python": {"qweight": "qweight", "wscales": "wscales", "bias": "bias", "smooth": "smooth_factor",
               "smooth_orig": "smooth_factor_orig", "lora_down": "proj_down", "lora_up": "proj_up",
               "wtscale": "wtscale", "wcscales": "wcscales"},
}
SVDQ_REQUIRED = ("qweight", "wscales", "smooth", "lora_down", "lora_up")
W4A16_KEYS = ("qweight", "wscales", "wzeros", "bias")
W4A16_REQUIRED = ("qweight", "wscales", "wzeros")

# Inputs of the MLP down-projections after GELU: quantized unsigned after the σ shift in int4 files
# (FORMAT.md §1). FLUX C++ names, FLUX python names, and Qwen-Image's FeedForward (upstream
# NunchakuFeedForward marks every `net.2` unsigned; FORMAT.md lists only the FLUX names).
SHIFTED_SUFFIXES = ("mlp_fc2", "mlp_context_fc2", "ff.net.2", "ff_context.net.2", "img_mlp.net.2", "txt_mlp.net.2")

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_PRECISION_FROM_QCONFIG = {"int4": "int4", "fp4_e2m1_all": "nvfp4"}


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match the Nunchaku format."""


def is_shifted_name(name: str) -> bool:
    """True for the modules whose int4 activations are shifted by σ and quantized unsigned."""
    return any(name == s or name.endswith("." + s) for s in SHIFTED_SUFFIXES)


def adaln_chunks(name: str, N: int, K: int) -> int:
    """S, the number of (shift, scale, gate) chunks interleaved in an adaLN W4A16 layer: 6 for FLUX double
    blocks' norm1(_context).linear, 3 for single blocks' norm.linear, else N/K (Qwen-Image img_mod.1: 6)."""
    last = name.split(".")
    if last[-2:] in (["norm1", "linear"], ["norm1_context", "linear"]):
        return 6
    if last[-2:] == ["norm", "linear"]:
        return 3
    if K > 0 and N % K == 0 and (N // K) % 3 == 0:
        return N // K
    raise ValueError(f"{name}: cannot tell the adaLN chunk count of a W4A16 layer [N, K] = [{N}, {K}] "
                     f"(expected N = 3·K or 6·K, or a name ending in norm1.linear / norm.linear)")


def natural_key(s: str):
    """Sort key that orders `blocks.2` before `blocks.10`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else str(dtype)


class _Info:
    """Header entry of one tensor: file, key, dtype (None when torch has no such dtype), shape."""

    __slots__ = ("file", "key", "dtype", "dtype_str", "shape")

    def __init__(self, file: Path, key: str, dtype_str: str, shape):
        self.file, self.key, self.dtype_str, self.shape = file, key, dtype_str, tuple(shape)
        self.dtype = _SAFETENSORS_DTYPES.get(dtype_str)

    def describe(self) -> str:
        return f"shape {list(self.shape)} {_dtype_name(self.dtype or self.dtype_str)}"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (self.dtype.itemsize if self.dtype is not None else 0)


class NunchakuCheckpoint:
    """An open Nunchaku checkpoint. Use as a context manager (or call close()); tensors are read lazily.

    Attributes: path, metadata (raw str dict), config (dict), comfy_config (dict or None),
    quantization_config (dict or None), model_class (str or None), precision ('int4' | 'nvfp4'),
    naming ('cpp' | 'python').
    """

    def __init__(self, path):
        self.path = Path(path)
        self._stack = contextlib.ExitStack()
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise

    # -- opening and validation (headers only) --------------------------------------------------------------

    def _open(self) -> None:
        if self.path.is_dir():
            files = [self.path / LEGACY_BLOCKS, self.path / LEGACY_UNQUANTIZED]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{self.path}: legacy Nunchaku folder without {f.name} "
                                          f"(expected {LEGACY_BLOCKS} and {LEGACY_UNQUANTIZED})")
        elif self.path.is_file():
            files = [self.path]
        else:
            raise FileNotFoundError(f"{self.path}: no such file or folder (expected a Nunchaku .safetensors "
                                    f"file or a legacy folder with {LEGACY_BLOCKS})")

        self._handles: dict[Path, object] = {}
        self._info: dict[str, _Info] = {}
        header_metadata: dict[str, str] = {}
        for f in files:
            try:
                h = self._stack.enter_context(safe_open(str(f), framework="pt"))
                infos = []
                for k in h.keys():
                    s = h.get_slice(k)                 # header entry only; no tensor data is read
                    infos.append((k, s.get_dtype(), s.get_shape()))
                meta = h.metadata() or {}
            except SafetensorError as e:
                raise CheckpointError(f"{f}: cannot read the safetensors header ({e}); the file looks "
                                      f"truncated or corrupt") from e
            self._handles[f] = h
            for k, dt, shape in infos:
                if k in self._info:
                    raise CheckpointError(f"{f}: {k} also appears in {self._info[k].file}")
                self._info[k] = _Info(f, k, dt, shape)
            if f == self.path:
                header_metadata = dict(meta)

        if self.path.is_dir():
            self.metadata = {}
            for field, fname in (("config", "config.json"), ("comfy_config", "comfy_config.json")):
                p = self.path / fname
                if p.is_file():
                    self.metadata[field] = p.read_text(encoding="utf-8")
            where = {"config": self.path / "config.json", "comfy_config": self.path / "comfy_config.json"}
        else:
            self.metadata = header_metadata
            where = {}
        self.config = self._parse_json("config", where) or {}
        self.comfy_config = self._parse_json("comfy_config", where)
        self.quantization_config = self._parse_json("quantization_config", where)
        self.model_class: Optional[str] = self.metadata.get("model_class")

        self._classify()
        self.precision = self._detect_precision()
        for name in self._svdq:
            self._validate_svdquant(name)
        for name in self._w4a16:
            self._validate_w4a16(name)

    def _parse_json(self, field: str, where: dict) -> Optional[dict]:
        raw = self.metadata.get(field)
        if raw is None:
            return None
        source = f"{where[field]}" if field in where else f"{self.path}: metadata field '{field}'"
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{source} is not valid JSON ({e}); it starts with {raw[:60]!r}") from e
        if not isinstance(value, dict):
            raise CheckpointError(f"{source} holds a JSON {type(value).__name__}, expected a JSON object")
        return value

    def _classify(self) -> None:
        by_prefix: dict[str, dict[str, str]] = {}
        for key in self._info:
            prefix, _, suffix = key.rpartition(".")
            by_prefix.setdefault(prefix, {})[suffix] = key
        quantized = [p for p, s in by_prefix.items() if p and ("qweight" in s or "wscales" in s)]
        if not quantized:
            sample = ", ".join(sorted(self._info, key=natural_key)[:5]) or "no tensors"
            raise CheckpointError(f"{self.path}: not an SVDQuant/Nunchaku checkpoint: no tensor ends in .qweight "
                                  f"or .wscales (found {len(self._info)} tensors: {sample}...)")
        w4a16 = [p for p in quantized if "wzeros" in by_prefix[p]
                 or ("qweight" in by_prefix[p] and self._info[by_prefix[p]["qweight"]].dtype == torch.int32)]
        svdq = [p for p in quantized if p not in w4a16]

        cpp = [by_prefix[p][s] for p in svdq for s in ("lora_down", "lora_up", "smooth", "smooth_orig")
               if s in by_prefix[p]]
        py = [by_prefix[p][s] for p in svdq for s in ("proj_down", "proj_up", "smooth_factor", "smooth_factor_orig")
              if s in by_prefix[p]]
        if cpp and py:
            raise CheckpointError(f"{self.path}: mixes C++ key naming ({cpp[0]}) and Python key naming ({py[0]}); "
                                  f"expected one naming for the whole file")
        self.naming = "python" if py else "cpp"

        self._svdq: dict[str, dict[str, str]] = {}     # layer -> logical field -> key
        self._w4a16: dict[str, dict[str, str]] = {}
        owned = set()
        for p in svdq:
            self._svdq[p] = {f: by_prefix[p][s] for f, s in SVDQ_KEYS[self.naming].items() if s in by_prefix[p]}
            owned.update(self._svdq[p].values())
        for p in w4a16:
            self._w4a16[p] = {f: by_prefix[p][f] for f in W4A16_KEYS if f in by_prefix[p]}
            owned.update(self._w4a16[p].values())
        self._plain = {k for k in self._info if k not in owned}

    def _detect_precision(self) -> str:
        qc = self.quantization_config
        if qc is not None:
            weight = qc.get("weight") if isinstance(qc.get("weight"), dict) else {}
            dtype = weight.get("dtype")
            if dtype not in _PRECISION_FROM_QCONFIG:
                raise CheckpointError(f"{self.path}: metadata field 'quantization_config' has weight.dtype {dtype!r}, "
                                      f"expected 'int4' or 'fp4_e2m1_all'")
            precision = _PRECISION_FROM_QCONFIG[dtype]
            group = weight.get("group_size")
            if group is not None and group != GROUP_SIZE[precision]:
                raise CheckpointError(f"{self.path}: metadata field 'quantization_config' has weight.group_size "
                                      f"{group!r}, expected {GROUP_SIZE[precision]} for {dtype}")
            return precision
        fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
        return "nvfp4" if any(self._info[f["wscales"]].dtype in fp8 for f in self._svdq.values()
                              if "wscales" in f) else "int4"

    def _err(self, info: _Info, expected: str) -> CheckpointError:
        return CheckpointError(f"{info.file}: {info.key} has {info.describe()}, expected {expected}")

    def _missing(self, name: str, fields: dict, field: str, names: dict, required) -> CheckpointError:
        any_key = next(iter(fields.values()))
        have = ", ".join(sorted(self._info[k].key.rpartition(".")[2] for k in fields.values()))
        need = ", ".join(names[f] for f in required)
        return CheckpointError(f"{self._info[any_key].file}: {name}.{names[field]} is missing: layer {name} has "
                               f"[{have}] but needs [{need}]")

    def _validate_svdquant(self, name: str) -> None:
        fields = self._svdq[name]
        names = SVDQ_KEYS[self.naming]
        for f in SVDQ_REQUIRED:
            if f not in fields:
                raise self._missing(name, fields, f, names, SVDQ_REQUIRED)
        info = {f: self._info[k] for f, k in fields.items()}
        P, G = self.precision, GROUP_SIZE[self.precision]
        tag = f"for {P} group {G}"

        s = info["smooth"]
        if len(s.shape) != 1 or s.shape[0] % packing.TILE or s.dtype not in _FLOAT_DTYPES:
            raise self._err(s, f"[K] bf16/fp16/fp32 with K a multiple of {packing.TILE} (writers pad)")
        K = s.shape[0]
        ws = info["wscales"]
        ws_dtype = torch.float8_e4m3fn if P == "nvfp4" else None
        ws_dtype_ok = ws.dtype == ws_dtype if ws_dtype else ws.dtype in _FLOAT_DTYPES
        ws_dtype_text = "float8_e4m3fn" if ws_dtype else "bf16/fp16/fp32"
        if len(ws.shape) != 2 or ws.shape[1] % packing.TILE:
            raise self._err(ws, f"[K/G, N] = [{K // G}, N] {ws_dtype_text} with N a multiple of {packing.TILE} {tag}")
        N = ws.shape[1]
        if ws.shape[0] != K // G or not ws_dtype_ok:
            raise self._err(ws, f"[K/G, N] = [{K // G}, {N}] {ws_dtype_text} {tag}")
        q = info["qweight"]
        if q.shape != (N, K // 2) or q.dtype != torch.int8:
            raise self._err(q, f"[N, K/2] = [{N}, {K // 2}] int8 {tag}")

        down, up = info["lora_down"], info["lora_up"]
        if (len(down.shape) != 2 or down.shape[0] != K or down.shape[1] % packing.LORA_TILE
                or down.dtype not in _FLOAT_DTYPES):
            raise self._err(down, f"[K, R] = [{K}, R] bf16/fp16/fp32 with R a multiple of {packing.LORA_TILE}")
        R = down.shape[1]
        if len(up.shape) != 2 or up.shape[0] != N or up.dtype not in _FLOAT_DTYPES:
            raise self._err(up, f"[N, R] = [{N}, {R}] bf16/fp16/fp32")
        if up.shape[1] != R:
            raise CheckpointError(f"{up.file}: {up.key} has {up.describe()}, expected [N, R] = [{N}, {R}]: "
                                  f"inconsistent rank, {down.key} has rank {R} but {up.key} has rank {up.shape[1]}")

        for f, n in (("bias", N), ("smooth_orig", K), ("wcscales", N)):
            t = info.get(f)
            if t is not None and (t.shape != (n,) or t.dtype not in _FLOAT_DTYPES):
                raise self._err(t, f"[{n}] bf16/fp16/fp32")
        t = info.get("wtscale")
        if t is not None and (math.prod(t.shape) != 1 or len(t.shape) > 1 or t.dtype not in _FLOAT_DTYPES):
            raise self._err(t, "[1] bf16/fp16/fp32 (one per-tensor scale)")
        for f in ("wtscale", "wcscales"):
            if P == "int4" and f in info:
                raise self._err(info[f], f"no {names[f]} in an int4 checkpoint (nvfp4 only)")

    def _validate_w4a16(self, name: str) -> None:
        fields = self._w4a16[name]
        names = {f: f for f in W4A16_KEYS}
        for f in W4A16_REQUIRED:
            if f not in fields:
                raise self._missing(name, fields, f, names, W4A16_REQUIRED)
        info = {f: self._info[k] for f, k in fields.items()}
        q = info["qweight"]
        if len(q.shape) != 2 or q.dtype != torch.int32 or q.shape[1] % (packing.AWQ_GROUP // 2):
            raise self._err(q, f"[N/4, K/2] int32 with K a multiple of {packing.AWQ_GROUP} (W4A16 AWQ-packed codes)")
        N, K = q.shape[0] * 4, q.shape[1] * 2
        G = math.ceil(K / packing.AWQ_GROUP)
        rows = sorted({G, -(-G // 16) * 16})
        for f in ("wscales", "wzeros"):
            t = info[f]
            if len(t.shape) != 2 or t.shape[0] not in rows or t.shape[1] != N or t.dtype not in _FLOAT_DTYPES:
                raise self._err(t, f"[ceil(K/64), N] = [{G}, {N}] bf16/fp16/fp32 (or {rows[-1]} group rows, "
                                   f"padded to 16)")
        b = info.get("bias")
        if b is not None and (b.shape != (N,) or b.dtype not in _FLOAT_DTYPES):
            raise self._err(b, f"[{N}] bf16/fp16/fp32")
        try:
            S = adaln_chunks(name, N, K)
        except ValueError as e:
            raise CheckpointError(f"{q.file}: {e}") from e
        if N % S:
            raise self._err(q, f"N = 4·{q.shape[0]} divisible by the {S} adaLN chunks of {name}")

    # -- public API -------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "NunchakuCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def svdquant_layer_names(self) -> list[str]:
        return sorted(self._svdq, key=natural_key)

    def w4a16_layer_names(self) -> list[str]:
        return sorted(self._w4a16, key=natural_key)

    def plain_tensor_names(self) -> list[str]:
        return sorted(self._plain, key=natural_key)

    def layer_kind(self, name: str) -> str:
        """'svdquant', 'w4a16' or 'plain' (a plain tensor key)."""
        if name in self._svdq:
            return "svdquant"
        if name in self._w4a16:
            return "w4a16"
        if name in self._plain:
            return "plain"
        raise KeyError(f"{self.path}: no layer or plain tensor named {name!r}")

    def file_of(self, name: str) -> Path:
        """The file holding a layer or plain tensor: the checkpoint itself, or one file of a legacy folder."""
        fields = self._svdq.get(name) or self._w4a16.get(name)
        return self._info[next(iter(fields.values())) if fields else name].file

    def _load(self, key: str, finite: bool = True) -> torch.Tensor:
        """One tensor's data; a float tensor holding NaN/Inf raises (finite=False skips that check)."""
        info = self._info[key]
        try:
            t = self._handles[info.file].get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{info.file}: reading {key} failed ({e}); the file looks truncated or corrupt") from e
        if finite:
            require_finite(t, f"{info.file}: {key}", CheckpointError)
        return t

    def svdquant_layer(self, name: str) -> SVDQuantLayer:
        """The unpacked W4A4 layer (N, K as stored, i.e. padded to 128; R = stored low-rank width)."""
        fields = self._svdq[name]
        # smooth_orig is carried through files but unused at run time: a NaN there harms no image
        tensors = {f: self._load(k, finite=f != "smooth_orig") for f, k in fields.items()}
        shifted = self.precision == "int4" and is_shifted_name(name)
        file = self._info[fields["qweight"]].file
        try:
            return packing.unpack_svdquant_layer(tensors, self.precision, shifted).validate(f"{file}: {name}")
        except ValueError as e:
            raise CheckpointError(str(e)) from e

    def w4a16_layer(self, name: str) -> W4A16Layer:
        """The unpacked adaLN layer: rows de-interleaved, the folded +1 removed (bias in fp32), group 64."""
        fields = self._w4a16[name]
        tensors = {f: self._load(k) for f, k in fields.items()}
        q = self._info[fields["qweight"]]
        S = adaln_chunks(name, q.shape[0] * 4, q.shape[1] * 2)
        try:
            return packing.unpack_w4a16_layer(tensors, S).validate(f"{q.file}: {name}")
        except ValueError as e:
            raise CheckpointError(str(e)) from e

    def plain_tensor(self, name: str) -> torch.Tensor:
        if name not in self._plain:
            raise KeyError(f"{self.path}: {name!r} is not a plain tensor (see plain_tensor_names())")
        return self._load(name)

    def layer_summary(self, name: str) -> dict:
        """Sizes from the headers only. params counts stored values (a 4-bit code counts as one value);
        bytes is the layer's tensors' size in the file. N, K as stored (padded); R the stored rank."""
        kind = self.layer_kind(name)
        if kind == "svdquant":
            info = {f: self._info[k] for f, k in self._svdq[name].items()}
            N, K = info["qweight"].shape[0], info["qweight"].shape[1] * 2
            R, G, precision = info["lora_down"].shape[1], GROUP_SIZE[self.precision], self.precision
            shifted = precision == "int4" and is_shifted_name(name)
            codes_key = "qweight"
        elif kind == "w4a16":
            info = {f: self._info[k] for f, k in self._w4a16[name].items()}
            N, K = info["qweight"].shape[0] * 4, info["qweight"].shape[1] * 2
            R, G, precision, shifted, codes_key = 0, packing.AWQ_GROUP, "uint4", False, "qweight"
        else:
            t = self._info[name]
            info = {"tensor": t}
            N, K = (t.shape[0], t.shape[1]) if len(t.shape) == 2 else (None, None)
            R, G, precision, shifted, codes_key = None, None, _dtype_name(t.dtype or t.dtype_str), False, None
        params = sum(N * K if f == codes_key else math.prod(t.shape) for f, t in info.items())
        return dict(kind=kind, N=N, K=K, R=R, G=G, precision=precision, shifted=shifted, params=params,
                    bytes=sum(t.nbytes for t in info.values()))


def open_nunchaku(path) -> NunchakuCheckpoint:
    """Open a Nunchaku checkpoint (single .safetensors or legacy folder) lazily; validates all headers."""
    return NunchakuCheckpoint(path)


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------

def default_quantization_config(precision: str, rank: int) -> dict:
    """The `quantization_config` the original tools write (FORMAT.md §2)."""
    fp4 = precision == "nvfp4"
    dtype, G = ("fp4_e2m1_all" if fp4 else "int4"), GROUP_SIZE[precision]
    return {
        "method": "svdquant",
        "weight": {"dtype": dtype, "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None, "group_size": G},
        "activation": {"dtype": dtype, "scale_dtype": "fp8_e4m3_nan" if fp4 else None, "group_size": G},
        "rank": rank,
    }


def atomic_write(dest: Path, write) -> None:
    """Call write(tmp_path) on a temporary file next to dest, then rename it over dest."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def pack_nunchaku_state_dict(*, svdquant: dict, w4a16: dict, plain: dict, naming: str = "cpp") -> dict:
    """Packed tensors keyed as in a Nunchaku file. Raises ValueError on inconsistent input."""
    if naming not in SVDQ_KEYS:
        raise ValueError(f"naming {naming!r}, expected 'cpp' or 'python'")
    out: dict[str, torch.Tensor] = {}

    def put(key, t):
        if key in out:
            raise ValueError(f"two tensors would be written under the key {key}")
        out[key] = t

    precisions = {layer.precision for layer in svdquant.values()}
    if len(precisions) > 1:
        raise ValueError(f"one checkpoint holds one precision, got SVDQuant layers in {sorted(precisions)}")
    for name, layer in svdquant.items():
        if layer.precision == "int4" and layer.shifted != is_shifted_name(name):
            raise ValueError(f"{name}: shifted={layer.shifted}, but readers pick shifted layers by name "
                             f"(shifted iff the name ends in one of {SHIFTED_SUFFIXES})")
        for field, t in packing.pack_svdquant_layer(layer).items():
            put(f"{name}.{SVDQ_KEYS[naming][field]}", t)
    for name, layer in w4a16.items():
        # S from the 64-padded K, exactly as a reader computes it from the stored qweight
        S = adaln_chunks(name, layer.N, -(-layer.K // packing.AWQ_GROUP) * packing.AWQ_GROUP)
        for field, t in packing.pack_w4a16_layer(layer, S).items():
            put(f"{name}.{field}", t)
    for name, t in plain.items():
        put(name, t.contiguous())
    return out


def write_nunchaku(path, *, svdquant: dict, w4a16: dict, plain: dict, config: dict,
                   comfy_config: Optional[dict], model_class: str, quantization_config: Optional[dict] = None,
                   naming: str = "cpp", extra_metadata: Optional[dict] = None, legacy_folder: bool = False) -> Path:
    """Write a Nunchaku checkpoint: one .safetensors with `config`, `comfy_config`, `model_class` and
    `quantization_config` metadata (JSON strings, FORMAT.md §2), or with legacy_folder=True a folder with
    transformer_blocks.safetensors (block tensors), unquantized_layers.safetensors (the rest), config.json
    and comfy_config.json (that layout has no place for model_class, quantization_config or extra_metadata).
    quantization_config defaults to one derived from the layers' precision and the (16-padded) rank of the
    first layer. SVDQuant layers are padded to N, K multiples of 128, W4A16 group rows to 16 (as
    DeepCompressor writes them). Raises ValueError on inconsistent input, before anything is written."""
    path = Path(path)
    tensors = pack_nunchaku_state_dict(svdquant=svdquant, w4a16=w4a16, plain=plain, naming=naming)
    if quantization_config is None:
        if not svdquant:
            raise ValueError("no SVDQuant layers to derive quantization_config from: pass it explicitly")
        first = svdquant[min(svdquant, key=natural_key)]
        quantization_config = default_quantization_config(first.precision, -(-first.R // 16) * 16)
    metadata = {"config": json.dumps(config), "model_class": model_class,
                "quantization_config": json.dumps(quantization_config)}
    if comfy_config is not None:
        metadata["comfy_config"] = json.dumps(comfy_config)
    for k, v in (extra_metadata or {}).items():
        if k in metadata or not isinstance(v, str):
            raise ValueError(f"extra_metadata[{k!r}]: must be a str and not one of {sorted(metadata)}")
        metadata[k] = v

    if not legacy_folder:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        return path

    path.mkdir(parents=True, exist_ok=True)
    quantized_prefixes = set(svdquant) | set(w4a16)
    blocks = {k: t for k, t in tensors.items()
              if k.rpartition(".")[0] in quantized_prefixes
              or k.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    rest = {k: t for k, t in tensors.items() if k not in blocks}
    atomic_write(path / LEGACY_BLOCKS, lambda tmp: save_file(blocks, tmp))
    atomic_write(path / LEGACY_UNQUANTIZED, lambda tmp: save_file(rest, tmp))
    texts = {"config.json": metadata["config"]}
    if comfy_config is not None:
        texts["comfy_config.json"] = metadata["comfy_config"]
    for fname, text in texts.items():
        atomic_write(path / fname, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
    return path
