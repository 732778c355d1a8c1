// quantize_act_nvfp4_lowrank: smoothing, NVFP4 codes (e2m1, group 16) with float8_e4m3 scales, and the low-rank
// down-projection x·D in one pass over x. Numerics: reference.quantize_act_nvfp4
// (scale = e4m3(min(absmax / 6, 448)), code = nearest e2m1 of t / scale, ties to even). Output layouts: layout.cuh.
// Plain CUDA (no MMA), so it builds and would run on every target; only the GEMM that consumes it needs sm_120a.
#include "quantize_act.cuh"

namespace nunchaku_cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
quantize_act_nvfp4_kernel(const T* __restrict__ x, int M, int K, const float* __restrict__ smooth,
                          const float* __restrict__ D, int R, uint4* __restrict__ act_codes,
                          uint8_t* __restrict__ act_scale_bytes, float* __restrict__ lora_act) {
    __shared__ float s_x[kMmaM][kXStride];
    extern __shared__ float s_lora[];                     // [16, R]
    const int tm = blockIdx.x, M_pad = gridDim.x * kMmaM, KT = K / kTileK;
    const int warp = threadIdx.x / kWarpLanes, lane = threadIdx.x % kWarpLanes;
    const int g = lane >> 2, t = lane & 3;

    for (int e = threadIdx.x; e < kMmaM * R; e += blockDim.x) s_lora[e] = 0.0f;

    for (int c0 = 0; c0 < KT; c0 += kQuantWarps) {
        const int tk = c0 + warp;
        if (tk < KT) {
            float v[4][8];
            load_act_tile<T, false>(x, M, K, smooth, tm, tk, lane, c0 * kTileK, s_x, v);

            // Word r of lanes t and t ^ 1 is one 16-group: row g + 8*(r & 1), group 2*(r >> 1) + (t >> 1).
            uint32_t w[4];
            uint8_t scale_byte[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                float amax = 0.0f;
#pragma unroll
                for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[r][j]));
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
                scale_byte[r] = e4m3_from_float(fminf(__fdiv_rn(amax, 6.0f), kE4M3Max));
                const float sc = e4m3_to_float(scale_byte[r]);
                w[r] = 0;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    // A group whose (rounded) scale is 0 gets codes 0 (reference: no division by zero).
                    const uint32_t q = sc > 0.0f ? e2m1_round(__fdiv_rn(v[r][j], sc)) : 0u;
                    w[r] |= q << (4 * j);
                }
            }
            act_codes[(static_cast<size_t>(tm) * KT + tk) * kWarpLanes + lane] = make_uint4(w[0], w[1], w[2], w[3]);
            if ((t & 1) == 0) {
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int m = kMmaM * tm + g + 8 * (r & 1);
                    const int q = 2 * (r >> 1) + (t >> 1);
                    act_scale_bytes[(static_cast<size_t>(tk) * M_pad + m) * kNvfp4GroupsPerTile + q] = scale_byte[r];
                }
            }
        }
        __syncthreads();
        if (R > 0) lowrank_accumulate(s_x, s_lora, D, R, c0 * kTileK, min(kQuantWarps, KT - c0) * kTileK);
        __syncthreads();
    }
    if (R > 0) lowrank_store(s_lora, lora_act, M, R, tm);
}

}  // namespace

cudaError_t quantize_act_nvfp4_lowrank(const void* x, DType dtype, int M, int K, const float* smooth,
                                       const float* proj_down, int R, uint32_t* act_codes, uint32_t* act_scales,
                                       float* lora_act, cudaStream_t stream) {
    if (!quantize_args_ok(x, M, K, smooth, proj_down, R, act_codes, act_scales, lora_act)) return cudaErrorInvalidValue;
    if (M == 0) return cudaSuccess;
    const dim3 grid(round_up(M, kMmaM) / kMmaM);
    const size_t smem = sizeof(float) * kMmaM * R;
    dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        quantize_act_nvfp4_kernel<T><<<grid, kQuantThreads, smem, stream>>>(
            static_cast<const T*>(x), M, K, smooth, proj_down, R, reinterpret_cast<uint4*>(act_codes),
            reinterpret_cast<uint8_t*>(act_scales), lora_act);
    });
    return cudaGetLastError();
}

}  // namespace nunchaku_cuda
