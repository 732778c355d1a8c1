"""Diffusion models beyond FLUX.1 as tiny random models (tests/family_models.py), in the real host.

In this process, with the host's ComfyUI imported (no server): ComfyUI's own detection maps each family's
tiny state dict to the family's supported-model class; the model ComfyUI builds from it (on the meta device,
no memory) has exactly its keys and shapes; its Linear modules are exactly LINEAR_ROLES' rows; the test node's
conditioning passes the family's model_base.extra_conds; each decoder file loads with no missing keys and
decodes the family's latent.

Through the session's server: UNETLoader (stock) -> TinyFamilyConditioning (test node) -> the family's stock
empty-latent node -> KSampler 2 steps -> VAELoader + VAEDecode -> SaveImage succeeds, with the image size the
decoder gives, the model loaded as the family's model_base class and no missing/unexpected unet keys in the log.

Sizes the host forces (tests/family_models.py names the source lines): FLUX.2 hidden 6144 where detection
fixes 48 heads (0.3.75), 128 where heads = hidden // 128 (0.33); there the 1.7 G-parameter FLUX.2 is written in
fp8 and loaded with weight_dtype fp8_e4m3fn, so the server holds 1.7 GB instead of 6.8 GB of fp32.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest
import torch

import family_models as fm
from conftest import COMFYUI

# Decoder per family: (VAELoader name, file to write, image side for a 64x64 request). One 16-channel TAESD
# (taef1, written by conftest) serves the FLUX-latent families; SD3's and SDXL's TAESD layouts under their stock
# names; the 5-D (video-shaped) latents of Qwen-Image and Wan go through TAEHV, which 0.3.75's VAEDecode needs
# (its 2-D VAEs do not take [B, C, T, H, W]; 0.33 would squeeze T) and which is the stock lighttaew2_* name.
# FLUX.2's 128-channel latent: 0.33 has "taef2" (32 channels x 2x2); 0.3.75 has none, and builds a plain TAESD
# for any channel count from a file in models/vae (a 4x4 latent decodes to 32x32 there).
LATENT_NODE = {"qwen_image": "EmptySD3LatentImage", "zimage": "EmptySD3LatentImage", "flux2": "EmptyFlux2LatentImage",
               "sd3": "EmptySD3LatentImage", "chroma": "EmptySD3LatentImage", "pixart_sigma": "EmptyLatentImage",
               "wan21_t2v": "EmptyHunyuanLatentVideo", "wan22_t2v": "Wan22ImageToVideoLatent", "sdxl": "EmptyLatentImage"}
DECODER = {"qwen_image": "lighttaew2_1.safetensors", "zimage": "taef1", "sd3": "taesd3", "chroma": "taef1",
           "pixart_sigma": "taesdxl", "wan21_t2v": "lighttaew2_1.safetensors", "wan22_t2v": "lighttaew2_2.safetensors",
           "sdxl": "taesdxl"}
TAESD_128 = "tiny_taesd_128ch.safetensors"
SIZE = 64


def image_size(family: str) -> int:
    """The requested image side: 64, except PixArt, whose forward divides by round(latent side / 64) (its
    pe_interpolation and base_size, comfy/ldm/pixart/pixartms.py:178,185 in both hosts): a latent side
    of 40 (320 px) is the smallest multiple of 8 that rounds to 1."""
    return 320 if family == "pixart_sigma" else SIZE


def _comfy():
    """The host's ComfyUI packages importable in this process (CPU), as tests/comfy_inprocess.py does."""
    if str(COMFYUI) not in sys.path:
        sys.path.insert(0, str(COMFYUI))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_detection
    import comfy.sd
    return comfy


