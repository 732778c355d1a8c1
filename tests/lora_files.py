"""LoRA state dicts for FLUX.1 in every format ComfyUI 0.3.75 maps for Flux, written from our own tables (not
from ComfyUI's key maps), so a test can check that ComfyUI + our patcher apply every tensor.

Each maker returns (lora_sd, expected) where expected maps every BFL Linear the file targets ('double_blocks.0.
img_attn.qkv') to the number of patches ComfyUI should store for it (3 for diffusers' separate to_q/to_k/to_v on
the fused qkv, 4 for a single block's linear1: q, k, v and proj_mlp).

Formats:
- kohya (sd-scripts FLUX):       lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight / .lora_up.weight / .alpha
- bfl (ComfyUI / BFL keys):      diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight / .lora_B.weight
- diffusers (PEFT):              transformer.transformer_blocks.0.attn.to_q.lora_A.weight / .lora_B.weight
- xlabs (XLabs-style processor keys, as ComfyUI converts them; ComfyUI only recognises the file when it has
  double block 18 and single block 37, i.e. a full 19 + 38 block model):
                                 double_blocks.0.processor.qkv_lora1.down.weight / .up.weight, ...
- bfl_control (BFL's Depth/Canny LoRAs: lora_A/lora_B, lora_B.bias -> bias diffs, norm scales set):
                                 double_blocks.0.img_attn.qkv.lora_A.weight, ... .lora_B.bias, ...norm.key_norm.scale
"""
from __future__ import annotations

import torch

HEAD_DIM = 128


