"""The shipped example workflows (example_workflows/*.json, ComfyUI's template folder for a custom node pack)
against a real ComfyUI: their node types and widget values match /object_info, their model links are
well-formed, the server serves them with thumbnails as templates, they run, and the web UI opens them with
no missing node and draws them: with the host's own frontend and, where the server is new enough, the newest
frontend on PyPI (a screenshot per workflow and frontend lands in the pytest temp folder).

Running them needs test models in place of the real ones (tens of GB). FLUX.1: the SVDQuant loader gets a tiny
random Nunchaku file (tests/flux_models.py), VAELoader the random TAEF1, and the text-encoder part (CLIP loaders
and CLIPTextEncode) becomes TinyFluxConditioning (tests/comfy/tiny_flux_test: random conditioning of the widths
the model expects; CLIP-L / T5-XXL cannot be made small). Qwen-Image, Z-Image, FLUX.2, SD3.5, Chroma, Wan 2.1 and
SDXL (the family is read off the workflow's CLIPLoader / DualCLIPLoader type, or its TripleCLIPLoader): 'SVDQuant Model Loader' gets the family's tiny random model (tests/family_models.py)
quantized by nunchaku_core.quantize.model into ComfyUI's per-layer layout, CLIPTextEncode becomes
TinyFamilyConditioning, VAELoader the family's tiny decoder (tests/comfy/test_family_models.py). The Qwen-Image and
Z-Image workflows name Nunchaku's published files; the loader reads that layout too (tests/test_nunchaku_dit.py),
but only at widths ComfyUI cannot build, since its detection forces Qwen-Image's 3072 and Z-Image's 3840, so the
runs here load our own layout at those widths. The muted 'SVDQuant Quantize Model' node of the FLUX.2, SD3.5,
Chroma, Wan and SDXL workflows is run as their notes say, on the family's smallest tiny model: unmuted and queued once (it quantizes the tiny dense model while the rest of the graph fails
validation for want of the file), then muted again and queued. FLUX.2 runs where its tiny width is legal
(tests/comfy/test_family_quantized.py: 0.33, not 0.3.75). Everything else (ModelSamplingAuraFlow / SD3, FluxGuidance,
the samplers and schedulers, latent, decode, save, Wan's animated WEBP, whose first frame is checked) runs as shipped,
at 64x64 (Wan: 5 frames) and 2 steps.
"""
from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import family_models
from model_cache import cache_for, source_key
import flux_models as fm

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_DIR = REPO / "example_workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
PACK_NAME = "ComfyUI-SVDQuant"  # the custom_nodes folder name conftest installs us under
# Drawn by the frontend only, never sent to the server, so /object_info does not list them.
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODEL_FOLDERS = {"diffusion_models", "text_encoders", "clip", "vae", "loras", "checkpoints"}
SVDQUANT_LOADERS = ("SVDQuantFluxLoader", "SVDQuantModelLoader")
# CLIPLoader's / DualCLIPLoader's `type` -> the family in tests/family_models.py (a TripleCLIPLoader: SD3); a
# workflow without one is FLUX.1
FAMILY_OF_CLIP_TYPE = {"qwen_image": "qwen_image", "lumina2": "zimage", "flux2": "flux2", "chroma": "chroma",
                       "pixart": "pixart_sigma", "wan": "wan21_t2v", "sdxl": "sdxl", "TripleCLIPLoader": "sd3",
                       "flux": "flux1"}   # FLUX.1's DualCLIPLoader
MUTED = 2   # litegraph mode "never": the frontend does not send the node


