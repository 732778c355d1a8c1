// W4A4 GEMM with the fused epilogue, AVX2 (no VNNI). Computes exactly what gemm_w4a4_ref.cpp states (kernels.h);
// bitwise equal to the ref and to the AVX-512 variant.
//
// Reading the packed weights (layout.h, writer nunchaku_core/cpu_packing.py pack_w4a4): a column block's 64-byte
// chunk is two 32-byte halves (columns 0-7, 8-15), each [8 columns][4 inputs] of nibble pairs: `& 0x0F` gives
// inputs 8s..8s+3, `(>> 4) & 0x0F` inputs 8s+4..8s+7. vpmaddubsw multiplies the unsigned weight bytes (INT4 w + 8,
// NVFP4 2·value + 12 via a vpshufb table) by the signed activation bytes and adds pairs into int16; a whole group
// stays in int16 (INT4: 8 steps x 2 x 2·15·15 = 7200; NVFP4: 2 x 2 x 2·24·12 = 2304; both < 32767), then one
// vpmaddwd widens to int32 and acorr = -offset·Σa cancels the offset exactly.
// Micro-kernel: 4 rows x 16 columns (one block, 8 int16 ymm accumulators); fp32 accumulators in L1.
#include "../layout.h"
#include "common.h"
#include "kernels.h"
#include "simd_avx2.h"

namespace svdq_cpu {

namespace {

constexpr int kMR = 4;

template <bool kNvfp4, int MR>
static inline void micro_kernel(const W4A4Args& a, int64_t m0, int64_t nb) {
    constexpr int G = kNvfp4 ? kGroupNvfp4 : kGroupInt4;
    constexpr int kSteps = G / kStepK;
    const int64_t K = a.K, groups = K / G;
    const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i table = _mm256_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
                                           12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);
    const uint8_t* wp = a.wcodes + nb * (K / kStepK) * kChunkBytes;
    const int8_t* ap[MR];
    for (int i = 0; i < MR; ++i) ap[i] = a.act + (m0 + i) * K;

    alignas(32) float acc[MR][kBlockN] = {};
    for (int64_t g = 0; g < groups; ++g) {
        __m256i s16[MR][2];
        for (int i = 0; i < MR; ++i) s16[i][0] = s16[i][1] = _mm256_setzero_si256();
        for (int s = 0; s < kSteps; ++s) {
            const int64_t k = g * G + s * kStepK;
            for (int h = 0; h < 2; ++h) {
                const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + (k / kStepK) * kChunkBytes + 32 * h));
                __m256i lo = _mm256_and_si256(raw, low4);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
                if (kNvfp4) {
                    lo = _mm256_shuffle_epi8(table, lo);
                    hi = _mm256_shuffle_epi8(table, hi);
                }
                for (int i = 0; i < MR; ++i) {
                    const __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(ap[i] + k)));
                    const __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(ap[i] + k + 4)));
                    s16[i][h] = _mm256_add_epi16(s16[i][h], _mm256_add_epi16(p0, p1));
                }
            }
        }
        for (int i = 0; i < MR; ++i) {
            const __m256i corr = _mm256_set1_epi32(a.acorr[(m0 + i) * groups + g]);
            const __m256 as = _mm256_set1_ps(a.ascale[(m0 + i) * groups + g]);
            for (int h = 0; h < 2; ++h) {
                const __m256i dot = _mm256_add_epi32(corr, _mm256_madd_epi16(s16[i][h], ones));
                const __m256 ws = load8(a.wscales, a.wscales_dtype, (nb * groups + g) * kBlockN + 8 * h);
                const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), as);
                _mm256_store_ps(&acc[i][8 * h], _mm256_fmadd_ps(t, ws, _mm256_load_ps(&acc[i][8 * h])));
            }
        }
    }

    const int64_t n0 = nb * kBlockN;
    for (int h = 0; h < 2; ++h) {
        __m256 y[MR];
        for (int i = 0; i < MR; ++i) y[i] = _mm256_load_ps(&acc[i][8 * h]);
        if (a.out_scale != nullptr) {
            const __m256 os = _mm256_loadu_ps(a.out_scale + n0 + 8 * h);
            for (int i = 0; i < MR; ++i) y[i] = _mm256_mul_ps(y[i], os);
        }
        for (int64_t r = 0; r < a.R; ++r) {
            const __m256 u = load8(a.proj_up, a.up_dtype, (nb * a.R + r) * kBlockN + 8 * h);
            for (int i = 0; i < MR; ++i) y[i] = _mm256_fmadd_ps(_mm256_set1_ps(a.lora[(m0 + i) * a.R16 + r]), u, y[i]);
        }
        if (a.bias != nullptr) {
            const __m256 b = _mm256_loadu_ps(a.bias + n0 + 8 * h);
            for (int i = 0; i < MR; ++i) y[i] = _mm256_add_ps(y[i], b);
        }
        for (int i = 0; i < MR; ++i) store8(a.out, a.out_dtype, (m0 + i) * a.N + n0 + 8 * h, y[i], a.N - n0 - 8 * h);
    }
}

template <bool kNvfp4>
void gemm_tiles(const W4A4Args& a, int64_t tile_begin, int64_t tile_end) {
    const TilePlan plan = tile_plan(a.M, a.N, a.K);
    const int64_t NB = ceil_div(a.N, kBlockN);
    for (int64_t t = tile_begin; t < tile_end; ++t) {
        const int64_t m0 = (t / plan.tiles_n) * plan.rows, m1 = min_i64(a.M, m0 + plan.rows);
        const int64_t nb0 = (t % plan.tiles_n) * kTileBlocks, nb1 = min_i64(NB, nb0 + kTileBlocks);
        for (int64_t m = m0; m < m1; m += kMR) {
            for (int64_t nb = nb0; nb < nb1; ++nb) {
                switch (min_i64(kMR, m1 - m)) {
                    case 1: micro_kernel<kNvfp4, 1>(a, m, nb); break;
                    case 2: micro_kernel<kNvfp4, 2>(a, m, nb); break;
                    case 3: micro_kernel<kNvfp4, 3>(a, m, nb); break;
                    default: micro_kernel<kNvfp4, 4>(a, m, nb); break;
                }
            }
        }
    }
}

}  // namespace

void gemm_w4a4_int4_avx2(const W4A4Args& a, int64_t tile_begin, int64_t tile_end) {
    gemm_tiles<false>(a, tile_begin, tile_end);
}

void gemm_w4a4_nvfp4_avx2(const W4A4Args& a, int64_t tile_begin, int64_t tile_end) {
    gemm_tiles<true>(a, tile_begin, tile_end);
}

}  // namespace svdq_cpu
