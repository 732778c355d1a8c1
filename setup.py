"""Builds the compiled kernels as nunchaku_core._C:

    python setup.py build_ext --inplace

One pybind11/torch extension (csrc/bindings.cpp + csrc/cpu/*.cpp). Each CPU translation unit is compiled for its
own ISA, chosen by its file name: `*_avx2.cpp` with AVX2/FMA/F16C, `*_avx512vnni.cpp` with AVX-512 F/BW/VL/DQ +
VNNI (+ PREFETCHW), everything else (`*_ref.cpp`, bindings) for the baseline x86-64. IsaBuildExt appends these
flags per source file; the run-time dispatcher (csrc/bindings.cpp, nunchaku_core/backend.py) calls a variant only
after CPUID says the CPU has it. -ffp-contract=off everywhere: the kernels' fp32 operation order is part of their
contract (they round exactly like each other and like nunchaku_core/reference.py), so GCC must not fuse a*b+c on
its own.

Platforms: x86-64 Linux with GCC or Clang (install.py unsupported_reason; elsewhere, or without a compiler, this
script says why and installs the pack without the extension: GPUs run Triton, the rest the tiled fallback). install.py runs this build for ComfyUI Manager installs.

Project metadata lives in pyproject.toml; this file only adds the extension. Sources compile one at a time
(no ninja), which keeps the build within the 2 cores of the development machines.

CUDA: only with SVDQ_BUILD_CUDA=1 are the csrc/cuda kernels compiled in too (-DSVDQ_WITH_CUDA; architectures
from TORCH_CUDA_ARCH_LIST; needs a CUDA torch and nvcc). Unset or 0, the extension is CPU-only whatever torch and
nvcc are present: those kernels have never run on a GPU, GPUs run the Triton kernels (no compiler needed), and
guessing from the machine broke `pip install .` where nvcc was found beside a torch whose CUDA headers did not
match it (cuda_runtime_api.h). `extension()` makes the choice; tests/test_setup_py.py checks it.

`pip install .` builds in an isolated environment with the newest torch pip finds, so the extension may not
import beside the torch ComfyUI runs; `pip install --no-build-isolation .` builds against the installed torch.
"""
from __future__ import annotations

import glob
import os
import platform
import sys

from setuptools import setup
import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from install import unsupported_reason  # noqa: E402  (the platforms the kernels build on)

ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512vnni.cpp": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                        "-mavx512vnni", "-mprfchw"],
}
COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-maybe-uninitialized"]
# at::parallel_for is a header template: without -fopenmp (_OPENMP undefined) it runs the whole range on the
# calling thread, which is how the kernels ran single-threaded until 2026-11-22. The extension's libgomp.so.1
# resolves to the copy torch already loaded (same soname), so torch.set_num_threads governs our threads too.
OPENMP_FLAGS = ["-fopenmp"]


def isa_flags(source: str) -> list[str]:
    for suffix, flags in ISA_FLAGS.items():
        if source.endswith(suffix):
            return flags
    return []


class IsaBuildExt(BuildExtension):
    """BuildExtension that adds each source's ISA flags (see the module docstring)."""

    def build_extensions(self):
        compile_one = self.compiler._compile

        def compile_with_isa(obj, src, ext, cc_args, extra_postargs, pp_opts):
            compile_one(obj, src, ext, cc_args, list(extra_postargs) + isa_flags(src), pp_opts)

        self.compiler._compile = compile_with_isa
        super().build_extensions()


def build_cuda() -> bool:
    """SVDQ_BUILD_CUDA=1: build the CUDA kernels (and refuse if they cannot be built); unset or 0: never."""
    flag = os.environ.get("SVDQ_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"SVDQ_BUILD_CUDA={flag!r}: expected 1 (build the CUDA kernels too) or 0 / unset (CPU only)")
    if flag != "1":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        raise SystemExit("SVDQ_BUILD_CUDA=1, but torch is built without CUDA or nvcc was not found (CUDA_HOME)")
    return True


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def extension():
    """The nunchaku_core._C extension: CPU kernels, plus the CUDA kernels when build_cuda()."""
    if build_cuda():
        return CUDAExtension(
            "nunchaku_core._C",
            ["csrc/bindings.cpp"] + sources("csrc/cpu/*.cpp") + sources("csrc/cuda/*.cu"),
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("SVDQ_WITH_CUDA", None)],
            extra_compile_args={"cxx": COMMON_FLAGS + OPENMP_FLAGS, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=OPENMP_FLAGS,
        )
    # optional: without a C++ compiler `pip install .` still installs the pack (setuptools warns and goes on);
    # install.py and the backend say that the kernels are missing and how to build them
    return CppExtension(
        "nunchaku_core._C",
        ["csrc/bindings.cpp"] + sources("csrc/cpu/*.cpp"),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": COMMON_FLAGS + OPENMP_FLAGS},
        extra_link_args=OPENMP_FLAGS,
        optional=True,
    )


if __name__ == "__main__":   # also under pip: setuptools' build backend runs this file as __main__
    _why = unsupported_reason(platform.system(), platform.machine())
    if _why is not None:
        print(f"setup.py: not building the compiled CPU kernels: {_why}. The pack installs without them: GPUs run "
              f"the Triton kernels, everything else the tiled fallback (nunchaku_core.backend).")
    setup(ext_modules=[] if _why else [extension()],
          cmdclass={"build_ext": IsaBuildExt.with_options(use_ninja=False)})
