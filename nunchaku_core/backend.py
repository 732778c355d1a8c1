"""Which kernel runs a quantized layer: compiled CPU kernels, Triton kernels, the compiled CUDA kernels, the
memory-bounded tiled fallback, or the torch reference.

    packed = pack_svdquant(layer, device)      # once per layer and device (repacks into the kernel's layout)
    y = svdquant_linear(x, packed)             # and pack_w4a16 / w4a16_linear for weight-only layers

Backend choice (choose_backend), first match wins: the `backend=` argument, the environment variable SVDQ_BACKEND,
else `auto`. Values:
  auto       CPU tensors: the compiled CPU kernels (nunchaku_core._C), else `tiled` (extension not built).
             CUDA and ROCm tensors: `triton` when triton imports and the GPU has a tile table
             (kernels/triton_common.py: sm_80 and newer, MI200/MI300, RDNA3/4), else `tiled`.
             Any other device (MPS, XPU, ...): `tiled`.
             Never `cuda` (those kernels have never run on a GPU: opt in with SVDQ_BACKEND=cuda) and never
             `reference` (it allocates an [M, N, K/G] fp32 tensor per call: 10.9 GB for M = 4608, N = 12288).
  cpu        the compiled CPU kernels; CPU tensors only. Per call they allocate the output, one byte per activation
             code and the activation scales (kernels/cpu_packing.py states the bound; tests/test_large_m.py).
  triton     kernels/triton_w4a4.py, triton_w4a16.py: CUDA/ROCm tensors, or CPU tensors in Triton's interpreter
             (TRITON_INTERPRET=1 set before the process starts: that is how the CPU-only machines verify them).
  cuda       the compiled CUDA kernels (csrc/cuda; built only with SVDQ_BUILD_CUDA=1, see setup.py).
  tiled      kernels/tiled.py: the reference's numerics, dequantizing one tile of weight rows at a time, any
             device; transient memory bounded by its tile budget (64 MiB + activations and output).
  reference  nunchaku_core/reference.py, any device: for tests.
`auto` falling back to `tiled` warns once, saying why; an explicitly requested backend that cannot run raises.
On the CPU without the extension `tiled` replaced the reference on 2026-12-07: 2.1-3.1x faster at M >= 256 and
the same at M <= 16 (3072x3072, 2 cores: M = 1 68 vs 93 ms, 16 116 vs 100, 256 224 vs 695, 1024 1326 vs 2781)
and bounded in memory where the reference is not.

A layer the chosen kernel cannot run (the CPU kernels' rank limit, the CUDA kernels' K and rank limits, a W4A16
group size the compiled kernels cannot read, an input dtype a kernel does not take) runs on `tiled` (on the CPU
without the extension's help) with a one-time warning under `auto`, and raises when the backend was asked for.

CPU variant: SVDQ_CPU_ISA=ref|avx2|avx512vnni forces one (every variant is testable on one machine); unset or
`auto` takes the best this CPU supports by CPUID. The choice is logged once.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .kernels import cpu_packing
from . import reference
from .kernels import tiled
from .layer import SVDQuantLayer, W4A16Layer

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "triton", "cuda", "tiled", "reference")
CPU_ISAS = ("ref", "avx2", "avx512vnni")  # slowest to fastest
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_HINT = (f"build it with ComfyUI's Python: `python install.py` in {_REPO} (runs `python setup.py build_ext "
              f"--inplace`; again after a torch upgrade)")
TRITON_HINT = ("CUDA and ROCm builds of torch on Linux bring triton with them; on Windows `pip install "
               "triton-windows` (its version matching torch's)")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the CPU and Triton kernels take

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
                                         f"nunchaku_core.kernels.cpu_packing's")

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


_triton_state: Union[None, tuple, ImportError] = None


def triton_kernels():
    """(kernels.triton_w4a4, kernels.triton_w4a16), imported once (with triton); raises ImportError saying why
    they do not import."""
    global _triton_state
    if _triton_state is None:
        try:
            from .kernels import triton_w4a4, triton_w4a16
            _triton_state = (triton_w4a4, triton_w4a16)
        except ImportError as e:  # triton missing, or a triton too old for the kernels
            _triton_state = e
    if isinstance(_triton_state, ImportError):
        raise ImportError(f"the Triton kernels do not import ({_triton_state}); {TRITON_HINT}") from _triton_state
    return _triton_state


def _triton_target(device: torch.device) -> str:
    """The Triton tile-table key for `device` ('interpreter' for CPU tensors), or raise ValueError/ImportError
    saying why Triton cannot run there."""
    w4a4, _ = triton_kernels()
    if device.type == "cpu":
        if not w4a4.INTERPRETED:   # TRITON_INTERPRET was not set when triton_w4a4 was imported
            raise ValueError("Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before the "
                             "process starts (triton reads it when the kernels are imported)")
        return "interpreter"
    from .kernels.triton_common import target_key
    return target_key(device)


def _requested(backend: Optional[str]) -> str:
    """The backend asked for: the argument, else SVDQ_BACKEND, else 'auto'."""
    want = (backend or os.environ.get("SVDQ_BACKEND", "")).strip().lower() or "auto"
    if want not in BACKENDS:
        raise ValueError(f"backend {want!r} (argument or SVDQ_BACKEND): expected one of {', '.join(BACKENDS)}")
    return want


def choose_backend(device: Union[str, torch.device], backend: Optional[str] = None) -> tuple[str, str]:
    """(backend, why) for quantized layers on `device`: see the module docstring for the rules. Raises ValueError /
    RuntimeError when an explicitly requested backend cannot run there."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    want = _requested(backend)
    how = f"backend={want!r}" if backend else f"SVDQ_BACKEND={want}"
    if want == "reference":
        return "reference", f"{how}: the torch reference (allocates [M, N, K/G] fp32 per call; for tests)"
    if want == "tiled":
        return "tiled", f"{how}: the memory-bounded fallback (dequantized tiles, fp32 matmul)"
    if want == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' cannot run tensors on {device}; move the model or pick another backend")
        if _C is None:
            raise RuntimeError(f"backend 'cpu' requested but nunchaku_core._C is not built ({_C_ERROR}); {BUILD_HINT}")
        return "cpu", f"{how}: the compiled CPU kernels"
    if want == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' cannot run tensors on {device}; move the model or pick another backend")
        if not cuda_kernels_available():
            raise RuntimeError("backend 'cuda' requested but nunchaku_core._C was built without the CUDA kernels "
                               "(build them with SVDQ_BUILD_CUDA=1 python setup.py build_ext --inplace)")
        return "cuda", f"{how}: the compiled CUDA kernels (csrc/cuda; never run on a GPU by this project)"
    if want == "triton":
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"backend 'triton' cannot run tensors on {device}: Triton runs CUDA/ROCm devices (and "
                             f"CPU tensors in its interpreter)")
        target = _triton_target(device)
        return "triton", f"{how}: the Triton kernels ({target})"
    # auto
    if device.type == "cpu":
        if _C is not None:
            return "cpu", "the compiled CPU kernels (nunchaku_core._C)"
        return "tiled", f"nunchaku_core._C is not built ({_C_ERROR}); {BUILD_HINT}"
    if device.type == "cuda":
        try:
            target = _triton_target(device)
        except (ImportError, ValueError) as e:
            return "tiled", f"the Triton kernels cannot run on {device}: {e}"
        version = getattr(sys.modules.get("triton"), "__version__", "?")
        return "triton", f"the Triton kernels (triton {version}, tile table {target})"
    return "tiled", f"no kernel for {device.type} tensors in this pack"


