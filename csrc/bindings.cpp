// nunchaku_core._C: the only file that knows pybind11 and torch. It checks every tensor against the packed layouts
// of layout.h (writer: nunchaku_core/cpu_packing.py), allocates outputs, splits the work over torch's intra-op
// threads and calls one kernel variant of cpu/kernels.h per range. The variant is an argument (`isa`), resolved
// by nunchaku_core/backend.py from CPUID and SVDQ_CPU_ISA.
//
// Work is split over rows (quantizers) or over M x N tiles (GEMMs), never over K, so each output is computed by
// one sequential reduction and the results are bitwise identical for any thread count and any schedule.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "cpu/kernels.h"
#include "layout.h"

#ifdef SVDQ_WITH_CUDA
#include "cuda/ops.cuh"
#endif

namespace {

using namespace svdq_cpu;

enum class Isa { kRef, kAvx2, kAvx512Vnni };

bool isa_supported(Isa isa) {
    __builtin_cpu_init();
    switch (isa) {
        case Isa::kRef: return true;
        case Isa::kAvx2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        case Isa::kAvx512Vnni:
            return isa_supported(Isa::kAvx2) && __builtin_cpu_supports("avx512f") &&
                   __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
    }
    return false;
}

Isa parse_isa(const std::string& name, const char* op) {
    Isa isa;
    if (name == "ref") isa = Isa::kRef;
    else if (name == "avx2") isa = Isa::kAvx2;
    else if (name == "avx512vnni") isa = Isa::kAvx512Vnni;
    else TORCH_CHECK(false, op, ": isa '", name, "' is not one of ref, avx2, avx512vnni");
    TORCH_CHECK(isa_supported(isa), op, ": this CPU does not support isa '", name,
                "'; use ref or let nunchaku_core.backend pick (unset SVDQ_CPU_ISA)");
    return isa;
}

DType to_dtype(at::ScalarType t, const char* op, const char* what) {
    switch (t) {
        case at::kFloat: return DType::kFloat32;
        case at::kBFloat16: return DType::kBFloat16;
        case at::kHalf: return DType::kFloat16;
        default: TORCH_CHECK(false, op, ": ", what, " has dtype ", t, ", expected float32, bfloat16 or float16");
    }
}

void check(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
           std::vector<int64_t> shape, const char* hint) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), ", expected cpu");
    TORCH_CHECK(t.scalar_type() == dtype && t.sizes().vec() == shape, op, ": ", name, " is ", t.scalar_type(), " ",
                t.sizes(), ", expected ", dtype, " ", at::IntArrayRef(shape), " (", hint, ")");
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (", hint, ")");
}

// As check, for the arrays the kernels take in any of fp32/bf16/fp16 (nunchaku_core/cpu_packing.py stores each in
// the narrowest of them that holds its values exactly); returns its DType.
DType check_float(const at::Tensor& t, const char* op, const char* name, std::vector<int64_t> shape,
                  const char* hint) {
    const at::ScalarType s = t.scalar_type();
    const bool ok = s == at::kFloat || s == at::kBFloat16 || s == at::kHalf;
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), ", expected cpu");
    TORCH_CHECK(ok && t.sizes().vec() == shape, op, ": ", name, " is ", s, " ", t.sizes(), ", expected float32, ",
                "bfloat16 or float16 ", at::IntArrayRef(shape), " (", hint, ")");
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (", hint, ")");
    return to_dtype(s, op, name);
}

const float* opt_ptr(const c10::optional<at::Tensor>& t) {
    return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// at::empty for the large outputs (act, the GEMM's y): glibc serves 32 MiB and more with a fresh mmap, which the
// kernels' first stores fault in 4 KiB at a time (a [4096, 9216] bf16 y is 18 k faults, each zeroing its page,
// on every call). With transparent huge pages in "madvise" mode (this machine's setting, a common default)
// MADV_HUGEPAGE makes them 2 MiB faults: the M = 4096, 9216 x 3072 layer went from 396 to 359 ms on one thread
// (measured 2026-11-22, same process, interleaved). Advice only: the results are the same bits either way.
at::Tensor empty_output(at::IntArrayRef shape, at::ScalarType dtype) {
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
#ifdef MADV_HUGEPAGE
    constexpr uintptr_t kHuge = uintptr_t(2) << 20, kLarge = uintptr_t(32) << 20;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr()), bytes = t.nbytes();
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + bytes) & ~(kHuge - 1);
    if (bytes >= kLarge && last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
    return t;
}

// GEMM tiles per task, at least: runs of consecutive tiles, so the AVX-512 kernel knows the tile it does next and
// prefetches its weights (gemm_w4a4_avx512vnni.cpp gemm_tiles); only a task's first tile starts cold. 12 leaves 4
// tasks for 16 x 3072 outputs (4 tiles per task measured 3-4 % slower there with cold caches, 2 threads).
constexpr int64_t kTilesPerTask = 12;

