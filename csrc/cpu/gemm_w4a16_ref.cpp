// W4A16 GEMM/GEMV, portable scalar C++: the readable statement of what the SIMD variants compute (kernels.h,
// W4A16Args). Per group the dequantization w = q·scale + zero is factored out of the dot product:
//     y[m, n] = Σ_g  scale[n,g] · (Σ_{k∈g} x[m,k]·q[n,k])  +  zero[n,g] · xs[m,g]  (+ bias[n])
// which needs one fma per weight instead of three. It rounds differently from reference.w4a16_linear (which
// dequantizes first); tests/test_cpu_kernels.py derives the tolerance for that. Packed layout: csrc/layout.h,
// writer nunchaku_core/cpu_packing.py.
#include <algorithm>

#include "../layout.h"
#include "common.h"
#include "kernels.h"

namespace svdq_cpu {

namespace {

// Code of (n, k) in the packed W4A16 codes [NB, ceil(K/8), 64]: byte 16*((k%8)/2) + n%16 of chunk (n/16, k/8),
// low nibble for even k.
inline int w4a16_code(const uint8_t* wcodes, int64_t K, int64_t n, int64_t k) {
    const int64_t steps = ceil_div(K, kStepK);
    const uint8_t byte = wcodes[((n / kBlockN) * steps + k / kStepK) * kChunkBytes + 16 * ((k % kStepK) / 2) + n % kBlockN];
    return (k % 2) == 0 ? (byte & 0x0F) : (byte >> 4);
}

}  // namespace

void w4a16_group_sums(const W4A16Args& a, int64_t row_begin, int64_t row_end) {
    const int64_t groups = ceil_div(a.K, a.G);
    for (int64_t m = row_begin; m < row_end; ++m) {
        for (int64_t g = 0; g < groups; ++g) {
            float s = 0.0f;
            for (int64_t k = g * a.G; k < std::min(a.K, (g + 1) * a.G); ++k) s = s + a.x[m * a.K + k];
            a.xs[m * groups + g] = s;
        }
    }
}

void gemm_w4a16_ref(const W4A16Args& a, int64_t tile_begin, int64_t tile_end) {
    const int64_t groups = ceil_div(a.K, a.G);
    const TilePlan plan = tile_plan(a.M, a.N, a.K);
    for (int64_t t = tile_begin; t < tile_end; ++t) {
        const int64_t m0 = (t / plan.tiles_n) * plan.rows, n0 = (t % plan.tiles_n) * kTileN;
        const int64_t m1 = std::min(a.M, m0 + plan.rows), n1 = std::min(a.N, n0 + kTileN);
        for (int64_t m = m0; m < m1; ++m) {
            for (int64_t n = n0; n < n1; ++n) {
                const int64_t nb = n / kBlockN, c = n % kBlockN;
                float y = 0.0f;
                for (int64_t g = 0; g < groups; ++g) {
                    float accq = 0.0f;
                    for (int64_t k = g * a.G; k < std::min(a.K, (g + 1) * a.G); ++k) {
                        accq = std::fma(a.x[m * a.K + k], float(w4a16_code(a.wcodes, a.K, n, k)), accq);
                    }
                    const int64_t sz = (nb * groups + g) * kBlockN + c;
                    y = std::fma(load_as_float(a.scales, a.scales_dtype, sz), accq, y);
                    y = std::fma(load_as_float(a.zeros, a.zeros_dtype, sz), a.xs[m * groups + g], y);
                }
                if (a.bias != nullptr) y = y + a.bias[n];
                store_from_float(a.out, a.out_dtype, m * a.N + n, y);
            }
        }
    }
}

}  // namespace svdq_cpu
