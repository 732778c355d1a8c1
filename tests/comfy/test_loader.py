"""End to end in a real ComfyUI: 'SVDQuant FLUX Loader' -> KSampler -> VAE decode -> SaveImage over HTTP.

Tiny (hidden 256) random checkpoints check the graph runs for INT4, NVFP4 and the ComfyUI-native layout,
with stock model patches in the graph, and that bad files give a clear error while the server keeps
running. The quality check uses a FLUX-width model (hidden 3072 is what ComfyUI's stock loader accepts,
1 double + 1 single block): our quantized model's image against ComfyUI's own UNETLoader on the
unquantized file, same seeds (see test_quantized_image_close_to_unquantized for the threshold).
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import flux_models as fm
from comfy_inprocess import checkpoint_module
import graphs
from model_cache import cache_for, source_key

REPO = Path(__file__).resolve().parents[2]
LOADER = "SVDQuantFluxLoader"


@pytest.fixture(scope="module")
def tiny(comfy_models):
    """Tiny random checkpoints (no quantizer needed) plus bad files, in models/diffusion_models."""
    d = comfy_models / "diffusion_models"
    names = {
        "int4": fm.write_random_nunchaku_flux(d / "svdq_tiny_int4.safetensors").name,
        "nvfp4": fm.write_random_nunchaku_flux(d / "svdq_tiny_nvfp4.safetensors", precision="nvfp4").name,
        "native": fm.write_random_comfy_native_flux(d / "svdq_tiny_comfy_native.safetensors").name,
        "plain": fm.write_flux_bfl(d / "plain_flux_tiny.safetensors", hidden=256).name,
        "sana": fm.write_random_nunchaku_flux(d / "svdq_sana.safetensors",   # a family we do not read
                                              model_class="NunchakuSanaTransformer2DModel",
                                              comfy_config=False).name,
    }
    data = (d / names["int4"]).read_bytes()
    (d / "svdq_truncated.safetensors").write_bytes(data[: len(data) // 2])
    names["truncated"] = "svdq_truncated.safetensors"
    return names


def _ok(comfy, graph) -> dict:
    entry = comfy.run(graph)
    assert entry["status"]["status_str"] == "success", json.dumps(comfy.error(entry), indent=1)[:3000]
    return entry


def _image(comfy, graph) -> torch.Tensor:
    images = comfy.images(_ok(comfy, graph))
    assert len(images) == 1
    return torch.from_numpy(images[0].copy())


# ---------------------------------------------------------------------------------------------------------
# the pack in ComfyUI
# ---------------------------------------------------------------------------------------------------------

def test_pack_imports_without_failure(comfy):
    log = comfy.log()
    import_lines = [line for line in log.splitlines() if "ComfyUI-SVDQuant" in line or "SVDQuant" in line]
    assert not [line for line in import_lines if "IMPORT FAILED" in line], "\n".join(import_lines)
    assert "SVDQuant: failed to import" not in log, log[-4000:]
    info = comfy._call(f"/object_info/{LOADER}")[LOADER]
    assert info["display_name"] == "SVDQuant FLUX Loader"
    # widget order is part of saved workflows: append-only
    assert list(info["input"]["required"])[:2] == ["model_name", "weight_dtype"]


def test_tiny_int4_makes_an_image(comfy, tiny):
    img = _image(comfy, graphs.txt2img(graphs.svdquant_loader(tiny["int4"]), seed=1))
    assert img.shape == (64, 64, 3) and img.float().std() > 1.0


def test_stock_patches_act_on_our_model(comfy, tiny):
    """ModelSamplingFlux (model patch: clones our ModelPatcher) and FluxGuidance (conditioning) in the graph:
    both run, and both change the image, so they reached our model."""
    base = graphs.txt2img(graphs.svdquant_loader(tiny["int4"]), seed=2)
    plain = _image(comfy, base)
    guided = _image(comfy, graphs.with_flux_guidance(base, 9.0))
    shifted = _image(comfy, graphs.with_model_sampling_flux(base))
    assert not torch.equal(plain, guided)
    assert not torch.equal(plain, shifted)


def test_comfy_native_layout_makes_an_image(comfy, tiny):
    img = _image(comfy, graphs.txt2img(graphs.svdquant_loader(tiny["native"]), seed=3))
    assert img.shape == (64, 64, 3)


def test_nvfp4_runs_and_says_where_once(comfy, tiny):
    """NVFP4 makes an image; the log says once per load which backend runs the quantized layers and why
    (nunchaku_core.backend.choose_backend; every backend runs NVFP4): the CPU kernels when the extension is built."""
    _image(comfy, graphs.txt2img(graphs.svdquant_loader(tiny["nvfp4"]), seed=4))
    _image(comfy, graphs.txt2img(graphs.svdquant_loader(tiny["nvfp4"]), seed=5))   # same model, new sampling
    lines = [line for line in comfy.log().splitlines() if tiny["nvfp4"] in line and "quantized layers on" in line]
    assert len(lines) == 1 and "run on the cpu backend: the compiled CPU kernels" in lines[0], lines


@pytest.mark.parametrize("bad,message", [
    ("plain", r"not an SVDQuant checkpoint.*Load Diffusion Model"),
    ("truncated", r"svdq_truncated\.safetensors.*truncated"),
    ("sana", r"NunchakuSanaTransformer2DModel.*not supported yet"),
])
def test_bad_file_clear_error_server_survives(comfy, tiny, bad, message):
    entry = comfy.run(graphs.txt2img(graphs.svdquant_loader(tiny[bad]), seed=6))
    assert entry["status"]["status_str"] == "error"
    err = comfy.error(entry)
    assert err["node_type"] == LOADER
    assert re.search(message, err["exception_message"], re.S), err["exception_message"]
    assert comfy.alive()
    _image(comfy, graphs.txt2img(graphs.svdquant_loader(tiny["int4"]), seed=7))


# ---------------------------------------------------------------------------------------------------------
# quality: quantized vs unquantized, same seeds
# ---------------------------------------------------------------------------------------------------------

# What the cached quality-test files depend on, besides the functions that write them (see flux3072).
QUALITY_SOURCES = ("nunchaku_core/quantize/svdquant.py", "nunchaku_core/quantize/flux.py", "nunchaku_core/models/flux_source.py",
                   "nunchaku_core/formats/nunchaku.py", "nunchaku_core/packing.py", "nunchaku_core/layer.py",
                   "nunchaku_core/reference.py", "nunchaku_core/models/flux.py")
QUANT_OPTIONS = dict(precision="int4", rank=32, report=False, alphas=(1.0,))
NOISE_DRAWS = 4


def _layer_out(q, x: torch.Tensor) -> torch.Tensor:
    """Output of a QuantizedLinear (checkpoint) through the reference, fp32 [M, N]. Its stored biases
    include the σ-shift compensation, so this approximates x·Wᵀ + b of the original layer."""
    from nunchaku_core.layer import SVDQuantLayer
    from nunchaku_core.reference import svdquant_linear, w4a16_linear

    def run(layer, xi):
        return (svdquant_linear if isinstance(layer, SVDQuantLayer) else w4a16_linear)(xi, layer).float()
    if q.split == "out":
        return torch.cat([run(p, x) for p in q.parts], dim=-1)
    return sum(run(p, xi) for p, xi in zip(q.parts, torch.split(x, [p.K for p in q.parts], dim=-1)))


def matched_noise(bfl_path: Path, int4_path: Path) -> list[tuple]:
    """Per quantized layer, and per part of the single block's fused layers: the 4-bit relative output error
    e = ‖Q(x) − (x·Wᵀ + b)‖ / ‖x·Wᵀ + b‖ on 64 Gaussian rows (GELU'd where the model feeds GELU outputs), and
    the std σ = e·‖x·Wᵀ + b‖ / (√N·‖x‖) of i.i.d. weight noise E with the same expected relative error,
    because E‖x·Eᵀ‖² = σ²·N·‖x‖². Returns [(BFL weight key, rows, cols, e, σ)]."""
    fsd = checkpoint_module()
    ck = fsd.load_checkpoint(str(int4_path))
    out = []
    g = torch.Generator().manual_seed(123)
    with safe_open(str(bfl_path), framework="pt") as f:
        for key, q in ck.state_dict.items():
            if not key.endswith("." + fsd.QUANT_KEY):
                continue
            name = key[: -len(fsd.QUANT_KEY) - 1]
            W, b = f.get_tensor(f"{name}.weight").float(), f.get_tensor(f"{name}.bias").float()
            x = torch.randn(64, W.shape[1], generator=g)
            if name.endswith("mlp.2"):
                x = torch.nn.functional.gelu(x, approximate="tanh")
            if q.split == "in":  # linear2 sees [attention | GELU'd MLP] columns
                D = q.parts[0].K
                x[:, D:] = torch.nn.functional.gelu(x[:, D:], approximate="tanh")
            offset = 0
            for j, p in enumerate(q.parts):
                if q.split == "out":   # a block of output rows
                    rows, cols, xp = (offset, offset + p.N), None, x
                    target = x @ W[rows[0]:rows[1]].T + b[rows[0]:rows[1]]
                    offset += p.N
                else:                  # a block of input columns; the last part (mlp_fc2) carries the bias
                    rows, cols = None, (offset, offset + p.K)
                    xp = x[:, cols[0]:cols[1]]
                    target = xp @ W[:, cols[0]:cols[1]].T + (b if j == len(q.parts) - 1 else 0)
                    offset += p.K
                e = ((_layer_out(type(q)((p,), "out"), xp) - target).norm() / target.norm()).item()
                sigma = e * target.norm().item() / (math.sqrt(target.shape[1]) * xp.norm().item())
                out.append((f"{name}.weight", rows, cols, e, sigma))
    return out


def write_noisy(bfl_path: Path, noise: list[tuple], seed: int, out_path: Path) -> None:
    """The unquantized model with Gaussian noise of std σ on each quantized layer's (part's) weights."""
    with safe_open(str(bfl_path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    g = torch.Generator().manual_seed(seed)
    for key, rows, cols, _, sigma in noise:
        W = sd[key].float()
        r = slice(*rows) if rows else slice(None)
        c = slice(*cols) if cols else slice(None)
        W[r, c] += torch.randn(W[r, c].shape, generator=g) * sigma
        sd[key] = W.to(torch.bfloat16)
    save_file(sd, str(out_path), metadata={"test_model": f"unquantized FLUX + 4-bit-matched Gaussian noise, seed {seed}"})


def write_stream_swap_bug(int4_path: Path, out_path: Path) -> None:
    """The INT4 file with the double block's image and text attention projections exchanged (same shapes):
    what a loader that mixes up the two streams would run. A negative control for the threshold."""
    with safe_open(str(int4_path), framework="pt") as f:
        meta = f.metadata()
        swap = {".qkv_proj.": ".qkv_proj_context.", ".qkv_proj_context.": ".qkv_proj."}
        sd = {}
        for k in f.keys():
            new = k
            if k.startswith("transformer_blocks."):
                for a, b in swap.items():
                    if a in k:
                        new = k.replace(a, b)
                        break
            sd[new] = f.get_tensor(k)
    save_file(sd, str(out_path), metadata=meta)


@pytest.fixture(scope="module")
def flux3072(comfy_models):
    """BFL file (hidden 3072, 1+1 blocks) and its INT4 quantization (nunchaku_core.quantize.flux), linked into
    models/diffusion_models. Quantizing takes minutes on 2 cores, so the two files (1.4 GB) are cached across
    sessions in $SVDQ_TEST_CACHE (default ~/.cache/svdquant-tests), keyed by the sources that shape them.
    The quality test's other FLUX-width files are made one at a time and deleted after use (scratch_model)."""
    from nunchaku_core.quantize.flux import QuantizeOptions, quantize_flux
    key = source_key(json.dumps(QUANT_OPTIONS, sort_keys=True), [REPO / rel for rel in QUALITY_SOURCES],
                     (fm.flux_shapes, fm.random_state_dict, fm.write_flux_bfl))
    cache = cache_for("flux3072", key)

    def cached(kind: str, make) -> Path:
        path = cache / f"flux3072-{key}-{kind}.safetensors"
        if not path.exists():
            tmp = path.with_suffix(".partial")
            make(tmp)
            tmp.rename(path)
        return path

    bfl = cached("bfl", lambda p: fm.write_flux_bfl(p, hidden=3072, depth=1, depth_single=1, seed=0))
    int4 = cached("int4", lambda p: quantize_flux(bfl, p, options=QuantizeOptions(**QUANT_OPTIONS)))
    names = {}
    for kind, path in {"bfl": bfl, "int4": int4}.items():
        link = comfy_models / "diffusion_models" / f"flux3072_{kind}.safetensors"
        if not link.is_symlink():      # another test module's use of this fixture made it already
            link.symlink_to(path)
        names[kind] = link.name
    return {**names, "paths": {"bfl": bfl, "int4": int4}}


