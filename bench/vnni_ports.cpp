// Which 512-bit instructions compete with vpdpbusd on this CPU? (Not a test; a standalone micro-benchmark.)
//
//     g++ -O2 -mavx512f -mavx512vnni -o /tmp/vnni_ports bench/vnni_ports.cpp && /tmp/vnni_ports
//
// Every loop runs 24 vpdpbusd zmm on 12 independent accumulators (enough chains for its latency) plus a few other
// instructions per iteration, written in inline asm so that the compiler adds no moves or spills, and prints the
// vpdpbusd rate (G/s on one core, best of 15 runs). Where an added instruction leaves the rate unchanged it runs on
// other pipes; where it lowers it, it takes vpdpbusd's. csrc/cpu/gemm_w4a4_avx512vnni.cpp's per-group epilogue
// (cvt, mul, fma per output vector and group of 64 inputs) and operand preparation (and/andnot, broadcasts) are
// the instructions measured here.
#include <chrono>
#include <cstdint>
#include <cstdio>

namespace {

alignas(64) int32_t g_mem[64];

#define DP(a, b, c) "vpdpbusd %%zmm" #b ", %%zmm" #a ", %%zmm" #c "\n\t"
#define DP24                                                                                                  \
    DP(0, 20, 1) DP(0, 21, 2) DP(0, 22, 3) DP(0, 23, 4) DP(0, 24, 5) DP(0, 25, 6) DP(0, 20, 7) DP(0, 21, 8)    \
    DP(0, 22, 9) DP(0, 23, 10) DP(0, 24, 11) DP(0, 25, 12) DP(0, 20, 1) DP(0, 21, 2) DP(0, 22, 3) DP(0, 23, 4) \
    DP(0, 24, 5) DP(0, 25, 6) DP(0, 20, 7) DP(0, 21, 8) DP(0, 22, 9) DP(0, 23, 10) DP(0, 24, 11) DP(0, 25, 12)
// Six independent instances of one two-operand instruction (results into zmm16-19, 26, 27).
#define SIX(op)                                                                                              \
    op " %%zmm14, %%zmm15, %%zmm16\n\t" op " %%zmm14, %%zmm15, %%zmm17\n\t" op " %%zmm14, %%zmm15, %%zmm18\n\t" \
    op " %%zmm14, %%zmm15, %%zmm19\n\t" op " %%zmm14, %%zmm15, %%zmm26\n\t" op " %%zmm14, %%zmm15, %%zmm27\n\t"
#define BC(off, r) "vpbroadcastd " #off "(%[p]), %%zmm" #r "\n\t"
#define CLOBBERS                                                                                                 \
    "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", \
        "xmm12", "xmm16", "xmm17", "xmm18", "xmm19", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31"

enum Kind { kOnly, kBroadcast12, kAndLoad, kCvt6, kAdd6, kScalef6, kPaddd6, kSlld6, kZxwd6, kMul6, kFma6, kCvtMulFma3 };

template <Kind K>
double run(long iters) {
    const int32_t* p = g_mem;
    const auto t0 = std::chrono::steady_clock::now();
    for (long it = 0; it < iters; ++it) {
        if constexpr (K == kOnly) {
            asm volatile(DP24 ::[p] "r"(p) : CLOBBERS);
        } else if constexpr (K == kBroadcast12) {  // the 6-row micro-kernel's step: 12 broadcast loads per 24
            asm volatile(BC(0, 28) BC(8, 29) BC(16, 30) BC(24, 31) BC(32, 20) BC(40, 21)
                         BC(4, 22) BC(12, 23) BC(20, 24) BC(28, 25) BC(36, 26) BC(44, 27) DP24 ::[p] "r"(p)
                         : CLOBBERS);
        } else if constexpr (K == kAndLoad) {  // two weight chunks: 1 load, 2 and/andnot, 2 more with a memory operand
            asm volatile("vmovdqu64 64(%[p]), %%zmm16\n\t"
                         "vpandd %%zmm16, %%zmm15, %%zmm17\n\t"
                         "vpandnd %%zmm16, %%zmm15, %%zmm18\n\t"
                         "vpandd 128(%[p]), %%zmm15, %%zmm19\n\t"
                         "vpandnd 128(%[p]), %%zmm15, %%zmm26\n\t" DP24 ::[p] "r"(p)
                         : CLOBBERS);
        } else if constexpr (K == kCvt6) {
            asm volatile("vcvtdq2ps %%zmm14, %%zmm16\n\tvcvtdq2ps %%zmm14, %%zmm17\n\tvcvtdq2ps %%zmm14, %%zmm18\n\t"
                         "vcvtdq2ps %%zmm14, %%zmm19\n\tvcvtdq2ps %%zmm14, %%zmm26\n\tvcvtdq2ps %%zmm14, %%zmm27\n\t"
                         DP24 ::[p] "r"(p) : CLOBBERS);
        } else if constexpr (K == kAdd6) {
            asm volatile(SIX("vaddps") DP24 ::[p] "r"(p) : CLOBBERS);
        } else if constexpr (K == kScalef6) {
            asm volatile(SIX("vscalefps") DP24 ::[p] "r"(p) : CLOBBERS);
        } else if constexpr (K == kPaddd6) {
            asm volatile(SIX("vpaddd") DP24 ::[p] "r"(p) : CLOBBERS);
        } else if constexpr (K == kSlld6) {  // bf16 -> fp32 widening: a 16-bit left shift of each dword
            asm volatile("vpslld $16, %%zmm14, %%zmm16\n\tvpslld $16, %%zmm14, %%zmm17\n\tvpslld $16, %%zmm14, %%zmm18\n\t"
                         "vpslld $16, %%zmm14, %%zmm19\n\tvpslld $16, %%zmm14, %%zmm26\n\tvpslld $16, %%zmm14, %%zmm27\n\t"
                         DP24 ::[p] "r"(p) : CLOBBERS);
        } else if constexpr (K == kZxwd6) {  // and its zero extension of 16 halves to 16 dwords
            asm volatile("vpmovzxwd %%ymm14, %%zmm16\n\tvpmovzxwd %%ymm14, %%zmm17\n\tvpmovzxwd %%ymm14, %%zmm18\n\t"
                         "vpmovzxwd %%ymm14, %%zmm19\n\tvpmovzxwd %%ymm14, %%zmm26\n\tvpmovzxwd %%ymm14, %%zmm27\n\t"
                         DP24 ::[p] "r"(p) : CLOBBERS);
        } else if constexpr (K == kMul6) {
            asm volatile(SIX("vmulps") DP24 ::[p] "r"(p) : CLOBBERS);
        } else if constexpr (K == kFma6) {
            asm volatile(SIX("vfmadd231ps") DP24 ::[p] "r"(p) : CLOBBERS);
        } else {  // the GEMM's per-group epilogue for 3 output vectors: cvt, mul, fma each
            asm volatile("vcvtdq2ps %%zmm14, %%zmm16\n\tvmulps %%zmm16, %%zmm15, %%zmm16\n\t"
                         "vfmadd231ps %%zmm16, %%zmm15, %%zmm17\n\t"
                         "vcvtdq2ps %%zmm14, %%zmm18\n\tvmulps %%zmm18, %%zmm15, %%zmm18\n\t"
                         "vfmadd231ps %%zmm18, %%zmm15, %%zmm19\n\t"
                         "vcvtdq2ps %%zmm14, %%zmm26\n\tvmulps %%zmm26, %%zmm15, %%zmm26\n\t"
                         "vfmadd231ps %%zmm26, %%zmm15, %%zmm27\n\t" DP24 ::[p] "r"(p)
                         : CLOBBERS);
        }
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return double(iters) * 24.0 / seconds / 1e9;
}

template <Kind K>
double best() {
    double b = 0.0;
    for (int r = 0; r < 15; ++r) {
        const double v = run<K>(2000000);
        b = v > b ? v : b;
    }
    return b;
}

}  // namespace

int main() {
    const double base = best<kOnly>();
    const auto row = [base](const char* what, double rate) {
        std::printf("%-44s %6.2f G/s  %5.2f of alone\n", what, rate, rate / base);
    };
    row("24 vpdpbusd alone", base);
    row("+ 12 vpbroadcastd from memory", best<kBroadcast12>());
    row("+ 1 load, 4 vpandd/vpandnd (2 from memory)", best<kAndLoad>());
    row("+ 6 vcvtdq2ps", best<kCvt6>());
    row("+ 6 vaddps", best<kAdd6>());
    row("+ 6 vscalefps", best<kScalef6>());
    row("+ 6 vpaddd", best<kPaddd6>());
    row("+ 6 vpslld", best<kSlld6>());
    row("+ 6 vpmovzxwd", best<kZxwd6>());
    row("+ 6 vmulps", best<kMul6>());
    row("+ 6 vfmadd231ps", best<kFma6>());
    row("+ 3 x (vcvtdq2ps, vmulps, vfmadd231ps)", best<kCvtMulFma3>());
    return 0;
}
