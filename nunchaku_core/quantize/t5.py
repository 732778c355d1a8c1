"""Our T5 encoder quantizer: AWQ scale search on calibration text, then uint4 group-128 weights (W4A16),
written in Nunchaku's 4-bit T5 format (formats/nunchaku_t5.py).

AWQ (Lin et al. 2023) per block, on fp32 activations of the unquantized encoder:
  every group of linears that reads the same input X gets one per-input-channel scale s [K],
  s = mean|X|^α / sqrt(max · min) (normalised), α from ALPHAS. The linears become W·diag(s) and the op that
  produces X absorbs 1/s, so the fp model is unchanged while salient input channels get a finer 4-bit grid.
  The α with the smallest Σ‖X·Ŵᵀ − X·Wᵀ‖² (Ŵ = Deq(Q(W·diag(s)))/s, on a row sample) wins; α = 0 is
  plain round-to-nearest, so the search never does worse than RTN on the rows it sees.
  Groups and where 1/s goes (each fold is exact in fp32):
    q, k, v  <- layer[0].layer_norm.weight          o   <- rows of v   (attention is linear in v)
    wi_0, wi_1 (or wi) <- layer[1].layer_norm.weight   wo <- rows of wi_1 (gated: gelu(wi_0·x)·(wi_1·x) is
    linear in wi_1), or of wi for ReLU (ReLU is positively homogeneous); gelu without a gate: no wo scale.
  AWQ's weight-clipping search is not done. The next block sees the unquantized block's output (as AWQ).
Weights: quantize.quantize_w4a16 (asymmetric min/max per 128 inputs; zero = group min, stored as the
`scaled_zeros`), scales and zeros rounded to the file dtype.

Memory: the input is read one tensor at a time with positioned reads (flux_source.SafetensorsFile, no mmap)
and the output streamed (T5Writer), so the peak is one block's weights in fp32 plus the calibration
activations (T5-XXL: ~0.8 GB of block weights + B·L·d_ff·4 bytes), not the model.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..models.flux_source import SafetensorsFile
from ..formats import nunchaku_t5
from .svdquant import quantize_w4a16
from ..reference import dequantize_w4a16

ALPHAS = tuple(i / 20 for i in range(20))     # AWQ's grid: α = 0, 0.05, ..., 0.95
SEARCH_ROWS = 1024                            # activation rows the loss is measured on (seeded sample)
CALIB_LENGTH = 256                            # ComfyUI's Flux T5 pads every prompt to at least 256 tokens
PAD_ID, EOS_ID = 0, 1

# Default calibration text: short and long image prompts of the kind FLUX sees.
DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a windowsill in the afternoon sun",
    "A majestic lion standing on a rock at sunset, golden light, highly detailed, 8k photograph",
    "portrait of an old fisherman with a weathered face, deep wrinkles, wearing a yellow raincoat, dramatic lighting",
    "a futuristic city skyline at night with neon signs in Japanese, flying cars, rain-soaked streets",
    "watercolor painting of a small village by a lake, mountains in the background, soft pastel colors",
    "a bowl of ramen with a soft-boiled egg, green onions and chashu pork, steam rising, food photography",
    "an astronaut riding a horse on the surface of the moon, Earth in the sky, cinematic",
    "a hand-drawn sign that says 'OPEN 24 HOURS' hanging in the window of a diner",
    "close-up macro shot of a dewdrop on a spider web, bokeh background, morning light",
    "isometric 3D render of a cozy bedroom with plants, bookshelves and a sleeping dog, soft lighting",
    "medieval knight in ornate silver armor holding a glowing sword in a dark forest, fantasy art",
    "a minimalist logo of a mountain and a sun, flat design, two colors, white background",
    "children playing football on a dusty street in a small town, documentary photography, 35mm film",
    "an oil painting in the style of the impressionists of a garden with water lilies and a wooden bridge",
    "a red vintage sports car parked in front of a modern glass house, architectural photography",
    "a steaming cup of coffee on a wooden table next to an open book and reading glasses",
    "underwater scene of a coral reef with colorful fish and a sea turtle, sunlight rays from above",
    "a comic book panel of a superhero landing in a city street, speech bubble reading 'Not today!'",
    "snow-covered pine trees under the northern lights, long exposure, starry sky",
    "a robot barista making latte art in a busy cafe, people chatting in the background, warm tones",
    "anime style illustration of a girl with short blue hair reading under a cherry blossom tree",
    "an infographic poster explaining the water cycle with arrows, clouds, rain and rivers, clean vector style",
    "extreme wide shot of a lone hiker on a ridge above a sea of clouds at sunrise",
    "a tabby kitten and a golden retriever puppy sleeping together on a blanket",
)


# ----------------------------------------------------------------------------------- the fp32 T5 encoder

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5's layer norm: no mean, no bias. x: [..., D] fp32."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets of key − query offsets: half the buckets per direction; within a direction,
    offsets below half of those buckets get their own bucket, larger ones share log-spaced buckets up to
    max_distance."""
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    log_part = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                        * (half - exact)).long()
    log_part = log_part.clamp(max=half - 1)
    return bucket + torch.where(dist < exact, dist, log_part)


