"""Open an unquantized diffusion model file of any family, tensor by tensor, under the names ComfyUI's model uses
(the "model keys"), for the quantizer (quantize/model.py).

What is read, as ComfyUI's 'Load Diffusion Model' reads it:
- `.safetensors` (`.sft`): read with positioned reads, one tensor at a time (models/flux_source.SafetensorsFile;
  no mmap, so the resident set stays one tensor);
- `.pth` / `.pt` / `.ckpt` / `.bin`: a torch.save'd dict, loaded with `weights_only=True` (plain tensors only, no
  code runs) and memory-mapped where the file allows it; a `state_dict` entry is used when present (the original
  PixArt releases, e.g. PixArt-Sigma-XL-2-1024-MS.pth, store {"state_dict": ...});
- a whole checkpoint's `model.diffusion_model.` tensors, prefix dropped (the rest is the text encoders and VAE);
- a diffusers-layout PixArt transformer, converted to the original PixArt names on read (models/pixart_diffusers.py):
  split q/k/v and k/v are concatenated into ComfyUI's fused Linears, so they are quantized as one layer.
Everything else is read as stored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from . import pixart_diffusers
from .flux_source import SafetensorsFile
from ..formats.safetensors_stream import DTYPE_NAMES

CHECKPOINT_PREFIX = "model.diffusion_model."
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


class ModelSourceError(ValueError):
    """The input cannot be quantized by this path (the message names the file and the fix)."""


class TorchFile:
    """A torch.save'd state dict with the reading interface of SafetensorsFile (entries, shape, dtype_str, read)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):        # only the legacy (pre-zip) format cannot be mapped
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:                   # noqa: BLE001 (pickle errors have no common base class)
            raise ModelSourceError(f"{path}: not loadable as plain tensors (torch.load with weights_only refused it: "
                                   f"{type(e).__name__}: {str(e)[:300]}); convert the model to .safetensors, or take "
                                   f"its .safetensors release") from e
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ModelSourceError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
        self.entries = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}

    def dtype_str(self, key: str) -> str:
        return DTYPE_NAMES.get(self.entries[key].dtype, str(self.entries[key].dtype))

    def shape(self, key: str) -> tuple:
        return tuple(self.entries[key].shape)

    def read(self, key: str) -> torch.Tensor:
        return self.entries[key]


class ModelSource:
    """The model's tensors by model key. Attributes: path, layout ('as stored' | 'checkpoint' | 'pixart diffusers'),
    keys (model keys, file order), dropped (file keys of a converted layout that ComfyUI's model has no place for)."""

    def __init__(self, path: Path, file, parts: dict[str, tuple[str, ...]], layout: str, dropped: list[str]):
        self.path, self.file, self.layout, self.dropped = path, file, layout, dropped
        self._parts = parts
        self.keys = list(parts)

    def __contains__(self, key: str) -> bool:
        return key in self._parts

    def shape(self, key: str) -> tuple:
        parts = self._parts[key]
        first = self.file.shape(parts[0])
        if len(parts) == 1:
            return first
        return (sum(self.file.shape(p)[0] for p in parts),) + first[1:]

    def dtype_str(self, key: str) -> str:
        kinds = {self.file.dtype_str(p) for p in self._parts[key]}
        if len(kinds) != 1:
            raise ModelSourceError(f"{self.path}: {key} is made of {', '.join(self._parts[key])}, which have "
                                   f"different dtypes {sorted(kinds)}")
        return kinds.pop()

    def read(self, key: str) -> Optional[torch.Tensor]:
        """The tensor (None if the model has no such key)."""
        parts = self._parts.get(key)
        if parts is None:
            return None
        if len(parts) == 1:
            return self.file.read(parts[0])
        return torch.cat([self.file.read(p) for p in parts], dim=0)


def open_model_source(path) -> ModelSource:
    path = Path(path)
    if path.is_dir():
        raise ModelSourceError(f"{path}: a folder; pass the model's .safetensors (or .pth) file")
    if not path.is_file():
        raise ModelSourceError(f"{path}: no such file")
    file = TorchFile(path) if path.suffix.lower() in TORCH_SUFFIXES else SafetensorsFile(path)
    file_keys = list(file.entries)
    if any(k.startswith(CHECKPOINT_PREFIX) for k in file_keys):     # a full checkpoint: its diffusion model only
        parts = {k[len(CHECKPOINT_PREFIX):]: (k,) for k in file_keys if k.startswith(CHECKPOINT_PREFIX)}
        return ModelSource(path, file, parts, "checkpoint", [])
    if pixart_diffusers.is_pixart_diffusers(file_keys):
        try:
            parts = pixart_diffusers.name_map(file_keys)
        except ValueError as e:
            raise ModelSourceError(f"{path}: a diffusers-layout PixArt transformer, incomplete: {e}") from e
        used = {p for ps in parts.values() for p in ps}
        return ModelSource(path, file, parts, "pixart diffusers", [k for k in file_keys if k not in used])
    return ModelSource(path, file, {k: (k,) for k in file_keys}, "as stored", [])
