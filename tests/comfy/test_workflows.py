"""The shipped example workflows (workflows/*.json, ComfyUI's template folder for a custom node pack)
against a real ComfyUI: their node types and widget values match /object_info, their model links are
well-formed, the server serves them with thumbnails as templates, they run, and the web UI opens them with
no missing node.

Running them needs test models in place of the real ones (tens of GB): the SVDQuant loader gets a tiny random
Nunchaku file (tests/flux_models.py), VAELoader the random TAEF1, and the text-encoder part (CLIP loaders and
CLIPTextEncode) becomes TinyFluxConditioning (tests/comfy/tiny_flux_test: random conditioning of the widths
the model expects; CLIP-L / T5-XXL cannot be made small). Everything else (FluxGuidance, KSampler, latent,
decode, save) runs as shipped, at 64x64 and 2 steps.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

import flux_models as fm

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_DIR = REPO / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
PACK_NAME = "ComfyUI-SVDQuant"  # the custom_nodes folder name conftest installs us under
# Drawn by the frontend only, never sent to the server, so /object_info does not list them.
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODEL_FOLDERS = {"diffusion_models", "text_encoders", "clip", "vae", "loras", "checkpoints"}


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


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in workflow["links"]}  # [id, from node, from slot, to node, to slot, type]
    api = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node.get("mode", 0) == 0, f"node {node['id']} is muted or bypassed; not handled here"
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


def with_test_models(api: dict, object_info: dict, model_name: str, lora_name: str | None = None) -> dict:
    """Swap in the test models (module docstring); returns a new graph. A LoraLoader loses its CLIP side (no
    text encoder here) and becomes LoraLoaderModelOnly on a tiny random LoRA for the tiny model."""
    g = copy.deepcopy(api)
    loader = next(k for k, n in g.items() if n["class_type"] == "SVDQuantFluxLoader")
    for key, node in list(g.items()):
        t, inputs = node["class_type"], node["inputs"]
        outputs = object_info[t]["output"]
        if outputs and all(o == "CLIP" for o in outputs):  # DualCLIPLoader, SVDQuantTextEncoderLoader, ...
            del g[key]
        elif t == "CLIPTextEncode":
            g[key] = {"class_type": "TinyFluxConditioning",
                      "inputs": {"model": [loader, 0], "tokens": 8, "guidance": 3.5, "seed": int(key)}}
        elif t == "SVDQuantFluxLoader":
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
            inputs["vae_name"] = "taef1"
        elif t == "EmptySD3LatentImage":
            inputs.update(width=64, height=64)
        elif t == "KSampler":
            inputs.update(steps=2, seed=1)
    dangling = [(k, name) for k, n in g.items() for name, v in n["inputs"].items()
                if isinstance(v, list) and v[0] not in g]
    assert not dangling, f"inputs fed by removed nodes (extend with_test_models): {dangling}"
    return g


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
    api = ui_to_api(wf, object_info)  # asserts every node's widget count
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        spec = object_info[node["type"]]["input"]
        absent = set(spec.get("required", {})) - set(api[str(node["id"])]["inputs"])
        assert not absent, f"{path.name}: node {node['id']} {node['type']} lacks required inputs {absent}"
        model_files = {m["name"] for m in node.get("properties", {}).get("models", [])}
        for name, value in zip(widget_slots(object_info[node["type"]]), node["widgets_values"]):
            typ = {**spec.get("required", {}), **spec.get("optional", {})}[name][0] if name else None
            # Fixed choices (sampler, scheduler, CLIP type, dtype) must be valid; model file lists depend on
            # the disk, and those widgets are the ones properties.models covers (test_model_links).
            if isinstance(typ, list) and value not in model_files:
                assert value in typ, f"{path.name}: node {node['id']} {name}={value!r} not in {typ}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_model_links(path):
    """properties.models drives the frontend's "missing models" dialog with download buttons; it wants a
    Hugging Face (or Civitai) URL ending in the file name, and the widget must name the same file."""
    wf = load(path)
    by_node = {n["id"]: n.get("properties", {}).get("models", []) for n in wf["nodes"]}
    entries = [m for ms in by_node.values() for m in ms]
    assert any(m["directory"] == "diffusion_models" and m["name"].startswith("svdq-") for m in entries), entries
    for node in wf["nodes"]:
        for m in by_node[node["id"]]:
            assert set(m) == {"name", "url", "directory"}, m
            assert re.fullmatch(r"https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/[\w.-]+/(.+/)?"
                                + re.escape(m["name"]), m["url"]), m["url"]
            assert m["directory"] in MODEL_FOLDERS, m
            assert m["name"] in node["widgets_values"], (node["type"], m["name"], node["widgets_values"])


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
def test_workflow_runs(comfy, object_info, tiny_models, tiny_lora, path):
    api = ui_to_api(load(path), object_info)
    guidance = any(n["class_type"] == "FluxGuidance" for n in api.values())
    graph = with_test_models(api, object_info, tiny_models[guidance], tiny_lora)
    entry = comfy.run(graph)
    assert entry["status"]["status_str"] == "success", json.dumps(comfy.error(entry), indent=1)[:3000]
    images = comfy.images(entry)
    assert len(images) == 1 and images[0].shape == (64, 64, 3)


# ---------------------------------------------------------------------------------------------------------
# the web UI (headless Chromium)
# ---------------------------------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

# Runs in the page: load a template the way the template browser does (fetch it from the pack's route, then
# app.loadGraphData), recording what the frontend itself reports as missing. ComfyApp.loadGraphData calls
# showMissingNodesError(types) / showMissingModelsError(models, paths) for that, when it finds any.
OPEN_TEMPLATE_JS = """
const [url, mutate, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
const app = window.app, seen = {nodes: [], models: []};
const showNodes = app.showMissingNodesError, showModels = app.showMissingModelsError;
app.showMissingNodesError = (types, ...rest) => { seen.nodes.push(...types.map(t => t.type ?? t)); };
app.showMissingModelsError = (models, ...rest) => { seen.models.push(...models.map(m => m.name)); };
(async () => {
  try {
    const wf = await (await fetch(url)).json();
    if (mutate) wf.nodes[0].type = "NoSuchNodeType";
    await app.loadGraphData(wf, true, true, "template");
    const nodes = app.graph.nodes;
    done({seen, count: nodes.length, expected: wf.nodes.length,
          unregistered: nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
          errors: nodes.filter(n => n.has_errors).map(n => n.type)});
  } catch (e) {
    done({error: String(e && e.stack || e)});
  } finally {
    app.showMissingNodesError = showNodes; app.showMissingModelsError = showModels;
  }
})();
"""


@pytest.fixture(scope="module")
def browser(comfy):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("chromium / chromedriver are not installed: run scripts/setup_env.sh (it installs them unless "
                    "SVDQ_WITH_UI=0)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
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
        driver.get(comfy.url + "/")
        t0 = time.time()
        while not driver.execute_script("return !!(window.app && window.app.graph && window.LiteGraph)"):
            assert time.time() - t0 < 90, "the ComfyUI frontend did not come up in 90 s"
            time.sleep(0.25)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_web_ui_opens_template_without_missing_nodes(browser, comfy, path):
    url = f"/api/workflow_templates/{PACK_NAME}/{path.stem}.json"
    r = browser.execute_async_script(OPEN_TEMPLATE_JS, url, False)
    assert "error" not in r, r.get("error")
    assert r["seen"]["nodes"] == [] and r["unregistered"] == [] and r["errors"] == [], r
    assert r["count"] == r["expected"], r
    # The real model files are not on the test server, so the frontend lists them from properties.models
    # (except any that another test put into the shared models folders: the frontend rightly skips those).
    entries = [m for n in load(path)["nodes"] for m in n.get("properties", {}).get("models", [])]
    present = {(d, f) for d in {m["directory"] for m in entries} for f in comfy._call(f"/models/{d}")}
    wanted = {m["name"] for m in entries if (m["directory"], m["name"]) not in present}
    assert wanted, "every model of the workflow is present: the missing-models check would test nothing"
    assert wanted <= set(r["seen"]["models"]), r["seen"]["models"]


def test_web_ui_check_catches_a_missing_node(browser):
    """The same check on a doctored copy reports the node, so an empty report above means something."""
    url = f"/api/workflow_templates/{PACK_NAME}/{WORKFLOWS[0].stem}.json"
    r = browser.execute_async_script(OPEN_TEMPLATE_JS, url, True)
    assert "NoSuchNodeType" in r["seen"]["nodes"] and "NoSuchNodeType" in r["unregistered"], r
