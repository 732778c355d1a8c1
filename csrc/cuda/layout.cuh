// Packed layouts the CUDA kernels read and write. The writer on the Python side is
// nunchaku_core/cuda_packing.py (same closed forms, same constant names); change both together.
//
// Letters: M tokens, N out features, K in features, G group size, R rank.
// Indices: g = lane / 4 (MMA "groupID"), t = lane % 4 ("threadID_in_group"), j = nibble (bits 4j..4j+3 of a
// little-endian uint32 word).
//
// Weight codes, INT4 and NVFP4 alike (B operand of mma m16n8k64, PTX ISA "Matrix Fragments for
// mma.m16n8k64"): uint32 words, packed shape [N_pad/128, K/64, 8, 32, 4]:
//     word ((((tn*K/64 + tk)*8 + p)*32 + lane)*4 + 2*ns + ks), nibble j  holds
//     n = 128*tn + 16*p + 8*ns + g,   k = 64*tk + 32*ks + 8*t + j.
//   Words 2*ns + {0, 1} are the two B registers of the n8 tile (p, ns). This is the same layout as Nunchaku's
//   file `qweight` (FORMAT.md §4). INT4 nibbles are two's complement in [-8, 7]; NVFP4 nibbles are e2m1 codes.
//   N is padded to N_pad = roundup(N, 128) with code 0.
//
// Weight scales: INT4 fp32 [K/64, N_pad] (element tk*N_pad + n). NVFP4 uint32 [K/64, N_pad]: byte q of word
//   tk*N_pad + n is the float8_e4m3 scale of channel n, inputs 64*tk + 16*q .. +15. Padding: 0.
//
// Activation codes (A operand of mma m16n8k64): uint32 words, packed shape [M_pad/16, K/64, 32, 4]:
//     word (((tm*K/64 + tk)*32 + lane)*4 + r), nibble j  holds
//     m = 16*tm + g + 8*(r & 1),   k = 64*tk + 32*(r >> 1) + 8*t + j.
//   INT4 signed codes in [-7, 7] or unsigned [0, 15] (shifted layers); NVFP4 e2m1 codes. M_pad = roundup(M, 16);
//   padded rows have codes 0 and scales 0.
// Activation scales: INT4 fp32 [K/64, M_pad] (element tk*M_pad + m). NVFP4 uint32 [K/64, M_pad], byte q =
//   float8_e4m3 scale of row m, inputs 64*tk + 16*q .. +15.
// Low-rank activations lora_act = x·D: fp32 [M, R] row-major.
//
// W4A16 codes: uint32 [N, K8], K8 = ceil(K/8); word n*K8 + w, nibble j holds code[n, 8*w + j] (unsigned 0..15,
//   0 past K). scales, zeros: fp32 [N, ceil(K/G)] row-major.
#pragma once

namespace nunchaku_cuda {

constexpr int kTileN = 128;           // weight rows per packed tile (one GEMM block's N extent)
constexpr int kTileK = 64;            // inputs per packed tile = K of one mma m16n8k64
constexpr int kMmaM = 16;             // activation rows per packed tile = M of one mma
constexpr int kMmaN = 8;              // N of one mma
constexpr int kWarpLanes = 32;
constexpr int kWordsPerLaneA = 4;     // A registers of mma m16n8k64 (s4/u4/e2m1)
constexpr int kWordsPerLaneB = 2;     // B registers of one n8 tile
constexpr int kNibblesPerWord = 8;
constexpr int kGroupInt4 = 64;        // INT4 group (weights and activations)
constexpr int kGroupNvfp4 = 16;       // NVFP4 group
constexpr int kNvfp4GroupsPerTile = kTileK / kGroupNvfp4;   // 4 scale bytes per uint32 word
constexpr int kW4A16NibblesPerWord = 8;

static_assert(kTileN == 8 * 2 * kMmaN, "a weight tile is 8 p-blocks of two n8 mma tiles");
static_assert(kWarpLanes * kWordsPerLaneA * kNibblesPerWord == kMmaM * kTileK, "A tile = one word per nibble slot");
static_assert(kWarpLanes * 2 * kWordsPerLaneB * kNibblesPerWord * 8 == kTileN * kTileK, "B tile covers 128x64");
static_assert(kGroupInt4 == kTileK, "one INT4 group per mma: per-group integer sums come straight out of it");
static_assert(kNvfp4GroupsPerTile == 4, "mma scale_vec::4X takes 4 scales per row per k64");

__host__ __device__ constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

}  // namespace nunchaku_cuda
