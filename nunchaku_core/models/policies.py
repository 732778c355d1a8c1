"""Which Linears of a diffusion model are quantized how, per model family: a table of key patterns (data, not
code paths), plus the stated default rule for a family without an entry.

Names are ComfyUI's own state-dict names of the diffusion model (what `Load Diffusion Model` reads), without a
`model.diffusion_model.` prefix. A Linear is a `<name>.weight` of two dimensions [N, K].

Per Linear, one decision:
  w4a4     SVDQuant W4A4 (INT4, group 64): attention projections and MLPs inside the repeated blocks. Needs
           K % 64 == 0.
  shifted  a w4a4 Linear whose whole input comes straight out of a GELU (the MLP's second layer): its
           activations are shifted by σ and quantized unsigned (FORMAT.md §1). A Linear whose input only partly
           comes from a GELU (FLUX's single-block linear2: [attention | GELU(mlp)]) is not shifted.
  w4a16    weight-only 4-bit (AWQ, group 64): modulation / adaLN Linears, whose input is a per-sample
           conditioning vector (few tokens: weight traffic dominates, activation quantization would buy nothing);
           also SDXL's cross-attention keys / values, which read the text encoders' raw hidden states.
  keep     16-bit: embedders, final layers, norms, anything outside the blocks or too small.

The default rule (a family without an entry, or `family="default"`): inside a repeated block (a name with
`.<index>.`), a Linear whose name says modulation (`mod`, `adaLN`, `modulation`) is w4a16, every other one with
K % 64 == 0 and min(N, K) >= MIN_FEATURES is w4a4 (never shifted: the default cannot know where a GELU is);
everything else is kept. The quantizer reports each decision and its reason.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

MIN_FEATURES = 256     # smaller Linears stay 16-bit: too few weights for 4-bit codes and a rank-32 branch to pay off
GROUP = 64             # W4A4 INT4 and W4A16 group size; K must be a multiple


@dataclass(frozen=True)
class Policy:
    family: str
    detect: tuple = ()          # keys (regexes, fullmatch) that must all be present for this family
    w4a4: tuple = ()            # Linear names (regexes, fullmatch) quantized W4A4
    shifted: tuple = ()         # of the w4a4 ones, those whose input is a GELU output
    w4a16: tuple = ()           # modulation Linears, weight-only 4-bit
    notes: str = ""


_BLOCK = r"(?:.+\.)?\d+\."      # a name inside a repeated block

# First match wins (family_of): FLUX.2 and Chroma before FLUX.1, whose detect keys they also have.
POLICIES = (
    Policy(
        family="flux2",
        detect=(r"double_stream_modulation_img\.lin\.weight", r"img_in\.weight"),
        w4a4=(r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)", r"double_blocks\.\d+\.(img|txt)_mlp\.[02]",
              r"single_blocks\.\d+\.linear[12]"),
        w4a16=(r"double_stream_modulation_(img|txt)\.lin", r"single_stream_modulation\.lin"),
        notes="FLUX.2 (BFL names): FLUX.1's block Linears; the MLPs are SiLU-gated (no GELU: nothing shifted); "
              "modulation is three Linears shared by all blocks (W4A16); no biases anywhere"),
    Policy(
        family="qwen_image",
        detect=(r"transformer_blocks\.0\.img_mod\.1\.weight", r"transformer_blocks\.0\.attn\.add_q_proj\.weight"),
        w4a4=(r"transformer_blocks\.\d+\.attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)",
              r"transformer_blocks\.\d+\.(img|txt)_mlp\.net\.(0\.proj|2)"),
        shifted=(r"transformer_blocks\.\d+\.(img|txt)_mlp\.net\.2",),
        w4a16=(r"transformer_blocks\.\d+\.(img|txt)_mod\.1",),
        notes="Qwen-Image (diffusers names as ComfyUI keeps them): attention and GELU(tanh) MLPs W4A4, the MLP's "
              "second layer shifted; per-block img/txt modulation W4A16; norm_out.linear and the embedders 16-bit"),
    Policy(
        family="zimage",
        detect=(r"cap_embedder\.1\.weight", r"layers\.0\.feed_forward\.w1\.weight"),
        w4a4=(r"(layers|noise_refiner|context_refiner)\.\d+\.attention\.(qkv|out)",
              r"(layers|noise_refiner|context_refiner)\.\d+\.feed_forward\.w[123]"),
        w4a16=(r"(layers|noise_refiner)\.\d+\.adaLN_modulation\.0",),
        notes="Z-Image / Lumina 2 NextDiT (ComfyUI names): attention and the SiLU-gated feed-forward (w1, w3 in, "
              "w2 out; no GELU: nothing shifted) of the main and refiner blocks W4A4; per-block adaLN W4A16; "
              "the final layer's adaLN and the embedders 16-bit"),
    Policy(
        family="sd3",
        detect=(r"joint_blocks\.0\.context_block\.attn\.qkv\.weight", r"x_embedder\.proj\.weight"),
        w4a4=(r"joint_blocks\.\d+\.(context|x)_block\.attn2?\.(qkv|proj)",
              r"joint_blocks\.\d+\.(context|x)_block\.mlp\.fc[12]"),
        shifted=(r"joint_blocks\.\d+\.(context|x)_block\.mlp\.fc2",),
        w4a16=(r"joint_blocks\.\d+\.(context|x)_block\.adaLN_modulation\.1",),
        notes="SD3 / SD3.5 MMDiT (SAI names as ComfyUI keeps them): both streams' attention (and SD3.5 Medium's "
              "x-only attn2) and GELU(tanh) MLPs W4A4, mlp.fc2 shifted (its whole input is the GELU); per-block "
              "adaLN_modulation W4A16 (input SiLU(t + y embedding), one row per sample); the final layer's "
              "adaLN, the patch/time/pooled/context embedders and final_layer.linear 16-bit"),
    Policy(
        family="chroma",
        detect=(r"distilled_guidance_layer\.in_proj\.weight", r"double_blocks\.0\.img_attn\.qkv\.weight"),
        w4a4=(r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)", r"double_blocks\.\d+\.(img|txt)_mlp\.[02]",
              r"single_blocks\.\d+\.linear[12]"),
        shifted=(r"double_blocks\.\d+\.(img|txt)_mlp\.2",),
        notes="Chroma (FLUX.1-schnell derived, BFL names): FLUX.1's block Linears and shift (double-block mlp.2; "
              "single-block linear2's mixed [attention | GELU] input is not shifted). Its blocks have no "
              "modulation Linears: the approximator (distilled_guidance_layer, a five-layer residual MLP) computes "
              "every block's modulation vector from sinusoids, one row per vector (344), once per step. It stays "
              "16-bit: as W4A16 (FLUX.1's choice for its per-block mod.lin) a LoRA on it put the LoRA'd output "
              "1 dB below the noise-matched null model (tests/comfy/test_family_quantized.py, tiny Chroma: 7.35 dB "
              "vs null 8.35 +- 0.35, while the same LoRA on the blocks alone: 8.79 dB vs 8.20), i.e. its 4-bit "
              "error did more harm than its size says; it is 3 % of Chroma's 8.9 B parameters (0.56 GB in bf16)"),
    Policy(
        family="pixart_sigma",
        detect=(r"t_block\.1\.weight", r"blocks\.0\.cross_attn\.kv_linear\.weight"),
        w4a4=(r"blocks\.\d+\.attn\.(qkv|proj)", r"blocks\.\d+\.cross_attn\.(q_linear|kv_linear|proj)",
              r"blocks\.\d+\.mlp\.fc[12]"),
        shifted=(r"blocks\.\d+\.mlp\.fc2",),
        w4a16=(r"t_block\.1",),
        notes="PixArt-Sigma (and Alpha; original PixArt names): self-attention, cross-attention (q_linear on the "
              "residual stream, kv_linear on the caption embedding, i.e. the y_embedder MLP's output) and the "
              "GELU(tanh) MLP W4A4, mlp.fc2 shifted; t_block.1, the one adaLN table shared by all blocks "
              "(input SiLU(t embedding)), W4A16 as FLUX.2's shared modulation; embedders and the final layer 16-bit"),
    Policy(
        family="wan",
        detect=(r"head\.modulation", r"blocks\.0\.cross_attn\.q\.weight"),
        w4a4=(r"blocks\.\d+\.self_attn\.[qkvo]", r"blocks\.\d+\.cross_attn\.([qkvo]|k_img|v_img)",
              r"blocks\.\d+\.ffn\.[02]"),
        shifted=(r"blocks\.\d+\.ffn\.2",),
        w4a16=(r"time_projection\.1",),
        notes="Wan 2.1 / 2.2 (Wan names; T2V, I2V's k_img/v_img too): self- and cross-attention (k/v on the "
              "text embedding MLP's output) and the GELU(tanh) FFN W4A4, ffn.2 shifted; time_projection.1, the "
              "adaLN Linear shared by all blocks (input SiLU(time embedding); one row per sample, or per token "
              "for Wan 2.2 TI2V's per-token timesteps), W4A16 as FLUX.2's shared modulation (the blocks' own "
              "`modulation` is a parameter, not a Linear); patch embedding (a Conv3d), text/time embedders, "
              "img_emb and head 16-bit"),
    Policy(
        family="sdxl",
        detect=(r"input_blocks\.0\.0\.weight", r"label_emb\.0\.0\.weight",
                r".+\.transformer_blocks\.0\.attn2\.to_k\.weight"),
        w4a4=(r".+\.transformer_blocks\.\d+\.attn1\.to_(q|k|v|out\.0)",
              r".+\.transformer_blocks\.\d+\.attn2\.to_(q|out\.0)",
              r".+\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)"),
        w4a16=(r".+\.transformer_blocks\.\d+\.attn2\.to_[kv]",),
        notes="SDXL UNet (ldm names): only the Linears of the SpatialTransformers' transformer_blocks are "
              "quantized, as Nunchaku's SDXL does; convolutions, ResBlocks (their emb_layers too: per-sample "
              "vectors, 17.6 M of 2.6 B parameters), time/label embedders and the SpatialTransformers' proj_in / "
              "proj_out (the bridge between conv features and tokens, one pair per SpatialTransformer, 0.9 % of "
              "the parameters) stay 16-bit. W4A4: attn1 q/k/v/out, attn2 q/out, ff.net.0.proj and ff.net.2; "
              "ff.net.2 is not shifted: its input is value * GELU(gate) (GEGLU), a signed product, not a GELU "
              "output. attn2's to_k / to_v read the text encoders' raw hidden states (CLIP's outlier channels; "
              "77 tokens per prompt, weight-bound): W4A16 (Nunchaku's SDXL keeps them 16-bit)"),
    Policy(
        family="flux",
        detect=(r"double_blocks\.0\.img_attn\.qkv\.weight", r"img_in\.weight"),
        w4a4=(r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)", r"double_blocks\.\d+\.(img|txt)_mlp\.[02]",
              r"single_blocks\.\d+\.linear[12]"),
        shifted=(r"double_blocks\.\d+\.(img|txt)_mlp\.2",),
        w4a16=(r"double_blocks\.\d+\.(img|txt)_mod\.lin", r"single_blocks\.\d+\.modulation\.lin"),
        notes="FLUX.1 (BFL names): as Nunchaku quantizes it, except that single-block linear1/linear2 stay one "
              "layer each (ComfyUI's Linears), so linear2's mixed [attention | GELU] input is not shifted"),
)

_MODULATION = re.compile(r"(^|[._])(mod|adaln|modulation)([._]|$)", re.IGNORECASE)


@dataclass
class Decision:
    kind: str                   # "w4a4" | "w4a16" | "keep"
    shifted: bool = False
    reason: str = ""


@dataclass
class Plan:
    family: str
    decisions: dict = field(default_factory=dict)     # Linear name -> Decision

    def of(self, kind: str) -> list:
        return [n for n, d in self.decisions.items() if d.kind == kind]


def _any(patterns, name: str) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def family_of(keys) -> str:
    """The table's family whose `detect` keys are all present, else "default"."""
    keys = list(keys)
    for p in POLICIES:
        if all(any(re.fullmatch(d, k) for k in keys) for d in p.detect):
            return p.family
    return "default"