def resolve_backend(device: Union[str, torch.device], backend: Optional[str] = None) -> str:
    """choose_backend's backend; an automatic fall back to `tiled` warns once (per device type), saying why."""
    chosen, why = choose_backend(device, backend)
    if chosen == "tiled" and _requested(backend) == "auto":
        kind = torch.device(device).type
        _warn_once(f"tiled-{kind}", f"SVDQuant layers on {kind} run on the memory-bounded tiled fallback (dequantize "
                                    f"and fp32 matmul, much slower than a kernel): {why}")
    return chosen


@dataclass
class Packed:
    """One layer repacked for one backend and device.

    For the CPU and Triton kernels and the tiled fallback, `layer` is the layer with its 1-byte-per-weight `codes`
    replaced by a tensor on the meta device (shape and dtype, no storage): the kernel's nibble-packed copy is the
    only one kept, which is what makes a 4-bit model take ~0.6 bytes per weight instead of ~1.6. full_layer()
    rebuilds the codes when the reference path, a device move or a repack needs them."""

    backend: str            # what runs: 'cpu', 'triton', 'cuda', 'tiled' or 'reference'
    resolved: str           # what resolve_backend chose (differs when the layer does not fit that kernel)
    device: torch.device
    layer: Union[SVDQuantLayer, W4A16Layer]
    kernel: object = None   # cpu_packing.CpuW4A4/CpuW4A16, triton_w4a4.TritonW4A4/triton_w4a16.TritonW4A16,
                            # cuda_packing.Cuda*Weights, tiled.pack_codes's uint8 tensor, or None (reference)