// Runs fn(i, i + 1) for i in [0, count) on torch's intra-op threads, handing out indices from a shared counter:
// a thread that gets descheduled (the development machines share 2 cores) does not hold the others back, as a
// static split would. Which thread computes an index never changes its result (see the top of this file).
template <typename F>
void parallel_ranges(int64_t count, const F& fn) {
    pybind11::gil_scoped_release release;
    const int64_t workers = std::min<int64_t>(count, at::get_num_threads());
    if (workers <= 1) {
        fn(0, count);
        return;
    }
    std::atomic<int64_t> next{0};
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
        for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) fn(i, i + 1);
    });
}

// ------------------------------------------------------------------------------------------------------------
// Activation quantization + low-rank down-projection
// ------------------------------------------------------------------------------------------------------------

// Quantizer rows per task: kRowsPerQuantTask at small M (both threads get work), kRowsPerQuantBlock from 128 rows
// (the AVX-512 quantizer then reads each chunk of D once per block; quantize_act_avx512vnni.cpp).
int64_t quant_task_rows(int64_t M) { return M >= 128 ? kRowsPerQuantBlock : kRowsPerQuantTask; }

template <typename F>
void quantize_tasks(const QuantArgs& a, F fn) {
    const int64_t rows = quant_task_rows(a.M);
    parallel_ranges(ceil_div(a.M, rows), [&](int64_t b, int64_t e) { fn(a, b * rows, std::min(a.M, e * rows)); });
}

using QuantFn = void (*)(const QuantArgs&, int64_t, int64_t);

QuantFn quant_fn(bool nvfp4, Isa isa) {
    if (nvfp4) {
        return isa == Isa::kAvx512Vnni ? quantize_act_nvfp4_avx512vnni
               : isa == Isa::kAvx2     ? quantize_act_nvfp4_avx2
                                       : quantize_act_nvfp4_ref;
    }
    return isa == Isa::kAvx512Vnni ? quantize_act_int4_avx512vnni
           : isa == Isa::kAvx2     ? quantize_act_int4_avx2
                                   : quantize_act_int4_ref;
}

QuantArgs quant_args(const at::Tensor& x, const at::Tensor& smooth, const c10::optional<at::Tensor>& proj_down,
                     int64_t G, const char* op) {
    TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), op, ": x must be a 2-D cpu tensor [M, K], got ", x.sizes(),
                " on ", x.device());
    const int64_t M = x.size(0), K = x.size(1);
    TORCH_CHECK(K % G == 0, op, ": K = ", K, " is not a multiple of the group size ", G);
    QuantArgs a{};
    a.xdtype = to_dtype(x.scalar_type(), op, "x");
    a.M = M;
    a.K = K;
    a.ldx = K;
    check(smooth, op, "smooth", at::kFloat, {K}, "fp32 [K], nunchaku_core.cpu_packing");
    a.smooth = smooth.data_ptr<float>();
    if (proj_down.has_value()) {
        const at::Tensor& d = *proj_down;
        TORCH_CHECK(d.dim() == 2 && d.size(1) % kRankAlign == 0, op, ": proj_down must be [K, R16] with R16 a ",
                    "multiple of ", kRankAlign, ", got ", d.sizes());
        TORCH_CHECK(d.size(1) <= kMaxRank16, op, ": rank ", d.size(1), " exceeds the CPU kernels' limit ", kMaxRank16,
                    "; use backend 'reference'");
        a.down_dtype = check_float(d, op, "proj_down", {K, d.size(1)}, "[K, roundup(R, 16)], cpu_packing.pack_w4a4");
        a.proj_down = d.data_ptr();
        a.R16 = d.size(1);
    }
    return a;
}

// What one W4A4 call allocates: these four, the GEMM's output and each thread's RowBlock (gemm_w4a4_avx512vnni.cpp);
// nunchaku_core/kernels/cpu_packing.py states the bound (cpu_w4a4_peak_bytes), tests/test_large_m.py measures it.
std::vector<at::Tensor> quantize_outputs(QuantArgs& a, int64_t G) {
    auto opts = at::TensorOptions().device(at::kCPU);
    at::Tensor act = empty_output({a.M, a.K}, at::kChar);
    at::Tensor ascale = at::empty({a.M, a.K / G}, opts.dtype(at::kFloat));
    at::Tensor acorr = at::empty({a.M, a.K / G}, opts.dtype(at::kInt));
    at::Tensor lora = at::empty({a.M, a.R16}, opts.dtype(at::kFloat));
    a.act = act.data_ptr<int8_t>();
    a.ascale = ascale.data_ptr<float>();
    a.acorr = acorr.data_ptr<int32_t>();
    a.lora = a.R16 > 0 ? lora.data_ptr<float>() : nullptr;
    return {act, ascale, acorr, lora};
}

// x: [M, K] fp32/bf16/fp16 -> (act int8 [M, K], ascale fp32 [M, K/64], acorr int32 [M, K/64], lora fp32 [M, R16])
std::vector<at::Tensor> quantize_act_int4_lowrank(const at::Tensor& x_in, const at::Tensor& smooth,
                                                  const c10::optional<at::Tensor>& proj_down, bool shifted,
                                                  const std::string& isa_name) {
    const char* op = "quantize_act_int4_lowrank";
    const Isa isa = parse_isa(isa_name, op);
    const at::Tensor x = x_in.contiguous();
    QuantArgs a = quant_args(x, smooth, proj_down, kGroupInt4, op);
    a.x = x.data_ptr();
    a.shifted = shifted;
    std::vector<at::Tensor> out = quantize_outputs(a, kGroupInt4);
    quantize_tasks(a, quant_fn(false, isa));
    return out;
}