def bfl_linears(hidden: int, depth: int, depth_single: int, context_dim: int = 64) -> dict[str, tuple[int, int]]:
    """BFL Linear name -> (N, K) for the blocks (quantized in SVDQuant files) and a few unquantized ones."""
    D = hidden
    out = {"img_in": (D, 64), "txt_in": (D, context_dim), "final_layer.linear": (64, D)}
    for i in range(depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            out.update({f"{p}_mod.lin": (6 * D, D), f"{p}_attn.qkv": (3 * D, D), f"{p}_attn.proj": (D, D),
                        f"{p}_mlp.0": (4 * D, D), f"{p}_mlp.2": (D, 4 * D)})
    for i in range(depth_single):
        p = f"single_blocks.{i}"
        out.update({f"{p}.linear1": (7 * D, D), f"{p}.linear2": (D, 5 * D), f"{p}.modulation.lin": (3 * D, D)})
    return out


class _Gen:
    def __init__(self, rank: int, std: float, seed: int, dtype=torch.bfloat16):
        self.g = torch.Generator().manual_seed(seed)
        self.rank, self.std, self.dtype = rank, std, dtype

    def pair(self, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(down [r, k], up [n, r]) with ΔW = up·down of entry std ≈ std·(r·alpha/r)^½ scaled below."""
        s = (self.std / self.rank ** 0.5) ** 0.5
        return ((torch.randn(self.rank, k, generator=self.g) * s).to(self.dtype),
                (torch.randn(n, self.rank, generator=self.g) * s).to(self.dtype))


def _adder(gen: _Gen, sd: dict, expected: dict, down_key: str, up_key: str):
    """add(name, n, k, bfl_name): a LoRA pair under the file keys down_key/up_key (formatted with name) for a
    [n, k] update, counted as one patch on the BFL Linear bfl_name."""
    def add(name: str, n: int, k: int, bfl_name: str):
        sd[down_key.format(name)], sd[up_key.format(name)] = gen.pair(n, k)
        expected[bfl_name] = expected.get(bfl_name, 0) + 1
    return add


def kohya(hidden, depth, depth_single, rank=4, std=0.01, seed=0, alpha=None, only=None):
    """only: a predicate on the BFL name selecting which Linears get a LoRA."""
    gen, sd, expected = _Gen(rank, std, seed), {}, {}
    for name, (n, k) in bfl_linears(hidden, depth, depth_single).items():
        if only is not None and not only(name):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        down, up = gen.pair(n, k)
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        sd[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        expected[name] = 1
    return sd, expected


def bfl(hidden, depth, depth_single, rank=4, std=0.01, seed=1):
    gen, sd, expected = _Gen(rank, std, seed), {}, {}
    for name, (n, k) in bfl_linears(hidden, depth, depth_single).items():
        down, up = gen.pair(n, k)
        sd[f"diffusion_model.{name}.lora_A.weight"], sd[f"diffusion_model.{name}.lora_B.weight"] = down, up
        expected[name] = 1
    return sd, expected


def diffusers(hidden, depth, depth_single, rank=4, std=0.01, seed=2):
    D = hidden
    gen, sd, expected = _Gen(rank, std, seed), {}, {}
    add = _adder(gen, sd, expected, "transformer.{}.lora_A.weight", "transformer.{}.lora_B.weight")

    add("x_embedder", D, 64, "img_in")
    add("context_embedder", D, 64, "txt_in")
    add("proj_out", 64, D, "final_layer.linear")
    for i in range(depth):
        b, t = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for q in ("to_q", "to_k", "to_v"):
            add(f"{b}.attn.{q}", D, D, f"{t}.img_attn.qkv")
        for q in ("add_q_proj", "add_k_proj", "add_v_proj"):
            add(f"{b}.attn.{q}", D, D, f"{t}.txt_attn.qkv")
        add(f"{b}.attn.to_out.0", D, D, f"{t}.img_attn.proj")
        add(f"{b}.attn.to_add_out", D, D, f"{t}.txt_attn.proj")
        add(f"{b}.ff.net.0.proj", 4 * D, D, f"{t}.img_mlp.0")
        add(f"{b}.ff.net.2", D, 4 * D, f"{t}.img_mlp.2")
        add(f"{b}.ff_context.net.0.proj", 4 * D, D, f"{t}.txt_mlp.0")
        add(f"{b}.ff_context.net.2", D, 4 * D, f"{t}.txt_mlp.2")
        add(f"{b}.norm1.linear", 6 * D, D, f"{t}.img_mod.lin")
        add(f"{b}.norm1_context.linear", 6 * D, D, f"{t}.txt_mod.lin")
    for i in range(depth_single):
        b, t = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for q in ("to_q", "to_k", "to_v"):
            add(f"{b}.attn.{q}", D, D, f"{t}.linear1")
        add(f"{b}.proj_mlp", 4 * D, D, f"{t}.linear1")
        add(f"{b}.proj_out", D, 5 * D, f"{t}.linear2")
        add(f"{b}.norm.linear", 3 * D, D, f"{t}.modulation.lin")
    return sd, expected


def xlabs(hidden, depth, depth_single, rank=4, std=0.01, seed=3):
    D = hidden
    gen, sd, expected = _Gen(rank, std, seed), {}, {}
    add = _adder(gen, sd, expected, "{}.down.weight", "{}.up.weight")

    for i in range(depth):
        p, t = f"double_blocks.{i}.processor", f"double_blocks.{i}"
        add(f"{p}.qkv_lora1", 3 * D, D, f"{t}.img_attn.qkv")
        add(f"{p}.proj_lora1", D, D, f"{t}.img_attn.proj")
        add(f"{p}.qkv_lora2", 3 * D, D, f"{t}.txt_attn.qkv")
        add(f"{p}.proj_lora2", D, D, f"{t}.txt_attn.proj")
    for i in range(depth_single):
        p, t = f"single_blocks.{i}.processor", f"single_blocks.{i}"
        add(f"{p}.qkv_lora", 3 * D, D, f"{t}.linear1")      # ComfyUI maps it onto linear1's q/k/v rows
        add(f"{p}.proj_lora", D, 5 * D, f"{t}.linear2")
    return sd, expected


def bfl_control(hidden, depth, depth_single, rank=4, std=0.01, seed=4):
    """BFL's control LoRA layout: LoRA on every Linear with a bias difference (lora_B.bias) and the q/k norm
    scales replaced. expected counts the weight patches; the bias and norm keys are checked separately."""
    gen, sd, expected = _Gen(rank, std, seed), {}, {}
    g = torch.Generator().manual_seed(seed + 100)
    for name, (n, k) in bfl_linears(hidden, depth, depth_single).items():
        down, up = gen.pair(n, k)
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = down, up
        sd[f"{name}.lora_B.bias"] = (torch.randn(n, generator=g) * 0.01).to(torch.bfloat16)
        expected[name] = 1
    for i in range(depth_single):
        for norm in ("query_norm", "key_norm"):
            sd[f"single_blocks.{i}.norm.{norm}.scale"] = (1 + 0.1 * torch.randn(HEAD_DIM, generator=g)).to(torch.bfloat16)
    return sd, expected


FORMATS = {"kohya": kohya, "bfl": bfl, "diffusers": diffusers, "xlabs": xlabs, "bfl_control": bfl_control}


def sd15_lora(rank=4, seed=5) -> dict:
    """A LoRA for another architecture (SD1.5 UNet and CLIP key names)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (n, k) in {"lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320),
                         "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (1280, 1280),
                         "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, k, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(n, rank, generator=g)
    return sd


def qwen_image_lora(num_layers: int = 1, rank: int = 4, seed: int = 6, hidden: int = 3072,
                    std: float = 0.01) -> dict:
    """A LoRA for another family: Qwen-Image's blocks in the format Qwen-Image LoRAs ship in (PEFT lora_A/lora_B
    under transformer_blocks.N, ComfyUI's QwenImage key map; Qwen-Image's hidden is 3072), attention and MLP of
    every block. Its attention keys are also FLUX.1's diffusers names (transformer_blocks.N.attn.to_q is double
    block N's q rows), so on a FLUX.1 of the same width that part maps."""
    g = torch.Generator().manual_seed(seed)
    D = hidden
    sd = {}
    for i in range(num_layers):
        p = f"transformer_blocks.{i}"
        linears = {f"{p}.attn.{n}": (D, D) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                    "add_v_proj", "to_out.0", "to_add_out")}
        linears.update({f"{p}.img_mlp.net.0.proj": (4 * D, D), f"{p}.img_mlp.net.2": (D, 4 * D)})
        for name, (n, k) in linears.items():
            sd[f"{name}.lora_A.weight"] = torch.randn(rank, k, generator=g) * std
            sd[f"{name}.lora_B.weight"] = torch.randn(n, rank, generator=g) * std
    return sd


def zimage_lora(num_layers: int = 1, rank: int = 4, seed: int = 7) -> dict:
    """A LoRA for another family: Z-Image's layers (ComfyUI's Lumina2 names, diffusion_model. prefix; dim 3840):
    attention and feed-forward of every layer. No FLUX.1 key map has these names."""
    g = torch.Generator().manual_seed(seed)
    D, F = 3840, 10240
    sd = {}
    for i in range(num_layers):
        p = f"diffusion_model.layers.{i}"
        for name, (n, k) in {f"{p}.attention.qkv": (3 * D, D), f"{p}.attention.out": (D, D),
                             f"{p}.feed_forward.w1": (F, D), f"{p}.feed_forward.w2": (D, F)}.items():
            sd[f"{name}.lora_A.weight"] = torch.randn(rank, k, generator=g) * 0.01
            sd[f"{name}.lora_B.weight"] = torch.randn(n, rank, generator=g) * 0.01
    return sd