def _meta_state_dict(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _build_on_meta(shapes: dict):
    """(model_config, model_base instance) as ComfyUI detects and builds them, parameters on the meta device."""
    comfy = _comfy()
    sd = _meta_state_dict(shapes)
    mc = comfy.model_detection.model_config_from_unet(dict(sd), "")
    if mc is None:
        return None, None
    mc.set_inference_dtype(torch.bfloat16, None)
    return mc, mc.get_model(dict(sd), "", device=torch.device("meta"))


def _host_has_norm_final() -> bool:
    """0.3.75's NextDiT registers norm_final (unused in its forward); real Z-Image files and 0.33 have none."""
    _, model = _build_on_meta(fm.zimage_shapes(n_layers=0))
    return "norm_final.weight" in model.diffusion_model.state_dict()


def family_dims(family: str) -> dict:
    """The dims of this host's run: the defaults, except FLUX.2's width, the smallest this host's detection and
    Flux.__init__ accept (asked of ComfyUI itself, on the meta device), with one single block when it is small."""
    if family != "flux2":
        return {}
    try:
        _build_on_meta(fm.flux2_shapes(hidden=fm.FLUX2_HEAD_DIM, depth_single=1))
        return {"hidden": fm.FLUX2_HEAD_DIM, "depth_single": 1}
    except ValueError:   # "Hidden size 128 must be divisible by num_heads 48" (0.3.75)
        return {"hidden": fm.FLUX2_HIDDEN_0375, "depth_single": 0}


# ---- in this process: detection, keys, Linear roles, decoders ----------------------------------------------

@pytest.mark.parametrize("family", fm.FAMILIES)
def test_detection_builds_exactly_our_keys(family):
    shapes = fm.family_shapes(family, **family_dims(family))
    mc, model = _build_on_meta(shapes)
    assert mc is not None, f"{family}: ComfyUI's detection found no model in {COMFYUI}"
    assert type(mc).__name__ == fm.SUPPORTED_MODEL[family][0]
    assert type(model).__name__ == fm.SUPPORTED_MODEL[family][1]
    built = {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in mc.process_unet_state_dict(_meta_state_dict(shapes)).items()}
    missing = set(built) - set(ours)
    if family == "zimage" and _host_has_norm_final():
        missing -= {"norm_final.weight"}
    assert not missing and not set(ours) - set(built), (sorted(missing), sorted(set(ours) - set(built)))
    assert {k: built[k] for k in ours} == ours


@pytest.mark.parametrize("family", fm.FAMILIES)
def test_linear_roles_cover_comfyui_linears(family):
    """Every torch Linear ComfyUI builds is one row of linear_layers (same name, N, K), and nothing else is."""
    shapes = fm.family_shapes(family, **family_dims(family))
    _, model = _build_on_meta(shapes)
    comfy_linears = {name: (m.out_features, m.in_features) for name, m in model.diffusion_model.named_modules()
                     if isinstance(m, torch.nn.Linear)}
    ours = {name: (n, k) for name, _, _, n, k in fm.linear_layers(family, shapes)}
    assert ours == comfy_linears


def test_default_sizes_as_documented():
    assert {f: fm.param_count(fm.family_shapes(f)) for f in fm.FAMILIES} == fm.DEFAULT_PARAMS
    assert fm.param_count(fm.flux2_shapes(hidden=fm.FLUX2_HEAD_DIM, depth_single=1)) == 1_057_536


@pytest.mark.parametrize("family", fm.FAMILIES)
def test_every_linear_is_whole_int4_groups(family):
    """K % 64 == 0 for every Linear, so a quantizer may take any of them at group size 64 (the tiny free
    widths: text 64, pooled 64, FFN 256, are chosen so)."""
    for dims in ({}, {"hidden": fm.FLUX2_HEAD_DIM, "depth_single": 1}) if family == "flux2" else ({},):
        assert [(name, k) for name, _, _, _, k in fm.linear_layers(family, fm.family_shapes(family, **dims))
                if k % 64] == []


def test_flux2_width_is_the_hosts_smallest():
    """FLUX.2's hidden size: 128 (one head) where detection derives heads from the width (0.33), else 6144
    (0.3.75's 48 heads of 128)."""
    dims = family_dims("flux2")
    mc, _ = _build_on_meta(fm.flux2_shapes(**dims))
    assert mc.unet_config["hidden_size"] == dims["hidden"]
    assert mc.unet_config["hidden_size"] // mc.unet_config["num_heads"] == fm.FLUX2_HEAD_DIM


def _conditioning_node():
    import importlib.util
    path = Path(__file__).parent / "tiny_flux_test" / "family_conditioning.py"
    spec = importlib.util.spec_from_file_location("svdq_family_conditioning", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TinyFamilyConditioning()


@pytest.mark.parametrize("family", fm.FAMILIES)
def test_conditioning_fits_extra_conds(family):
    """TinyFamilyConditioning's output, given to the family's model_base.extra_conds as ComfyUI's sampler does
    (cond dict + noise + device), yields c_crossattn of the model's text width, y where the model has an ADM /
    pooled input, guidance for FLUX.2 / Chroma, and the attention mask where the family's encoder gives one."""
    from types import SimpleNamespace
    _, model = _build_on_meta(fm.family_shapes(family, **family_dims(family)))
    (ctx, extras), = _conditioning_node().make(SimpleNamespace(model=model), tokens=8, guidance=3.5, seed=0,
                                                masked_tokens=2)[0]
    assert ctx.shape[:2] == (1, 8)
    noise = torch.zeros(_latent_shape(family, model.latent_format.latent_channels))
    out = model.extra_conds(cross_attn=ctx, noise=noise, device=torch.device("cpu"), **extras)
    width = out["c_crossattn"].cond.shape[-1]
    assert width == ctx.shape[-1]
    assert ("y" in out) == (family in ("sd3", "sdxl"))
    assert ("guidance" in out) == (family in ("flux2", "chroma"))
    assert ("attention_mask" in extras) == (family in ("qwen_image", "zimage", "flux2"))


def _vae_files(root: Path) -> None:
    """Every decoder of DECODER / TAESD_128 under root/vae_approx and root/vae (taef1 only if absent: the
    session's models dir has conftest's, which other tests' images depend on)."""
    if not (root / "vae_approx" / "taef1_decoder.safetensors").exists():
        fm.write_taesd_pair(root / "vae_approx", "taef1", 16)
    fm.write_taesd_pair(root / "vae_approx", "taesd3", 16)
    fm.write_taesd_pair(root / "vae_approx", "taesdxl", 4)
    fm.write_taesd_pair(root / "vae_approx", "taef2", 128)
    fm.write_taehv(root / "vae_approx" / "lighttaew2_1.safetensors", 16)
    fm.write_taehv(root / "vae_approx" / "lighttaew2_2.safetensors", 48)
    fm.write_taesd(root / "vae" / TAESD_128, 128)


def _load_decoder_sd(root: Path, name: str) -> dict:
    """The state dict ComfyUI's VAELoader would build for `name` (nodes.VAELoader.load_taesd for image TAEs)."""
    from safetensors.torch import load_file
    if name.endswith(".safetensors"):
        folder = "vae_approx" if name.startswith("lighttaew") else "vae"
        return load_file(str(root / folder / name))
    sd = {}
    for part in ("encoder", "decoder"):
        sd.update({f"taesd_{part}.{k}": v for k, v in load_file(str(root / "vae_approx" / f"{name}_{part}.safetensors")).items()})
    scale_shift = {"taesd3": (1.5305, 0.0609), "taesdxl": (0.13025, 0.0), "taef1": (0.3611, 0.1159)}  # VAELoader's
    if name in scale_shift:
        sd.update(vae_scale=torch.tensor(scale_shift[name][0]), vae_shift=torch.tensor(scale_shift[name][1]))
    return sd


def _vae_warnings(log: str, decoder: str) -> list[str]:
    """ComfyUI's "Missing VAE keys" warnings, less the one stock 0.33 logs for its own "taef2" (VAELoader
    gives vae_scale / vae_shift only to taesd, taesdxl, taesd3 and taef1; TAESD then keeps 1.0 and 0.0)."""
    lines = [line[line.index("Missing VAE keys"):] for line in log.splitlines() if "Missing VAE keys" in line]
    if decoder == "taef2":
        lines = [line for line in lines if line != "Missing VAE keys ['vae_scale', 'vae_shift']"]
    return lines


def _flux2_decoder() -> str:
    """taef2 where the host's TAESD has its FLUX.2 variant (0.33, whose VAELoader lists "taef2"), else the plain
    128-channel TAESD file (0.3.75)."""
    _comfy()
    import comfy.taesd.taesd as taesd
    return "taef2" if hasattr(taesd, "DecoderFlux2") else TAESD_128


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("family_decoders")
    _vae_files(root)
    return root


@pytest.mark.parametrize("family", fm.FAMILIES)
def test_decoder_loads_and_decodes(family, decoder_dir, caplog):
    comfy = _comfy()
    name = _flux2_decoder() if family == "flux2" else DECODER[family]
    sd = _load_decoder_sd(decoder_dir, name)
    metadata = {"tae_latent_channels": 128} if name == "taef2" else None   # what VAELoader passes for taef2
    with caplog.at_level(logging.WARNING):
        vae = comfy.sd.VAE(sd=sd, metadata=metadata) if metadata else comfy.sd.VAE(sd=sd)
    assert _vae_warnings(caplog.text, name) == []
    latent = torch.randn(_latent_shape(family, vae.latent_channels))
    image = vae.decode(latent)   # [B, H, W, 3], or [B, T, H, W, 3] from a video VAE
    side = _image_side(family, name)
    assert image.shape[-3:] == (side, side, 3) and image.numel() == side * side * 3


def _latent_shape(family: str, channels: int) -> tuple:
    side = image_size(family) // (16 if family in ("flux2", "wan22_t2v") else 8)
    return (1, channels, 1, side, side) if family in ("qwen_image", "wan21_t2v", "wan22_t2v") else (1, channels, side, side)


def _image_side(family: str, decoder: str) -> int:
    return image_size(family) // 2 if decoder == TAESD_128 else image_size(family)


# ---- through the server --------------------------------------------------------------------------------

def family_graph(family: str, model_name: str, decoder: str, weight_dtype: str = "default", seed: int = 42,
                 steps: int = 2, length: int = 1) -> dict:
    """length: video frames for Wan (1 + 4k: 4k + 1 frames are k + 1 latent frames)."""
    latent_inputs = {"width": image_size(family), "height": image_size(family), "batch_size": 1}
    if family in ("wan21_t2v", "wan22_t2v"):
        latent_inputs["length"] = length
    if family == "wan22_t2v":
        latent_inputs["vae"] = ["5", 0]
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": model_name, "weight_dtype": weight_dtype}},
        "2": {"class_type": "TinyFamilyConditioning", "inputs": {"model": ["1", 0], "tokens": 8, "guidance": 3.5,
                                                                  "seed": 0, "masked_tokens": 0}},
        "3": {"class_type": LATENT_NODE[family], "inputs": latent_inputs},
        # cfg 1.0: the negative is not evaluated, but KSampler requires one
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": 1.0,
                                                  "sampler_name": "euler", "scheduler": "simple",
                                                  "positive": ["2", 0], "negative": ["2", 0],
                                                  "latent_image": ["3", 0], "denoise": 1.0}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": decoder}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["5", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"family_{family}"}},
    }