// As above with group 16; act holds 2·e2m1 value, ascale the e4m3 scale as fp32, and a fifth output holds the
// e2m1 codes themselves when return_codes (else it is empty).
std::vector<at::Tensor> quantize_act_nvfp4_lowrank(const at::Tensor& x_in, const at::Tensor& smooth,
                                                   const c10::optional<at::Tensor>& proj_down, bool return_codes,
                                                   const std::string& isa_name) {
    const char* op = "quantize_act_nvfp4_lowrank";
    const Isa isa = parse_isa(isa_name, op);
    const at::Tensor x = x_in.contiguous();
    QuantArgs a = quant_args(x, smooth, proj_down, kGroupNvfp4, op);
    a.x = x.data_ptr();
    std::vector<at::Tensor> out = quantize_outputs(a, kGroupNvfp4);
    at::Tensor codes = at::empty({return_codes ? a.M : 0, a.K}, at::TensorOptions().dtype(at::kChar));
    a.codes = return_codes ? codes.data_ptr<int8_t>() : nullptr;
    out.push_back(codes);
    quantize_tasks(a, quant_fn(true, isa));
    return out;
}

// ------------------------------------------------------------------------------------------------------------
// W4A4 GEMM
// ------------------------------------------------------------------------------------------------------------

using GemmFn = void (*)(const W4A4Args&, int64_t, int64_t);

// One W4A4 GEMM call, checked and ready to run: its arguments, its output and its tasks (runs of per_task tiles).
struct Gemm {
    W4A4Args a{};
    at::Tensor out;
    GemmFn fn = nullptr;
    int64_t tiles = 0, per_task = 1;
    int64_t tasks() const { return ceil_div(tiles, per_task); }
    void run_task(int64_t i) const { fn(a, i * per_task, std::min(tiles, (i + 1) * per_task)); }
};

Gemm prepare_gemm(bool nvfp4, const at::Tensor& act, const at::Tensor& ascale, const at::Tensor& acorr,
                  const c10::optional<at::Tensor>& lora, const at::Tensor& wcodes, const at::Tensor& wscales,
                  const at::Tensor& proj_up, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& out_scale, int64_t N, at::ScalarType out_dtype, Isa isa,
                  const char* op) {
    const int64_t G = nvfp4 ? kGroupNvfp4 : kGroupInt4;
    TORCH_CHECK(act.dim() == 2, op, ": act must be int8 [M, K] from quantize_act_*, got ", act.sizes());
    const int64_t M = act.size(0), K = act.size(1), NB = ceil_div(N, kBlockN);
    TORCH_CHECK(N > 0 && K % G == 0, op, ": N = ", N, ", K = ", K, ": need N > 0 and K a multiple of ", G);
    const char* pk = "nunchaku_core.cpu_packing.pack_w4a4";
    check(act, op, "act", at::kChar, {M, K}, "quantize_act_* output");
    check(ascale, op, "ascale", at::kFloat, {M, K / G}, "quantize_act_* output");
    check(acorr, op, "acorr", at::kInt, {M, K / G}, "quantize_act_* output");
    check(wcodes, op, "wcodes", at::kByte, {NB, K / kStepK, kChunkBytes}, pk);
    TORCH_CHECK(proj_up.dim() == 3, op, ": proj_up must be [NB, R, 16], got ", proj_up.sizes());
    const int64_t R = proj_up.size(1);
    Gemm g;
    W4A4Args& a = g.a;
    a.wscales_dtype = check_float(wscales, op, "wscales", {NB, K / G, kBlockN}, pk);
    a.up_dtype = check_float(proj_up, op, "proj_up", {NB, R, kBlockN}, pk);
    if (R > 0) {
        TORCH_CHECK(lora.has_value(), op, ": rank ", R, " needs the lora output of quantize_act_*");
        TORCH_CHECK(lora->dim() == 2 && lora->size(1) >= R, op, ": lora must be fp32 [M, R16 >= ", R, "], got ",
                    lora->sizes());
        check(*lora, op, "lora", at::kFloat, {M, lora->size(1)}, "quantize_act_* output");
        a.lora = lora->data_ptr<float>();
        a.R16 = lora->size(1);
    }
    if (bias.has_value()) check(*bias, op, "bias", at::kFloat, {NB * kBlockN}, pk);
    if (out_scale.has_value()) check(*out_scale, op, "out_scale", at::kFloat, {NB * kBlockN}, pk);
    g.out = empty_output({M, N}, out_dtype);
    a.act = act.data_ptr<int8_t>();
    a.ascale = ascale.data_ptr<float>();
    a.acorr = acorr.data_ptr<int32_t>();
    a.M = M;
    a.N = N;
    a.K = K;
    a.R = R;
    a.wcodes = wcodes.data_ptr<uint8_t>();
    a.wscales = wscales.data_ptr();
    a.proj_up = proj_up.data_ptr();
    a.bias = opt_ptr(bias);
    a.out_scale = opt_ptr(out_scale);
    a.out = g.out.data_ptr();
    a.out_dtype = to_dtype(out_dtype, op, "out_dtype");
    static std::atomic<uint64_t> calls{0};
    a.call = ++calls;
    g.fn = nvfp4 ? (isa == Isa::kAvx512Vnni ? gemm_w4a4_nvfp4_avx512vnni
                    : isa == Isa::kAvx2     ? gemm_w4a4_nvfp4_avx2
                                            : gemm_w4a4_nvfp4_ref)
                 : (isa == Isa::kAvx512Vnni ? gemm_w4a4_int4_avx512vnni
                    : isa == Isa::kAvx2     ? gemm_w4a4_int4_avx2
                                            : gemm_w4a4_int4_ref);
    const TilePlan plan = tile_plan(M, N, K);
    g.tiles = M == 0 ? 0 : plan.tiles_m * plan.tiles_n;
    // Longer runs of tiles when there are many (up to a whole row block: the AVX-512 kernel repacks a block's
    // activations once per thread), keeping ~8 tasks per thread so that a descheduled thread is made up for.
    g.per_task = std::max<int64_t>(
        kTilesPerTask, std::min<int64_t>(plan.tiles_n, g.tiles / (8 * std::max(1, at::get_num_threads()))));
    return g;
}

