"""Which kernel runs a quantized layer: the compiled CPU kernel, the compiled CUDA kernel, or the torch reference.

    packed = pack_svdquant(layer, device)      # once per layer and device (repacks into the kernel's layout)
    y = svdquant_linear(x, packed)             # and pack_w4a16 / w4a16_linear for weight-only layers

Backend choice, first match wins: the `backend=` argument, the environment variable SVDQ_BACKEND
(auto|cpu|cuda|reference), else auto = the compiled kernel for the device when it is built, else the reference.
`auto` falls back to the reference with a one-time warning saying why (e.g. extension not built); an explicitly
requested backend that cannot run raises instead.

CPU variant: SVDQ_CPU_ISA=ref|avx2|avx512vnni forces one (every variant is testable on one machine); unset or
`auto` takes the best this CPU supports by CPUID. The choice is logged once.
"""
from __future__ import annotations

import logging
import os
import warnings
import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import cpu_packing, reference
from .layer import SVDQuantLayer, W4A16Layer

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "cuda", "reference")
CPU_ISAS = ("ref", "avx2", "avx512vnni")  # slowest to fastest
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_HINT = (f"build it with ComfyUI's Python: `python install.py` in {_REPO} (runs `python setup.py build_ext "
              f"--inplace`; again after a torch upgrade)")
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:
    from . import _C
    _C_ERROR: Optional[BaseException] = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    _C_ERROR = e

if _C is not None:  # a stale build (layout changed since) is as good as none: refuse it, loudly
    _stale = {k: v for k, v in _C.layout_constants().items() if getattr(cpu_packing, k, None) != v}
    if _stale:
        _C, _C_ERROR = None, ImportError(f"nunchaku_core._C is stale: its layout constants {_stale} differ from "
                                         f"nunchaku_core.cpu_packing's")

_said: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _said:
        _said.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def extension_available() -> bool:
    return _C is not None


def cuda_kernels_available() -> bool:
    """True when the extension was built with the CUDA kernels (csrc/cuda, setup.py SVDQ_BUILD_CUDA) and torch sees
    a GPU. Never true on the project's machines: that path is compile-checked only."""
    return _C is not None and hasattr(_C, "cuda_quantize_act_int4_lowrank") and torch.cuda.is_available()


_isa_by_env: dict[str, str] = {}


def cpu_isa() -> str:
    """The CPU kernel variant to run: SVDQ_CPU_ISA if set (must be supported), else the best by CPUID."""
    if _C is None:
        raise RuntimeError(f"nunchaku_core._C is not built ({_C_ERROR}); {BUILD_HINT}")
    env = os.environ.get("SVDQ_CPU_ISA", "auto")
    hit = _isa_by_env.get(env)  # once per value: this runs on every layer call
    if hit is not None:
        return hit
    want = env.strip().lower() or "auto"
    if want == "auto":
        isa = [i for i in CPU_ISAS if _C.cpu_isa_supported(i)][-1]
        how = "best supported by this CPU (CPUID)"
    elif want in CPU_ISAS:
        if not _C.cpu_isa_supported(want):
            raise RuntimeError(f"SVDQ_CPU_ISA={want}: this CPU does not support it; unset SVDQ_CPU_ISA or pick one of "
                               f"{[i for i in CPU_ISAS if _C.cpu_isa_supported(i)]}")
        isa, how = want, "forced by SVDQ_CPU_ISA"
    else:
        raise ValueError(f"SVDQ_CPU_ISA={want!r}: expected one of auto, {', '.join(CPU_ISAS)}")
    if ("isa", isa) not in _said:
        _said.add(("isa", isa))
        log.info("nunchaku_core: CPU kernels use %s (%s)", isa, how)
    _isa_by_env[env] = isa
    return isa


