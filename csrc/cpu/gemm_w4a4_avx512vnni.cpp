// W4A4 GEMM with the fused epilogue, AVX-512 VNNI. Computes exactly what gemm_w4a4_ref.cpp states (kernels.h):
// per group an exact int32 dot product, then acc = fma(float(dot)·ascale, wscale, acc), then out_scale, the
// low-rank up-projection (fma over r) and the bias, rounded once to the output dtype. Bitwise equal to the ref.
//
// Reading the packed weights (layout.h, writer nunchaku_core/cpu_packing.py pack_w4a4): one 64-byte chunk of a
// column block holds 16 columns x 8 inputs; `chunk & 0x0F` is the vpdpbusd operand for inputs 8s..8s+3 (dword c =
// column c) and `(chunk >> 4) & 0x0F` the one for 8s+4..8s+7. vpdpbusd multiplies unsigned by signed bytes, so the
// weight side is the unsigned one: INT4 nibbles are w + 8; NVFP4 codes go through a 16-byte vpshufb table to
// 2·value + 12 (INT4 takes the high nibbles in place, `chunk & 0xF0` = 16·nibble, and divides that accumulator
// by 16 exactly). The activations (int8, signed) are broadcast 4 bytes at a time. Each group's int32 accumulator
// starts at acorr = -offset·Σa, which cancels the offset exactly.
//
// Micro-kernel: 4 rows x 32 columns, two int32 accumulators per output vector (low / high nibbles: halves the
// vpdpbusd dependency chains) + one fp32 accumulator = 24 zmm, the full K in registers. An isolated copy of the
// inner loop runs at 98% of the vpdpbusd peak on Zen 5; the per-group scaling (cvt, mul, fma per accumulator every
// 16 vpdpbusd) and the low-rank epilogue take most of the rest. Tiles (layout.h tile_plan) are 64 columns.
#include <time.h>

#include "../layout.h"
#include "common.h"
#include "kernels.h"
#include "simd_avx512.h"

