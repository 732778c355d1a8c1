"""What the Triton kernel files (triton_w4a4.py, triton_w4a16.py) share: which target a torch device is (the key
into their tile tables), the tile record, and the order in which programs walk the output tiles.

Keys: "sm80" (A100), "sm86" (8.6/8.7/8.9: GA10x, Orin, Ada: the sm_80 instruction set with 100 KB of shared memory
instead of 164 KB), "sm90" (H100/H200), "sm100" (B200/GB200, and 11.x), "sm120" (RTX 50xx, RTX PRO 6000: consumer
Blackwell, mma.sync plus block-scaled FP4), "gfx942" (MI300; also gfx90a/gfx950, same MFMA family), "gfx1100"
(RDNA3/RDNA4 WMMA), and "interpreter" (TRITON_INTERPRET=1, CPU tensors), which the callers pick themselves because
it depends on how their kernels were created, not on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import triton
import triton.language as tl


def target_key(device: Union[str, torch.device]) -> str:
    """The tile-table key of a GPU device. Raises for devices no table covers (pre-Ampere NVIDIA, other AMD)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"{device}: the Triton kernels run on CUDA/ROCm devices (or on CPU tensors under "
                         f"TRITON_INTERPRET=1 set before triton is imported)")
    if getattr(torch.version, "hip", None):
        arch = torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
        if arch in ("gfx90a", "gfx942", "gfx950"):
            return "gfx942"
        if arch.startswith(("gfx11", "gfx12")):
            return "gfx1100"
        raise ValueError(f"{device} is {arch}: no Triton tile table for it (known: gfx90a/gfx942/gfx950 MFMA, "
                         f"gfx11xx/gfx12xx WMMA); use the reference or tiled backend")
    major, minor = torch.cuda.get_device_capability(device)
    if major == 8:
        return "sm80" if minor == 0 else "sm86"
    if major == 9:
        return "sm90"
    if major in (10, 11):
        return "sm100"
    if major == 12:
        return "sm120"
    raise ValueError(f"{device} has compute capability {major}.{minor}: the Triton kernels need sm_80 or newer "
                     f"(int8 tensor-core tl.dot as compiled and checked here); use the reference or tiled backend")


@dataclass(frozen=True)
class Tile:
    """One tile configuration: block sizes (0 where a kernel has no such axis) and launch options."""
    block_m: int
    block_n: int = 0
    block_k: int = 0
    num_warps: int = 4
    num_stages: int = 1


SWIZZLE_M = 8  # output tiles are visited in groups of 8 row-tiles, so programs running together share weight tiles


def config_row(configs: dict, device: Union[str, torch.device], interpreted: bool) -> dict:
    """The row of a kernel file's tile table (CONFIGS) for tensors on `device`; CPU tensors run only in the
    interpreter (`interpreted`: the kernels were imported with TRITON_INTERPRET=1)."""
    device = torch.device(device)
    if device.type == "cpu":
        if not interpreted:
            raise ValueError("CPU tensors: the Triton kernels run on CPU only in the interpreter, which needs "
                             "TRITON_INTERPRET=1 set before triton is imported; or move the layer to a GPU")
        return configs["interpreter"]
    return configs[target_key(device)]


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), walking GROUP_M row-tiles down one column before moving right."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_here = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows_here, (pid % per_group) // rows_here


@triton.jit
def to_bf16_rne(v):
    """fp32 -> bf16, round to nearest even, as torch's .to(torch.bfloat16), by integer rounding of the fp32 bits.
    Not v.to(tl.bfloat16): the GPU rounds that to nearest even but the interpreter truncates (its _convert_float),
    so interpreter tests would not see what the GPU computes. NaN and ±inf keep their class."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
