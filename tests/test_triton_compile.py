"""Ahead-of-time compile of the Triton kernels (nunchaku_core/kernels) for every target, with no GPU: sm_80, sm_86,
sm_89, sm_90a, sm_100a, sm_120a, gfx942 (MI300) and gfx1100 (RDNA3). tests/triton_aot.py compiles, in a process of
its own (the compiled kind of kernel: see tests/test_triton_kernels.py for why the kinds cannot share a process)
with a fresh Triton cache and no CUDA/ROCm install in the environment; these tests read its PTX / AMDGCN:

- each kernel really uses the tensor-core instruction meant for it: a kernel that silently became an FMA loop
  fails here (the interpreter tests cannot see that);
- what the numerics contract needs is in the code the GPU gets: correctly rounded division (no div.full / approx),
  no fma where the contract has a multiply then an add, no flush-to-zero, and the 1.5·2^23 rounding constant not
  folded away;
- one kernel per target is built to a binary with the tools inside the triton wheel (bundled ptxas; AMD's linker
  is built into libtriton), so a CUDA install is not needed to compile, only a driver to run.

Cost, 58 compiles in two worker processes on the shared 2-core dev machine: 77-87 s of CPU; 156-216 s wall at load
average 6.5-7.6 (other test runs), so ~45-60 s wall on a quiet 2-core machine. ptxas runs once per target (FULL).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from triton_aot import FULL, TARGETS  # noqa: E402

NV = ("sm80", "sm86", "sm89", "sm90a", "sm100a", "sm120a")
AMD = ("gfx942", "gfx1100")
MMA_SYNC = ("sm80", "sm86", "sm89", "sm120a")  # the warp-level mma.sync targets


def _per_target(mma_sync: str, sm90a: str, sm100a: str, gfx942: str, gfx1100: str) -> dict:
    return {**{t: mma_sync for t in MMA_SYNC}, "sm90a": sm90a, "sm100a": sm100a, "gfx942": gfx942, "gfx1100": gfx1100}


_I8_SYNC = r"mma\.sync\.aligned\.m16n8k32\.row\.col\.satfinite\.s32\.s8\.s8\.s32"
_F16_SYNC = r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32"
_BF16_SYNC = r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32"
# kernel -> target -> the instruction that must appear. 16-row tiles (small M, GEMV) are below the 64-row wgmma and
# 128-row tcgen05 MMAs, so Triton uses mma.sync there on sm_90a/sm_100a too.
TENSOR_CORE = {
    "gemm_w4a4_int4": _per_target(_I8_SYNC, r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8",
                                  r"tcgen05\.mma\.cta_group::1\.kind::i8", r"v_mfma_i32_\w+_i8",
                                  r"v_wmma_i32_16x16x16_iu8"),
    "gemm_w4a4_int4_small_m": _per_target(_I8_SYNC, _I8_SYNC, _I8_SYNC, r"v_mfma_i32_\w+_i8",
                                          r"v_wmma_i32_16x16x16_iu8"),
    "gemm_w4a4_nvfp4_decode": _per_target(_F16_SYNC, r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.f16\.f16",
                                          r"tcgen05\.mma\.cta_group::1\.kind::f16", r"v_mfma_f32_\w+_f16",
                                          r"v_wmma_f32_16x16x16_f16"),
    "gemm_w4a4_nvfp4_mma": {
        "sm100a": r"tcgen05\.mma\.cta_group::1\.kind::mxf4nvf4\.block_scale\.block16",
        "sm120a": r"mma\.sync\.aligned\.m16n8k64\.row\.col\.kind::mxf4nvf4\.block_scale\.scale_vec::4X"
                  r"\.f32\.e2m1\.e2m1\.f32\.ue4m3"},
    "gemm_w4a16_bf16": _per_target(_BF16_SYNC, r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.bf16\.bf16",
                                   r"tcgen05\.mma\.cta_group::1\.kind::f16", r"v_mfma_f32_\w+_bf16",
                                   r"v_wmma_f32_16x16x16_bf16"),
    "gemm_w4a16_gemv_fp16": _per_target(_F16_SYNC, _F16_SYNC, _F16_SYNC, r"v_mfma_f32_\w+_f16",
                                        r"v_wmma_f32_16x16x16_f16"),
}
QUANTIZERS = ("quantize_act_int4_shifted", "quantize_act_nvfp4")
FP4_MMA_TARGETS = ("sm100a", "sm120a")
_FMA = r"\bfma\.rn(\.ftz)?\.f32\b|\bv_fma_f32\b|\bv_fmac_f32|\bv_mac_f32\b|\bv_mad_f32\b|\bv_pk_fma_f32\b"


def _kernels_for(target: str) -> list[str]:
    names = [*TENSOR_CORE, *QUANTIZERS]
    return [n for n in names if n != "gemm_w4a4_nvfp4_mma" or target in FP4_MMA_TARGETS]


CASES = [(t, k) for t in TARGETS for k in _kernels_for(t)]


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    """Runs tests/triton_aot.py once: {(target, kernel): (report row, asm text)} plus the report."""
    out = tmp_path_factory.mktemp("triton_aot")
    drop = ("TRITON_INTERPRET", "TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH", "CUDA_HOME", "CUDA_PATH",
            "ROCM_PATH", "TRITON_CACHE_DIR", "TRITON_HIP_LLD_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["TRITON_CACHE_DIR"] = str(out / "cache")  # compile for real every run, not from an earlier cache
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, str(ROOT / "tests" / "triton_aot.py"), str(out), "--jobs", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-5000:]}\n{proc.stderr[-10000:]}"
    report = json.loads((out / "report.json").read_text())
    asm = {}
    for row in report["rows"]:
        path = out / row["target"] / f"{row['kernel']}.{row['asm_kind']}"
        asm[row["target"], row["kernel"]] = (row, path.read_text() if path.exists() else "")
    print(f"\ntriton {report['triton']}: {len(report['rows'])} compiles in {report['seconds']} s")
    return asm, report


def _asm(aot, target: str, kernel: str) -> str:
    row, text = aot[0][target, kernel]
    assert row["error"] is None, f"{kernel} for {target} did not compile:\n{row['error']}"
    assert text, f"{kernel} for {target}: no {row['asm_kind']} written"
    return text


@pytest.mark.parametrize("target,kernel", CASES, ids=[f"{t}-{k}" for t, k in CASES])
def test_compiles(aot, target, kernel):
    _asm(aot, target, kernel)


@pytest.mark.parametrize("target,kernel", [(t, k) for t, k in CASES if k in TENSOR_CORE],
                         ids=[f"{t}-{k}" for t, k in CASES if k in TENSOR_CORE])
def test_uses_tensor_cores(aot, target, kernel):
    """The expected MMA mnemonic is in the kernel's PTX/AMDGCN (and it is the int8 one for the INT4 GEMM, not an
    fp16 fallback): a degraded FMA-loop kernel has none."""
    text = _asm(aot, target, kernel)
    pattern = TENSOR_CORE[kernel][target]
    assert re.search(pattern, text), (
        f"{kernel} for {target}: no {pattern!r}; its matrix instructions: "
        f"{sorted(set(re.findall(r'(?:mma|wgmma|tcgen05|v_mfma|v_wmma)[A-Za-z0-9_.:]*', text)))}")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kernel", QUANTIZERS)
def test_quantizer_division_is_correctly_rounded(aot, target, kernel):
    """t/s, absmax/qmax and v/scale must be IEEE divisions: PTX div.rn.f32 (Triton's `/` is div.full.f32,
    approximate), AMDGCN the div_scale/div_fmas/div_fixup sequence (a bare v_rcp_f32 + multiply is approximate)."""
    text = _asm(aot, target, kernel)
    if target in NV:
        assert re.search(r"\bdiv\.rn\.f32\b", text)
        assert not re.search(r"\bdiv\.(full|approx)|\brcp\.approx", text)
    else:
        assert text.count("v_div_fixup_f32") >= 3 and "v_div_fmas_f32" in text


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kernel", QUANTIZERS)
def test_round_half_even_constant_survives(aot, target, kernel):
    """(v + 1.5·2^23) − 1.5·2^23 rounds half to even only if the compiler keeps both operations; the constant
    must still be in the code (as an immediate or loaded once)."""
    text = _asm(aot, target, kernel)
    assert re.search(r"0f4B400000|0x4b400000", text, re.IGNORECASE)


# The quantizer has no mul+add pair, but AMD's correctly rounded division is built from fmas (checked above
# instead), so it is in this list for NVIDIA only.
NO_FMA = [(t, k) for t in TARGETS for k in ("gemm_w4a4_int4", "gemm_w4a16_bf16", "gemm_w4a16_gemv_fp16")]
NO_FMA += [(t, "quantize_act_int4_shifted") for t in NV]


@pytest.mark.parametrize("target,kernel", NO_FMA, ids=[f"{t}-{k}" for t, k in NO_FMA])
def test_no_fma_where_the_contract_has_mul_then_add(aot, target, kernel):
    """The INT4 GEMM epilogue acc + fl(fl(P·sa)·sw) (compiled without the low-rank branch, whose fp32 dot is
    rightly an fma chain) and the W4A16 dequantization fl(fl(q·s) + z) must stay two roundings: no fp32 fma at
    all in those kernels (enable_fp_fusion=False; Triton's default would contract them)."""
    text = _asm(aot, target, kernel)
    hits = sorted(set(m.group(0) for m in re.finditer(_FMA, text)))
    assert not hits, f"{kernel} for {target} contains {hits}"


@pytest.mark.parametrize("target", NV)
def test_no_flush_to_zero(aot, target):
    """Subnormal fp32 values are kept, as the interpreter (numpy) and torch keep them."""
    for kernel in _kernels_for(target):
        assert ".ftz" not in _asm(aot, target, kernel), kernel


@pytest.mark.parametrize("target", TARGETS)
def test_binary_built_with_the_wheel_tools(aot, target):
    """The FULL kernel went through the binary stage: a cubin from the ptxas inside the triton wheel (no CUDA
    toolkit in the environment), an hsaco from the linker inside libtriton."""
    row, _ = aot[0][target, FULL]
    assert row["error"] is None, row["error"]
    assert row["binary_bytes"] > 1000, row
    if target in NV:
        report = aot[1]
        for arch, path in report["ptxas"].items():
            assert Path(path).resolve().is_relative_to(Path(report["triton_dir"]).resolve()), (arch, path)
