"""Read an unquantized FLUX.1 transformer lazily, one block at a time, as BFL (ComfyUI) tensors.

Inputs: a ComfyUI/BFL single file (with or without the `model.diffusion_model.` prefix), or diffusers
weights (a transformer folder with sharded safetensors and an index, a pipeline folder with `transformer/`,
or a single diffusers-named file). Diffusers names are converted to BFL: separate to_q/to_k/to_v (and
proj_mlp for single blocks) are concatenated into qkv / linear1, norm_out.linear's halves are swapped.

Tensors are read with plain positioned reads from the safetensors header offsets, not through mmap: a
mapped 24 GB file keeps every touched page in this process's resident set until it is unmapped, which
would break the "output plus two blocks" memory bound the quantizer promises.

The variant (dev, schnell, Fill, Depth/Canny; Kontext has dev's shapes) is detected from the weights.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
import torch

from . import flux
from ..formats.safetensors_stream import DTYPES_BY_NAME

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
SUPPORTED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# Keys and metadata that mark a file as already quantized (Nunchaku, ComfyUI mixed precision / scaled fp8,
# bitsandbytes/torchao style scales).
QUANTIZED_SUFFIXES = (".qweight", ".wscales", ".wzeros", ".lora_down", ".proj_down", ".smooth_factor", ".smooth",
                      ".comfy_quant", ".scale_weight", ".weight_scale", ".absmax", ".quant_state")
QUANTIZED_KEYS = ("scaled_fp8",)
QUANTIZED_METADATA = ("quantization_config", "_quantization_metadata")

# diffusers -> BFL, per double block: BFL module -> diffusers modules concatenated along the rows.
DIFFUSERS_DOUBLE = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
DIFFUSERS_SINGLE = {
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
}
DIFFUSERS_DOUBLE_NORMS = {bfl: "attn." + cpp for bfl, cpp, _ in flux.DOUBLE_NORMS}
DIFFUSERS_SINGLE_NORMS = {bfl: "attn." + cpp for bfl, cpp, _ in flux.SINGLE_NORMS}


class FluxSourceError(ValueError):
    """The input is not an unquantized FLUX.1 transformer we can read."""


class SafetensorsFile:
    """Header of one .safetensors file plus positioned reads of single tensors (no mmap)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise FluxSourceError(f"{path}: not a safetensors file (shorter than 8 bytes)")
                (n,) = struct.unpack("<Q", raw)
                if n > 100 * 2**20 or n > os.path.getsize(path):
                    raise FluxSourceError(f"{path}: not a safetensors file (header length {n} is implausible; "
                                          f"GGUF and .ckpt/.pt inputs are not supported, convert to safetensors)")
                header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FluxSourceError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header                        # key -> {"dtype", "shape", "data_offsets"}

    def dtype_str(self, key: str) -> str:
        return self.entries[key]["dtype"]

    def shape(self, key: str) -> tuple:
        return tuple(self.entries[key]["shape"])

    def read(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        begin, end = e["data_offsets"]
        dtype = DTYPES_BY_NAME.get(e["dtype"])
        if dtype is None:
            raise FluxSourceError(f"{self.path}: {key} has dtype {e['dtype']}, which this reader does not know")
        out = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(memoryview(out.numpy()))
        if got != end - begin:
            raise FluxSourceError(f"{self.path}: {key}: read {got} of {end - begin} bytes; the file is truncated")
        return out.view(dtype).reshape(e["shape"])


@dataclass
class _Entry:
    """How one BFL tensor is made: the (file, key) parts concatenated along dim 0, optionally half-swapped."""
    parts: list
    swap: bool = False


class FluxSource:
    """An unquantized FLUX.1 transformer opened lazily.

    Attributes: path, layout ('bfl' | 'diffusers'), model_config (ComfyUI FluxParams dict, flux.py),
    model_class ('Flux' | 'FluxSchnell' | 'FluxInpaint'), variant (human-readable), dtype (source dtype),
    depth, depth_single_blocks, hidden_size."""

    def __init__(self, path):
        self.path = Path(path)
        files = _source_files(self.path)
        keys: dict[str, SafetensorsFile] = {}
        for f in files:
            for k in f.entries:
                keys[k] = f
        try:
            self.layout, self._prefix = _detect_layout(self.path, keys)
        except FluxSourceError:
            _reject_quantized(self.path, files, keys)       # a Nunchaku file has no FLUX names: say why
            raise
        # only the transformer's keys: a full checkpoint may hold an fp8-scaled text encoder beside it
        _reject_quantized(self.path, files, {k: f for k, f in keys.items() if k.startswith(self._prefix)})
        self._keys = keys
        self._entries: dict[str, _Entry] = (self._bfl_entries() if self.layout == "bfl"
                                            else self._diffusers_entries())
        self._check_dtypes()
        self._detect_config()

    # -- name maps ----------------------------------------------------------------------------------------

    def _bfl_entries(self) -> dict[str, _Entry]:
        p = self._prefix
        return {k[len(p):]: _Entry([(self._keys[k], k)]) for k in self._keys if k.startswith(p)}

    def _diffusers_entries(self) -> dict[str, _Entry]:
        out: dict[str, _Entry] = {}
        have = self._keys

        def add(bfl_key: str, parts: tuple, swap: bool = False) -> None:
            if all(p in have for p in parts):
                out[bfl_key] = _Entry([(have[p], p) for p in parts], swap)
            elif any(p in have for p in parts):
                missing = [p for p in parts if p not in have]
                raise FluxSourceError(f"{self.path}: {bfl_key} needs {', '.join(parts)}, but {missing[0]} is missing")

        for bfl_prefix, diff_prefix, linears, norms in (
                ("double_blocks", "transformer_blocks", DIFFUSERS_DOUBLE, DIFFUSERS_DOUBLE_NORMS),
                ("single_blocks", "single_transformer_blocks", DIFFUSERS_SINGLE, DIFFUSERS_SINGLE_NORMS)):
            for i in range(count_blocks(have, f"{diff_prefix}.")):
                b, d = f"{bfl_prefix}.{i}.", f"{diff_prefix}.{i}."
                for bfl, parts in linears.items():
                    for leaf in ("weight", "bias"):
                        add(f"{b}{bfl}.{leaf}", tuple(f"{d}{m}.{leaf}" for m in parts))
                for bfl, name in norms.items():
                    add(f"{b}{bfl}", (d + name,))
        for bfl, diff in flux.UNQUANTIZED:
            for leaf in ("weight", "bias"):
                add(f"{bfl}.{leaf}", (f"{diff}.{leaf}",), swap=bfl == flux.SWAPPED)
        return out

    # -- checks and config ---------------------------------------------------------------------------------

    def _check_dtypes(self) -> None:
        for bfl, e in self._entries.items():
            for f, k in e.parts:
                if f.dtype_str(k) not in SUPPORTED_DTYPES:
                    raise FluxSourceError(
                        f"{f.path}: {k} has dtype {f.dtype_str(k)}; the quantizer needs a bf16, fp16 or fp32 "
                        f"model (an fp8 or otherwise reduced file has already lost precision: start from the "
                        f"original bf16 release)")

    def shape(self, bfl_key: str) -> tuple:
        e = self._entries[bfl_key]
        first = e.parts[0][0].shape(e.parts[0][1])
        return (sum(f.shape(k)[0] for f, k in e.parts),) + first[1:]

    def has(self, bfl_key: str) -> bool:
        return bfl_key in self._entries

    def _detect_config(self) -> None:
        need = ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight",
                "double_blocks.0.img_attn.norm.query_norm.scale")
        for k in need:
            if k not in self._entries:
                raise FluxSourceError(f"{self.path}: not a complete FLUX.1 transformer: {k} is missing "
                                      f"({self.layout} naming)")
        hidden, in4 = self.shape("img_in.weight")
        head_dim = self.shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        self.depth = count_blocks(self._entries, "double_blocks.")
        self.depth_single_blocks = count_blocks(self._entries, "single_blocks.")
        self.hidden_size = hidden
        guidance = self.has("guidance_in.in_layer.weight")
        self.model_config = flux.comfy_model_config(
            hidden_size=hidden, depth=self.depth, depth_single_blocks=self.depth_single_blocks,
            in_channels=in4 // 4, context_in_dim=self.shape("txt_in.weight")[1],
            vec_in_dim=self.shape("vector_in.in_layer.weight")[1], guidance_embed=guidance,
            num_heads=hidden // head_dim, out_channels=self.shape("final_layer.linear.weight")[0] // 4)
        # ComfyUI picks supported_models.FluxInpaint for 96 input channels (flux.model_class_for does not).
        in_ch = self.model_config["in_channels"]
        self.model_class = "FluxInpaint" if in_ch == 96 else flux.model_class_for(self.model_config)
        base = "dev" if guidance else "schnell"
        self.variant = {16: f"{base} (or Kontext, same shapes)", 96: f"Fill ({base})",
                        32: f"Depth/Canny ({base})"}.get(in_ch, f"{base}, {in_ch} input channels")
        for i in range(self.depth):
            for bfl, _, _ in flux.DOUBLE_W4A4:
                self._require(f"double_blocks.{i}.{bfl}.weight")
        for i in range(self.depth_single_blocks):
            for k in ("linear1", "linear2", "modulation.lin"):
                self._require(f"single_blocks.{i}.{k}.weight")
        self.dtype = SUPPORTED_DTYPES[_first_dtype(self._entries["img_in.weight"])]

    def _require(self, key: str) -> None:
        if key not in self._entries:
            raise FluxSourceError(f"{self.path}: {key} is missing; the blocks are incomplete")

    # -- reading -------------------------------------------------------------------------------------------

    def read(self, bfl_key: str) -> torch.Tensor:
        e = self._entries[bfl_key]
        parts = [f.read(k) for f, k in e.parts]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return flux.swap_halves(t) if e.swap else t

    def block(self, kind: str, i: int) -> dict[str, torch.Tensor]:
        """All tensors of double block i (kind 'double') or single block i ('single'), keyed by the BFL
        suffix after the block prefix, e.g. 'img_attn.qkv.weight'."""
        prefix = f"{'double_blocks' if kind == 'double' else 'single_blocks'}.{i}."
        return {k[len(prefix):]: self.read(k) for k in self._entries if k.startswith(prefix)}

    def global_keys(self) -> list[str]:
        """BFL keys outside the blocks (embedders, final layer)."""
        return [k for k in self._entries if not k.startswith(("double_blocks.", "single_blocks."))]



def open_flux_source(path) -> FluxSource:
    """Open a FLUX.1 transformer (BFL single file or diffusers weights) lazily; raises FluxSourceError."""
    return FluxSource(path)


# -------------------------------------------------------------------------------------------------- helpers

def _source_files(path: Path) -> list[SafetensorsFile]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (expected a FLUX.1 .safetensors file or a "
                                f"diffusers transformer folder)")
    if path.is_file():
        return [SafetensorsFile(path)]
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise FluxSourceError(f"{indexes[0]}: not a safetensors index (no weight_map: {e})") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FluxSourceError(f"{indexes[0]}: shard {missing[0]} listed in the index is missing from {folder}")
        return [SafetensorsFile(folder / s) for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FluxSourceError(f"{folder}: no .safetensors files (expected a diffusers transformer folder with "
                              f"diffusion_pytorch_model*.safetensors)")
    return [SafetensorsFile(f) for f in files]


def _reject_quantized(path: Path, files: list[SafetensorsFile], keys: dict) -> None:
    for f in files:
        for m in QUANTIZED_METADATA:
            if m in f.metadata:
                raise FluxSourceError(f"{f.path}: already quantized (metadata field {m!r}); quantize the original "
                                      f"bf16/fp16/fp32 model instead")
    for k in keys:
        if k.endswith(QUANTIZED_SUFFIXES) or k in QUANTIZED_KEYS:
            raise FluxSourceError(f"{keys[k].path}: already quantized ({k}); quantize the original "
                                  f"bf16/fp16/fp32 model instead")


def _detect_layout(path: Path, keys: dict) -> tuple[str, str]:
    for p in BFL_PREFIXES:
        if p + "double_blocks.0.img_attn.qkv.weight" in keys:
            if p + "double_stream_modulation_img.lin.weight" in keys:
                raise FluxSourceError(f"{path}: a FLUX.2 model (double_stream_modulation_img); only FLUX.1 is supported")
            if p + "distilled_guidance_layer.in_proj.weight" in keys:
                raise FluxSourceError(f"{path}: a Chroma model (distilled_guidance_layer); only FLUX.1 is supported")
            return "bfl", p
    if "transformer_blocks.0.attn.to_q.weight" in keys and "single_transformer_blocks.0.proj_mlp.weight" in keys:
        return "diffusers", ""
    sample = ", ".join(sorted(keys)[:4]) or "no tensors"
    raise FluxSourceError(f"{path}: not a FLUX.1 transformer: found neither double_blocks.0.img_attn.qkv.weight "
                          f"(ComfyUI/BFL) nor transformer_blocks.0.attn.to_q.weight (diffusers); its {len(keys)} "
                          f"tensors start with {sample}")


def count_blocks(keys, prefix: str) -> int:
    """How many blocks `<prefix><i>.` the keys hold; a gap in 0..max raises FluxSourceError naming the missing one."""
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    if idx and idx != set(range(max(idx) + 1)):
        missing = sorted(set(range(max(idx) + 1)) - idx)
        raise FluxSourceError(f"{prefix}{missing[0]} is missing (blocks 0..{max(idx)} expected)")
    return len(idx)


def _first_dtype(e: _Entry) -> str:
    f, k = e.parts[0]
    return f.dtype_str(k)