at::Tensor gemm_w4a4(bool nvfp4, const at::Tensor& act, const at::Tensor& ascale, const at::Tensor& acorr,
                     const c10::optional<at::Tensor>& lora, const at::Tensor& wcodes, const at::Tensor& wscales,
                     const at::Tensor& proj_up, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& out_scale, int64_t N, at::ScalarType out_dtype,
                     const std::string& isa_name) {
    const char* op = nvfp4 ? "gemm_w4a4_nvfp4" : "gemm_w4a4_int4";
    const Gemm g = prepare_gemm(nvfp4, act, ascale, acorr, lora, wcodes, wscales, proj_up, bias, out_scale, N,
                                out_dtype, parse_isa(isa_name, op), op);
    parallel_ranges(g.tasks(), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) g.run_task(i);
    });
    return g.out;
}

at::Tensor gemm_w4a4_int4(const at::Tensor& act, const at::Tensor& ascale, const at::Tensor& acorr,
                          const c10::optional<at::Tensor>& lora, const at::Tensor& wcodes, const at::Tensor& wscales,
                          const at::Tensor& proj_up, const c10::optional<at::Tensor>& bias, int64_t N,
                          at::ScalarType out_dtype, const std::string& isa) {
    return gemm_w4a4(false, act, ascale, acorr, lora, wcodes, wscales, proj_up, bias, c10::nullopt, N, out_dtype, isa);
}

at::Tensor gemm_w4a4_nvfp4(const at::Tensor& act, const at::Tensor& ascale, const at::Tensor& acorr,
                           const c10::optional<at::Tensor>& lora, const at::Tensor& wcodes,
                           const at::Tensor& wscales, const at::Tensor& proj_up, const c10::optional<at::Tensor>& bias,
                           const c10::optional<at::Tensor>& out_scale, int64_t N, at::ScalarType out_dtype,
                           const std::string& isa) {
    return gemm_w4a4(true, act, ascale, acorr, lora, wcodes, wscales, proj_up, bias, out_scale, N, out_dtype, isa);
}

// ------------------------------------------------------------------------------------------------------------
// The whole W4A4 layer in one call
// ------------------------------------------------------------------------------------------------------------

// quantize_act_* then gemm_w4a4_* (same kernels, same ranges, so the same bits) in one call and one parallel
// region: the quantizer tasks and then the GEMM tasks are handed out from one counter, and a GEMM task first waits
// until every quantizer task is done. They were all handed out before it, to threads that are running them, so
// the wait always ends, whatever the number of threads. Saves the second Python call, the intermediate tuple and
// the second start and join of the thread team (nunchaku_core/backend.py svdquant_linear calls this).
at::Tensor svdquant_linear(bool nvfp4, const at::Tensor& x_in, const at::Tensor& smooth,
                           const c10::optional<at::Tensor>& proj_down, bool shifted, const at::Tensor& wcodes,
                           const at::Tensor& wscales, const at::Tensor& proj_up,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& out_scale,
                           int64_t N, const std::string& isa_name) {
    const char* op = nvfp4 ? "svdquant_linear_nvfp4" : "svdquant_linear_int4";
    const Isa isa = parse_isa(isa_name, op);
    const int64_t G = nvfp4 ? kGroupNvfp4 : kGroupInt4;
    const at::Tensor x = x_in.contiguous();
    QuantArgs q = quant_args(x, smooth, proj_down, G, op);
    q.x = x.data_ptr();
    q.shifted = shifted && !nvfp4;
    const std::vector<at::Tensor> qout = quantize_outputs(q, G);
    const c10::optional<at::Tensor> lora = q.R16 > 0 ? c10::optional<at::Tensor>(qout[3]) : c10::nullopt;
    const Gemm g = prepare_gemm(nvfp4, qout[0], qout[1], qout[2], lora, wcodes, wscales, proj_up, bias, out_scale,
                                N, x.scalar_type(), isa, op);
    const QuantFn quantize = quant_fn(nvfp4, isa);
    const int64_t rows = quant_task_rows(q.M), quant_tasks = ceil_div(q.M, rows);
    std::atomic<int64_t> quantized{0};
    parallel_ranges(quant_tasks + g.tasks(), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
            if (i < quant_tasks) {
                quantize(q, i * rows, std::min(q.M, (i + 1) * rows));
                quantized.fetch_add(1, std::memory_order_release);
                continue;
            }
            while (quantized.load(std::memory_order_acquire) < quant_tasks) std::this_thread::yield();
            g.run_task(i - quant_tasks);
        }
    });
    return g.out;
}

