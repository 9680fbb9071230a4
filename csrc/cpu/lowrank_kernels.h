// Rank-r building blocks of the LoRA-style ops on the CPU:
//   shrink:      H[t, k] = s · Σ_i X[t, i] · M[k, i]            X [T, K], M [r, K] → H [T, r] fp32 (fp64 for fp64)
//   expand_add_: Y[t, n] += bias[n] + Σ_k H[t, k] · N[k, n]     H [T, r] fp32/fp64, N [r, Nout], Y [T, Nout] in place
// Why this split: the base GEMM writes a fresh output with beta = 0, the fastest form oneDNN/MKL have (measured
// on this CPU, bf16: F.linear, which first fills the output with the bias and then accumulates, costs 1.16–1.20×
// a plain mm into the same shape), and the rank-r term plus bias is then added in one pass over the output.
// That pass is hand-written because with r ≈ 16 it is a K = 16 GEMM, a shape oneDNN runs far below the memory
// floor (a bf16 2048×16×3072 addmm_ took 4.3 ms, a quarter of the base GEMM). Here each 4-row × 64-column tile
// of Y is read once, accumulated over all r in 16 AVX-512 registers together with the bias, and written once.
// shrink is an N = r GEMM: on AVX512-BF16 CPUs (bf16 and fp32) the broadcast-dot kernel of cpu/rank_avx512.cpp
// (one pass over X, the scale folded in; as an at::mm plus a scaling pass it cost 0.5 ms at 2048×768×16 after a
// big GEMM on a Zen 4), else at::mm.
// The AVX-512 code has a function-level target attribute and is chosen by the CPU's features at run time;
// elsewhere (no AVX-512 BF16, or fp16/fp64) ATen computes the same products.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <vector>