def load(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------------
# UI (litegraph) format -> API format, for the node types these workflows use
# ---------------------------------------------------------------------------------------------------------

def widget_slots(spec: dict) -> list[str | None]:
    """The node's widgets in the order the frontend stores their values in `widgets_values`: the widget
    inputs in /object_info's input order, each INT seed (or any input with control_after_generate) followed
    by its "control after generate" widget (None here: saved, but not an input). Mirrors the frontend's
    useIntWidget / addComboWidget (comfyui-frontend 1.32)."""
    slots: list[str | None] = []
    order = spec.get("input_order") or {k: list(v) for k, v in spec["input"].items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            typ, *rest = spec["input"][section][name]
            opts = rest[0] if rest else {}
            kind = "COMBO" if isinstance(typ, list) else typ
            if kind not in WIDGET_TYPES or opts.get("forceInput"):
                continue
            slots.append(name)
            default_control = kind == "INT" and name in ("seed", "noise_seed")
            if opts.get("control_after_generate", default_control):
                slots.append(None)
    return slots


def ui_to_api(workflow: dict, object_info: dict, unmute: bool = False) -> dict:
    """What the frontend sends: the active nodes; with unmute, the muted ones too (as after Ctrl+M on them)."""
    links = {link[0]: link for link in workflow["links"]}  # [id, from node, from slot, to node, to slot, type]
    api = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        mode = node.get("mode", 0)
        assert mode in (0, MUTED), f"node {node['id']} has mode {mode} (bypassed?); not handled here"
        if mode == MUTED and not unmute:
            continue
        slots = widget_slots(object_info[node["type"]])
        values = node.get("widgets_values", [])
        assert len(values) == len(slots), (f"node {node['id']} {node['type']}: {len(values)} widget values "
                                           f"{values}, the server's inputs make {len(slots)} widgets {slots}")
        inputs = {name: v for name, v in zip(slots, values) if name is not None}
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                _, src, src_slot, *_ = links[socket["link"]]
                inputs[socket["name"]] = [str(src), src_slot]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def made_files(workflow: dict) -> set[str]:
    """The files the workflow's 'SVDQuant Quantize Model' nodes write (widgets: model_name, output_name, ...)."""
    outs = [n["widgets_values"][1] for n in workflow["nodes"] if n["type"] == "SVDQuantQuantizeModel"]
    return {o if o.endswith(".safetensors") else o + ".safetensors" for o in outs}


def workflow_family(api: dict) -> str:
    """"flux1", or the family of tests/family_models.py named by the workflow's CLIPLoader type."""
    types = {n["inputs"]["type"] for n in api.values() if n["class_type"] in ("CLIPLoader", "DualCLIPLoader")}
    types |= {n["class_type"] for n in api.values() if n["class_type"] == "TripleCLIPLoader"}
    families = {FAMILY_OF_CLIP_TYPE[t] for t in types if t in FAMILY_OF_CLIP_TYPE}
    assert len(families) <= 1 and len(families) == len(types), f"CLIPLoader types {types}: extend FAMILY_OF_CLIP_TYPE"
    return families.pop() if families else "flux1"


def family_decoder(family: str) -> str:
    """The VAELoader name of the family's tiny decoder (written by test_family_models._vae_files)."""
    from test_family_models import DECODER, _flux2_decoder
    return "taef1" if family == "flux1" else _flux2_decoder() if family == "flux2" else DECODER[family]


def with_test_models(api: dict, object_info: dict, model_name: str, lora_name: str | None = None,
                     family: str = "flux1", size: int = 64, steps: int = 2, seed: int = 1) -> dict:
    """Swap in the test models (module docstring); returns a new graph. A LoraLoader loses its CLIP side (no
    text encoder here) and becomes LoraLoaderModelOnly on a tiny random LoRA for the tiny model."""
    g = copy.deepcopy(api)
    loader = next(k for k, n in g.items() if n["class_type"] in SVDQUANT_LOADERS)
    for key, node in list(g.items()):
        t, inputs = node["class_type"], node["inputs"]
        outputs = object_info[t]["output"]
        if outputs and all(o == "CLIP" for o in outputs):  # DualCLIPLoader, CLIPLoader, SVDQuantTextEncoderLoader, ...
            del g[key]
        elif t == "CLIPTextEncode" and family == "flux1":
            g[key] = {"class_type": "TinyFluxConditioning",
                      "inputs": {"model": [loader, 0], "tokens": 8, "guidance": 3.5, "seed": int(key)}}
        elif t == "CLIPTextEncode":
            g[key] = {"class_type": "TinyFamilyConditioning",
                      "inputs": {"model": [loader, 0], "tokens": 8, "guidance": 3.5, "seed": int(key), "masked_tokens": 0}}
        elif t in SVDQUANT_LOADERS:
            inputs["model_name"] = model_name
        elif t == "LoraLoader":
            g[key] = {"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": inputs["model"], "lora_name": lora_name,
                                 "strength_model": inputs["strength_model"]}}
        elif t == "SVDQuantLoRAStack":
            inputs.pop("clip", None)
            for name in [k for k in inputs if k.startswith("lora_")]:
                inputs[name] = lora_name if inputs[name] != "None" else "None"
        elif t == "VAELoader":
            inputs["vae_name"] = family_decoder(family)
        elif t in ("EmptySD3LatentImage", "EmptyFlux2LatentImage", "Flux2Scheduler", "EmptyLatentImage"):
            inputs.update(width=size, height=size)
        elif t == "EmptyHunyuanLatentVideo":          # Wan: 5 frames (2 latent frames)
            inputs.update(width=size, height=size, length=5)
        if t in ("KSampler", "Flux2Scheduler"):
            inputs["steps"] = steps
        if t == "KSampler":
            inputs["seed"] = seed
        elif t == "RandomNoise":
            inputs["noise_seed"] = seed
    dangling = [(k, name) for k, n in g.items() for name, v in n["inputs"].items()
                if isinstance(v, list) and v[0] not in g]
    assert not dangling, f"inputs fed by removed nodes (extend with_test_models): {dangling}"
    return g


# Tiny family models, quantized as the workflows' files are (INT4, rank 32). Qwen-Image and Z-Image take 2 and
# 6 minutes to quantize on 2 cores (380 M and 900 M parameters: the widths ComfyUI forces), so the quantized
# files (260 MB and 480 MB) are cached across sessions in $SVDQ_TEST_CACHE, keyed by the sources that shape them.
FAMILY_RANK = 32


def _family_cache_key(family: str) -> str:
    """Hash of the tiny model's recipe and of every nunchaku_core module the quantizer runs."""
    import nunchaku_core.quantize.model  # noqa: F401  (loads the modules hashed below)
    modules = sorted(m for m in sys.modules if m == "nunchaku_core" or m.startswith("nunchaku_core."))
    files = [p for p in (getattr(sys.modules[m], "__file__", None) for m in modules) if p and p.endswith(".py")]
    return source_key(f"{family} rank {FAMILY_RANK} seed 5 {' '.join(modules)}", files,
                      (family_models.family_shapes, family_models.random_state_dict, family_models.write_random_model,
                       getattr(family_models, f"{family}_shapes")))


def quantized_family_model(family: str, models: Path) -> str:
    """The family's tiny model quantized into ComfyUI's layout, linked into models/diffusion_models; its name."""
    from nunchaku_core.quantize.flux import QuantizeOptions
    from nunchaku_core.quantize.model import quantize_model
    key = _family_cache_key(family)
    cache = cache_for(f"workflow-{family}", key)
    path = cache / f"workflow-{family}-{key}-int4.safetensors"
    if not path.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = family_models.write_random_model(family, Path(tmp) / "dense.safetensors", seed=5)
            out = Path(tmp) / "int4.safetensors"
            quantize_model(src, out, options=QuantizeOptions(rank=FAMILY_RANK, report=False))
            os.replace(out, path)
    link = models / "diffusion_models" / f"svdq_workflow_tiny_{family}.safetensors"
    if not link.is_symlink():
        link.symlink_to(path)
    return link.name


def quantize_in_workflow(comfy, workflow: dict, object_info: dict, models: Path, size: int = 64,
                         family: str = "flux2") -> str:
    """A quantize-first workflow's first run (FLUX.2, SD3.5, Chroma, Wan, SDXL), as its note says: its muted
    'SVDQuant Quantize Model' unmuted, on the family's tiny dense model (FLUX.2: this host's,
    tests/comfy/test_family_models.family_dims; the others at their smallest, tests/family_models.py), queued with
    the rest of the graph. ComfyUI queues the outputs that validate: the quantize node runs; the image chain is
    refused because the loader's file does not exist yet. Returns the name of the file it wrote (for the loader)."""
    from test_family_models import family_dims
    dims = family_dims(family)
    if family == "flux2" and dims["hidden"] == family_models.FLUX2_HIDDEN_0375:
        pytest.skip("this ComfyUI's FLUX.2 detection fixes 48 heads: the smallest FLUX.2 is hidden 6144, 1.7 G "
                    "parameters (tests/comfy/test_family_quantized.py); the FLUX.2 workflow runs on hosts that allow "
                    "hidden 128 (0.33)")
    api = ui_to_api(workflow, object_info, unmute=True)
    quant = [k for k, n in api.items() if n["class_type"] == "SVDQuantQuantizeModel"]
    assert len(quant) == 1, f"one SVDQuant Quantize Model expected, found {len(quant)}"
    dense = family_models.write_random_model(family, models / "diffusion_models" / f"svdq_workflow_tiny_{family}.safetensors",
                                             seed=5, **dims)
    if api[quant[0]]["inputs"]["model_name"].endswith(".pth"):
        # the source the workflow links is an original PyTorch release (PixArt's): the same tensors re-saved as
        # it is, torch.save({"state_dict": ...}), so the server's quantize node reads that format
        pth = dense.with_suffix(".pth")
        torch.save({"state_dict": load_file(str(dense))}, pth)
        dense.unlink()
        dense = pth
    stem = f"svdq_workflow_tiny_{family}_int4"
    (models / "diffusion_models" / f"{stem}.safetensors").unlink(missing_ok=True)
    api[quant[0]]["inputs"].update(model_name=dense.name, output_name=stem)
    graph = with_test_models(api, object_info, f"{stem}.safetensors", family=family, size=size)
    reply = comfy._call("/prompt", {"prompt": graph, "client_id": "svdq-workflow-test"})
    loader = next(k for k, n in graph.items() if n["class_type"] in SVDQUANT_LOADERS)
    refused = reply["node_errors"].get(loader, {}).get("errors", [])
    assert [e["type"] for e in refused] == ["value_not_in_list"], reply["node_errors"]
    entry = comfy.wait(reply["prompt_id"], 600)
    assert entry["status"]["status_str"] == "success", json.dumps(comfy.error(entry), indent=1)[:3000]
    assert list(entry["outputs"]) == quant, entry["outputs"]    # the quantize node alone ran
    assert (models / "diffusion_models" / f"{stem}.safetensors").is_file()
    return f"{stem}.safetensors"


def family_graph(comfy, path: Path, object_info: dict, models: Path, size: int | None = None, steps: int = 2,
                 seed: int = 1) -> tuple[str, dict]:
    """(family, the workflow's graph on its family's tiny model) for a workflow of a family beyond FLUX.1: its
    model quantized (by the workflow's own quantize node where it has one) and its decoders written. size: the
    image side, at least the family's test size (test_family_models.image_size: 64, PixArt 320)."""
    from test_family_models import _vae_files, image_size
    wf = load(path)
    api = ui_to_api(wf, object_info)
    family = workflow_family(api)
    assert family != "flux1", f"{path.name}: not a workflow of a family beyond FLUX.1"
    size = max(size or 0, image_size(family))      # PixArt's smallest legal side is 320
    _vae_files(models)
    if any(n["type"] == "SVDQuantQuantizeModel" for n in wf["nodes"]):
        name = quantize_in_workflow(comfy, wf, object_info, models, size, family)
    else:
        name = quantized_family_model(family, models)
    return family, with_test_models(api, object_info, name, family=family, size=size, steps=steps, seed=seed)


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def object_info(comfy) -> dict:
    return comfy._call("/object_info")


def test_workflows_and_thumbnails_are_shipped():
    assert WORKFLOWS, f"no workflows in {WORKFLOW_DIR}"
    from PIL import Image
    for wf in WORKFLOWS:
        thumb = wf.with_suffix(".jpg")  # the frontend asks for <name>.jpg (mediaSubtype "jpg")
        assert thumb.is_file(), f"{thumb.name} missing: the template browser shows a broken image"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and min(im.size) >= 256, (thumb.name, im.format, im.size)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_node_types_and_widgets_match_the_server(comfy, object_info, path):
    wf = load(path)
    missing = sorted({n["type"] for n in wf["nodes"]} - set(object_info) - FRONTEND_ONLY)
    assert not missing, f"{path.name}: node types the server does not have: {missing}"
    api = ui_to_api(wf, object_info, unmute=True)  # asserts every node's widget count, muted ones too
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        spec = object_info[node["type"]]["input"]
        absent = set(spec.get("required", {})) - set(api[str(node["id"])]["inputs"])
        assert not absent, f"{path.name}: node {node['id']} {node['type']} lacks required inputs {absent}"
        model_files = {m["name"] for m in node.get("properties", {}).get("models", [])} | made_files(wf)
        for name, value in zip(widget_slots(object_info[node["type"]]), node["widgets_values"]):
            typ = {**spec.get("required", {}), **spec.get("optional", {})}[name][0] if name else None
            # Fixed choices (sampler, scheduler, CLIP type, dtype) must be valid; model file lists depend on
            # the disk, and those widgets are the ones properties.models covers, or name a file the workflow's
            # quantize node writes (test_model_links).
            if isinstance(typ, list) and value not in model_files:
                assert value in typ, f"{path.name}: node {node['id']} {name}={value!r} not in {typ}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_model_links(path):
    """properties.models drives the frontend's "missing models" dialog with download buttons; it wants a
    Hugging Face (or Civitai) URL ending in the file name, and the widget must name the same file. The SVDQuant
    loader's file is a linked svdq-* download, or the output of the workflow's own quantize node, whose dense
    source is linked."""
    wf = load(path)
    by_node = {n["id"]: n.get("properties", {}).get("models", []) for n in wf["nodes"]}
    for node in wf["nodes"]:
        for m in by_node[node["id"]]:
            assert set(m) == {"name", "url", "directory"}, m
            assert re.fullmatch(r"https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/[\w.-]+/(.+/)?"
                                + re.escape(m["name"]), m["url"]), m["url"]
            assert m["directory"] in MODEL_FOLDERS, m
            assert m["name"] in node["widgets_values"], (node["type"], m["name"], node["widgets_values"])
    notes = " ".join(n["widgets_values"][0] for n in wf["nodes"] if n["type"] in FRONTEND_ONLY)
    for node in wf["nodes"]:   # the frontends' missing-model checks skip muted nodes: the note links their files
        if node.get("mode", 0) == MUTED:
            assert all(f"]({m['url']})" in notes for m in by_node[node["id"]]), (path.name, node["id"])
    made = made_files(wf)
    for node in wf["nodes"]:
        if node["type"] == "SVDQuantQuantizeModel":     # its source model is linked
            src = node["widgets_values"][0]
            assert [m["name"] for m in by_node[node["id"]] if m["directory"] == "diffusion_models"] == [src], node
    loaders = [n for n in wf["nodes"] if n["type"] in SVDQUANT_LOADERS]
    assert loaders, f"{path.name}: no SVDQuant loader"
    for node in loaders:
        name = node["widgets_values"][0]
        linked = [m for m in by_node[node["id"]] if m["directory"] == "diffusion_models"]
        assert (name.startswith("svdq-") and [m["name"] for m in linked] == [name]) or (not linked and name in made), \
            f"{path.name}: loader file {name!r} is neither a linked svdq-* download nor made by a quantize node {made}"


def test_server_lists_and_serves_the_templates(comfy):
    listed = comfy._call("/api/workflow_templates")
    assert sorted(listed.get(PACK_NAME, [])) == sorted(p.stem for p in WORKFLOWS), listed
    for wf in WORKFLOWS:
        for suffix in (".json", ".jpg"):
            raw = _get(comfy, f"/api/workflow_templates/{PACK_NAME}/{wf.stem}{suffix}")
            assert raw == wf.with_suffix(suffix).read_bytes(), f"{wf.stem}{suffix} served differently"


def _get(comfy, path: str) -> bytes:
    import urllib.request
    with urllib.request.urlopen(comfy.url + path, timeout=30) as r:
        return r.read()


@pytest.fixture(scope="module")
def tiny_models(comfy_models) -> dict[bool, str]:
    """Tiny random Nunchaku INT4 files, with guidance_in (dev) and without (schnell), by `guidance`."""
    d = comfy_models / "diffusion_models"
    return {g: fm.write_random_nunchaku_flux(d / f"svdq_workflow_tiny_{'dev' if g else 'schnell'}.safetensors",
                                             guidance=g).name for g in (True, False)}


@pytest.fixture(scope="module")
def tiny_lora(comfy_models) -> str:
    """A kohya-format LoRA for the tiny models, in models/loras."""
    from safetensors.torch import save_file
    import lora_files
    sd, _ = lora_files.kohya(hidden=256, depth=1, depth_single=1)
    save_file(sd, str(comfy_models / "loras" / "svdq_workflow_tiny_lora.safetensors"))
    return "svdq_workflow_tiny_lora.safetensors"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs(comfy, comfy_models, object_info, tiny_models, tiny_lora, path):
    api = ui_to_api(load(path), object_info)
    family = workflow_family(api)
    if family == "flux1":
        guidance = any(n["class_type"] == "FluxGuidance" for n in api.values())
        graph = with_test_models(api, object_info, tiny_models[guidance], tiny_lora)
        side = 64
    else:
        from test_family_models import _image_side
        family, graph = family_graph(comfy, path, object_info, comfy_models)
        side = _image_side(family, family_decoder(family))
    log_start = len(comfy.log())
    try:
        entry = comfy.run(graph)
    finally:
        comfy.free()
    assert entry["status"]["status_str"] == "success", json.dumps(comfy.error(entry), indent=1)[:3000]
    images = comfy.images(entry)
    assert len(images) == 1 and images[0].shape == (side, side, 3)
    if family != "flux1":   # ComfyUI built the family's own model class from our file
        assert f"as ComfyUI's {family_models.SUPPORTED_MODEL[family][0]} (" in comfy.log()[log_start:]


# ---------------------------------------------------------------------------------------------------------
# the web UI (headless Chromium), with the host's own frontend and the newest one on PyPI
# ---------------------------------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# The newest comfyui-frontend-package on PyPI (2026-12). The hosts pin their own (ComfyUI 0.3.75: 1.32.9,
# 0.33: 1.49.6); this one is unpacked into a cache and served with --front-end-root, never installed.
NEWER_FRONTEND = "1.58.1"
FRONTEND_CACHE = Path(os.environ.get("SVDQ_FRONTEND_CACHE")
                      or Path.home() / ".cache" / "comfyui-svdquant" / "frontends")

# Runs in the page: load a template the way the template browser does (fetch it from the pack's route, then
# app.loadGraphData) and leave window.svdqReport(), which returns what the frontend reports as missing.
# Where that goes depends on the frontend; we look for what it has, not at its version (read in the shipped JS
# of comfyui-frontend-package 1.32.9, 1.49.6 and 1.58.1):
# * all three call the extension hook afterConfigureGraph(missingNodeTypes) during the load;
# * 1.32.9: ComfyApp.loadGraphData calls app.showMissingNodesError(types) and app.showMissingModelsError(models,
#   paths), which open dialogs; the models are the properties.models entries whose file the server lacks;
# * 1.49.6, 1.58.1: app.showMissingModelsError is gone and loadGraphData no longer calls showMissingNodesError.
#   It files missing nodes in the Pinia store "missingNodesError" (.missingNodesError.nodeTypes) and missing
#   models in the store "missingModel" (.missingModelCandidates: model file names in combo widgets that are not
#   among the widget's choices, given url/directory from properties.models), shown as an "N issues found" toast
#   and the Errors panel, and it flags each node with a missing model `has_errors` (red outline).
# The stores are read through Pinia's root state (pinia.state.value), the Pinia instance through the Vue app
# that Vue records on its mount element (#vue-app).__vue_app__.
OPEN_TEMPLATE_JS = """
const [url, mutate, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
const app = window.app;
const pinia = document.getElementById("vue-app")?.__vue_app__?.config.globalProperties.$pinia;
const probe = window.svdqProbe ??= {hooked: null};
if (!probe.registered) {
  app.registerExtension({name: "SVDQuant.test.missingNodesProbe",
                         afterConfigureGraph(missing) { probe.hooked = (missing ?? []).map(t => t.type ?? t); }});
  probe.registered = true;
}
const legacy = typeof app.showMissingModelsError === "function";
const seen = {nodes: [], models: []};
const showNodes = app.showMissingNodesError, showModels = app.showMissingModelsError;
if (legacy) {
  app.showMissingNodesError = (types, ...rest) => { seen.nodes.push(...types.map(t => t.type ?? t)); };
  app.showMissingModelsError = (models, ...rest) => {
    seen.models.push(...models.map(m => ({name: m.name, directory: m.directory, url: m.url, nodeId: null})));
  };
}
(async () => {
  try {
    const wf = await (await fetch(url)).json();
    if (mutate) wf.nodes[0].type = "NoSuchNodeType";
    probe.hooked = null;
    await app.loadGraphData(wf, true, true, "template");
    const stores = pinia?.state.value ?? {};
    if (!legacy && !("missingNodesError" in stores && "missingModel" in stores))
      throw new Error("this frontend has neither app.showMissingModelsError nor the Pinia stores missingNodesError " +
                      "and missingModel (stores: " + Object.keys(stores) + "): find where it reports missing nodes now");
    window.svdqReport = () => {
      const nodes = app.graph.nodes;
      return {
        via: legacy ? "app.showMissingNodesError/showMissingModelsError" : "stores missingNodesError/missingModel",
        hooked: probe.hooked,
        nodes: legacy ? seen.nodes : (stores.missingNodesError.missingNodesError?.nodeTypes ?? []).map(t => t.type ?? t),
        models: legacy ? seen.models : (stores.missingModel.missingModelCandidates ?? []).map(
          m => ({name: m.name, directory: m.directory, url: m.url, nodeId: m.nodeId == null ? null : String(m.nodeId)})),
        count: nodes.length, expected: wf.nodes.length,
        unregistered: nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
        errors: nodes.filter(n => n.has_errors).map(n => ({id: String(n.id), type: n.type})),
      };
    };
    done(window.svdqReport());
  } catch (e) {
    done({error: String(e && e.stack || e)});
  } finally {
    if (legacy) { app.showMissingNodesError = showNodes; app.showMissingModelsError = showModels; }
  }
})();
"""

# Runs in the page after a draw: each node's box on the screen (CSS pixels, title bar included, clipped to
# the canvas) and whether the canvas (or the node's own DOM element, for Vue-rendered nodes) is what shows
# at its centre, i.e. no panel or toast covers it.
NODE_BOXES_JS = """
const app = window.app, c = app.canvas, el = c.canvas, box = el.getBoundingClientRect();
const [ox, oy] = c.ds.offset, s = c.ds.scale, th = LiteGraph.NODE_TITLE_HEIGHT;
return app.graph.nodes.map(n => {
  const x0 = Math.max(box.left, box.left + (n.pos[0] + ox) * s), x1 = Math.min(box.right, box.left + (n.pos[0] + n.size[0] + ox) * s);
  const y0 = Math.max(box.top, box.top + (n.pos[1] - th + oy) * s), y1 = Math.min(box.bottom, box.top + (n.pos[1] + n.size[1] + oy) * s);
  const hit = x1 > x0 && y1 > y0 ? document.elementFromPoint((x0 + x1) / 2, (y0 + y1) / 2) : null;
  return {id: String(n.id), type: n.type, box: [x0, y0, x1, y1].map(v => v * devicePixelRatio),
          shown: !!hit && (hit === el || !!hit.closest(`[data-node-id="${n.id}"]`))};
});
"""
# Empty canvas (background and grid) measured 3 colours in screenshots of all three frontends; a drawn node,
# with its title, slots and widgets in anti-aliased text, 190-600.
MIN_NODE_COLOURS = 16


def fetch_newer_frontend() -> Path:
    """comfyui-frontend-package==NEWER_FRONTEND's static files, downloaded once with pip into FRONTEND_CACHE."""
    root = FRONTEND_CACHE / NEWER_FRONTEND / "static"
    if (root / "index.html").is_file():
        return root
    FRONTEND_CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=FRONTEND_CACHE) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                            "-d", tmp, f"comfyui-frontend-package=={NEWER_FRONTEND}"], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode or len(wheels) != 1:
            pytest.fail(f"could not download comfyui-frontend-package=={NEWER_FRONTEND} from PyPI with pip (the web "
                        f"UI tests run it beside the host's own frontend; set SVDQ_FRONTEND_CACHE to a folder "
                        f"holding {NEWER_FRONTEND}/static to use a copy):\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(tmp, [n for n in z.namelist() if n.startswith("comfyui_frontend_package/static/")])
        root.parent.mkdir(exist_ok=True)
        os.replace(Path(tmp) / "comfyui_frontend_package" / "static", root)  # whole or not at all
    return root


@pytest.fixture(scope="module", params=["host", NEWER_FRONTEND],
                ids=lambda v: "frontend-host" if v == "host" else f"frontend-{v}")
def ui_server(request, comfy, comfy_models, tmp_path_factory):
    """The server whose web UI is tested: the session's, with the host's own frontend, or a second one on the
    same models serving NEWER_FRONTEND (--front-end-root)."""
    if request.param == "host":
        yield comfy
        return
    try:
        comfy._call("/api/jobs?limit=1")
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
        pytest.skip(f"this ComfyUI has no /api/jobs, from which frontend {NEWER_FRONTEND} reads its queue and "
                    f"history (ComfyUI 0.3.75 lacks it, 0.33 has it)")
    from conftest import comfy_server
    root = fetch_newer_frontend()
    with comfy_server(comfy_models, tmp_path_factory.mktemp("comfy_run_frontend"),
                      ("--front-end-root", str(root))) as client:
        yield client


@pytest.fixture(scope="module")
def browser(ui_server):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("chromium / chromedriver are not installed: run scripts/setup_env.sh (it installs them unless "
                    "SVDQ_WITH_UI=0)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    # A returning user: on a fresh user folder the frontend opens its Templates dialog over the canvas.
    ui_server._call("/settings/Comfy.TutorialCompleted", True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="svdq-chromium-")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900",
              f"--user-data-dir={profile}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(60)
    try:
        driver.get(ui_server.url + "/")
        t0 = time.time()
        while not driver.execute_script("return !!(window.app && window.app.graph && window.LiteGraph)"):
            assert time.time() - t0 < 90, "the ComfyUI frontend did not come up in 90 s"
            time.sleep(0.25)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_template(browser, stem: str, mutate: bool = False) -> dict:
    r = browser.execute_async_script(OPEN_TEMPLATE_JS, f"/api/workflow_templates/{PACK_NAME}/{stem}.json", mutate)
    assert "error" not in r, r.get("error")
    return r


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_web_ui_opens_template_without_missing_nodes(browser, ui_server, path):
    r = open_template(browser, path.stem)
    assert r["nodes"] == [] and r["hooked"] == [] and r["unregistered"] == [], r
    assert r["count"] == r["expected"], r
    # The real model files are not on the test server, so the frontend lists them, with the url and folder of
    # properties.models (except any that another test put into the shared models folders: the frontend rightly
    # skips those). Muted nodes' models are left out: frontends 1.49.6 and 1.58.1 do not check muted nodes
    # (measured); their links are in the workflow's note (test_model_links).
    entries = [m for n in load(path)["nodes"] if n.get("mode", 0) != MUTED for m in n.get("properties", {}).get("models", [])]
    present = {(d, f) for d in {m["directory"] for m in entries} for f in ui_server._call(f"/models/{d}")}
    wanted = {m["name"]: m for m in entries if (m["directory"], m["name"]) not in present}
    assert wanted, "every model of the workflow is present: the missing-models check would test nothing"
    t0 = time.time()
    while not set(wanted) <= {m["name"] for m in r["models"]} and time.time() - t0 < 20:
        time.sleep(0.25)  # the newer frontends finish their model check after loadGraphData returns
        r = browser.execute_script("return window.svdqReport()")
    reported = {m["name"]: m for m in r["models"]}
    assert set(wanted) <= set(reported), (r["via"], r["models"])
    for name, m in wanted.items():
        assert (reported[name]["url"], reported[name]["directory"]) == (m["url"], m["directory"]), (r["via"], reported[name])
    # No node has errors, but the newer frontends mark each node with a missing model: those, and only those.
    flagged = {m["nodeId"] for m in r["models"]}
    assert [e for e in r["errors"] if e["id"] not in flagged] == [], r


def test_web_ui_check_catches_a_missing_node(browser):
    """The same check on a doctored copy reports the node, so an empty report above means something."""
    r = open_template(browser, "svdquant-flux1-dev", mutate=True)   # a workflow whose models the test host has
    assert "NoSuchNodeType" in r["nodes"] and "NoSuchNodeType" in r["hooked"], r
    assert "NoSuchNodeType" in r["unregistered"], r


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory, ui_server):
    return tmp_path_factory.mktemp("web_ui_screenshots")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_web_ui_draws_the_template(browser, screenshot_dir, request, path):
    """A screenshot per workflow and frontend (in the pytest temp folder) shows every node the UI leaves
    uncovered drawn: its box on the canvas is not empty background."""
    import numpy as np
    from PIL import Image
    open_template(browser, path.stem)
    # the whole graph in view (the zoom menu's "Zoom to fit", in every frontend here), then two frames drawn
    browser.execute_async_script("""const done = arguments[0];
        window.app.extensionManager.command.execute("Comfy.Canvas.FitView");
        requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(done, 300)));""")
    png = browser.get_screenshot_as_png()
    boxes = browser.execute_script(NODE_BOXES_JS)
    frontend = request.node.callspec.params["ui_server"]
    (screenshot_dir / f"{path.stem}-frontend-{frontend}.png").write_bytes(png)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    shown = [b for b in boxes if b["shown"]]
    assert len(shown) >= len(boxes) // 2, f"panels cover most nodes: {boxes}"
    for b in shown:
        x0, y0, x1, y1 = (round(v) for v in b["box"])
        crop = img[y0:y1, x0:x1].reshape(-1, 3)
        colours = len(np.unique(crop, axis=0))
        assert colours >= MIN_NODE_COLOURS, (f"{path.stem}: node {b['id']} {b['type']} at {b['box']} shows "
                                             f"{colours} colours: not drawn (screenshot {screenshot_dir})")