def policy_for(family: str):
    for p in POLICIES:
        if p.family == family:
            return p
    if family != "default":
        raise ValueError(f"no quantization policy for model family {family!r}; known: "
                         f"{', '.join(p.family for p in POLICIES)} (or 'default' for the default rule)")
    return None


def plan(linears: dict, family: str) -> Plan:
    """linears: {name: (N, K)} -> the decision for each. A table entry's patterns decide; a pattern that asks
    for w4a4 on a Linear whose K is not a multiple of 64 falls back to keep, with that reason."""
    pol = policy_for(family)
    out = Plan(family)
    for name, (N, K) in linears.items():
        if pol is not None:
            if _any(pol.w4a4, name):
                d = Decision("w4a4", _any(pol.shifted, name), f"{family} policy")
            elif _any(pol.w4a16, name):
                d = Decision("w4a16", reason=f"{family} policy: modulation")
            else:
                d = Decision("keep", reason=f"{family} policy: not a block Linear")
        elif not re.match(_BLOCK, name):
            d = Decision("keep", reason="default rule: outside the repeated blocks")
        elif _MODULATION.search(name):
            d = Decision("w4a16", reason="default rule: modulation by name")
        elif min(N, K) < MIN_FEATURES:
            d = Decision("keep", reason=f"default rule: min(N, K) = {min(N, K)} < {MIN_FEATURES}")
        else:
            d = Decision("w4a4", reason="default rule: block Linear")
        if d.kind in ("w4a4", "w4a16") and K % GROUP:
            d = Decision("keep", reason=f"K = {K} is not a multiple of the group size {GROUP}")
        out.decisions[name] = d
    return out
