"""nodes/quantize.py without a ComfyUI server: the node functions run against stand-ins for the few ComfyUI
APIs they touch (folder_paths, comfy.utils.ProgressBar, comfy.model_management, ModelPatcher.clone /
add_wrapper_with_key and the OUTER_SAMPLE executor). What ComfyUI itself does with them is the server
test's business (not written yet)."""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from nunchaku_core.models import flux
from nunchaku_core.quantize import svdquant as Q
from nunchaku_core.quantize.calibration import load_calibration
from nunchaku_core.formats.comfy_native import ComfyNativeCheckpoint
from nunchaku_core.formats.nunchaku import open_nunchaku

from test_quantize_flux import H, bfl_modules, tiny_bfl, write

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """Fake folder_paths + comfy.* modules rooted at tmp_path/models; returns (node module, state)."""
    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    state = types.SimpleNamespace(progress=[], interrupted=False)

    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models)
    fp.folder_names_and_paths = {"diffusion_models": ([str(models / "diffusion_models")], {".safetensors"})}
    fp.get_folder_paths = lambda name: fp.folder_names_and_paths[name][0]
    fp.get_filename_list = lambda name: sorted(p.name for p in Path(fp.get_folder_paths(name)[0]).glob("*")
                                               if p.is_file()) if Path(fp.get_folder_paths(name)[0]).is_dir() else []

    def full_path(name, f):
        p = Path(fp.get_folder_paths(name)[0]) / f
        if not p.is_file():
            raise FileNotFoundError(f"{name}/{f}")
        return str(p)
    fp.get_full_path_or_raise = full_path

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            state.progress.append((value, total))

    class Interrupted(Exception):
        pass

    def check_interrupt():
        if state.interrupted:
            raise Interrupted("interrupted")

    comfy_pkg = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = check_interrupt
    pe = types.ModuleType("comfy.patcher_extension")
    pe.WrappersMP = types.SimpleNamespace(OUTER_SAMPLE="outer_sample")
    comfy_pkg.utils, comfy_pkg.model_management, comfy_pkg.patcher_extension = utils, mm, pe
    for name, mod in (("folder_paths", fp), ("comfy", comfy_pkg), ("comfy.utils", utils),
                      ("comfy.model_management", mm), ("comfy.patcher_extension", pe)):
        monkeypatch.setitem(sys.modules, name, mod)
    # one smoothing candidate per layer: these tests are about the wiring, not the search
    monkeypatch.setattr(Q, "ALPHAS_DATA_FREE", (1.0,))
    monkeypatch.setattr(Q, "ALPHAS_CALIBRATED", (0.5,))
    # by path: once a test imported ComfyUI in this process, the name `nodes` is ComfyUI's nodes.py
    spec = importlib.util.spec_from_file_location("svdq_nodes_quantize", REPO / "nodes" / "quantize.py")
    node = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node)
    state.Interrupted = Interrupted
    return node, state, models


def test_quantize_node_writes_into_diffusion_models(comfy):
    node, state, models = comfy
    write(models / "diffusion_models" / "flux-tiny.safetensors", tiny_bfl())
    inputs = node.SVDQuantQuantizeModel.INPUT_TYPES()["required"]
    assert inputs["model_name"][0] == ["flux-tiny.safetensors"]
    assert inputs["calibration"][0] == [node.NO_CALIBRATION]
    out = node.SVDQuantQuantizeModel().quantize("flux-tiny.safetensors", "tiny-svdq", "int4", 16,
                                                node.NO_CALIBRATION, False, "nunchaku")
    assert out["result"] == ("tiny-svdq.safetensors",)
    assert state.progress[-1] == (16, 16) and len(state.progress) == 16
    with open_nunchaku(models / "diffusion_models" / "tiny-svdq.safetensors") as ck:
        assert ck.quantization_config["rank"] == 16
    assert (models / "diffusion_models" / "tiny-svdq.quality.json").is_file()
    # the default (auto, data-free INT4): ComfyUI's per-layer layout
    state.progress.clear()
    out = node.SVDQuantQuantizeModel().quantize("flux-tiny.safetensors", "tiny-comfy", "int4", 16,
                                                node.NO_CALIBRATION, False)
    assert "comfy layout" in out["ui"]["text"][0] and state.progress[-1][0] == state.progress[-1][1]
    ck = ComfyNativeCheckpoint(str(models / "diffusion_models" / "tiny-comfy.safetensors"))
    assert "double_blocks.0.img_attn.qkv" in ck.layer_names()
    with pytest.raises(ValueError, match="plain file name"):
        node.SVDQuantQuantizeModel().quantize("flux-tiny.safetensors", "../evil", "int4", 16, node.NO_CALIBRATION, False)


