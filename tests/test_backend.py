"""Backend dispatch (nunchaku_core.backend) and the modules that use it (nunchaku_core.linear): which kernel runs,
the overrides, the fallbacks and their one-time warnings, packing once per device.

GPUs are simulated where only the choice is tested (torch.cuda and the Triton modules replaced by stubs inside
the tests); the Triton kernels themselves run in Triton's interpreter in a subprocess
(test_triton_backend_in_interpreter), as on a CPU-only machine they must."""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

from nunchaku_core.layer import SVDQuantLayer, W4A16Layer, tensors_equal

from nunchaku_core import backend, lora, reference
from nunchaku_core.kernels import tiled
from nunchaku_core.linear import SVDQuantLinear, W4A16Linear

from test_cpu_kernels import random_input, random_layer, random_w4a16


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("SVDQ_BACKEND", raising=False)
    monkeypatch.delenv("SVDQ_CPU_ISA", raising=False)
    monkeypatch.setattr(backend, "_said", set())
    monkeypatch.setattr(backend, "_isa_by_env", {})
    monkeypatch.setattr(backend, "_triton_state", None)


def test_auto_picks_compiled_cpu_kernel_and_best_isa(caplog):
    assert backend.resolve_backend("cpu") == "cpu"
    best = [i for i in backend.CPU_ISAS if backend._C.cpu_isa_supported(i)][-1]
    with caplog.at_level(logging.INFO, logger="nunchaku_core.backend"):
        assert backend.cpu_isa() == best
        assert backend.cpu_isa() == best
    assert sum("CPU kernels use" in r.message for r in caplog.records) == 1  # logged once


def test_extension_is_built_with_openmp():
    """csrc/bindings.cpp splits work with at::parallel_for, a header template that runs the whole range on the
    calling thread unless the file is compiled with -fopenmp; the kernels ran single-threaded that way until
    setup.py passed it. An OpenMP build calls libgomp's GOMP_parallel, so the symbol is in the extension."""
    with open(backend._C.__file__, "rb") as f:
        assert b"GOMP_parallel" in f.read(), f"{backend._C.__file__}: built without -fopenmp; rebuild with setup.py"


def test_argument_beats_environment(monkeypatch):
    monkeypatch.setenv("SVDQ_BACKEND", "reference")
    assert backend.resolve_backend("cpu") == "reference"
    assert backend.resolve_backend("cpu", "cpu") == "cpu"


@pytest.mark.parametrize("bad", ["gpu", "CPUX"])
def test_unknown_backend_raises(monkeypatch, bad):
    with pytest.raises(ValueError, match="expected one of auto, cpu, triton, cuda, tiled, reference"):
        backend.resolve_backend("cpu", bad)
    monkeypatch.setenv("SVDQ_BACKEND", bad)
    with pytest.raises(ValueError, match="SVDQ_BACKEND"):
        backend.resolve_backend("cpu")


def test_backend_for_wrong_device_raises():
    with pytest.raises(ValueError, match="cannot run tensors on cpu"):
        backend.resolve_backend("cpu", "cuda")


def test_forced_isa_and_bad_isa(monkeypatch):
    monkeypatch.setenv("SVDQ_CPU_ISA", "ref")
    assert backend.cpu_isa() == "ref"
    monkeypatch.setenv("SVDQ_CPU_ISA", "neon")
    with pytest.raises(ValueError, match="SVDQ_CPU_ISA='neon'"):
        backend.cpu_isa()


def test_without_extension_auto_falls_back_once_and_explicit_cpu_raises(monkeypatch):
    monkeypatch.setattr(backend, "_C", None)
    monkeypatch.setattr(backend, "_C_ERROR", ImportError("not built (test)"))
    layer = random_layer("int4", 40, 128, 16)
    x = random_input(3, 128, False, torch.float32)
    with pytest.warns(RuntimeWarning, match="tiled fallback.*not built"):
        packed = backend.pack_svdquant(layer, "cpu")
    assert packed.backend == "tiled"
    assert packed.layer.codes.is_meta and packed.kernel.dtype == torch.uint8    # codes kept two per byte
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        mod = SVDQuantLinear(layer)
        y = mod(x)
    assert torch.equal(y, tiled.svdquant_linear(x, layer))
    assert tensors_equal(mod.layer, layer)
    g = torch.Generator().manual_seed(9)
    downs, ups = [torch.randn(128, 8, generator=g) * 0.1], [torch.randn(40, 8, generator=g) * 0.1]
    ext = mod.with_lora(downs, ups, [0.5], layer.bias)
    assert ext._packed.kernel is mod._packed.kernel                              # a LoRA shares the codes
    full = lora.extend_lowrank(layer, downs, ups, [0.5], dtype=torch.float32)
    assert torch.equal(ext(x), tiled.svdquant_linear(x, full))
    with pytest.raises(RuntimeError, match="build_ext --inplace"):
        backend.pack_svdquant(layer, "cpu", backend="cpu")


