"""Nunchaku's v1 checkpoints of the DiTs beyond FLUX.1 (Qwen-Image and its Edit variants; Z-Image), read into
ComfyUI's own key names: {ComfyUI key: SVDQuantLayer | W4A16Layer | torch.Tensor} plus the precision.

The files are what nunchaku (nunchaku/models/transformers/transformer_qwenimage.py, transformer_zimage.py) loads
with a strict `load_state_dict` into diffusers' model after swapping in its quantized modules, so they hold
diffusers' names with the Python key naming of FORMAT.md §2 (`qweight`, `wscales`, `smooth_factor`,
`smooth_factor_orig`, `proj_down`, `proj_up`, `bias`, NVFP4 `wtscale` / `wcscales`; W4A16 `qweight`, `wscales`,
`wzeros`, `bias`) and the packings of FORMAT.md §3-4, unchanged from FLUX.1's. Shapes are the layer's own: nunchaku's
SVDQW4A4Linear / AWQW4A16Linear allocate exactly [out, in/2], [in/G, out], ... and never pad (FLUX.1's C++ files
pad to 128), so every quantized layer here must have exactly the dimensions of ComfyUI's Linear.
Metadata: `config` (diffusers transformer config JSON), `model_class` (NunchakuQwenImageTransformer2DModel /
NunchakuZImageTransformer2DModel), `quantization_config` (FORMAT.md §2; Z-Image adds "skip_refiners"),
`comfy_config` (copied from the repository, not read here). Nothing is parsed from file names.

Layer roles and the mapping, per family (tables below; "rows a | b" = the Nunchaku layer's output rows split in
order, exact: each part keeps its rows of codes, wscales, proj_up, bias, wcscales and shares smooth, proj_down,
wtscale, so every part computes exactly its rows of the fused layer's output):

Qwen-Image (ComfyUI comfy/ldm/qwen_image/model.py keeps diffusers' names), block `transformer_blocks.{i}.`:
    W4A4  attn.to_qkv          -> attn.to_q | attn.to_k | attn.to_v            [3D, D], with bias
    W4A4  attn.add_qkv_proj    -> attn.add_q_proj | add_k_proj | add_v_proj    [3D, D], with bias
    W4A4  attn.to_out.0, attn.to_add_out, {img,txt}_mlp.net.0.proj [F, D], {img,txt}_mlp.net.2 [D, F]: same name;
          net.2 is σ-shifted in INT4 files (nunchaku's NunchakuFeedForward sets act_unsigned on net[2])
    W4A16 img_mod.1, txt_mod.1 [6D, D]: same name; rows interleaved by 6 and the +1 of the two scale chunks folded
          into the bias, as FLUX.1's norm1.linear (nunchaku builds the block with scale_shift=0 and de-interleaves
          with view(B, -1, 6).transpose(1, 2)); ComfyUI's block adds the 1 itself, so both are undone here
    bf16  attn.norm_q / norm_k / norm_added_q / norm_added_k .weight, and every tensor outside the blocks:
          same names (img_in, txt_norm, txt_in, time_text_embed.timestep_embedder.linear_{1,2}, norm_out.linear,
          proj_out; norm_out keeps diffusers' (scale, shift) order, which ComfyUI's LastLayer shares)

Z-Image (ComfyUI comfy/ldm/lumina/model.py NextDiT; the renames are those of ComfyUI's own z_image_to_diffusers),
blocks `layers.{i}.`, `noise_refiner.{i}.`, `context_refiner.{i}.`:
    W4A4  attention.to_qkv     -> attention.qkv                                [3D, D], no bias (fused on both sides)
    W4A4  attention.to_out.0   -> attention.out                                [D, D]
    W4A4  feed_forward.net.0.proj -> feed_forward.w3 | feed_forward.w1         [2F, D]: nunchaku turns Z-Image's
          w2(silu(w1·x) * w3·x) into diffusers' SwiGLU, whose projection's first half is the value (w3) and second
          half the gate (w1)
    W4A4  feed_forward.net.2   -> feed_forward.w2                              [D, F], not shifted (SiLU-gated input)
    bf16  attention.norm_q / norm_k .weight -> attention.q_norm / k_norm .weight; attention_norm1/2, ffn_norm1/2,
          adaLN_modulation.0 (the modulation stays 16-bit in Z-Image files): same names
    refiners of a "skip_refiners" file are 16-bit in diffusers' form: attention.to_q | to_k | to_v .weight
          -> attention.qkv.weight (rows concatenated), attention.to_out.0.weight -> attention.out.weight,
          feed_forward.net.0.proj.weight -> w3 | w1 (rows split), feed_forward.net.2.weight -> w2
    top level: all_x_embedder.2-1.* -> x_embedder.*, all_final_layer.2-1.* -> final_layer.*; t_embedder.mlp.*,
          cap_embedder.*, x_pad_token, cap_pad_token: same names

Both families exist in ComfyUI 0.3.75 and 0.33 (QwenImage; ZImage as a Lumina2 NextDiT with z_image_modulation).
Plain tensors the tables do not name are passed on under their own name (ComfyUI's loading reports any it has no
place for); a quantized layer the tables do not name is refused.

Unconfirmed (no published file was at hand; the names and layouts come from nunchaku's and ComfyUI-nunchaku's
loaders and one published key listing of a Qwen-Image-Edit r128 INT4 block):
- NVFP4 Qwen-Image / Z-Image files: assumed FLUX.1's NVFP4 layout (float8 wscales [K/16, N], optional wtscale,
  wcscales bf16 [N]); nunchaku's loader fills a missing wcscales with ones and a missing wtscale with 1.
- That the σ-shift compensation is in the bias of Qwen-Image's net.2 as in FLUX.1 (the runtime is the same kernel
  pair, fused_gelu_mlp, so the stored bias means the same thing whatever produced it).
- Z-Image's `all_x_embedder` / `all_final_layer` key "2-1" (patch 2, frame patch 1): the only one Z-Image has; any
  other is refused. A Z-Image whose n_kv_heads differs from n_heads would have qkv N ≠ 3D: refused.
- Qwen-Image-Edit-2511 files (if Nunchaku publishes them) carry no `__index_timestep_zero__` marker, which ComfyUI
  0.33's detection needs to pick 2511's reference method; they would load as 2509.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

from ..layer import SVDQuantLayer, W4A16Layer
from .nunchaku import CheckpointError, NunchakuCheckpoint, natural_key

QWEN_IMAGE = "qwen_image"
ZIMAGE = "zimage"

INCOMPLETE = "the file is incomplete or was written by a broken converter; re-download or re-quantize it"

# Quantized layers of a block: (Nunchaku name, kind, ComfyUI names of its equal row chunks, in order).
QWEN_LAYERS = (
    ("attn.to_qkv", "w4a4", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("attn.add_qkv_proj", "w4a4", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("attn.to_out.0", "w4a4", ("attn.to_out.0",)),
    ("attn.to_add_out", "w4a4", ("attn.to_add_out",)),
    ("img_mlp.net.0.proj", "w4a4", ("img_mlp.net.0.proj",)),
    ("img_mlp.net.2", "w4a4", ("img_mlp.net.2",)),
    ("txt_mlp.net.0.proj", "w4a4", ("txt_mlp.net.0.proj",)),
    ("txt_mlp.net.2", "w4a4", ("txt_mlp.net.2",)),
    ("img_mod.1", "w4a16", ("img_mod.1",)),
    ("txt_mod.1", "w4a16", ("txt_mod.1",)),
)
ZIMAGE_LAYERS = (
    ("attention.to_qkv", "w4a4", ("attention.qkv",)),
    ("attention.to_out.0", "w4a4", ("attention.out",)),
    ("feed_forward.net.0.proj", "w4a4", ("feed_forward.w3", "feed_forward.w1")),
    ("feed_forward.net.2", "w4a4", ("feed_forward.w2",)),
)
# 16-bit forms of the same Linears (Z-Image refiners of a skip_refiners file): (Nunchaku keys, ComfyUI keys).
# Several file keys: rows concatenated; several ComfyUI keys: rows split equally.
ZIMAGE_PLAIN_LAYERS = {
    "attention.to_qkv": (("attention.to_q.weight", "attention.to_k.weight", "attention.to_v.weight"),
                         ("attention.qkv.weight",)),
    "attention.to_out.0": (("attention.to_out.0.weight",), ("attention.out.weight",)),
    "feed_forward.net.0.proj": (("feed_forward.net.0.proj.weight",),
                                ("feed_forward.w3.weight", "feed_forward.w1.weight")),
    "feed_forward.net.2": (("feed_forward.net.2.weight",), ("feed_forward.w2.weight",)),
}
# Plain tensors of a block: (Nunchaku key, ComfyUI key).
QWEN_BLOCK_TENSORS = tuple((f"attn.{n}.weight", f"attn.{n}.weight")
                           for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))
ZIMAGE_BLOCK_TENSORS = (("attention.norm_q.weight", "attention.q_norm.weight"),
                        ("attention.norm_k.weight", "attention.k_norm.weight"),
                        *((f"{n}.weight", f"{n}.weight")
                          for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2")))
ZIMAGE_MODULATION = (("adaLN_modulation.0.weight", "adaLN_modulation.0.weight"),
                     ("adaLN_modulation.0.bias", "adaLN_modulation.0.bias"))   # layers and noise_refiner only


def _linear_keys(*names: str) -> tuple:
    return tuple(f"{n}.{s}" for n in names for s in ("weight", "bias"))


# Tensors outside the blocks every file of the family has: (Nunchaku key, ComfyUI key).
QWEN_TOP = tuple((k, k) for k in ("txt_norm.weight",) + _linear_keys(
    "img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    "norm_out.linear", "proj_out"))
ZIMAGE_PATCH = "2-1"   # diffusers' ModuleDict key "{patch_size}-{f_patch_size}"; ComfyUI's NextDiT has one patch size
ZIMAGE_TOP = (
    *((f"all_x_embedder.{ZIMAGE_PATCH}.{s}", f"x_embedder.{s}") for s in ("weight", "bias")),
    *((f"all_final_layer.{ZIMAGE_PATCH}.{k}", f"final_layer.{k}")
      for k in _linear_keys("linear", "adaLN_modulation.1")),
    *((k, k) for k in ("cap_embedder.0.weight", "x_pad_token", "cap_pad_token")
      + _linear_keys("cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2")),
)
ZIMAGE_RENAMED_PREFIXES = ((f"all_x_embedder.{ZIMAGE_PATCH}.", "x_embedder."),
                           (f"all_final_layer.{ZIMAGE_PATCH}.", "final_layer."))

ZIMAGE_BLOCKS = ("layers", "noise_refiner", "context_refiner")

Entry = Union[SVDQuantLayer, W4A16Layer, torch.Tensor]


@dataclass
class DiTCheckpoint:
    """A Nunchaku non-FLUX DiT file in ComfyUI's names. `state`: ComfyUI Linear name -> SVDQuantLayer / W4A16Layer
    (a quantized Linear), or ComfyUI state-dict key -> tensor. `file_keys`: ComfyUI key -> the file's key(s) it
    came from, for messages."""

    family: str                  # QWEN_IMAGE | ZIMAGE
    precision: str               # "int4" | "nvfp4"
    state: dict
    file_keys: dict
    skip_refiners: bool = False  # Z-Image: refiners kept 16-bit


def family_of(ckpt: NunchakuCheckpoint) -> Optional[str]:
    """QWEN_IMAGE, ZIMAGE or None, from model_class / config._class_name (what nunchaku's loaders go by), else from
    the keys each family alone has."""
    for name in (ckpt.model_class, ckpt.config.get("_class_name")):
        flat = re.sub(r"[^a-z]", "", str(name or "").lower())
        if "qwenimage" in flat:
            return QWEN_IMAGE
        if "zimage" in flat:
            return ZIMAGE
    names = set(ckpt.svdquant_layer_names()) | set(ckpt.plain_tensor_names())
    if "txt_norm.weight" in names and any(n.startswith("transformer_blocks.") for n in names):
        return QWEN_IMAGE
    if "cap_embedder.1.weight" in names and any(n.startswith("layers.") for n in names):
        return ZIMAGE
    return None


def _block_indices(names, prefix: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for n in names if (m := pat.match(n))})


def split_rows(layer: Union[SVDQuantLayer, W4A16Layer], parts: int) -> list:
    """A layer's output rows cut into `parts` equal consecutive layers. SVDQuant: each part keeps its rows of codes,
    wscales, proj_up, bias, wcscales and shares smooth, smooth_orig, proj_down, wtscale (the activations and the
    low-rank down-projection do not depend on the output row), so part i computes exactly rows i of the whole."""
    if parts == 1:
        return [layer]
    n = layer.N // parts

    def rows(t, i):
        return None if t is None else t[i * n:(i + 1) * n].contiguous()

    if isinstance(layer, SVDQuantLayer):
        return [replace(layer, codes=rows(layer.codes, i), wscales=rows(layer.wscales, i),
                        proj_up=rows(layer.proj_up, i), bias=rows(layer.bias, i), wcscales=rows(layer.wcscales, i))
                for i in range(parts)]
    return [replace(layer, codes=rows(layer.codes, i), scales=rows(layer.scales, i), zeros=rows(layer.zeros, i),
                    bias=rows(layer.bias, i)) for i in range(parts)]


class _Reader:
    """One pass over an open checkpoint: every table row taken once, what is left checked at the end."""

    def __init__(self, ckpt: NunchakuCheckpoint, family: str):
        self.ck, self.family = ckpt, family
        self.svdq, self.w4a16 = set(ckpt.svdquant_layer_names()), set(ckpt.w4a16_layer_names())
        self.plain = set(ckpt.plain_tensor_names())
        self.state: dict = {}
        self.file_keys: dict = {}
        self.used: set = set()
        self.what = {QWEN_IMAGE: "Qwen-Image", ZIMAGE: "Z-Image"}[family]

    def _put(self, key: str, value: Entry, source: str) -> None:
        if key in self.state:
            raise CheckpointError(f"{self.ck.path}: {source} and {self.file_keys[key]} both map to ComfyUI's {key}")
        self.state[key], self.file_keys[key] = value, source

    def tensor(self, key: str, where: str = "model") -> torch.Tensor:
        if key not in self.plain:
            raise self.missing(key, where)
        self.used.add(key)
        return self.ck.plain_tensor(key)

    def missing(self, key: str, where: str) -> CheckpointError:
        return CheckpointError(f"{self.ck.path}: {key} is missing; every "
                               f"{where} of a Nunchaku {self.what} file has it; {INCOMPLETE}")

    def shape_error(self, key: str, got, want: str) -> CheckpointError:
        return CheckpointError(f"{self.ck.file_of(key)}: {key} is a [N, K] = {list(got)} layer, expected {want} "
                               f"(ComfyUI's {self.what} Linear; Nunchaku's Python files are never padded)")

    def layer(self, name: str, kind: str, want_nk: tuple, need_bias: bool):
        """The unpacked layer `name`, checked to be [N, K] = want_nk (rows of the whole fused layer)."""
        self.used.add(name)
        q = self.ck.svdquant_layer(name) if kind == "w4a4" else self.ck.w4a16_layer(name)
        if (q.N, q.K) != want_nk:
            raise self.shape_error(name, (q.N, q.K), f"{list(want_nk)}")
        if need_bias and q.bias is None:
            raise CheckpointError(f"{self.ck.file_of(name)}: {name}.bias is missing: ComfyUI's {self.what} has a "
                                  f"bias there and Nunchaku's layer has one; {INCOMPLETE}")
        return q

    def quantized(self, block: str, nname: str, kind: str, comfy: tuple, want_nk: tuple, need_bias: bool) -> None:
        name = f"{block}.{nname}"
        if (name not in self.svdq) if kind == "w4a4" else (name not in self.w4a16):
            other = "an SVDQuant (W4A4)" if name in self.svdq else "a W4A16" if name in self.w4a16 else None
            if other:
                raise CheckpointError(f"{self.ck.file_of(name)}: {name} is {other} layer, expected "
                                      f"{'W4A4' if kind == 'w4a4' else 'W4A16'} in a Nunchaku {self.what} file")
            raise self.missing(f"{name}.qweight", "block")
        q = self.layer(name, kind, want_nk, need_bias)
        for part, cname in zip(split_rows(q, len(comfy)), comfy):
            self._put(f"{block}.{cname}", part, name)

    def plain_rows(self, block: str, file_keys: tuple, comfy_keys: tuple, want: tuple) -> None:
        """16-bit weights: several file keys concatenated by rows, or one split by rows; `want` the ComfyUI
        weight's [N, K] summed over the ComfyUI keys."""
        ts = [self.tensor(f"{block}.{k}", "16-bit refiner block") for k in file_keys]
        whole = torch.cat(ts) if len(ts) > 1 else ts[0]
        if tuple(whole.shape) != want:
            shapes = " + ".join(str(list(t.shape)) for t in ts)
            raise CheckpointError(f"{self.ck.file_of(f'{block}.{file_keys[0]}')}: {block}.{file_keys[0]}"
                                  f"{' ...' if len(ts) > 1 else ''} has shape {shapes}, expected {list(want)} in total")
        for part, ck in zip(whole.chunk(len(comfy_keys)), comfy_keys):
            self._put(f"{block}.{ck}", part.contiguous(), " + ".join(f"{block}.{k}" for k in file_keys))

    def renamed(self, fkey: str, ckey: str) -> None:
        self._put(ckey, self.tensor(fkey), fkey)

    def hidden(self, key: str) -> int:
        if key not in self.plain:
            raise self.missing(key, "model")
        t = self.ck.plain_tensor(key)
        if t.dim() != 2:
            raise CheckpointError(f"{self.ck.file_of(key)}: {key} has shape {list(t.shape)}, expected a Linear "
                                  f"weight [hidden, in]")
        return t.shape[0]

    def leftovers(self) -> None:
        quantized = sorted((self.svdq | self.w4a16) - self.used, key=natural_key)
        if quantized:
            raise CheckpointError(f"{self.ck.path}: {len(quantized)} quantized layers have no place in ComfyUI's "
                                  f"{self.what} model (first: {quantized[:4]}); is this a {self.what} checkpoint?")
        for key in sorted(self.plain - self.used, key=natural_key):   # ComfyUI reports what it has no place for
            ckey = key
            if self.family == ZIMAGE:
                for old, new in ZIMAGE_RENAMED_PREFIXES:
                    if key.startswith(old):
                        ckey = new + key[len(old):]
            self._put(ckey, self.tensor(key), key)


def _ffn_width(r: _Reader, key: str, fused: int) -> Optional[int]:
    """F, the MLP width, from a block's first MLP layer (its N is fused·F), or None when the file lacks it."""
    if key in r.svdq:
        return r.ck.layer_summary(key)["N"] // fused
    if f"{key}.weight" in r.plain:
        return r.ck.layer_summary(f"{key}.weight")["N"] // fused
    return None


def _read_qwen_image(r: _Reader) -> None:
    D = r.hidden("img_in.weight")
    blocks = _block_indices(r.svdq | r.w4a16 | r.plain, "transformer_blocks")
    if not blocks:
        raise r.missing("transformer_blocks.0.attn.to_qkv.qweight", "model")
    F = _ffn_width(r, f"transformer_blocks.{blocks[0]}.img_mlp.net.0.proj", 1) or 4 * D
    want = {"attn.to_qkv": (3 * D, D), "attn.add_qkv_proj": (3 * D, D), "attn.to_out.0": (D, D),
            "attn.to_add_out": (D, D), "img_mlp.net.0.proj": (F, D), "txt_mlp.net.0.proj": (F, D),
            "img_mlp.net.2": (D, F), "txt_mlp.net.2": (D, F), "img_mod.1": (6 * D, D), "txt_mod.1": (6 * D, D)}
    for i in blocks:
        b = f"transformer_blocks.{i}"
        for nname, kind, comfy in QWEN_LAYERS:
            r.quantized(b, nname, kind, comfy, want[nname], need_bias=True)
        for fkey, ckey in QWEN_BLOCK_TENSORS:
            r.renamed(f"{b}.{fkey}", f"{b}.{ckey}")
    for fkey, ckey in QWEN_TOP:
        r.renamed(fkey, ckey)


def _read_zimage(r: _Reader) -> bool:
    """Returns skip_refiners (the refiners are 16-bit)."""
    D = r.hidden(f"all_x_embedder.{ZIMAGE_PATCH}.weight")
    names = r.svdq | r.plain
    layers = _block_indices(names, "layers")
    if not layers:
        raise r.missing("layers.0.attention.to_qkv.qweight", "model")
    F = _ffn_width(r, f"layers.{layers[0]}.feed_forward.net.0.proj", 2) or 4 * D
    want = {"attention.to_qkv": (3 * D, D), "attention.to_out.0": (D, D),
            "feed_forward.net.0.proj": (2 * F, D), "feed_forward.net.2": (D, F)}
    quantized_refiners = plain_refiners = False
    for prefix in ZIMAGE_BLOCKS:
        for i in _block_indices(names, prefix):
            b = f"{prefix}.{i}"
            for nname, kind, comfy in ZIMAGE_LAYERS:
                name = f"{b}.{nname}"
                if name in r.svdq or prefix == "layers":     # Nunchaku always quantizes the main layers
                    r.quantized(b, nname, kind, comfy, want[nname], need_bias=False)
                    quantized_refiners |= prefix != "layers"
                else:
                    fkeys, ckeys = ZIMAGE_PLAIN_LAYERS[nname]
                    if f"{b}.{fkeys[0]}" not in r.plain:
                        raise r.missing(f"{name}.qweight", f"{prefix} block")
                    r.plain_rows(b, fkeys, ckeys, want[nname])
                    plain_refiners = True
            for fkey, ckey in ZIMAGE_BLOCK_TENSORS + (ZIMAGE_MODULATION if prefix != "context_refiner" else ()):
                r.renamed(f"{b}.{fkey}", f"{b}.{ckey}")
    if quantized_refiners and plain_refiners:
        raise CheckpointError(f"{r.ck.path}: some Z-Image refiner blocks are quantized and some 16-bit; Nunchaku "
                              f"quantizes all of them or none (quantization_config skip_refiners); {INCOMPLETE}")
    skip = bool(r.ck.quantization_config and r.ck.quantization_config.get("skip_refiners"))
    if r.ck.quantization_config and "skip_refiners" in r.ck.quantization_config and skip != plain_refiners:
        raise CheckpointError(f"{r.ck.path}: metadata quantization_config says skip_refiners = {skip} but the refiner "
                              f"blocks are {'16-bit' if plain_refiners else 'quantized'}; {INCOMPLETE}")
    for fkey, ckey in ZIMAGE_TOP:
        r.renamed(fkey, ckey)
    return plain_refiners


def read_nunchaku_dit(ckpt: NunchakuCheckpoint, family: Optional[str] = None) -> DiTCheckpoint:
    """The open Nunchaku checkpoint (formats/nunchaku.py: headers already validated) in ComfyUI's names, every
    layer unpacked. family defaults to family_of(ckpt). Raises CheckpointError naming the file, the key and what
    was expected."""
    family = family or family_of(ckpt)
    if family not in (QWEN_IMAGE, ZIMAGE):
        raise CheckpointError(f"{ckpt.path}: not a Nunchaku Qwen-Image or Z-Image checkpoint (model_class "
                              f"{ckpt.model_class!r}, config _class_name {ckpt.config.get('_class_name')!r})")
    if ckpt.naming != "python":
        raise CheckpointError(f"{ckpt.path}: uses the C++ key naming (lora_down, smooth), which only FLUX.1 files "
                              f"have; Nunchaku's {family} files use the Python naming (proj_down, smooth_factor)")
    r = _Reader(ckpt, family)
    skip = False
    if family == QWEN_IMAGE:
        _read_qwen_image(r)
    else:
        skip = _read_zimage(r)
    r.leftovers()
    return DiTCheckpoint(family, ckpt.precision, r.state, r.file_keys, skip)