at::Tensor svdquant_linear_int4(const at::Tensor& x, const at::Tensor& smooth,
                                const c10::optional<at::Tensor>& proj_down, bool shifted, const at::Tensor& wcodes,
                                const at::Tensor& wscales, const at::Tensor& proj_up,
                                const c10::optional<at::Tensor>& bias, int64_t N, const std::string& isa) {
    return svdquant_linear(false, x, smooth, proj_down, shifted, wcodes, wscales, proj_up, bias, c10::nullopt, N, isa);
}

at::Tensor svdquant_linear_nvfp4(const at::Tensor& x, const at::Tensor& smooth,
                                 const c10::optional<at::Tensor>& proj_down, const at::Tensor& wcodes,
                                 const at::Tensor& wscales, const at::Tensor& proj_up,
                                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& out_scale,
                                 int64_t N, const std::string& isa) {
    return svdquant_linear(true, x, smooth, proj_down, false, wcodes, wscales, proj_up, bias, out_scale, N, isa);
}

// ------------------------------------------------------------------------------------------------------------
// W4A16 GEMM / GEMV
// ------------------------------------------------------------------------------------------------------------

// x: [M, K] fp32/bf16/fp16 -> [M, N] in x's dtype.
at::Tensor gemm_w4a16(const at::Tensor& x_in, const at::Tensor& wcodes, const at::Tensor& scales,
                      const at::Tensor& zeros, const c10::optional<at::Tensor>& bias, int64_t N, int64_t group_size,
                      const std::string& isa_name) {
    const char* op = "gemm_w4a16";
    const Isa isa = parse_isa(isa_name, op);
    TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu(), op, ": x must be a 2-D cpu tensor [M, K], got ",
                x_in.sizes());
    const DType out_dtype = to_dtype(x_in.scalar_type(), op, "x");
    const at::Tensor x = x_in.to(at::kFloat).contiguous();
    const int64_t M = x.size(0), K = x.size(1), G = group_size, NB = ceil_div(N, kBlockN);
    TORCH_CHECK(N > 0 && K > 0 && G > 0 && G % kStepK == 0, op, ": N = ", N, ", K = ", K, ", group size ", G,
                ": need N, K > 0 and the group size a multiple of ", kStepK);
    const int64_t groups = ceil_div(K, G);
    const char* pk = "nunchaku_core.cpu_packing.pack_w4a16";
    check(wcodes, op, "wcodes", at::kByte, {NB, ceil_div(K, kStepK), kChunkBytes}, pk);
    const DType scales_dtype = check_float(scales, op, "scales", {NB, groups, kBlockN}, pk);
    const DType zeros_dtype = check_float(zeros, op, "zeros", {NB, groups, kBlockN}, pk);
    if (bias.has_value()) check(*bias, op, "bias", at::kFloat, {NB * kBlockN}, pk);
    at::Tensor xs = at::empty({M, groups}, at::TensorOptions().dtype(at::kFloat));
    at::Tensor out = empty_output({M, N}, x_in.scalar_type());
    if (M == 0) return out;
    W4A16Args a{};
    a.x = x.data_ptr<float>();
    a.M = M;
    a.N = N;
    a.K = K;
    a.G = G;
    a.xs = xs.data_ptr<float>();
    a.wcodes = wcodes.data_ptr<uint8_t>();
    a.scales = scales.data_ptr();
    a.zeros = zeros.data_ptr();
    a.scales_dtype = scales_dtype;
    a.zeros_dtype = zeros_dtype;
    a.bias = opt_ptr(bias);
    a.out = out.data_ptr();
    a.out_dtype = out_dtype;
    parallel_ranges(M, [&](int64_t b, int64_t e) { w4a16_group_sums(a, b, e); });
    auto fn = isa == Isa::kAvx512Vnni ? gemm_w4a16_avx512vnni : isa == Isa::kAvx2 ? gemm_w4a16_avx2 : gemm_w4a16_ref;
    const TilePlan plan = tile_plan(M, N, K);
    parallel_ranges(plan.tiles_m * plan.tiles_n, [&](int64_t b, int64_t e) { fn(a, b, e); });
    return out;
}

// ------------------------------------------------------------------------------------------------------------
// ISA queries, layout constants, VNNI peak
// ------------------------------------------------------------------------------------------------------------

