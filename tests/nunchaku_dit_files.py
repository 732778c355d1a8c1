"""Test-only: small Nunchaku v1 Qwen-Image and Z-Image files, and the ComfyUI tensors they must read as.

The files have what nunchaku's own loaders (nunchaku/models/transformers/transformer_qwenimage.py,
transformer_zimage.py) load strictly into diffusers' models: diffusers' names, fused `to_qkv` / `add_qkv_proj`,
Z-Image's SwiGLU `feed_forward.net.0.proj` with rows [w3 | w1], Python key naming, unpadded shapes, the adaLN
rows of Qwen-Image's img_mod.1 / txt_mod.1 interleaved by 6 with +1 folded into the scale chunks, and the v1
metadata (`config`, `model_class`, `quantization_config` with Z-Image's `skip_refiners`). Every packed tensor is
built element by element by nunchaku_oracle.py (FORMAT.md's closed forms, independent of nunchaku_core.packing).

The expectation of every ComfyUI key is computed here in float64 straight from the random codes and scales, with
none of nunchaku_core involved: W_eff = out_scale·code·scale/s + U·Dᵀ, its row slice for a split layer; the
effective bias (+ σ·Σ_k main for σ-shifted layers); W4A16 w = q·scale + zero with the original bias; 16-bit tensors
as stored (concatenated / split by rows where ComfyUI fuses or splits what diffusers does not).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch

import nunchaku_oracle as oracle

SIGMA = 0.171875
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                    dtype=torch.float64)


@dataclass
class Expect:
    kind: str                                 # "w4a4" | "w4a16" | "plain"
    weight: torch.Tensor                      # float64 effective weight, or the stored tensor for "plain"
    bias: Optional[torch.Tensor] = None       # float64 effective bias
    mag: Optional[torch.Tensor] = None        # w4a4: |main| + |U|·|D|ᵀ, the magnitude fp32 rounding scales with
    shifted: bool = False
    source: str = ""                          # the file's layer this came from


def quantization_config(precision: str, rank: int) -> dict:
    """The `quantization_config` metadata nunchaku's converters write for an INT4 or NVFP4 file of this rank."""
    fp4 = precision == "nvfp4"
    dt, G = ("fp4_e2m1_all", 16) if fp4 else ("int4", 64)
    return {"method": "svdquant",
            "weight": {"dtype": dt, "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None, "group_size": G},
            "activation": {"dtype": dt, "scale_dtype": "fp8_e4m3_nan" if fp4 else None, "group_size": G},
            "rank": rank}


def assert_checkpoint_holds(ck, state: dict, fsd) -> None:
    """nodes/checkpoint.py's state dict `ck.state_dict` (fsd: that module) holds exactly a reader's `state`: its
    plain tensors unchanged and each 4-bit layer as one whole-output QuantizedLinear part equal to it."""
    from nunchaku_core.layer import SVDQuantLayer, W4A16Layer, tensors_equal
    want = {f"{k}.{fsd.QUANT_KEY}" if isinstance(v, (SVDQuantLayer, W4A16Layer)) else k for k, v in state.items()}
    assert set(ck.state_dict) == want
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(ck.state_dict[k], v), k
        else:
            q = ck.state_dict[f"{k}.{fsd.QUANT_KEY}"]
            assert isinstance(q, fsd.QuantizedLinear) and q.split == "out" and len(q.parts) == 1, k
            assert tensors_equal(q.parts[0], v), k


class Builder:
    """family: "qwen_image" | "zimage". D hidden size (one head of 128), F the MLP width; Z-Image's refiners are
    16-bit when skip_refiners."""

    def __init__(self, family: str, precision: str = "int4", rank: int = 16, seed: int = 0, D: int = 128,
                 F: Optional[int] = None, n_layers: int = 1, skip_refiners: bool = False):
        self.family, self.precision, self.R, self.D = family, precision, rank, D
        self.F = F or (4 * D if family == "qwen_image" else 2 * D)
        self.n_layers, self.skip_refiners = n_layers, skip_refiners
        self.g = torch.Generator().manual_seed(seed)
        self.tensors: dict[str, torch.Tensor] = {}
        self.expected: dict[str, Expect] = {}

    # -- random pieces -------------------------------------------------------------------------------------
    def rand(self, *shape, scale=1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g, dtype=torch.float64) * scale

    def svdquant(self, name: str, N: int, K: int, *, bias: bool, shifted: bool = False) -> dict:
        """One W4A4 layer in the file; returns its float64 expectation pieces."""
        int4 = self.precision == "int4"
        G = 64 if int4 else 16
        if int4:
            codes = torch.randint(-8, 8, (N, K), generator=self.g, dtype=torch.int8)
            ws = (torch.rand(N, K // G, generator=self.g) * 0.02 + 0.001).to(torch.bfloat16)
            values, wtscale, wcscales = codes.double(), None, None
        else:
            codes = torch.randint(0, 16, (N, K), generator=self.g, dtype=torch.int8)
            ws = (torch.rand(N, K // G, generator=self.g) * 2 + 0.25).to(torch.float8_e4m3fn)
            values = E2M1[codes.long()]
            wtscale = torch.tensor([0.0123], dtype=torch.bfloat16)
            wcscales = (torch.rand(N, generator=self.g) + 0.5).to(torch.bfloat16)
        layer = SimpleNamespace(
            precision=self.precision, codes=codes, wscales=ws,
            smooth=(torch.rand(K, generator=self.g) + 0.5).to(torch.bfloat16),
            smooth_orig=(torch.rand(K, generator=self.g) + 0.5).to(torch.bfloat16),
            proj_down=self.rand(K, self.R, scale=0.05).to(torch.bfloat16),
            proj_up=self.rand(N, self.R, scale=0.05).to(torch.bfloat16),
            bias=self.rand(N, scale=0.1).to(torch.bfloat16) if bias else None, wtscale=wtscale, wcscales=wcscales)
        self.tensors.update(oracle.svdquant_tensors(name, layer, "python"))
        out_scale = torch.ones(N, dtype=torch.float64)
        if not int4:
            out_scale = wtscale.double() * wcscales.double()
        main = out_scale[:, None] * values * ws.double().repeat_interleave(G, 1) / layer.smooth.double()[None, :]
        up, down = layer.proj_up.double(), layer.proj_down.double()
        b = layer.bias.double() if bias else torch.zeros(N, dtype=torch.float64)
        shifted = shifted and int4
        return {"weight": main + up @ down.T, "mag": main.abs() + up.abs() @ down.abs().T,
                "bias": b + (SIGMA * main.sum(1) if shifted else 0), "shifted": shifted, "has_bias": bias}

    def expect_rows(self, source: str, rec: dict, comfy: list[str]) -> None:
        """The layer's rows split equally, in order, onto the ComfyUI Linears `comfy`."""
        n = rec["weight"].shape[0] // len(comfy)
        for i, name in enumerate(comfy):
            rows = slice(i * n, (i + 1) * n)
            self.expected[name] = Expect("w4a4", rec["weight"][rows], rec["bias"][rows] if rec["has_bias"] else None,
                                         rec["mag"][rows], rec["shifted"], source)

    def w4a16(self, name: str, N: int, K: int, S: int = 6) -> None:
        """adaLN layer (Qwen-Image img_mod.1 / txt_mod.1): same ComfyUI name, original rows and bias expected.
        The bias is on a 1/64 grid in [-1, 1), so bias + 1 of the scale chunks is exact in bf16."""
        layer = SimpleNamespace(
            codes=torch.randint(0, 16, (N, K), generator=self.g, dtype=torch.uint8),
            scales=(torch.rand(N, K // 64, generator=self.g) * 0.01 + 0.001).to(torch.bfloat16),
            zeros=self.rand(N, K // 64, scale=0.05).to(torch.bfloat16),
            bias=torch.randint(-64, 64, (N,), generator=self.g).double() / 64)
        self.tensors.update(oracle.w4a16_tensors(name, layer, S, group_rows=0))
        w = layer.codes.double() * layer.scales.double().repeat_interleave(64, 1) \
            + layer.zeros.double().repeat_interleave(64, 1)
        self.expected[name] = Expect("w4a16", w, layer.bias, source=name)

    def plain(self, key: str, *shape, comfy: Optional[str] = None, expect: bool = True) -> torch.Tensor:
        """A 16-bit tensor, expected under `comfy` (default: the same key) unless expect=False."""
        t = self.rand(*shape, scale=0.05).to(torch.bfloat16)
        self.tensors[key] = t
        if expect:
            self.expected[comfy or key] = Expect("plain", t, source=key)
        return t

    def linear(self, key: str, N: int, K: int, comfy: Optional[str] = None, bias: bool = True) -> None:
        self.plain(f"{key}.weight", N, K, comfy=f"{comfy or key}.weight")
        if bias:
            self.plain(f"{key}.bias", N, comfy=f"{comfy or key}.bias")

    # -- the models ------------------------------------------------------------------------------------------
    def build(self) -> "Builder":
        (self._qwen_image if self.family == "qwen_image" else self._zimage)()
        return self

    def _qwen_image(self) -> None:
        D, F, J, C = self.D, self.F, 64, 64    # J: joint_attention_dim (txt_norm), C: 2·2 patch × 16 channels
        for i in range(self.n_layers):
            b = f"transformer_blocks.{i}"
            for fused, parts in (("attn.to_qkv", ("to_q", "to_k", "to_v")),
                                 ("attn.add_qkv_proj", ("add_q_proj", "add_k_proj", "add_v_proj"))):
                self.expect_rows(f"{b}.{fused}", self.svdquant(f"{b}.{fused}", 3 * D, D, bias=True),
                                 [f"{b}.attn.{p}" for p in parts])
            for name, N, K in (("attn.to_out.0", D, D), ("attn.to_add_out", D, D),
                               ("img_mlp.net.0.proj", F, D), ("img_mlp.net.2", D, F),
                               ("txt_mlp.net.0.proj", F, D), ("txt_mlp.net.2", D, F)):
                rec = self.svdquant(f"{b}.{name}", N, K, bias=True, shifted=name.endswith("net.2"))
                self.expect_rows(f"{b}.{name}", rec, [f"{b}.{name}"])
            self.w4a16(f"{b}.img_mod.1", 6 * D, D)
            self.w4a16(f"{b}.txt_mod.1", 6 * D, D)
            for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                self.plain(f"{b}.attn.{n}.weight", 128)
        self.linear("img_in", D, C)
        self.plain("txt_norm.weight", J)
        self.linear("txt_in", D, J)
        self.linear("time_text_embed.timestep_embedder.linear_1", D, 256)
        self.linear("time_text_embed.timestep_embedder.linear_2", D, D)
        self.linear("norm_out.linear", 2 * D, D)
        self.linear("proj_out", C, D)

    def _zimage_block(self, b: str, quantized: bool, modulation: bool) -> None:
        D, F = self.D, self.F
        if quantized:
            self.expect_rows(f"{b}.attention.to_qkv", self.svdquant(f"{b}.attention.to_qkv", 3 * D, D, bias=False),
                             [f"{b}.attention.qkv"])
            self.expect_rows(f"{b}.attention.to_out.0", self.svdquant(f"{b}.attention.to_out.0", D, D, bias=False),
                             [f"{b}.attention.out"])
            # diffusers' SwiGLU projection: rows [value (w3) | gate (w1)]
            self.expect_rows(f"{b}.feed_forward.net.0.proj",
                             self.svdquant(f"{b}.feed_forward.net.0.proj", 2 * F, D, bias=False),
                             [f"{b}.feed_forward.w3", f"{b}.feed_forward.w1"])
            self.expect_rows(f"{b}.feed_forward.net.2", self.svdquant(f"{b}.feed_forward.net.2", D, F, bias=False),
                             [f"{b}.feed_forward.w2"])
        else:   # a skip_refiners file: the refiners in diffusers' 16-bit form after nunchaku's FeedForward swap
            q, k, v = (self.plain(f"{b}.attention.{p}.weight", D, D, expect=False) for p in ("to_q", "to_k", "to_v"))
            self.expected[f"{b}.attention.qkv.weight"] = Expect("plain", torch.cat([q, k, v]))
            self.plain(f"{b}.attention.to_out.0.weight", D, D, comfy=f"{b}.attention.out.weight")
            w31 = self.plain(f"{b}.feed_forward.net.0.proj.weight", 2 * F, D, expect=False)
            self.expected[f"{b}.feed_forward.w3.weight"] = Expect("plain", w31[:F])
            self.expected[f"{b}.feed_forward.w1.weight"] = Expect("plain", w31[F:])
            self.plain(f"{b}.feed_forward.net.2.weight", D, F, comfy=f"{b}.feed_forward.w2.weight")
        self.plain(f"{b}.attention.norm_q.weight", 128, comfy=f"{b}.attention.q_norm.weight")
        self.plain(f"{b}.attention.norm_k.weight", 128, comfy=f"{b}.attention.k_norm.weight")
        for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            self.plain(f"{b}.{n}.weight", D)
        if modulation:
            self.linear(f"{b}.adaLN_modulation.0", 4 * D, min(D, 256))

    def _zimage(self) -> None:
        D, C, CAP = self.D, 64, 64
        for i in range(self.n_layers):
            self._zimage_block(f"layers.{i}", True, True)
        for i in range(2):
            self._zimage_block(f"noise_refiner.{i}", not self.skip_refiners, True)
            self._zimage_block(f"context_refiner.{i}", not self.skip_refiners, False)
        self.linear("all_x_embedder.2-1", D, C, comfy="x_embedder")
        self.linear("all_final_layer.2-1.linear", C, D, comfy="final_layer.linear")
        self.linear("all_final_layer.2-1.adaLN_modulation.1", D, min(D, 256), comfy="final_layer.adaLN_modulation.1")
        self.linear("t_embedder.mlp.0", 1024, 256)
        self.linear("t_embedder.mlp.2", min(D, 256), 1024)
        self.plain("cap_embedder.0.weight", CAP)
        self.linear("cap_embedder.1", D, CAP)
        self.plain("x_pad_token", 1, D)
        self.plain("cap_pad_token", 1, D)

    # -- metadata and file -------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        qc = quantization_config(self.precision, self.R)
        if self.family == "qwen_image":
            config = {"_class_name": "QwenImageTransformer2DModel", "num_layers": self.n_layers,
                      "attention_head_dim": 128, "num_attention_heads": self.D // 128, "joint_attention_dim": 64,
                      "in_channels": 64, "out_channels": 16, "patch_size": 2, "axes_dims_rope": [16, 56, 56]}
            model_class = "NunchakuQwenImageTransformer2DModel"
        else:
            qc["skip_refiners"] = self.skip_refiners
            config = {"_class_name": "ZImageTransformer2DModel", "dim": self.D, "n_layers": self.n_layers,
                      "n_refiner_layers": 2, "n_heads": self.D // 128, "n_kv_heads": self.D // 128,
                      "cap_feat_dim": 64, "in_channels": 16, "all_patch_size": [2], "all_f_patch_size": [1]}
            model_class = "NunchakuZImageTransformer2DModel"
        return {"config": json.dumps(config), "comfy_config": json.dumps({"model_class": "unused"}),
                "model_class": model_class, "quantization_config": json.dumps(qc)}

    def write(self, path, tensors: Optional[dict] = None, metadata: Optional[dict] = None):
        oracle.write(path, self.tensors if tensors is None else tensors,
                     self.metadata() if metadata is None else metadata)
        return path
