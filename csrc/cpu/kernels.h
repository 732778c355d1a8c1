// Entry points of the CPU kernels: plain C++ over raw pointers, no torch, no threads. csrc/bindings.cpp checks the
// tensors, splits the work (rows for the quantizers, tiles of csrc/layout.h for the GEMMs) over torch's threads
// and calls one variant per range. Buffer layouts: csrc/layout.h (writer: nunchaku_core/cpu_packing.py).
//
// Variants: _ref (portable scalar C++, the readable mirror of nunchaku_core/reference.py), _avx2 (AVX2 + FMA +
// F16C), _avx512vnni (AVX-512 F/BW/VL/DQ + VNNI). All three perform the same fp32 operations in the same order
// (fma where this file says fma), so their outputs agree bit for bit; only integer dot products, which are
// exact, are computed differently.
//
// Each ISA file is compiled with its own -m flags (setup.py). Everything they share from headers is `static
// inline` or a plain struct, so the linker never picks an AVX-512 copy of an inline function for another file.
#pragma once

#include <cstdint>

namespace svdq_cpu {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Activation quantization + low-rank down-projection, for rows [row_begin, row_end).
//   int4:  t = (x + σ·shifted) / smooth; per 64: scale = absmax/qmax; act = clamp(round(t/scale)) (qmax 7 or 15)
//   nvfp4: t = x / smooth; per 16: scale = e4m3(min(absmax/6, 448)); code = e2m1_round(t/scale);
//          act = 2·value(code). codes (optional, may be null) receives the e2m1 codes themselves.
//   lora[m, :R16] = x[m, :]·D, fp32, one fma chain per output in increasing k (R16 == 0 skips it).
struct QuantArgs {
    const void* x;          // [M, K], row stride ldx elements
    DType xdtype;
    int64_t M, K, ldx;
    const float* smooth;    // [K]
    bool shifted;           // int4 only
    const void* proj_down;  // [K, R16] or null, fp32/bf16/fp16 (down_dtype; widened to fp32 exactly)
    DType down_dtype;
    int64_t R16;
    int8_t* act;            // [M, K]
    float* ascale;          // [M, K/G]
    int32_t* acorr;         // [M, K/G]
    float* lora;            // [M, R16] or null
    int8_t* codes;          // nvfp4: [M, K] e2m1 codes, or null
};

// W4A4 GEMM with fused epilogue, for tiles [tile_begin, tile_end) of tile_plan(M, N, K):
//   y[m, n] = Σ_g fma-chain: acc = fma(float(dot_g) * ascale[m, g], wscale[n, g], acc)   (g increasing)
//   y *= out_scale[n] (nvfp4, if given); y = fma(lora[m, r], U[n, r], y) for r increasing; y += bias[n]
//   and y is rounded once to out_dtype (round to nearest even).
struct W4A4Args {
    const int8_t* act;       // [M, K]
    const float* ascale;     // [M, K/G]
    const int32_t* acorr;    // [M, K/G]
    const float* lora;       // [M, R16] or null when R == 0
    int64_t M, N, K, R, R16;
    const uint8_t* wcodes;   // [NB, K/8, 64]
    const void* wscales;     // [NB, K/G, 16], fp32/bf16/fp16 (wscales_dtype; widened to fp32 exactly)
    DType wscales_dtype;
    const void* proj_up;     // [NB, R, 16], fp32/bf16/fp16 (up_dtype)
    DType up_dtype;
    const float* bias;       // [NB*16] or null
    const float* out_scale;  // [NB*16] or null (nvfp4 wtscale*wcscales)
    void* out;               // [M, N] row-major, out_dtype
    DType out_dtype;
    uint64_t call;           // distinct for every GEMM call (bindings.cpp): per-thread scratch is never reused across calls
};

// W4A16: y[m, n] = Σ_g fma(zero[n,g], xs[m,g], fma(scale[n,g], Σ_{k∈g} fma-chain x·q, y)) + bias, fp32, rounded
// once to out_dtype. xs must be filled first by w4a16_group_sums (rows [row_begin, row_end)).
struct W4A16Args {
    const float* x;          // [M, K] fp32 row-major
    int64_t M, N, K, G;      // G % 8 == 0
    float* xs;               // [M, ceil(K/G)]
    const uint8_t* wcodes;   // [NB, ceil(K/8), 64]
    const void* scales;      // [NB, ceil(K/G), 16], fp32/bf16/fp16 (scales_dtype; widened to fp32 exactly)
    const void* zeros;       // [NB, ceil(K/G), 16], fp32/bf16/fp16 (zeros_dtype)
    DType scales_dtype, zeros_dtype;
    const float* bias;       // [NB*16] or null
    void* out;               // [M, N], out_dtype
    DType out_dtype;
};

void quantize_act_int4_ref(const QuantArgs& a, int64_t row_begin, int64_t row_end);
void quantize_act_int4_avx2(const QuantArgs& a, int64_t row_begin, int64_t row_end);
void quantize_act_int4_avx512vnni(const QuantArgs& a, int64_t row_begin, int64_t row_end);
void quantize_act_nvfp4_ref(const QuantArgs& a, int64_t row_begin, int64_t row_end);
void quantize_act_nvfp4_avx2(const QuantArgs& a, int64_t row_begin, int64_t row_end);
void quantize_act_nvfp4_avx512vnni(const QuantArgs& a, int64_t row_begin, int64_t row_end);

void gemm_w4a4_int4_ref(const W4A4Args& a, int64_t tile_begin, int64_t tile_end);
void gemm_w4a4_int4_avx2(const W4A4Args& a, int64_t tile_begin, int64_t tile_end);
void gemm_w4a4_int4_avx512vnni(const W4A4Args& a, int64_t tile_begin, int64_t tile_end);
void gemm_w4a4_nvfp4_ref(const W4A4Args& a, int64_t tile_begin, int64_t tile_end);
void gemm_w4a4_nvfp4_avx2(const W4A4Args& a, int64_t tile_begin, int64_t tile_end);
void gemm_w4a4_nvfp4_avx512vnni(const W4A4Args& a, int64_t tile_begin, int64_t tile_end);

void w4a16_group_sums(const W4A16Args& a, int64_t row_begin, int64_t row_end);  // scalar, shared by all ISAs
void gemm_w4a16_ref(const W4A16Args& a, int64_t tile_begin, int64_t tile_end);
void gemm_w4a16_avx2(const W4A16Args& a, int64_t tile_begin, int64_t tile_end);
void gemm_w4a16_avx512vnni(const W4A16Args& a, int64_t tile_begin, int64_t tile_end);

// Runs vpdpbusd zmm on independent accumulators for about `seconds` in the calling thread; returns the
// multiply-accumulates per second (bench/bench_layers.py's VNNI peak).
double vnni_peak_macs_avx512vnni(double seconds);

}  // namespace svdq_cpu
