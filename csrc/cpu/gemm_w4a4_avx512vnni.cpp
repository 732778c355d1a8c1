// W4A4 GEMM with the fused epilogue, AVX-512 VNNI. Computes exactly what gemm_w4a4_ref.cpp states (kernels.h):
// per group an exact int32 dot product, then acc = fma(float(dot)·ascale, wscale, acc), then out_scale, the
// low-rank up-projection (fma over r) and the bias, rounded once to the output dtype. Bitwise equal to the ref.
//
// Reading the packed weights (layout.h, writer nunchaku_core/cpu_packing.py pack_w4a4): one 64-byte chunk of a
// column block holds 16 columns x 8 inputs; `chunk & 0x0F` is the vpdpbusd operand for inputs 8s..8s+3 (dword c =
// column c) and `(chunk >> 4) & 0x0F` the one for 8s+4..8s+7. vpdpbusd multiplies unsigned by signed bytes, so the
// weight side is the unsigned one: INT4 nibbles are w + 8; NVFP4 codes go through a 16-byte vpshufb table to
// 2·value + 12. The activations (int8) are broadcast 4 bytes at a time. Each group's int32 accumulator starts at
// acorr = -offset·Σa, which cancels the offset exactly.
//
// Signed INT4 rows (codes -7..7, every layer but the shifted ones) take a shorter path, Path::kInt4x16: the high
// nibbles are used in place (`chunk & 0xF0` = 16·nibble, no shift) and the activation operand of the low nibbles
// is 16·a instead (RowBlock), so both halves add into one accumulator that holds exactly 16·dot; the 1/16 goes into
// the activation scale where that is exact. Per group and output vector that is 16 vpdpbusd + cvt, mul, fma.
//
// Activations are repacked per tile row block (RowBlock, Rows): the 8 inputs of one step of the micro-kernel's 6
// rows lie side by side, so the micro-kernel reads one sequential stream through one pointer (six row pointers
// had spilled general registers in the inner loop).
//
// Micro-kernel: up to 6 rows x 2 column blocks (32 columns): 12 int32 accumulators (12 independent vpdpbusd chains) and
// 12 fp32 ones over the full K. On the 2-core Zen 5 only multiplies share vpdpbusd's two pipes (bench/vnni_ports.cpp;
// the and/andnot unpacking, broadcasts and cvt do not), so the group epilogue's mul + fma bound the kernel at 16/18
// of the vpdpbusd peak, 86 % with the rank-32 up-projection at K = 3072; one thread reaches 75-80 % of the peak
// (bench/README.md, "Where the time goes"). Tried and slower:
// 12 rows x 1 block, 8 x 2, 16 x 1, vpdpbusd with an embedded-broadcast operand (inline asm), and unpacking a
// tile's weights once into an L1/L2 buffer for all its micro-rows (M = 16: 0.25 vs 0.21 ms).
#include <time.h>

#include <new>

#include "../layout.h"
#include "common.h"
#include "kernels.h"
#include "simd_avx512.h"

