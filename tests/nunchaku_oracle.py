"""Test-only oracle: builds Nunchaku tensors element by element from FORMAT.md §3-4's closed forms.

Deliberately slow and independent of nunchaku_core.packing: plain Python loops over the memory offsets,
each offset decomposed into its digits (word u, nibble j, lane, ...) and the element it holds computed
from the formula. Values are moved as raw bit patterns (ints), never through torch reshapes, so a shared
mistake in index arithmetic between this file and packing.py is unlikely.
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def raw(t: torch.Tensor) -> list:
    """Raw bit patterns of t's elements in row-major order, as Python ints (nested lists for 2-D)."""
    bits = t.contiguous().view(_INT_OF[t.element_size()])
    return bits.tolist()


def from_raw(values: list, dtype: torch.dtype, shape) -> torch.Tensor:
    """Inverse of raw: flat list of bit patterns -> tensor of dtype and shape."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    as_int = _INT_OF[itemsize]
    if itemsize == 1:
        values = [v & 0xFF for v in values]
        t = torch.tensor(values, dtype=torch.uint8)
    else:
        t = torch.tensor(values, dtype=as_int)
    return t.view(dtype).reshape(shape)


def qweight(codes: torch.Tensor) -> torch.Tensor:
    """W4A4 codes [N, K] (int4 values -8..7 or e2m1 codes 0..15) -> int8 [N, K/2] via little-endian uint32
    words: word u = ((((tn·K/64 + tk)·8 + p)·32 + lane)·4 + 2·ns + ks), nibble j holds
    n = 128·tn + 16·p + 8·ns + lane//4, k = 64·tk + 32·ks + 8·(lane%4) + j."""
    N, K = codes.shape
    c = codes.tolist()
    out = bytearray(N * K // 2)
    for tn in range(N // 128):
        for tk in range(K // 64):
            for p in range(8):
                for lane in range(32):
                    for ns in range(2):
                        for ks in range(2):
                            u = ((((tn * (K // 64) + tk) * 8 + p) * 32 + lane) * 4 + 2 * ns + ks)
                            word = 0
                            for j in range(8):
                                n = 128 * tn + 16 * p + 8 * ns + lane // 4
                                k = 64 * tk + 32 * ks + 8 * (lane % 4) + j
                                word |= (c[n][k] & 0xF) << (4 * j)
                            out[4 * u:4 * u + 4] = word.to_bytes(4, "little")
    return torch.frombuffer(out, dtype=torch.int8).clone().reshape(N, K // 2)


def _perm128_channel(pos: int) -> int:
    """Position 16a + 4b + 2c + d of a 128-block holds channel 16a + 8c + 2b + d."""
    a, b, c, d = pos // 16, (pos // 4) % 4, (pos // 2) % 2, pos % 2
    return 16 * a + 8 * c + 2 * b + d


def wscales_int4(ws: torch.Tensor) -> torch.Tensor:
    """[N, K/64] -> nominal [K/64, N], memory [N/128][K/64][128]."""
    N, G = ws.shape
    r = raw(ws)
    flat = [0] * (N * G)
    for tn in range(N // 128):
        for tk in range(G):
            for pos in range(128):
                flat[(tn * G + tk) * 128 + pos] = r[128 * tn + _perm128_channel(pos)][tk]
    return from_raw(flat, ws.dtype, (G, N))


def wscales_nvfp4(ws: torch.Tensor) -> torch.Tensor:
    """[N, K/16] fp8 -> nominal [K/16, N]: byte ((tn·K/64 + tk)·32 + lane)·16 + 4s + q holds channel
    128·tn + 32·s + 8·(lane%4) + lane//4, group 4·tk + q."""
    N, G = ws.shape
    r = raw(ws)
    flat = [0] * (N * G)
    for tn in range(N // 128):
        for tk in range(G // 4):
            for lane in range(32):
                for s in range(4):
                    for q in range(4):
                        n = 128 * tn + 32 * s + 8 * (lane % 4) + lane // 4
                        flat[((tn * (G // 4) + tk) * 32 + lane) * 16 + 4 * s + q] = r[n][4 * tk + q]
    return from_raw(flat, ws.dtype, (G, N))


def perm128(v: torch.Tensor) -> torch.Tensor:
    """Channel vector [C] -> stored order."""
    r = raw(v)
    flat = [r[128 * (i // 128) + _perm128_channel(i % 128)] for i in range(len(r))]
    return from_raw(flat, v.dtype, v.shape)


def lora_down(D: torch.Tensor) -> torch.Tensor:
    """D [K, R] (R a multiple of 16) -> nominal [K, R]: offset ((ck·R/16 + rr)·32 + lane)·8 + 4np + 2kp + e
    holds D[16ck + 8kp + 2(lane%4) + e, 16rr + 8np + lane//4]."""
    K, R = D.shape
    r = raw(D)
    flat = [0] * (K * R)
    for off in range(K * R):
        e, kp, np_, lane = off % 2, (off // 2) % 2, (off // 4) % 2, (off // 8) % 32
        rr, ck = (off // 256) % (R // 16), (off // 256) // (R // 16)
        flat[off] = r[16 * ck + 8 * kp + 2 * (lane % 4) + e][16 * rr + 8 * np_ + lane // 4]
    return from_raw(flat, D.dtype, (K, R))


def lora_up(U: torch.Tensor) -> torch.Tensor:
    """U [N, R] -> nominal [N, R]: the same offset holds U[16cn + 8np + lane//4, 16rr + 8kp + 2(lane%4) + e]."""
    N, R = U.shape
    r = raw(U)
    flat = [0] * (N * R)
    for off in range(N * R):
        e, kp, np_, lane = off % 2, (off // 2) % 2, (off // 4) % 2, (off // 8) % 32
        rr, cn = (off // 256) % (R // 16), (off // 256) // (R // 16)
        flat[off] = r[16 * cn + 8 * np_ + lane // 4][16 * rr + 8 * kp + 2 * (lane % 4) + e]
    return from_raw(flat, U.dtype, (N, R))


def awq_int16(codes: torch.Tensor) -> torch.Tensor:
    """uint4 codes [N, K] (K a multiple of 64) -> int16 [N/4, K]: column t = 64kc + 16rr + 8h + b of row
    g4, nibble i, holds codes[4·g4 + rr, 64kc + 32h + 8i + b]."""
    N, K = codes.shape
    c = codes.tolist()
    flat = []
    for g4 in range(N // 4):
        for t in range(K):
            kc, rr, h, b = t // 64, (t % 64) // 16, (t % 16) // 8, t % 8
            v = 0
            for i in range(4):
                v |= c[4 * g4 + rr][64 * kc + 32 * h + 8 * i + b] << (4 * i)
            flat.append(v - 0x10000 if v >= 0x8000 else v)
    return torch.tensor(flat, dtype=torch.int16).reshape(N // 4, K)


SCALE_CHUNKS = {6: (1, 4), 3: (1,)}  # FORMAT.md §3: the chunks holding `scale`


def interleave(rows: list, S: int) -> list:
    """Stored row d·S + j = original row j·(N/S) + d."""
    N = len(rows)
    out = [None] * N
    for j in range(S):
        for d in range(N // S):
            out[d * S + j] = rows[j * (N // S) + d]
    return out


def svdquant_tensors(name: str, layer, naming: str = "cpp") -> dict:
    """Packed tensors of a logical SVDQuantLayer (N, K multiples of 128, R a multiple of 16)."""
    keys = {"smooth": "smooth", "smooth_orig": "smooth_orig", "lora_down": "lora_down", "lora_up": "lora_up"}
    if naming == "python":
        keys = {"smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig", "lora_down": "proj_down",
                "lora_up": "proj_up"}
    out = {
        f"{name}.qweight": qweight(layer.codes),
        f"{name}.wscales": (wscales_int4 if layer.precision == "int4" else wscales_nvfp4)(layer.wscales),
        f"{name}.{keys['smooth']}": perm128(layer.smooth),
        f"{name}.{keys['lora_down']}": lora_down(layer.proj_down),
        f"{name}.{keys['lora_up']}": lora_up(layer.proj_up),
    }
    if layer.bias is not None:
        out[f"{name}.bias"] = perm128(layer.bias)
    if layer.smooth_orig is not None:
        out[f"{name}.{keys['smooth_orig']}"] = perm128(layer.smooth_orig)
    if layer.wtscale is not None:
        out[f"{name}.wtscale"] = layer.wtscale.clone()
    if layer.wcscales is not None:
        out[f"{name}.wcscales"] = perm128(layer.wcscales)
    return out


def w4a16_tensors(name: str, layer, S: int, group_rows: int = 0, dtype=torch.bfloat16) -> dict:
    """Packed adaLN tensors of a logical W4A16Layer (K a multiple of 64): rows interleaved, +1 folded into
    the scale chunks of the bias (stored in `dtype`), wscales/wzeros transposed to [G, N] and padded with
    zero rows up to `group_rows`."""
    N, K = layer.codes.shape
    G = layer.scales.shape[1]
    codes = torch.tensor(interleave(layer.codes.tolist(), S), dtype=torch.uint8)
    out = {f"{name}.qweight": awq_int16(codes).view(torch.int32)}
    for key, t in (("wscales", layer.scales), ("wzeros", layer.zeros)):
        stored = interleave(raw(t), S)                      # [N][G] bit patterns, stored row order
        cols = [[stored[n][g] for n in range(N)] for g in range(G)]
        cols += [[0] * N for _ in range(max(group_rows, G) - G)]
        out[f"{name}.{key}"] = from_raw([v for row in cols for v in row], t.dtype, (len(cols), N))
    if layer.bias is not None:
        b = [float(v) for v in layer.bias.tolist()]
        for j in SCALE_CHUNKS[S]:
            for d in range(N // S):
                b[j * (N // S) + d] += 1.0
        out[f"{name}.bias"] = torch.tensor(interleave(b, S), dtype=torch.float64).to(dtype)
    return out


def metadata(config: dict, comfy_config, model_class: str, precision: str, rank: int) -> dict:
    fp4 = precision == "nvfp4"
    dt = "fp4_e2m1_all" if fp4 else "int4"
    qc = {"method": "svdquant",
          "weight": {"dtype": dt, "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None, "group_size": 16 if fp4 else 64},
          "activation": {"dtype": dt, "scale_dtype": "fp8_e4m3_nan" if fp4 else None, "group_size": 16 if fp4 else 64},
          "rank": rank}
    md = {"config": json.dumps(config), "model_class": model_class, "quantization_config": json.dumps(qc)}
    if comfy_config is not None:
        md["comfy_config"] = json.dumps(comfy_config)
    return md


def write(path, tensors: dict, md: dict = None) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=md)
