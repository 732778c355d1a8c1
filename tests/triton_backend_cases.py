"""The Triton kernels through nunchaku_core.backend and nunchaku_core.linear (SVDQ_BACKEND=triton), run by
Triton's interpreter on CPU tensors. Run by tests/test_backend.py::test_triton_backend_in_interpreter in a process
of its own (Triton decides at import time whether kernels are interpreted). By hand:
    TRITON_INTERPRET=1 SVDQ_BACKEND=triton python -m pytest tests/triton_backend_cases.py
The kernels' own tests against the reference are tests/triton_interpreter_cases.py; these check what the backend
adds: the choice, packing once with the 1-byte codes dropped, unpacking them again, LoRA repacks sharing the codes.
"""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("SVDQ_BACKEND") != "triton":
    raise ImportError("tests/triton_backend_cases.py needs TRITON_INTERPRET=1 and SVDQ_BACKEND=triton in the "
                      "environment before Python starts; tests/test_backend.py runs it that way")

from kernel_bounds import w4a4_bound, w4a16_bound  # noqa: E402
from nunchaku_core import backend, lora, reference  # noqa: E402
from nunchaku_core.kernels import triton_w4a4 as w4a4, triton_w4a16 as w4a16  # noqa: E402
from nunchaku_core.layer import tensors_equal  # noqa: E402
from nunchaku_core.linear import SVDQuantLinear, W4A16Linear  # noqa: E402
from test_cpu_kernels import random_input, random_layer, random_w4a16  # noqa: E402


@pytest.mark.parametrize("precision,shifted,M,K,dtype", [
    ("int4", False, 3, 128, torch.bfloat16), ("int4", True, 17, 192, torch.float32),
    ("nvfp4", False, 5, 64, torch.float16)], ids=str)
def test_svdquant_module_on_triton(precision, shifted, M, K, dtype):
    """The module on the Triton backend computes exactly what the kernel module computes on the same packing,
    within kernel_bounds.w4a4_bound of the reference on the same quantized inputs, keeps no 1-byte codes, and a
    LoRA joined to it gives the same bits as a fresh pack of the extended layer."""
    layer = random_layer(precision, 40, K, 16, shifted)
    x = random_input(M, K, shifted, dtype)
    mod = SVDQuantLinear(layer)
    assert backend.choose_backend("cpu")[0] == "triton"
    y = mod(x)
    assert mod._packed.backend == "triton" and mod._layer.codes.is_meta
    assert torch.equal(y, w4a4.svdquant_linear(x, w4a4.pack_w4a4(layer, "cpu")))
    codes, scales = reference.quantize_act(x, layer)
    y_ref = reference.gemm_w4a4(codes, scales, layer) + reference.lowrank_branch(x, layer) + layer.bias.float()
    err = (y.double() - y_ref.to(dtype).double()).abs()
    bound = w4a4_bound(layer, x, codes, scales, y_ref, dtype)
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item()}"
    assert torch.equal(reference.svdquant_linear(x, mod.layer), reference.svdquant_linear(x, layer))
    g = torch.Generator().manual_seed(9)
    downs, ups = [torch.randn(K, 8, generator=g) * 0.1], [torch.randn(40, 8, generator=g) * 0.1]
    ext = mod.with_lora(downs, ups, [0.5], layer.bias)
    full = lora.extend_lowrank(layer, downs, ups, [0.5], dtype=torch.float32)
    assert torch.equal(ext(x), w4a4.svdquant_linear(x, w4a4.pack_w4a4(full, "cpu")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_w4a16_module_on_triton(dtype):
    layer = random_w4a16(40, 200, 64)
    x = (torch.randn(5, 200, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    mod = W4A16Linear(layer)
    y = mod(x)
    assert mod._packed.backend == "triton" and mod._layer.codes.is_meta and tensors_equal(mod.layer, layer)
    assert torch.equal(y, w4a16.w4a16_linear(x, w4a16.pack_w4a16(layer, "cpu")))
    if dtype == torch.float32:   # bf16: the kernel rounds weights to bf16 (bound in tests/test_triton_kernels.py)
        y_ref = reference.w4a16_linear(x, layer)
        err = (y.double() - y_ref.double()).abs()
        assert torch.all(err <= w4a16_bound(layer, x, y_ref, dtype))
