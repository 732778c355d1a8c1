// What the INT4 and NVFP4 activation quantizers share: one block per 16-row tile of x walks K in chunks of
// 4 k64 tiles (one per warp). A warp loads its 16x64 tile straight into A-fragment order (layout.cuh), smooths
// it, and keeps the raw values in shared memory; then the block adds the chunk's share of the low-rank
// down-projection x·D (raw x: not smoothed, not shifted, FORMAT.md §1). The per-format quantization of the
// registers lives in quantize_act_int4.cu / quantize_act_nvfp4.cu.
#pragma once

#include "common.cuh"

namespace nunchaku_cuda {

constexpr int kQuantWarps = 4;
constexpr int kQuantThreads = kQuantWarps * kWarpLanes;
constexpr int kChunkK = kQuantWarps * kTileK;        // inputs per block iteration
constexpr int kXStride = kChunkK + 4;                // padding spreads the 8 rows g of a warp over banks
constexpr int kMaxRank = 256;                        // s_lora = 16 x R fp32 must fit next to s_x in 48 KB

// v[r][j] = (x[m, k] (+ σ)) / smooth[k] for m = 16*tm + g + 8*(r & 1), k = 64*tk + 32*(r >> 1) + 8*t + j, each
// step one fp32 operation as in reference.smooth_act. Rows m >= M read as 0. Raw x goes to s_x[m - 16*tm][k - k0].
template <typename T, bool kShifted>
__device__ __forceinline__ void load_act_tile(const T* __restrict__ x, int M, int K, const float* __restrict__ smooth,
                                              int tm, int tk, int lane, int k0, float (*s_x)[kXStride],
                                              float (&v)[4][8]) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r & 1);
        const int m = kMmaM * tm + row;
        const int k = kTileK * tk + 32 * (r >> 1) + 8 * t;
        float raw[8];
        if (m < M) {
            load8(x + static_cast<size_t>(m) * K + k, raw);
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) raw[j] = 0.0f;
        }
        const float4 s_lo = __ldg(reinterpret_cast<const float4*>(smooth + k));
        const float4 s_hi = __ldg(reinterpret_cast<const float4*>(smooth + k + 4));
        const float s[8] = {s_lo.x, s_lo.y, s_lo.z, s_lo.w, s_hi.x, s_hi.y, s_hi.z, s_hi.w};
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s_x[row][k - k0 + j] = raw[j];
            const float shifted = kShifted ? __fadd_rn(raw[j], kSigma) : raw[j];
            v[r][j] = __fdiv_rn(shifted, s[j]);
        }
    }
}

// s_lora[i*R + r] += Σ_{kk < kn} s_x[i][kk] · D[k0 + kk, r] for the (i, r) pairs this thread owns. D: [K, R] fp32.
// Sequential fp32 FMAs over k; the reference's matmul order is unspecified, so this agrees to rounding only.
__device__ __forceinline__ void lowrank_accumulate(const float (*s_x)[kXStride], float* s_lora,
                                                   const float* __restrict__ D, int R, int k0, int kn) {
    for (int e = threadIdx.x; e < kMmaM * R; e += blockDim.x) {
        const int i = e / R, r = e - i * R;
        const float* d = D + static_cast<size_t>(k0) * R + r;
        float acc = s_lora[e];
        for (int kk = 0; kk < kn; ++kk) acc = fmaf(s_x[i][kk], d[static_cast<size_t>(kk) * R], acc);
        s_lora[e] = acc;
    }
}

__device__ __forceinline__ void lowrank_store(const float* s_lora, float* __restrict__ lora_act, int M, int R, int tm) {
    for (int e = threadIdx.x; e < kMmaM * R; e += blockDim.x) {
        const int i = e / R, m = kMmaM * tm + i;
        if (m < M) lora_act[static_cast<size_t>(m) * R + (e - i * R)] = s_lora[e];
    }
}

// Host-side checks shared by both quantizers.
inline bool quantize_args_ok(const void* x, int M, int K, const float* smooth, const float* proj_down, int R,
                             const uint32_t* act_codes, const void* act_scales, const float* lora_act) {
    if (M < 0 || K <= 0 || K % kTileK != 0 || R < 0 || R > kMaxRank) return false;
    if (!x || !smooth || !act_codes || !act_scales) return false;
    if (R > 0 && (!proj_down || !lora_act)) return false;
    return aligned16(x) && aligned16(smooth) && aligned16(act_codes);
}

}  // namespace nunchaku_cuda
