"""Compile-check of the CUDA kernels (csrc/cuda) for every target architecture.

Nothing here runs a kernel: this machine and CI have no GPU. The kernels' numerics are only verified on the CPU
path against nunchaku_core.reference (csrc/cuda/README.md). A missing nvcc FAILS the test rather than skipping it,
because CI has nvcc and a silently skipped compile check would let broken kernels land.

Cost: 5 files x 5 architectures, one nvcc at a time, CUDA 13.0 on the 2-core dev machine: 50-67 s of CPU, 137-167 s
wall with the cores shared (load average 8).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_cuda.sh"
ARCHES = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_120a")


def _run(env_extra: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NVCC", "CUDA_ARCHES", "BUILD_CUDA_LOG")}
    env.update(env_extra)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout)


def test_every_kernel_compiles_for_every_arch():
    proc = _run({}, timeout=3600)
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode != 2, f"nvcc is missing; CI needs the CUDA toolkit (>= 12.8).\n{report}"
    assert proc.returncode == 0, report
    sources = sorted(p.name for p in (SCRIPT.parents[1] / "csrc" / "cuda").glob("*.cu"))
    # Table rows look like "gemm_w4a16.cu   ok   ok ..."; progress lines start with the arch instead.
    rows = [line.split() for line in proc.stdout.splitlines()]
    table = {parts[0]: parts[1:] for parts in rows if parts and parts[0].endswith(".cu")}
    for name in sources:
        assert table.get(name) == ["ok"] * len(ARCHES), f"{name}: {table.get(name)}\n{report}"


def test_missing_nvcc_is_an_error_not_a_skip():
    proc = _run({"NVCC": "/nonexistent/nvcc"}, timeout=60)
    assert proc.returncode == 2
    assert "nvcc not found" in proc.stderr and "/nonexistent/nvcc" in proc.stderr


def _cuda_include() -> Path:
    """The CUDA toolkit's include directory (cuda_runtime_api.h), from CUDA_HOME or the nvcc on PATH."""
    candidates = [Path(os.environ["CUDA_HOME"]) / "include"] if os.environ.get("CUDA_HOME") else []
    candidates.append(Path("/usr/local/cuda/include"))
    for c in candidates:
        if (c / "cuda_runtime_api.h").exists():
            return c
    raise AssertionError(f"cuda_runtime_api.h not found in {[str(c) for c in candidates]}: CI needs the CUDA toolkit")


def test_bindings_cuda_section_compiles():
    """csrc/bindings.cpp's SVDQ_WITH_CUDA section (the cuda_* ops backend.py dispatches to) is only built by setup.py
    when torch has CUDA, which the CPU wheel here has not: compile it against the CPU torch's headers instead (it uses
    no torch CUDA headers, by design), syntax and types only."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    root = SCRIPT.parents[1]
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"], str(_cuda_include())]]
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Wno-unused-parameter", "-DSVDQ_WITH_CUDA",
           "-DTORCH_EXTENSION_NAME=_C", *includes, str(root / "csrc" / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    ours = [line for line in proc.stderr.splitlines() if "warning" in line and "csrc/" in line]
    assert not ours, "\n".join(ours)
