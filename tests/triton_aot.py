"""Ahead-of-time compile of every Triton kernel of nunchaku_core/kernels for every target, no GPU needed: writes
<out>/<target>/<kernel>.{ptx,amdgcn} and <out>/report.json for tests/test_triton_compile.py to check.

    python tests/triton_aot.py <out> [--jobs 2]

Each kernel is compiled with the constexprs and launch options the launch wrapper would use on that target (from the
files' tile tables), enable_fp_fusion=False as every wrapper passes it, and pointer arguments marked 16-byte
aligned as the runtime would specialize them. One kernel per target ("full" below) goes all the way to the binary:
the cubin through the ptxas that ships in the triton wheel, the hsaco through the linker built into it. The others
stop at PTX / AMDGCN (the binary stage is replaced by an empty one), which is what the tests read: ptxas is ~60 %
of the compile time of a kernel.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TARGETS = {  # name: (backend, arch, warp size, tile-table key)
    "sm80": ("cuda", 80, 32, "sm80"), "sm86": ("cuda", 86, 32, "sm86"), "sm89": ("cuda", 89, 32, "sm86"),
    "sm90a": ("cuda", 90, 32, "sm90"), "sm100a": ("cuda", 100, 32, "sm100"), "sm120a": ("cuda", 120, 32, "sm120"),
    "gfx942": ("hip", "gfx942", 64, "gfx942"), "gfx1100": ("hip", "gfx1100", 32, "gfx1100"),
}

_W4A4_PTRS = dict(a_ptr="*u8", lora_ptr="*fp32", w_ptr="*u8", out_scale_ptr="*fp32", up_ptr="*bf16", bias_ptr="*bf16")
_INTS = dict(M="i32", N="i32", K="i32", R="i32", G="i32")


def kernels(w4a4, w4a16, key: str) -> dict:
    """name -> (jit function, argument types, constexprs, tile) for one tile-table key."""
    c4, c16 = w4a4.CONFIGS[key], w4a16.CONFIGS[key]
    out = {}

    def gemm(tile, nvfp4: bool, lora: bool, a_signed: bool = True):
        types = dict(_W4A4_PTRS, sa_ptr="*u8" if nvfp4 else "*fp32", sw_ptr="*u8" if nvfp4 else "*bf16",
                     y_ptr="*bf16")
        const = dict(NVFP4=nvfp4, A_SIGNED=a_signed, HAS_OUT_SCALE=nvfp4, HAS_LORA=lora, HAS_BIAS=True,
                     OUT_BF16=True, GROUP=16 if nvfp4 else 64, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                     BLOCK_R=32, GROUP_M=w4a4.SWIZZLE_M)
        return w4a4._gemm_w4a4_kernel, types, const, tile

    # INT4 GEMM without the low-rank branch: the only fp32 arithmetic left is the scale epilogue, which must
    # not contain an fma. The low-rank epilogue is compiled in the NVFP4 decode kernel.
    out["gemm_w4a4_int4"] = gemm(c4["gemm"], nvfp4=False, lora=False)
    out["gemm_w4a4_int4_small_m"] = gemm(c4["gemm_small_m"], nvfp4=False, lora=True, a_signed=False)
    out["gemm_w4a4_nvfp4_decode"] = gemm(c4["gemm"], nvfp4=True, lora=True)
    if c4["gemm_fp4_mma"] is not None:
        t = c4["gemm_fp4_mma"]
        types = dict(_W4A4_PTRS, sa_ptr="*u8", sw_ptr="*u8", y_ptr="*bf16")
        const = dict(HAS_OUT_SCALE=True, HAS_LORA=True, HAS_BIAS=True, OUT_BF16=True, BLOCK_M=t.block_m,
                     BLOCK_N=t.block_n, BLOCK_K=t.block_k, BLOCK_R=32, GROUP_M=w4a4.SWIZZLE_M)
        out["gemm_w4a4_nvfp4_mma"] = (w4a4._gemm_w4a4_nvfp4_mma_kernel, types, const, t)
    q = c4["quantize"]
    qtypes = dict(x_ptr="*bf16", smooth_ptr="*fp32", down_ptr="*bf16", codes_ptr="*u8", lora_ptr="*fp32")
    out["quantize_act_int4_shifted"] = (
        w4a4._quantize_act_kernel, dict(qtypes, scales_ptr="*fp32"),
        dict(GROUP=64, NVFP4=False, SHIFTED=True, HAS_LORA=False, BLOCK_M=q.block_m, BLOCK_K=q.block_k, BLOCK_R=16),
        q)
    out["quantize_act_nvfp4"] = (
        w4a4._quantize_act_kernel, dict(qtypes, scales_ptr="*u8"),
        dict(GROUP=16, NVFP4=True, SHIFTED=False, HAS_LORA=True, BLOCK_M=q.block_m, BLOCK_K=q.block_k, BLOCK_R=32),
        q)
    for name, tile, dtype in (("gemm_w4a16_bf16", c16["gemm"], "bf16"), ("gemm_w4a16_gemv_fp16", c16["gemv"], "fp16")):
        types = dict(x_ptr=f"*{dtype}", w_ptr="*u8", scales_ptr="*bf16", zeros_ptr="*bf16", bias_ptr="*bf16",
                     y_ptr=f"*{dtype}")
        const = dict(HAS_BIAS=True, ONE_GROUP_PER_STEP=True, X_DTYPE=dtype, BF16_DOT_AS_F32=False,
                     BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=min(tile.block_k, 64),
                     GROUP_M=w4a16.SWIZZLE_M)
        out[name] = (w4a16._gemm_w4a16_kernel, types, const, tile)
    return out


FULL = "gemm_w4a4_int4"  # compiled to a binary on every target


def compile_target(args) -> list:
    target, out_dir = args
    import triton
    from triton.backends.compiler import GPUTarget

    from nunchaku_core.kernels import triton_w4a4, triton_w4a16

    backend, arch, warp, key = TARGETS[target]
    gpu = GPUTarget(backend, arch, warp)
    binary_stage = "cubin" if backend == "cuda" else "hsaco"
    asm_kind = "ptx" if backend == "cuda" else "amdgcn"

    def stub_binary(*a):
        """knobs.runtime.add_stages_inspection_hook: called bare for a cache key, else with the stages to edit."""
        if not a:
            return "aot-asm-only", "aot-asm-only"
        stages = a[1]
        stages[binary_stage] = lambda src, metadata: b""

    results = []
    (Path(out_dir) / target).mkdir(parents=True, exist_ok=True)
    for name, (fn, types, const, tile) in kernels(triton_w4a4, triton_w4a16, key).items():
        signature = {a: "constexpr" if a in const else (types.get(a) or _INTS[a]) for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if signature[a].startswith("*")}
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=const, attrs=attrs)
        options = dict(num_warps=tile.num_warps, num_stages=tile.num_stages, enable_fp_fusion=False)
        triton.knobs.runtime.add_stages_inspection_hook = None if name == FULL else stub_binary
        t0 = time.time()
        row = dict(target=target, kernel=name, asm_kind=asm_kind, full=name == FULL)
        try:
            compiled = triton.compile(src, target=gpu, options=options)
            asm = compiled.asm[asm_kind]
            (Path(out_dir) / target / f"{name}.{asm_kind}").write_text(asm)
            row.update(binary_bytes=len(compiled.asm[binary_stage]), shared=compiled.metadata.shared, error=None)
        except Exception as e:  # reported per kernel; the test names it
            row.update(binary_bytes=0, shared=None, error=f"{type(e).__name__}: {str(e)[-3000:]}")
        row["seconds"] = round(time.time() - t0, 2)
        results.append(row)
    triton.knobs.runtime.add_stages_inspection_hook = None
    return results


def main() -> int:
    out_dir = Path(sys.argv[1])
    jobs = int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 1
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    work = [(t, str(out_dir)) for t in TARGETS]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            rows = [r for part in pool.map(compile_target, work) for r in part]
    else:
        rows = [r for w in work for r in compile_target(w)]
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = {str(a): get_ptxas(a).path for a in (80, 100, 120)}
    report = dict(rows=rows, seconds=round(time.time() - t0, 1), triton=triton.__version__,
                  triton_dir=os.path.dirname(triton.__file__), ptxas=ptxas)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
