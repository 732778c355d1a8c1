// Host entry points of the CUDA kernels: plain C++ over raw device pointers, no torch. csrc/bindings.cpp checks
// tensors and calls these; every buffer layout is described in layout.cuh (writer: nunchaku_core/cuda_packing.py).
// The op names and argument order follow the CPU kernels; only the packed layouts differ.
//
// Every function launches on `stream`, returns cudaSuccess or the first error (cudaErrorInvalidValue for bad
// shapes or misaligned pointers, cudaErrorNotSupported for the NVFP4 GEMM off sm_120), and never synchronizes.
// Pointers to activations and packed codes must be 16-byte aligned. M == 0 launches nothing.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace nunchaku_cuda {

enum class DType : int { kBFloat16 = 0, kFloat16 = 1 };

// x: [M, K] (dtype), smooth: [K] fp32, proj_down D: [K, R] fp32 (R <= 256; R == 0 skips the low-rank branch).
// Writes act_codes (packed A, M_pad = roundup(M, 16)), act_scales fp32 [K/64, M_pad], lora_act fp32 [M, R] = x·D
// on the raw x. shifted: add σ = 0.171875 before smoothing and emit unsigned codes. K % 64 == 0.
cudaError_t quantize_act_int4_lowrank(const void* x, DType dtype, int M, int K, const float* smooth, bool shifted,
                                      const float* proj_down, int R, uint32_t* act_codes, float* act_scales,
                                      float* lora_act, cudaStream_t stream);

// As above for NVFP4: group 16, act_scales uint32 [K/64, M_pad] holding 4 float8_e4m3 bytes each.
cudaError_t quantize_act_nvfp4_lowrank(const void* x, DType dtype, int M, int K, const float* smooth,
                                       const float* proj_down, int R, uint32_t* act_codes, uint32_t* act_scales,
                                       float* lora_act, cudaStream_t stream);

// out [M, N] (dtype) = Σ_g (Σ_{k∈g} qa·qw) · sa[m,g] · sw[n,g]  +  lora_act · proj_upᵀ  +  bias, with the fp32
// operations of the CPU kernel in its order (csrc/cpu/kernels.h).
// wcodes: packed B [N_pad/128, K/64, 8, 32, 4]; wscales fp32 [K/64, N_pad]; proj_up U: [N, R] fp32;
// bias: [N] fp32 or null. act_unsigned selects the u4 x s4 MMA (shifted layers).
cudaError_t gemm_w4a4_int4(const uint32_t* act_codes, const float* act_scales, bool act_unsigned, int M, int N,
                           int K, const uint32_t* wcodes, const float* wscales, const float* lora_act,
                           const float* proj_up, int R, const float* bias, void* out, DType dtype,
                           cudaStream_t stream);

// out = out_scale[n] · Σ_g (...) + lora_act · proj_upᵀ + bias; wscales uint32 [K/64, N_pad] (4 e4m3 bytes);
// out_scale = wtscale·wcscales: [N] fp32 or null (= 1). Runs only on compute capability 12.0 (built for sm_120a).
cudaError_t gemm_w4a4_nvfp4(const uint32_t* act_codes, const uint32_t* act_scales, int M, int N, int K,
                            const uint32_t* wcodes, const uint32_t* wscales, const float* out_scale,
                            const float* lora_act, const float* proj_up, int R, const float* bias, void* out,
                            DType dtype, cudaStream_t stream);

// out [M, N] (dtype) = x · (q·scales + zeros)ᵀ + bias, fp32, factored as the CPU kernel does:
// Σ_g scale·(Σ_{k∈g} x·q) + zero·(Σ_{k∈g} x). qweight uint32 [N, ceil(K/8)];
// scales, zeros fp32 [N, ceil(K/G)]; G = group_size, a multiple of 8 (64 or 128 in practice); bias [N] or null.
cudaError_t gemm_w4a16(const void* x, DType dtype, int M, int N, int K, const uint32_t* qweight,
                       const float* scales, const float* zeros, int group_size, const float* bias, void* out,
                       cudaStream_t stream);

}  // namespace nunchaku_cuda
