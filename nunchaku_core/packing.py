"""Nunchaku's packed tensor layouts (FORMAT.md §3-4): pack and unpack, vectorised with reshape/permute.

Every layout here is a fixed permutation of elements, so each packer is written the same way: split each
logical axis into the digits of its closed-form index (e.g. n = 128·tn + 16·p + 8·ns + lane//4 becomes the
axes [tn, p, ns, l4]), permute the digits into the order of the memory offset, flatten. The unpacker is the
inverse permutation. `lane` is always split as lane = 4·l4 + l1 (l4 = lane//4, l1 = lane%4).

Two nibbles share a byte low-first: the element with the even nibble index j sits in bits 0..3, the odd one
in bits 4..7. A little-endian uint32 (or int16) word's nibble j is therefore byte j//2, half j%2, which is
why no multi-byte arithmetic is needed: words are just their bytes in order.

Letters: N out features, K in features, R rank, G group size, S adaLN chunks.
The kernels that read these layouts name this file; tests/nunchaku_oracle.py is an independent
per-element implementation of the same closed forms.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch

from .layer import SVDQuantLayer, W4A16Layer

TILE = 128  # W4A4 tile: N and K of a packed W4A4 layer are multiples of it (writers pad)
AWQ_GROUP = 64  # W4A16 adaLN group size; the AWQ interleave works on 64-column chunks
LORA_TILE = 16  # low-rank fragments are 16 x 16: rank (and N, K) padded to it


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def nibbles_to_bytes(nib: torch.Tensor) -> torch.Tensor:
    """[..., 2m] nibble values (any int dtype, low 4 bits used) -> [..., m] uint8, even index in the low half."""
    nib = nib.to(torch.uint8) & 0xF    # an int8 code's low 4 bits survive the wrap to uint8
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def bytes_to_nibbles(b: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """[..., m] uint8 -> [..., 2m] nibbles, low half first: uint8 0..15, or int8 sign-extended to [-8, 7] when
    signed (((v & 0xF) ^ 8) - 8 for the low half, an arithmetic shift for the high one; no int16 temporaries)."""
    out = torch.empty(*b.shape, 2, dtype=torch.int8 if signed else torch.uint8, device=b.device)
    if signed:
        out[..., 0] = ((b & 0xF) ^ 8).view(torch.int8) - 8
        out[..., 1] = b.view(torch.int8) >> 4
    else:
        out[..., 0] = b & 0xF
        out[..., 1] = b >> 4
    return out.flatten(-2)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw little-endian bytes of a tensor, [numel·itemsize] uint8."""
    return t.contiguous().view(torch.uint8).reshape(-1)


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor as little-endian int32 words, [numel·itemsize/4] (copied if not 4-byte aligned)."""
    b = _as_bytes(t)
    return (b if b.storage_offset() % 4 == 0 else b.clone()).view(torch.int32)


# ---------------------------------------------------------------------------------------------------------
# W4A4 weights and scales
# ---------------------------------------------------------------------------------------------------------

def pack_w4a4_qweight(codes: torch.Tensor, precision: str) -> torch.Tensor:
    """W4A4 codes [N, K] int8 -> Nunchaku `qweight` int8 [N, K/2] (same bytes as N·K/8 uint32 words).

    int4 codes are two's complement values in [-8, 7]; nvfp4 codes are e2m1 bit patterns 0..15. Both are
    stored as their low 4 bits. Little-endian uint32 word
        u = ((((tn·K/64 + tk)·8 + p)·32 + lane)·4 + 2·ns + ks),   nibble j (bits 4j..4j+3)
    holds element n = 128·tn + 16·p + 8·ns + lane//4,  k = 64·tk + 32·ks + 8·(lane%4) + j.
    No scales are involved. N and K must be multiples of 128 (see pad_svdquant_layer).
    """
    _require(codes.dim() == 2 and codes.dtype == torch.int8,
             f"codes must be int8 [N, K], got {codes.dtype} {list(codes.shape)}")
    N, K = codes.shape
    _require(N % TILE == 0 and K % TILE == 0, f"W4A4 qweight needs N, K multiples of {TILE}, got [{N}, {K}]")
    lo, hi = (-8, 7) if precision == "int4" else (0, 15)
    _require(precision in ("int4", "nvfp4"), f"precision {precision!r}, expected 'int4' or 'nvfp4'")
    _require(int(codes.min()) >= lo and int(codes.max()) <= hi, f"{precision} codes must be in [{lo}, {hi}]")
    # codes axes: n = [tn, p, ns, l4], k = [tk, ks, l1, j]
    t = codes.reshape(N // 128, 8, 2, 8, K // 64, 2, 4, 8)
    # memory order: tn, tk, p, lane = (l4, l1), ns, ks, j
    t = t.permute(0, 4, 1, 3, 6, 2, 5, 7)
    return nibbles_to_bytes(t.reshape(-1)).view(torch.int8).reshape(N, K // 2)


def unpack_w4a4_qweight(qweight: torch.Tensor, precision: str) -> torch.Tensor:
    """Inverse of pack_w4a4_qweight: `qweight` int8 [N, K/2] -> codes int8 [N, K].
    int4: sign-extended to [-8, 7]; nvfp4: e2m1 codes 0..15."""
    _require(qweight.dim() == 2 and qweight.dtype == torch.int8,
             f"qweight must be int8 [N, K/2], got {qweight.dtype} {list(qweight.shape)}")
    N, K = qweight.shape[0], qweight.shape[1] * 2
    _require(N % TILE == 0 and K % TILE == 0, f"W4A4 qweight needs N, K multiples of {TILE}, got [{N}, {K}]")
    _require(precision in ("int4", "nvfp4"), f"precision {precision!r}, expected 'int4' or 'nvfp4'")
    # A uint32 word holds the 8 nibbles j of one (n, 8 consecutive k): permute whole words into the output's
    # order first, then split each byte jb into nibbles j = 2·jb (low) and 2·jb + 1 (high), int4 sign-extended.
    words = _as_words(qweight).reshape(N // 128, K // 64, 8, 8, 4, 2, 2)   # [tn, tk, p, l4, l1, ns, ks]
    b = words.permute(0, 2, 5, 3, 1, 6, 4).contiguous().view(torch.uint8).reshape(-1)  # [tn, p, ns, l4, tk, ks, l1, jb]
    return bytes_to_nibbles(b, signed=precision == "int4").view(torch.int8).reshape(N, K)


def pack_wscales_int4(wscales: torch.Tensor) -> torch.Tensor:
    """INT4 group scales [N, K/64] (per output channel, per 64 inputs) -> Nunchaku `wscales` [K/64, N].

    The [K/64, N] shape is nominal; memory is [N/128][K/64][128] and position 16a + 4b + 2c + d of a
    128-block holds channel n = 128·tn + 16a + 8c + 2b + d of group tk. dtype is kept (the model dtype).
    """
    _require(wscales.dim() == 2, f"wscales must be [N, K/64], got {list(wscales.shape)}")
    N, G = wscales.shape
    _require(N % TILE == 0, f"int4 wscales needs N a multiple of {TILE}, got {N}")
    t = wscales.reshape(N // 128, 8, 2, 4, 2, G)                  # [tn, a, c, b, d, tk]
    return t.permute(0, 5, 1, 3, 2, 4).contiguous().reshape(G, N)  # [tn, tk, a, b, c, d]


def unpack_wscales_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_wscales_int4: [K/64, N] -> [N, K/64]."""
    G, N = packed.shape
    _require(N % TILE == 0, f"int4 wscales needs N a multiple of {TILE}, got {N}")
    t = packed.contiguous().reshape(N // 128, G, 8, 4, 2, 2)      # [tn, tk, a, b, c, d]
    return t.permute(0, 2, 4, 3, 5, 1).reshape(N, G)              # [tn, a, c, b, d, tk]


def pack_wscales_nvfp4(wscales: torch.Tensor) -> torch.Tensor:
    """NVFP4 group scales [N, K/16] float8_e4m3fn -> Nunchaku `wscales` float8_e4m3fn [K/16, N] (nominal).

    Byte ((tn·K/64 + tk)·32 + lane)·16 + 4·s + q holds channel n = 128·tn + 32·s + 8·(lane%4) + lane//4,
    group 4·tk + q (inputs 16·(4·tk + q) .. +15).
    """
    _require(wscales.dim() == 2, f"wscales must be [N, K/16], got {list(wscales.shape)}")
    N, G = wscales.shape
    _require(N % TILE == 0 and G % 4 == 0,
             f"nvfp4 wscales needs N a multiple of {TILE} and K of 64, got N={N}, K/16={G}")
    t = wscales.reshape(N // 128, 4, 4, 8, G // 4, 4)              # [tn, s, l1, l4, tk, q]
    return t.permute(0, 4, 3, 2, 1, 5).contiguous().reshape(G, N)  # [tn, tk, l4, l1, s, q]


def unpack_wscales_nvfp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_wscales_nvfp4: [K/16, N] -> [N, K/16]."""
    G, N = packed.shape
    _require(N % TILE == 0 and G % 4 == 0,
             f"nvfp4 wscales needs N a multiple of {TILE} and K of 64, got N={N}, K/16={G}")
    t = packed.contiguous().reshape(N // 128, G // 4, 8, 4, 4, 4)  # [tn, tk, l4, l1, s, q]
    return t.permute(0, 4, 3, 2, 1, 5).reshape(N, G)              # [tn, s, l1, l4, tk, q]


def permute_channels(v: torch.Tensor) -> torch.Tensor:
    """Per-channel vector [C] (bias, smooth, smooth_orig, wcscales) -> stored order [C], C a multiple of 128.
    Position 16a + 4b + 2c + d of each 128-chunk holds channel 128·t + 16a + 8c + 2b + d (the int4 wscales
    permutation)."""
    _require(v.dim() == 1 and v.shape[0] % TILE == 0,
             f"channel vector must be [C] with C a multiple of {TILE}, got {list(v.shape)}")
    return v.reshape(-1, 8, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1)   # [t, a, c, b, d] -> [t, a, b, c, d]


def unpermute_channels(v: torch.Tensor) -> torch.Tensor:
    """Inverse of permute_channels."""
    _require(v.dim() == 1 and v.shape[0] % TILE == 0,
             f"channel vector must be [C] with C a multiple of {TILE}, got {list(v.shape)}")
    return v.reshape(-1, 8, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(-1)   # [t, a, b, c, d] -> [t, a, c, b, d]


# ---------------------------------------------------------------------------------------------------------
# Low-rank branch
# ---------------------------------------------------------------------------------------------------------

def _pad_rank(x: torch.Tensor) -> torch.Tensor:
    R = x.shape[1]
    Rp = _round_up(R, LORA_TILE)
    return x if Rp == R else torch.nn.functional.pad(x, (0, Rp - R))


def pack_lora_down(down: torch.Tensor) -> torch.Tensor:
    """D [K, R] -> Nunchaku `lora_down` [K, R16] (nominal shape; R16 = R rounded up to 16, zero columns).

    Element ((ck·R16/16 + rr)·32 + lane)·8 + 4·np + 2·kp + e of the flat memory is
    D[16·ck + 8·kp + 2·(lane%4) + e, 16·rr + 8·np + lane//4]. dtype is kept. K must be a multiple of 16.
    """
    _require(down.dim() == 2 and down.shape[0] % LORA_TILE == 0,
             f"lora_down must be [K, R] with K a multiple of 16, got {list(down.shape)}")
    d = _pad_rank(down)
    K, R = d.shape
    t = d.reshape(K // 16, 2, 4, 2, R // 16, 2, 8)                 # [ck, kp, l1, e, rr, np, l4]
    return t.permute(0, 4, 6, 2, 5, 1, 3).contiguous().reshape(K, R)  # [ck, rr, l4, l1, np, kp, e]


def unpack_lora_down(packed: torch.Tensor, R: Optional[int] = None) -> torch.Tensor:
    """Inverse of pack_lora_down: [K, R16] -> D [K, R] (R defaults to the stored width R16)."""
    K, Rp = packed.shape
    _require(K % LORA_TILE == 0 and Rp % LORA_TILE == 0,
             f"lora_down must be [K, R] with K, R multiples of 16, got {[K, Rp]}")
    t = packed.contiguous().reshape(K // 16, Rp // 16, 8, 4, 2, 2, 2)  # [ck, rr, l4, l1, np, kp, e]
    d = t.permute(0, 5, 3, 6, 1, 4, 2).reshape(K, Rp)              # [ck, kp, l1, e, rr, np, l4]
    return d if R is None else d[:, :R].contiguous()


def pack_lora_up(up: torch.Tensor) -> torch.Tensor:
    """U [N, R] -> Nunchaku `lora_up` [N, R16] (nominal shape; zero columns pad R to 16).

    Element ((cn·R16/16 + rr)·32 + lane)·8 + 4·np + 2·kp + e of the flat memory is
    U[16·cn + 8·np + lane//4, 16·rr + 8·kp + 2·(lane%4) + e]. dtype is kept. N must be a multiple of 16.
    """
    _require(up.dim() == 2 and up.shape[0] % LORA_TILE == 0,
             f"lora_up must be [N, R] with N a multiple of 16, got {list(up.shape)}")
    u = _pad_rank(up)
    N, R = u.shape
    t = u.reshape(N // 16, 2, 8, R // 16, 2, 4, 2)                 # [cn, np, l4, rr, kp, l1, e]
    return t.permute(0, 3, 2, 5, 1, 4, 6).contiguous().reshape(N, R)  # [cn, rr, l4, l1, np, kp, e]


def unpack_lora_up(packed: torch.Tensor, R: Optional[int] = None) -> torch.Tensor:
    """Inverse of pack_lora_up: [N, R16] -> U [N, R] (R defaults to the stored width R16)."""
    N, Rp = packed.shape
    _require(N % LORA_TILE == 0 and Rp % LORA_TILE == 0,
             f"lora_up must be [N, R] with N, R multiples of 16, got {[N, Rp]}")
    t = packed.contiguous().reshape(N // 16, Rp // 16, 8, 4, 2, 2, 2)  # [cn, rr, l4, l1, np, kp, e]
    u = t.permute(0, 4, 2, 1, 5, 3, 6).reshape(N, Rp)              # [cn, np, l4, rr, kp, l1, e]
    return u if R is None else u[:, :R].contiguous()


# ---------------------------------------------------------------------------------------------------------
# W4A16 (AWQ / TinyChat) weights, adaLN row interleave and the folded +1
# ---------------------------------------------------------------------------------------------------------

def pack_awq_qweight(codes: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """W4A16 codes [N, K] uint8 0..15 -> AWQ `qweight`: int32 [N/4, Kp/2] (adaLN files) or int16 [N/4, Kp]
    (T5 files); the same bytes either way. Kp = K rounded up to 64, padded with code 0.

    Viewed as int16 [N/4, Kp]: column t = 64·kc + 16·rr + 8·h + b of row g4, nibble i (bits 4i..4i+3),
    holds code[n = 4·g4 + rr, k = 64·kc + 32·h + 8·i + b]. Scales and zeros are separate tensors.
    """
    _require(codes.dim() == 2 and codes.dtype == torch.uint8,
             f"codes must be uint8 [N, K], got {codes.dtype} {list(codes.shape)}")
    _require(dtype in (torch.int32, torch.int16), f"AWQ qweight dtype must be int32 or int16, got {dtype}")
    N, K = codes.shape
    _require(N % 4 == 0, f"AWQ qweight needs N a multiple of 4, got {N}")
    _require(codes.numel() == 0 or int(codes.max()) <= 15, "W4A16 codes must be in 0..15")
    Kp = _round_up(K, AWQ_GROUP)
    c = torch.nn.functional.pad(codes, (0, Kp - K)) if Kp != K else codes
    t = c.reshape(N // 4, 4, Kp // 64, 2, 4, 8)                    # [g4, rr, kc, h, i, b]
    t = t.permute(0, 2, 1, 3, 5, 4)                               # [g4, kc, rr, h, b, i]
    return nibbles_to_bytes(t.reshape(-1)).view(dtype).reshape(N // 4, -1)


def unpack_awq_qweight(qweight: torch.Tensor, K: Optional[int] = None) -> torch.Tensor:
    """Inverse of pack_awq_qweight: int32 [N/4, Kp/2] or int16 [N/4, Kp] -> codes uint8 [N, K]
    (K defaults to the stored Kp)."""
    _require(qweight.dim() == 2 and qweight.dtype in (torch.int32, torch.int16),
             f"AWQ qweight must be a 2-D int32 or int16 tensor, got {qweight.dtype} {list(qweight.shape)}")
    N = qweight.shape[0] * 4
    Kp = qweight.shape[1] * qweight.element_size() // 2            # int16 columns = Kp
    _require(Kp % AWQ_GROUP == 0, f"AWQ qweight needs K a multiple of {AWQ_GROUP}, got {Kp}")
    nib = bytes_to_nibbles(_as_bytes(qweight))
    t = nib.reshape(N // 4, Kp // 64, 4, 2, 8, 4)                  # [g4, kc, rr, h, b, i]
    codes = t.permute(0, 2, 1, 3, 5, 4).reshape(N, Kp)             # [g4, rr, kc, h, i, b]
    return codes if K is None else codes[:, :K].contiguous()


def interleave_rows(t: torch.Tensor, S: int) -> torch.Tensor:
    """adaLN rows, original order -> stored order along dim 0: stored row d·S + j = original row j·(N/S) + d
    (row j·(N/S) + d is channel d of chunk j; chunks are (shift, scale, gate) repeated)."""
    N = t.shape[0]
    _require(N % S == 0, f"cannot interleave {N} rows into {S} chunks")
    return t.reshape(S, N // S, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def deinterleave_rows(t: torch.Tensor, S: int) -> torch.Tensor:
    """Inverse of interleave_rows."""
    N = t.shape[0]
    _require(N % S == 0, f"cannot de-interleave {N} rows into {S} chunks")
    return t.reshape(N // S, S, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _scale_chunk_mask(N: int, S: int) -> torch.Tensor:
    """[N] bool, True on the rows (original order) of the `scale` chunks: chunk j with j % 3 == 1."""
    _require(S % 3 == 0 and N % S == 0, f"adaLN rows must form (shift, scale, gate) chunks: N = {N}, S = {S}")
    chunk = torch.arange(N) // (N // S)
    return chunk % 3 == 1


def fold_one(bias: torch.Tensor, S: int) -> torch.Tensor:
    """Original adaLN bias [N] (original row order) -> bias with the `+1` of (1 + scale) added to the scale
    chunks, fp32. Exact in fp32; the caller rounds to the file dtype."""
    return bias.float() + _scale_chunk_mask(bias.shape[0], S).float()


def unfold_one(bias: torch.Tensor, S: int) -> torch.Tensor:
    """Inverse of fold_one: stored bias [N] (original row order) -> original bias, fp32 (exact: stored − 1 of
    a bf16/fp16 value is representable in fp32)."""
    return bias.float() - _scale_chunk_mask(bias.shape[0], S).float()


# ---------------------------------------------------------------------------------------------------------
# Whole layers: padding, and the canonical (C++ naming) tensor dicts
# ---------------------------------------------------------------------------------------------------------

def _pad_to(t: Optional[torch.Tensor], sizes, value: float) -> Optional[torch.Tensor]:
    """Pad the leading dims of t at their ends to `sizes` with `value`."""
    if t is None:
        return None
    pad = []
    for dim in reversed(range(t.dim())):
        pad += [0, (sizes[dim] - t.shape[dim]) if dim < len(sizes) else 0]
    if not any(pad):
        return t
    if t.dtype == torch.float8_e4m3fn:                            # constant pad is not implemented for fp8
        return torch.nn.functional.pad(t.float(), pad, value=value).to(t.dtype)
    return torch.nn.functional.pad(t, pad, value=value)


def pad_svdquant_layer(layer: SVDQuantLayer, multiple: int = TILE) -> SVDQuantLayer:
    """Pad N and K up to `multiple` as Nunchaku writers do: codes 0, scales 1, smooth/smooth_orig 1, bias 0,
    low-rank rows 0, wcscales 1. The padded layer computes the same outputs on the first N channels for any
    input padded with zeros (padded columns have Deq = 0 and D rows = 0)."""
    N, K = layer.N, layer.K
    Np, Kp = _round_up(N, multiple), _round_up(K, multiple)
    if (Np, Kp) == (N, K):
        return layer
    G = layer.group_size
    return replace(
        layer,
        codes=_pad_to(layer.codes, (Np, Kp), 0),
        wscales=_pad_to(layer.wscales, (Np, Kp // G), 1.0),
        smooth=_pad_to(layer.smooth, (Kp,), 1.0),
        smooth_orig=_pad_to(layer.smooth_orig, (Kp,), 1.0),
        proj_down=_pad_to(layer.proj_down, (Kp,), 0.0),
        proj_up=_pad_to(layer.proj_up, (Np,), 0.0),
        bias=_pad_to(layer.bias, (Np,), 0.0),
        wcscales=_pad_to(layer.wcscales, (Np,), 1.0),
    )


def pack_svdquant_layer(layer: SVDQuantLayer) -> dict[str, torch.Tensor]:
    """SVDQuantLayer -> Nunchaku tensors keyed by their C++ names (qweight, wscales, bias, smooth,
    smooth_orig, lora_down, lora_up, wtscale, wcscales; absent optional fields are left out). N and K are
    padded to 128 first; the rank is padded to 16. Every tensor is contiguous."""
    layer = pad_svdquant_layer(layer.validate())
    out = {
        "qweight": pack_w4a4_qweight(layer.codes, layer.precision),
        "wscales": (pack_wscales_int4 if layer.precision == "int4" else pack_wscales_nvfp4)(layer.wscales),
        "smooth": permute_channels(layer.smooth),
        "lora_down": pack_lora_down(layer.proj_down),
        "lora_up": pack_lora_up(layer.proj_up),
    }
    if layer.bias is not None:
        out["bias"] = permute_channels(layer.bias)
    if layer.smooth_orig is not None:
        out["smooth_orig"] = permute_channels(layer.smooth_orig)
    if layer.wtscale is not None:
        out["wtscale"] = layer.wtscale
    if layer.wcscales is not None:
        out["wcscales"] = permute_channels(layer.wcscales)
    return {k: v.contiguous() for k, v in out.items()}


def unpack_svdquant_layer(tensors: dict[str, torch.Tensor], precision: str, shifted: bool = False,
                          R: Optional[int] = None) -> SVDQuantLayer:
    """Inverse of pack_svdquant_layer (C++ key names). N, K stay padded as stored; R defaults to the stored
    low-rank width."""
    def opt(name, fn):
        return fn(tensors[name]) if name in tensors else None

    unpack_ws = unpack_wscales_int4 if precision == "int4" else unpack_wscales_nvfp4
    return SVDQuantLayer(
        precision=precision,
        codes=unpack_w4a4_qweight(tensors["qweight"], precision),
        wscales=unpack_ws(tensors["wscales"]),
        smooth=unpermute_channels(tensors["smooth"]),
        proj_down=unpack_lora_down(tensors["lora_down"], R),
        proj_up=unpack_lora_up(tensors["lora_up"], R),
        bias=opt("bias", unpermute_channels),
        wtscale=opt("wtscale", lambda t: t.reshape(1)),
        wcscales=opt("wcscales", unpermute_channels),
        shifted=shifted,
        smooth_orig=opt("smooth_orig", unpermute_channels),
    )


def pack_w4a16_layer(layer: W4A16Layer, S: int, group_rows_multiple: int = 16) -> dict[str, torch.Tensor]:
    """W4A16Layer (original row order, original bias) -> adaLN tensors `qweight` int32 [N/4, Kp/2],
    `wscales`, `wzeros` [ceil(K/64) rounded up to group_rows_multiple, N] (zero rows appended) and `bias`
    [N], rows interleaved with S chunks and the +1 folded into the scale chunks of the bias. The bias is
    stored in the scales' dtype (rounded from the exact fp32 sum).

    group_rows_multiple = 16 is what DeepCompressor (which wrote the published files) does; Nunchaku's C++
    allocates exactly ceil(K/64) rows. The two agree for every real adaLN K (FLUX: K = 3072, 48 groups)."""
    layer.validate()
    _require(layer.group_size == AWQ_GROUP, f"adaLN W4A16 group size must be {AWQ_GROUP}, got {layer.group_size}")
    G = layer.scales.shape[1]
    Gp = _round_up(G, group_rows_multiple)
    out = {
        "qweight": pack_awq_qweight(interleave_rows(layer.codes, S)),
        "wscales": _pad_to(interleave_rows(layer.scales, S).T, (Gp,), 0.0),
        "wzeros": _pad_to(interleave_rows(layer.zeros, S).T, (Gp,), 0.0),
    }
    if layer.bias is not None:
        out["bias"] = interleave_rows(fold_one(layer.bias, S), S).to(layer.scales.dtype)
    return {k: v.contiguous() for k, v in out.items()}


def unpack_w4a16_layer(tensors: dict[str, torch.Tensor], S: int) -> W4A16Layer:
    """Inverse of pack_w4a16_layer. K is the stored (64-padded) K; only the first ceil(K/64) group rows of
    wscales/wzeros are read (some writers pad them to 16). The bias comes back in fp32 (stored − 1 on the
    scale chunks is exact in fp32 but not always in bf16)."""
    codes = deinterleave_rows(unpack_awq_qweight(tensors["qweight"]), S)
    G = math.ceil(codes.shape[1] / AWQ_GROUP)
    bias = tensors.get("bias")
    return W4A16Layer(
        codes=codes,
        scales=deinterleave_rows(tensors["wscales"][:G].T, S).contiguous(),
        zeros=deinterleave_rows(tensors["wzeros"][:G].T, S).contiguous(),
        bias=None if bias is None else unfold_one(deinterleave_rows(bias, S), S),
        group_size=AWQ_GROUP,
    )
