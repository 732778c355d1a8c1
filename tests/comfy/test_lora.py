"""LoRA on SVDQuant models in a real ComfyUI, through its stock LoraLoaderModelOnly and our 'SVDQuant LoRA Stack'.

The FLUX-width model (hidden 3072, 1 double + 1 single block; test_loader.flux3072) quantized to INT4, against
ComfyUI's stock UNETLoader + LoraLoaderModelOnly on the unquantized file, with a rank-16 kohya LoRA on every
block Linear (‖ΔW‖ ≈ 20 % of ‖W‖). See test_quantized_lora_close_to_unquantized_lora for the tolerance.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import graphs
import lora_files
from test_loader import flux3072  # noqa: F401  (fixture: the FLUX-width files)

SIZE = 128
SEEDS = (42, 7, 1234, 99)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.sqrt(torch.mean((a.double() - b.double()) ** 2).item())


@pytest.fixture(scope="module")
def loras(comfy_models) -> dict:
    d = comfy_models / "loras"
    out = {}

    def write(name, sd):
        save_file(sd, str(d / name))
        out[name.split(".")[0]] = name

    blocks = lambda n: n.startswith(("double_blocks", "single_blocks"))   # noqa: E731
    write("flux3072_r16.safetensors", lora_files.kohya(3072, 1, 1, rank=16, std=0.004, seed=20, only=blocks)[0])
    write("flux3072_r16_b.safetensors", lora_files.diffusers(3072, 1, 1, rank=16, std=0.003, seed=21)[0])
    write("flux512.safetensors", lora_files.kohya(512, 1, 1, rank=4, seed=22)[0])        # another FLUX width
    write("sd15.safetensors", lora_files.sd15_lora())
    write("qwen_image.safetensors", lora_files.qwen_image_lora(std=0.05))   # another family; attention part maps
    return out


def graph(loader: dict, seed: int, loras=(), stack=None, prefix="lora") -> dict:
    """txt2img with ComfyUI's LoraLoaderModelOnly chain (loras: (name, strength)) or one SVDQuant LoRA Stack."""
    g = graphs.txt2img(loader, size=SIZE, seed=seed, prefix=prefix)
    src = ["1", 0]
    for i, (name, strength) in enumerate(loras):
        g[f"2{i}0"] = {"class_type": "LoraLoaderModelOnly",
                       "inputs": {"model": src, "lora_name": name, "strength_model": strength}}
        src = [f"2{i}0", 0]
    if stack is not None:
        inputs = {"model": src}
        for i in range(4):
            name, strength = stack[i] if i < len(stack) else ("None", 1.0)
            inputs[f"lora_{i + 1}"], inputs[f"strength_{i + 1}"] = name, strength
        g["300"] = {"class_type": "SVDQuantLoRAStack", "inputs": inputs}
        src = ["300", 0]
    g["4"]["inputs"]["model"] = src
    return g


def image(comfy, g) -> torch.Tensor:
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", json.dumps(comfy.error(entry), indent=1)[:3000]
    images = comfy.images(entry)
    assert len(images) == 1
    return torch.from_numpy(images[0].copy())


