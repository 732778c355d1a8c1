// Packed layouts the CPU kernels read. The writer is nunchaku_core/cpu_packing.py (same constant names, bound
// to Python as _C.layout_constants() and checked against cpu_packing at import); change both together.
//
// Letters: M tokens, N out features, K in features, G group size, R rank, NB = ceil(N/16) column blocks.
//
// W4A4 weight codes (INT4 and NVFP4 alike): uint8 [NB, K/8, 64]. The 64 bytes of (block nb, step s) cover
// 16 columns x 8 inputs:
//     byte 4*c + j   (c = 0..15, j = 0..3)  low nibble:  n = 16*nb + c, k = 8*s + j
//                                           high nibble: n = 16*nb + c, k = 8*s + 4 + j
//   So `bytes & 0x0F` is the vpdpbusd operand for inputs 8s..8s+3 (dword c = column c, its 4 bytes = 4 k) and
//   `(bytes >> 4) & 0x0F` the one for 8s+4..8s+7; an AVX2 kernel reads the two 32-byte halves (columns 0-7,
//   8-15) the same way. INT4 nibbles hold w + 8 (unsigned 0..15); NVFP4 nibbles hold the raw e2m1 code,
//   which the kernels map through a 16-entry table to 2*value + 12 (unsigned 0..24). Padded columns: INT4
//   nibble 8 (w = 0), NVFP4 code 0.
// W4A4 weight scales: [NB, K/G, 16], element (nb, g, c) = scale of column 16*nb + c, group g. NVFP4
//   scales are stored as 0.25 * e4m3 value (exact), folding the 1/4 of the doubled codes. Padding: 0.
// Low-rank up-projection U: [NB, R, 16], element (nb, r, c) = U[16*nb + c, r]. Padding: 0.
// Low-rank down-projection D: [K, R16], R16 = roundup(R, 16), zero-padded columns.
//   These three are bf16, fp16 or fp32 (each the narrowest that holds its values exactly, cpu_packing
//   narrowest_exact; kernels.h W4A4Args/QuantArgs carry the dtype) and are widened to fp32 exactly on load.
// Bias, per-channel output scale (NVFP4 wtscale*wcscales): fp32 [NB*16]; padding 0 (bias) / 1 (scale).
//
// Activations (written by quantize_act_*, read by gemm_w4a4_*), row-major:
//   act    int8 [M, K]: INT4 codes (signed -7..7 or unsigned 0..15); NVFP4 2*e2m1 value (-12..12).
//   ascale fp32 [M, K/G]: INT4 absmax/qmax; NVFP4 the e4m3 scale as fp32.
//   acorr  int32 [M, K/G]: -offset * (sum of act over the group), offset 8 (INT4) or 12 (NVFP4). The GEMM
//          starts each group's integer accumulator at acorr, so dot(w + offset, a) + acorr = dot(w, a) exactly.
//   lora   fp32 [M, R16]: x·D on the raw input.
//
// W4A16 weight codes: uint8 [NB, ceil(K/8), 64]. The 64 bytes of (block nb, step s):
//     byte 16*j + c  (j = 0..3, c = 0..15)  low nibble:  n = 16*nb + c, k = 8*s + 2*j
//                                           high nibble: n = 16*nb + c, k = 8*s + 2*j + 1
//   So 16 bytes zero-extended to 16 int32 lanes hold two consecutive inputs for 16 columns. Codes unsigned
//   0..15, 0 past K and past N.
// W4A16 scales, zeros: [NB, ceil(K/G), 16] (element (nb, g, c) for column 16*nb + c); padding 0; bf16, fp16 or
//   fp32 like the W4A4 scales above (cpu_packing narrowest_exact), widened to fp32 exactly.
// W4A16 group sums xs: fp32 [M, ceil(K/G)] = sequential fp32 sum of x over each group (the kernel computes
//   y = Σ_g (scale·Σ_k x·q + zero·xs), see gemm_w4a16_ref.cpp).
#pragma once

#include <cstdint>

namespace svdq_cpu {

constexpr int kBlockN = 16;         // columns per packed block (one zmm of fp32/int32 lanes)
constexpr int kStepK = 8;           // inputs per 64-byte chunk
constexpr int kChunkBytes = 64;
constexpr int kGroupInt4 = 64;
constexpr int kGroupNvfp4 = 16;
constexpr int kInt4Offset = 8;      // INT4 weight nibble = w + 8
constexpr int kNvfp4Offset = 12;    // NVFP4 weight operand = 2*value + 12
constexpr int kRankAlign = 16;      // D is [K, roundup(R, 16)]
constexpr int kMaxRank16 = 1024;    // the quantizers keep 4 rows x R16 fp32 accumulators on the stack

// Parallel tiles of the W4A4 and W4A16 GEMMs: kTileN columns by tile_rows(K) rows. Work is split over N and M
// only, never over K, so every output is one sequential reduction whatever the thread count.
constexpr int kTileBlocks = 4;      // column blocks per tile (two AVX-512 micro-kernels, 64 columns)
constexpr int kTileN = kTileBlocks * kBlockN;
constexpr int kRowsPerQuantTask = 4;
constexpr int kRowsPerQuantBlock = 16;  // from 128 rows, quantizer tasks are this long (one pass over D each)

static_assert(kBlockN * kStepK / 2 == kChunkBytes, "a chunk is 16 columns x 8 inputs of 4-bit codes");
static_assert(kGroupInt4 % kStepK == 0 && kGroupNvfp4 % kStepK == 0, "groups hold whole chunks");
static_assert(kInt4Offset == 8, "nibble = w + 8 maps [-8, 7] onto [0, 15]");
static_assert(kNvfp4Offset + 12 <= 255, "2*e2m1 + 12 must fit the unsigned vpdpbusd operand");

// Rows per tile: up to 1 MiB of activation rows (rows x K bytes, the per-core L2 of Zen 5), at most 256. A thread
// keeps a row block while it walks the weight columns (M-major tiles), so the weights are read from L3 once per
// row block: 4x fewer times at M = 4096, K = 3072 than with 64-row blocks.
static inline int64_t tile_rows(int64_t K) {
    int64_t r = (int64_t(1) << 20) / (K > 0 ? K : 1);
    r = r / 4 * 4;
    return r < 4 ? 4 : (r > 256 ? 256 : r);
}

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tiles are numbered M-major (t = tm * tiles_n + tn): a thread's contiguous range of tiles walks all weight
// columns for the same rows, so its activation rows stay cached while the (shared) weights stream from L3.
struct TilePlan {
    int64_t rows, tiles_m, tiles_n;  // tiles_m * tiles_n tiles
};

static inline TilePlan tile_plan(int64_t M, int64_t N, int64_t K) {
    TilePlan p;
    p.rows = tile_rows(K);
    p.tiles_m = ceil_div(M, p.rows);
    p.tiles_n = ceil_div(N, kTileN);
    return p;
}

}  // namespace svdq_cpu