def position_bias(rel_bias: torch.Tensor, L: int, cfg: dict) -> torch.Tensor:
    """rel_bias [buckets, H] -> additive attention bias [1, H, L, L] fp32."""
    pos = torch.arange(L)
    buckets = relative_position_bucket(pos[None, :] - pos[:, None], cfg["relative_attention_num_buckets"],
                                       cfg["relative_attention_max_distance"])
    return rel_bias.float()[buckets].permute(2, 0, 1)[None]


def attention_context(h: torch.Tensor, wq, wk, wv, bias: torch.Tensor, H: int) -> torch.Tensor:
    """Multi-head self-attention up to (not including) the output projection. T5 does not scale the scores.
    h: [B, L, D] -> [B, L, H·d_kv]."""
    B, L, _ = h.shape

    def heads(w):
        return (h @ w.T).reshape(B, L, H, -1).transpose(1, 2)         # [B, H, L, d_kv]

    scores = heads(wq) @ heads(wk).transpose(-1, -2) + bias           # [B, H, L, L]
    ctx = scores.softmax(dim=-1) @ heads(wv)
    return ctx.transpose(1, 2).reshape(B, L, -1)


def activation(name: str):
    if name == "relu":
        return torch.relu
    return lambda a: torch.nn.functional.gelu(a, approximate="tanh")


def encoder_forward(weights: Mapping[str, torch.Tensor], cfg: dict, token_ids: torch.Tensor) -> torch.Tensor:
    """The unquantized encoder in fp32 (no attention mask, as ComfyUI runs FLUX's T5): token_ids [B, L] ->
    last hidden state [B, L, D]. weights: file key -> tensor (linears as `<name>.weight`)."""
    w = {k: v.float() for k, v in weights.items()}
    eps, act = cfg["layer_norm_epsilon"], activation(cfg["dense_act_fn"])
    x = w["shared.weight"][token_ids]
    bias = None
    for i in range(cfg["num_layers"]):
        b = f"encoder.block.{i}.layer"
        rel = w.get(f"{b}.0.SelfAttention.relative_attention_bias.weight")
        if rel is not None:
            bias = position_bias(rel, token_ids.shape[1], cfg)
        a = {n: w[f"{b}.0.SelfAttention.{n}.weight"] for n in ("q", "k", "v", "o")}
        ctx = attention_context(rms_norm(x, w[f"{b}.0.layer_norm.weight"], eps), a["q"], a["k"], a["v"], bias,
                                cfg["num_heads"])
        x = x + ctx @ a["o"].T
        h = rms_norm(x, w[f"{b}.1.layer_norm.weight"], eps)
        f = f"{b}.1.DenseReluDense"
        if cfg["is_gated_act"]:
            inner = act(h @ w[f"{f}.wi_0.weight"].T) * (h @ w[f"{f}.wi_1.weight"].T)
        else:
            inner = act(h @ w[f"{f}.wi.weight"].T)
        x = x + inner @ w[f"{f}.wo.weight"].T
    return rms_norm(x, w["encoder.final_layer_norm.weight"], eps)