def test_quantized_lora_close_to_unquantized_lora(comfy, flux3072, loras):
    """rms(q+L − u+L) against rms(q − u), per seed, 128², 4 steps.

    Tolerance. The LoRA itself is applied exactly on both sides (fp32 low-rank branch here, fp32 dense weight
    there), and it leaves the 4-bit residual, smoothing and scales untouched, so what differs between the pairs
    is only where the network operates: the LoRA moves the activations, and the quantization error at the new
    activations is another draw of the same error process. Changing the seed moves the activations too (other
    noise, other latents), so the spread of rms(q − u) over seeds is the natural variation of this metric under
    a change of operating point. We measure it on SEEDS (mean μ0, sample std s0) and require the LoRA's mean
    over the same seeds to stay within μ0 + 3·s0.
    Meaningfulness: the LoRA must change the unquantized image by more than the quantization error does (else
    dropping it would pass), and a negative control (the LoRA on the quantized model at −strength, a sign
    error) must fail the bound.
    Measured (2026-11-22): no LoRA 26.38, 30.54, 27.41, 27.54 (μ0 27.97, s0 1.79, bound 33.34); with LoRA
    27.73, 27.89, 27.88, 27.74 (mean 27.81); LoRA effect 42.3-43.7 unquantized, 44.0-46.3 quantized; sign-error
    control 64.21.
    """
    u_loader, q_loader = graphs.unet_loader(flux3072["bfl"]), graphs.svdquant_loader(flux3072["int4"])
    lora = [(loras["flux3072_r16"], 1.0)]
    d0, dl, effect, effect_q = [], [], [], []
    u_imgs, ul_imgs = {}, {}
    for seed in SEEDS:
        u_imgs[seed] = image(comfy, graph(u_loader, seed))
        ul_imgs[seed] = image(comfy, graph(u_loader, seed, lora))
    comfy.free()
    for seed in SEEDS:
        q = image(comfy, graph(q_loader, seed))
        ql = image(comfy, graph(q_loader, seed, lora))
        d0.append(rms(q, u_imgs[seed]))
        dl.append(rms(ql, ul_imgs[seed]))
        effect.append(rms(ul_imgs[seed], u_imgs[seed]))
        effect_q.append(rms(ql, q))
    wrong = image(comfy, graph(q_loader, SEEDS[0], [(loras["flux3072_r16"], -1.0)]))
    comfy.free()
    mu0 = sum(d0) / len(d0)
    s0 = math.sqrt(sum((d - mu0) ** 2 for d in d0) / (len(d0) - 1))
    bound = mu0 + 3 * s0
    mean_l = sum(dl) / len(dl)
    d_wrong = rms(wrong, ul_imgs[SEEDS[0]])
    print(f"\nrms vs unquantized (0-255), seeds {SEEDS}: no LoRA {[f'{d:.2f}' for d in d0]} (mean {mu0:.2f}, std "
          f"{s0:.2f}, bound {bound:.2f}); with LoRA {[f'{d:.2f}' for d in dl]} (mean {mean_l:.2f}); LoRA effect "
          f"unquantized {[f'{e:.2f}' for e in effect]}, quantized {[f'{e:.2f}' for e in effect_q]}; sign-error "
          f"control {d_wrong:.2f}")
    assert min(effect) > bound, "the test LoRA changes the image less than quantization does: it tells nothing"
    assert d_wrong > bound, "the bound does not catch a LoRA applied with the wrong sign"
    assert mean_l <= bound


def test_strength_zero_removal_and_stack(comfy, flux3072, loras):
    """Bit-identical images: strength 0 (LoraLoaderModelOnly skips it; the stack too) and the model after a
    LoRA run equal the model never patched; the stack of two LoRAs equals the same two chained
    LoraLoaderModelOnly nodes; changing one strength in the stack changes the image."""
    q = graphs.svdquant_loader(flux3072["int4"])
    a, b = loras["flux3072_r16"], loras["flux3072_r16_b"]
    base = image(comfy, graph(q, 5))
    assert torch.equal(image(comfy, graph(q, 5, [(a, 0.0)])), base)
    chained = image(comfy, graph(q, 5, [(a, 0.8), (b, -0.6)]))
    assert not torch.equal(chained, base)
    assert torch.equal(image(comfy, graph(q, 5, stack=[(a, 0.8), (b, -0.6)])), chained)
    assert torch.equal(image(comfy, graph(q, 5)), base)                      # LoRA removed
    assert torch.equal(image(comfy, graph(q, 5, stack=[(a, 0.0), ("None", 1.0)])), base)
    other = image(comfy, graph(q, 5, stack=[(a, 0.8), (b, 0.3)]))
    assert not torch.equal(other, chained)
    comfy.free()