@pytest.fixture(scope="module")
def decoders(comfy_models):
    _vae_files(comfy_models)
    return comfy_models


@pytest.mark.parametrize("family", fm.FAMILIES)
def test_family_graph(family, comfy, decoders, record_property):
    dims = family_dims(family)
    big_flux2 = family == "flux2" and dims["hidden"] == fm.FLUX2_HIDDEN_0375
    dtype, weight_dtype = (torch.float8_e4m3fn, "fp8_e4m3fn") if big_flux2 else (torch.bfloat16, "default")
    path = decoders / "diffusion_models" / f"tiny_{family}.safetensors"
    t0 = time.time()
    fm.write_random_model(family, path, seed=0, dtype=dtype, **dims)
    t_write = time.time() - t0
    decoder = _flux2_decoder() if family == "flux2" else DECODER[family]
    log_start = len(comfy.log())
    try:
        t0 = time.time()
        entry = comfy.run(family_graph(family, path.name, decoder, weight_dtype))
        t_run = time.time() - t0
        log = comfy.log()[log_start:]
        assert entry["status"]["status_str"] == "success", (comfy.error(entry), log[-3000:])
        images = comfy.images(entry)
        side = _image_side(family, decoder)
        assert [im.shape for im in images] == [(side, side, 3)]
        assert f"Requested to load {fm.SUPPORTED_MODEL[family][1]}\n" in log
        assert _vae_warnings(log, decoder) == []
        unet_warnings = [line for line in log.splitlines() if "unet missing" in line or "unet unexpected" in line]
        if family == "zimage" and _host_has_norm_final():
            unet_warnings.remove("unet missing: ['norm_final.weight']")
        assert unet_warnings == []
    finally:
        size_mb = path.stat().st_size / 2**20
        path.unlink()
        comfy.free()
    shapes = fm.family_shapes(family, **dims)
    record_property("family_run", {"params_M": round(fm.param_count(shapes) / 1e6, 1), "file_MB": round(size_mb, 1),
                                   "dtype": str(dtype), "write_s": round(t_write, 1), "run_s": round(t_run, 1)})
    print(f"\n{family}: {fm.param_count(shapes) / 1e6:.1f}M params, {size_mb:.0f} MB {dtype}, "
          f"written in {t_write:.1f} s, graph {t_run:.1f} s ({COMFYUI})")


@pytest.mark.parametrize("family", ("sd3", "wan21_t2v"))
def test_same_seed_same_image(family, comfy, decoders):
    """The graph is a deterministic function of the seed (what a quantized-vs-unquantized comparison needs):
    rerun from scratch (/free resets ComfyUI's node cache and unloads the model), the same seed gives the same
    bytes, another seed another image. One 4-D (SD3) and one 5-D latent (Wan, TAEHV decode)."""
    path = decoders / "diffusion_models" / f"tiny_{family}_seeds.safetensors"
    fm.write_random_model(family, path, seed=0)
    try:
        def image(seed):
            entry = comfy.run(family_graph(family, path.name, DECODER[family], seed=seed))
            assert entry["status"]["status_str"] == "success", comfy.error(entry)
            comfy.free()
            return comfy.images(entry)[0]
        first, again, other = image(42), image(42), image(43)
        assert (first == again).all()
        assert not (first == other).all()
    finally:
        path.unlink()