namespace lowrank::cpu {

// Whether this CPU runs the AVX-512 BF16 kernels (checked once from CPUID).
bool has_avx512_bf16();
// Whether it runs the AMX-BF16 tile kernels (CPU feature and the OS's permission for the tile state).
bool has_amx_bf16();

// oneDNN's linear (mkldnn::_linear_pointwise with a plain dense weight), or nullptr where this torch build lacks
// it: y = x2·wᵀ + bias with the bias added in the GEMM's fp32 epilogue, so it writes a fresh output once (ATen's
// addmm first fills the output with the bias: 2.9 ms of a 8.5 ms bf16 2048×128×4096 call on an Intel Xeon) and,
// in bf16, is bit-identical to F.linear. Measured against F.linear on that CPU: bf16 0.87–0.99×; fp32 faster only
// at 2–64 tokens of large weights (cpu/lora_linear.cpp decides for fp32).
const c10::OperatorHandle* onednn_linear_op();
// onednn_linear_op() on x2 [T, K] (copied if not contiguous), w [N, K] contiguous, bias [N] or none.
at::Tensor onednn_linear(const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias);

// fp32 y = x2·wᵀ + bias from bf16 halves of both operands (cpu/bf16x3_linear.cpp): three bf16 products on AMX
// tiles, fp32 sums; ~1e-5 relative from the exact product (fp32's own sgemm: ~1e-7), ~2× faster than MKL's sgemm.
// This is what torch documents float32_matmul_precision("high") to allow ("each float32 number as the sum of two
// bfloat16 numbers"), so lora_linear takes it only then. x2 [T, K] fp32 (any strides), w [N, K] fp32 (any
// strides: packed per call), bias [N] fp32 or none. bf16x3_supported(): AMX present.
bool bf16x3_supported();
at::Tensor bf16x3_linear(const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias);

// H = scale · X · Mᵀ in fp32 (fp64 when X is fp64).  X [T, K], M [r, K].  Returns [T, r] contiguous.
at::Tensor shrink(const at::Tensor& x2, const at::Tensor& m, double scale = 1.0);

// Y += bias + H · N in place.  Y [T, Nout], H [T, r] fp32 or fp64 (from shrink), N [r, Nout], bias [Nout] or none.
void expand_add_(at::Tensor& y, const at::Tensor& h, const at::Tensor& n, const std::optional<at::Tensor>& bias);
// Y = src + bias + H·N, src of Y's shape and dtype (any row stride): the same single pass, out of place.
void expand_add_out(at::Tensor& y, const at::Tensor& src, const at::Tensor& h, const at::Tensor& n,
                    const std::optional<at::Tensor>& bias);

// Decode (few tokens), bf16: y = bias + x·Wᵀ + u·Vᵀ in one pass over the weights, where u·Vᵀ is an optional second
// product with the same output (the LoRA term: u = s·x·Aᵀ [T, r], V = B [out, r]). A GEMV is bound by streaming W,
// and oneDNN adds ~130 µs of fixed cost per small call; with three calls (x·Aᵀ, base, B-term) that was 15–20%
// of a 1×4096×4096 layer. Uses AVX512-BF16 dot products (fp32 accumulation) over NB output rows × T tokens held
// in registers (NB = 3–6, T·NB ≤ 24 accumulators), prefetching the next block of W rows. Each block of NB rows
// re-reads all of x (from L1/L2), T·K·N/NB bytes in all; up to how many tokens the fused pass pays for a whole
// layer: fused_decode_max_tokens(); up to 8 tokens it is the cheapest way to form the rank-r shrink.
// Requirements (checked by decode_supported): bf16, 1 ≤ T ≤ 8, unit column strides. Not bit-identical to
// F.linear (another summation order); within the reference's error.
bool decode_supported(const at::Tensor& x2, const at::Tensor& w);
// Up to how many tokens a whole bf16 layer should take the fused decode pass rather than a oneDNN GEMM (the rule
// lora_linear, multi_lora_linear and rank1_experts_lora share). Measured, bf16 4096²: on an Intel Xeon with AMX
// (before the pass prefetched W) it stopped paying past 4 tokens (1.20× F.linear at 8), and there the AMX skinny
// kernel takes 4–16 tokens of a packed layer; on an AMD EPYC Zen 4 (AVX512-BF16, no AMX), with the prefetch, the
// pass runs 8 tokens in ~0.6–0.8× F.linear's time (oneDNN's small-M bf16 GEMM does not reach the memory floor
// there). Hence 4 with AMX, 8 without.
int64_t fused_decode_max_tokens();
at::Tensor decode_linear_bf16(const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& u, const std::optional<at::Tensor>& v,
                              at::ScalarType out_dtype);

// Few tokens, bf16: out = g·W [T, C] in fp32, g [T, N], W [N, C] (any row stride, unit column stride), for
// 1 ≤ T ≤ 8. The backward's dx = g·W at decode sizes: oneDNN's bf16 GEMM of that form (the weight not
// transposed) ran 8×4096² in 3.0–4.2 ms on an AMD EPYC Zen 4, 2.4–3.3× its memory floor (1.26 ms); this is one
// pass over W (panels of rows, each row read in 64-byte pieces per 32-column block, 2·T accumulators), sums in
// fp32: 1.8–2.2 ms there, 0.53–0.6× the GEMM in the same runs (panels of 32–128 rows, prefetch 2–8 blocks ahead
// all within that noise). With the joint [W | B] view the last r columns are g·B, the shrink of g, in the same
// pass. Requirements: decode_nn_supported.
bool decode_nn_supported(const at::Tensor& g2, const at::Tensor& w);
at::Tensor decode_nn_bf16(const at::Tensor& g2, const at::Tensor& w);

// Joint layout: weight W [N, K] and lora_b B [N, r] are the two column blocks of one row-major [N, K + r] buffer
// (LoRALinear.pack_()), so W' = [W | B] is a plain [N, K + r] matrix with no copy. Returns that view, or an
// undefined tensor when the arguments are not laid out that way.
at::Tensor joint_weight(const at::Tensor& weight, const at::Tensor& lora_b);

// x' = [x | s·x·Aᵀ] [T, K + r] bf16, the product rounded to bf16 (as an unfused bf16 layer rounds h): one copy of
// x with the shrink formed while each block of rows is in cache (AMX tiles where the CPU has them, else
// AVX512-BF16; cpu/augment.cpp). With x'·W'ᵀ = x·Wᵀ + s·(x·Aᵀ)·Bᵀ the whole LoRA layer is then one GEMM of K + r.
// Requirements (augment_supported): bf16 x and A, unit column strides, AVX512-BF16.
bool augment_supported(const at::Tensor& x2, const at::Tensor& a);
at::Tensor augment_bf16(const at::Tensor& x2, const at::Tensor& a, double scale);

// Few tokens, bf16, AMX: y = bias + x·Wᵀ [T, N] for 1 ≤ T ≤ 16, W [N, K] with unit column stride (any row
// stride: the joint [W | B] view with x = [x | s·x·Aᵀ] is the whole LoRA layer). Bound by streaming W once;
// the tokens are the N side of the tile product (W rows are the A tiles, read in place), so nothing of W is
// repacked (cpu/skinny_amx.cpp).
bool skinny_supported(int64_t tokens, const at::Tensor& w);
at::Tensor skinny_linear_amx(const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias);

// Rank-r products of the backward on AMX tiles (cpu/rank_amx.cpp), fp32 results:
//   shrink_amx(Z, M, s) = s·Z·Mᵀ [T, r]   Z [T, K] bf16 (unit column stride), M [r, K] bf16 (any strides)
//   tn_amx(M, Z, s)     = s·Mᵀ·Z [r, K]   M [T, r] bf16 (any strides), Z [T, K] bf16 (unit column stride)
bool rank_amx_supported(const at::Tensor& z, const at::Tensor& m);
at::Tensor shrink_amx(const at::Tensor& z, const at::Tensor& m, double scale);
at::Tensor tn_amx(const at::Tensor& m, const at::Tensor& z, double scale);

// The LoRA backward after its one big GEMM, fused on AMX tiles (bf16). x [T, K], g [T, N] (unit column strides),
// A [r, K], B [N, r] (any strides); with gB = s·g·B and h = s·x·Aᵀ, each rounded to bf16 (as an unfused bf16
// layer holds them):
//   dx += gB·A in place (dx: [T, K] bf16 contiguous holding g·W; null when not wanted),
//   dA = gBᵀ·x [r, K] (when da),   dB = gᵀ·h [N, r] (when db).
// One pass over 128-token panels: each panel of x, g and dx is read once from memory and used by every product
// while it is in L2 (as separate calls, x and g are read twice each and dx once more, plus fp32 round trips of gB
// and h); the reductions over tokens keep their C tiles on the tile unit for a panel and in per-thread fp32
// accumulators between panels. Why g·W and not g·[W | B] from the joint buffer: the GEMM with N = K + r output
// columns (784) ran 10–20% slower than with N = K (768), and gB costs only tile work here, g being read anyway.
// da / db: written in place when they hold a defined bf16 tensor of the result's shape (any strides), else set to
// a new one.
void lora_backward_tail_amx(at::Tensor* dx, const at::Tensor& x2, const at::Tensor& g2, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, double scale, at::Tensor* da, at::Tensor* db);

// The same tail, same contract, on AVX-512 without tiles (cpu/rank_avx512.cpp): bf16 (VDPBF16PS; for CPUs without
// AMX) and fp32 (FMA; gB, h and dx kept in fp32), one parallel pass over token panels instead of five GEMM calls.
// tail_avx512_supported: the CPU has AVX512-BF16, z and m both bf16 or both fp32, 2-D, z with unit column stride.
// rank_avx512_supported: the same for bf16 only (shrink_avx512).
bool tail_avx512_supported(const at::Tensor& z, const at::Tensor& m);
bool rank_avx512_supported(const at::Tensor& z, const at::Tensor& m);
// M [r, K] bf16 (any strides) → [G][P][16][2] bf16, G = ⌈r/16⌉, P = ⌈K/2⌉, zero padded: lane j of pair p holds
// (M[16g + j, 2p], M[16g + j, 2p + 1]). Read one pair row at a time it is the operand of the AVX-512 broadcast-dot
// shrinks (augment_bf16, shrink_avx512, the tails); it is also the VNNI layout of an AMX B tile (16 pairs × 16).
at::Tensor pack_pairs_bf16(const at::Tensor& m);
// s·Z·Mᵀ [T, r] fp32 from Z [T, K] (unit column stride) and M [r, K] (any strides), both bf16 or both fp32
// (tail_avx512_supported): the tail's broadcast shrink (bf16: 8 tokens × 16 ranks of VDPBF16PS accumulators;
// fp32: 6 tokens × 16 ranks × 4 partial sums of FMAs).
at::Tensor shrink_avx512(const at::Tensor& z, const at::Tensor& m, double scale);
void lora_backward_tail_avx512(at::Tensor* dx, const at::Tensor& x2, const at::Tensor& g2, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, double scale, at::Tensor* da, at::Tensor* db);
// Several adapters in one parallel pass (multi_lora_linear's backward): piece p covers rows [row0, row0 + rows) of
// x2, g2 and dx, with factors lora_a[factor] [r_f, K], lora_b[factor] [N, r_f] and scale[factor]; rows in no piece
// are left alone. da / db: one entry per factor (written in place when defined, else set; zero for a factor in no
// piece). One region instead of one per adapter: each call woke the OpenMP workers and drained the caches again.
struct TailPiece {
  int64_t factor, row0, rows;
};
void lora_backward_tail_multi_avx512(at::Tensor* dx, const at::Tensor& x2, const at::Tensor& g2,
                                     const std::vector<at::Tensor>& lora_a, const std::vector<at::Tensor>& lora_b,
                                     const std::vector<double>& scale, const std::vector<TailPiece>& pieces,
                                     std::vector<at::Tensor>* da, std::vector<at::Tensor>* db);

}  // namespace lowrank::cpu
