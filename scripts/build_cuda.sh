#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu for every target GPU architecture: `nvcc -c` to a throwaway object, nothing
# linked, nothing run (this project's machines have no GPU). Prints an arch x file table of ok / FAIL and exits
# non-zero if any compile failed, 2 if nvcc is missing.
#
#   sm_75 sm_80 sm_86 sm_89   INT4 tensor-core path (mma m8n8k32 on sm_75, m16n8k64 from sm_80)
#   sm_120a                   NVFP4 block-scaled MMA (kind::mxf4nvf4, needs the arch-specific target)
# Every file is built for every target, as a fat binary would be; the NVFP4 GEMM compiles to a trap off sm_120a.
#
# Env: NVCC (path to nvcc), CUDA_ARCHES (space-separated subset, e.g. "sm_80 sm_120a"), BUILD_CUDA_LOG (log file).
# One nvcc at a time: the build machines have 2 cores shared with other work.
set -u

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
arches="${CUDA_ARCHES:-sm_75 sm_80 sm_86 sm_89 sm_120a}"

nvcc="${NVCC:-}"
if [ -z "$nvcc" ]; then
    if command -v nvcc >/dev/null 2>&1; then
        nvcc="$(command -v nvcc)"
    elif [ -x /usr/local/cuda/bin/nvcc ]; then
        nvcc=/usr/local/cuda/bin/nvcc
    fi
fi
if [ -z "$nvcc" ] || [ ! -x "$nvcc" ]; then
    echo "build_cuda.sh: nvcc not found (not on PATH, not at /usr/local/cuda/bin/nvcc${NVCC:+, NVCC=$NVCC is not executable})." >&2
    echo "build_cuda.sh: install the CUDA toolkit (12.8 or newer, for sm_120a) or set NVCC=/path/to/nvcc." >&2
    exit 2
fi

shopt -s nullglob
sources=("$root"/csrc/cuda/*.cu)
if [ "${#sources[@]}" -eq 0 ]; then
    echo "build_cuda.sh: no .cu files under $root/csrc/cuda" >&2
    exit 1
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
log="${BUILD_CUDA_LOG:-$out/build.log}"
: >"$log"

echo "nvcc: $nvcc ($("$nvcc" --version | grep -o 'release [0-9.]*'))"
declare -A result
failed=0
start=$SECONDS
for arch in $arches; do
    num="${arch#sm_}"                       # 120a -> gencode arch=compute_120a,code=sm_120a
    for src in "${sources[@]}"; do
        name="$(basename "$src")"
        t0=$SECONDS
        {
            echo "=== $arch $name"
            "$nvcc" -c -std=c++17 -O3 -Werror all-warnings -Xptxas -warn-spills \
                -gencode "arch=compute_${num},code=sm_${num}" -I "$root/csrc/cuda" \
                -o "$out/${name%.cu}_${arch}.o" "$src"
        } >>"$log" 2>&1
        if [ $? -eq 0 ]; then
            result["$arch $name"]="ok"
        else
            result["$arch $name"]="FAIL"
            failed=$((failed + 1))
        fi
        echo "  $arch $name: ${result["$arch $name"]} ($((SECONDS - t0)) s)"
    done
done

printf '\n%-26s' "file \\ arch"
for arch in $arches; do printf ' %-8s' "$arch"; done
printf '\n'
for src in "${sources[@]}"; do
    name="$(basename "$src")"
    printf '%-26s' "$name"
    for arch in $arches; do printf ' %-8s' "${result["$arch $name"]}"; done
    printf '\n'
done
echo "wall time: $((SECONDS - start)) s"

if [ "$failed" -ne 0 ]; then
    echo
    echo "build_cuda.sh: $failed compile(s) failed; nvcc output:" >&2
    grep -v '^$' "$log" >&2
    exit 1
fi