def _without_codes(layer):
    """The layer with codes on the meta device: the packed kernel copy holds them (see Packed)."""
    return dataclasses.replace(layer, codes=torch.empty(layer.codes.shape, dtype=layer.codes.dtype, device="meta"))


def _layer_device(layer) -> torch.device:
    return layer.wscales.device if isinstance(layer, SVDQuantLayer) else layer.scales.device


def full_layer(packed: Packed) -> Union[SVDQuantLayer, W4A16Layer]:
    """The packed layer with its codes, unpacked again from the kernel copy when they were dropped. From the
    Triton copy of an NVFP4 layer, a negative group scale comes back as |scale| with the sign in the codes (the
    same values code·scale; triton_w4a4.pack_w4a4)."""
    layer = packed.layer
    if not layer.codes.is_meta:
        return layer
    if packed.backend == "tiled":
        return dataclasses.replace(layer, codes=tiled.unpack_codes(layer, packed.kernel))
    if packed.backend == "triton":
        w4a4, w4a16 = triton_kernels()
        if isinstance(layer, SVDQuantLayer):
            codes, wscales = w4a4.unpack_w4a4(packed.kernel)
            return dataclasses.replace(layer, codes=codes.to(_layer_device(layer)),
                                       wscales=wscales.to(_layer_device(layer)))
        return dataclasses.replace(layer, codes=w4a16.unpack_w4a16(packed.kernel)[0].to(_layer_device(layer)))
    if isinstance(layer, SVDQuantLayer):
        codes = cpu_packing.unpack_w4a4_codes(packed.kernel)
    else:
        codes = cpu_packing.unpack_w4a16_codes(packed.kernel)
    return dataclasses.replace(layer, codes=codes.to(_layer_device(layer)))


def _explicit(backend: Optional[str], name: str) -> bool:
    return _requested(backend) == name


def _unfit(backend: Optional[str], chosen: str, msg: str, key: str) -> None:
    """A layer the chosen kernel cannot run: raise when that kernel was asked for, else warn once."""
    if _explicit(backend, chosen):
        raise ValueError(f"{msg}; use backend 'tiled' or 'reference'")
    _warn_once(key, f"{msg}: such layers run on the memory-bounded tiled fallback")


def pack_svdquant(layer: SVDQuantLayer, device: Union[str, torch.device] = "cpu",
                  backend: Optional[str] = None) -> Packed:
    device = torch.device(device)
    resolved = chosen = resolve_backend(device, backend)
    if chosen == "cpu" and layer.R > cpu_packing.MAX_RANK:
        _unfit(backend, "cpu", f"rank {layer.R} exceeds the CPU kernels' limit {cpu_packing.MAX_RANK}", "max-rank")
        chosen = "tiled"
    if chosen == "cuda":
        from .kernels import cuda_packing
        if layer.K % cuda_packing.TILE_K or layer.R > cuda_packing.MAX_RANK:
            _unfit(backend, "cuda", f"K = {layer.K}, rank {layer.R}: the CUDA kernels need K % {cuda_packing.TILE_K} "
                                    f"== 0 and rank <= {cuda_packing.MAX_RANK}", "cuda-shape")
            chosen = "tiled"
        else:
            return Packed("cuda", resolved, device, layer, _to(cuda_packing.pack_svdquant_layer(layer), device))
    if chosen == "cpu":
        return Packed("cpu", resolved, device, _without_codes(layer), cpu_packing.pack_w4a4(layer))
    if chosen == "triton":
        w4a4, _ = triton_kernels()
        return Packed("triton", resolved, device, _without_codes(layer), w4a4.pack_w4a4(layer, device))
    if chosen == "tiled":
        return Packed("tiled", resolved, device, _without_codes(layer), tiled.pack_codes(layer).to(device))
    return Packed(chosen, resolved, device, layer)