def test_quantize_node_interrupt_leaves_nothing(comfy):
    node, state, models = comfy
    write(models / "diffusion_models" / "flux-tiny.safetensors", tiny_bfl())
    state.interrupted = True
    before = sorted(p.name for p in (models / "diffusion_models").iterdir())
    with pytest.raises(state.Interrupted):
        node.SVDQuantQuantizeModel().quantize("flux-tiny.safetensors", "x", "int4", 16, node.NO_CALIBRATION, False)
    assert sorted(p.name for p in (models / "diffusion_models").iterdir()) == before


def test_record_calibration_node(comfy):
    """The patched clone records during 'sampling' (the OUTER_SAMPLE executor) and saves after each run;
    the file then drives the quantize node."""
    node, state, models = comfy
    sd = tiny_bfl()
    write(models / "diffusion_models" / "flux-tiny.safetensors", sd)
    dm = bfl_modules(sd)
    unet_config = flux.comfy_model_config(hidden_size=H, depth=1, depth_single_blocks=1, in_channels=16,
                                          context_in_dim=64, vec_in_dim=32, guidance_embed=True, num_heads=2)

    class Patcher:
        def __init__(self):
            self.model = types.SimpleNamespace(diffusion_model=dm,
                                               model_config=types.SimpleNamespace(unet_config=unet_config))
            self.wrappers = {}

        def clone(self):
            c = Patcher()
            c.wrappers = dict(self.wrappers)
            return c

        def add_wrapper_with_key(self, kind, key, fn):
            self.wrappers.setdefault(kind, []).append(fn)

    original = Patcher()
    (patched,) = node.SVDQuantRecordCalibration().patch(original, "my-calib", 64)
    assert original.wrappers == {} and len(patched.wrappers["outer_sample"]) == 1

    def sample():                                   # what CFGGuider.outer_sample would run: the model
        mods = dict(dm.named_modules())
        g = torch.Generator().manual_seed(0)
        for name in ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.img_mlp.0",
                     "double_blocks.0.img_mlp.2", "double_blocks.0.txt_attn.qkv", "double_blocks.0.txt_attn.proj",
                     "double_blocks.0.txt_mlp.0", "double_blocks.0.txt_mlp.2", "single_blocks.0.linear1",
                     "single_blocks.0.linear2"):
            mods[name](torch.randn(2, 40, mods[name].in_features, generator=g))
        return "latent"

    executor = types.SimpleNamespace(class_obj=types.SimpleNamespace(model_patcher=patched))
    wrapper = patched.wrappers["outer_sample"][0]
    run = lambda: wrapper(type("E", (), {"__call__": lambda self: sample(), "class_obj": executor.class_obj})())
    assert run() == "latent"
    path = models / "svdquant_calibration" / "my-calib.safetensors"
    assert load_calibration(path).count("double_blocks.0.img_mlp.2") == 80
    assert run() == "latent"                        # a second run accumulates
    cal = load_calibration(path)
    assert cal.count("double_blocks.0.img_mlp.2") == 160 and cal.stats("single_blocks.0.linear2").rows.shape == (64, 5 * H)
    assert all(not m._forward_pre_hooks for m in dm.modules())      # hooks live only during sampling

    inputs = node.SVDQuantQuantizeModel.INPUT_TYPES()["required"]
    assert "my-calib.safetensors" in inputs["calibration"][0]
    # auto + calibration: ComfyUI's layout, calibrated; nunchaku: Nunchaku's FLUX.1 format from the same file
    node.SVDQuantQuantizeModel().quantize("flux-tiny.safetensors", "calibrated", "int4", 16, "my-calib.safetensors", True)
    ck = ComfyNativeCheckpoint(str(models / "diffusion_models" / "calibrated.safetensors"))
    assert json.loads(ck.metadata["svdquant_quantizer"])["calibration"] == "my-calib.safetensors"
    node.SVDQuantQuantizeModel().quantize("flux-tiny.safetensors", "calibrated-nunchaku", "int4", 16,
                                          "my-calib.safetensors", False, "nunchaku")
    with open_nunchaku(models / "diffusion_models" / "calibrated-nunchaku.safetensors") as nk:
        assert nk.svdquant_layer_names()
