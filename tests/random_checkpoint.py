"""Random-weight Nunchaku FLUX checkpoints written with our writer: valid files of any width, fast to make.
(Conformance with the original tooling is tested separately with files it wrote, test_original_tooling.py.)
"""
from __future__ import annotations

import torch

from nunchaku_core.models import flux
from nunchaku_core.formats.nunchaku import write_nunchaku
from nunchaku_core.layer import GROUP_SIZE, SVDQuantLayer, W4A16Layer


def random_svdquant(N: int, K: int, R: int, precision: str, g: torch.Generator, shifted: bool = False) -> SVDQuantLayer:
    G = GROUP_SIZE[precision]
    if precision == "int4":
        codes = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
        wscales = (torch.rand(N, K // G, generator=g) * 0.004 + 0.001).bfloat16()
        extra = {}
    else:
        codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int8)
        wscales = (torch.rand(N, K // G, generator=g) * 2 + 0.5).to(torch.float8_e4m3fn)
        extra = {"wtscale": torch.tensor([0.003]).bfloat16(), "wcscales": (torch.rand(N, generator=g) + 0.5).bfloat16()}
    return SVDQuantLayer(
        precision=precision, codes=codes, wscales=wscales,
        smooth=(torch.rand(K, generator=g) + 0.5).bfloat16(),
        proj_down=(torch.randn(K, R, generator=g) * 0.02).bfloat16(),
        proj_up=(torch.randn(N, R, generator=g) * 0.02).bfloat16(),
        bias=(torch.randn(N, generator=g) * 0.02).bfloat16(), shifted=shifted and precision == "int4",
        smooth_orig=(torch.rand(K, generator=g) + 0.5).bfloat16(), **extra).validate()


def random_w4a16(N: int, K: int, g: torch.Generator) -> W4A16Layer:
    scales = (torch.rand(N, (K + 63) // 64, generator=g) * 0.002 + 0.001).bfloat16()
    return W4A16Layer(codes=torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8), scales=scales,
                      zeros=(-7.0 * scales.float()).bfloat16(), bias=(torch.randn(N, generator=g) * 0.02).bfloat16(),
                      group_size=64).validate()


def write_random_flux(path: str, *, hidden: int = 256, depth: int = 1, depth_single: int = 1, precision: str = "int4",
                      rank: int = 32, guidance: bool = True, context_dim: int = 64, vec_dim: int = 32,
                      in_channels: int = 16, seed: int = 0) -> dict:
    """Write a random Nunchaku FLUX file; returns its comfy_config."""
    g = torch.Generator().manual_seed(seed)
    D, F = hidden, 4 * hidden
    svdq, w4a16, plain = {}, {}, {}

    def small(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).bfloat16()

    shapes = {"qkv_proj": (3 * D, D), "out_proj": (D, D), "mlp_fc1": (F, D), "mlp_fc2": (D, F)}
    for i in range(depth):
        p = f"{flux.DOUBLE_PREFIX}.{i}"
        for _, cpp, _ in flux.DOUBLE_W4A4:
            N, K = shapes[cpp.replace("_context", "")]
            svdq[f"{p}.{cpp}"] = random_svdquant(N, K, rank, precision, g, shifted=flux.is_shifted(cpp))
        for _, name, S in flux.DOUBLE_W4A16:
            w4a16[f"{p}.{name}"] = random_w4a16(S * D, D, g)
        for _, cpp, _ in flux.DOUBLE_NORMS:
            plain[f"{p}.{cpp}"] = torch.ones(128).bfloat16()
    for i in range(depth_single):
        p = f"{flux.SINGLE_PREFIX}.{i}"
        for name in ("qkv_proj", "mlp_fc1", "out_proj", "mlp_fc2"):
            N, K = shapes[name]
            svdq[f"{p}.{name}"] = random_svdquant(N, K, rank, precision, g, shifted=flux.is_shifted(name))
        svdq[f"{p}.out_proj"].bias = torch.zeros(D).bfloat16()  # mlp_fc2 carries the real bias (FORMAT.md §2)
        for _, name, S in flux.SINGLE_W4A16:
            w4a16[f"{p}.{name}"] = random_w4a16(S * D, D, g)
        for _, cpp, _ in flux.SINGLE_NORMS:
            plain[f"{p}.{cpp}"] = torch.ones(128).bfloat16()
    dims = {"img_in": (D, in_channels * 4), "txt_in": (D, context_dim), "time_in.in_layer": (D, 256),
            "time_in.out_layer": (D, D), "guidance_in.in_layer": (D, 256), "guidance_in.out_layer": (D, D),
            "vector_in.in_layer": (D, vec_dim), "vector_in.out_layer": (D, D), "final_layer.linear": (64, D),
            "final_layer.adaLN_modulation.1": (2 * D, D)}
    for bfl, diffusers in flux.UNQUANTIZED:
        if bfl.startswith("guidance_in") and not guidance:
            continue
        N, K = dims[bfl]
        plain[f"{diffusers}.weight"], plain[f"{diffusers}.bias"] = small(N, K), small(N)
    mc = flux.comfy_model_config(hidden_size=D, depth=depth, depth_single_blocks=depth_single, in_channels=in_channels,
                                 context_in_dim=context_dim, vec_in_dim=vec_dim, guidance_embed=guidance)
    comfy_config = {"model_class": flux.model_class_for(mc), "model_config": mc}
    write_nunchaku(path, svdquant=svdq, w4a16=w4a16, plain=plain, config=flux.diffusers_config(mc),
                   comfy_config=comfy_config, model_class="NunchakuFluxTransformer2dModel")
    return comfy_config
