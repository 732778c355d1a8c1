"""Backend dispatch (nunchaku_core.backend) and the modules that use it (nunchaku_core.linear): which kernel runs,
the overrides, the fallbacks and their one-time warnings, packing once."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

from nunchaku_core.layer import tensors_equal

from nunchaku_core import backend, reference
from nunchaku_core.linear import SVDQuantLinear, W4A16Linear

from test_cpu_kernels import random_input, random_layer, random_w4a16


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("SVDQ_BACKEND", raising=False)
    monkeypatch.delenv("SVDQ_CPU_ISA", raising=False)
    monkeypatch.setattr(backend, "_said", set())
    monkeypatch.setattr(backend, "_isa_by_env", {})


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
    with pytest.raises(ValueError, match="expected one of auto, cpu, cuda, reference"):
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
    with pytest.warns(RuntimeWarning, match="not built"):
        packed = backend.pack_svdquant(layer, "cpu")
    assert packed.backend == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        y = SVDQuantLinear(layer)(x)
    assert torch.equal(y, reference.svdquant_linear(x, layer))
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
    assert torch.equal(y, reference.w4a16_linear(x, odd))
    with pytest.raises(ValueError, match="group size 20"):
        backend.pack_w4a16(odd, "cpu", backend="cpu")


def test_float64_input_warns_and_uses_reference():
    layer = random_layer("int4", 40, 128, 16)
    x = random_input(3, 128, False, torch.float32).double()
    with pytest.warns(RuntimeWarning, match="float64"):
        y = SVDQuantLinear(layer)(x)
    assert torch.equal(y, reference.svdquant_linear(x, layer))
