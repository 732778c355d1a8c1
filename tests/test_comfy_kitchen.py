"""Files our quantizer writes in ComfyUI's native layout (nunchaku_core/quantize/model.py through
comfy_native.svdquant_to_comfy / w4a16_to_comfy) run in comfy-kitchen's own eager `svdquant_w4a4` / `awq_w4a16`
code (PyPI comfy-kitchen 0.2.31, ComfyUI 0.33's pin) with the outputs of our reference (nunchaku_core.reference) on
the same inputs, within the bounds derived below. The kitchen side is built only from the tensors read back from
disk with safetensors, as bench/bench_layers.py's kitchen_linear builds it: QuantizedTensor(weight, layout,
Params(scale = weight_scale, proj_down, proj_up, smooth_factor, act_unsigned from comfy_quant; or zeros =
weight_zeros, group_size)), run through F.linear; and its own serialization (QuantizedTensor.state_dict) must give
back our file's key names and bytes.

Two storage dtypes: bf16 (what ComfyUI files hold) and fp32. comfy-kitchen computes in the dtype of weight_scale
and needs the input in that dtype (its eager matmul refuses fp32 × bf16).

Notation, per element, in float64: u = 2^-24; r = the unit roundoff of one kitchen operation in the storage dtype:
u for fp32, 2^-8 + u + 2^-8·u for bf16 (torch computes a bf16 op in fp32, then rounds to bf16);
γ_n = n·u/(1 − n·u); W = weight code·scale (exact); a = activation code·activation scale (exact); S = Σ_k |a|·|W|;
S_lr = (|x|·|D|)·|U|ᵀ. An operation whose exact result is v, computed from operands carrying an error e, returns
v̂ with |v̂ − v| ≤ e + ρ·(|v| + e) for its rounding unit ρ (`step` below); the bounds apply that step by step.

(a) Activation codes. fp32: kitchen forms x/s, the group absmax/qmax, t/scale, round and clamp with the same fp32
    operations as reference.quantize_act_int4: codes and scales equal bit for bit. bf16: kitchen rounds each of
    x + σ, x/s, absmax/qmax and t/scale to bf16, so its pre-rounding value v' carries n = 4 roundings of r (signed;
    6 for σ-shifted layers: + σ on the element and on the group's absmax element) where ours (fp32) carries n of u:
    |v' − v| ≤ δ·|v|, δ = 2·(((1 − r)(1 − u))^-n − 1)·(1 − u)^-n. Codes may then differ by one step, and only where
    v lies within δ·|v| of the rounding tie between the two; scales by ≤ ((1 − r)(1 − u))^-(n/2 + 1) − 1,
    relatively. The low-rank input x·D is the same fp32 torch op on both sides: within 2·γ_K·|x|·|D|.
(b) SVDQuant layer, on kitchen's own quantized activations a' (asked from comfy_kitchen.quantize_svdquant_w4a4 the
    way its layer asks): kitchen dequantizes W and a' in the storage dtype (one rounding each: the products carry
    ≤ (2r + r²)·S'), multiplies with torch's matmul, which accumulates in fp32 (γ_K·(1 + r)²·S') and rounds once to
    the dtype (torch's CPU matmul, oneDNN or ATen's opmath gemm; measured on this machine with bf16 operands: the
    error beyond one final rounding ≤ 1e-5·2^-8·S), forms the low-rank term in fp32 ((γ_K + γ_R + γ_K·γ_R)·S_lr)
    and rounds it to the dtype, then adds it and the bias, each rounded. Expected: our layer (read back by our
    reader) applied exactly, Y' = Σ a'·W + (x·D)·Uᵀ + bias in float64 (its own error ≤ 2^-40·(S + S_lr), added).
    Our reference on its own codes: per-group products rounded twice (·sa, ·sw), K/G group terms summed, + the
    low-rank term and the bias in fp32, then one rounding to the input dtype. End to end,
    |kitchen − ours| ≤ B_kitchen + B_ours + |Σ W·(a' − a)|, the last term exact: how the two activation quantizers
    differ (zero in fp32).
(c) AWQ W4A16: kitchen forms w' = dtype(dtype((q − 8)·s) + z) (two roundings of r); ours w = fl32(q·s) + fl32(z − 8s)
    (the reader keeps zeros − 8·scale in fp32; three roundings of u). Both feed a matmul accumulating in fp32 (γ_K),
    then the bias (one rounding each) and our final rounding to the dtype. Expected exactly: x·((q − 8)·s + z)ᵀ
    + bias. The dequantized weights are compared directly as well.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import flux_models as fm
from nunchaku_core import reference
from nunchaku_core.formats.comfy_native import AWQ_FORMAT, SVDQUANT_FORMAT, ComfyNativeCheckpoint, unpack_nibbles
from nunchaku_core.layer import SIGMA
from nunchaku_core.quantize.flux import QuantizeOptions
from nunchaku_core.quantize.model import quantize_model

try:
    import comfy_kitchen as ck
    from comfy_kitchen.tensor.awq_w4a16 import TensorCoreAWQW4A16Layout
    from comfy_kitchen.tensor.base import QuantizedTensor
    from comfy_kitchen.tensor.svdquant_w4a4 import TensorCoreSVDQuantW4A4Layout
except ImportError as e:   # a requirement of the test tools (scripts/setup_env.sh), not an optional extra
    pytest.fail(f"comfy-kitchen is not importable ({e}); run scripts/setup_env.sh (it installs comfy-kitchen==0.2.31)",
                pytrace=False)

U = 2.0 ** -24
B16 = 2.0 ** -8
R_OP = {torch.float32: U, torch.bfloat16: B16 + U + B16 * U}   # one kitchen op in the storage dtype
R_OUT = {torch.float32: 0.0, torch.bfloat16: B16}              # our final fp32 -> dtype rounding
TOKENS = (1, 3, 17)
SHAPES = fm.flux_shapes(256, 1, 1, 64, 32, True)               # FLUX.1 at hidden 256: K 256 and 1024/1280, shifted


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def step(err, exact, rho):
    """Error after one rounding (unit rho) of a value whose exact result is `exact`, computed with error `err`."""
    return err + rho * (exact.abs() + err)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("kitchen")
    src = d / "flux.safetensors"
    sd = fm.random_state_dict(SHAPES, std=0.02, seed=7)
    g = torch.Generator().manual_seed(8)
    for k in sd:                       # nonzero biases, so that a bias read wrongly shows (flux_models writes zeros)
        if k.endswith(".bias"):
            sd[k] = (torch.randn(sd[k].shape, generator=g) * 0.05).to(sd[k].dtype)
    save_file(sd, str(src))
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        out[dtype] = d / f"q-{str(dtype)[6:]}.safetensors"
        quantize_model(src, out[dtype], options=QuantizeOptions(rank=16, report=False, dtype=dtype))
    return out


def kitchen_layers(path) -> dict:
    """{layer: (conf, {suffix: tensor})} read back from disk with safetensors alone."""
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        out = {}
        for k in keys:
            if k.endswith(".comfy_quant"):
                name = k[:-len(".comfy_quant")]
                conf = json.loads(bytes(f.get_tensor(k).tolist()).decode("utf-8"))
                tensors = {key[len(name) + 1:]: f.get_tensor(key) for key in keys
                           if key.startswith(name + ".") and "." not in key[len(name) + 1:] and key != k}
                out[name] = (conf, tensors)
    return out


def kitchen_tensor(conf: dict, t: dict, dtype) -> QuantizedTensor:
    w = t["weight"]
    N, K = w.shape[0], w.shape[1] * 2
    if conf["format"] == SVDQUANT_FORMAT:
        params = TensorCoreSVDQuantW4A4Layout.Params(
            scale=t["weight_scale"], orig_dtype=dtype, orig_shape=(N, K), proj_down=t["weight_proj_down"],
            proj_up=t["weight_proj_up"], smooth_factor=t["weight_smooth_factor"],
            act_unsigned=bool(conf.get("act_unsigned", False)))
        return QuantizedTensor(w, "TensorCoreSVDQuantW4A4Layout", params)
    params = TensorCoreAWQW4A16Layout.Params(scale=t["weight_scale"], orig_dtype=dtype, orig_shape=(N, K),
                                             zeros=t["weight_zeros"], group_size=int(conf.get("group_size", 64)))
    return QuantizedTensor(w, "TensorCoreAWQW4A16Layout", params)


def inputs(layer, M: int, dtype, seed: int) -> torch.Tensor:
    """x: [M, K] in the storage dtype; GELU outputs for σ-shifted layers (their real input)."""
    x = torch.randn(M, layer.K, generator=torch.Generator().manual_seed(seed))
    return (F.gelu(x, approximate="tanh") if getattr(layer, "shifted", False) else x).to(dtype)


def kitchen_activations(x, qt):
    """comfy-kitchen's own activation quantization, called as its layer calls it: (codes [M, K], scales [M, K/64],
    x·D fp32 [M, R])."""
    p = qt._params
    x_main = x + SIGMA if p.act_unsigned else x
    with ck.use_backend("eager"):
        q, ascales, lora = ck.quantize_svdquant_w4a4(x_main, smooth=p.smooth_factor, lora_down=p.proj_down,
                                                    act_unsigned=p.act_unsigned, lora_x=x if p.act_unsigned else None)
    M = x.shape[0]
    return unpack_nibbles(q[:M], signed=not p.act_unsigned).to(torch.int8), ascales.t()[:M], lora[:M]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_kitchen_reads_our_files_as_we_do(files, dtype):
    path = files[dtype]
    ours = ComfyNativeCheckpoint(str(path))
    layers = kitchen_layers(path)
    assert set(layers) == set(ours.layer_names())
    formats = {conf["format"] for conf, _ in layers.values()}
    assert formats == {SVDQUANT_FORMAT, AWQ_FORMAT}
    assert any(conf.get("act_unsigned") for conf, _ in layers.values())
    for name, (conf, t) in layers.items():
        qt = kitchen_tensor(conf, t, dtype)
        # comfy-kitchen's own serialization of what it built names and holds exactly our file's tensors
        back = qt.state_dict(f"{name}.weight")
        assert set(back) == {f"{name}.{s}" for s in t if s != "bias"}, name
        assert all(torch.equal(v, t[k[len(name) + 1:]]) for k, v in back.items()), name
        layer = ours.layer(name)
        if conf["format"] == SVDQUANT_FORMAT:
            check_svdquant(name, qt, layer, t.get("bias"), dtype)
        else:
            check_awq(name, qt, layer, t.get("bias"), dtype)


def check_svdquant(name, qt, layer, bias, dtype) -> None:
    r, K, R, G = R_OP[dtype], layer.K, layer.R, layer.group_size
    W = layer.codes.double() * layer.wscales.double().repeat_interleave(G, 1)   # code·scale, exact in float64
    D, Uu = layer.proj_down.double(), layer.proj_up.double()
    b = bias.double() if bias is not None else torch.zeros(layer.N, dtype=torch.float64)
    n = 6 if layer.shifted else 4
    for M in TOKENS:
        x = inputs(layer, M, dtype, seed=M)
        with ck.use_backend("eager"):
            y_kit = F.linear(x, qt, bias).double()
        y_ours = reference.svdquant_linear(x, layer).double()

        # (a) activation codes, scales and the low-rank input
        qk, sk, lora_k = kitchen_activations(x, qt)
        qo, so = reference.quantize_act_int4(x, layer.smooth, layer.shifted)
        lora_o = x.float() @ layer.proj_down.float()
        assert ((lora_k.double() - lora_o.double()).abs()
                <= 2 * gamma(K) * (x.double().abs() @ D.abs())).all(), name
        if dtype == torch.float32:
            assert torch.equal(qk, qo) and torch.equal(sk.float(), so), name
        else:
            v = (reference.smooth_act(x, layer.smooth, layer.shifted).reshape(M, -1, G) / so[..., None]).reshape(M, K)
            delta = 2 * (((1 - r) * (1 - U)) ** -n * (1 - U) ** -n - 1) * (1 - U) ** -n
            diff = qk.int() - qo.int()
            tie = (qk.double() + qo.double()) / 2
            assert diff.abs().max() <= 1, name
            near = (v.double() - tie).abs() <= delta * v.double().abs()
            assert (near | (diff == 0)).all(), f"{name}: {int((~near & (diff != 0)).sum())} codes differ off a tie"
            n_s = n // 2 + 1
            assert ((sk.double() / so.double() - 1).abs() <= ((1 - r) * (1 - U)) ** -n_s - 1).all(), name

        # (b) kitchen's output against our layer's exact math on kitchen's activations, then end to end
        a_k = (qk.double().reshape(M, -1, G) * sk.double()[..., None]).reshape(M, K)
        a_o = (qo.double().reshape(M, -1, G) * so.double()[..., None]).reshape(M, K)
        Z_k, Z_o, L = a_k @ W.T, a_o @ W.T, (x.double() @ D) @ Uu.T
        S_k, S_o = a_k.abs() @ W.abs().T, a_o.abs() @ W.abs().T
        S_lr = (x.double().abs() @ D.abs()) @ Uu.abs().T
        e_lr = (gamma(K) + gamma(R) + gamma(K) * gamma(R)) * S_lr
        slack = 2.0 ** -40 * (S_k + S_o + S_lr)                          # float64 evaluation of the expectations

        e = (2 * r + r * r + gamma(K) * (1 + r) ** 2) * S_k
        e = step(e, Z_k, r)                                             # kitchen's matmul result in the dtype
        e = e + step(e_lr, L, r)                                        # its low-rank term, rounded to the dtype
        e = step(e, Z_k + L, r)
        b_kit = step(e, Z_k + L + b, r) if bias is not None else e
        err = (y_kit - (Z_k + L + b)).abs()
        assert (err <= b_kit + slack).all(), f"{name} M={M}: kitchen off our math on its codes by {err.max():.3g}"

        e = gamma(K // G + 2) * S_o + e_lr
        e = step(e, Z_o + L, U)
        e = step(e, Z_o + L + b, U)
        b_ours = step(e, Z_o + L + b, R_OUT[dtype])
        end = (y_kit - y_ours).abs()
        assert (end <= b_kit + b_ours + (Z_k - Z_o).abs() + slack).all(), f"{name} M={M}: {end.max():.3g}"


def check_awq(name, qt, layer, bias, dtype) -> None:
    r, K, G = R_OP[dtype], layer.K, layer.group_size
    cols = torch.arange(K) // G
    s = qt._params.scale.double().T[:, cols]                          # the file's weight_scale, [N, K]
    z = qt._params.zeros.double().T[:, cols]
    qs = (layer.codes.double() - 8) * s
    w = qs + z                                                        # comfy-kitchen's dequantization, exact
    e_kit = step(r * qs.abs(), w, r)                                  # dtype((q − 8)·s) + z, rounded twice
    zo = (z - 8 * s).abs()
    e_ours = step(U * zo + U * (layer.codes.double() * s).abs(), w, U)  # fl32(q·s) + fl32(z − 8s), + rounded
    with ck.use_backend("eager"):
        w_kit = qt.dequantize().double()
    assert ((w_kit - w).abs() <= e_kit).all(), name
    assert ((reference.dequantize_w4a16(layer).double() - w).abs() <= e_ours).all(), name
    b = bias.double() if bias is not None else torch.zeros(layer.N, dtype=torch.float64)
    for M in TOKENS:
        x = inputs(layer, M, dtype, seed=10 + M)
        with ck.use_backend("eager"):
            y_kit = F.linear(x, qt, bias).double()
        y_ours = reference.w4a16_linear(x, layer).double()
        X = x.double()
        Y0 = X @ w.T
        bounds = []
        for e_w, rho_mm, rho_b, rho_out in ((e_kit, r, r, 0.0), (e_ours, U, U, R_OUT[dtype])):
            e = X.abs() @ e_w.T + gamma(K) * (X.abs() @ (w.abs() + e_w).T)
            e = step(e, Y0, rho_mm)
            e = step(e, Y0 + b, rho_b) if bias is not None else e
            bounds.append(step(e, Y0 + b, rho_out))
        slack = 2.0 ** -40 * (X.abs() @ w.abs().T)
        assert ((y_kit - (Y0 + b)).abs() <= bounds[0] + slack).all(), f"{name} M={M}"
        assert ((y_kit - y_ours).abs() <= bounds[0] + bounds[1] + slack).all(), f"{name} M={M}"
