"""Nunchaku's SDXL UNet files (`svdq-int4_r32-sdxl.safetensors`, `svdq-int4_r32-sdxl-turbo.safetensors`), read into
the names of ComfyUI's own SDXL UNet (comfy/ldm/modules/diffusionmodules/openaimodel.py, the LDM names of
`model.diffusion_model.*`): {ComfyUI key: SVDQuantLayer | torch.Tensor} plus the precision.

What the file is, from nunchaku's loader (nunchaku/models/unets/unet_sdxl.py, NunchakuSDXLUNet2DConditionModel
.from_pretrained, at nunchaku-tech/nunchaku 3a3cc3d): diffusers' UNet2DConditionModel is built from the metadata
`config` (diffusers' UNet config JSON), every BasicTransformerBlock of every down, mid and up block is swapped for
NunchakuSDXLTransformerBlock, the file's keys go through `convert_sdxl_state_dict` (inside `.transformer_blocks.`:
lora_down -> proj_down, lora_up -> proj_up, smooth_orig -> smooth_factor_orig, smooth -> smooth_factor) and a
strict `load_state_dict`. So the file holds diffusers' UNet names, exactly the modules' own shapes (SVDQW4A4Linear
allocates [N, K/2], [K/G, N], ... and never pads), and FLUX.1's packings (FORMAT.md §4: the same SVDQW4A4Linear
and CUDA GEMM as every other Nunchaku model). `quantization_config` gives the rank (nunchaku reads only that).

Per transformer block (`{down_blocks.i | up_blocks.i | mid_block}.attentions.j.transformer_blocks.t.`), D its width:
    W4A4  attn1.to_qkv     -> attn1.to_q | attn1.to_k | attn1.to_v   [3D, D], no bias (nunchaku's fuse_linears keeps
          a bias only if all three have one; SDXL's have none). The row split is exact (nunchaku_dit.split_rows).
    W4A4  attn2.to_q       -> attn2.to_q                             [D, D], no bias (cross-attention: only q fused
          into nothing and quantized; its k and v read the 2048-wide text)
    16-bit attn2.to_k.weight, attn2.to_v.weight                      [D, 2048]: same names, never quantized
    W4A4  attn1.to_out.0, attn2.to_out.0 [D, D], ff.net.0.proj [2F, D] (GEGLU rows value | gate, the order ComfyUI's
          GEGLU chunks them in), ff.net.2 [D, F], each with its bias: same names. ff.net.2 is NOT σ-shifted
          (SDXL's FFN input is value·GELU(gate), signed; nunchaku builds every SDXL W4A4 layer with act_unsigned
          False), unlike Qwen-Image's `net.2`, so the stored bias is the effective bias.
    16-bit norm1, norm2, norm3 .weight/.bias: same names.
Around the blocks, 16-bit, ComfyUI's unet_to_diffusers mapping read backwards (comfy/utils.py; written here from the
structure, not copied), with the LDM indices counted as the LDM UNet builds its lists:
    conv_in -> input_blocks.0.0; time_embedding.linear_1/2 -> time_embed.0/2; add_embedding.linear_1/2 ->
    label_emb.0.0/2; conv_norm_out -> out.0; conv_out -> out.2
    down_blocks.i: each resnets.r then its attentions.r take the next input_blocks index n (n.0 and n.1), then
    downsamplers.0.conv takes the next (n.0.op); the index starts at 1
    mid_block: resnets.0 -> middle_block.0, attentions.0 -> middle_block.1, resnets.1 -> middle_block.2
    up_blocks.i: each resnets.r then its attentions.r take the next output_blocks index n (n.0 and n.1, from 0);
    upsamplers.0.conv -> n.1.conv or n.2.conv of the block's last index (2 when that one has an attention)
    inside a resnet: norm1 -> in_layers.0, conv1 -> in_layers.2, time_emb_proj -> emb_layers.1, norm2 ->
    out_layers.0, conv2 -> out_layers.3, conv_shortcut -> skip_connection; inside an attention: norm, proj_in,
    proj_out keep their names (SDXL's proj_in/out are Linears: use_linear_projection)
Every tensor must land somewhere: a tensor or quantized layer this mapping does not place is refused, naming it.

Ambiguities (no published file was at hand; all from nunchaku's code):
- Key naming: the published files carry the C++ suffixes inside the transformer blocks (`lora_down`, `lora_up`,
  `smooth`, `smooth_orig`): nunchaku's rename is the only way its strict load can succeed with them, and a Python-named
  `smooth_factor` would become `smooth_factor_factor` there and fail. We read both namings (formats/nunchaku.py tells
  them apart); nunchaku itself loads only the C++ one.
- Precision: nunchaku picks it from the GPU (get_precision), not from the file, and its SDXL tests skip FP4; only
  INT4 files are published. An NVFP4 file is read with FLUX.1's NVFP4 layout (unconfirmed); nunchaku's SVDQW4A4Linear
  keeps wtscale as a Python float outside its state dict, so such a file with a `wtscale` key would not load there.
- Metadata: nunchaku needs `config` and reads `quantization_config.rank`; the value of `model_class` in the published
  files is unknown. SDXL is recognised by model_class or config `_class_name` (`...SDXL...` or
  `UNet2DConditionModel`), else by the keys (`conv_in.weight` and `down_blocks.*` transformer layers).
- Convolutions are 16-bit: unet_sdxl.py defines shifted-conv modules but says "_patch_resnets_convs is not used";
  forks that quantize them (other keys) are refused by the leftover check.
- `smooth_orig`: nunchaku's strict load needs it in every W4A4 layer, so published files have it; it is unused at run
  time and not required here.
- 16-bit dtype: nunchaku casts every tensor to its torch_dtype (bf16 by default) when it loads; we keep the file's
  (bf16 or fp16).
- Widths: nunchaku's GEMM needs N and K multiples of 128 (and never pads), which SDXL's 640/1280-wide blocks are;
  an SDXL whose transformer blocks are 320 wide cannot be written in this format.
"""
from __future__ import annotations

