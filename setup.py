"""Builds the compiled kernels as nunchaku_core._C:

    python setup.py build_ext --inplace

One pybind11/torch extension (csrc/bindings.cpp + csrc/cpu/*.cpp). Each CPU translation unit is compiled for its
own ISA, chosen by its file name: `*_avx2.cpp` with AVX2/FMA/F16C, `*_avx512vnni.cpp` with AVX-512 F/BW/VL/DQ +
VNNI (+ PREFETCHW), everything else (`*_ref.cpp`, bindings) for the baseline x86-64. IsaBuildExt appends these
flags per source file; the run-time dispatcher (csrc/bindings.cpp, nunchaku_core/backend.py) calls a variant only
after CPUID says the CPU has it. -ffp-contract=off everywhere: the kernels' fp32 operation order is part of their
contract (they round exactly like each other and like nunchaku_core/reference.py), so GCC must not fuse a*b+c on
its own.

Platforms: x86-64 Linux with GCC or Clang (install.py unsupported_reason; elsewhere this script stops with the
reason and the torch reference runs). install.py runs this build for ComfyUI Manager installs.

Project metadata lives in pyproject.toml; this file only adds the extension. Sources compile one at a time
(no ninja), which keeps the build within the 2 cores of the development machines.

CUDA: with SVDQ_BUILD_CUDA=1 (or unset, when torch has CUDA and nvcc is found) the csrc/cuda kernels are compiled
in too (-DSVDQ_WITH_CUDA; architectures from TORCH_CUDA_ARCH_LIST). SVDQ_BUILD_CUDA=0 never builds them. This
project's machines have CPU torch, so they always build the CPU-only extension.
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

_why = unsupported_reason(platform.system(), platform.machine())
if _why is not None:
    raise SystemExit(f"setup.py: {_why}. Without the compiled kernels the torch reference runs "
                     f"(nunchaku_core.backend).")

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
    flag = os.environ.get("SVDQ_BUILD_CUDA", "").strip()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not possible:
        raise SystemExit("SVDQ_BUILD_CUDA=1, but torch is built without CUDA or nvcc was not found (CUDA_HOME)")
    return possible and flag != "0"


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


if build_cuda():
    extension = CUDAExtension(
        "nunchaku_core._C",
        ["csrc/bindings.cpp"] + sources("csrc/cpu/*.cpp") + sources("csrc/cuda/*.cu"),
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=[("SVDQ_WITH_CUDA", None)],
        extra_compile_args={"cxx": COMMON_FLAGS + OPENMP_FLAGS, "nvcc": ["-O3", "-std=c++17"]},
        extra_link_args=OPENMP_FLAGS,
    )
else:
    extension = CppExtension(
        "nunchaku_core._C",
        ["csrc/bindings.cpp"] + sources("csrc/cpu/*.cpp"),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": COMMON_FLAGS + OPENMP_FLAGS},
        extra_link_args=OPENMP_FLAGS,
    )

setup(ext_modules=[extension], cmdclass={"build_ext": IsaBuildExt.with_options(use_ninja=False)})
