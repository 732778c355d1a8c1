// What the INT4 and NVFP4 W4A4 GEMMs share. A block of 4 warps computes a 64 x 128 output tile: warp w owns rows
// 16*w .. 16*w + 15 of the block (one packed activation tile tm) and all 128 columns (16 n8 MMA tiles); the
// 128 x 64 weight tile and its 128 scale words go through shared memory, double-buffered with cp.async.
// The epilogue scales by out_scale (NVFP4), adds the low-rank up-projection lora_act·Uᵀ and the bias, then
// rounds once to the output dtype.
//
// Accumulator fragment of n8 tile j (PTX ISA, mma m16n8k64): acc[j][c] is row 16*w + g + 8*(c >> 1) of the block,
// column 8*j + 2*t + (c & 1) of the tile.
#pragma once

#include "common.cuh"

namespace nunchaku_cuda {

constexpr int kGemmWarps = 4;
constexpr int kGemmThreads = kGemmWarps * kWarpLanes;
constexpr int kBlockM = kGemmWarps * kMmaM;                 // 64
constexpr int kNTiles = kTileN / kMmaN;                     // 16 n8 tiles per warp
constexpr int kTileWords4 = kTileN * kTileK / 8 / 4;        // one packed weight tile in uint4: 256
constexpr int kLoraChunk = 16;

static_assert(kTileWords4 == 2 * kGemmThreads, "each thread copies two uint4 of a weight tile");
static_assert(kTileN / 4 <= kGemmThreads, "one thread per uint4 of scales");

struct GemmSmem {
    uint4 w[2][kTileWords4];                 // packed weight tile (tn, tk): uint4 index p*32 + lane
    uint32_t ws[2][kTileN];                  // its scale words: fp32 bits (INT4) or 4 e4m3 bytes (NVFP4)
    float lora[kBlockM][kLoraChunk + 1];     // epilogue: lora_act rows of the block, 16 ranks
    float up[kTileN][kLoraChunk + 1];        // epilogue: U rows of the tile, 16 ranks
};

// Issues the cp.async copies of weight tile (tn, tk) and its scales into stage `s`, one commit group.
__device__ __forceinline__ void load_weight_stage(GemmSmem& sm, int s, const uint32_t* __restrict__ wcodes,
                                                  const uint32_t* __restrict__ wscales, int tn, int tk, int KT,
                                                  int N_pad) {
    const uint4* src = reinterpret_cast<const uint4*>(wcodes) + (static_cast<size_t>(tn) * KT + tk) * kTileWords4;
    copy16_async(&sm.w[s][threadIdx.x], src + threadIdx.x);
    copy16_async(&sm.w[s][threadIdx.x + kGemmThreads], src + threadIdx.x + kGemmThreads);
    if (threadIdx.x < kTileN / 4)
        copy16_async(&sm.ws[s][4 * threadIdx.x],
                     wscales + static_cast<size_t>(tk) * N_pad + static_cast<size_t>(tn) * kTileN + 4 * threadIdx.x);
    cp_async_commit();
}

// The epilogue, in the CPU kernels' order (csrc/cpu/kernels.h, W4A4Args) so that their fp32 roundings match:
//   y = acc · out_scale[n] (NVFP4, when given);  y = fma(lora_act[m, r], U[n, r], y) for r = 0, 1, ...;
//   y = y + bias[n];  out = y rounded once to T (nearest even).
// lora_act and U are staged through shared memory 16 ranks at a time; R == 0 skips the chain.
template <typename T>
__device__ __forceinline__ void epilogue(GemmSmem& sm, float (&acc)[kNTiles][4], const float* __restrict__ out_scale,
                                         const float* __restrict__ lora_act, const float* __restrict__ U, int R,
                                         const float* __restrict__ bias, T* __restrict__ out, int M, int N, int m0,
                                         int n0) {
    const int warp = threadIdx.x / kWarpLanes, lane = threadIdx.x % kWarpLanes;
    const int g = lane >> 2, t = lane & 3;
    if (out_scale) {
#pragma unroll
        for (int j = 0; j < kNTiles; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int n = n0 + 8 * j + 2 * t + (c & 1);
                if (n < N) acc[j][c] = __fmul_rn(acc[j][c], out_scale[n]);
            }
    }
    for (int r0 = 0; r0 < R; r0 += kLoraChunk) {
        __syncthreads();   // the previous chunk (or the main loop's buffers) may still be read
        for (int e = threadIdx.x; e < kBlockM * kLoraChunk; e += kGemmThreads) {
            const int i = e / kLoraChunk, rr = e % kLoraChunk, m = m0 + i, r = r0 + rr;
            sm.lora[i][rr] = (m < M && r < R) ? lora_act[static_cast<size_t>(m) * R + r] : 0.0f;
        }
        for (int e = threadIdx.x; e < kTileN * kLoraChunk; e += kGemmThreads) {
            const int i = e / kLoraChunk, rr = e % kLoraChunk, n = n0 + i, r = r0 + rr;
            sm.up[i][rr] = (n < N && r < R) ? U[static_cast<size_t>(n) * R + r] : 0.0f;
        }
        __syncthreads();
        const int rn = min(kLoraChunk, R - r0);   // stop at R: a fma with padded zeros would still round -0 to +0
        for (int rr = 0; rr < rn; ++rr) {
            const float a0 = sm.lora[kMmaM * warp + g][rr], a1 = sm.lora[kMmaM * warp + g + 8][rr];
#pragma unroll
            for (int j = 0; j < kNTiles; ++j) {
                const float u0 = sm.up[8 * j + 2 * t][rr], u1 = sm.up[8 * j + 2 * t + 1][rr];
                acc[j][0] = fmaf(a0, u0, acc[j][0]);
                acc[j][1] = fmaf(a0, u1, acc[j][1]);
                acc[j][2] = fmaf(a1, u0, acc[j][2]);
                acc[j][3] = fmaf(a1, u1, acc[j][3]);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int m = m0 + kMmaM * warp + g + 8 * (c >> 1);
            const int n = n0 + 8 * j + 2 * t + (c & 1);
            if (m >= M || n >= N) continue;
            const float y = bias ? __fadd_rn(acc[j][c], bias[n]) : acc[j][c];
            out[static_cast<size_t>(m) * N + n] = from_float<T>(y);
        }
}

inline bool gemm_args_ok(const uint32_t* act_codes, const void* act_scales, int M, int N, int K,
                         const uint32_t* wcodes, const void* wscales, const float* lora_act, const float* proj_up,
                         int R, const void* out) {
    if (M < 0 || N <= 0 || K <= 0 || K % kTileK != 0 || R < 0) return false;
    if (!act_codes || !act_scales || !wcodes || !wscales || !out) return false;
    if (R > 0 && (!lora_act || !proj_up)) return false;
    return aligned16(act_codes) && aligned16(wcodes) && aligned16(wscales);
}

}  // namespace nunchaku_cuda