namespace svdq_cpu {

namespace {

constexpr int kMR = 4;
// Software prefetch distances: the first micro-row of a tile pulls its weight columns from L3 (~200 cycles away;
// 32 chunks ahead is ~250 cycles of work), every micro-row its activation rows from L2. Worth a few percent at
// most on the (noisy, shared) development machine; not tuned further.
constexpr int kPrefetchChunks = 32;
constexpr int kPrefetchActBytes = 256;

static inline int32_t load_i32(const int8_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
}

template <bool kNvfp4, int MR, int NV>
static inline void micro_kernel(const W4A4Args& a, int64_t m0, int64_t nb0, const uint8_t* pf_l2) {
    constexpr int G = kNvfp4 ? kGroupNvfp4 : kGroupInt4;
    constexpr int kSteps = G / kStepK;  // 64-byte chunks per group and column block
    const int64_t K = a.K, groups = K / G, block_bytes = (K / kStepK) * kChunkBytes;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    // 2·e2m1 + 12 by code, in every 128-bit lane (vpshufb looks up within lanes).
    alignas(64) static constexpr uint8_t kTable[64] = {
        12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0, 12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
        12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0, 12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};
    const __m512i table = _mm512_load_si512(kTable);

    const uint8_t* wp[NV];
    for (int v = 0; v < NV; ++v) wp[v] = a.wcodes + (nb0 + v) * block_bytes;
    const int8_t* ap[MR];
    for (int i = 0; i < MR; ++i) ap[i] = a.act + (m0 + i) * K;

    __m512 acc[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();

    for (int64_t g = 0; g < groups; ++g) {
        // Two accumulators per output (inputs 8s..8s+3 and 8s+4..8s+7) halve the vpdpbusd dependency chains.
        __m512i dot[MR][NV], dot_hi[MR][NV];
        for (int i = 0; i < MR; ++i) {
            _mm_prefetch(reinterpret_cast<const char*>(ap[i] + g * G + kPrefetchActBytes), _MM_HINT_T0);
            const __m512i c = _mm512_set1_epi32(a.acorr[(m0 + i) * groups + g]);
            for (int v = 0; v < NV; ++v) {
                dot[i][v] = c;
                dot_hi[i][v] = _mm512_setzero_si512();
            }
        }
#pragma GCC unroll 8
        for (int s = 0; s < kSteps; ++s) {
            const int64_t k = g * G + s * kStepK;
            // One line per chunk of another column block into L2 (pf_l2: the next tile's, see gemm_tiles).
            if (pf_l2 != nullptr) _mm_prefetch(reinterpret_cast<const char*>(pf_l2 + (k / kStepK) * kChunkBytes), _MM_HINT_T1);
            for (int v = 0; v < NV; ++v) {
                const __m512i raw = _mm512_loadu_si512(wp[v] + (k / kStepK) * kChunkBytes);
                _mm_prefetch(reinterpret_cast<const char*>(wp[v] + (k / kStepK + kPrefetchChunks) * kChunkBytes), _MM_HINT_T0);
                __m512i lo = _mm512_and_si512(raw, low4), hi;
                if (kNvfp4) {
                    lo = _mm512_shuffle_epi8(table, lo);
                    hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4));
                } else {
                    hi = _mm512_andnot_si512(low4, raw);  // 16 x nibble: dot_hi is 16x its sum, undone below
                }
                for (int i = 0; i < MR; ++i) {
                    dot[i][v] = _mm512_dpbusd_epi32(dot[i][v], lo, _mm512_set1_epi32(load_i32(ap[i] + k)));
                    dot_hi[i][v] = _mm512_dpbusd_epi32(dot_hi[i][v], hi, _mm512_set1_epi32(load_i32(ap[i] + k + 4)));
                }
            }
        }
        __m512 ws[NV];
        for (int v = 0; v < NV; ++v) ws[v] = _mm512_loadu_ps(a.wscales + ((nb0 + v) * groups + g) * kBlockN);
        for (int i = 0; i < MR; ++i) {
            const __m512 as = _mm512_set1_ps(a.ascale[(m0 + i) * groups + g]);
            for (int v = 0; v < NV; ++v) {
                const __m512i d = _mm512_add_epi32(dot[i][v], kNvfp4 ? dot_hi[i][v] : _mm512_srai_epi32(dot_hi[i][v], 4));
                acc[i][v] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), as), ws[v], acc[i][v]);
            }
        }
    }

    if (a.out_scale != nullptr) {
        for (int v = 0; v < NV; ++v) {
            const __m512 os = _mm512_loadu_ps(a.out_scale + (nb0 + v) * kBlockN);
            for (int i = 0; i < MR; ++i) acc[i][v] = _mm512_mul_ps(acc[i][v], os);
        }
    }
    for (int64_t r = 0; r < a.R; ++r) {
        for (int v = 0; v < NV; ++v) {
            const __m512 u = _mm512_loadu_ps(a.proj_up + ((nb0 + v) * a.R + r) * kBlockN);
            for (int i = 0; i < MR; ++i) {
                acc[i][v] = _mm512_fmadd_ps(_mm512_set1_ps(a.lora[(m0 + i) * a.R16 + r]), u, acc[i][v]);
            }
        }
    }
    for (int v = 0; v < NV; ++v) {
        const int64_t n = (nb0 + v) * kBlockN;
        const __m512 b = a.bias != nullptr ? _mm512_loadu_ps(a.bias + n) : _mm512_setzero_ps();
        const __mmask16 mask = lanes_below(a.N - n);
        for (int i = 0; i < MR; ++i) {
            const __m512 y = a.bias != nullptr ? _mm512_add_ps(acc[i][v], b) : acc[i][v];
            store16(a.out, a.out_dtype, (m0 + i) * a.N + n, y, mask);
        }
    }
}

// pf[0], pf[1]: column blocks to pull into L2 meanwhile (or null), one per micro-kernel call.
template <bool kNvfp4, int MR>
static inline void rows_kernel(const W4A4Args& a, int64_t m0, int64_t nb0, int64_t nblocks, const uint8_t* const* pf) {
    switch (nblocks) {
        case 1: micro_kernel<kNvfp4, MR, 1>(a, m0, nb0, pf[0]); break;
        case 2: micro_kernel<kNvfp4, MR, 2>(a, m0, nb0, pf[0]); break;
        case 3:
            micro_kernel<kNvfp4, MR, 2>(a, m0, nb0, pf[0]);
            micro_kernel<kNvfp4, MR, 1>(a, m0, nb0 + 2, pf[1]);
            break;
        default:
            micro_kernel<kNvfp4, MR, 2>(a, m0, nb0, pf[0]);
            micro_kernel<kNvfp4, MR, 2>(a, m0, nb0 + 2, pf[1]);
            break;
    }
}

