// quantize_act_int4_lowrank: smoothing, σ shift for unsigned (shifted) layers, INT4 group-64 codes + fp32 scales,
// and the low-rank down-projection x·D in one pass over x. Numerics: reference.quantize_act_int4 and
// reference.lowrank_branch's first matmul. Output layouts: layout.cuh ("Activation codes", "Activation scales").
#include "quantize_act.cuh"

namespace nunchaku_cuda {
namespace {

template <typename T, bool kShifted>
__global__ void __launch_bounds__(kQuantThreads)
quantize_act_int4_kernel(const T* __restrict__ x, int M, int K, const float* __restrict__ smooth,
                         const float* __restrict__ D, int R, uint4* __restrict__ act_codes,
                         float* __restrict__ act_scales, float* __restrict__ lora_act) {
    __shared__ float s_x[kMmaM][kXStride];
    extern __shared__ float s_lora[];                     // [16, R]
    const int tm = blockIdx.x, M_pad = gridDim.x * kMmaM, KT = K / kTileK;
    const int warp = threadIdx.x / kWarpLanes, lane = threadIdx.x % kWarpLanes;
    const int g = lane >> 2, t = lane & 3;
    constexpr float kQmax = kShifted ? 15.0f : 7.0f;

    for (int e = threadIdx.x; e < kMmaM * R; e += blockDim.x) s_lora[e] = 0.0f;

    for (int c0 = 0; c0 < KT; c0 += kQuantWarps) {
        const int tk = c0 + warp;
        if (tk < KT) {
            float v[4][8];
            load_act_tile<T, kShifted>(x, M, K, smooth, tm, tk, lane, c0 * kTileK, s_x, v);

            // A 64-group of row g is words r = 0, 2 of the 4 lanes t of quad g; row g + 8 is words 1, 3.
            float amax[2] = {0.0f, 0.0f};
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int j = 0; j < 8; ++j) amax[r & 1] = fmaxf(amax[r & 1], fabsf(v[r][j]));
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                amax[h] = fmaxf(amax[h], __shfl_xor_sync(0xffffffffu, amax[h], 1));
                amax[h] = fmaxf(amax[h], __shfl_xor_sync(0xffffffffu, amax[h], 2));
            }
            const float scale[2] = {__fdiv_rn(amax[0], kQmax), __fdiv_rn(amax[1], kQmax)};

            uint32_t w[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const float sc = scale[r & 1];
                w[r] = 0;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    int q = 0;   // a group whose scale is 0 gets codes 0 (reference: no division by zero)
                    if (sc > 0.0f) {
                        const float qf = rintf(__fdiv_rn(v[r][j], sc));   // round half to even
                        q = static_cast<int>(kShifted ? fminf(fmaxf(qf, 0.0f), 15.0f) : fminf(fmaxf(qf, -7.0f), 7.0f));
                    }
                    w[r] |= (static_cast<uint32_t>(q) & 0xFu) << (4 * j);
                }
            }
            act_codes[(static_cast<size_t>(tm) * KT + tk) * kWarpLanes + lane] = make_uint4(w[0], w[1], w[2], w[3]);
            if (t == 0) {
                act_scales[static_cast<size_t>(tk) * M_pad + kMmaM * tm + g] = scale[0];
                act_scales[static_cast<size_t>(tk) * M_pad + kMmaM * tm + g + 8] = scale[1];
            }
        }
        __syncthreads();
        if (R > 0) lowrank_accumulate(s_x, s_lora, D, R, c0 * kTileK, min(kQuantWarps, KT - c0) * kTileK);
        __syncthreads();
    }
    if (R > 0) lowrank_store(s_lora, lora_act, M, R, tm);
}

}  // namespace

cudaError_t quantize_act_int4_lowrank(const void* x, DType dtype, int M, int K, const float* smooth, bool shifted,
                                      const float* proj_down, int R, uint32_t* act_codes, float* act_scales,
                                      float* lora_act, cudaStream_t stream) {
    if (!quantize_args_ok(x, M, K, smooth, proj_down, R, act_codes, act_scales, lora_act)) return cudaErrorInvalidValue;
    if (M == 0) return cudaSuccess;
    const dim3 grid(round_up(M, kMmaM) / kMmaM);
    const size_t smem = sizeof(float) * kMmaM * R;
    dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        auto* codes = reinterpret_cast<uint4*>(act_codes);
        if (shifted)
            quantize_act_int4_kernel<T, true><<<grid, kQuantThreads, smem, stream>>>(
                static_cast<const T*>(x), M, K, smooth, proj_down, R, codes, act_scales, lora_act);
        else
            quantize_act_int4_kernel<T, false><<<grid, kQuantThreads, smem, stream>>>(
                static_cast<const T*>(x), M, K, smooth, proj_down, R, codes, act_scales, lora_act);
    });
    return cudaGetLastError();
}

}  // namespace nunchaku_cuda