@pytest.mark.parametrize("precision,shifted", [("int4", False), ("int4", True), ("nvfp4", False)])
def test_svdquant_module_dispatches_to_cpu_kernel(precision, shifted):
    layer = random_layer(precision, 40, 128 if precision == "int4" else 64, 16, shifted)
    K = layer.K
    x = random_input(6, K, shifted, torch.bfloat16).reshape(2, 3, K)        # extra batch dims
    mod = SVDQuantLinear(layer)
    y = mod(x)
    packed = mod._packed
    assert packed.backend == "cpu"
    # only the kernel's nibble-packed copy of the codes is kept; `layer` rebuilds them bit for bit
    assert mod._layer.codes.is_meta and all(not t.is_meta for t in mod.held_tensors())
    assert tensors_equal(mod.layer, layer)
    assert mod(x) is not None and mod._packed is packed                     # packed once
    y_ref = reference.svdquant_linear(x, layer)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    # Same quantized inputs, fp32 sums in other orders: at most a bf16 ulp or two apart (bounds: test_cpu_kernels).
    assert torch.allclose(y.float(), y_ref.float(), rtol=2 ** -7, atol=1e-3)


def test_module_repacks_when_backend_changes(monkeypatch):
    layer = random_layer("int4", 40, 128, 16)
    x = random_input(3, 128, False, torch.float32)
    mod = SVDQuantLinear(layer)
    mod(x)
    assert mod._packed.backend == "cpu"
    monkeypatch.setenv("SVDQ_BACKEND", "reference")
    assert torch.equal(mod(x), reference.svdquant_linear(x, layer))
    assert mod._packed.backend == "reference"


def test_w4a16_module_and_unfit_group_size():
    layer = random_w4a16(40, 200, 64)
    x = torch.randn(2, 5, 200)
    mod = W4A16Linear(layer)
    assert torch.allclose(mod(x), reference.w4a16_linear(x, layer), rtol=1e-5, atol=1e-5)
    assert mod._packed.backend == "cpu"
    odd = random_w4a16(40, 200, 20)
    with pytest.warns(RuntimeWarning, match="not a multiple of 8"):
        y = W4A16Linear(odd)(x)
    assert torch.equal(y, tiled.w4a16_linear(x, odd))
    with pytest.raises(ValueError, match="group size 20"):
        backend.pack_w4a16(odd, "cpu", backend="cpu")


def test_float64_input_warns_and_uses_tiled():
    layer = random_layer("int4", 40, 128, 16)
    x = random_input(3, 128, False, torch.float32).double()
    with pytest.warns(RuntimeWarning, match="float64"):
        y = SVDQuantLinear(layer)(x)
    assert torch.equal(y, tiled.svdquant_linear(x, layer))


# ---------------------------------------------------------------------------------------------------------
# the dispatch table, with GPUs and the Triton modules simulated
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class StubTritonW4A4:
    """Stands in for triton_w4a4.TritonW4A4 in the dispatch tests: the layer's tensors, codes kept as they are."""
    precision: str
    N: int
    K: int
    R: int
    wcodes: torch.Tensor
    wscales: torch.Tensor
    smooth: torch.Tensor
    proj_down: torch.Tensor
    proj_up: torch.Tensor
    bias: Optional[torch.Tensor]
    shifted: bool

    @property
    def device(self) -> torch.device:
        return self.wcodes.device


@dataclasses.dataclass
class StubTritonW4A16:
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: Optional[torch.Tensor]
    group_size: int


def _stub_triton(interpreted: bool):
    """(w4a4, w4a16) module stand-ins with the interface backend.py calls, running the reference."""
    calls = {"pack": 0, "run": 0}

    def pack_w4a4(layer, device):
        calls["pack"] += 1
        return StubTritonW4A4(layer.precision, layer.N, layer.K, layer.R, layer.codes.clone().to(device),
                              layer.wscales.to(device), layer.smooth.to(device), layer.proj_down.to(device),
                              layer.proj_up.to(device), layer.bias, layer.shifted)

    def svdquant_linear(x, p):
        calls["run"] += 1
        return reference.svdquant_linear(x, SVDQuantLayer(p.precision, p.wcodes, p.wscales, p.smooth, p.proj_down,
                                                          p.proj_up, p.bias, shifted=p.shifted))

    def pack_w4a16(layer, device):
        calls["pack"] += 1
        return StubTritonW4A16(layer.codes.clone(), layer.scales, layer.zeros, layer.bias, layer.group_size)

    def w4a16_linear(x, p):
        calls["run"] += 1
        return reference.w4a16_linear(x, W4A16Layer(p.codes, p.scales, p.zeros, p.bias, p.group_size))

    w4a4 = SimpleNamespace(INTERPRETED=interpreted, pack_w4a4=pack_w4a4, svdquant_linear=svdquant_linear,
                           unpack_w4a4=lambda p: (p.wcodes, p.wscales))
    w4a16 = SimpleNamespace(pack_w4a16=pack_w4a16, w4a16_linear=w4a16_linear, unpack_w4a16=lambda p: (p.codes, p.scales, p.zeros))
    return w4a4, w4a16, calls