// Tiles [tile_begin, tile_end) in order. Only a tile's first micro-row reads its weights from L3 or memory (the
// later ones hit L2), so at small M the weight stream and the compute took turns: the second and third micro-rows
// now pull the next tile's four column blocks into L2 (one line per chunk, prefetcht1), overlapping the two.
template <bool kNvfp4>
void gemm_tiles(const W4A4Args& a, int64_t tile_begin, int64_t tile_end) {
    const TilePlan plan = tile_plan(a.M, a.N, a.K);
    const int64_t NB = ceil_div(a.N, kBlockN), block_bytes = (a.K / kStepK) * kChunkBytes;
    for (int64_t t = tile_begin; t < tile_end; ++t) {
        const int64_t m0 = (t / plan.tiles_n) * plan.rows, m1 = min_i64(a.M, m0 + plan.rows);
        const int64_t nb0 = (t % plan.tiles_n) * kTileBlocks, nblocks = min_i64(kTileBlocks, NB - nb0);
        const uint8_t* next[kTileBlocks] = {};
        if (t + 1 < tile_end) {
            const int64_t nn = ((t + 1) % plan.tiles_n) * kTileBlocks;
            for (int v = 0; v < kTileBlocks; ++v) next[v] = nn + v < NB ? a.wcodes + (nn + v) * block_bytes : nullptr;
        }
        const uint8_t* none[2] = {nullptr, nullptr};
        for (int64_t m = m0, j = 0; m < m1; m += kMR, ++j) {
            const uint8_t* const* pf = j == 1 ? next : j == 2 ? next + 2 : none;
            switch (min_i64(kMR, m1 - m)) {
                case 1: rows_kernel<kNvfp4, 1>(a, m, nb0, nblocks, pf); break;
                case 2: rows_kernel<kNvfp4, 2>(a, m, nb0, nblocks, pf); break;
                case 3: rows_kernel<kNvfp4, 3>(a, m, nb0, nblocks, pf); break;
                default: rows_kernel<kNvfp4, 4>(a, m, nb0, nblocks, pf); break;
            }
        }
    }
}

static double now_seconds() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

}  // namespace

double vnni_peak_macs_avx512vnni(double seconds) {
    // 16 independent accumulators hide vpdpbusd's latency; nothing else in the loop but the counter.
    __m512i acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_epi32(i);
    __m512i x = _mm512_set1_epi8(3), y = _mm512_set1_epi8(5);
    const int64_t batch = 1 << 20;
    int64_t iters = 0;
    const double t0 = now_seconds();
    double t1 = t0;
    while (t1 - t0 < seconds) {
        for (int64_t it = 0; it < batch; ++it) {
#pragma GCC unroll 16
            for (int i = 0; i < 16; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], x, y);
            __asm__ volatile("" : "+v"(x));
        }
        iters += batch;
        t1 = now_seconds();
    }
    alignas(64) int32_t lanes[16];
    __m512i sum = acc[0];
    for (int i = 1; i < 16; ++i) sum = _mm512_add_epi32(sum, acc[i]);
    _mm512_store_si512(lanes, sum);
    volatile int32_t sink = lanes[0];  // keeps the loop alive
    (void)sink;
    return double(iters) * 16.0 * 64.0 / (t1 - t0);
}

void gemm_w4a4_int4_avx512vnni(const W4A4Args& a, int64_t tile_begin, int64_t tile_end) {
    gemm_tiles<false>(a, tile_begin, tile_end);
}

void gemm_w4a4_nvfp4_avx512vnni(const W4A4Args& a, int64_t tile_begin, int64_t tile_end) {
    gemm_tiles<true>(a, tile_begin, tile_end);
}

}  // namespace svdq_cpu
