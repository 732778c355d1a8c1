"""Random-weight models for tests: BFL (ComfyUI) FLUX.1 state dicts of any width, TAEF1 VAE weights,
ComfyUI-native svdquant_w4a4 FLUX files and a real-shaped CLIP-L text model. Weights are N(0, std) (biases 0, norm scales 1): images are noise,
which is all a loader test needs. Only torch + safetensors + nunchaku_core."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from nunchaku_core.models import flux
from nunchaku_core.formats.comfy_native import svdquant_to_comfy, w4a16_to_comfy
from nunchaku_core.formats.nunchaku import write_nunchaku
from nunchaku_core.layer import SVDQuantLayer, W4A16Layer

HEAD_DIM = 128   # FLUX's; the q/k norm scale has this length and sets num_heads = hidden / 128


def flux_shapes(hidden: int, depth: int, depth_single: int, context_dim: int, vec_dim: int, guidance: bool,
                in_channels: int = 16) -> dict[str, tuple]:
    """Every tensor of a BFL Flux (mlp_ratio 4, qkv_bias, patch 2) by key -> shape."""
    mlp = 4 * hidden
    shapes: dict[str, tuple] = {}

    def linear(name, k, n):
        shapes[f"{name}.weight"] = (n, k)
        shapes[f"{name}.bias"] = (n,)

    linear("img_in", in_channels * 4, hidden)
    linear("txt_in", context_dim, hidden)
    for emb, k in (("time_in", 256), ("vector_in", vec_dim)) + ((("guidance_in", 256),) if guidance else ()):
        linear(f"{emb}.in_layer", k, hidden)
        linear(f"{emb}.out_layer", hidden, hidden)
    for i in range(depth):
        p = f"double_blocks.{i}"
        for side in ("img", "txt"):
            linear(f"{p}.{side}_mod.lin", hidden, 6 * hidden)
            linear(f"{p}.{side}_attn.qkv", hidden, 3 * hidden)
            linear(f"{p}.{side}_attn.proj", hidden, hidden)
            linear(f"{p}.{side}_mlp.0", hidden, mlp)
            linear(f"{p}.{side}_mlp.2", mlp, hidden)
            for norm in ("query_norm", "key_norm"):
                shapes[f"{p}.{side}_attn.norm.{norm}.scale"] = (HEAD_DIM,)
    for i in range(depth_single):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", hidden, 3 * hidden + mlp)
        linear(f"{p}.linear2", hidden + mlp, hidden)
        linear(f"{p}.modulation.lin", hidden, 3 * hidden)
        for norm in ("query_norm", "key_norm"):
            shapes[f"{p}.norm.{norm}.scale"] = (HEAD_DIM,)
    linear("final_layer.linear", hidden, 4 * 16)
    linear("final_layer.adaLN_modulation.1", hidden, 2 * hidden)
    return shapes


def random_state_dict(shapes: dict, std: float, seed: int, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith(".scale"):
            t = torch.ones(shape)
        elif key.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) * std
        out[key] = t.to(dtype)
    return out


def write_flux_bfl(path: Path, *, hidden=3072, depth=1, depth_single=1, context_dim=64, vec_dim=32, guidance=True,
                   in_channels=16, std=0.02, seed=0) -> Path:
    shapes = flux_shapes(hidden, depth, depth_single, context_dim, vec_dim, guidance, in_channels)
    save_file(random_state_dict(shapes, std, seed), str(path), metadata={"test_model": "random FLUX.1, BFL names"})
    return path


def taef1_shapes() -> tuple[dict, dict]:
    """TAESD layout for 16 latent channels, as comfy/taesd/taesd.py builds it (64 channels, 3 stages):
    encoder conv, Block, 3 × (strided conv, 3 Blocks), conv; decoder Clamp, conv, ReLU, 3 × (3 Blocks,
    Upsample, conv), Block, conv. Indices are the nn.Sequential positions; a Block is conv-ReLU-conv-ReLU-conv."""
    enc, dec = {}, {}

    def conv(d, idx, cin, cout, bias=True):
        d[f"{idx}.weight"] = (cout, cin, 3, 3)
        if bias:
            d[f"{idx}.bias"] = (cout,)

    def block(d, idx):
        for j in (0, 2, 4):
            conv(d, f"{idx}.conv.{j}", 64, 64)

    conv(enc, 0, 3, 64)
    block(enc, 1)
    for stage in range(3):
        base = 2 + 4 * stage
        conv(enc, base, 64, 64, bias=False)
        for j in range(1, 4):
            block(enc, base + j)
    conv(enc, 14, 64, 16)
    conv(dec, 1, 16, 64)
    for stage in range(3):
        base = 3 + 5 * stage
        for j in range(3):
            block(dec, base + j)
        conv(dec, base + 4, 64, 64, bias=False)
    block(dec, 18)
    conv(dec, 19, 64, 3)
    return enc, dec


def write_taef1(vae_approx: Path, seed: int = 1) -> None:
    vae_approx.mkdir(parents=True, exist_ok=True)
    for part, shapes in zip(("encoder", "decoder"), taef1_shapes()):
        g = torch.Generator().manual_seed(seed)
        sd = {k: (torch.zeros(s) if k.endswith(".bias") else torch.randn(s, generator=g) * 0.05) for k, s in shapes.items()}
        save_file(sd, str(vae_approx / f"taef1_{part}.safetensors"))


def random_svdquant_layer(N: int, K: int, R: int, precision: str, shifted: bool, g: torch.Generator) -> SVDQuantLayer:
    """Random codes and scales sized so that W_eff has entries of about 0.02, like the BFL test models."""
    bf = torch.bfloat16
    if precision == "int4":
        codes = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
        wscales = (torch.rand(N, K // 64, generator=g) * 0.004 + 0.002).to(bf)
        extra = {}
    else:
        codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int8)
        wscales = (torch.rand(N, K // 16, generator=g) * 0.008 + 0.004).to(torch.float8_e4m3fn)
        extra = {"wtscale": torch.tensor([1.25], dtype=bf),
                 "wcscales": (torch.rand(N, generator=g) * 0.5 + 0.75).to(bf)}
    return SVDQuantLayer(
        precision=precision, codes=codes, wscales=wscales,
        smooth=(torch.rand(K, generator=g) * 1.5 + 0.5).to(bf),
        proj_down=(torch.randn(K, R, generator=g) * 0.02).to(bf), proj_up=(torch.randn(N, R, generator=g) * 0.02).to(bf),
        bias=(torch.randn(N, generator=g) * 0.01).to(bf), shifted=shifted and precision == "int4", **extra).validate()


def random_w4a16_layer(N: int, K: int, g: torch.Generator) -> W4A16Layer:
    scales = (torch.rand(N, K // 64, generator=g) * 0.004 + 0.004).to(torch.bfloat16)
    return W4A16Layer(codes=torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8), scales=scales,
                      zeros=(-7.5 * scales.float()).to(torch.bfloat16),
                      bias=(torch.randn(N, generator=g) * 0.01).to(torch.bfloat16)).validate()


def random_flux_layers(*, hidden=256, depth=1, depth_single=1, context_dim=64, vec_dim=32, guidance=True,
                       in_channels=16, precision="int4", rank=16, seed=0) -> tuple[dict, dict, dict]:
    """(svdquant, w4a16, plain) of a FLUX.1 transformer with random quantized layers, keyed by Nunchaku names
    (C++ naming); plain tensors in diffusers names."""
    g = torch.Generator().manual_seed(seed)
    D, F = hidden, 4 * hidden
    svdq, w4a16 = {}, {}
    bfl = random_state_dict(flux_shapes(hidden, 0, 0, context_dim, vec_dim, guidance, in_channels), 0.02, seed)
    plain = {}
    for b, diffusers in flux.UNQUANTIZED:
        for leaf in ("weight", "bias"):
            if f"{b}.{leaf}" in bfl:
                plain[f"{diffusers}.{leaf}"] = bfl[f"{b}.{leaf}"]
    shape = {"qkv_proj": (3 * D, D), "out_proj": (D, D), "mlp_fc1": (F, D), "mlp_fc2": (D, F)}
    for i in range(depth):
        p = f"{flux.DOUBLE_PREFIX}.{i}"
        for _, cpp, _ in flux.DOUBLE_W4A4:
            N, K = shape[cpp.replace("_context", "")]
            svdq[f"{p}.{cpp}"] = random_svdquant_layer(N, K, rank, precision, flux.is_shifted(cpp), g)
        for _, name, S in flux.DOUBLE_W4A16:
            w4a16[f"{p}.{name}"] = random_w4a16_layer(S * D, D, g)
        for _, cpp, _ in flux.DOUBLE_NORMS:
            plain[f"{p}.{cpp}"] = (1 + 0.1 * torch.randn(HEAD_DIM, generator=g)).to(torch.bfloat16)
    for i in range(depth_single):
        p = f"{flux.SINGLE_PREFIX}.{i}"
        for name in ("qkv_proj", "mlp_fc1", "out_proj", "mlp_fc2"):
            N, K = shape[name]
            svdq[f"{p}.{name}"] = random_svdquant_layer(N, K, rank, precision, flux.is_shifted(name), g)
        for _, name, S in flux.SINGLE_W4A16:
            w4a16[f"{p}.{name}"] = random_w4a16_layer(S * D, D, g)
        for _, cpp, _ in flux.SINGLE_NORMS:
            plain[f"{p}.{cpp}"] = (1 + 0.1 * torch.randn(HEAD_DIM, generator=g)).to(torch.bfloat16)
    return svdq, w4a16, plain


def write_random_nunchaku_flux(path: Path, *, model_class="NunchakuFluxTransformer2dModel", comfy_config=True,
                               comfy_extra: dict | None = None, legacy_folder=False, **kw) -> Path:
    """A Nunchaku FLUX.1 file (or legacy folder) with random quantized layers (fast: no quantizer), metadata
    as the original tools write it (comfy_config omitted when comfy_config=False; comfy_extra adds keys to its
    model_config)."""
    svdq, w4a16, plain = random_flux_layers(**kw)
    mc = flux.comfy_model_config(
        hidden_size=kw.get("hidden", 256), depth=kw.get("depth", 1), depth_single_blocks=kw.get("depth_single", 1),
        in_channels=kw.get("in_channels", 16), context_in_dim=kw.get("context_dim", 64),
        vec_in_dim=kw.get("vec_dim", 32), guidance_embed=kw.get("guidance", True))
    cls = "FluxInpaint" if mc["in_channels"] == 96 else flux.model_class_for(mc)
    cc = {"model_class": cls, "model_config": {**mc, **(comfy_extra or {})}} if comfy_config else None
    return write_nunchaku(path, svdquant=svdq, w4a16=w4a16, plain=plain, config=flux.diffusers_config(mc),
                          comfy_config=cc, model_class=model_class, legacy_folder=legacy_folder)


def write_random_comfy_native_flux(path: Path, *, hidden=256, depth=1, depth_single=1, seed=0) -> Path:
    """A ComfyUI-native svdquant_w4a4 FLUX.1 file (BFL names, one layer per Linear, modulation as
    awq_w4a16) with random int4 layers. Single blocks' linear2 mixes attention and GELU inputs; with one
    act_unsigned flag per Linear it is written signed."""
    g = torch.Generator().manual_seed(seed)
    bfl = random_state_dict(flux_shapes(hidden, depth, depth_single, 64, 32, True), 0.02, seed)
    out = {k: t for k, t in bfl.items() if not (k.startswith(("double_blocks.", "single_blocks.")) and
                                                k.endswith((".weight", ".bias")) and ".norm." not in k)}
    for key, t in bfl.items():
        if not (key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight") and t.dim() == 2):
            continue
        name = key[: -len(".weight")]
        N, K = t.shape
        if name.endswith(("_mod.lin", "modulation.lin")):
            tensors = w4a16_to_comfy(random_w4a16_layer(N, K, g))
        else:
            tensors = svdquant_to_comfy(random_svdquant_layer(N, K, 16, "int4", name.endswith("_mlp.2"), g))
        out.update({f"{name}.{suffix}": v for suffix, v in tensors.items()})
    save_file(out, str(path), metadata={"test_model": "random FLUX.1, ComfyUI-native svdquant_w4a4"})
    return path


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 255.0) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def clip_l_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """CLIP-L text model (HF names, as clip_l.safetensors), random fp16; std 0.02 like CLIP's init."""
    g = torch.Generator().manual_seed(seed)
    D, F = 768, 3072
    shapes = {"text_model.embeddings.token_embedding.weight": (49408, D),
              "text_model.embeddings.position_embedding.weight": (77, D),
              "text_model.final_layer_norm.weight": (D,), "text_model.final_layer_norm.bias": (D,),
              "text_projection.weight": (D, D)}
    for i in range(12):
        p = f"text_model.encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{p}.self_attn.{n}.weight": (D, D), f"{p}.self_attn.{n}.bias": (D,)})
        shapes.update({f"{p}.mlp.fc1.weight": (F, D), f"{p}.mlp.fc1.bias": (F,), f"{p}.mlp.fc2.weight": (D, F),
                       f"{p}.mlp.fc2.bias": (D,)})
        for n in ("layer_norm1", "layer_norm2"):
            shapes.update({f"{p}.{n}.weight": (D,), f"{p}.{n}.bias": (D,)})
    sd = {}
    for k, s in shapes.items():
        if "layer_norm" in k and k.endswith("weight"):
            sd[k] = torch.ones(s, dtype=torch.float16)
        elif k.endswith("bias"):
            sd[k] = torch.zeros(s, dtype=torch.float16)
        else:
            sd[k] = (torch.randn(s, generator=g) * 0.02).half()
    return sd
