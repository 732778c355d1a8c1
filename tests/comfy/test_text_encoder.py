"""'SVDQuant Text Encoder Loader' in the real ComfyUI.

Models (written per module): a real-shaped CLIP-L with random weights (123M parameters; CLIP cannot be made
smaller, its sizes come from ComfyUI's fixed JSON), a tiny random T5 (vocab 32128 so ComfyUI's T5 tokenizer
fits, d_model 128, 2 blocks; its config reaches ComfyUI's T5 class from the file's metadata) as a plain
16-bit file in our format, and that T5 quantized by our quantizer (AWQ, calibrated on ComfyUI's tokenizer).

In a subprocess (a clean interpreter: ComfyUI's top-level `nodes` module and ours must not meet in the
pytest process) ComfyUI is imported, the pack is loaded as ComfyUI loads custom nodes, and ComfyUI's own
CLIPTextEncode and stock conditioning nodes run on both encoders. Then, against a live server (`comfy`
fixture): the loader in a graph CLIPTextEncode -> FluxGuidance -> KSampler with a tiny SVDQuant FLUX, and a
DiT checkpoint given as text encoder failing with our message.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import COMFYUI, REPO

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from nunchaku_core.quantize import t5 as qt  # noqa: E402
from nunchaku_core.formats import nunchaku_t5 as nt              # noqa: E402
from nunchaku_core.reference import dequantize_w4a16             # noqa: E402

import flux_models                                                # noqa: E402
from test_t5_format import random_t5                              # noqa: E402

T5_TINY = dict(vocab_size=32128, d_model=128, d_kv=32, d_ff=256, num_heads=4, num_layers=2)
PROMPTS = [
    "a photo of a cat",
    "A majestic lion standing on a rock at sunset, golden light, highly detailed photograph",
    "",
    "a (red:1.3) car parked on the moon",
    " ".join(["a long prompt about a garden with roses, tulips and a small wooden bridge over a pond"] * 16),
]
UNWEIGHTED = [0, 1, 2, 4]          # prompts whose T5 part is the plain encoder output (no prompt weights)
# Cosine of the 4-bit T5 part against the 16-bit one, per prompt (flattened [L, d_model]). An error e that is
# uncorrelated with the output y gives cos = 1/√(1 + r²), r = ‖e‖/‖y‖. Budget for r: uint4 min/max over 128
# weights leaves ~10% error on each module's output (measured 7-12% with AWQ, 9-16% RTN); the 8 modules of
# 2 blocks add in quadrature on the residual stream, √8 · 0.1 = 0.28; the softmax of a random T5 amplifies
# q/k errors up to ~1.5x (measured r = 0.17-0.34 on these prompts, worst for the long repetitive one):
# r <= 0.42, i.e. cos >= 1/√(1 + 0.42²) = 0.92. Bugs give far less (one wrong scale fold: r ~0.7, cos ~0.8;
# a wrong layout or config: cos ~0). It bounds bugs on random weights; it is not a quality figure for T5-XXL.
MIN_COSINE = 0.92
# the test T5 LoRA: rank 4 on every linear of each block (ComfyUI's T5 names after lora_te2_encoder_block_<i>_)
T5_LORA_SHAPES = {"layer_0_SelfAttention_q": (128, 128), "layer_0_SelfAttention_k": (128, 128),
                  "layer_0_SelfAttention_v": (128, 128), "layer_0_SelfAttention_o": (128, 128),
                  "layer_1_DenseReluDense_wi_0": (256, 128), "layer_1_DenseReluDense_wi_1": (256, 128),
                  "layer_1_DenseReluDense_wo": (128, 256)}
T5_LORA_STD = 0.3
# ComfyUI's fp32 T5 against our reference forward on the same weights: only the summation order differs
# (SDPA vs explicit softmax, fused matmuls): ~1e-6 relative per layer, so 1e-4 over 2 blocks is a loose bound
# that still catches any real difference (a wrong config or weight gives O(1)).
SAME_WEIGHTS_RTOL = 1e-4


@pytest.fixture(scope="module")
def te_files(tmp_path_factory):
    """text_encoders/ with clip_l, t5_fp16 (plain, our format), t5_int4 (our quantizer) and bad inputs."""
    if not (COMFYUI / "comfy" / "text_encoders" / "t5_tokenizer" / "tokenizer.json").is_file():
        pytest.fail(f"no ComfyUI at {COMFYUI}: run scripts/setup_env.sh or set SVDQ_COMFYUI")
    d = tmp_path_factory.mktemp("text_encoders")
    save_file(flux_models.clip_l_state_dict(), str(d / "clip_l.safetensors"))
    sd = random_t5(T5_TINY, seed=1)
    nt.write_t5(str(d / "t5_fp16.safetensors"), T5_TINY, sd, dtype=torch.bfloat16)
    ids = qt.tokenize(qt.DEFAULT_PROMPTS[:8], COMFYUI / "comfy/text_encoders/t5_tokenizer/tokenizer.json")
    qt.quantize_t5(qt.T5Source(d / "t5_fp16.safetensors"), str(d / "t5_int4.safetensors"), ids)

    flux_models.write_random_nunchaku_flux(d / "svdq-int4-tiny-flux.safetensors", hidden=256, context_dim=128,
                                           vec_dim=768)
    data = (d / "t5_int4.safetensors").read_bytes()
    (d / "t5_int4_truncated.safetensors").write_bytes(data[: len(data) // 2])
    with safe_open(str(d / "t5_int4.safetensors"), "pt") as f:
        meta = dict(f.metadata())
    meta["config"] = json.dumps(nt.hf_config(dict(nt.normalize_config(T5_TINY), d_ff=512)))
    save_file(load_file(str(d / "t5_int4.safetensors")), str(d / "t5_int4_wrong_config.safetensors"), metadata=meta)
    return d


PROBE = r"""
import importlib.util, json, sys, traceback
comfyui, repo, d, out = sys.argv[1:5]
prompts = json.loads(sys.argv[5])
T5_LORA_SHAPES, T5_LORA_STD = json.loads(sys.argv[6]), float(sys.argv[7])
sys.path.insert(0, comfyui)
sys.argv = [sys.argv[0], "--cpu"]                 # as the server runs: no GPU probing
import comfy.options
comfy.options.enable_args_parsing()
import torch
from safetensors.torch import save_file
import nodes                                       # ComfyUI's own
from comfy_extras.nodes_flux import FluxGuidance
spec = importlib.util.spec_from_file_location("ComfyUI-SVDQuant", repo + "/__init__.py")
pack = importlib.util.module_from_spec(spec)
sys.modules["ComfyUI-SVDQuant"] = pack
spec.loader.exec_module(pack)
assert "SVDQuantTextEncoderLoader" in pack.NODE_CLASS_MAPPINGS
te = sys.modules["ComfyUI-SVDQuant.nodes.text_encoder"]
tensors, info = {}, {"errors": {}, "size": {}, "lora": {}}
for case in ("t5_fp16", "t5_int4"):
    clip = te.load_text_encoder(f"{d}/{case}.safetensors", f"{d}/clip_l.safetensors")
    info["size"][case] = clip.patcher.model_size()
    for i, p in enumerate(prompts):
        (cond,) = nodes.CLIPTextEncode().encode(clip, p)
        tensors[f"{case}/{i}/t5"] = cond[0][0].contiguous()
        tensors[f"{case}/{i}/pooled"] = cond[0][1]["pooled_output"].contiguous()
        if case == "t5_fp16":
            tensors[f"ids/{i}"] = torch.tensor([[t for t, w in seg] for seg in clip.tokenize(p)["t5xxl"]])
    # a T5 LoRA through ComfyUI's own path (load_lora_for_models, LoraLoader's CLIP side), then without it again
    import comfy.sd
    g = torch.Generator().manual_seed(3)
    lora = {}
    for b in range(2):
        for name, (n, k) in T5_LORA_SHAPES.items():
            key = f"lora_te2_encoder_block_{b}_{name}"
            lora[key + ".lora_down.weight"] = torch.randn(4, k, generator=g) * T5_LORA_STD
            lora[key + ".lora_up.weight"] = torch.randn(n, 4, generator=g) * T5_LORA_STD
    _, clip_lora = comfy.sd.load_lora_for_models(None, clip, lora, 0.0, 1.0)
    (cond,) = nodes.CLIPTextEncode().encode(clip_lora, prompts[1])
    tensors[f"{case}/lora/t5"] = cond[0][0].contiguous()
    mods = list(clip_lora.cond_stage_model.modules())
    info["lora"][case] = {"patches": len(clip_lora.patcher.patches),
                          "quantized": sum(1 for m in mods if getattr(m, "parts", None) is not None),
                          "joined": sum(1 for m in mods if getattr(m, "lora_parts", None) is not None)}
    (cond,) = nodes.CLIPTextEncode().encode(clip, prompts[1])
    tensors[f"{case}/after_lora/t5"] = cond[0][0].contiguous()
    # stock conditioning nodes on our conditioning
    (c,) = nodes.CLIPTextEncode().encode(clip, prompts[0])
    (g,) = FluxGuidance().append(c, 2.5)
    (z,) = nodes.ConditioningZeroOut().zero_out(c)
    (r,) = nodes.ConditioningSetTimestepRange().set_range(g, 0.0, 0.5)
    (m,) = nodes.ConditioningCombine().combine(r, z)
    info[case] = {"guidance": g[0][1]["guidance"], "zero": float(z[0][0].abs().sum()), "combined": len(m),
                  "end": r[0][1]["end_percent"]}
