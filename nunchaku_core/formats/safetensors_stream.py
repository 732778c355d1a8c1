"""Write a .safetensors file one tensor at a time, so peak memory is one tensor, not the whole file.

The header (names, dtypes, shapes, offsets) must come first in the format, so the caller declares every
entry up front and then writes the tensors in exactly that order. The file is built under a temporary
name in the target directory and renamed into place on success; on any error it is removed, so no partial
output is ever left behind.
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile

import torch

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}     # a header's "dtype" -> torch dtype


class StreamingSafetensorsWriter:
    """entries: [(name, dtype, shape)] in file order. Use as a context manager; call write() per entry."""

    def __init__(self, path: str, entries: list[tuple[str, torch.dtype, tuple]], metadata: dict[str, str] | None = None):
        self.path = path
        self.entries = list(entries)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, dtype, shape in self.entries:
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"{path}: tensor {name} has dtype {dtype}, which safetensors cannot store")
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)          # the data section starts 8-byte aligned
        self._header = struct.pack("<Q", len(blob)) + blob
        self._next = 0
        self._file = None
        self._tmp = None

    def __enter__(self) -> "StreamingSafetensorsWriter":
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self._tmp = tempfile.mkstemp(prefix=".partial-", suffix=".safetensors", dir=directory)
        self._file = os.fdopen(fd, "wb")
        self._file.write(self._header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.entries):
            raise ValueError(f"{self.path}: unexpected extra tensor {name}")
        want_name, dtype, shape = self.entries[self._next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path}: expected tensor {want_name} {dtype} {list(shape)} next, "
                             f"got {name} {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(data.tobytes())
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is None and self._next != len(self.entries):
            os.unlink(self._tmp)
            raise ValueError(f"{self.path}: only {self._next} of {len(self.entries)} tensors were written")
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            os.unlink(self._tmp)


def write_all(path, tensors: dict, metadata: dict[str, str] | None = None, order=None) -> None:
    """Write every tensor of `tensors` (popping each as it is written, so the caller's dict empties and the
    memory goes with it) in sorted(tensors, key=order) order, through StreamingSafetensorsWriter; the file gets
    the permissions a plain open() would give (mkstemp creates it 0600, and ComfyUI may run as another user)."""
    names = sorted(tensors, key=order)
    entries = [(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in names]
    with StreamingSafetensorsWriter(str(path), entries, metadata) as w:
        for k in names:
            w.write(k, tensors.pop(k))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
