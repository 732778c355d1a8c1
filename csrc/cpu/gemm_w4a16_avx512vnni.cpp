// W4A16 GEMM/GEMV, AVX-512 (F only: the activations stay fp32, no integer dot products). Computes exactly what
// gemm_w4a16_ref.cpp states (kernels.h): per group accq = fma chain of x·q over k, then y = fma(scale, accq, y),
// y = fma(zero, xs, y); bitwise equal to the ref.
//
// Reading the packed codes (layout.h, writer nunchaku_core/cpu_packing.py pack_w4a16): in chunk (nb, s), the 16
// bytes at 16·j zero-extended to 16 int32 lanes hold inputs 8s+2j (low nibble) and 8s+2j+1 (high nibble) for the
// block's 16 columns, so one vpmovzxbd + vpand / vpsrld + two vcvtdq2ps give two weight rows as fp32.
// Micro-kernel: 4 rows x 32 or 48 columns, up to 12 fp32 group accumulators + 12 outputs in zmm registers.
#include "../layout.h"
#include "common.h"
#include "kernels.h"
#include "simd_avx512.h"

namespace svdq_cpu {

namespace {

constexpr int kMR = 4;

template <int MR, int NV>
static inline void pair_step(const uint8_t* const* wp, int64_t byte_offset, const float* const* xp, int64_t k,
                             bool both, __m512 (&accq)[MR][NV]) {
    for (int v = 0; v < NV; ++v) {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp[v] + byte_offset)));
        const __m512 q0 = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x0F)));
        for (int i = 0; i < MR; ++i) accq[i][v] = _mm512_fmadd_ps(_mm512_set1_ps(xp[i][k]), q0, accq[i][v]);
        if (both) {
            const __m512 q1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
            for (int i = 0; i < MR; ++i) accq[i][v] = _mm512_fmadd_ps(_mm512_set1_ps(xp[i][k + 1]), q1, accq[i][v]);
        }
    }
}

template <int MR, int NV>
static inline void micro_kernel(const W4A16Args& a, int64_t m0, int64_t nb0) {
    const int64_t K = a.K, G = a.G, groups = ceil_div(K, G), block_bytes = ceil_div(K, kStepK) * kChunkBytes;
    const uint8_t* wp[NV];
    for (int v = 0; v < NV; ++v) wp[v] = a.wcodes + (nb0 + v) * block_bytes;
    const float* xp[MR];
    for (int i = 0; i < MR; ++i) xp[i] = a.x + (m0 + i) * K;

    __m512 y[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) y[i][v] = _mm512_setzero_ps();

    for (int64_t g = 0; g < groups; ++g) {
        const int64_t kb = g * G, ke = min_i64(K, kb + G);
        __m512 accq[MR][NV];
        for (int i = 0; i < MR; ++i)
            for (int v = 0; v < NV; ++v) accq[i][v] = _mm512_setzero_ps();
        int64_t k = kb;
        for (; k + kStepK <= ke; k += kStepK) {  // whole chunks: 4 input pairs
            const int64_t base = (k / kStepK) * kChunkBytes;
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) pair_step<MR, NV>(wp, base + 16 * j, xp, k + 2 * j, true, accq);
        }
        for (; k < ke; k += 2) {  // the tail of the last group when K % 8 != 0
            pair_step<MR, NV>(wp, (k / kStepK) * kChunkBytes + 16 * ((k % kStepK) / 2), xp, k, k + 1 < ke, accq);
        }
        for (int v = 0; v < NV; ++v) {
            const int64_t sz = ((nb0 + v) * groups + g) * kBlockN;
            const __m512 s = load16(a.scales, a.scales_dtype, sz), z = load16(a.zeros, a.zeros_dtype, sz);
            for (int i = 0; i < MR; ++i) {
                y[i][v] = _mm512_fmadd_ps(s, accq[i][v], y[i][v]);
                y[i][v] = _mm512_fmadd_ps(z, _mm512_set1_ps(a.xs[(m0 + i) * groups + g]), y[i][v]);
            }
        }
    }
    for (int v = 0; v < NV; ++v) {
        const int64_t n = (nb0 + v) * kBlockN;
        const __mmask16 mask = lanes_below(a.N - n);
        const __m512 b = a.bias != nullptr ? _mm512_loadu_ps(a.bias + n) : _mm512_setzero_ps();
        for (int i = 0; i < MR; ++i) {
            const __m512 out = a.bias != nullptr ? _mm512_add_ps(y[i][v], b) : y[i][v];
            store16(a.out, a.out_dtype, (m0 + i) * a.N + n, out, mask);
        }
    }
}

template <int MR>
static inline void rows_kernel(const W4A16Args& a, int64_t m0, int64_t nb0, int64_t nblocks) {
    switch (nblocks) {
        case 1: micro_kernel<MR, 1>(a, m0, nb0); break;
        case 2: micro_kernel<MR, 2>(a, m0, nb0); break;
        case 3: micro_kernel<MR, 3>(a, m0, nb0); break;
        default:
            micro_kernel<MR, 2>(a, m0, nb0);
            micro_kernel<MR, 2>(a, m0, nb0 + 2);
            break;
    }
}

}  // namespace

void gemm_w4a16_avx512vnni(const W4A16Args& a, int64_t tile_begin, int64_t tile_end) {
    const TilePlan plan = tile_plan(a.M, a.N, a.K);
    const int64_t NB = ceil_div(a.N, kBlockN);
    for (int64_t t = tile_begin; t < tile_end; ++t) {
        const int64_t m0 = (t / plan.tiles_n) * plan.rows, m1 = min_i64(a.M, m0 + plan.rows);
        const int64_t nb0 = (t % plan.tiles_n) * kTileBlocks, nblocks = min_i64(kTileBlocks, NB - nb0);
        for (int64_t m = m0; m < m1; m += kMR) {
            switch (min_i64(kMR, m1 - m)) {
                case 1: rows_kernel<1>(a, m, nb0, nblocks); break;
                case 2: rows_kernel<2>(a, m, nb0, nblocks); break;
                case 3: rows_kernel<3>(a, m, nb0, nblocks); break;
                default: rows_kernel<4>(a, m, nb0, nblocks); break;
            }
        }
    }
}

}  // namespace svdq_cpu