@contextlib.contextmanager
def scratch_model(comfy, comfy_models: Path, kind: str, make):
    """models/diffusion_models/flux3072_<kind>.safetensors written by make(path) for one use, then unloaded and
    deleted: the noise-matched copies are 1 GB each, so at most one is on disk at a time."""
    path = comfy_models / "diffusion_models" / f"flux3072_{kind}.safetensors"
    make(path)
    try:
        yield path.name
    finally:
        comfy.free()
        path.unlink(missing_ok=True)


def test_quantized_image_close_to_unquantized(comfy, comfy_models, flux3072):
    """PSNR of our INT4 model's image against ComfyUI's stock loader on the unquantized weights, same seeds.

    Threshold, derived rather than picked. Quantization changes each layer's output by a relative error e
    (about 0.14 here: weights and activations both at 4 bits, Gaussian weights, data-free; see matched_noise).
    Null model: the unquantized model with i.i.d. Gaussian weight noise giving every layer the same e. Over
    NOISE_DRAWS noise draws its image PSNR has mean μ and spread s (sample std); a model whose errors are
    as harmful as that passes with PSNR ≥ μ − 3s. That margin is the natural variation of the metric at
    this error level; a quantizer or loader whose image is systematically worse than same-size random noise
    fails. Negative control: the INT4 file with the image/text attention projections exchanged (what a
    loader confusing the streams runs) must fall below the threshold, so the test can tell.
    Measured on this machine: int4 19.70 dB; noise draws 18.93, 19.23, 18.79, 18.38 dB (μ 18.83, s 0.35),
    threshold 17.78 dB; stream swap 16.29 dB.
    """
    size = 128

    def image(loader) -> torch.Tensor:
        return _image(comfy, graphs.txt2img(loader, size=size, prefix="quality"))

    bfl, int4 = flux3072["paths"]["bfl"], flux3072["paths"]["int4"]
    ref = image(graphs.unet_loader(flux3072["bfl"]))
    noise = matched_noise(bfl, int4)
    noisy = []
    for i in range(NOISE_DRAWS):   # scratch_model also unloads: one FLUX-width model at a time besides the reference
        with scratch_model(comfy, comfy_models, f"noisy{i}", lambda p: write_noisy(bfl, noise, 1000 + i, p)) as name:
            noisy.append(fm.psnr(image(graphs.unet_loader(name)), ref))
    p_quant = fm.psnr(image(graphs.svdquant_loader(flux3072["int4"])), ref)
    with scratch_model(comfy, comfy_models, "bug", lambda p: write_stream_swap_bug(int4, p)) as name:
        p_bug = fm.psnr(image(graphs.svdquant_loader(name)), ref)
    mu = sum(noisy) / len(noisy)
    spread = math.sqrt(sum((p - mu) ** 2 for p in noisy) / (len(noisy) - 1))
    threshold = mu - 3 * spread
    print(f"\nPSNR vs unquantized: int4 {p_quant:.2f} dB; noise-matched draws {', '.join(f'{p:.2f}' for p in noisy)} "
          f"(mean {mu:.2f}, std {spread:.2f}); threshold {threshold:.2f} dB; stream-swap control {p_bug:.2f} dB")
    assert p_bug < threshold, "the threshold does not catch a loader that swaps the image and text streams"
    assert p_quant >= threshold