namespace svdq_cpu {

namespace {

// Rows per micro-kernel: 6 rows x 2 column blocks = 12 int32 + 12 fp32 accumulators in zmm registers, plus the
// unpacked weights; 12 independent vpdpbusd chains cover its latency.
constexpr int kMR = 6;
// Software prefetch distances: the first micro-row of a tile pulls its weight columns from L3 (~200 cycles away;
// 32 chunks ahead is ~250 cycles of work), every micro-row its activation rows from L2. Worth a few percent at
// most on the (noisy, shared) development machine; not tuned further.
constexpr int kPrefetchChunks = 32;
constexpr int kPrefetchActBytes = 256;

// How a micro-kernel turns a 64-byte weight chunk into its two vpdpbusd operands (low nibbles: inputs 8s..8s+3,
// high nibbles: 8s+4..8s+7), both accumulated into one int32 register per output vector:
//   kInt4x16  `chunk & 0x0F` and `chunk & 0xF0` (= 16 x nibble, no shift): the activation operand of the low
//             nibbles is 16·a (see RowBlock), so the accumulator holds 16 x the group's dot product.
//   kInt4     `chunk & 0x0F` and `(chunk >> 4) & 0x0F` with the activation codes as they are (unsigned codes of
//             shifted layers, 0..15, where 16·a would not fit an int8).
//   kNvfp4    both nibbles through the 2·e2m1 + 12 table.
enum class Path { kInt4x16, kInt4, kNvfp4 };

// How a row block of `count` rows is cut into micro-rows: as few as fit kMR rows each, their sizes differing by at
// most one (16 rows: 6 + 5 + 5, not 6 + 6 + 4: a 4-row micro-kernel has only 8 vpdpbusd chains for its 4-cycle
// latency at two per cycle, 5 rows have 10). Micro-row mr holds rows first(mr) .. first(mr) + size(mr) - 1.
struct MicroRows {
    int64_t n, base, extra;  // n micro-rows; the first `extra` of them have base + 1 rows, the others base
    explicit MicroRows(int64_t count) : n(ceil_div(count, kMR)), base(count / n), extra(count % n) {}
    int64_t size(int64_t mr) const { return base + (mr < extra ? 1 : 0); }
    int64_t first(int64_t mr) const { return mr * base + min_i64(mr, extra); }
};

// The activation rows of one tile row block, repacked per micro-row (see RowBlock, MicroRows):
//   act    int8  [micro-rows, K/8, kMR, 8]: the 8 inputs of step s of the micro-row's rows side by side;
//   ascale fp32  [micro-rows, K/G, kMR];  acorr int32 [micro-rows, K/G, kMR]; slots past a micro-row's size are 0.
// m0 is the output row of the block's row 0.
struct Rows {
    const int8_t* act;
    const float* ascale;
    const int32_t* acorr;
    int64_t m0;
    MicroRows micro;
};

static inline int32_t load_i32(const int8_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
}

// Micro-row mr of the block (its MR rows from rows.micro.first(mr)) against column blocks nb0 .. nb0 + NV - 1.
// WS: the dtype of the weight scales, a template argument so that the group loop carries no switch.
template <Path P, DType WS, int MR, int NV>
static inline void micro_kernel(const W4A4Args& a, const Rows& rows, int64_t mr, int64_t nb0, int64_t pf_block) {
    constexpr int G = P == Path::kNvfp4 ? kGroupNvfp4 : kGroupInt4;
    constexpr int kSteps = G / kStepK;  // 64-byte chunks per group and column block
    const int64_t K = a.K, groups = K / G, block_bytes = (K / kStepK) * kChunkBytes;
    // Column block pf_block (if >= 0) is pulled into L2 meanwhile, all of what a micro-kernel reads of it: one line
    // of codes per step, one of scales per group, and ceil(R / groups) lines of the up-projection per group.
    const int64_t scale_line = kBlockN * dtype_bytes(WS), up_line = kBlockN * dtype_bytes(a.up_dtype);
    const bool pf = pf_block >= 0;
    const uint8_t* pf_codes = pf ? a.wcodes + pf_block * block_bytes : nullptr;
    const char* pf_scales = pf ? static_cast<const char*>(a.wscales) + pf_block * groups * scale_line : nullptr;
    const char* pf_up = pf ? static_cast<const char*>(a.proj_up) + pf_block * a.R * up_line : nullptr;
    const int64_t pf_up_lines = ceil_div(a.R, groups);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    // 2·e2m1 + 12 by code, in every 128-bit lane (vpshufb looks up within lanes).
    alignas(64) static constexpr uint8_t kTable[64] = {
        12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0, 12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
        12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0, 12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

    const uint8_t* wp[NV];
    for (int v = 0; v < NV; ++v) wp[v] = a.wcodes + (nb0 + v) * block_bytes;
    const int8_t* ap = rows.act + mr * K * kMR;  // step s of row i: ap + (s·kMR + i)·8
    const float* asp = rows.ascale + mr * groups * kMR;
    const int32_t* acp = rows.acorr + mr * groups * kMR;

    // The output lines this micro-kernel writes at its end, requested for writing now (prefetchw, -mprfchw): at
    // large M they are in no cache (M = 4096, N = 3072: a 24 MB output) and the epilogue's stores to MR rows
    // waited on memory. One thread, M = 1024-4096: 2-4 % faster (bench/README.md).
    const int64_t m0 = rows.m0 + rows.micro.first(mr);
    const int64_t out_bytes = dtype_bytes(a.out_dtype), row_bytes = NV * kBlockN * out_bytes;
    for (int i = 0; i < MR; ++i) {
        const char* row = static_cast<const char*>(a.out) + ((m0 + i) * a.N + nb0 * kBlockN) * out_bytes;
        for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off, 1, 3);
    }

    __m512 acc[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();

    for (int64_t g = 0; g < groups; ++g) {
        __m512i dot[MR][NV];
        _mm_prefetch(reinterpret_cast<const char*>(ap + g * G * kMR + kPrefetchActBytes), _MM_HINT_T0);
        if (pf) {
            _mm_prefetch(pf_scales + g * scale_line, _MM_HINT_T1);
            for (int64_t r = g * pf_up_lines; r < min_i64(a.R, (g + 1) * pf_up_lines); ++r) {
                _mm_prefetch(pf_up + r * up_line, _MM_HINT_T1);
            }
        }
        for (int i = 0; i < MR; ++i) {
            const __m512i c = _mm512_set1_epi32(acp[g * kMR + i]);
            for (int v = 0; v < NV; ++v) dot[i][v] = c;
        }
#pragma GCC unroll 8
        for (int s = 0; s < kSteps; ++s) {
            const int64_t k = g * G + s * kStepK;
            if (pf) _mm_prefetch(reinterpret_cast<const char*>(pf_codes) + (k / kStepK) * kChunkBytes, _MM_HINT_T1);
            for (int v = 0; v < NV; ++v) {
                const __m512i raw = _mm512_loadu_si512(wp[v] + (k / kStepK) * kChunkBytes);
                _mm_prefetch(reinterpret_cast<const char*>(wp[v] + (k / kStepK + kPrefetchChunks) * kChunkBytes), _MM_HINT_T0);
                __m512i lo = _mm512_and_si512(raw, low4), hi;
                if (P == Path::kInt4x16) {
                    hi = _mm512_andnot_si512(low4, raw);
                } else {
                    hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
                    if (P == Path::kNvfp4) {
                        const __m512i table = _mm512_load_si512(kTable);
                        lo = _mm512_shuffle_epi8(table, lo);
                        hi = _mm512_shuffle_epi8(table, hi);
                    }
                }
                const int8_t* as = ap + k * kMR;  // (k / 8)·kMR·8
                for (int i = 0; i < MR; ++i) {
                    dot[i][v] = _mm512_dpbusd_epi32(dot[i][v], lo, _mm512_set1_epi32(load_i32(as + 8 * i)));
                    dot[i][v] = _mm512_dpbusd_epi32(dot[i][v], hi, _mm512_set1_epi32(load_i32(as + 8 * i + 4)));
                }
            }
        }
        __m512 ws[NV];
        for (int v = 0; v < NV; ++v) ws[v] = load16(a.wscales, WS, ((nb0 + v) * groups + g) * kBlockN);
        for (int i = 0; i < MR; ++i) {
            const __m512 as = _mm512_set1_ps(asp[g * kMR + i]);
            for (int v = 0; v < NV; ++v) {
                acc[i][v] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot[i][v]), as), ws[v], acc[i][v]);
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
            const __m512 u = load16(a.proj_up, a.up_dtype, ((nb0 + v) * a.R + r) * kBlockN);
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

// pf[0], pf[1]: column blocks to pull into L2 meanwhile (or -1), one per micro-kernel call.
template <Path P, DType WS, int MR>
static inline void rows_kernel(const W4A4Args& a, const Rows& rows, int64_t mr, int64_t nb0, int64_t nblocks,
                               const int64_t* pf) {
    switch (nblocks) {
        case 1: micro_kernel<P, WS, MR, 1>(a, rows, mr, nb0, pf[0]); break;
        case 2: micro_kernel<P, WS, MR, 2>(a, rows, mr, nb0, pf[0]); break;
        case 3:
            micro_kernel<P, WS, MR, 2>(a, rows, mr, nb0, pf[0]);
            micro_kernel<P, WS, MR, 1>(a, rows, mr, nb0 + 2, pf[1]);
            break;
        default:
            micro_kernel<P, WS, MR, 2>(a, rows, mr, nb0, pf[0]);
            micro_kernel<P, WS, MR, 2>(a, rows, mr, nb0 + 2, pf[1]);
            break;
    }
}

template <Path P, DType WS>
static inline void micro_row(const W4A4Args& a, const Rows& rows, int64_t mr, int64_t count, int64_t nb0,
                             int64_t nblocks, const int64_t* pf) {
    switch (count) {
        case 1: rows_kernel<P, WS, 1>(a, rows, mr, nb0, nblocks, pf); break;
        case 2: rows_kernel<P, WS, 2>(a, rows, mr, nb0, nblocks, pf); break;
        case 3: rows_kernel<P, WS, 3>(a, rows, mr, nb0, nblocks, pf); break;
        case 4: rows_kernel<P, WS, 4>(a, rows, mr, nb0, nblocks, pf); break;
        case 5: rows_kernel<P, WS, 5>(a, rows, mr, nb0, nblocks, pf); break;
        default: rows_kernel<P, WS, 6>(a, rows, mr, nb0, nblocks, pf); break;
    }
}

// One tile row block's activations in the Rows layout, built by each thread for the row block it works on and kept
// while the thread stays in it (for the rest of this GEMM call: `call` tells calls apart).
// INT4 rows are also rewritten for Path::kInt4x16 when that is exact: act16 = 16·a at the inputs that meet the low
// weight nibbles (k % 8 < 4), a elsewhere; ascale / 16; acorr·16. Exact when every code is in [-8, 7] (16·a fits an
// int8: signed layers, codes -7..7) and every ascale / 16 is exact (then float(16·d)·(s/16) is the same fp32 value
// as float(d)·s, both the exact d·s rounded once). Otherwise (unsigned codes 0..15 of shifted layers, a scale in the
// subnormal range) the block keeps the codes and takes Path::kInt4.
struct RowBlock {
    uint64_t call = 0;  // the GEMM call it was built in (W4A4Args::call starts at 1); rows.m0 is its first row
    bool x16 = false;
    Rows rows{nullptr, nullptr, nullptr, 0, MicroRows(1)};
    uint8_t* buf = nullptr;  // the Rows buffers, grown on demand; each thread's block lives as long as the thread
    int64_t cap = 0;

    RowBlock() = default;
    RowBlock(const RowBlock&) = delete;
    RowBlock& operator=(const RowBlock&) = delete;
    ~RowBlock() { ::operator delete[](buf, std::align_val_t(64)); }

    void build(const W4A4Args& a, bool nvfp4, int64_t m0, int64_t count) {
        call = a.call;
        const int64_t K = a.K, G = nvfp4 ? kGroupNvfp4 : kGroupInt4, groups = K / G, steps = K / kStepK;
        const MicroRows micro(count);
        const int64_t padded = micro.n * kMR;
        const int64_t act_bytes = (padded * K + 63) / 64 * 64, scale_bytes = (padded * groups * 4 + 63) / 64 * 64;
        if (act_bytes + 2 * scale_bytes > cap) {
            ::operator delete[](buf, std::align_val_t(64));
            cap = act_bytes + 2 * scale_bytes;
            buf = static_cast<uint8_t*>(::operator new[](size_t(cap), std::align_val_t(64)));
        }
        int8_t* act = reinterpret_cast<int8_t*>(buf);
        float* ascale = reinterpret_cast<float*>(buf + act_bytes);
        int32_t* acorr = reinterpret_cast<int32_t*>(buf + act_bytes + scale_bytes);
        rows = Rows{act, ascale, acorr, m0, micro};

        x16 = !nvfp4;
        const __m512i lo_in = _mm512_set1_epi8(-8), hi_in = _mm512_set1_epi8(7);
        for (int64_t r = 0; r < count && x16; ++r) {
            const float* as = a.ascale + (m0 + r) * groups;
            for (int64_t g = 0; g < groups && x16; ++g) x16 = as[g] * 0.0625f * 16.0f == as[g];
            const int8_t* src = a.act + (m0 + r) * K;
            for (int64_t k = 0; k < K && x16; k += 64) {  // K % 64 == 0 for INT4
                const __m512i v = _mm512_loadu_si512(src + k);
                if (_mm512_cmpgt_epi8_mask(v, hi_in) | _mm512_cmpgt_epi8_mask(lo_in, v)) x16 = false;
            }
        }
        const int32_t corr_mul = x16 ? 16 : 1;
        const float scale_mul = x16 ? 0.0625f : 1.0f;
        // Step s of slot i of micro-row mr goes to act + ((mr·steps + s)·kMR + i)·8: 8 steps per scatter.
        const __m512i index = _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(kMR * kStepK));
        const __m512i top4 = _mm512_set1_epi8(int8_t(0xF0));
        const __mmask64 low_half = 0x0F0F0F0F0F0F0F0FULL;  // bytes k % 8 < 4
        for (int64_t slot = 0; slot < padded; ++slot) {
            const int64_t mr = slot / kMR, i = slot % kMR;
            const bool real = i < micro.size(mr);
            const int64_t r = micro.first(mr) + i;  // the block row in this slot, if real
            float* as = ascale + mr * groups * kMR + i;
            int32_t* ac = acorr + mr * groups * kMR + i;
            for (int64_t g = 0; g < groups; ++g) {
                as[g * kMR] = real ? a.ascale[(m0 + r) * groups + g] * scale_mul : 0.0f;
                ac[g * kMR] = real ? a.acorr[(m0 + r) * groups + g] * corr_mul : 0;
            }
            int8_t* dst = act + (mr * steps * kMR + i) * kStepK;
            for (int64_t k = 0; k < K; k += 64) {
                __m512i v = _mm512_setzero_si512();
                if (real) {
                    const int64_t left = K - k;  // NVFP4 K may be a multiple of 16 only
                    const __mmask64 m = left >= 64 ? ~__mmask64(0) : ((__mmask64(1) << left) - 1);
                    v = _mm512_maskz_loadu_epi8(m, a.act + (m0 + r) * K + k);
                }
                // Per byte a << 4 (16-bit shifts carry a byte's top nibble into its neighbour; the mask drops it).
                if (x16) v = _mm512_mask_mov_epi8(v, low_half, _mm512_and_si512(_mm512_slli_epi16(v, 4), top4));
                const int64_t n = min_i64(8, (K - k) / kStepK);
                const __mmask8 lanes = __mmask8((1u << n) - 1u);
                _mm512_mask_i64scatter_epi64(dst + k * kMR, lanes, index, v, 1);
            }
        }
    }
};

// Tiles [tile_begin, tile_end) in order. Only a tile's first micro-row reads its weights from L3 or memory (the
// later ones hit L2), so at small M the weight stream and the compute took turns: the second and third micro-rows
// now pull the next tile's four column blocks into L2 (one line per chunk, prefetcht1), overlapping the two.
template <bool kNvfp4, DType WS>
void gemm_tiles(const W4A4Args& a, int64_t tile_begin, int64_t tile_end) {
    const TilePlan plan = tile_plan(a.M, a.N, a.K);
    const int64_t NB = ceil_div(a.N, kBlockN);
    thread_local RowBlock block;
    for (int64_t t = tile_begin; t < tile_end; ++t) {
        const int64_t m0 = (t / plan.tiles_n) * plan.rows, m1 = min_i64(a.M, m0 + plan.rows);
        const int64_t nb0 = (t % plan.tiles_n) * kTileBlocks, nblocks = min_i64(kTileBlocks, NB - nb0);
        int64_t next[kTileBlocks];  // the next tile's column blocks, -1 past N or at the end of the run
        const int64_t nn = ((t + 1) % plan.tiles_n) * kTileBlocks;
        for (int v = 0; v < kTileBlocks; ++v) next[v] = t + 1 < tile_end && nn + v < NB ? nn + v : -1;
        if (block.call != a.call || block.rows.m0 != m0) block.build(a, kNvfp4, m0, m1 - m0);
        const int64_t none[2] = {-1, -1};
        for (int64_t mr = 0; mr < block.rows.micro.n; ++mr) {
            const int64_t* pf = mr == 1 ? next : mr == 2 ? next + 2 : none;
            const int64_t count = block.rows.micro.size(mr);
            if (kNvfp4) {
                micro_row<Path::kNvfp4, WS>(a, block.rows, mr, count, nb0, nblocks, pf);
            } else if (block.x16) {
                micro_row<Path::kInt4x16, WS>(a, block.rows, mr, count, nb0, nblocks, pf);
            } else {
                micro_row<Path::kInt4, WS>(a, block.rows, mr, count, nb0, nblocks, pf);
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
    with_dtype(a.wscales_dtype, [&](auto ws) { gemm_tiles<false, decltype(ws)::value>(a, tile_begin, tile_end); });
}

void gemm_w4a4_nvfp4_avx512vnni(const W4A4Args& a, int64_t tile_begin, int64_t tile_end) {
    with_dtype(a.wscales_dtype, [&](auto ws) { gemm_tiles<true, decltype(ws)::value>(a, tile_begin, tile_end); });
}

}  // namespace svdq_cpu