import re
from dataclasses import replace

from .nunchaku import CheckpointError, NunchakuCheckpoint, natural_key
from .nunchaku_dit import INCOMPLETE, DiTCheckpoint, split_rows

SDXL = "sdxl"
WHAT = "Nunchaku SDXL"

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"))
RESNET_OPTIONAL = (("conv_shortcut", "skip_connection"),)      # when the block changes the channel count
ATTENTION = ("norm", "proj_in", "proj_out")
TOP = (("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
       ("time_embedding.linear_2", "time_embed.2"), ("add_embedding.linear_1", "label_emb.0.0"),
       ("add_embedding.linear_2", "label_emb.0.2"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"))
# Quantized layers of a transformer block: (Nunchaku name, ComfyUI names of its equal row chunks, has a bias,
# [N, K] in units of (D, F)).
BLOCK_LAYERS = (
    ("attn1.to_qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v"), False),
    ("attn1.to_out.0", ("attn1.to_out.0",), True),
    ("attn2.to_q", ("attn2.to_q",), False),
    ("attn2.to_out.0", ("attn2.to_out.0",), True),
    ("ff.net.0.proj", ("ff.net.0.proj",), True),
    ("ff.net.2", ("ff.net.2",), True),
)
BLOCK_PLAIN = ("attn2.to_k.weight", "attn2.to_v.weight") + tuple(f"norm{i}.{s}" for i in (1, 2, 3)
                                                                 for s in ("weight", "bias"))


def is_nunchaku_sdxl(ckpt: NunchakuCheckpoint) -> bool:
    """An SDXL UNet file, from model_class / config._class_name, else from its keys."""
    for name in (ckpt.model_class, ckpt.config.get("_class_name")):
        flat = re.sub(r"[^a-z0-9]", "", str(name or "").lower())
        if "sdxl" in flat or "unet2dcondition" in flat:
            return True
    names = set(ckpt.svdquant_layer_names()) | set(ckpt.plain_tensor_names())
    return "conv_in.weight" in names and any(n.startswith("down_blocks.") and ".transformer_blocks." in n
                                             for n in names)


def _indices(names, prefix: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for n in names if (m := pat.match(n))})


class _Reader:
    def __init__(self, ckpt: NunchakuCheckpoint):
        self.ck = ckpt
        self.svdq, self.plain = set(ckpt.svdquant_layer_names()), set(ckpt.plain_tensor_names())
        self.names = self.svdq | self.plain | set(ckpt.w4a16_layer_names())
        self.state: dict = {}
        self.file_keys: dict = {}
        self.used: set = set()

    def missing(self, key: str, where: str) -> CheckpointError:
        return CheckpointError(f"{self.ck.path}: {key} is missing; every {where} of a {WHAT} file has it; "
                               f"{INCOMPLETE}")

    def _put(self, key: str, value, source: str) -> None:
        if key in self.state:
            raise CheckpointError(f"{self.ck.path}: {source} and {self.file_keys[key]} both map to ComfyUI's {key}")
        self.state[key], self.file_keys[key] = value, source

    def tensor(self, fkey: str, ckey: str, where: str) -> None:
        if fkey not in self.plain:
            raise self.missing(fkey, where)
        self.used.add(fkey)
        self._put(ckey, self.ck.plain_tensor(fkey), fkey)

    def module(self, fprefix: str, cprefix: str, where: str, required: bool = True) -> None:
        """A 16-bit module's weight and bias under the ComfyUI prefix. Every convolution, norm and Linear mapped
        here has a bias in SDXL, and one ComfyUI loads without its bias would keep uninitialised memory (its loading
        only logs "unet missing"), so a missing one is refused."""
        if f"{fprefix}.weight" not in self.plain and not required:
            return
        self.tensor(f"{fprefix}.weight", f"{cprefix}.weight", where)
        self.tensor(f"{fprefix}.bias", f"{cprefix}.bias", where)

    def quantized(self, name: str, comfy: tuple, bias: bool, want_nk: tuple) -> None:
        if name not in self.svdq:
            if f"{name}.weight" in self.plain:
                raise CheckpointError(f"{self.ck.file_of(f'{name}.weight')}: {name} is a 16-bit Linear; nunchaku "
                                      f"quantizes it in every SDXL transformer block; {INCOMPLETE}")
            raise self.missing(f"{name}.qweight", "transformer block")
        self.used.add(name)
        # nunchaku builds every SDXL layer signed (act_unsigned False), whatever formats/nunchaku.py guesses from
        # the name (`ff.net.2` is shifted in Qwen-Image's FeedForward)
        q = replace(self.ck.svdquant_layer(name), shifted=False)
        if (q.N, q.K) != want_nk:
            raise CheckpointError(f"{self.ck.file_of(name)}: {name} is a [N, K] = {[q.N, q.K]} layer, expected "
                                  f"{list(want_nk)} (ComfyUI's SDXL Linear; Nunchaku's SDXL files are never padded)")
        if bias and q.bias is None:
            raise CheckpointError(f"{self.ck.file_of(name)}: {name}.bias is missing: ComfyUI's SDXL has a bias "
                                  f"there and nunchaku's layer has one; {INCOMPLETE}")
        if not bias and q.bias is not None:
            raise CheckpointError(f"{self.ck.file_of(name)}: {name}.bias is present, but SDXL's {comfy[0]} has no "
                                  f"bias (nor does nunchaku's layer, which would refuse the key)")
        for part, cname in zip(split_rows(q, len(comfy)), comfy):
            self._put(cname, part, name)


def _plain_shape(ck: NunchakuCheckpoint, key: str) -> tuple:
    """[N, K] of a 16-bit Linear weight, from the header."""
    s = ck.layer_summary(key)
    if s["N"] is None:
        raise CheckpointError(f"{ck.file_of(key)}: {key} is not a 2-D Linear weight; SDXL's is [N, K]")
    return (s["N"], s["K"])


def _transformer(r: _Reader, fprefix: str, cprefix: str) -> None:
    """One attention (Transformer2DModel / SpatialTransformer) with its transformer blocks."""
    for n in ATTENTION:
        r.module(f"{fprefix}.{n}", f"{cprefix}.{n}", "attention")
    key = f"{fprefix}.proj_in.weight"
    N, K = _plain_shape(r.ck, key)
    if N != K:
        raise CheckpointError(f"{r.ck.file_of(key)}: {key} has shape {[N, K]}, expected a square Linear [D, D] "
                              f"(SDXL's proj_in, use_linear_projection)")
    D = N
    blocks = _indices(r.names, f"{fprefix}.transformer_blocks")
    if not blocks:
        raise r.missing(f"{fprefix}.transformer_blocks.0.attn1.to_qkv.qweight", "attention")
    for t in blocks:
        fb, cb = f"{fprefix}.transformer_blocks.{t}", f"{cprefix}.transformer_blocks.{t}"
        ff_in = f"{fb}.ff.net.0.proj"
        F = (r.ck.layer_summary(ff_in)["N"] // 2) if ff_in in r.svdq else 4 * D
        want = {"attn1.to_qkv": (3 * D, D), "attn1.to_out.0": (D, D), "attn2.to_q": (D, D),
                "attn2.to_out.0": (D, D), "ff.net.0.proj": (2 * F, D), "ff.net.2": (D, F)}
        for nname, comfy, bias in BLOCK_LAYERS:
            r.quantized(f"{fb}.{nname}", tuple(f"{cb}.{c}" for c in comfy), bias, want[nname])
        for k in BLOCK_PLAIN:
            r.tensor(f"{fb}.{k}", f"{cb}.{k}", "transformer block")
        for k in ("attn2.to_k.weight", "attn2.to_v.weight"):
            N, _ = _plain_shape(r.ck, f"{fb}.{k}")
            if N != D:
                raise CheckpointError(f"{r.ck.file_of(f'{fb}.{k}')}: {fb}.{k} has {N} rows, expected {D} (the "
                                      f"block's width, from {key})")


def _resnet(r: _Reader, fprefix: str, cprefix: str) -> None:
    for f, c in RESNET:
        r.module(f"{fprefix}.{f}", f"{cprefix}.{c}", "resnet")
    for f, c in RESNET_OPTIONAL:
        r.module(f"{fprefix}.{f}", f"{cprefix}.{c}", "resnet", required=False)


def _read(r: _Reader) -> None:
    for f, c in TOP:
        r.module(f, c, "model")
    n = 1
    for b in _indices(r.names, "down_blocks"):
        p = f"down_blocks.{b}"
        attentions = set(_indices(r.names, f"{p}.attentions"))
        for i in _indices(r.names, f"{p}.resnets"):
            _resnet(r, f"{p}.resnets.{i}", f"input_blocks.{n}.0")
            if i in attentions:
                _transformer(r, f"{p}.attentions.{i}", f"input_blocks.{n}.1")
                attentions.discard(i)
            n += 1
        if attentions:
            raise CheckpointError(f"{r.ck.path}: {p}.attentions.{min(attentions)} has no resnet of the same index; "
                                  f"diffusers' down blocks pair them; {INCOMPLETE}")
        if f"{p}.downsamplers.0.conv.weight" in r.plain:
            r.module(f"{p}.downsamplers.0.conv", f"input_blocks.{n}.0.op", "down block")
            n += 1
    if any(k.startswith("mid_block.") for k in r.names):
        _resnet(r, "mid_block.resnets.0", "middle_block.0")
        if _indices(r.names, "mid_block.attentions"):
            _transformer(r, "mid_block.attentions.0", "middle_block.1")
        _resnet(r, "mid_block.resnets.1", "middle_block.2")
    n = 0
    for b in _indices(r.names, "up_blocks"):
        p = f"up_blocks.{b}"
        attentions = set(_indices(r.names, f"{p}.attentions"))
        last_has_attention = False
        for i in _indices(r.names, f"{p}.resnets"):
            _resnet(r, f"{p}.resnets.{i}", f"output_blocks.{n}.0")
            last_has_attention = i in attentions
            if last_has_attention:
                _transformer(r, f"{p}.attentions.{i}", f"output_blocks.{n}.1")
                attentions.discard(i)
            n += 1
        if attentions:
            raise CheckpointError(f"{r.ck.path}: {p}.attentions.{min(attentions)} has no resnet of the same index; "
                                  f"diffusers' up blocks pair them; {INCOMPLETE}")
        if f"{p}.upsamplers.0.conv.weight" in r.plain:
            r.module(f"{p}.upsamplers.0.conv", f"output_blocks.{n - 1}.{2 if last_has_attention else 1}.conv",
                     "up block")


def read_nunchaku_sdxl(ckpt: NunchakuCheckpoint) -> DiTCheckpoint:
    """The open Nunchaku SDXL checkpoint in ComfyUI's SDXL UNet names, every W4A4 layer unpacked (family "sdxl").
    Raises CheckpointError naming the file, the key and what was expected."""
    if not is_nunchaku_sdxl(ckpt):
        raise CheckpointError(f"{ckpt.path}: not a Nunchaku SDXL checkpoint (model_class {ckpt.model_class!r}, "
                              f"config _class_name {ckpt.config.get('_class_name')!r}, no conv_in / down_blocks)")
    w4a16 = ckpt.w4a16_layer_names()
    if w4a16:
        raise CheckpointError(f"{ckpt.file_of(w4a16[0])}: {w4a16[0]} is a W4A16 layer; Nunchaku's SDXL files have "
                              f"only W4A4 layers (SDXL has no adaLN)")
    r = _Reader(ckpt)
    _read(r)
    left = sorted((r.svdq | r.plain) - r.used, key=natural_key)
    if left:
        raise CheckpointError(f"{ckpt.path}: {len(left)} tensors or layers have no place in ComfyUI's SDXL UNet "
                              f"(first: {left[:4]}); expected diffusers' UNet2DConditionModel names with nunchaku's "
                              f"quantized transformer blocks")
    return DiTCheckpoint(SDXL, ckpt.precision, r.state, r.file_keys)
