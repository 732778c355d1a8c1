// W4A4 GEMM with the fused epilogue, portable scalar C++: the readable statement of what the SIMD variants
// compute (kernels.h, W4A4Args). Reads the packed layouts of csrc/layout.h written by
// nunchaku_core/cpu_packing.py; reference.gemm_w4a4 + lowrank_branch + bias is the contract it is tested against.
#include <algorithm>

#include "../layout.h"
#include "common.h"
#include "kernels.h"

namespace svdq_cpu {

namespace {

// Weight nibble of (n, k) in the packed codes [NB, K/8, 64]: byte 4*(n%16) + k%4 of chunk (n/16, k/8), low
// nibble for k%8 < 4, high nibble otherwise.
inline int weight_nibble(const uint8_t* wcodes, int64_t K, int64_t n, int64_t k) {
    const uint8_t byte = wcodes[((n / kBlockN) * (K / kStepK) + k / kStepK) * kChunkBytes + 4 * (n % kBlockN) + k % 4];
    return (k % kStepK) < 4 ? (byte & 0x0F) : (byte >> 4);
}

template <bool kNvfp4>
void gemm_w4a4_ref(const W4A4Args& a, int64_t tile_begin, int64_t tile_end) {
    const int64_t G = kNvfp4 ? kGroupNvfp4 : kGroupInt4, groups = a.K / G;
    const TilePlan plan = tile_plan(a.M, a.N, a.K);
    for (int64_t t = tile_begin; t < tile_end; ++t) {
        const int64_t m0 = (t / plan.tiles_n) * plan.rows, n0 = (t % plan.tiles_n) * kTileN;
        const int64_t m1 = std::min(a.M, m0 + plan.rows), n1 = std::min(a.N, n0 + kTileN);
        for (int64_t m = m0; m < m1; ++m) {
            for (int64_t n = n0; n < n1; ++n) {
                const int64_t nb = n / kBlockN, c = n % kBlockN;
                float acc = 0.0f;
                for (int64_t g = 0; g < groups; ++g) {
                    // Exact integer dot product: int4 codes w in [-8, 7] (nibble - 8), or 2·e2m1 values (the sum is
                    // 4x the reference's partial sum; the packed NVFP4 scales carry the 1/4). The SIMD variants
                    // get the same integer as dot(w + offset, a) + acorr.
                    int32_t dot = 0;
                    for (int64_t k = g * G; k < (g + 1) * G; ++k) {
                        const int nib = weight_nibble(a.wcodes, a.K, n, k);
                        const int32_t w = kNvfp4 ? kE2m1Twice[nib] : nib - kInt4Offset;
                        dot += w * a.act[m * a.K + k];
                    }
                    const float ws = load_as_float(a.wscales, a.wscales_dtype, (nb * groups + g) * kBlockN + c);
                    acc = std::fma(float(dot) * a.ascale[m * groups + g], ws, acc);
                }
                if (a.out_scale != nullptr) acc = acc * a.out_scale[n];
                for (int64_t r = 0; r < a.R; ++r) {
                    const float u = load_as_float(a.proj_up, a.up_dtype, (nb * a.R + r) * kBlockN + c);
                    acc = std::fma(a.lora[m * a.R16 + r], u, acc);
                }
                if (a.bias != nullptr) acc = acc + a.bias[n];
                store_from_float(a.out, a.out_dtype, m * a.N + n, acc);
            }
        }
    }
}

}  // namespace

void gemm_w4a4_int4_ref(const W4A4Args& a, int64_t tile_begin, int64_t tile_end) {
    gemm_w4a4_ref<false>(a, tile_begin, tile_end);
}

void gemm_w4a4_nvfp4_ref(const W4A4Args& a, int64_t tile_begin, int64_t tile_end) {
    gemm_w4a4_ref<true>(a, tile_begin, tile_end);
}

}  // namespace svdq_cpu