for bad, t5, clip_l in (("dit", "svdq-int4-tiny-flux", "clip_l"), ("truncated", "t5_int4_truncated", "clip_l"),
                        ("config", "t5_int4_wrong_config", "clip_l"), ("clip_as_t5", "clip_l", "clip_l"),
                        ("t5_as_clip", "t5_int4", "t5_fp16")):
    try:
        te.load_text_encoder(f"{d}/{t5}.safetensors", f"{d}/{clip_l}.safetensors")
        info["errors"][bad] = None
    except Exception as e:
        info["errors"][bad] = {"type": type(e).__name__, "message": str(e)}
save_file(tensors, out + ".safetensors")
json.dump(info, open(out + ".json", "w"))
"""


@pytest.fixture(scope="module")
def encoded(te_files, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("probe") / "encoded")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run([sys.executable, "-c", PROBE, str(COMFYUI), str(REPO), str(te_files), out, json.dumps(PROMPTS),
                        json.dumps(T5_LORA_SHAPES), str(T5_LORA_STD)],
                       capture_output=True, text=True, cwd=COMFYUI, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return load_file(out + ".safetensors"), json.load(open(out + ".json"))


def test_t5_lora_joins_the_4bit_linears(encoded):
    """A T5 LoRA on every linear of the tiny T5 (OneTrainer's lora_te2_ keys), through ComfyUI's own
    load_lora_for_models: every key is patched, on the 4-bit side every quantized linear gets the LoRA joined,
    and its effect on the conditioning matches the 16-bit side's. Bound: with and without the LoRA, the 4-bit
    output differs from the 16-bit one by the quantization error, ‖e‖ ≤ r·‖y‖ with r = 0.42 (MIN_COSINE's
    budget), so the two LoRA effects differ by at most r·(‖y_lora‖ + ‖y‖). Removing the LoRA is bit-identical."""
    t, info = encoded
    n_keys = 2 * len(T5_LORA_SHAPES)
    assert info["lora"]["t5_fp16"]["patches"] == n_keys and info["lora"]["t5_int4"]["patches"] == n_keys
    assert info["lora"]["t5_int4"]["joined"] == info["lora"]["t5_int4"]["quantized"] > 0
    effect = {c: t[f"{c}/lora/t5"].double() - t[f"{c}/1/t5"].double() for c in ("t5_fp16", "t5_int4")}
    r = math.sqrt(1 / MIN_COSINE ** 2 - 1)
    bound = r * (t["t5_int4/lora/t5"].double().norm() + t["t5_int4/1/t5"].double().norm())
    diff = (effect["t5_int4"] - effect["t5_fp16"]).norm()
    print(f"T5 LoRA effect ‖Δ‖ 16-bit {effect['t5_fp16'].norm():.4g}, 4-bit {effect['t5_int4'].norm():.4g}; "
          f"difference {diff:.4g} (bound {bound:.4g})")
    assert effect["t5_fp16"].norm() > bound, "the test LoRA is too weak to tell anything"
    assert diff <= bound
    for c in ("t5_fp16", "t5_int4"):
        assert torch.equal(t[f"{c}/after_lora/t5"], t[f"{c}/1/t5"]), c


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_4bit_conditioning_matches_16bit(encoded):
    """Per prompt: the T5 part of CLIPTextEncode's conditioning, 4-bit vs 16-bit T5 (same weights), has
    cosine >= MIN_COSINE; the CLIP-L pooled output (same file, same ops) is identical."""
    t, info = encoded
    cos = []
    for i in range(len(PROMPTS)):
        a, b = t[f"t5_int4/{i}/t5"], t[f"t5_fp16/{i}/t5"]
        assert a.shape == b.shape and a.shape[-1] == T5_TINY["d_model"] and a.shape[1] >= 256
        cos.append(cosine(a, b))
        assert torch.equal(t[f"t5_int4/{i}/pooled"], t[f"t5_fp16/{i}/pooled"])
    print("cosine 4-bit vs 16-bit T5 per prompt:", [round(c, 4) for c in cos])
    assert min(cos) >= MIN_COSINE, cos


def test_comfyui_t5_is_the_reference_forward(encoded, te_files):
    """ComfyUI's T5, built from the file's metadata config, computes exactly our reference encoder on the
    same weights: for the 16-bit file, and for the 4-bit file with the dequantized weights (so the 4-bit
    layers inside ComfyUI equal the reference on the same quantized inputs; the only error is quantization)."""
    t, _ = encoded
    cfg = nt.normalize_config(T5_TINY)
    for case in ("t5_fp16", "t5_int4"):
        f = nt.open_t5(str(te_files / f"{case}.safetensors"))
        w = {k: f.tensor(k).float() for k in f.keys if k.rsplit(".", 1)[0] not in f.quantized}
        w.update({f"{n}.weight": dequantize_w4a16(f.layer(n)) for n in f.quantized})
        for i in UNWEIGHTED:
            ids = t[f"ids/{i}"]
            want = qt.encoder_forward(w, cfg, ids)
            got = t[f"{case}/{i}/t5"]
            assert float((got - want).norm() / want.norm()) < SAME_WEIGHTS_RTOL, (case, i)


def test_stock_conditioning_nodes(encoded):
    _, info = encoded
    for case in ("t5_fp16", "t5_int4"):
        assert info[case] == {"guidance": 2.5, "zero": 0.0, "combined": 2, "end": 0.5}


def test_memory_accounting(encoded):
    """ComfyUI's size of the 4-bit encoder counts the quantized layers (nodes/ops.quantized_nbytes): it is
    CLIP-L + the T5's embedding and norms + its 4-bit linears, smaller than with 16-bit T5 linears."""
    _, info = encoded
    s16, s4 = info["size"]["t5_fp16"], info["size"]["t5_int4"]
    linear_params = sum(N * K for N, K in nt.linear_shapes(nt.normalize_config(T5_TINY)).values())
    assert s4 < s16 and s16 - s4 > linear_params * 0.5        # 2 bytes -> at most 1.5 bytes per weight


@pytest.mark.parametrize("case,message", [
    ("dit", r"svdq-int4-tiny-flux.safetensors: this is a FLUX diffusion-model \(DiT\) checkpoint, not a T5 text "
            r"encoder. Load it with the 'SVDQuant Flux Loader'"),
    ("truncated", r"t5_int4_truncated.safetensors: not a readable .safetensors file .*truncated or corrupt"),
    ("config", r"t5_int4_wrong_config.safetensors: encoder.block.0.layer.1.DenseReluDense.wi_0.qweight has shape "
               r"\[64, 128\], expected int16 \[N/4, K\] for N=512, K=128: \[128, 128\] \(from the file's T5 config"),
    ("clip_as_t5", r"clip_l.safetensors: this is a CLIP text encoder; select it as clip_l"),
    ("t5_as_clip", r"t5_fp16.safetensors: not a CLIP-L text encoder"),
])
def test_bad_inputs(encoded, case, message):
    import re
    err = encoded[1]["errors"][case]
    assert err is not None and err["type"] == "ValueError" and re.search(message, err["message"]), err


# ------------------------------------------------------------------------------------------- live server

@pytest.fixture(scope="module")
def served(comfy, comfy_models, te_files):
    """The test models in the server's models folders (hard links); skips when the server does not list
    models/text_encoders of the test models dir."""
    te_dir = comfy_models / "text_encoders"
    te_dir.mkdir(exist_ok=True)
    for name in ("clip_l", "t5_int4", "svdq-int4-tiny-flux"):
        os.link(te_files / f"{name}.safetensors", te_dir / f"{name}.safetensors")
    os.link(te_files / "svdq-int4-tiny-flux.safetensors",
            comfy_models / "diffusion_models" / "svdq-te-test-flux.safetensors")
    listed = comfy._call("/object_info/SVDQuantTextEncoderLoader")["SVDQuantTextEncoderLoader"]["input"]["required"]
    if "t5_int4.safetensors" not in listed["t5_name"][0]:
        pytest.fail("the server does not list models/text_encoders: tests/comfy/conftest.py's "
                    "extra_model_paths.yaml needs a `text_encoders: text_encoders` entry")
    return comfy


def test_server_graph(served):
    """The node in a running ComfyUI: 4-bit T5 + CLIP-L -> CLIPTextEncode -> FluxGuidance -> KSampler with a
    tiny SVDQuant FLUX whose text inputs match (context 128 = T5 d_model, vec 768 = CLIP-L) -> image; and a
    DiT checkpoint given as the T5 fails with our message in the execution error."""
    comfy = served

    def graph(t5_name):
        return {
            "1": {"class_type": "SVDQuantFluxLoader", "inputs": {"model_name": "svdq-te-test-flux.safetensors",
                                                                 "weight_dtype": "default"}},
            "2": {"class_type": "SVDQuantTextEncoderLoader", "inputs": {"t5_name": t5_name,
                                                                        "clip_l_name": "clip_l.safetensors"}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": PROMPTS[1]}},
            "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": 3.5}},
            "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 1, "steps": 2, "cfg": 1.0,
                                                      "sampler_name": "euler", "scheduler": "simple",
                                                      "positive": ["4", 0], "negative": ["4", 0],
                                                      "latent_image": ["5", 0], "denoise": 1.0}},
            "7": {"class_type": "VAELoader", "inputs": {"vae_name": "taef1"}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "svdq_t5"}},
        }

    entry = comfy.run(graph("t5_int4.safetensors"))
    assert entry["status"]["status_str"] == "success", comfy.error(entry)
    (img,) = comfy.images(entry)
    assert img.shape == (64, 64, 3)

    entry = comfy.run(graph("svdq-int4-tiny-flux.safetensors"))
    err = comfy.error(entry)
    assert err["node_type"] == "SVDQuantTextEncoderLoader" and "not a T5 text encoder" in err["exception_message"]
    comfy.free()