def resolve_backend(device: Union[str, torch.device], backend: Optional[str] = None) -> str:
    """'cpu', 'cuda' or 'reference' for tensors on `device` (see the module docstring for the order)."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    want = backend or os.environ.get("SVDQ_BACKEND", "auto").strip().lower() or "auto"
    if want not in BACKENDS:
        raise ValueError(f"backend {want!r} (argument or SVDQ_BACKEND): expected one of {', '.join(BACKENDS)}")
    if want == "reference":
        return "reference"
    if want in ("cpu", "cuda") and want != device.type:
        raise ValueError(f"backend {want!r} cannot run tensors on {device}; move the model or pick another backend")
    if device.type == "cpu":
        if _C is not None:
            return "cpu"
        if want == "cpu":
            raise RuntimeError(f"backend 'cpu' requested but nunchaku_core._C is not built ({_C_ERROR}); {BUILD_HINT}")
        _warn_once("no-ext", f"nunchaku_core._C is not built ({_C_ERROR}): quantized layers run on the slow torch "
                             f"reference; {BUILD_HINT}")
        return "reference"
    if device.type == "cuda" and cuda_kernels_available():
        return "cuda"
    if want == "cuda":
        raise RuntimeError("backend 'cuda' requested but nunchaku_core._C was built without the CUDA kernels")
    _warn_once(f"no-kernel-{device.type}", f"no compiled SVDQuant kernel for {device.type} tensors in this build: "
                                           f"quantized layers run on the slow torch reference")
    return "reference"


@dataclass
class Packed:
    """One layer repacked for one backend and device.

    For the CPU kernels, `layer` is the layer with its 1-byte-per-weight `codes` replaced by a tensor on the
    meta device (shape and dtype, no storage): the kernel's nibble-packed copy is the only one kept, which is
    what makes a 4-bit model take ~0.6 bytes per weight instead of ~1.6. full_layer() rebuilds the codes when
    the reference path or a repack needs them."""

    backend: str            # what runs: 'cpu', 'cuda' or 'reference'
    resolved: str           # what resolve_backend chose (differs when the layer does not fit that kernel)
    device: torch.device
    layer: Union[SVDQuantLayer, W4A16Layer]
    kernel: object = None   # cpu_packing.CpuW4A4/CpuW4A16 ('cpu'), cuda_packing.Cuda*Weights ('cuda'), or None


def _without_codes(layer):
    """The layer with codes on the meta device: the packed kernel copy holds them (see Packed)."""
    return dataclasses.replace(layer, codes=torch.empty(layer.codes.shape, dtype=layer.codes.dtype, device="meta"))


def full_layer(packed: Packed) -> Union[SVDQuantLayer, W4A16Layer]:
    """The packed layer with its codes, unpacked again from the CPU kernel copy when they were dropped."""
    layer = packed.layer
    if not (layer.codes.is_meta and packed.backend == "cpu"):
        return layer
    if isinstance(layer, SVDQuantLayer):
        codes = cpu_packing.unpack_w4a4_codes(packed.kernel)
    else:
        codes = cpu_packing.unpack_w4a16_codes(packed.kernel)
    return dataclasses.replace(layer, codes=codes.to(layer.wscales.device if isinstance(layer, SVDQuantLayer)
                                                    else layer.scales.device))


def _explicit(backend: Optional[str], name: str) -> bool:
    return (backend or os.environ.get("SVDQ_BACKEND", "")).strip().lower() == name


def pack_svdquant(layer: SVDQuantLayer, device: Union[str, torch.device] = "cpu",
                  backend: Optional[str] = None) -> Packed:
    device = torch.device(device)
    resolved = chosen = resolve_backend(device, backend)
    if chosen == "cpu" and layer.R > cpu_packing.MAX_RANK:
        msg = f"rank {layer.R} exceeds the CPU kernels' limit {cpu_packing.MAX_RANK}"
        if _explicit(backend, "cpu"):
            raise ValueError(f"{msg}; use backend 'reference'")
        _warn_once("max-rank", f"{msg}: such layers run on the torch reference")
        chosen = "reference"
    if chosen == "cpu":
        return Packed("cpu", resolved, device, _without_codes(layer), cpu_packing.pack_w4a4(layer))
    if chosen == "cuda":
        from . import cuda_packing
        if layer.K % cuda_packing.TILE_K or layer.R > cuda_packing.MAX_RANK:
            msg = f"K = {layer.K}, rank {layer.R}: the CUDA kernels need K % {cuda_packing.TILE_K} == 0 and rank <= " \
                  f"{cuda_packing.MAX_RANK}"
            if _explicit(backend, "cuda"):
                raise ValueError(f"{msg}; use backend 'reference'")
            _warn_once("cuda-shape", f"{msg}: such layers run on the torch reference")
            return Packed("reference", resolved, device, layer)
        return Packed("cuda", resolved, device, layer, _to(cuda_packing.pack_svdquant_layer(layer), device))
    return Packed("reference", resolved, device, layer)


def pack_w4a16(layer: W4A16Layer, device: Union[str, torch.device] = "cpu", backend: Optional[str] = None) -> Packed:
    device = torch.device(device)
    resolved = chosen = resolve_backend(device, backend)
    if chosen in ("cpu", "cuda") and layer.group_size % cpu_packing.STEP_K:  # both kernels read 8-input words
        if _explicit(backend, chosen):
            raise ValueError(f"W4A16 group size {layer.group_size} is not a multiple of {cpu_packing.STEP_K}: the "
                             f"{chosen} kernel cannot run it; use backend 'reference'")
        _warn_once("w4a16-group", f"W4A16 group size {layer.group_size} is not a multiple of {cpu_packing.STEP_K}: "
                                  f"such layers run on the torch reference")
        chosen = "reference"
    if chosen == "cpu":
        return Packed("cpu", resolved, device, _without_codes(layer), cpu_packing.pack_w4a16(layer))
    if chosen == "cuda":
        from . import cuda_packing
        return Packed("cuda", resolved, device, layer, _to(cuda_packing.pack_w4a16_layer(layer), device))
    return Packed("reference", resolved, device, layer)


def repack_lowrank(packed: Packed, layer: SVDQuantLayer, backend: Optional[str] = None) -> Packed:
    """`packed` with the low-rank branch and bias of `layer`, which must be packed's layer with only proj_down,
    proj_up and bias changed (a LoRA). On the CPU kernels the 4-bit codes, scales and smoothing are shared, not
    repacked; elsewhere (reference, CUDA, or a rank past the CPU kernels' limit) the layer is packed as usual."""
    if packed.backend == "cpu" and layer.R <= cpu_packing.MAX_RANK:
        return Packed("cpu", packed.resolved, packed.device, _without_codes(layer),
                      cpu_packing.repack_w4a4_lowrank(packed.kernel, layer))
    if layer.codes.is_meta:
        layer = dataclasses.replace(layer, codes=full_layer(packed).codes)
    if packed.backend == "reference" and packed.resolved == "reference":
        return Packed("reference", "reference", packed.device, layer)
    return pack_svdquant(layer, packed.device, backend)


def repack_bias(packed: Packed, layer: W4A16Layer) -> Packed:
    """`packed` (W4A16) with the bias of `layer`, which must be packed's layer with only the bias changed."""
    if packed.backend == "cpu":
        return Packed("cpu", packed.resolved, packed.device, _without_codes(layer),
                      cpu_packing.repack_w4a16_bias(packed.kernel, layer.bias))
    if packed.backend == "cuda":
        from . import cuda_packing
        return Packed("cuda", packed.resolved, packed.device, layer,
                      _to(cuda_packing.pack_w4a16_layer(layer), packed.device))
    return Packed(packed.backend, packed.resolved, packed.device, layer)


def _to(weights, device: torch.device):
    """The tensors of a cuda_packing dataclass moved to `device` (in place)."""
    for name, value in vars(weights).items():
        if isinstance(value, torch.Tensor):
            setattr(weights, name, value.to(device))
    return weights


def _cuda_input(x: torch.Tensor) -> Optional[torch.Tensor]:
    """x as the CUDA kernels take it ([M, K] bf16/fp16 on the packed device), or None: reference, warned once."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        _warn_once(f"cuda-dtype-{x.dtype}", f"CUDA kernels take bfloat16/float16 inputs, got {x.dtype}: running the "
                                            f"torch reference")
        return None
    return x.reshape(-1, x.shape[-1])


def _cpu_input(x: torch.Tensor, packed: Packed) -> Optional[torch.Tensor]:
    """x as the CPU kernels take it, or None (with a one-time warning) when only the reference can run it."""
    if x.device.type != "cpu":
        raise ValueError(f"input on {x.device} but the layer was packed for the CPU kernels; repack for {x.device}")
    if x.dtype not in _CPU_DTYPES:
        _warn_once(f"dtype-{x.dtype}", f"CPU kernels take float32/bfloat16/float16 inputs, got {x.dtype}: "
                                       f"running the torch reference")
        return None
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def svdquant_linear(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """SVDQuant W4A4 layer forward. x: [..., K] -> [..., N] in x's dtype."""
    if packed.backend == "cpu":
        x2 = _cpu_input(x, packed)                                     # x2: [M, K]
        if x2 is not None:
            p: cpu_packing.CpuW4A4 = packed.kernel
            isa = cpu_isa()
            down = p.proj_down if p.R else None
            # quantize_act_*_lowrank then gemm_w4a4_* in one call (csrc/bindings.cpp svdquant_linear)
            if p.precision == "int4":
                y = _C.svdquant_linear_int4(x2, p.smooth, down, p.shifted, p.wcodes, p.wscales, p.proj_up, p.bias,
                                            p.N, isa)
            else:
                y = _C.svdquant_linear_nvfp4(x2, p.smooth, down, p.wcodes, p.wscales, p.proj_up, p.bias,
                                             p.out_scale, p.N, isa)
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], p.N)
    if packed.backend == "cuda":
        x2 = _cuda_input(x)
        if x2 is not None:  # csrc/cuda/ops.cuh through csrc/bindings.cpp; never run on the project's machines
            w = packed.kernel
            stream = torch.cuda.current_stream(x.device).cuda_stream
            M = x2.shape[0]
            if w.precision == "int4":
                codes, scales, lora = _C.cuda_quantize_act_int4_lowrank(x2, w.smooth, w.proj_down, w.shifted, stream)
                y = _C.cuda_gemm_w4a4_int4(codes, scales, lora, w.wcodes, w.wscales, w.proj_up, w.bias, w.shifted,
                                           M, w.N, x.dtype, stream)
            else:
                codes, scales, lora = _C.cuda_quantize_act_nvfp4_lowrank(x2, w.smooth, w.proj_down, stream)
                y = _C.cuda_gemm_w4a4_nvfp4(codes, scales, lora, w.wcodes, w.wscales, w.proj_up, w.bias, w.out_scale,
                                            M, w.N, x.dtype, stream)
            return y.reshape(*x.shape[:-1], w.N)
    return reference.svdquant_linear(x, full_layer(packed))


def w4a16_linear(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Weight-only 4-bit layer forward. x: [..., K] -> [..., N] in x's dtype."""
    if packed.backend == "cpu":
        x2 = _cpu_input(x, packed)
        if x2 is not None:
            p: cpu_packing.CpuW4A16 = packed.kernel
            y = _C.gemm_w4a16(x2, p.wcodes, p.scales, p.zeros, p.bias, p.N, p.group_size, cpu_isa())
            return y.reshape(*x.shape[:-1], p.N)
    if packed.backend == "cuda":
        x2 = _cuda_input(x)
        if x2 is not None:
            w = packed.kernel
            y = _C.cuda_gemm_w4a16(x2, w.qweight, w.scales, w.zeros, w.bias, w.group_size,
                                   torch.cuda.current_stream(x.device).cuda_stream)
            return y.reshape(*x.shape[:-1], w.N)
    return reference.w4a16_linear(x, full_layer(packed))
