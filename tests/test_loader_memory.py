"""What the SVDQuant FLUX loader keeps resident (nodes/loader.py, nodes/checkpoint.py), with ComfyUI imported
in-process and tiny random checkpoints (bf16 unquantized tensors, as published checkpoints have):

- the unquantized weights stay in the file's bf16 and ComfyUI's manual_cast widens them per call to the fp32 it
  computes in on the CPU: the widening is exact, so a layer's output is the same bits as with fp32 weights;
- nothing the model keeps is a view into the checkpoint file's memory map (one view would keep every page of
  the file that loading touched resident).
"""
from __future__ import annotations

import pytest
import torch

import flux_models as fm
from comfy_inprocess import pack_module


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = fm.write_random_nunchaku_flux(tmp_path_factory.mktemp("mem") / "int4.safetensors")
    return path, pack_module("loader").load_svdquant_model(str(path))


def test_unquantized_weights_stay_bf16_and_compute_is_exact_fp32(loaded):
    _, patcher = loaded
    model = patcher.model
    assert model.manual_cast_dtype == torch.float32
    stock = {n: m for n, m in model.diffusion_model.named_modules()
             if isinstance(m, torch.nn.Linear) and getattr(m, "parts", None) is None and m.weight is not None}
    assert stock and all(m.weight.dtype == torch.bfloat16 for m in stock.values())
    g = torch.Generator().manual_seed(0)
    for name, m in stock.items():
        x = torch.randn(3, m.in_features, generator=g)
        want = torch.nn.functional.linear(x, m.weight.float(), None if m.bias is None else m.bias.float())
        with torch.no_grad():
            got = m(x)
        assert got.dtype == torch.float32 and torch.equal(got, want), name


def _file_ranges(path) -> list[tuple[int, int]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(path)):
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                out.append((lo, hi))
    return out


def test_model_holds_no_view_of_the_checkpoint_file(loaded):
    path, patcher = loaded
    dm = patcher.model.diffusion_model
    tensors = list(dm.parameters()) + list(dm.buffers())
    for m in dm.modules():
        if getattr(m, "parts", None) is not None:
            tensors += [t for p in m.parts for t in p.held_tensors()]
    ranges = _file_ranges(path)
    inside = [tuple(t.shape) for t in tensors if t.device.type == "cpu" and not t.is_meta
              and any(lo <= t.untyped_storage().data_ptr() < hi for lo, hi in ranges)]
    assert not inside, f"{len(inside)} tensors still map {path}, e.g. shapes {inside[:3]}"
