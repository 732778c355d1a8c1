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
           conditioning vector (few tokens: weight traffic dominates, activation quantization would buy nothing).
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

# First match wins (family_of): FLUX.2 before FLUX.1, whose detect keys it also has.
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
