"""setup.py's choice of what to compile: the CUDA kernels only with SVDQ_BUILD_CUDA=1, never because nvcc happens
to be on PATH (that broke `pip install .` on machines with nvcc whose headers did not fit torch).

setup.py runs for real (`build_ext` into a temp folder), with fake compilers that record their command lines and
create empty outputs: the C++ compiler (CC/CXX/LDSHARED) and nvcc (CUDA_HOME/bin/nvcc, also first on PATH). A
CUDA build of torch is simulated by setting torch.version.cuda and torch.cuda._is_compiled before setup.py runs,
which is what torch.utils.cpp_extension (CUDA_HOME) and setup.py read of it. The case that broke is a CUDA torch
(pip's isolated build environment installs one) with nvcc found. A few seconds per case instead of minutes per real build (a real
`pip wheel --no-build-isolation .` took 4.5 min on 2 busy cores, 2026-12-07).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_COMPILER = """#!/bin/sh
echo "$0 $*" >> "{log}"
case "$*" in
  *--version*) echo "Cuda compilation tools, release 12.8, V12.8.93"; exit 0;;
  *-dumpfullversion*) echo "12.2.0"; exit 0;;
  -v) echo "gcc version 12.2.0" >&2; exit 0;;
esac
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
[ -n "$out" ] && mkdir -p "$(dirname "$out")" && : > "$out"
exit 0
"""

RUN_SETUP = """
import runpy, sys
import torch
if sys.argv[1]:                              # '' = the CPU torch this machine has; '12.8' = a CUDA build
    torch.version.cuda = sys.argv[1]
    torch.cuda._is_compiled = lambda: True
    torch.cuda.is_available = lambda: False  # a CUDA torch on a machine without a GPU (a build machine)
sys.argv = ["setup.py", "build_ext", "-b", sys.argv[2] + "/lib", "-t", sys.argv[2] + "/tmp", "-f"]
runpy.run_path("setup.py", run_name="__main__")
"""


def build(tmp_path: Path, torch_cuda: str, flag: str | None) -> dict:
    """Run setup.py build_ext with the fake toolchain; returns exit code, output and each tool's command lines."""
    cuda, cxx = tmp_path / "cuda", tmp_path / "bin" / "g++"   # torch accepts a C++ compiler by its name
    (cuda / "bin").mkdir(parents=True)
    cxx.parent.mkdir()
    logs = {"cxx": tmp_path / "cxx.log", "nvcc": tmp_path / "nvcc.log"}
    for path, log in ((cxx, logs["cxx"]), (cuda / "bin" / "nvcc", logs["nvcc"])):
        path.write_text(FAKE_COMPILER.format(log=log))
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("SVDQ_BUILD_CUDA", "TORCH_CUDA_ARCH_LIST")}
    env.update(PATH=f"{cuda / 'bin'}:{env['PATH']}", CUDA_HOME=str(cuda), CC=str(cxx), CXX=str(cxx),
               LDSHARED=f"{cxx} -shared", TORCH_CUDA_ARCH_LIST="8.9")
    if flag is not None:
        env["SVDQ_BUILD_CUDA"] = flag
    run = subprocess.run([sys.executable, "-c", RUN_SETUP, torch_cuda, str(tmp_path / "build")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    calls = {k: (v.read_text().splitlines() if v.exists() else []) for k, v in logs.items()}
    compiled = {a for line in calls["cxx"] + calls["nvcc"] for a in line.split() if a.endswith((".cpp", ".cu"))}
    return {"rc": run.returncode, "out": run.stdout + run.stderr, "calls": calls, "compiled": compiled}


def repo_sources(pattern: str) -> set[str]:
    return {str(p.relative_to(REPO)) for p in REPO.glob(pattern)}


@pytest.mark.parametrize("torch_cuda", ["", "12.8"], ids=["cpu-torch", "cuda-torch"])
@pytest.mark.parametrize("flag", [None, "0"], ids=["unset", "0"])
def test_nvcc_on_path_builds_the_cpu_extension_only(tmp_path, torch_cuda, flag):
    r = build(tmp_path, torch_cuda, flag)
    assert r["rc"] == 0, r["out"][-3000:]
    assert r["compiled"] == {"csrc/bindings.cpp"} | repo_sources("csrc/cpu/*.cpp")
    assert not [c for c in r["calls"]["nvcc"] if "--version" not in c], r["calls"]["nvcc"]
    assert any("-shared" in c and "_C." in c for c in r["calls"]["cxx"])      # the extension was linked


def test_opt_in_compiles_the_cuda_kernels(tmp_path):
    """The same fake toolchain does see a CUDA build when one is asked for: the test above can fail."""
    r = build(tmp_path, "12.8", "1")
    assert r["rc"] == 0, r["out"][-3000:]
    cu = repo_sources("csrc/cuda/*.cu")
    assert cu and cu <= r["compiled"]
    assert any(c.endswith(".cu") for line in r["calls"]["nvcc"] for c in line.split())


@pytest.mark.parametrize("torch_cuda,flag,words", [
    ("", "1", "SVDQ_BUILD_CUDA=1, but torch is built without CUDA"),
    ("12.8", "yes", "SVDQ_BUILD_CUDA='yes': expected 1"),
])
def test_bad_requests_stop_with_the_reason(tmp_path, torch_cuda, flag, words):
    r = build(tmp_path, torch_cuda, flag)
    assert r["rc"] != 0 and words in r["out"], r["out"][-3000:]
    assert not r["calls"]["cxx"]