bool cpu_isa_supported(const std::string& name) {
    if (name == "ref") return true;
    if (name == "avx2") return isa_supported(Isa::kAvx2);
    if (name == "avx512vnni") return isa_supported(Isa::kAvx512Vnni);
    TORCH_CHECK(false, "cpu_isa_supported: isa '", name, "' is not one of ref, avx2, avx512vnni");
}

pybind11::dict layout_constants() {
    pybind11::dict d;
    d["BLOCK_N"] = kBlockN;
    d["STEP_K"] = kStepK;
    d["CHUNK_BYTES"] = kChunkBytes;
    d["GROUP_INT4"] = kGroupInt4;
    d["GROUP_NVFP4"] = kGroupNvfp4;
    d["INT4_OFFSET"] = kInt4Offset;
    d["NVFP4_OFFSET"] = kNvfp4Offset;
    d["RANK_ALIGN"] = kRankAlign;
    d["MAX_RANK"] = kMaxRank16;
    d["TILE_N"] = kTileN;
    return d;
}

// Multiply-accumulates per second of vpdpbusd zmm, summed over all torch threads (one busy loop per thread).
double vnni_peak_macs(double seconds) {
    TORCH_CHECK(isa_supported(Isa::kAvx512Vnni), "vnni_peak_macs: this CPU has no AVX-512 VNNI");
    const int threads = at::get_num_threads();
    std::vector<double> rate(threads, 0.0);
    parallel_ranges(threads, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) rate[i] = vnni_peak_macs_avx512vnni(seconds);
    });
    double total = 0.0;
    for (double r : rate) total += r;
    return total;
}

// ------------------------------------------------------------------------------------------------------------
// CUDA kernels (csrc/cuda/ops.cuh; layouts csrc/cuda/layout.cuh, writer nunchaku_core/cuda_packing.py). Built only
// with SVDQ_WITH_CUDA (setup.py, when torch has CUDA and nvcc exists). Never run on the project's machines (no GPU):
// this section is compile-checked only. The caller passes the CUDA stream (torch.cuda.current_stream().cuda_stream)
// so that this file needs no torch CUDA headers.
// ------------------------------------------------------------------------------------------------------------
#ifdef SVDQ_WITH_CUDA

nunchaku_cuda::DType cuda_dtype(at::ScalarType t, const char* op) {
    TORCH_CHECK(t == at::kBFloat16 || t == at::kHalf, op, ": dtype ", t, ", the CUDA kernels take bfloat16 or float16");
    return t == at::kBFloat16 ? nunchaku_cuda::DType::kBFloat16 : nunchaku_cuda::DType::kFloat16;
}

void cuda_check(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype, std::vector<int64_t> shape) {
    TORCH_CHECK(t.is_cuda() && t.scalar_type() == dtype && t.sizes().vec() == shape && t.is_contiguous(), op, ": ",
                name, " is ", t.scalar_type(), " ", t.sizes(), " on ", t.device(), ", expected contiguous cuda ", dtype,
                " ", at::IntArrayRef(shape), " (nunchaku_core.cuda_packing)");
}

void cuda_ok(cudaError_t e, const char* op) { TORCH_CHECK(e == cudaSuccess, op, ": ", cudaGetErrorString(e)); }

// x: [M, K] bf16/fp16 cuda -> (act_codes int32 [M_pad/16, K/64, 32, 4], act_scales fp32 or int32 [K/64, M_pad],
// lora_act fp32 [M, R]); M_pad = roundup(M, 16).
std::vector<at::Tensor> cuda_quantize_act(bool nvfp4, const at::Tensor& x_in, const at::Tensor& smooth,
                                          const at::Tensor& proj_down, bool shifted, int64_t stream_handle) {
    const char* op = nvfp4 ? "cuda_quantize_act_nvfp4_lowrank" : "cuda_quantize_act_int4_lowrank";
    const at::Tensor x = x_in.contiguous();
    TORCH_CHECK(x.dim() == 2 && x.is_cuda(), op, ": x must be a 2-D cuda tensor [M, K], got ", x.sizes());
    const int64_t M = x.size(0), K = x.size(1), R = proj_down.size(1), M_pad = (M + 15) / 16 * 16;
    TORCH_CHECK(K % 64 == 0, op, ": K = ", K, " is not a multiple of 64");
    cuda_check(smooth, op, "smooth", at::kFloat, {K});
    cuda_check(proj_down, op, "proj_down", at::kFloat, {K, R});
    const auto o = x.options();
    at::Tensor codes = at::zeros({M_pad / 16, K / 64, 32, 4}, o.dtype(at::kInt));
    at::Tensor scales = at::zeros({K / 64, M_pad}, o.dtype(nvfp4 ? at::kInt : at::kFloat));
    at::Tensor lora = at::empty({M, R}, o.dtype(at::kFloat));
    const auto dtype = cuda_dtype(x.scalar_type(), op);
    const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
    auto* c = reinterpret_cast<uint32_t*>(codes.data_ptr<int32_t>());
    if (nvfp4) {
        cuda_ok(nunchaku_cuda::quantize_act_nvfp4_lowrank(x.data_ptr(), dtype, int(M), int(K), smooth.data_ptr<float>(),
                                                          proj_down.data_ptr<float>(), int(R), c,
                                                          reinterpret_cast<uint32_t*>(scales.data_ptr<int32_t>()),
                                                          lora.data_ptr<float>(), stream), op);
    } else {
        cuda_ok(nunchaku_cuda::quantize_act_int4_lowrank(x.data_ptr(), dtype, int(M), int(K), smooth.data_ptr<float>(),
                                                         shifted, proj_down.data_ptr<float>(), int(R), c,
                                                         scales.data_ptr<float>(), lora.data_ptr<float>(), stream), op);
    }
    return {codes, scales, lora};
}

