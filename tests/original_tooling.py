"""Build FLUX checkpoints with the ORIGINAL Nunchaku tooling, and their expected effective weights.

The packer is DeepCompressor's Nunchaku backend (`deepcompressor.backend.nunchaku.convert`, PyPI package
`deepcompressor-toolkit`, installed with --no-deps by scripts/setup_env.sh): the code that produced the
published Nunchaku checkpoints. We hand it quantized layers in its own input convention (diffusers names,
`{layer}.weight` holding the fake-quantized weight, scales in `scale_dict`, smoothing in `smooth_dict`,
low-rank branches in `branch_dict`, shifts as `{layer}.shift`) and let it write the legacy folder
(`transformer_blocks.safetensors` + `unquantized_layers.safetensors`), exactly as its `__main__` does.

Alongside, every expected effective BFL tensor is computed here in float64 straight from the codes and
scales we generated, with none of our reader, packing or reference code involved.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

SIGMA = 0.171875
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                    dtype=torch.float64)


class Builder:
    def __init__(self, precision: str, rank: int, hidden: int = 256, mlp_ratio: int = 4, seed: int = 0,
                 context_dim: int = 64, vec_dim: int = 32, in_channels: int = 64, guidance: bool = True):
        self.precision, self.rank, self.D, self.F = precision, rank, hidden, hidden * mlp_ratio
        self.g = torch.Generator().manual_seed(seed)
        self.ctx, self.vec, self.inc, self.guidance = context_dim, vec_dim, in_channels, guidance
        self.state, self.scales, self.smooths, self.branches = {}, {}, {}, {}
        self.expected: dict[str, torch.Tensor] = {}   # BFL key -> float64 tensor

    # -- random pieces -------------------------------------------------------------------------------------
    def rand(self, *shape, scale=1.0):
        return torch.randn(*shape, generator=self.g, dtype=torch.float64) * scale

    def w4a4(self, name: str, N: int, K: int, *, smooth: torch.Tensor | None, smooth_fused: bool = False,
             shift: bool = False, with_bias: bool = True):
        """Register one W4A4 layer in DeepCompressor's convention. Returns a dict of float64 tensors as the
        Nunchaku runtime sees the file: `main` = out_scale·Deq/s_rt, `up` [N, R], `down` [R, K] (as stored),
        `a` (DeepCompressor's unsmoothed down) and `bias` = stored bias + σ·rowsum(main) (the effective bias),
        so Weff = main + up·down."""
        R = self.rank
        if self.precision == "int4":
            codes = torch.randint(-8, 8, (N, K), generator=self.g)
            scale = (torch.rand(N, K // 64, generator=self.g, dtype=torch.float64) * 0.02 + 0.001).to(torch.bfloat16)
            deq = codes.double() * scale.double().repeat_interleave(64, 1)
            self.state[f"{name}.weight"] = deq.to(torch.bfloat16)
            self.scales[f"{name}.weight.scale.0"] = scale.view(N, 1, K // 64, 1)
            out_scale = torch.ones(N, dtype=torch.float64)
        else:
            codes = torch.randint(0, 16, (N, K), generator=self.g)
            codes[codes == 8] = 0  # -0.0 and +0.0 are the same value; keep the codes unambiguous
            sub = (torch.rand(N, K // 16, generator=self.g) * 2 + 0.25).to(torch.float8_e4m3fn).to(torch.bfloat16)
            tensor_scale = torch.tensor(0.0123, dtype=torch.bfloat16)
            deq = E2M1[codes] * sub.double().repeat_interleave(16, 1)
            self.state[f"{name}.weight"] = (deq * tensor_scale.double()).to(torch.bfloat16)
            self.scales[f"{name}.weight.scale.0"] = tensor_scale.view(1, 1, 1, 1)
            self.scales[f"{name}.weight.scale.1"] = sub.view(N, 1, K // 16, 1)
            out_scale = torch.full((N,), tensor_scale.double().item(), dtype=torch.float64)
        bias = self.rand(N, scale=0.1).to(torch.bfloat16) if with_bias else None
        if bias is not None:
            self.state[f"{name}.bias"] = bias
        a = self.rand(R, K, scale=0.05).to(torch.bfloat16)      # DeepCompressor's lora "a" [R, K]
        b = self.rand(N, R, scale=0.05).to(torch.bfloat16)      # "b" [N, R]
        s_rt = torch.ones(K, dtype=torch.float64)
        down_exact = a.double()
        if smooth is not None and not smooth_fused:
            s_rt = smooth.double()
            down_exact = a.double() / smooth.double()[None, :]
        down = down_exact.to(torch.bfloat16).double()           # the converter stores lora_down in bf16
        main = out_scale[:, None] * deq / s_rt[None, :]
        stored_bias = bias.double() if bias is not None else torch.zeros(N, dtype=torch.float64)
        if shift:
            # the converter folds the branch's shift term in float64 BEFORE rounding lora_down to bf16
            stored_bias = stored_bias + b.double() @ down_exact @ torch.full((K,), SIGMA, dtype=torch.float64)
        stored_bias = stored_bias.to(torch.bfloat16).double()
        b_eff = stored_bias + (SIGMA * main.sum(1) if shift else 0)
        return {"main": main, "up": b.double(), "down": down, "a": a, "b": b, "bias": b_eff}

    def w4a16(self, name: str, N: int, K: int):
        """adaLN layer: weight (q-7)·scale (group 64) and a bias; expected dequantized weight/bias."""
        q = torch.randint(0, 16, (N, K), generator=self.g)
        scale = (torch.rand(N, K // 64, generator=self.g) * 0.01 + 0.001).to(torch.bfloat16)
        s64 = scale.double().repeat_interleave(64, 1)
        self.state[f"{name}.weight"] = ((q - 7).double() * s64).to(torch.bfloat16)
        self.scales[f"{name}.weight.scale.0"] = scale.view(N, 1, K // 64, 1)
        bias = self.rand(N, scale=0.1).to(torch.bfloat16)
        self.state[f"{name}.bias"] = bias
        zero = (7.0 * scale.float()).to(torch.bfloat16).double().repeat_interleave(64, 1)  # stored as -bf16(7·s)
        w = q.double() * s64 - zero
        splits = N // K
        folded = torch.zeros(splits, dtype=torch.float64)
        folded[1] = folded[-2] = 1.0
        b = bias.double().view(splits, -1)
        # the +1 is folded in bf16 by the converter, so what the file can give back is bf16(b + 1) - 1
        b = ((b + folded[:, None]).to(torch.bfloat16).double() - folded[:, None]).reshape(N)
        return w, b

    def plain(self, name: str, *shape):
        t = self.rand(*shape, scale=0.05).to(torch.bfloat16)
        self.state[name] = t
        return t.double()

    # -- the model -----------------------------------------------------------------------------------------
    def expect(self, key: str, main: torch.Tensor, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor):
        """Record an expected W4A4-derived BFL linear and the magnitude bound of its terms:
        bound[n, k] = |main[n, k]| + Σ_r |up[n, r]|·|down[r, k]|, which scales the float32 rounding error."""
        self.expected[f"{key}.weight"] = main + up @ down
        self.expected[f"{key}.bias"] = bias
        self.bounds[f"{key}.weight"] = main.abs() + up.abs() @ down.abs()

    def fused_qkv(self, block: str, names: list[str], smooth: torch.Tensor, branch_key: str):
        """q, k, v quantized separately, sharing one smoothing vector and ONE low-rank branch [3D x R]
        (DeepCompressor registers it under `branch_key`); the converter concatenates them into qkv_proj."""
        D = self.D
        parts = [self.w4a4(f"{block}.{n}", D, D, smooth=smooth) for n in names]
        a = parts[0]["a"]
        b = torch.cat([p["b"] for p in parts], 0)
        self.branches[branch_key] = {"a.weight": a, "b.weight": b}
        down = (a.double() / smooth.double()[None, :]).to(torch.bfloat16).double()
        main = torch.cat([p["main"] for p in parts], 0)
        bias = torch.cat([p["bias"] for p in parts], 0)
        return main, b.double(), down, bias

    def linear(self, name: str, N: int, K: int, smooth, *, fused=False, shifted=False, bias=True):
        """One W4A4 layer with its own branch (and shift key for post-GELU layers)."""
        rec = self.w4a4(name, N, K, smooth=smooth, smooth_fused=fused, shift=shifted, with_bias=bias)
        self.branches[name] = {"a.weight": rec["a"], "b.weight": rec["b"]}
        if shifted:  # DeepCompressor wraps shifted layers: weight at X.linear.weight, shift at X.shift
            self.state[f"{name.removesuffix('.linear')}.shift"] = torch.tensor([SIGMA], dtype=torch.float64)
        return rec["main"], rec["up"], rec["down"], rec["bias"]

    def smooth_vec(self, K: int) -> torch.Tensor:
        return torch.rand(K, generator=self.g, dtype=torch.float64).add(0.5).to(torch.bfloat16)

    def build(self):
        D, F, E = self.D, self.F, self.expected
        self.bounds: dict[str, torch.Tensor] = {}
        shift = self.precision == "int4"   # the σ shift exists only in INT4 files

        blk, bfl = "transformer_blocks.0", "double_blocks.0"
        E[f"{bfl}.img_mod.lin.weight"], E[f"{bfl}.img_mod.lin.bias"] = self.w4a16(f"{blk}.norm1.linear", 6 * D, D)
        E[f"{bfl}.txt_mod.lin.weight"], E[f"{bfl}.txt_mod.lin.bias"] = self.w4a16(f"{blk}.norm1_context.linear", 6 * D, D)
        s_img, s_txt, s_out, s_fc1, s_fc2 = (self.smooth_vec(k) for k in (D, D, D, D, F))
        self.smooths.update({f"{blk}.attn.to_q": s_img, f"{blk}.attn.add_k_proj": s_txt, f"{blk}.attn.to_out.0": s_out,
                             f"{blk}.ff.net.0.proj": s_fc1, f"{blk}.ff.net.2.linear": s_fc2,
                             f"{blk}.ff_context.net.0.proj": s_fc1, f"{blk}.ff_context.net.2.linear": s_fc2})
        self.expect(f"{bfl}.img_attn.qkv", *self.fused_qkv(blk, ["attn.to_q", "attn.to_k", "attn.to_v"], s_img,
                                                          f"{blk}.attn.to_q"))
        self.expect(f"{bfl}.txt_attn.qkv", *self.fused_qkv(blk, ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
                                                          s_txt, f"{blk}.attn.add_k_proj"))
        # The converter fuses the smoothing of every out_proj into the previous layer: smooth = ones in the
        # file (smooth_orig keeps the vector) and the low-rank down-projection is not divided by it.
        # out_proj_context takes its smoothing from attn.to_out.0, as the converter's smooth_name_map says.
        self.expect(f"{bfl}.img_attn.proj", *self.linear(f"{blk}.attn.to_out.0", D, D, s_out, fused=True))
        self.expect(f"{bfl}.txt_attn.proj", *self.linear(f"{blk}.attn.to_add_out", D, D, s_out, fused=True))
        self.expect(f"{bfl}.img_mlp.0", *self.linear(f"{blk}.ff.net.0.proj", F, D, s_fc1))
        self.expect(f"{bfl}.img_mlp.2", *self.linear(f"{blk}.ff.net.2.linear", D, F, s_fc2, shifted=shift))
        self.expect(f"{bfl}.txt_mlp.0", *self.linear(f"{blk}.ff_context.net.0.proj", F, D, s_fc1))
        self.expect(f"{bfl}.txt_mlp.2", *self.linear(f"{blk}.ff_context.net.2.linear", D, F, s_fc2, shifted=shift))
        for dk, bk in (("attn.norm_q", "img_attn.norm.query_norm.scale"), ("attn.norm_k", "img_attn.norm.key_norm.scale"),
                       ("attn.norm_added_q", "txt_attn.norm.query_norm.scale"),
                       ("attn.norm_added_k", "txt_attn.norm.key_norm.scale")):
            E[f"{bfl}.{bk}"] = self.plain(f"{blk}.{dk}.weight", 128)

        # single block: linear1 rows = [qkv | mlp_fc1], linear2 input columns = [out_proj | mlp_fc2]
        blk, bfl = "single_transformer_blocks.0", "single_blocks.0"
        E[f"{bfl}.modulation.lin.weight"], E[f"{bfl}.modulation.lin.bias"] = self.w4a16(f"{blk}.norm.linear", 3 * D, D)
        s_in, s_o, s_m = self.smooth_vec(D), self.smooth_vec(D), self.smooth_vec(F)
        self.smooths.update({f"{blk}.attn.to_q": s_in, f"{blk}.proj_out.linears.0": s_o,
                             f"{blk}.proj_out.linears.1.linear": s_m})
        q = self.fused_qkv(blk, ["attn.to_q", "attn.to_k", "attn.to_v"], s_in, f"{blk}.attn.to_q")
        m = self.linear(f"{blk}.proj_mlp", F, D, s_in)
        rank = q[1].shape[1]
        self.expect(f"{bfl}.linear1", torch.cat([q[0], m[0]]),
                    torch.block_diag(q[1], m[1]), torch.cat([q[2], m[2]]), torch.cat([q[3], m[3]]))
        o = self.linear(f"{blk}.proj_out.linears.0", D, D, s_o, fused=True, bias=False)
        f2 = self.linear(f"{blk}.proj_out.linears.1.linear", D, F, s_m, shifted=shift)
        self.expect(f"{bfl}.linear2", torch.cat([o[0], f2[0]], 1), torch.cat([o[1], f2[1]], 1),
                    torch.block_diag(o[2], f2[2]), o[3] + f2[3])
        assert rank == self.rank
        for dk, bk in (("attn.norm_q", "norm.query_norm.scale"), ("attn.norm_k", "norm.key_norm.scale")):
            E[f"{bfl}.{bk}"] = self.plain(f"{blk}.{dk}.weight", 128)

        # unquantized layers (diffusers names), which the converter passes through untouched
        unq = [("x_embedder", "img_in", D, self.inc), ("context_embedder", "txt_in", D, self.ctx),
               ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer", D, 256),
               ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer", D, D),
               ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer", D, self.vec),
               ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer", D, D),
               ("proj_out", "final_layer.linear", self.inc, D), ("norm_out.linear", "final_layer.adaLN_modulation.1", 2 * D, D)]
        if self.guidance:
            unq += [("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer", D, 256),
                    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer", D, D)]
        for dname, bname, N, K in unq:
            w, b = self.plain(f"{dname}.weight", N, K), self.plain(f"{dname}.bias", N)
            if dname == "norm_out.linear":  # diffusers (scale, shift) -> BFL (shift, scale)
                w, b = torch.cat(w.chunk(2)[::-1]), torch.cat(b.chunk(2)[::-1])
            E[f"{bname}.weight"], E[f"{bname}.bias"] = w, b
        return self

    # -- running the original converter -------------------------------------------------------------------
    def convert(self):
        from deepcompressor.backend.nunchaku.convert import convert_to_nunchaku_flux_state_dicts

        return convert_to_nunchaku_flux_state_dicts(self.state, self.scales, self.smooths, self.branches,
                                                    float_point=self.precision == "nvfp4")

    def comfy_config(self) -> dict:
        return {"model_class": "Flux" if self.guidance else "FluxSchnell", "model_config": {
            "image_model": "flux", "in_channels": self.inc // 4, "out_channels": 16, "vec_in_dim": self.vec,
            "context_in_dim": self.ctx, "hidden_size": self.D, "mlp_ratio": 4.0, "num_heads": self.D // 128,
            "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
            "qkv_bias": True, "guidance_embed": self.guidance}}

    def write_legacy_folder(self, folder: str) -> str:
        """What the converter's __main__ writes (plus the JSON side files nunchaku's loader reads)."""
        blocks, other = self.convert()
        os.makedirs(folder, exist_ok=True)
        save_file(blocks, os.path.join(folder, "transformer_blocks.safetensors"))
        save_file(other, os.path.join(folder, "unquantized_layers.safetensors"))
        with open(os.path.join(folder, "comfy_config.json"), "w") as f:
            json.dump(self.comfy_config(), f)
        return folder

    def write_single_file(self, path: str) -> str:
        """The legacy folder merged into one file with the v1 metadata, as Nunchaku's merge step does."""
        blocks, other = self.convert()
        qc = {"method": "svdquant",
              "weight": {"dtype": "int4" if self.precision == "int4" else "fp4_e2m1_all",
                         "scale_dtype": None if self.precision == "int4" else [None, "fp8_e4m3_nan"],
                         "group_size": 64 if self.precision == "int4" else 16},
              "activation": {"dtype": "int4" if self.precision == "int4" else "fp4_e2m1_all",
                             "scale_dtype": None if self.precision == "int4" else "fp8_e4m3_nan",
                             "group_size": 64 if self.precision == "int4" else 16},
              "rank": self.rank}
        meta = {"config": json.dumps({"_class_name": "FluxTransformer2DModel", "num_layers": 1, "num_single_layers": 1,
                                      "attention_head_dim": 128, "num_attention_heads": self.D // 128,
                                      "in_channels": self.inc, "joint_attention_dim": self.ctx,
                                      "pooled_projection_dim": self.vec, "guidance_embeds": self.guidance}),
                "comfy_config": json.dumps(self.comfy_config()),
                "model_class": "NunchakuFluxTransformer2dModel",
                "quantization_config": json.dumps(qc)}
        save_file({**blocks, **other}, path, metadata=meta)
        return path