def _api_graph(workflow: dict, object_info: dict, replace: dict) -> dict:
    """A saved UI workflow -> API prompt, as the frontend's "queue" does: widget values are matched to the
    node's widget inputs in ComfyUI's input order (plus the extra 'control after generate' value after a seed),
    links become [node id, output slot]. replace: {(node type, input name): value} for the test models."""
    links = {l[0]: l for l in workflow["links"]}
    graph = {}
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        if info is None:                           # frontend-only nodes (MarkdownNote)
            continue
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values, inputs = list(node.get("widgets_values", [])), {}
        for name in info["input_order"].get("required", []) + info["input_order"].get("optional", []):
            spec = info["input"].get("required", {}).get(name) or info["input"].get("optional", {}).get(name)
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
            elif values and (isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")):
                inputs[name] = values.pop(0)
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    values.pop(0)
            inputs[name] = replace.get((node["type"], name), inputs.get(name))
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return graph


def test_example_workflow_runs(served):
    """example_workflows/svdquant-flux1-dev-t5.json as saved (widget order included), with the test models
    in place of the real ones, 64x64 and 2 steps: runs to an image."""
    comfy = served
    workflow = json.loads((REPO / "example_workflows" / "svdquant-flux1-dev-t5.json").read_text())
    loader = [n for n in workflow["nodes"] if n["type"] == "SVDQuantTextEncoderLoader"][0]
    assert loader["widgets_values"] == ["awq-int4-flux.1-t5xxl.safetensors", "clip_l.safetensors"]
    assert [m["name"] for m in loader["properties"]["models"]] == loader["widgets_values"]
    info = comfy._call("/object_info")
    graph = _api_graph(workflow, info, {
        ("SVDQuantFluxLoader", "model_name"): "svdq-te-test-flux.safetensors",
        ("SVDQuantTextEncoderLoader", "t5_name"): "t5_int4.safetensors",
        ("VAELoader", "vae_name"): "taef1", ("EmptySD3LatentImage", "width"): 64,
        ("EmptySD3LatentImage", "height"): 64, ("KSampler", "steps"): 2})
    entry = comfy.run(graph)
    assert entry["status"]["status_str"] == "success", comfy.error(entry)
    (img,) = comfy.images(entry)
    assert img.shape == (64, 64, 3)
    comfy.free()
