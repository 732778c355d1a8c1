"""Builds the compiled kernels (nunchaku_core._C) in place, with the Python that runs this script.

ComfyUI Manager runs a pack's install.py after cloning it and installing requirements.txt, with ComfyUI's own
Python, so a Manager install gets the CPU kernels built against ComfyUI's torch. By hand:

    python install.py          # from this folder, with ComfyUI's python

Without the kernels everything still works on the torch reference (nunchaku_core.backend warns once), so a build
that cannot run here never fails the install: the script says why and how to retry, and exits 0.

Only the CPU kernels are built: SVDQ_BUILD_CUDA defaults to 0 here, because the CUDA kernels have never run on a
GPU (README.md, "What is verified where"). Set SVDQ_BUILD_CUDA=1 to build them too (setup.py).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RETRY = f"retry with: cd {HERE} && {sys.executable} setup.py build_ext --inplace"


def unsupported_reason(system: str, machine: str) -> str | None:
    """Why the CPU kernels cannot be built on this platform, or None. They are x86-64 SIMD code compiled with
    GCC-style flags (-mavx2, -mavx512f, -fopenmp) and builtins, built and tested on Linux."""
    if machine.lower() not in ("x86_64", "amd64"):
        return f"the CPU kernels are x86-64 code (AVX2 / AVX-512); this machine is {machine}"
    if system != "Linux":
        return (f"the CPU kernels build with GCC or Clang on Linux (GCC flags, OpenMP); {system} is not supported "
                f"by the build yet")
    return None


def main() -> int:
    why = unsupported_reason(platform.system(), platform.machine())
    if why is not None:
        print(f"SVDQuant: not building the compiled kernels: {why}. The torch reference runs instead (slower).")
        return 0
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        print(f"SVDQuant: no C++ compiler ({compiler!r} is not on PATH), so the compiled kernels are not built and "
              f"the torch reference runs instead (slower). Install one (Debian/Ubuntu: apt install g++), then {RETRY}")
        return 0
    env = dict(os.environ)
    env.setdefault("SVDQ_BUILD_CUDA", "0")
    print(f"SVDQuant: building the compiled kernels with {sys.executable} (about a minute on 2 cores) ...",
          flush=True)
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=HERE, env=env)
    if build.returncode != 0:
        print(f"SVDQuant: building the compiled kernels failed (exit {build.returncode}, output above); the torch "
              f"reference runs instead (slower). {RETRY}")
        return 0
    check = subprocess.run([sys.executable, "-c", "import nunchaku_core._C as C; print(C.__file__)"], cwd=HERE,
                           capture_output=True, text=True)
    if check.returncode != 0:
        print(f"SVDQuant: the kernels were built but do not import:\n{check.stderr.strip()}\n{RETRY}")
        return 0
    print(f"SVDQuant: compiled kernels ready: {check.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
