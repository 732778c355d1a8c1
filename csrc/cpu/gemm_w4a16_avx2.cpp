// W4A16 GEMM/GEMV, AVX2 + FMA. Computes exactly what gemm_w4a16_ref.cpp states (kernels.h); bitwise equal to the
// ref. Reads the packed codes as gemm_w4a16_avx512vnni.cpp does, 8 columns at a time: in chunk (nb, s) the 8
// bytes at 16·j + 8·h zero-extended to int32 hold inputs 8s+2j (low nibble) and 8s+2j+1 (high nibble) of columns
// 16·nb + 8·h .. +7 (layout.h, writer nunchaku_core/cpu_packing.py pack_w4a16).
// Micro-kernel: 4 rows x 16 columns, 8 group accumulators in ymm registers, outputs in L1.
#include "../layout.h"
#include "common.h"
#include "kernels.h"
#include "simd_avx2.h"

namespace svdq_cpu {

namespace {

constexpr int kMR = 4;

template <int MR>
static inline void pair_step(const uint8_t* chunk_j, const float* const* xp, int64_t k, bool both,
                             __m256 (&accq)[MR][2]) {
    for (int h = 0; h < 2; ++h) {
        const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(chunk_j + 8 * h)));
        const __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(0x0F)));
        for (int i = 0; i < MR; ++i) accq[i][h] = _mm256_fmadd_ps(_mm256_set1_ps(xp[i][k]), q0, accq[i][h]);
        if (both) {
            const __m256 q1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4));
            for (int i = 0; i < MR; ++i) accq[i][h] = _mm256_fmadd_ps(_mm256_set1_ps(xp[i][k + 1]), q1, accq[i][h]);
        }
    }
}

template <int MR>
static inline void micro_kernel(const W4A16Args& a, int64_t m0, int64_t nb) {
    const int64_t K = a.K, G = a.G, groups = ceil_div(K, G);
    const uint8_t* wp = a.wcodes + nb * ceil_div(K, kStepK) * kChunkBytes;
    const float* xp[MR];
    for (int i = 0; i < MR; ++i) xp[i] = a.x + (m0 + i) * K;

    alignas(32) float y[MR][kBlockN] = {};
    for (int64_t g = 0; g < groups; ++g) {
        const int64_t kb = g * G, ke = min_i64(K, kb + G);
        __m256 accq[MR][2];
        for (int i = 0; i < MR; ++i) accq[i][0] = accq[i][1] = _mm256_setzero_ps();
        int64_t k = kb;
        for (; k + kStepK <= ke; k += kStepK) {
            const uint8_t* chunk = wp + (k / kStepK) * kChunkBytes;
            for (int j = 0; j < 4; ++j) pair_step<MR>(chunk + 16 * j, xp, k + 2 * j, true, accq);
        }
        for (; k < ke; k += 2) {
            pair_step<MR>(wp + (k / kStepK) * kChunkBytes + 16 * ((k % kStepK) / 2), xp, k, k + 1 < ke, accq);
        }
        for (int h = 0; h < 2; ++h) {
            const int64_t sz = (nb * groups + g) * kBlockN + 8 * h;
            const __m256 s = load8(a.scales, a.scales_dtype, sz), z = load8(a.zeros, a.zeros_dtype, sz);
            for (int i = 0; i < MR; ++i) {
                __m256 v = _mm256_fmadd_ps(s, accq[i][h], _mm256_load_ps(&y[i][8 * h]));
                v = _mm256_fmadd_ps(z, _mm256_set1_ps(a.xs[(m0 + i) * groups + g]), v);
                _mm256_store_ps(&y[i][8 * h], v);
            }
        }
    }
    const int64_t n0 = nb * kBlockN;
    for (int h = 0; h < 2; ++h) {
        const __m256 b = a.bias != nullptr ? _mm256_loadu_ps(a.bias + n0 + 8 * h) : _mm256_setzero_ps();
        for (int i = 0; i < MR; ++i) {
            __m256 v = _mm256_load_ps(&y[i][8 * h]);
            if (a.bias != nullptr) v = _mm256_add_ps(v, b);
            store8(a.out, a.out_dtype, (m0 + i) * a.N + n0 + 8 * h, v, a.N - n0 - 8 * h);
        }
    }
}

}  // namespace

void gemm_w4a16_avx2(const W4A16Args& a, int64_t tile_begin, int64_t tile_end) {
    const TilePlan plan = tile_plan(a.M, a.N, a.K);
    const int64_t NB = ceil_div(a.N, kBlockN);
    for (int64_t t = tile_begin; t < tile_end; ++t) {
        const int64_t m0 = (t / plan.tiles_n) * plan.rows, m1 = min_i64(a.M, m0 + plan.rows);
        const int64_t nb0 = (t % plan.tiles_n) * kTileBlocks, nb1 = min_i64(NB, nb0 + kTileBlocks);
        for (int64_t m = m0; m < m1; m += kMR) {
            for (int64_t nb = nb0; nb < nb1; ++nb) {
                switch (min_i64(kMR, m1 - m)) {
                    case 1: micro_kernel<1>(a, m, nb); break;
                    case 2: micro_kernel<2>(a, m, nb); break;
                    case 3: micro_kernel<3>(a, m, nb); break;
                    default: micro_kernel<4>(a, m, nb); break;
                }
            }
        }
    }
}

}  // namespace svdq_cpu
