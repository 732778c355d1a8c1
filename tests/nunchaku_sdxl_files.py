"""Test-only: Nunchaku SDXL UNet files (what nunchaku's NunchakuSDXLUNet2DConditionModel.from_pretrained loads) and
the ComfyUI tensors they must read as.

The file is written from an LDM (ComfyUI) shape dict, tests/family_models.sdxl_shapes, renamed to diffusers' UNet
names by `diffusers_name` below (written from the LDM side, the reverse of what the reader does; a test checks it
against ComfyUI's own comfy.utils.unet_to_diffusers), with nunchaku's transformer blocks: attn1's q, k, v fused into
one W4A4 `attn1.to_qkv` (no bias), W4A4 attn1/attn2 `to_out.0`, `attn2.to_q`, `ff.net.0.proj`, `ff.net.2`, 16-bit
attn2 `to_k` / `to_v`, norms and everything outside the blocks. Key suffixes in C++ naming by default (`lora_down`,
`smooth`, ...: what nunchaku's convert_sdxl_state_dict renames), Python naming on request. Metadata `config`
(diffusers' UNet config), `model_class`, `quantization_config`.

Packing: the closed forms of FORMAT.md §4 evaluated with torch index arithmetic (`pack_*` below: the SDXL files are
~100 M codes, which nunchaku_oracle.py's plain loops would take minutes over); test_nunchaku_sdxl checks them equal
to the oracle's element-by-element packing, byte for byte, on small layers. Neither uses nunchaku_core.packing.

Expectations, computed here in float64 from the random codes and scales, with none of nunchaku_core involved:
W_eff = out_scale·code·scale/s + U·Dᵀ (rows of attn1.to_qkv for to_q, to_k, to_v), the bias as drawn (no layer is
σ-shifted in SDXL), 16-bit tensors as stored. They are computed per layer on request (`expected(key)`), so a
model of 200 M weights needs one layer of float64 at a time.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch

import family_models as fm
import nunchaku_oracle as oracle
from nunchaku_dit_files import quantization_config

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                    dtype=torch.float64)


# ---- FORMAT.md §4 closed forms, vectorized ---------------------------------------------------------------------

def _perm128(pos: torch.Tensor) -> torch.Tensor:
    """Position 16a + 4b + 2c + d of a 128-block holds channel 16a + 8c + 2b + d."""
    a, b, c, d = pos // 16, (pos // 4) % 4, (pos // 2) % 2, pos % 2
    return 16 * a + 8 * c + 2 * b + d


def pack_qweight(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] -> int8 [N, K/2]: little-endian uint32 word u = ((((tn·K/64 + tk)·8 + p)·32 + lane)·4 + 2·ns + ks),
    nibble j holds n = 128·tn + 16·p + 8·ns + lane//4, k = 64·tk + 32·ks + 8·(lane%4) + j. As a reshape: split n into
    its digits (tn, p, ns, lane//4) and k into (tk, ks, lane%4, j), put them in the word's order
    (tn, tk, p, lane//4, lane%4, ns, ks, j), and pack nibbles j = 2i, 2i + 1 into byte i (low, high)."""
    N, K = codes.shape
    c = codes.reshape(N // 128, 8, 2, 8, K // 64, 2, 4, 8)        # tn, p, ns, lane//4, tk, ks, lane%4, j
    c = c.permute(0, 4, 1, 3, 6, 2, 5, 7).reshape(-1, 2).to(torch.int16) & 0xF
    byte = c[:, 0] | (c[:, 1] << 4)
    return torch.where(byte >= 128, byte - 256, byte).to(torch.int8).reshape(N, K // 2)


def pack_wscales_int4(ws: torch.Tensor) -> torch.Tensor:
    """[N, K/64] -> nominal [K/64, N], memory [N/128][K/64][128] with each 128-block in _perm128 order."""
    N, G = ws.shape
    f = torch.arange(N * G)
    pos, tk, tn = f % 128, (f // 128) % G, f // (128 * G)
    return ws[128 * tn + _perm128(pos), tk].reshape(G, N)


def pack_wscales_nvfp4(ws: torch.Tensor) -> torch.Tensor:
    """[N, K/16] fp8 -> nominal [K/16, N]: byte ((tn·K/64 + tk)·32 + lane)·16 + 4s + q holds channel
    128·tn + 32·s + 8·(lane%4) + lane//4, group 4·tk + q."""
    N, G = ws.shape
    f = torch.arange(N * G)
    q, s, lane = f % 4, (f // 4) % 4, (f // 16) % 32
    tk, tn = (f // 512) % (G // 4), (f // 512) // (G // 4)
    n = 128 * tn + 32 * s + 8 * (lane % 4) + lane // 4
    return ws.view(torch.uint8)[n, 4 * tk + q].view(torch.float8_e4m3fn).reshape(G, N)


def pack_perm128(v: torch.Tensor) -> torch.Tensor:
    i = torch.arange(v.shape[0])
    return v[128 * (i // 128) + _perm128(i % 128)]


def _lora_offsets(rows: int, R: int):
    off = torch.arange(rows * R)
    e, kp, np_, lane = off % 2, (off // 2) % 2, (off // 4) % 2, (off // 8) % 32
    rr, c = (off // 256) % (R // 16), (off // 256) // (R // 16)
    return e, kp, np_, lane, rr, c


def pack_lora_down(D: torch.Tensor) -> torch.Tensor:
    """D [K, R]: offset ((ck·R/16 + rr)·32 + lane)·8 + 4np + 2kp + e holds D[16ck + 8kp + 2(lane%4) + e,
    16rr + 8np + lane//4]."""
    K, R = D.shape
    e, kp, np_, lane, rr, ck = _lora_offsets(K, R)
    return D[16 * ck + 8 * kp + 2 * (lane % 4) + e, 16 * rr + 8 * np_ + lane // 4].reshape(K, R)


def pack_lora_up(U: torch.Tensor) -> torch.Tensor:
    """U [N, R]: the same offset holds U[16cn + 8np + lane//4, 16rr + 8kp + 2(lane%4) + e]."""
    N, R = U.shape
    e, kp, np_, lane, rr, cn = _lora_offsets(N, R)
    return U[16 * cn + 8 * np_ + lane // 4, 16 * rr + 8 * kp + 2 * (lane % 4) + e].reshape(N, R)


CPP = {"smooth": "smooth", "smooth_orig": "smooth_orig", "lora_down": "lora_down", "lora_up": "lora_up"}
PYTHON = {"smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig", "lora_down": "proj_down",
          "lora_up": "proj_up"}


def svdquant_tensors(name: str, layer, naming: str = "cpp") -> dict:
    """The packed tensors of one W4A4 layer (the fields of nunchaku_oracle.svdquant_tensors)."""
    keys = CPP if naming == "cpp" else PYTHON
    out = {f"{name}.qweight": pack_qweight(layer.codes),
           f"{name}.wscales": (pack_wscales_int4 if layer.precision == "int4" else pack_wscales_nvfp4)(layer.wscales),
           f"{name}.{keys['smooth']}": pack_perm128(layer.smooth),
           f"{name}.{keys['smooth_orig']}": pack_perm128(layer.smooth_orig),
           f"{name}.{keys['lora_down']}": pack_lora_down(layer.proj_down),
           f"{name}.{keys['lora_up']}": pack_lora_up(layer.proj_up)}
    if layer.bias is not None:
        out[f"{name}.bias"] = pack_perm128(layer.bias)
    if layer.wtscale is not None:
        out[f"{name}.wtscale"] = layer.wtscale.clone()
    if layer.wcscales is not None:
        out[f"{name}.wcscales"] = pack_perm128(layer.wcscales)
    return out


# ---- LDM (ComfyUI) names -> diffusers' UNet names ---------------------------------------------------------------

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
          "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
TOP = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
       "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
       "label_emb.0.2": "add_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"}


def diffusers_names(keys) -> dict:
    """{LDM key: diffusers key} for an SDXL-layout UNet's keys. The LDM lists are walked in order: input_blocks.n
    (n >= 1) is a resnet [+ attention] of the current level, or its downsampler (`n.0.op`), which ends the level;
    output_blocks likewise end a level at the entry carrying the upsampler (`n.1.conv` or `n.2.conv`)."""
    keys = list(keys)
    out = {}

    def entries(prefix):
        return sorted({int(m.group(1)) for k in keys if (m := re.match(rf"{prefix}\.(\d+)\.", k))})

    def inside(rest: str) -> str:
        """Within a resnet (`0.<resnet key>`) or an attention (`1.<key>`)."""
        for old, new in RESNET.items():
            if rest.startswith(old + "."):
                return new + rest[len(old):]
        return rest

    where = {}   # "input_blocks.n" -> (diffusers prefix of its resnet, of its attention) or the downsampler's
    level, r = 0, 0
    for n in entries("input_blocks"):
        if n == 0:
            continue
        if any(k.startswith(f"input_blocks.{n}.0.op.") for k in keys):
            where[f"input_blocks.{n}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            level, r = level + 1, 0
            continue
        where[f"input_blocks.{n}.0"] = f"down_blocks.{level}.resnets.{r}"
        where[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{r}"
        r += 1
    where.update({"middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
                  "middle_block.2": "mid_block.resnets.1"})
    level, r = 0, 0
    for n in entries("output_blocks"):
        where[f"output_blocks.{n}.0"] = f"up_blocks.{level}.resnets.{r}"
        where[f"output_blocks.{n}.1"] = f"up_blocks.{level}.attentions.{r}"
        r += 1
        for c in (1, 2):
            if any(k.startswith(f"output_blocks.{n}.{c}.conv.") for k in keys):
                where[f"output_blocks.{n}.{c}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
                level, r = level + 1, 0
    where.update(TOP)
    for k in keys:
        # the longest LDM prefix that names a module (upsampler `n.1.conv` before attention `n.1`)
        best = max((p for p in where if k.startswith(p + ".")), key=len)
        rest = k[len(best) + 1:]
        is_resnet = ".resnets." in where[best]
        out[k] = f"{where[best]}.{inside(rest) if is_resnet else rest}"
    return out


def with_middle(shapes: dict) -> dict:
    """sdxl_shapes with an SDXL middle block of one transformer block (ResBlock, SpatialTransformer, ResBlock), as
    nunchaku's UNet always has one: the shapes of the last input level's second ResBlock and first transformer."""
    keys = list(shapes)
    last = max(int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.1\.", k)))
    first = last - 1 if any(k.startswith(f"input_blocks.{last - 1}.1.") for k in keys) else last
    out = dict(shapes)
    for k, s in shapes.items():
        if k.startswith(f"input_blocks.{last}.0."):
            rest = k[len(f"input_blocks.{last}.0."):]
            out[f"middle_block.0.{rest}"] = out[f"middle_block.2.{rest}"] = s
        if k.startswith(f"input_blocks.{first}.1.") and ".transformer_blocks." not in k \
                or k.startswith(f"input_blocks.{first}.1.transformer_blocks.0."):
            out[f"middle_block.1.{k[len(f'input_blocks.{first}.1.'):]}"] = s
    return out


def one_block_per_attention(shapes: dict) -> dict:
    """The same UNet with only transformer block 0 in each attention: every mapping rule, a fifth of the codes."""
    return {k: s for k, s in shapes.items() if not re.search(r"\.transformer_blocks\.[1-9]\d*\.", k)}


# ---- the file -------------------------------------------------------------------------------------------------

@dataclass
class Expect:
    kind: str                        # "w4a4" | "plain"
    source: str                      # the file's layer or key
    rows: Optional[slice] = None     # w4a4: this ComfyUI Linear's rows of the file's layer
    bias: bool = False


class Builder:
    """A Nunchaku SDXL file for the LDM `shapes` (any sdxl_shapes-style dict whose transformer blocks are a
    multiple of 128 wide). rank R; naming "cpp" (published) or "python"."""

    def __init__(self, shapes: dict, precision: str = "int4", rank: int = 32, seed: int = 0, naming: str = "cpp",
                 plain_dtype=torch.bfloat16):
        self.shapes, self.precision, self.R, self.naming = shapes, precision, rank, naming
        self.plain_dtype = plain_dtype
        self.g = torch.Generator().manual_seed(seed)
        self.tensors: dict[str, torch.Tensor] = {}
        self.layers: dict[str, SimpleNamespace] = {}     # file's W4A4 layer -> its logical pieces
        self.expected: dict[str, Expect] = {}            # ComfyUI key or Linear name -> what it must read as
        self.names = diffusers_names(shapes)

    def _plain(self, key: str, shape) -> torch.Tensor:
        """Weights N(0, 0.02); biases N(0, 0.02) and norm scales 1 + N(0, 0.02), so that no two tensors are alike
        and a random model stays finite through the UNet."""
        t = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=self.g)
        if len(shape) == 1 and key.endswith(".weight"):
            t += 1
        return t.to(self.plain_dtype)

    def _svdquant(self, name: str, N: int, K: int, bias: bool) -> None:
        int4 = self.precision == "int4"
        G = 64 if int4 else 16
        if int4:
            codes = torch.randint(-8, 8, (N, K), generator=self.g, dtype=torch.int8)
            ws = (torch.rand(N, K // G, generator=self.g) * 0.002 + 0.003).to(torch.bfloat16)
            wtscale = wcscales = None
        else:
            codes = torch.randint(0, 16, (N, K), generator=self.g, dtype=torch.int8)
            ws = (torch.rand(N, K // G, generator=self.g) * 2 + 0.25).to(torch.float8_e4m3fn)
            wtscale = torch.tensor([0.0123], dtype=torch.bfloat16)
            wcscales = (torch.rand(N, generator=self.g) + 0.5).to(torch.bfloat16)
        layer = SimpleNamespace(
            precision=self.precision, codes=codes, wscales=ws, wtscale=wtscale, wcscales=wcscales,
            smooth=(torch.rand(K, generator=self.g) + 0.5).to(torch.bfloat16),
            smooth_orig=(torch.rand(K, generator=self.g) + 0.5).to(torch.bfloat16),
            proj_down=(torch.randn(K, self.R, generator=self.g) * 0.05).to(torch.bfloat16),
            proj_up=(torch.randn(N, self.R, generator=self.g) * 0.05).to(torch.bfloat16),
            bias=(torch.randn(N, generator=self.g) * 0.02).to(torch.bfloat16) if bias else None)
        self.layers[name] = layer
        self.tensors.update(svdquant_tensors(name, layer, self.naming))

    def build(self) -> "Builder":
        fused = {}   # LDM attn1 prefix -> (N, K)
        for key, shape in self.shapes.items():
            m = re.match(r"(.*\.transformer_blocks\.\d+)\.(attn1\.to_[qkv]|attn1\.to_out\.0|attn2\.to_q|"
                         r"attn2\.to_out\.0|ff\.net\.0\.proj|ff\.net\.2)\.(weight|bias)$", key)
            if not m:
                self.tensors[self.names[key]] = self._plain(key, shape)
                self.expected[key] = Expect("plain", self.names[key])
                continue
            block, linear, what = m.groups()
            if what == "bias":
                continue
            fblock = self.names[key][: -len(f".{linear}.weight")]
            if linear.startswith("attn1.to_") and linear != "attn1.to_out.0":
                fused[block] = (fblock, shape[1])
                continue
            name = f"{fblock}.{linear}"
            has_bias = f"{block}.{linear}.bias" in self.shapes
            self._svdquant(name, shape[0], shape[1], has_bias)
            self.expected[f"{block}.{linear}"] = Expect("w4a4", name, slice(0, shape[0]), has_bias)
        for block, (fblock, D) in fused.items():
            self._svdquant(f"{fblock}.attn1.to_qkv", 3 * D, D, bias=False)
            for i, p in enumerate("qkv"):
                self.expected[f"{block}.attn1.to_{p}"] = Expect("w4a4", f"{fblock}.attn1.to_qkv",
                                                                slice(i * D, (i + 1) * D))
        return self

    def expected_value(self, key: str):
        """("plain", tensor) or ("w4a4", W_eff, bias or None, |main| + |U|·|D|ᵀ), float64, for one ComfyUI key."""
        e = self.expected[key]
        if e.kind == "plain":
            return "plain", self.tensors[e.source]
        layer = self.layers[e.source]
        G = 64 if self.precision == "int4" else 16
        values = layer.codes.double() if self.precision == "int4" else E2M1[layer.codes.long()]
        out_scale = 1.0 if self.precision == "int4" else (layer.wtscale.double() * layer.wcscales.double())[:, None]
        main = (out_scale * values * layer.wscales.double().repeat_interleave(G, 1)
                / layer.smooth.double()[None, :])[e.rows]
        up, down = layer.proj_up.double()[e.rows], layer.proj_down.double()
        bias = layer.bias.double()[e.rows] if e.bias else None
        return "w4a4", main + up @ down.T, bias, main.abs() + up.abs() @ down.abs().T

    def metadata(self) -> dict[str, str]:
        qc = quantization_config(self.precision, self.R)
        config = {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time",
                  "cross_attention_dim": fm.SDXL_CONTEXT, "use_linear_projection": True}   # not read by the reader
        return {"config": json.dumps(config), "model_class": "NunchakuSDXLUNet2DConditionModel",
                "quantization_config": json.dumps(qc)}

    def write(self, path, tensors: Optional[dict] = None, metadata: Optional[dict] = None):
        oracle.write(path, self.tensors if tensors is None else tensors,
                     self.metadata() if metadata is None else metadata)
        return path