@pytest.fixture
def gpu(monkeypatch):
    """A simulated GPU: Triton importable (stubs) with a tile table for cuda devices; returns a setter for whether
    Triton imports and whether the compiled CUDA kernels were built."""
    from nunchaku_core.kernels import triton_common
    monkeypatch.setattr(triton_common, "target_key", lambda device: "sm89")

    def set_(triton: bool, cuda_built: bool = False):
        w4a4, w4a16, _ = _stub_triton(interpreted=False)
        monkeypatch.setattr(backend, "_triton_state", (w4a4, w4a16) if triton else
                            ImportError("No module named 'triton' (test)"))
        monkeypatch.setattr(backend, "cuda_kernels_available", lambda: cuda_built)
    return set_


@pytest.mark.parametrize("device,triton,cuda_built,want,why", [
    ("cpu", True, False, "cpu", "compiled CPU kernels"),
    ("cuda:0", True, False, "triton", "tile table sm89"),
    ("cuda:0", True, True, "triton", "tile table sm89"),      # a CUDA build is used only when asked for
    ("cuda:0", False, True, "tiled", "No module named 'triton'"),
    ("cuda:0", False, False, "tiled", "triton-windows"),
    ("mps", True, False, "tiled", "no kernel for mps"),
    ("xpu:0", True, False, "tiled", "no kernel for xpu"),
], ids=lambda v: str(v))
def test_auto_dispatch_table(gpu, device, triton, cuda_built, want, why):
    gpu(triton, cuda_built)
    chosen, reason = backend.choose_backend(device)
    assert chosen == want and why in reason, reason


def test_auto_never_runs_the_reference(gpu, monkeypatch):
    gpu(False)
    monkeypatch.setattr(backend, "_C", None)
    for device in ("cpu", "cuda:0", "mps", "xpu", "privateuseone"):
        assert backend.choose_backend(device)[0] == "tiled"


def test_gpu_without_triton_unfit_triton_target(gpu, monkeypatch):
    """A GPU no Triton tile table covers (pre-Ampere NVIDIA): tiled, naming the reason."""
    from nunchaku_core.kernels import triton_common
    gpu(True)

    def old_gpu(device):
        raise ValueError(f"{device} has compute capability 7.5: the Triton kernels need sm_80 or newer")
    monkeypatch.setattr(triton_common, "target_key", old_gpu)
    chosen, reason = backend.choose_backend("cuda:0")
    assert chosen == "tiled" and "sm_80" in reason


def test_explicit_backends(gpu, monkeypatch):
    gpu(True, cuda_built=True)
    assert backend.choose_backend("cuda:0", "cuda")[0] == "cuda"
    assert backend.choose_backend("cuda:0", "tiled")[0] == "tiled"
    assert backend.choose_backend("mps", "reference")[0] == "reference"
    monkeypatch.setenv("SVDQ_BACKEND", "triton")
    assert backend.choose_backend("cuda:1") == ("triton", "SVDQ_BACKEND=triton: the Triton kernels (sm89)")
    with pytest.raises(ValueError, match="cannot run tensors on mps"):
        backend.choose_backend("mps")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backend.choose_backend("cpu")
    gpu(False, cuda_built=False)
    with pytest.raises(ImportError, match="triton-windows"):
        backend.choose_backend("cuda:0")
    with pytest.raises(RuntimeError, match="SVDQ_BUILD_CUDA=1"):
        backend.choose_backend("cuda:0", "cuda")
    with pytest.raises(ValueError, match="cannot run tensors on cpu"):
        backend.choose_backend("cpu", "cuda")


@pytest.mark.parametrize("device", ["mps", "cuda:0"])
def test_auto_tiled_warns_once_per_device_type(gpu, device):
    gpu(False)
    with pytest.warns(RuntimeWarning, match="tiled fallback"):
        assert backend.resolve_backend(device) == "tiled"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.resolve_backend(device) == "tiled"