// out [M, N] in out_dtype; wcodes int32 [N_pad/128, K/64, 8, 32, 4]; wscales fp32 (int4) / int32 (nvfp4) [K/64, N_pad].
at::Tensor cuda_gemm_w4a4(bool nvfp4, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& lora,
                          const at::Tensor& wcodes, const at::Tensor& wscales, const at::Tensor& proj_up,
                          const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& out_scale,
                          bool act_unsigned, int64_t M, int64_t N, at::ScalarType out_dtype, int64_t stream_handle) {
    const char* op = nvfp4 ? "cuda_gemm_w4a4_nvfp4" : "cuda_gemm_w4a4_int4";
    const int64_t K = codes.size(1) * 64, M_pad = (M + 15) / 16 * 16, N_pad = (N + 127) / 128 * 128, R = lora.size(1);
    cuda_check(codes, op, "act_codes", at::kInt, {M_pad / 16, K / 64, 32, 4});
    cuda_check(scales, op, "act_scales", nvfp4 ? at::kInt : at::kFloat, {K / 64, M_pad});
    cuda_check(lora, op, "lora_act", at::kFloat, {M, R});
    cuda_check(wcodes, op, "wcodes", at::kInt, {N_pad / 128, K / 64, 8, 32, 4});
    cuda_check(wscales, op, "wscales", nvfp4 ? at::kInt : at::kFloat, {K / 64, N_pad});
    cuda_check(proj_up, op, "proj_up", at::kFloat, {N, R});
    if (bias.has_value()) cuda_check(*bias, op, "bias", at::kFloat, {N});
    if (out_scale.has_value()) cuda_check(*out_scale, op, "out_scale", at::kFloat, {N});
    at::Tensor out = at::empty({M, N}, codes.options().dtype(out_dtype));
    const auto dtype = cuda_dtype(out_dtype, op);
    const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
    const auto* ac = reinterpret_cast<const uint32_t*>(codes.data_ptr<int32_t>());
    const auto* wc = reinterpret_cast<const uint32_t*>(wcodes.data_ptr<int32_t>());
    const float* b = opt_ptr(bias);
    if (nvfp4) {
        cuda_ok(nunchaku_cuda::gemm_w4a4_nvfp4(ac, reinterpret_cast<const uint32_t*>(scales.data_ptr<int32_t>()), int(M),
                                               int(N), int(K), wc,
                                               reinterpret_cast<const uint32_t*>(wscales.data_ptr<int32_t>()),
                                               opt_ptr(out_scale), lora.data_ptr<float>(),
                                               proj_up.data_ptr<float>(), int(R), b, out.data_ptr(), dtype, stream), op);
    } else {
        cuda_ok(nunchaku_cuda::gemm_w4a4_int4(ac, scales.data_ptr<float>(), act_unsigned, int(M), int(N), int(K), wc,
                                              wscales.data_ptr<float>(), lora.data_ptr<float>(), proj_up.data_ptr<float>(),
                                              int(R), b, out.data_ptr(), dtype, stream), op);
    }
    return out;
}

// x: [M, K] bf16/fp16 cuda; qweight int32 [N, ceil(K/8)]; scales, zeros fp32 [N, ceil(K/G)] -> [M, N] in x's dtype.
at::Tensor cuda_gemm_w4a16(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, const c10::optional<at::Tensor>& bias, int64_t group_size,
                           int64_t stream_handle) {
    const char* op = "cuda_gemm_w4a16";
    const at::Tensor x = x_in.contiguous();
    TORCH_CHECK(x.dim() == 2 && x.is_cuda(), op, ": x must be a 2-D cuda tensor [M, K], got ", x.sizes());
    const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), G = group_size;
    cuda_check(qweight, op, "qweight", at::kInt, {N, (K + 7) / 8});
    cuda_check(scales, op, "scales", at::kFloat, {N, (K + G - 1) / G});
    cuda_check(zeros, op, "zeros", at::kFloat, {N, (K + G - 1) / G});
    if (bias.has_value()) cuda_check(*bias, op, "bias", at::kFloat, {N});
    at::Tensor out = at::empty({M, N}, x.options());
    cuda_ok(nunchaku_cuda::gemm_w4a16(x.data_ptr(), cuda_dtype(x.scalar_type(), op), int(M), int(N), int(K),
                                      reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>()),
                                      scales.data_ptr<float>(), zeros.data_ptr<float>(), int(G), opt_ptr(bias),
                                      out.data_ptr(), reinterpret_cast<cudaStream_t>(stream_handle)), op);
    return out;
}