def test_bad_loras(comfy, flux3072, loras):
    """A LoRA for a wider FLUX: a clear error naming the tensor. A LoRA for SD1.5, none of whose tensors ComfyUI maps
    (stock ComfyUI would log 'lora key not loaded' per tensor and render the unchanged model): a clear error naming
    the LoRA file and the model's. The server keeps working and the model is unchanged. A Qwen-Image LoRA, whose
    attention keys are FLUX.1's diffusers names (3072 wide in both): where this ComfyUI's key map knows unprefixed
    diffusers names (0.33) it applies that part, as stock ComfyUI does, and one warning line names the LoRA and how
    many of its tensors map onto nothing; where it does not (0.3.75), none maps and it is the clear error."""
    q = graphs.svdquant_loader(flux3072["int4"])
    base = image(comfy, graph(q, 11))
    entry = comfy.run(graph(q, 11, [(loras["flux512"], 1.0)]))
    assert entry["status"]["status_str"] == "error"
    err = comfy.error(entry)
    assert err["exception_type"].endswith("LoRAError"), err
    assert "lora_unet_" in err["exception_message"] and "another model" in err["exception_message"], err
    assert torch.equal(image(comfy, graph(q, 11)), base)
    before = comfy.log().count("lora key not loaded: ")
    entry = comfy.run(graph(q, 11, [(loras["sd15"], 1.0)]))
    assert entry["status"]["status_str"] == "error"
    err = comfy.error(entry)
    assert err["exception_type"].endswith("LoRAError"), err
    assert f"{loras['sd15']}: none of its 6 tensors (first: lora_te_" in err["exception_message"], err
    assert flux3072["int4"] in err["exception_message"] and "another model family" in err["exception_message"], err
    assert comfy.log().count("lora key not loaded: ") - before == 6
    assert torch.equal(image(comfy, graph(q, 11)), base)
    # Whether the Qwen-Image LoRA's attention part maps is this ComfyUI's key map's answer: 0.33 maps FLUX.1's
    # unprefixed diffusers names (DiffSynth's format), 0.3.75 does not. Asked of that key map, on the meta device.
    mapped = _flux_lora_modules_mapped(flux3072["paths"]["bfl"], lora_files.qwen_image_lora())
    log_start = len(comfy.log())
    if mapped == 0:
        entry = comfy.run(graph(q, 11, [(loras["qwen_image"], 1.0)]))
        err = comfy.error(entry)
        assert err["exception_type"].endswith("LoRAError"), err
        assert f"{loras['qwen_image']}: none of its 20 tensors" in err["exception_message"], err
        assert torch.equal(image(comfy, graph(q, 11)), base)
    else:
        qwen = image(comfy, graph(q, 11, [(loras["qwen_image"], 1.0)]))
        warned = [line for line in comfy.log()[log_start:].splitlines() if "SVDQuant: LoRA" in line]
        assert len(warned) == 1 and loras["qwen_image"] in warned[0] and \
            f"{20 - 2 * mapped} of its 20 tensors map onto no layer" in warned[0], warned
        assert not torch.equal(qwen, base)
    comfy.free()


def _flux_lora_modules_mapped(bfl_path, lora: dict) -> int:
    """How many of the LoRA's modules (PEFT lora_A/lora_B pairs) this host's ComfyUI maps onto the FLUX.1 in
    bfl_path: comfy.lora.model_lora_keys_unet on ComfyUI's own Flux built from the file's shapes (meta device)."""
    from safetensors import safe_open
    from test_family_models import _build_on_meta, _comfy
    _comfy()
    import comfy.lora
    with safe_open(str(bfl_path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    _, model = _build_on_meta(shapes)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    return sum(k[:-len(".lora_A.weight")] in key_map for k in lora if k.endswith(".lora_A.weight"))