def pack_w4a16(layer: W4A16Layer, device: Union[str, torch.device] = "cpu", backend: Optional[str] = None) -> Packed:
    device = torch.device(device)
    resolved = chosen = resolve_backend(device, backend)
    if chosen in ("cpu", "cuda") and layer.group_size % cpu_packing.STEP_K:  # both kernels read 8-input words
        _unfit(backend, chosen, f"W4A16 group size {layer.group_size} is not a multiple of {cpu_packing.STEP_K}: "
                                f"the {chosen} kernel cannot run it", "w4a16-group")
        chosen = "tiled"
    if chosen == "cpu":
        return Packed("cpu", resolved, device, _without_codes(layer), cpu_packing.pack_w4a16(layer))
    if chosen == "cuda":
        from .kernels import cuda_packing
        return Packed("cuda", resolved, device, layer, _to(cuda_packing.pack_w4a16_layer(layer), device))
    if chosen == "triton":
        _, w4a16 = triton_kernels()
        return Packed("triton", resolved, device, _without_codes(layer), w4a16.pack_w4a16(layer, device))
    if chosen == "tiled":
        return Packed("tiled", resolved, device, _without_codes(layer), tiled.pack_codes(layer).to(device))
    return Packed(chosen, resolved, device, layer)


def repack_lowrank(packed: Packed, layer: SVDQuantLayer, backend: Optional[str] = None) -> Packed:
    """`packed` with the low-rank branch and bias of `layer`, which must be packed's layer with only proj_down,
    proj_up and bias changed (a LoRA). On the CPU and Triton kernels and the tiled fallback the 4-bit codes, scales
    and smoothing are shared, not repacked; elsewhere (reference, CUDA, or a rank past the CPU kernels' limit) the
    layer is packed as usual."""
    if packed.backend == "cpu" and layer.R <= cpu_packing.MAX_RANK:
        return Packed("cpu", packed.resolved, packed.device, _without_codes(layer),
                      cpu_packing.repack_w4a4_lowrank(packed.kernel, layer))
    if packed.backend == "triton":
        k = packed.kernel
        return Packed("triton", packed.resolved, packed.device, _without_codes(layer), dataclasses.replace(
            k, R=layer.R, proj_down=_kernel_dtype(layer.proj_down, k.device),
            proj_up=_kernel_dtype(layer.proj_up, k.device), bias=_kernel_dtype(layer.bias, k.device)))
    if packed.backend == "tiled":
        return Packed("tiled", packed.resolved, packed.device, _without_codes(layer), packed.kernel)
    if layer.codes.is_meta:
        full = full_layer(packed)
        layer = dataclasses.replace(layer, codes=full.codes, wscales=full.wscales)
    if packed.backend == packed.resolved == "reference":
        return Packed("reference", "reference", packed.device, layer)
    return pack_svdquant(layer, packed.device, backend)


