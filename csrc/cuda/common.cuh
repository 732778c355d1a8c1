// Device helpers shared by the CUDA kernels: dtype conversion, the tensor-core MMAs per architecture, cp.async,
// the e2m1 / e4m3 roundings, and host-side argument checks. Never executed on this project's machines: see README.md.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "layout.cuh"
#include "ops.cuh"

// mma.sync ... .kind::mxf4nvf4.block_scale needs an arch-specific target: sm_120a (also sm_121a). PTX ISA 8.7.
#if defined(__CUDA_ARCH_FEAT_SM120_ALL) || defined(__CUDA_ARCH_FEAT_SM121_ALL)
#define NUNCHAKU_HAS_BLOCK_SCALE_MMA 1
#else
#define NUNCHAKU_HAS_BLOCK_SCALE_MMA 0
#endif

namespace nunchaku_cuda {

constexpr float kSigma = 0.171875f;   // INT4 activation shift of post-GELU layers (FORMAT.md §1)
constexpr float kE4M3Max = 448.0f;

// ---- dtype -------------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// 8 consecutive elements (16 bytes, 16-byte aligned) widened to fp32.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
    static_assert(sizeof(T) == 2, "bf16 / fp16 only");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = to_float(e[j]);
}

// Calls f with a value of the element type that `dtype` names (so f can be a generic lambda).
template <typename F>
inline void dispatch_dtype(DType dtype, F&& f) {
    if (dtype == DType::kBFloat16) f(__nv_bfloat16{});
    else f(__half{});
}

// ---- INT4 tensor-core MMA: D(16x8 s32) += A(16x64 u4|s4, row) · B(64x8 s4, col) ---------------------------
// Fragments as in PTX ISA "Matrix Fragments for mma.m16n8k64": a.x row g / k 0..31, a.y row g+8 / k 0..31,
// a.z row g / k 32..63, a.w row g+8 / k 32..63 (k = 8t + nibble); b0 k 0..31, b1 k 32..63 of column g;
// d[0..1] row g, d[2..3] row g+8, columns 2t, 2t+1.
template <bool kUnsignedA>
__device__ __forceinline__ void mma_m8n8k32_int4(int& d0, int& d1, uint32_t a, uint32_t b) {
    if constexpr (kUnsignedA) {
        asm volatile("mma.sync.aligned.m8n8k32.row.col.s32.u4.s4.s32 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
                     : "+r"(d0), "+r"(d1) : "r"(a), "r"(b));
    } else {
        asm volatile("mma.sync.aligned.m8n8k32.row.col.s32.s4.s4.s32 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
                     : "+r"(d0), "+r"(d1) : "r"(a), "r"(b));
    }
}

template <bool kUnsignedA>
__device__ __forceinline__ void mma_int4_16x8x64(int (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
    if constexpr (kUnsignedA) {
        asm volatile("mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                     : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                     : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
    }
#else
    // sm_75 has only m8n8k32 for 4-bit operands (PTX ISA: .m16n8k32/.m16n8k64 need sm_80; ptxas 13.0 rejects
    // m16n8k64 for sm_75). Its fragments (row g, k = 8t + nibble; accumulators row g, columns 2t, 2t+1) are
    // the quarters of the m16n8k64 ones, so four of them compute the same tile from the same registers.
    mma_m8n8k32_int4<kUnsignedA>(d[0], d[1], a.x, b0);
    mma_m8n8k32_int4<kUnsignedA>(d[0], d[1], a.z, b1);
    mma_m8n8k32_int4<kUnsignedA>(d[2], d[3], a.y, b0);
    mma_m8n8k32_int4<kUnsignedA>(d[2], d[3], a.w, b1);
#endif
}

// ---- NVFP4 block-scaled MMA (sm_120a): D(16x8 f32) += (A·SF_A)(16x64 e2m1) · (B·SF_B)(64x8 e2m1) ------------
// Same A/B/D fragments as the INT4 MMA. Scales (PTX ISA "Block Scaling for mma.sync", scale_vec::4X, ue4m3):
// with byte-id = thread-id = 0 the lanes t == 0 pass the 4 scales (k 0-15, 16-31, 32-47, 48-63 = bytes 0..3) of
// row g and the lanes t == 1 those of row g + 8 in `sfa`; the lanes t == 0 pass the 4 scales of column g in
// `sfb`. Other lanes' values are ignored. Spelling: both `kind::...m16n8k64.row.col` and `m16n8k64.row.col.kind::`
// assemble with ptxas 13.0; this is the order public sm_120 code uses.
__device__ __forceinline__ void mma_nvfp4_16x8x64(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1,
                                                  uint32_t sfa, uint32_t sfb) {
#if NUNCHAKU_HAS_BLOCK_SCALE_MMA
    const uint16_t zero = 0;
    asm volatile("mma.sync.aligned.kind::mxf4nvf4.block_scale.scale_vec::4X.m16n8k64.row.col.f32.e2m1.e2m1.f32.ue4m3 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3}, {%10}, {%11,%12}, {%13}, {%14,%15};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1),
                   "r"(sfa), "h"(zero), "h"(zero), "r"(sfb), "h"(zero), "h"(zero));
#else
    __trap();   // unreachable: the host wrapper refuses devices other than compute capability 12.0
#endif
}

// ---- cp.async (sm_80+), plain copies on sm_75 -----------------------------------------------------------------
__device__ __forceinline__ void copy16_async(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#else
    *reinterpret_cast<uint4*>(smem) = __ldg(reinterpret_cast<const uint4*>(gmem));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// ---- roundings, each the same IEEE operations as nunchaku_core/reference.py -----------------------------------
// Nearest e2m1 code (ties to even, saturating at ±6), sign bit set for every negative input: the reference's
// midpoint comparisons, `>` where the lower code is even and `>=` where it is odd. cvt.rn.satfinite.e2m1x2.f32
// would do this in one instruction on sm_100+/sm_120a, but it cannot be checked against the reference here.
__device__ __forceinline__ uint32_t e2m1_round(float v) {
    const float a = fabsf(v);
    const uint32_t mag = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
    return mag | (v < 0.0f ? 8u : 0u);
}

// fp32 -> float8_e4m3fn byte, round to nearest even, saturating (as torch's .to(torch.float8_e4m3fn) for values
// already clamped to 448), and back.
__device__ __forceinline__ uint8_t e4m3_from_float(float v) {
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}
__device__ __forceinline__ float e4m3_to_float(uint8_t b) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E4M3)));
}

// ---- host-side checks ------------------------------------------------------------------------------------------
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace nunchaku_cuda