# --------------------------------------------------------------------------------------------- the search

def fake_quant(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Deq(Q(w)) with the exact quantizer the file gets (group 128, scales/zeros rounded to dtype), fp32."""
    return dequantize_w4a16(quantize_w4a16(w, None, group_size=nunchaku_t5.GROUP_SIZE, dtype=dtype))


def search_scale(x: torch.Tensor, weights: Sequence[torch.Tensor], loss: Callable[[list], float],
                 dtype: torch.dtype, alphas: Sequence[float] = ALPHAS) -> tuple[torch.Tensor, float, float, float]:
    """AWQ scale for the linears `weights` that share the input x [..., K] fp32.
    loss(Ŵs) -> relative error of the inspected module's output with the linears replaced by Ŵs (fp32).
    Returns (s [K], best α, error at α = 0 (RTN), error at the best α)."""
    mean_abs = x.reshape(-1, x.shape[-1]).abs().mean(dim=0).clamp(min=1e-5)     # [K]
    best = None
    for alpha in alphas:
        s = mean_abs.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = loss([fake_quant(w * s, dtype) / s for w in weights])
        if best is None or err < best[0]:
            best = (err, alpha, s)
        if alpha == 0:
            rtn = err
    return best[2], best[1], rtn, best[0]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


# ----------------------------------------------------------------------------------------------- the input

class T5Source:
    """An unquantized T5 encoder: one .safetensors file, or a folder of shards (e.g. diffusers'
    text_encoder_2). Keys may carry a prefix (found from `encoder.final_layer_norm.weight`).
    Tensors come back as fp32."""

    def __init__(self, path, config: Optional[dict] = None):
        p = Path(path)
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        if not files:
            raise ValueError(f"{path}: no .safetensors files in this folder")
        self.path = str(path)
        self.files = [SafetensorsFile(f) for f in files]
        self.where = {k: f for f in self.files for k in f.entries}
        final = [k for k in self.where if k.endswith("encoder.final_layer_norm.weight")]
        if not final:
            raise ValueError(f"{path}: no encoder.final_layer_norm.weight: not a T5 encoder "
                             f"(keys start with {sorted(self.where)[:3]})")
        self.prefix = final[0][: -len("encoder.final_layer_norm.weight")]
        quantized = [k for k in self.where
                     if k.endswith((".qweight", ".scaled_zeros", ".scale_weight", ".weight_scale"))]
        if quantized:
            raise ValueError(f"{path}: already quantized ({quantized[0]}); quantize-t5 needs a 16/32-bit T5")
        raw = config
        if raw is None and "config" in self.files[0].metadata:
            raw = json.loads(self.files[0].metadata["config"])
        if raw is None and p.is_dir() and (p / "config.json").exists():
            raw = json.loads((p / "config.json").read_text())
        self.config = nunchaku_t5.normalize_config(raw if raw is not None else self._infer_config(),
                                                   f"{path}: T5 config")
        self._check_shapes()

    def has(self, key: str) -> bool:
        return self.prefix + key in self.where

    def shape(self, key: str) -> tuple:
        return self.where[self.prefix + key].shape(self.prefix + key)

    def get(self, key: str) -> torch.Tensor:
        if key == "shared.weight" and not self.has(key):
            key = "encoder.embed_tokens.weight"
        if not self.has(key):
            raise ValueError(f"{self.path}: missing tensor {self.prefix + key}")
        return self.where[self.prefix + key].read(self.prefix + key).float()

    def _infer_config(self) -> dict:
        """Sizes from the weight shapes. The activation is not in the weights: gated FF means T5 v1.1
        (gated tanh-GELU, FLUX's T5-XXL), ungated means the original T5 (ReLU)."""
        emb = "shared.weight" if self.has("shared.weight") else "encoder.embed_tokens.weight"
        vocab, D = self.shape(emb)
        keys = [k[len(self.prefix):] for k in self.where]
        blocks = {int(k.split(".")[2]) for k in keys if k.startswith("encoder.block.")}
        b0 = "encoder.block.0.layer"
        inner = self.shape(f"{b0}.0.SelfAttention.q.weight")[0]
        buckets, H = self.shape(f"{b0}.0.SelfAttention.relative_attention_bias.weight")
        gated = self.has(f"{b0}.1.DenseReluDense.wi_0.weight")
        F = self.shape(f"{b0}.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight")[0]
        return dict(vocab_size=vocab, d_model=D, d_kv=inner // H, d_ff=F, num_heads=H, num_layers=max(blocks) + 1,
                    is_gated_act=gated, dense_act_fn="gelu_pytorch_tanh" if gated else "relu",
                    relative_attention_num_buckets=buckets)

    def _check_shapes(self) -> None:
        cfg = self.config
        want = dict(nunchaku_t5.plain_shapes(cfg))
        want.update({f"{n}.weight": s for n, s in nunchaku_t5.linear_shapes(cfg).items()})
        if not self.has("shared.weight"):
            want["encoder.embed_tokens.weight"] = want.pop("shared.weight")
        for key, shape in want.items():
            if not self.has(key):
                raise ValueError(f"{self.path}: missing tensor {self.prefix + key} for the T5 config "
                                 f"(num_layers={cfg['num_layers']}, d_model={cfg['d_model']}, d_ff={cfg['d_ff']})")
            if self.shape(key) != tuple(shape):
                raise ValueError(f"{self.path}: {self.prefix + key} has shape {list(self.shape(key))}, expected "
                                 f"{list(shape)} from the T5 config (d_model={cfg['d_model']}, d_ff={cfg['d_ff']}, "
                                 f"d_kv={cfg['d_kv']}, num_heads={cfg['num_heads']})")


def tokenize(prompts: Sequence[str], tokenizer_path: str, length: int = CALIB_LENGTH) -> torch.Tensor:
    """Token ids [B, length] as ComfyUI feeds FLUX's T5: the prompt, </s>, then pad tokens (no attention
    mask). Longer prompts are cut to length − 1 tokens + </s>. tokenizer_path: a Hugging Face tokenizer.json
    (ComfyUI ships T5's at comfy/text_encoders/t5_tokenizer/tokenizer.json)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError("the `tokenizers` package is needed to tokenize calibration text: "
                         "pip install tokenizers") from None
    tok = Tokenizer.from_file(os.fspath(tokenizer_path))
    out = torch.full((len(prompts), length), PAD_ID, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = [t for t in tok.encode(p, add_special_tokens=False).ids][: length - 1] + [EOS_ID]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


# ------------------------------------------------------------------------------------------------ the driver

def scale_block(W: dict, x: torch.Tensor, bias: torch.Tensor, cfg: dict, block: str, report: dict, *,
                dtype: torch.dtype, alphas: Sequence[float], seqs: slice, rows: torch.Tensor) -> torch.Tensor:
    """AWQ on one block, in place. W: short name (q, k, v, o, wi_0, wi_1 or wi, wo, ln0, ln1) -> fp32 tensor;
    on return the linears carry their scales and ln0 / ln1 / v / wi_1 (or wi) the inverses, so the fp block
    computes the same function. x: the block input [B, L, D]; returns the block output. block: the key
    prefix `encoder.block.{i}.layer`, for the report entries. seqs / rows: the sequences and flat rows the
    losses are measured on (the attention loss needs whole sequences)."""
    eps, H, gated = cfg["layer_norm_epsilon"], cfg["num_heads"], cfg["is_gated_act"]
    act = activation(cfg["dense_act_fn"])
    att, ffp = f"{block}.0.SelfAttention", f"{block}.1.DenseReluDense"
    ff_in = ("wi_0", "wi_1") if gated else ("wi",)
    B, L, _ = x.shape

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B * L, -1)[rows]

    def scale_group(inp, names, prefix, loss):
        s, alpha, e0, e1 = search_scale(inp, [W[n] for n in names], loss, dtype, alphas)
        for n in names:
            report[f"{prefix}.{n}"] = {"alpha": alpha, "err_rtn": e0, "err_awq": e1}
        return s

    def mlp_inner(h, w_in):
        a = act(h @ w_in[0].T)
        return a * (h @ w_in[1].T) if gated else a

    # q, k, v read ln0's output; inspected module: the attention output (through o, unquantized)
    h = rms_norm(x, W["ln0"], eps)
    ctx = attention_context(h, W["q"], W["k"], W["v"], bias, H)
    hs, want = h[seqs], ctx[seqs] @ W["o"].T
    s = scale_group(h, ("q", "k", "v"), att,
                    lambda ws: relative_error(attention_context(hs, *ws, bias, H) @ W["o"].T, want))
    W["ln0"] = W["ln0"] / s
    for n in ("q", "k", "v"):
        W[n] = W[n] * s
    # o reads the attention context, which is linear in v's rows
    c = flat(ctx)
    want = c @ W["o"].T
    s = scale_group(ctx, ("o",), att, lambda ws: relative_error(c @ ws[0].T, want))
    W["v"], W["o"] = W["v"] / s[:, None], W["o"] * s
    x = x + (ctx / s) @ W["o"].T                                      # v's rows carry 1/s, so ctx does

    # wi_* read ln1's output; inspected module: the whole MLP (through wo, unquantized)
    h = rms_norm(x, W["ln1"], eps)
    inner = mlp_inner(h, [W[n] for n in ff_in])
    hr, want = flat(h), flat(inner) @ W["wo"].T
    s = scale_group(h, ff_in, ffp, lambda ws: relative_error(mlp_inner(hr, ws) @ W["wo"].T, want))
    W["ln1"] = W["ln1"] / s
    for n in ff_in:
        W[n] = W[n] * s
    # wo reads act(wi_0·h)·(wi_1·h), linear in wi_1's rows; act(wi·h) only for ReLU (positively homogeneous)
    fold = "wi_1" if gated else ("wi" if cfg["dense_act_fn"] == "relu" else None)
    r = flat(inner)
    want = r @ W["wo"].T
    s = scale_group(inner, ("wo",), ffp, lambda ws: relative_error(r @ ws[0].T, want))
    if fold is None:                                                  # no op can absorb 1/s: wo stays RTN
        s = torch.ones_like(s)
        report[f"{ffp}.wo"].update(alpha=0.0, err_awq=report[f"{ffp}.wo"]["err_rtn"])
    else:
        W[fold], W["wo"] = W[fold] / s[:, None], W["wo"] * s
    return x + (inner / s) @ W["wo"].T


def quantize_t5(source: T5Source, output: str, token_ids: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16,
                alphas: Sequence[float] = ALPHAS, search_rows: int = SEARCH_ROWS, seed: int = 0,
                progress: Optional[Callable[[int, int], None]] = None) -> dict[str, dict]:
    """Quantize every linear of the encoder and stream the 4-bit file to `output`.
    token_ids: [B, L] calibration tokens. Returns {linear name: {"alpha", "err_rtn", "err_awq"}}: the α of
    the linear's input group and the relative error of the inspected module's output at α = 0 and at α."""
    cfg = source.config
    if int(token_ids.max()) >= cfg["vocab_size"]:
        raise ValueError(f"calibration token id {int(token_ids.max())} >= vocab_size {cfg['vocab_size']}: "
                         f"the tokenizer does not belong to this T5")
    linears = nunchaku_t5.linear_shapes(cfg)
    report: dict[str, dict] = {}
    B, L = token_ids.shape
    seqs = slice(0, max(1, min(B, search_rows // L)))
    rows = torch.randperm(B * L, generator=torch.Generator().manual_seed(seed))[: min(search_rows, B * L)]

    with nunchaku_t5.T5Writer(output, cfg, linears, dtype) as out:
        shared = source.get("shared.weight")
        x = shared[token_ids]                                            # x: [B, L, D] fp32
        out.put_tensor("shared.weight", shared)
        del shared
        bias = None
        for i in range(cfg["num_layers"]):
            block = f"encoder.block.{i}.layer"
            keys = {n.rsplit(".", 1)[1]: f"{n}.weight" for n in linears if n.startswith(block + ".")}
            keys.update(ln0=f"{block}.0.layer_norm.weight", ln1=f"{block}.1.layer_norm.weight")
            W = {n: source.get(k) for n, k in keys.items()}
            rel_key = f"{block}.0.SelfAttention.relative_attention_bias.weight"
            rel = source.get(rel_key) if source.has(rel_key) else None
            if rel is not None:
                bias = position_bias(rel, L, cfg)
            x = scale_block(W, x, bias, cfg, block, report, dtype=dtype, alphas=alphas, seqs=seqs, rows=rows)
            for key in out.order:
                if nunchaku_t5.block_of(key) != i:
                    continue
                name, suffix = key.rsplit(".", 1)
                short = name.rsplit(".", 1)[1]
                if key == rel_key:
                    out.put_tensor(key, rel)
                elif short == "layer_norm":
                    out.put_tensor(key, W["ln0"] if key == keys["ln0"] else W["ln1"])
                elif suffix == "qweight":
                    out.put_linear(name, quantize_w4a16(W[short], None, group_size=nunchaku_t5.GROUP_SIZE,
                                                        dtype=dtype))
            del W
            if progress is not None:
                progress(i + 1, cfg["num_layers"])
        out.put_tensor("encoder.final_layer_norm.weight", source.get("encoder.final_layer_norm.weight"))
    return report


# ----------------------------------------------------------------------------------------------------- CLI

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p) -> None:
    p.add_argument("input", help="unquantized T5 encoder: .safetensors (e.g. ComfyUI's t5xxl_fp16.safetensors) "
                                 "or a folder of shards (diffusers text_encoder_2)")
    p.add_argument("output", help="output .safetensors in Nunchaku's 4-bit T5 format")
    p.add_argument("--tokenizer", help="T5 tokenizer.json for the calibration text (ComfyUI ships it at "
                                       "comfy/text_encoders/t5_tokenizer/tokenizer.json)")
    p.add_argument("--prompts", help="calibration prompts, one per line (default: 24 built-in image prompts)")
    p.add_argument("--calib-length", type=int, default=CALIB_LENGTH,
                   help="tokens per prompt after padding, as ComfyUI's Flux T5 sees them (default %(default)s)")
    p.add_argument("--config", help="T5Config JSON file, when the input has no config metadata or config.json "
                                    "(default: inferred from the weight shapes)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of scales and 16-bit tensors")
    p.add_argument("--search-rows", type=int, default=SEARCH_ROWS, help="activation rows for the AWQ loss")
    p.add_argument("--rtn", action="store_true", help="skip the AWQ search (plain round-to-nearest)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    from tqdm import tqdm

    config = json.loads(Path(args.config).read_text()) if args.config else None
    source = T5Source(args.input, config)
    if args.tokenizer is None:
        raise ValueError("--tokenizer is required: the T5 tokenizer.json, e.g. "
                         "ComfyUI/comfy/text_encoders/t5_tokenizer/tokenizer.json")
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{args.prompts}: no prompts (one per line)")
    ids = tokenize(prompts, args.tokenizer, args.calib_length)
    bar = tqdm(total=source.config["num_layers"], desc="quantize-t5", unit="block", disable=args.quiet)

    def progress(done, total):
        bar.update(done - bar.n)

    report = quantize_t5(source, args.output, ids, dtype=DTYPES[args.dtype], alphas=(0.0,) if args.rtn else ALPHAS,
                         search_rows=args.search_rows, progress=progress)
    bar.close()
    rtn = sum(r["err_rtn"] for r in report.values()) / len(report)
    awq = sum(r["err_awq"] for r in report.values()) / len(report)
    print(f"quantized {len(report)} linears of {source.config['num_layers']} blocks to uint4 group "
          f"{nunchaku_t5.GROUP_SIZE}; mean relative output error on calibration rows: RTN {rtn:.4f}, AWQ {awq:.4f}")
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2**30:.2f} GiB)")
    return 0