def _kernel_dtype(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """A low-rank factor or bias as the Triton kernels read it: bf16/fp16/fp32 kept, anything else widened to
    fp32 (as triton_w4a4.pack_w4a4 stores them), contiguous on `device`."""
    if t is None:
        return None
    return (t if t.dtype in _KERNEL_DTYPES else t.float()).to(device).contiguous()


def repack_bias(packed: Packed, layer: W4A16Layer) -> Packed:
    """`packed` (W4A16) with the bias of `layer`, which must be packed's layer with only the bias changed."""
    if packed.backend == "cpu":
        return Packed("cpu", packed.resolved, packed.device, _without_codes(layer),
                      cpu_packing.repack_w4a16_bias(packed.kernel, layer.bias))
    if packed.backend == "triton":
        return Packed("triton", packed.resolved, packed.device, _without_codes(layer),
                      dataclasses.replace(packed.kernel, bias=_kernel_dtype(layer.bias, packed.device)))
    if packed.backend == "tiled":
        return Packed("tiled", packed.resolved, packed.device, _without_codes(layer), packed.kernel)
    if packed.backend == "cuda":
        from .kernels import cuda_packing
        return Packed("cuda", packed.resolved, packed.device, layer,
                      _to(cuda_packing.pack_w4a16_layer(layer), packed.device))
    return Packed(packed.backend, packed.resolved, packed.device, layer)


def _to(weights, device: torch.device):
    """The tensors of a cuda_packing dataclass moved to `device` (in place)."""
    for name, value in vars(weights).items():
        if isinstance(value, torch.Tensor):
            setattr(weights, name, value.to(device))
    return weights


def packed_to(packed: Packed, device: torch.device) -> Packed:
    """A copy of `packed` with every tensor (the layer's and the kernel copy's) on `device`, the layout unchanged:
    what an offloaded module copies per call (nunchaku_core.linear). Copies to a GPU do not block the host (the
    kernels run after them on the same stream); copies to the CPU do, so the CPU never reads unfinished bytes."""
    blocking = device.type == "cpu"

    def move(obj):
        if obj is None:
            return None
        if isinstance(obj, torch.Tensor):   # the tiled fallback's packed codes
            return obj.to(device, non_blocking=not blocking)
        moved = {f.name: t.to(device, non_blocking=not blocking) for f in dataclasses.fields(obj)
                 if isinstance(t := getattr(obj, f.name), torch.Tensor) and not t.is_meta}
        return dataclasses.replace(obj, **moved)
    return Packed(packed.backend, packed.resolved, device, move(packed.layer), move(packed.kernel))


def _warn_dtype(x: torch.Tensor, packed: Packed) -> None:
    _warn_once(f"dtype-{packed.backend}-{x.dtype}", f"the {packed.backend} kernels take float32/bfloat16/float16 "
                                                    f"inputs, got {x.dtype}: running the tiled fallback")


def svdquant_linear(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """SVDQuant W4A4 layer forward. x: [..., K] -> [..., N] in x's dtype."""
    if x.device != packed.device:
        raise ValueError(f"input on {x.device} but the layer was packed for {packed.device}; repack for {x.device}")
    if packed.backend == "cpu":
        if x.dtype in _KERNEL_DTYPES:
            x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])         # x2: [M, K]
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
        _warn_dtype(x, packed)
    elif packed.backend == "triton":
        if x.dtype in _KERNEL_DTYPES:
            w4a4, _ = triton_kernels()
            return w4a4.svdquant_linear(x, packed.kernel)
        _warn_dtype(x, packed)
    elif packed.backend == "cuda":
        if x.dtype in (torch.bfloat16, torch.float16):  # csrc/cuda/ops.cuh through csrc/bindings.cpp; never run
            x2 = x.reshape(-1, x.shape[-1])
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
        _warn_dtype(x, packed)
    elif packed.backend == "reference":
        return reference.svdquant_linear(x, packed.layer)
    elif packed.backend == "tiled":
        return tiled.svdquant_linear(x, packed.layer, packed=packed.kernel)
    return tiled.svdquant_linear(x, full_layer(packed))


def w4a16_linear(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Weight-only 4-bit layer forward. x: [..., K] -> [..., N] in x's dtype."""
    if x.device != packed.device:
        raise ValueError(f"input on {x.device} but the layer was packed for {packed.device}; repack for {x.device}")
    if packed.backend == "cpu":
        if x.dtype in _KERNEL_DTYPES:
            p: cpu_packing.CpuW4A16 = packed.kernel
            y = _C.gemm_w4a16(x.reshape(-1, x.shape[-1]), p.wcodes, p.scales, p.zeros, p.bias, p.N, p.group_size,
                              cpu_isa())
            return y.reshape(*x.shape[:-1], p.N)
        _warn_dtype(x, packed)
    elif packed.backend == "triton":
        if x.dtype in _KERNEL_DTYPES:
            _, w4a16 = triton_kernels()
            return w4a16.w4a16_linear(x, packed.kernel)
        _warn_dtype(x, packed)
    elif packed.backend == "cuda":
        if x.dtype in (torch.bfloat16, torch.float16):
            w = packed.kernel
            y = _C.cuda_gemm_w4a16(x.reshape(-1, x.shape[-1]), w.qweight, w.scales, w.zeros, w.bias, w.group_size,
                                   torch.cuda.current_stream(x.device).cuda_stream)
            return y.reshape(*x.shape[:-1], w.N)
        _warn_dtype(x, packed)
    elif packed.backend == "reference":
        return reference.w4a16_linear(x, packed.layer)
    elif packed.backend == "tiled":
        return tiled.w4a16_linear(x, packed.layer, packed=packed.kernel)
    return tiled.w4a16_linear(x, full_layer(packed))