#endif  // SVDQ_WITH_CUDA

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "SVDQuant / W4A16 CPU kernels (see csrc/cpu/kernels.h); called through nunchaku_core.backend";
    namespace py = pybind11;
    m.def("quantize_act_int4_lowrank", &quantize_act_int4_lowrank, py::arg("x"), py::arg("smooth"),
          py::arg("proj_down"), py::arg("shifted"), py::arg("isa"));
    m.def("quantize_act_nvfp4_lowrank", &quantize_act_nvfp4_lowrank, py::arg("x"), py::arg("smooth"),
          py::arg("proj_down"), py::arg("return_codes"), py::arg("isa"));
    m.def("gemm_w4a4_int4", &gemm_w4a4_int4, py::arg("act"), py::arg("ascale"), py::arg("acorr"), py::arg("lora"),
          py::arg("wcodes"), py::arg("wscales"), py::arg("proj_up"), py::arg("bias"), py::arg("N"),
          py::arg("out_dtype"), py::arg("isa"));
    m.def("gemm_w4a4_nvfp4", &gemm_w4a4_nvfp4, py::arg("act"), py::arg("ascale"), py::arg("acorr"), py::arg("lora"),
          py::arg("wcodes"), py::arg("wscales"), py::arg("proj_up"), py::arg("bias"), py::arg("out_scale"),
          py::arg("N"), py::arg("out_dtype"), py::arg("isa"));
    m.def("svdquant_linear_int4", &svdquant_linear_int4, py::arg("x"), py::arg("smooth"), py::arg("proj_down"),
          py::arg("shifted"), py::arg("wcodes"), py::arg("wscales"), py::arg("proj_up"), py::arg("bias"),
          py::arg("N"), py::arg("isa"));
    m.def("svdquant_linear_nvfp4", &svdquant_linear_nvfp4, py::arg("x"), py::arg("smooth"), py::arg("proj_down"),
          py::arg("wcodes"), py::arg("wscales"), py::arg("proj_up"), py::arg("bias"), py::arg("out_scale"),
          py::arg("N"), py::arg("isa"));
    m.def("gemm_w4a16", &gemm_w4a16, py::arg("x"), py::arg("wcodes"), py::arg("scales"), py::arg("zeros"),
          py::arg("bias"), py::arg("N"), py::arg("group_size"), py::arg("isa"));
    m.def("cpu_isa_supported", &cpu_isa_supported, py::arg("isa"));
    m.def("layout_constants", &layout_constants);
    m.def("vnni_peak_macs", &vnni_peak_macs, py::arg("seconds"));
#ifdef SVDQ_WITH_CUDA
    // Same op names as the CPU ones with a cuda_ prefix; nunchaku_core.backend checks for these to enable 'cuda'.
    m.def("cuda_quantize_act_int4_lowrank", [](const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& down,
                                               bool shifted, int64_t stream) {
              return cuda_quantize_act(false, x, smooth, down, shifted, stream); },
          py::arg("x"), py::arg("smooth"), py::arg("proj_down"), py::arg("shifted"), py::arg("stream"));
    m.def("cuda_quantize_act_nvfp4_lowrank", [](const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& down,
                                                int64_t stream) { return cuda_quantize_act(true, x, smooth, down, false, stream); },
          py::arg("x"), py::arg("smooth"), py::arg("proj_down"), py::arg("stream"));
    m.def("cuda_gemm_w4a4_int4", [](const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& lora,
                                    const at::Tensor& wcodes, const at::Tensor& wscales, const at::Tensor& up,
                                    const c10::optional<at::Tensor>& bias, bool act_unsigned, int64_t M, int64_t N,
                                    at::ScalarType out_dtype, int64_t stream) {
              return cuda_gemm_w4a4(false, codes, scales, lora, wcodes, wscales, up, bias, c10::nullopt, act_unsigned,
                                    M, N, out_dtype, stream); },
          py::arg("act_codes"), py::arg("act_scales"), py::arg("lora_act"), py::arg("wcodes"), py::arg("wscales"),
          py::arg("proj_up"), py::arg("bias"), py::arg("act_unsigned"), py::arg("M"), py::arg("N"), py::arg("out_dtype"),
          py::arg("stream"));
    m.def("cuda_gemm_w4a4_nvfp4", [](const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& lora,
                                     const at::Tensor& wcodes, const at::Tensor& wscales, const at::Tensor& up,
                                     const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& out_scale,
                                     int64_t M, int64_t N, at::ScalarType out_dtype, int64_t stream) {
              return cuda_gemm_w4a4(true, codes, scales, lora, wcodes, wscales, up, bias, out_scale, false, M, N,
                                    out_dtype, stream); },
          py::arg("act_codes"), py::arg("act_scales"), py::arg("lora_act"), py::arg("wcodes"), py::arg("wscales"),
          py::arg("proj_up"), py::arg("bias"), py::arg("out_scale"), py::arg("M"), py::arg("N"), py::arg("out_dtype"),
          py::arg("stream"));
    m.def("cuda_gemm_w4a16", &cuda_gemm_w4a16, py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
          py::arg("bias"), py::arg("group_size"), py::arg("stream"));
#endif
}
