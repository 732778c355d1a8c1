"""The plain layer representation: unpacked, row-major tensors plus flags.

Independent of every packed layout (Nunchaku's tiled files, ComfyUI's natural layout, our CPU and CUDA
kernel layouts). Readers unpack into these classes, writers and kernel packers start from them, and
`reference.py` computes with them directly.

Letters: N out features, K in features, R rank, G group size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch

SIGMA = 0.171875  # the INT4 activation shift of post-GELU layers (FORMAT.md §1)

GROUP_SIZE = {"int4": 64, "nvfp4": 16}


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{where}: {msg}")


@dataclass
class SVDQuantLayer:
    """One W4A4 SVDQuant linear layer: y = Deq(codes)·Qa((x + σ·shifted)/smooth) + U·(Dᵀ·x) + bias.

    codes:     [N, K] int8. int4: two's complement values in [-8, 7]. nvfp4: e2m1 codes 0..15
               (bit 3 = sign, low 3 bits index the magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6).
    wscales:   [N, K/G]. int4: model dtype (bf16/fp16), G = 64. nvfp4: float8_e4m3fn, G = 16.
    smooth:    [K]; divides the activations at run time.
    proj_down: D [K, R]; proj_up: U [N, R]. The low-rank branch acts on the raw input.
    bias:      [N] or None (for shifted layers it already holds the shift compensation, FORMAT.md §1).
    wtscale:   [1] or None (nvfp4 only; None means 1).  wcscales: [N] or None (nvfp4 only).
    shifted:   int4 only: activations are quantized unsigned after adding σ.
    smooth_orig: [K] or None; carried through files, unused at run time.
    """

    precision: str
    codes: torch.Tensor
    wscales: torch.Tensor
    smooth: torch.Tensor
    proj_down: torch.Tensor
    proj_up: torch.Tensor
    bias: Optional[torch.Tensor] = None
    wtscale: Optional[torch.Tensor] = None
    wcscales: Optional[torch.Tensor] = None
    shifted: bool = False
    smooth_orig: Optional[torch.Tensor] = None

    @property
    def N(self) -> int:
        return self.codes.shape[0]

    @property
    def K(self) -> int:
        return self.codes.shape[1]

    @property
    def R(self) -> int:
        return self.proj_down.shape[1]

    @property
    def group_size(self) -> int:
        return GROUP_SIZE[self.precision]

    def validate(self, where: str = "SVDQuantLayer") -> "SVDQuantLayer":
        """Check dtypes and shapes against N, K, R, G; raise ValueError naming `where` and the field."""
        _check(self.precision in GROUP_SIZE, where, f"precision {self.precision!r}, expected 'int4' or 'nvfp4'")
        _check(self.codes.dim() == 2 and self.codes.dtype == torch.int8, where,
               f"codes must be a 2-D int8 tensor [N, K], got {self.codes.dtype} {list(self.codes.shape)}")
        N, K, G = self.N, self.K, self.group_size
        _check(K % G == 0, where, f"K = {K} is not a multiple of the group size {G} for {self.precision}")
        if self.precision == "int4":
            _check(self.wscales.dtype in (torch.bfloat16, torch.float16, torch.float32), where,
                   f"wscales dtype {self.wscales.dtype}, expected bf16/fp16/fp32 for int4")
            _check(self.wtscale is None and self.wcscales is None, where, "wtscale/wcscales are nvfp4-only")
        else:
            _check(self.wscales.dtype == torch.float8_e4m3fn, where,
                   f"wscales dtype {self.wscales.dtype}, expected float8_e4m3fn for nvfp4")
            _check(not self.shifted, where, "the σ shift exists only for int4 layers")
        _check(tuple(self.wscales.shape) == (N, K // G), where,
               f"wscales shape {list(self.wscales.shape)}, expected [N, K/G] = [{N}, {K // G}]")
        _check(self.smooth.shape == (K,), where, f"smooth shape {list(self.smooth.shape)}, expected [K] = [{K}]")
        _check(self.proj_down.dim() == 2 and self.proj_down.shape[0] == K, where,
               f"proj_down shape {list(self.proj_down.shape)}, expected [K, R] = [{K}, R]")
        _check(tuple(self.proj_up.shape) == (N, self.R), where,
               f"proj_up shape {list(self.proj_up.shape)}, expected [N, R] = [{N}, {self.R}] "
               f"(rank taken from proj_down)")
        for name, want in (("bias", (N,)), ("wcscales", (N,)), ("smooth_orig", (K,)), ("wtscale", (1,))):
            t = getattr(self, name)
            _check(t is None or tuple(t.shape) == want, where,
                   f"{name} shape {list(t.shape) if t is not None else None}, expected {list(want)}")
        return self


@dataclass
class W4A16Layer:
    """One weight-only 4-bit layer (AWQ style): w = codes·scales + zeros per group, y = x·wᵀ + bias.

    codes:  [N, K] uint8, unsigned 4-bit values 0..15, rows in the original (not interleaved) order.
    scales: [N, ceil(K/G)]; zeros: [N, ceil(K/G)] (stored additive zeros, not zero points).
    bias:   [N] or None, the original bias (no folded +1).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: Optional[torch.Tensor] = None
    group_size: int = 64

    @property
    def N(self) -> int:
        return self.codes.shape[0]

    @property
    def K(self) -> int:
        return self.codes.shape[1]

    def validate(self, where: str = "W4A16Layer") -> "W4A16Layer":
        _check(self.codes.dim() == 2 and self.codes.dtype == torch.uint8, where,
               f"codes must be a 2-D uint8 tensor [N, K], got {self.codes.dtype} {list(self.codes.shape)}")
        want = (self.N, math.ceil(self.K / self.group_size))
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            _check(tuple(t.shape) == want, where, f"{name} shape {list(t.shape)}, expected [N, ceil(K/G)] = {list(want)}")
        _check(self.bias is None or tuple(self.bias.shape) == (self.N,), where,
               f"bias shape {list(self.bias.shape) if self.bias is not None else None}, expected [{self.N}]")
        return self


def tensors_equal(a, b) -> bool:
    """Bit-exact equality of two layers of the same class (dtype, shape and bytes of every tensor)."""
    if type(a) is not type(b):
        return False
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if x is None or y is None or x.dtype != y.dtype or x.shape != y.shape:
                return False
            if not torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)):
                return False
        elif x != y:
            return False
    return True
