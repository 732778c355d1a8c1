"""Nunchaku's 4-bit T5 encoder file (FORMAT.md §5): validating lazy reader and streaming writer.

One .safetensors with Hugging Face T5EncoderModel key names (ComfyUI's comfy/text_encoders/t5.py uses the
same names). Every nn.Linear that has `<name>.qweight` is W4A16, uint4, group 128:
  qweight       int16 [N/4, K]  codes in the AWQ interleave (packing.pack_awq_qweight, FORMAT.md §4)
  scales        [Gp, N]         Gp = ceil(K/128) rounded up to a multiple of 8: TinyChat sizes the group axis
  scaled_zeros  [Gp, N]         to whole int32s of 8 groups (its ceil_num_groups); padding rows are zero.
                                w = q·scales + scaled_zeros, q in 0..15
  bias          [N]             optional
Every other linear keeps `<name>.weight`; embeddings, layer norms and the relative attention bias stay
16-bit. Metadata `config` is the T5Config JSON; we also write `quantization_config` (the published file
has none, then group 128 is implied).

The reader checks the header against the config before any tensor is read, so a wrong file (a DiT
checkpoint, a truncated download, a config that does not match the weights) fails at once with the file,
the key, what was found and what was expected.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from ..layer import W4A16Layer
from ..packing import pack_awq_qweight, unpack_awq_qweight
from .finite import require_finite
from .safetensors_stream import DTYPES_BY_NAME, StreamingSafetensorsWriter

GROUP_SIZE = 128
GROUP_ROWS_MULTIPLE = 8          # TinyChat's padding of the group axis (see module docstring)
QUANTIZATION_CONFIG = {"method": "awq", "weight": {"dtype": "uint4", "group_size": GROUP_SIZE,
                                                   "zeros": "scaled"}, "activation": None}

_FLOAT16 = (torch.bfloat16, torch.float16, torch.float32)
# ComfyUI's T5 implements exactly these activations; gelu_new is HF's name for the tanh approximation.
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_pytorch_tanh", "gelu_new": "gelu_pytorch_tanh", "relu": "relu"}
_REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers")
_DIT_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.", "double_blocks.", "single_blocks.",
                 "model.diffusion_model.")


def _fail(where: str, msg: str) -> None:
    raise ValueError(f"{where}: {msg}")


# ------------------------------------------------------------------------------------------------ config

def normalize_config(raw: Mapping, where: str = "T5 config") -> dict:
    """A T5Config dict (as HF writes it, or ComfyUI's t5_config_xxl.json) -> the canonical dict used here:
    the keys ComfyUI's T5 reads plus the norm epsilon and relative-attention bucket settings.
    `feed_forward_proj` ("gated-gelu", "relu") is honoured when dense_act_fn / is_gated_act are absent."""
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        _fail(where, f"T5 config lacks {missing}; it needs {list(_REQUIRED)}")
    ff = str(raw.get("feed_forward_proj", "gated-gelu"))
    act = raw.get("dense_act_fn", ff.split("-")[-1] if ff != "gated-gelu" else "gelu_new")
    if act not in _ACTIVATIONS:
        _fail(where, f"dense_act_fn {act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    cfg = {k: int(raw[k]) for k in _REQUIRED}
    cfg.update(
        dense_act_fn=_ACTIVATIONS[act],
        is_gated_act=bool(raw.get("is_gated_act", ff.startswith("gated-"))),
        model_type=str(raw.get("model_type", "t5")),
        layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-6)),
        relative_attention_num_buckets=int(raw.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(raw.get("relative_attention_max_distance", 128)),
    )
    if cfg["model_type"] not in ("t5", "umt5"):
        _fail(where, f"model_type {cfg['model_type']!r}, expected 't5' or 'umt5'")
    if min(cfg[k] for k in _REQUIRED) <= 0:
        _fail(where, f"T5 config sizes must be positive, got { {k: cfg[k] for k in _REQUIRED} }")
    return cfg


def hf_config(cfg: Mapping) -> dict:
    """The canonical config as a T5Config JSON dict for the file's `config` metadata."""
    out = dict(cfg)
    out.update(architectures=["T5EncoderModel"], is_encoder_decoder=False, use_cache=False,
               feed_forward_proj=("gated-" if cfg["is_gated_act"] else "") +
               ("gelu" if cfg["dense_act_fn"] != "relu" else "relu"),
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
    return out


def _describe(cfg: Mapping) -> str:
    return ", ".join(f"{k}={cfg[k]}" for k in _REQUIRED)


def linear_shapes(cfg: Mapping) -> dict[str, tuple[int, int]]:
    """Every linear of the encoder -> (N, K), in file order."""
    D, F, inner = cfg["d_model"], cfg["d_ff"], cfg["d_kv"] * cfg["num_heads"]
    ff = (("wi_0", F, D), ("wi_1", F, D)) if cfg["is_gated_act"] else (("wi", F, D),)
    out = {}
    for i in range(cfg["num_layers"]):
        b = f"encoder.block.{i}.layer"
        for name, N, K in (("q", inner, D), ("k", inner, D), ("v", inner, D), ("o", D, inner)):
            out[f"{b}.0.SelfAttention.{name}"] = (N, K)
        for name, N, K in ff + (("wo", D, F),):
            out[f"{b}.1.DenseReluDense.{name}"] = (N, K)
    return out


def plain_shapes(cfg: Mapping) -> dict[str, tuple[int, ...]]:
    """Every 16-bit non-linear tensor -> shape, in file order."""
    D = cfg["d_model"]
    out = {"shared.weight": (cfg["vocab_size"], D)}
    for i in range(cfg["num_layers"]):
        b = f"encoder.block.{i}.layer"
        out[f"{b}.0.layer_norm.weight"] = (D,)
        if i == 0 or cfg["model_type"] == "umt5":       # T5 shares block 0's bias; UMT5 has one per block
            out[f"{b}.0.SelfAttention.relative_attention_bias.weight"] = (
                cfg["relative_attention_num_buckets"], cfg["num_heads"])
        out[f"{b}.1.layer_norm.weight"] = (D,)
    out["encoder.final_layer_norm.weight"] = (D,)
    return out


def block_of(key: str) -> int:
    """Block index of a key (-1 before the blocks: shared.weight; num_layers after: the final norm)."""
    if key.startswith("encoder.block."):
        return int(key.split(".")[2])
    return -1 if key == "shared.weight" else 1 << 30


def file_order(cfg: Mapping, quantized: Iterable[str]) -> list[tuple[str, torch.dtype, tuple]]:
    """(key, dtype placeholder, shape) of every tensor in the order the writer emits them: the embedding,
    then block by block (norms and bias first, then its linears), then the final norm. A quantized linear
    contributes qweight, scales, scaled_zeros; a plain one its weight. dtype is None for 16-bit tensors."""
    quantized = set(quantized)
    entries: list[tuple[str, Optional[torch.dtype], tuple]] = []
    plain = plain_shapes(cfg)
    linears = linear_shapes(cfg)
    unknown = quantized - set(linears)
    if unknown:
        _fail("T5 writer", f"quantized names {sorted(unknown)[:3]} are not linears of this T5 config")
    for i in [-1] + list(range(cfg["num_layers"])) + [1 << 30]:
        entries += [(k, None, s) for k, s in plain.items() if block_of(k) == i]
        for name, (N, K) in linears.items():
            if block_of(name) != i:
                continue
            if name in quantized:
                Gp = _padded_groups(K)
                entries += [(f"{name}.qweight", torch.int16, (N // 4, K)),
                            (f"{name}.scales", None, (Gp, N)), (f"{name}.scaled_zeros", None, (Gp, N))]
            else:
                entries.append((f"{name}.weight", None, (N, K)))
    return entries


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _padded_groups(K: int) -> int:
    return _round_up(math.ceil(K / GROUP_SIZE), GROUP_ROWS_MULTIPLE)


# ------------------------------------------------------------------------------------------- one linear

def pack_t5_linear(layer: W4A16Layer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """W4A16Layer (group 128) -> the file's tensors: qweight int16 [N/4, K], scales and scaled_zeros
    [Gp, N] in `dtype` (zero rows pad the group axis to a multiple of 8), bias [N] if present."""
    layer.validate()
    if layer.group_size != GROUP_SIZE:
        _fail("T5 writer", f"layer group size {layer.group_size}, the 4-bit T5 format uses {GROUP_SIZE}")
    if layer.K % 64 or layer.N % 4:
        _fail("T5 writer", f"layer [N, K] = [{layer.N}, {layer.K}]: the AWQ layout needs N % 4 == 0, K % 64 == 0")
    Gp = _padded_groups(layer.K)

    def groups(t: torch.Tensor) -> torch.Tensor:                         # [N, G] -> [Gp, N], zero padded
        out = torch.zeros(Gp, layer.N, dtype=dtype)
        out[: t.shape[1]] = t.T.to(dtype)
        return out

    out = {"qweight": pack_awq_qweight(layer.codes, torch.int16),
           "scales": groups(layer.scales), "scaled_zeros": groups(layer.zeros)}
    if layer.bias is not None:
        out["bias"] = layer.bias.to(dtype)
    return out


def unpack_t5_linear(tensors: Mapping[str, torch.Tensor], K: int, where: str = "T5 linear") -> W4A16Layer:
    """The file's tensors of one linear (qweight, scales, scaled_zeros, optional bias) -> W4A16Layer with
    codes [N, K] in row order, scales/zeros [N, ceil(K/128)] in the stored dtype. Only the first
    ceil(K/128) group rows are read."""
    G = math.ceil(K / GROUP_SIZE)

    def per_row(t: torch.Tensor) -> torch.Tensor:                     # [Gp, N] -> dense [N, G]
        return torch.empty(t.shape[1], G, dtype=t.dtype).copy_(t[:G].T)

    layer = W4A16Layer(codes=unpack_awq_qweight(tensors["qweight"], K), scales=per_row(tensors["scales"]),
                       zeros=per_row(tensors["scaled_zeros"]), bias=tensors.get("bias"), group_size=GROUP_SIZE)
    return layer.validate(where)


# ---------------------------------------------------------------------------------------------- reading

class T5File:
    """An opened, header-validated 4-bit T5 file. Tensors are read on demand (safe_open, mmap).

    config:    canonical T5 config (normalize_config) from the `config` metadata
    dtype:     dtype of the 16-bit tensors (that of shared.weight)
    quantized: names of the W4A16 linears; plain_linears: names of the linears stored as `.weight`
    """

    def __init__(self, path: str, config: dict, dtype: torch.dtype, quantized: list[str],
                 plain_linears: list[str], keys: list[str], metadata: dict):
        self.path, self.config, self.dtype = path, config, dtype
        self.quantized, self.plain_linears, self.keys, self.metadata = quantized, plain_linears, keys, metadata

    def _open(self):
        return safe_open(self.path, framework="pt", device="cpu")

    def _read(self, f, key: str) -> torch.Tensor:
        t = f.get_tensor(key)
        require_finite(t, f"{self.path}: {key}")      # a NaN/Inf scale, zero, norm or embedding: refuse the file
        return t

    def tensor(self, key: str) -> torch.Tensor:
        with self._open() as f:
            return self._read(f, key)

    def linear_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The stored tensors of one quantized linear, keyed qweight / scales / scaled_zeros / bias."""
        with self._open() as f:
            return {s: self._read(f, f"{name}.{s}") for s in ("qweight", "scales", "scaled_zeros", "bias")
                    if f"{name}.{s}" in self.keys}

    def layer(self, name: str) -> W4A16Layer:
        N, K = linear_shapes(self.config)[name]
        return unpack_t5_linear(self.linear_tensors(name), K, f"{self.path}: {name}")


def _is_dit(keys: list[str], metadata: dict) -> bool:
    # Nunchaku DiT files also carry a `config` (the diffusers transformer config): look at keys and the
    # DiT-only metadata first.
    return any(k.startswith(_DIT_PREFIXES) for k in keys) or "comfy_config" in metadata or "model_class" in metadata


def _wrong_kind(path: str, keys: list[str], metadata: dict) -> str:
    """Explain a file that is not a T5 file with config metadata."""
    if _is_dit(keys, metadata):
        return ("this is a FLUX diffusion-model (DiT) checkpoint, not a T5 text encoder. Load it with the "
                "'SVDQuant Flux Loader'; the text encoder loader needs the 4-bit T5 file "
                "(e.g. awq-int4-flux.1-t5xxl.safetensors)")
    if any(k.startswith("text_model.") for k in keys):
        return "this is a CLIP text encoder; select it as clip_l and pick the 4-bit T5 file as t5"
    if any(k.startswith("encoder.block.") for k in keys):
        return ("this T5 file has no 'config' metadata (T5Config JSON), so it is not in the Nunchaku 4-bit T5 "
                "format. Convert it with `python -m nunchaku_core quantize-t5 IN OUT`, or load a plain T5 "
                "with ComfyUI's DualCLIPLoader")
    return "no 'config' metadata and no T5 keys (encoder.block.*): not a Nunchaku 4-bit T5 file"


def open_t5(path: str) -> T5File:
    """Open and validate a 4-bit T5 file from its header alone (no tensor data is read)."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            header = {k: (DTYPES_BY_NAME.get(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in keys}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable .safetensors file ({e}); the file is truncated or corrupt, "
                         f"download it again") from None
    if "config" not in metadata or _is_dit(keys, metadata):
        _fail(path, _wrong_kind(path, keys, metadata))
    try:
        raw = json.loads(metadata["config"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata 'config' is not valid JSON ({e})") from None
    cfg = normalize_config(raw, f"{path}: metadata 'config'")
    if "quantization_config" in metadata:
        qc = json.loads(metadata["quantization_config"])
        G = (qc.get("weight") or {}).get("group_size", GROUP_SIZE)
        if qc.get("method") == "svdquant":
            _fail(path, _wrong_kind(path, ["transformer_blocks."], metadata))
        if G != GROUP_SIZE:
            _fail(path, f"quantization_config group_size {G}, the 4-bit T5 format uses {GROUP_SIZE}")

    want = f"(from the file's T5 config: {_describe(cfg)}; the config does not match the weights)"
    linears = linear_shapes(cfg)
    plain = plain_shapes(cfg)
    if "shared.weight" not in header and "encoder.embed_tokens.weight" in header:
        plain["encoder.embed_tokens.weight"] = plain.pop("shared.weight")
    extra = [k for k in keys if k != "encoder.embed_tokens.weight" and k not in plain and
             k.rsplit(".", 1)[0] not in linears]
    if extra:
        n = max(block_of(k) for k in extra if k.startswith("encoder.block.")) + 1 \
            if any(k.startswith("encoder.block.") for k in extra) else None
        hint = f"the file has {n} blocks but config num_layers = {cfg['num_layers']}; " if n else ""
        _fail(path, f"unexpected tensors {extra[:4]}{' ...' if len(extra) > 4 else ''}: {hint}{want}")

    def check(key: str, dtypes, shape: Optional[tuple], what: str) -> None:
        if key not in header:
            _fail(path, f"missing tensor {key}, expected {what} {list(shape or ())} {want}")
        dt, found = header[key]
        if dt not in dtypes:
            _fail(path, f"{key} has dtype {dt}, expected {what}")
        if shape is not None and found != tuple(shape):
            _fail(path, f"{key} has shape {list(found)}, expected {what} {list(shape)} {want}")

    for key, shape in plain.items():
        check(key, _FLOAT16, shape, "a 16-bit tensor")
    quantized, plain_linears = [], []
    for name, (N, K) in linears.items():
        if f"{name}.qweight" in header:
            if K % 64 or N % 4:
                _fail(path, f"{name} is [N, K] = [{N}, {K}]; the AWQ layout needs N % 4 == 0 and K % 64 == 0")
            check(f"{name}.qweight", (torch.int16,), (N // 4, K), f"int16 [N/4, K] for N={N}, K={K}:")
            G = math.ceil(K / GROUP_SIZE)
            for s in ("scales", "scaled_zeros"):
                key = f"{name}.{s}"
                check(key, _FLOAT16, None, f"a 16-bit [ceil(K/128), N] = [{G}, {N}] tensor")
                found = header[key][1]
                if len(found) != 2 or found[0] < G or found[1] != N:
                    _fail(path, f"{key} has shape {list(found)}, expected at least [{G}, {N}] "
                                f"(ceil(K/128) group rows for K={K}) {want}")
            if f"{name}.bias" in header:
                check(f"{name}.bias", _FLOAT16, (N,), "a 16-bit bias")
            quantized.append(name)
        else:
            check(f"{name}.weight", _FLOAT16, (N, K), f"a 16-bit weight or a 4-bit {name}.qweight:")
            plain_linears.append(name)
    dtype = header[next(iter(plain))][0]
    return T5File(path, cfg, dtype, quantized, plain_linears, keys, metadata)


# ---------------------------------------------------------------------------------------------- writing

class T5Writer:
    """Stream a T5 file to disk one tensor at a time (peak memory: one tensor).

    Call put_tensor / put_linear in file_order(config, quantized): the embedding, then per block its norms
    (and relative attention bias), then its linears, then the final norm. Use as a context manager; the file
    appears only when every tensor was written.
    """

    def __init__(self, path: str, config: Mapping, quantized: Iterable[str], dtype: torch.dtype = torch.bfloat16,
                 extra_metadata: Optional[Mapping[str, str]] = None):
        if dtype not in (torch.bfloat16, torch.float16):
            _fail(path, f"dtype {dtype}, expected bfloat16 or float16")
        self.config = normalize_config(config, f"{path}: config")
        self.quantized = set(quantized)
        self.dtype = dtype
        entries = [(k, dt or dtype, s) for k, dt, s in file_order(self.config, self.quantized)]
        metadata = {"config": json.dumps(hf_config(self.config))}
        if self.quantized:
            metadata["quantization_config"] = json.dumps(QUANTIZATION_CONFIG)
        metadata.update(extra_metadata or {})
        self._out = StreamingSafetensorsWriter(path, entries, metadata)
        self.order = [k for k, _, _ in entries]

    def __enter__(self) -> "T5Writer":
        self._out.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._out.__exit__(*exc)

    def put_tensor(self, key: str, t: torch.Tensor) -> None:
        self._out.write(key, t.to(self.dtype))

    def put_linear(self, name: str, layer: Union[W4A16Layer, torch.Tensor]) -> None:
        """A quantized linear (W4A16Layer, group 128) or a plain one (weight tensor [N, K])."""
        if name in self.quantized:
            if not isinstance(layer, W4A16Layer):
                _fail(self._out.path, f"{name} was declared quantized but got a {type(layer).__name__}")
            if layer.bias is not None:
                _fail(self._out.path, f"{name} has a bias; T5 linears have none (ComfyUI's T5 cannot load one)")
            for suffix, t in pack_t5_linear(layer, self.dtype).items():
                self._out.write(f"{name}.{suffix}", t)
        else:
            if not isinstance(layer, torch.Tensor):
                _fail(self._out.path, f"{name} was declared plain (16-bit) but got a {type(layer).__name__}")
            self.put_tensor(f"{name}.weight", layer)


    def put_packed(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """A quantized linear already in the file layout (qweight, scales, scaled_zeros), e.g. copied from
        another file; shapes and dtypes are checked by the stream writer."""
        for suffix in ("qweight", "scales", "scaled_zeros"):
            self._out.write(f"{name}.{suffix}", tensors[suffix])


def write_t5(path: str, config: Mapping, tensors: Mapping[str, Union[W4A16Layer, torch.Tensor]],
             dtype: torch.dtype = torch.bfloat16) -> None:
    """Write a whole in-memory encoder: `tensors` maps every plain key (shared.weight, norms, bias) to a tensor
    and every linear name to a W4A16Layer (quantized) or a weight tensor (plain; `<name>.weight` works too)."""
    cfg = normalize_config(config, f"{path}: config")
    linears = linear_shapes(cfg)
    tensors = dict(tensors)
    for name in linears:
        if name not in tensors and f"{name}.weight" in tensors:
            tensors[name] = tensors[f"{name}.weight"]
    missing = [k for k in list(plain_shapes(cfg)) + list(linears) if k not in tensors]
    if missing:
        _fail(path, f"write_t5 is missing {missing[:4]} for the config {_describe(cfg)}")
    quantized = [n for n in linears if isinstance(tensors[n], W4A16Layer)]
    with T5Writer(path, cfg, quantized, dtype) as w:
        for key in w.order:
            name = key.rsplit(".", 1)[0]
            if name in linears:
                if key == f"{name}.qweight" or key == f"{name}.weight":
                    w.put_linear(name, tensors[name])
            else:
                w.put_tensor(key, tensors[key])