def test_triton_path_packs_once_drops_codes_and_shares_them_with_loras(monkeypatch):
    """SVDQ_BACKEND=triton on CPU tensors (the interpreter case), the Triton modules stubbed: packed once, the
    1-byte codes dropped (the kernel copy holds them; `layer` unpacks them), a LoRA repacks only the branch."""
    w4a4, w4a16, calls = _stub_triton(interpreted=True)
    monkeypatch.setattr(backend, "_triton_state", (w4a4, w4a16))   # kernels as imported under TRITON_INTERPRET=1
    monkeypatch.setenv("SVDQ_BACKEND", "triton")
    layer = random_layer("int4", 40, 128, 16, shifted=True)
    x = random_input(3, 128, True, torch.float32)
    mod = SVDQuantLinear(layer)
    assert mod._packed.backend == "triton" and mod._layer.codes.is_meta
    assert tensors_equal(mod.layer, layer)
    for _ in range(2):
        assert torch.equal(mod(x), reference.svdquant_linear(x, layer))
    assert calls == {"pack": 1, "run": 2}
    g = torch.Generator().manual_seed(9)
    down, up = torch.randn(128, 8, generator=g) * 0.1, torch.randn(40, 8, generator=g) * 0.1
    ext = mod.with_lora([down], [up], [0.5], layer.bias)
    assert ext._packed.kernel.wcodes is mod._packed.kernel.wcodes and calls["pack"] == 1
    full = lora.extend_lowrank(layer, [down], [up], [0.5], dtype=torch.float32)
    assert torch.equal(ext(x), reference.svdquant_linear(x, full))

    w = random_w4a16(40, 200, 64)
    xw = torch.randn(2, 200)
    wmod = W4A16Linear(w)
    assert wmod._packed.backend == "triton" and wmod._layer.codes.is_meta and tensors_equal(wmod.layer, w)
    assert torch.equal(wmod(xw), reference.w4a16_linear(xw, w))
    bias = torch.randn(40)
    assert torch.equal(wmod.with_delta(None, bias)(xw),
                       reference.w4a16_linear(xw, dataclasses.replace(w, bias=bias)))


# ---------------------------------------------------------------------------------------------------------
# offloaded modules (ComfyUI lowvram): packed once per device, copied per call
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("choice", [None, "tiled"])
@pytest.mark.parametrize("kind", ["svdquant", "w4a16"])
def test_offloaded_module_packs_once_per_device_and_copies_per_call(monkeypatch, kind, choice):
    """A module whose tensors live on another device than its input (ComfyUI's lowvram mode leaves modules on
    the offload device, nodes/ops.py): the layer is packed for the input's device once, that copy is kept on the
    module's device, and each call copies it over; outputs equal the resident module's bit for bit. torch has a
    single CPU device, so the module's device is simulated as cpu:1 (tensors moved there stay on the CPU)."""
    if kind == "svdquant":
        layer, x, cls, pack = random_layer("int4", 40, 128, 16), random_input(3, 128, False, torch.bfloat16), \
            SVDQuantLinear, "pack_svdquant"
    else:
        layer, x, cls, pack = random_w4a16(40, 200, 64), torch.randn(3, 200).bfloat16(), W4A16Linear, "pack_w4a16"
    want = cls(layer, choice)(x)
    mod = cls(layer, choice)
    packs, moves = [], []
    real_pack, real_to = getattr(backend, pack), backend.packed_to
    monkeypatch.setattr(backend, pack, lambda lay, device, choice=None: packs.append(device) or
                        real_pack(lay, device, choice))
    monkeypatch.setattr(backend, "packed_to", lambda p, device: moves.append(device) or real_to(p, device))
    monkeypatch.setattr(cls, "device", property(lambda self: torch.device("cpu", 1)))
    for _ in range(3):
        assert torch.equal(mod(x), want)
    cpu, offload = torch.device("cpu"), torch.device("cpu", 1)
    assert packs == [cpu]                       # packed once for the input's device
    assert moves == [offload, cpu, cpu, cpu]    # kept on the module's device, copied per call
    staged = mod._staged[(cpu, choice or "cpu")]
    assert staged.device == offload and staged.kernel is not None
    kernel = [staged.kernel] if isinstance(staged.kernel, torch.Tensor) else \
        [t for t in vars(staged.kernel).values() if isinstance(t, torch.Tensor)]
    assert all(any(t is h for h in mod.held_tensors()) for t in kernel)   # ComfyUI's memory accounting sees it
    mod.layer = layer                           # a move (or a new layer) drops the staged copies
    assert mod._staged == {}


# ---------------------------------------------------------------------------------------------------------
# the Triton kernels through the backend, in Triton's interpreter
# ---------------------------------------------------------------------------------------------------------

def test_triton_backend_in_interpreter():
    """tests/triton_backend_cases.py in a process of its own with TRITON_INTERPRET=1 and SVDQ_BACKEND=triton, as a
    CPU-only machine runs the Triton kernels (Triton reads the variable when the kernels are imported, so one
    process cannot hold both kinds): the backend's choice, packing, LoRA repacking and calls, kernels on numpy."""
    env = dict(os.environ, TRITON_INTERPRET="1", SVDQ_BACKEND="triton")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(Path(__file__).parent / "triton_backend_cases.py")],
                       cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
