// Mixture of rank-1 experts LoRA, CPU (specification: lowrank/reference/rank1_experts_lora.py).
//   forward:  act = x·[A; R]ᵀ = [h | z]  (one skinny GEMM: the router rows stacked under lora_a)
//             per token (epilogue): top-k of the selection scores, gates g, u_tj = s·g_tj·h_{t,e_j}
//             y = x·Wᵀ + b (base GEMM, fresh output), then y_t += Σ_j u_tj·b_{e_j} in place (sparse expand)
//   backward: q = G·B [T, E];  dg_tj = s·h·q (+ grad of the returned gates), through the gate's softmax /
//             normalisation into dz (router) or dh (self); dh += s·g·q for the selected experts;
//             D = [dh | dz];  dx = G·W + D·[A; R];  d[A; R] = Dᵀ·x;  dB = Gᵀ·U (U: u scattered to [T, E]);
//             dW = Gᵀ·x.
// Why this order: the k-of-E expand touches k rows of Bᵀ per token, so it costs T·k·out instead of the dense
// masked form's T·E·out (8× less at E = 64, k = 8); it is a separate pass over y because oneDNN's K = E GEMM
// would do all E. The shrink of the selection scores cannot be sparse (every score is needed for top-k): under
// "self" it is x·Aᵀ itself; under "router" it is x·Rᵀ, and h = x·Aᵀ is formed at the k selected experts only
// (bf16 / fp32 from 64 tokens on AVX-512; elsewhere one product against [A; R], a view when the module keeps them
// in one buffer, else a copy of 2E·in elements). Products have fp32 results (the gating runs in fp32): at::mm for
// fp32/fp64, the AMX tile shrink for bf16, AVX512-BF16 dot products for ≤ 8 bf16 tokens, AVX512-BF16 broadcast dot
// products without AMX, a widened fp32 GEMM elsewhere (fp16, AVX2). The backward's rank products (q, dB and, for
// the router gate, D·[A; R] and Dᵀ·x) touch only the selected experts for bf16 / fp32 on AVX-512 from 128 tokens
// and (in + out) / 16 ("sparse backward" below); elsewhere (fp64, fp16, fewer tokens, CPUs without AVX-512) they
// are dense GEMMs over [T, E] matrices that are zero outside the selected experts.
#include <ATen/ATen.h>
#include <ATen/CPUFunctions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstring>
#include <tuple>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/rank1_experts_common.h"
#include "cpu/lowrank_kernels.h"
#include "cpu/masks.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define R1_HAVE_AVX512 1
#define R1_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#else
#define R1_HAVE_AVX512 0
#endif

namespace lowrank {
namespace {

using OptTensor = std::optional<at::Tensor>;

// ---- base GEMM ----------------------------------------------------------------------------------------------
// bf16 on AVX512-BF16 CPUs: oneDNN's linear (bias in the GEMM epilogue, beta = 0), measured 0.87–0.99× of
// F.linear for lora_linear on this CPU; elsewhere ATen's addmm / mm.
at::Tensor base_gemm(const at::Tensor& x2, const at::Tensor& weight, const OptTensor& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  if (x2.scalar_type() == at::kBFloat16 && cpu::onednn_linear_op() != nullptr && cpu::has_avx512_bf16() &&
      weight.is_contiguous()) {
    return cpu::onednn_linear(x2, weight, bias);
  }
  return has_bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
}

// [A; R] [2E, in]: a view when router directly follows lora_a in one buffer (Rank1ExpertsLinear's layout).
at::Tensor stacked_factors(const at::Tensor& lora_a, const OptTensor& router, bool use_router) {
  if (!use_router) return lora_a;
  const at::Tensor& r = *router;
  if (lora_a.is_contiguous() && r.is_contiguous() && lora_a.is_alias_of(r) &&
      r.storage_offset() == lora_a.storage_offset() + lora_a.numel()) {
    return lora_a.as_strided({2 * lora_a.size(0), lora_a.size(1)}, {lora_a.size(1), 1});
  }
  return at::cat({lora_a, r}, 0);
}

// act = x·Mᵀ accumulated AND returned in fp32 (fp64 for fp64): the specification computes the gating in fp32
// from the inputs as given, so that every backend selects the same experts (bf16-rounded scores would tie
// often and flip selections on one-ulp differences). bf16 on AMX: the tile shrink writes fp32 directly; on
// AVX512-BF16 the broadcast-dot shrink does; other reduced-precision cases widen x and M first (ATen's CPU GEMM has
// no bf16-in / fp32-out form).
at::Tensor activations(const at::Tensor& x2, const at::Tensor& m) {
  if (x2.scalar_type() == at::kFloat || x2.scalar_type() == at::kDouble) return at::mm(x2, m.t()).contiguous();
  // Up to 8 tokens: AVX512-BF16 dot products with fp32 results, reading M in place (the AMX shrink repacks all of
  // M per call: ~1 ms for [128, 4096], most of a decode step's overhead).
  if (x2.scalar_type() == at::kBFloat16 && cpu::decode_supported(x2, m)) {
    return cpu::decode_linear_bf16(x2, m, std::nullopt, std::nullopt, std::nullopt, at::kFloat);
  }
  if (x2.scalar_type() == at::kBFloat16 && cpu::rank_amx_supported(x2, m)) return cpu::shrink_amx(x2, m, 1.0);
  // AVX512-BF16 without AMX: broadcast dot products with fp32 sums (the widened fp32 GEMM took 2.8 ms + 0.4 ms of
  // widening at 2048×768 against [128, 768] on a Zen 4, half of the layer's base GEMM).
  if (x2.scalar_type() == at::kBFloat16 && cpu::rank_avx512_supported(x2, m)) return cpu::shrink_avx512(x2, m, 1.0);
  return at::mm(x2.to(at::kFloat), m.to(at::kFloat).t()).contiguous();
}

#if R1_HAVE_AVX512
// The k best of sel[0..Ep) (Ep a multiple of 16, padded with -inf; sel is consumed): k rounds of a vector max,
// the lowest index holding it (the selection rule: ties to the lower index), then that entry set to -inf. Same
// result as rank1_select (common/rank1_experts_math.h) for non-NaN scores.
R1_AVX512 void select_avx512(float* sel, int64_t Ep, int64_t k, int64_t* idx) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < k; ++j) {
    __m512 mx = ninf;
    for (int64_t c = 0; c < Ep; c += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sel + c));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    int64_t win = 0;
    for (int64_t c = 0; c < Ep; c += 16) {
      const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(sel + c), m, _CMP_EQ_OQ);
      if (eq) {
        win = c + __builtin_ctz(static_cast<unsigned>(eq));
        break;
      }
    }
    idx[j] = win;
    sel[win] = -std::numeric_limits<float>::infinity();
  }
}
#endif

// ---- epilogue: selection and gates --------------------------------------------------------------------------
// act [T, E] (self) or [T, 2E] ([h | z], router) in S; writes idx [T, k], gates [T, k] (post-threshold) and
// u [T, k] = s·g·h_sel.
template <typename S>
void select_and_gate(const at::Tensor& act, at::Tensor& prob, const OptTensor& router_bias, int64_t E,
                     int64_t k, bool router, double scaling, double temperature, std::optional<double> threshold,
                     at::Tensor& idx, at::Tensor& gates, at::Tensor& u) {
  const int64_t T = act.size(0), ld = act.size(1);
  const S* a = act.data_ptr<S>();
  S* pp = router ? prob.data_ptr<S>() : nullptr;
  at::Tensor rb;
  if (router && router_bias.has_value() && router_bias->defined()) rb = router_bias->to(act.scalar_type()).contiguous();
  const S* bp = rb.defined() ? rb.data_ptr<S>() : nullptr;
  int64_t* ip = idx.data_ptr<int64_t>();
  S* gp = gates.data_ptr<S>();
  S* up = u.data_ptr<S>();
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    // σ(z) for this chunk of tokens: ATen's vectorized CPU sigmoid kernel (as the reference's), run serially
    // inside this region rather than as a parallel op of its own. at::cpu:: calls the kernel directly, without a
    // dispatcher round trip whose thread-local state (inference mode) the worker threads do not carry.
    if (router) {
      at::Tensor chunk = prob.narrow(0, t0, t1 - t0);
      at::cpu::sigmoid_out(chunk, act.narrow(0, t0, t1 - t0).narrow(1, E, E));
    }
#if R1_HAVE_AVX512
    if constexpr (std::is_same_v<S, float>) {
      if (cpu::has_avx512_bf16()) {
        // Selection scores into a -inf padded buffer, then k rounds of a vector max (select_avx512): the scalar
        // insertion's data-dependent branches cost ~0.35 µs a token at E = 64, k = 8.
        const int64_t Ep = (E + 15) / 16 * 16;
        std::vector<float> sel(Ep, -std::numeric_limits<float>::infinity());
        for (int64_t t = t0; t < t1; ++t) {
          const float* h = a + t * ld;
          const float* p = router ? pp + t * E : nullptr;
          const float r = router ? 1.f : rank1_norm(h, E);
          for (int64_t e = 0; e < E; ++e) sel[e] = router ? p[e] + (bp ? bp[e] : 0.f) : h[e] / r;
          select_avx512(sel.data(), Ep, k, ip + t * k);
          rank1_finish_token(h, p, ip + t * k, k, router, r, scaling, temperature, threshold.has_value(),
                             threshold.value_or(0.0), gp + t * k, up + t * k);
        }
        return;
      }
    }
#endif
    for (int64_t t = t0; t < t1; ++t) {
      rank1_forward_token(a + t * ld, router ? pp + t * E : static_cast<const S*>(nullptr), bp, E, k, router, scaling,
                          temperature, threshold.has_value(), threshold.value_or(0.0), ip + t * k, gp + t * k,
                          up + t * k);
    }
  });
}

// σ(z) [T, E] contiguous for the router gate (undefined otherwise): ATen's vectorized sigmoid, as the reference's.
at::Tensor router_probs(const at::Tensor& act, int64_t E, bool router) {
  return router ? at::sigmoid(act.narrow(1, E, E)).contiguous() : at::Tensor();
}

// ---- sparse expand: y_t += Σ_j u_tj · b_{e_tj} -----------------------------------------------------------------
// Bᵀ is first widened once into an [E, out] buffer of the accumulation type (serially: E·out elements, 786 KB at
// E = 64, out = 3072, L2-resident), then the work runs over blocks of 64 tokens; inside a block, 64-column slab
// by slab, every token adds its k scaled rows of the slab (E·256 bytes, L1-resident) into its 64 columns, each y
// tile read and written once. Measured single-threaded, bf16, k = 8: walking one slab over all tokens strides
// y by a whole row (≥ 4 KB, past the hardware prefetcher) and ran at ~7 GB/s (3.5 ms at 2048×768×3072); a
// token-major walk over a full Bᵀ reads k rows per token from L2. The widening stays out of ATen's parallel
// copy: on this shared 2-core machine each extra parallel region can cost a scheduler time slice.
constexpr int64_t kSlab = 64;
constexpr int64_t kTokBlock = 64;

template <typename S>
at::Tensor widen_bt(const at::Tensor& lora_b, at::ScalarType acc) {
  const int64_t N = lora_b.size(0), E = lora_b.size(1), ld0 = lora_b.stride(0), ld1 = lora_b.stride(1);
  at::Tensor bt = at::empty({E, N}, lora_b.options().dtype(acc));
  S* o = bt.data_ptr<S>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lora_b.scalar_type(), "rank1_widen", [&] {
    const scalar_t* b = lora_b.data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t e = 0; e < E; ++e) o[e * N + n] = static_cast<S>(b[n * ld0 + e * ld1]);
  });
  return bt;
}

// Tokens [t0, t1) × columns [n0, n0 + cols); bt [E, N] (row stride N).
template <typename T, typename S>
void expand_tile_portable(T* yp, int64_t ldy, int64_t t0, int64_t t1, int64_t n0, int64_t cols, int64_t k,
                          const int64_t* ip, const S* up, const S* bt, int64_t N) {
  S row[kSlab];
  for (int64_t t = t0; t < t1; ++t) {
    T* yr = yp + t * ldy + n0;
    for (int64_t c = 0; c < cols; ++c) row[c] = static_cast<S>(yr[c]);
    for (int64_t j = 0; j < k; ++j) {
      const S w = up[t * k + j];
      const S* b = bt + ip[t * k + j] * N + n0;
      for (int64_t c = 0; c < cols; ++c) row[c] += w * b[c];
    }
    for (int64_t c = 0; c < cols; ++c) yr[c] = static_cast<T>(row[c]);
  }
}

#if R1_HAVE_AVX512
R1_AVX512 inline __m512 ld16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
R1_AVX512 inline __m512 ld16(const c10::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
R1_AVX512 inline void st16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
R1_AVX512 inline void st16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));  // round to nearest even
}

// The same tile with the 64 columns of a token in four AVX-512 registers.
template <typename T>
R1_AVX512 void expand_tile_avx512(T* yp, int64_t ldy, int64_t t0, int64_t t1, int64_t n0, int64_t cols, int64_t k,
                                  const int64_t* ip, const float* up, const float* bt, int64_t N) {
  __mmask16 m[4];
  for (int v = 0; v < 4; ++v) m[v] = cpu::mask16(cols - 16 * v);
  for (int64_t t = t0; t < t1; ++t) {
    T* yr = yp + t * ldy + n0;
    __m512 acc[4];
    for (int v = 0; v < 4; ++v) acc[v] = ld16(yr + 16 * v, m[v]);
    for (int64_t j = 0; j < k; ++j) {
      const __m512 w = _mm512_set1_ps(up[t * k + j]);
      const float* b = bt + ip[t * k + j] * N + n0;
      for (int v = 0; v < 4; ++v) acc[v] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m[v], b + 16 * v), acc[v]);
    }
    for (int v = 0; v < 4; ++v) st16(yr + 16 * v, acc[v], m[v]);
  }
}
#endif

template <typename S>
void expand_tile(at::Tensor& y, int64_t t0, int64_t t1, int64_t n0, int64_t cols, int64_t k, const int64_t* ip,
                 const S* up, const S* bt, int64_t N, bool avx) {
  const int64_t ldy = y.stride(0);
#if R1_HAVE_AVX512
  if constexpr (std::is_same_v<S, float>) {
    if (avx && y.scalar_type() == at::kFloat) {
      return expand_tile_avx512<float>(y.data_ptr<float>(), ldy, t0, t1, n0, cols, k, ip, up, bt, N);
    }
    if (avx) {
      return expand_tile_avx512<c10::BFloat16>(y.data_ptr<c10::BFloat16>(), ldy, t0, t1, n0, cols, k, ip, up, bt, N);
    }
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "rank1_expand", [&] {
    expand_tile_portable<scalar_t, S>(y.data_ptr<scalar_t>(), ldy, t0, t1, n0, cols, k, ip, up, bt, N);
  });
}

// Few tokens (T·k ≤ 2E): widening all of Bᵀ would cost more than the expand itself (E·out conversions for T·k·out
// multiply-adds), so each output row n reads its row of B in place (E contiguous elements) for every token.
template <typename T, typename S>
void expand_direct(at::Tensor& y, const int64_t* ip, const S* up, const at::Tensor& lora_b, int64_t k) {
  const int64_t Tn = y.size(0), N = y.size(1), ldy = y.stride(0), ld0 = lora_b.stride(0), ld1 = lora_b.stride(1);
  T* yp = y.data_ptr<T>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lora_b.scalar_type(), "rank1_expand_direct", [&] {
    const scalar_t* b = lora_b.data_ptr<scalar_t>();
    at::parallel_for(0, N, 512, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const scalar_t* bn = b + n * ld0;
        for (int64_t t = 0; t < Tn; ++t) {
          S acc = static_cast<S>(yp[t * ldy + n]);
          for (int64_t j = 0; j < k; ++j) acc += up[t * k + j] * static_cast<S>(bn[ip[t * k + j] * ld1]);
          yp[t * ldy + n] = static_cast<T>(acc);
        }
      }
    });
  });
}

void expand_sparse_bt_(at::Tensor& y, const at::Tensor& idx, const at::Tensor& u, const at::Tensor& btt);

void expand_sparse_(at::Tensor& y, const at::Tensor& idx, const at::Tensor& u, const at::Tensor& lora_b) {
  const int64_t Tn = y.size(0), k = idx.size(1);
  if (Tn == 0) return;
  TORCH_CHECK(y.stride(1) == 1 && idx.is_contiguous() && u.is_contiguous(), "rank1 expand: bad layout");
  const int64_t* ip = idx.data_ptr<int64_t>();
  if (Tn * k <= 2 * lora_b.size(1)) {
    AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "rank1_expand_direct_acc", [&] {
      using S = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "rank1_expand_direct_y", [&] {
        expand_direct<scalar_t, S>(y, ip, u.data_ptr<S>(), lora_b, k);
      });
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "rank1_expand_widen", [&] {
    expand_sparse_bt_(y, idx, u, widen_bt<scalar_t>(lora_b, u.scalar_type()));
  });
}

// y_t += Σ_j u_tj · bt[idx_tj] with bt [E', N] already in u's dtype (contiguous rows).
void expand_sparse_bt_(at::Tensor& y, const at::Tensor& idx, const at::Tensor& u, const at::Tensor& btt) {
  const int64_t Tn = y.size(0), N = y.size(1), k = idx.size(1);
  if (Tn == 0) return;
  TORCH_CHECK(y.stride(1) == 1 && idx.is_contiguous() && u.is_contiguous() && btt.is_contiguous() &&
                  btt.scalar_type() == u.scalar_type() && btt.size(1) == N,
              "rank1 expand: bad layout");
  const int64_t* ip = idx.data_ptr<int64_t>();
  const bool avx = R1_HAVE_AVX512 && cpu::has_avx512_bf16() && u.scalar_type() == at::kFloat &&
                   (y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "rank1_expand_acc", [&] {
    using S = scalar_t;
    const S* bt = btt.data_ptr<S>();
    const S* up = u.data_ptr<S>();
    at::parallel_for(0, (Tn + kTokBlock - 1) / kTokBlock, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t t0 = blk * kTokBlock, t1 = std::min(Tn, t0 + kTokBlock);
        for (int64_t n0 = 0; n0 < N; n0 += kSlab) {
          expand_tile<S>(y, t0, t1, n0, std::min(kSlab, N - n0), k, ip, up, bt, N, avx);
        }
      }
    });
  });
}

// ---- packed layout: [x | U] -----------------------------------------------------------------------------------
// weight and lora_b as the column blocks of one [out, in + E] buffer (cpu::joint_weight), bf16, oneDNN available:
// y = [x | U]·[W | B]ᵀ + b with U [T, E] = u scattered (zero outside the selected experts, rounded to bf16 as the
// unfused layer rounds u). Costs a copy of x and E/in more GEMM work (8% at in = 768, 1.6% at 4096) instead of
// the separate expand pass over y (measured 3.4 ms of a 7.5 ms base GEMM at 2048×768×3072, 1 thread).
// Measured 1 thread, E = 64, k = 8, ratio to F.linear packed / unpacked: 1.65 / 1.73 at 2048×768×768, 1.29 / 1.76
// at 2048×768×3072, 1.04 / 1.17 at 512×4096×4096; at 8×4096×4096 1.40 / 1.26, yet the packed module's strided W
// block made the unpacked path slower still (ATen's addmm instead of oneDNN): 1.88. So packed layers take the
// fused GEMM from kFusedMinT tokens on, and up to kDecodeMaxT tokens the one-pass decode kernel (bias + x·Wᵀ +
// U·Bᵀ over W and B in place, cpu::decode_linear_bf16), whatever the layout, up to cpu::fused_decode_max_tokens()
// (8 without AMX), and the fused GEMM the rest.
constexpr int64_t kFusedMinT = 5;

bool fused_supported(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& lora_b) {
  return x2.size(0) >= kFusedMinT && x2.scalar_type() == at::kBFloat16 && x2.stride(1) == 1 &&
         cpu::onednn_linear_op() != nullptr && cpu::has_avx512_bf16() && weight.stride(1) == 1 &&
         lora_b.stride(1) == 1;
}

at::Tensor augmented(const at::Tensor& x2, const at::Tensor& idx, const at::Tensor& u, int64_t E) {
  const int64_t T = x2.size(0), in = x2.size(1), k = idx.size(1), ldx = x2.stride(0);
  at::Tensor xa = at::empty({T, in + E}, x2.options());
  const c10::BFloat16* xp = x2.const_data_ptr<c10::BFloat16>();
  c10::BFloat16* op = xa.mutable_data_ptr<c10::BFloat16>();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const float* up = u.const_data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      c10::BFloat16* row = op + t * (in + E);
      std::memcpy(row, xp + t * ldx, in * sizeof(c10::BFloat16));
      std::fill(row + in, row + in + E, c10::BFloat16(0.f));
      for (int64_t j = 0; j < k; ++j) row[in + ip[t * k + j]] = c10::BFloat16(up[t * k + j]);
    }
  });
  return xa;
}

at::ScalarType gate_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// From this many tokens the router gate's h is formed at the selected experts only (below, the decode kernels'
// one product against [A; R] serves).
constexpr int64_t kSparseHMinT = 64;

bool sparse_kernels_supported(const at::Tensor& x2, const at::Tensor& g2);
at::Tensor selected_dots(const at::Tensor& src, const at::Tensor& rows, const at::Tensor& idx);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rank1_experts_lora_cpu(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const OptTensor& router, const OptTensor& router_bias, int64_t top_k, double scaling,
    c10::string_view gate, double temperature, std::optional<double> threshold) {
  const bool use_router = rank1_is_router(std::string_view(gate.data(), gate.size()));
  check_rank1_experts_args(x, weight, bias, lora_a, lora_b, router, router_bias, top_k, use_router, temperature);
  const int64_t in = weight.size(1), out = weight.size(0), E = lora_a.size(0);
  const at::Tensor x2 = x.reshape({-1, in});
  const int64_t T = x2.size(0);
  const auto gd = gate_dtype(x);
  // Router gate, bf16 / fp32 from kSparseHMinT tokens on AVX-512: selection reads only the router scores z, so
  // h = x·Aᵀ is formed at the k selected experts only (T·k·in multiply-adds instead of T·E·in; act holds h there
  // and zeros elsewhere: the backward reads the router gate's h at the selected experts only).
  const bool sparse_h = use_router && gd == at::kFloat && T >= kSparseHMinT && sparse_kernels_supported(x2, x2);
  at::Tensor act;
  if (sparse_h) {
    act = at::zeros({T, 2 * E}, x.options().dtype(gd));
    act.narrow(1, E, E).copy_(activations(x2, *router));
  } else {
    act = T > 0 ? activations(x2, stacked_factors(lora_a, router, use_router))
                : at::empty({0, use_router ? 2 * E : E}, x.options().dtype(gd));
  }
  at::Tensor prob = use_router ? at::empty({T, E}, act.options()) : at::Tensor();  // σ(z), filled by the epilogue
  at::Tensor idx = at::empty({T, top_k}, x.options().dtype(at::kLong));
  at::Tensor gates = at::empty({T, top_k}, x.options().dtype(gd));
  at::Tensor u = at::empty({T, top_k}, x.options().dtype(gd));
  AT_DISPATCH_FLOATING_TYPES(gd, "rank1_gates", [&] {
    select_and_gate<scalar_t>(act, prob, router_bias, E, top_k, use_router, scaling, temperature, threshold, idx,
                              gates, u);
  });
  if (sparse_h) {
    // u was formed from h = 0; the gates (post-threshold) are final: u = s·g·h_sel.
    const at::Tensor hs = selected_dots(x2, lora_a.contiguous(), idx);
    act.narrow(1, 0, E).scatter_(1, idx, hs);
    u = hs.mul_(gates).mul_(scaling);
  }
  at::Tensor y;
  const at::Tensor wj = fused_supported(x2, weight, lora_b) ? cpu::joint_weight(weight, lora_b) : at::Tensor();
  if (T > 0 && T <= cpu::fused_decode_max_tokens() && cpu::decode_supported(x2, weight) &&
      lora_b.stride(1) == 1) {
    at::Tensor ud = at::zeros({T, E}, u.options());
    ud.scatter_(1, idx, u);
    y = cpu::decode_linear_bf16(x2, weight, bias, ud.to(at::kBFloat16), lora_b, at::kBFloat16);
  } else if (wj.defined() && T > 0) {
    // Packed layout (Rank1ExpertsLinear's default for bf16): [x | U]·[W | B]ᵀ + b is the whole layer as one
    // oneDNN GEMM of K = in + E, the expand inside its micro-kernel instead of a pass over y.
    const at::Tensor xa = augmented(x2, idx, u, E);
    // 5–16 tokens on AMX: one pass over [W | B] on the tile unit (cpu/skinny_amx.cpp), as lora_linear's packed
    // layer does there; else oneDNN.
    y = cpu::skinny_supported(T, wj) ? cpu::skinny_linear_amx(xa, wj, bias) : base_gemm(xa, wj, bias);
  } else {
    y = base_gemm(x2, weight, bias);
    expand_sparse_(y, idx, u, lora_b);
  }
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  auto with = [&](int64_t last) {
    std::vector<int64_t> s = lead;
    s.push_back(last);
    return s;
  };
  return {y.view(with(out)), idx.view(with(top_k)), gates.view(with(top_k)), act};
}

// ---- sparse backward (router and self gates; bf16 / fp32 on AVX-512) -------------------------------------------
// The dense backward multiplies [T, E] matrices that hold k nonzeros a row: q = G·B, dB = Gᵀ·U and, for the router
// gate, D·[A; R] and Dᵀ·x (D = [dh | dz], nonzero at the selected experts only). Here each of them touches only the
// k selected experts of a token: T·k·(2·out + 4·in) multiply-adds instead of T·E·(2·out + 4·in), 8× fewer at
// E = 64, k = 8 (the self gate's dh is dense through its L2 norm, so D·A and Dᵀ·x stay dense GEMMs there). Sums in
// fp32 from the inputs as given (no bf16 rounding of u, D or q on the way: the dense path rounds D and U to bf16
// before its GEMMs, the reference rounds u).
//   q_tj = g_t·b_ej: token-major dot products (a token's k rows of Bᵀ from L2, sums in registers);
//   dBᵀ_e = Σ_{t ∋ e} u_te·g_t and d[A; R]_e = Σ_{t ∋ e} (dh_te, dz_te)·x_t: expert-major. The (token, coefficient)
//   pairs are bucketed by expert (a counting sort of the T·k selections), then each work item (expert, 128-column
//   slab) sums its bucket's rows of g or x in registers and writes its output slab once. Token-major updates of
//   the [E, N] accumulators instead (load, FMA, store per token and expert) ran at ~11 cycles per 16 columns,
//   bound by L2 traffic to rows picked at random: 5 ms for d[A; R] at 2048×768, 1 thread.
// Work items go slab-major, so the rows of one 128-column slab of g or x (T·256 bytes in bf16) stay in L2 while the
// experts' buckets read them.
constexpr int64_t kSlabCols = 128;  // 8 zmm accumulators a row

#if R1_HAVE_AVX512
// One token, experts j0 .. j0 + JN of its selection: q_j = g_t·bt[e_j] over [0, N). fp32: FMAs; bf16: VDPBF16PS on
// column pairs (exact products, fp32 sums, no conversions).
template <int JN, typename T>
R1_AVX512 inline void q_token(const T* gr, int64_t N, const int64_t* ids, const T* bt, float* q) {
  __m512 qa[JN];
  const T* brow[JN];
  for (int j = 0; j < JN; ++j) {
    qa[j] = _mm512_setzero_ps();
    brow[j] = bt + ids[j] * N;
  }
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (int64_t c = 0; c < N; c += 32) {
      const __mmask32 m = cpu::mask32(N - c);
      const __m512bh gv = (__m512bh)_mm512_maskz_loadu_epi16(m, gr + c);
      for (int j = 0; j < JN; ++j) {
        qa[j] = _mm512_dpbf16_ps(qa[j], gv, (__m512bh)_mm512_maskz_loadu_epi16(m, brow[j] + c));
      }
    }
  } else {
    for (int64_t c = 0; c < N; c += 16) {
      const __mmask16 m = cpu::mask16(N - c);
      const __m512 gv = ld16(gr + c, m);
      for (int j = 0; j < JN; ++j) qa[j] = _mm512_fmadd_ps(gv, ld16(brow[j] + c, m), qa[j]);
    }
  }
  for (int j = 0; j < JN; ++j) q[j] = _mm512_reduce_add_ps(qa[j]);
}

template <typename T>
R1_AVX512 void q_token_any(const T* gr, int64_t N, const int64_t* ids, int64_t k, const T* bt, float* q) {
  for (int64_t j0 = 0; j0 < k; j0 += 8) {
    const int64_t* i = ids + j0;
    switch (std::min<int64_t>(8, k - j0)) {
      case 8: q_token<8>(gr, N, i, bt, q + j0); break;
      case 7: q_token<7>(gr, N, i, bt, q + j0); break;
      case 6: q_token<6>(gr, N, i, bt, q + j0); break;
      case 5: q_token<5>(gr, N, i, bt, q + j0); break;
      case 4: q_token<4>(gr, N, i, bt, q + j0); break;
      case 3: q_token<3>(gr, N, i, bt, q + j0); break;
      case 2: q_token<2>(gr, N, i, bt, q + j0); break;
      default: q_token<1>(gr, N, i, bt, q + j0); break;
    }
  }
}

// out_r[c0 : c0 + cols] = Σ_i coef_r[i]·src[tok[i]][c0 : c0 + cols] for NR output rows sharing the source rows
// (NR = 2: dA and dR from one read of x), cols ≤ kSlabCols, sums in registers: two accumulators per 32 columns and
// output row. fp32 rows: columns 0–15 and 16–31 of each 32. bf16 rows: 32 columns a load, widened without a
// shuffle: as 32-bit lanes, (v << 16) is the even columns and (v & 0xFFFF0000) the odd ones, exactly, in fp32; the
// even and odd sums are interleaved back once, at the store.
template <int NR, typename T>
R1_AVX512 void bucket_slab(const T* src, int64_t ld, int64_t c0, int64_t cols, const int64_t* tok,
                           const float* const* coef, int64_t count, float* const* out) {
  constexpr int NL = kSlabCols / 32;
  constexpr bool f32 = std::is_same_v<T, float>;
  // Column masks of the two halves of each 32 (lo: columns 0–15 / even, hi: 16–31 / odd) and of the bf16 load.
  __mmask16 m0[NL], m1[NL];
  __mmask32 m32[NL];
  for (int v = 0; v < NL; ++v) {
    const int64_t c = cols - 32 * v;
    m0[v] = cpu::mask16(c);
    m1[v] = cpu::mask16(c - 16);
    m32[v] = cpu::mask32(c);
  }
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 s0[NR][NL], s1[NR][NL];
#pragma GCC unroll 2
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NL; ++v) s0[r][v] = s1[r][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < count; ++i) {
    const T* row = src + tok[i] * ld + c0;
    if (i + 2 < count) _mm_prefetch(reinterpret_cast<const char*>(src + tok[i + 2] * ld + c0), _MM_HINT_T0);
    __m512 cf[NR];
    for (int r = 0; r < NR; ++r) cf[r] = _mm512_set1_ps(coef[r][i]);
#pragma GCC unroll 4
    for (int v = 0; v < NL; ++v) {
      __m512 x0, x1;
      if constexpr (f32) {
        x0 = _mm512_maskz_loadu_ps(m0[v], row + 32 * v);
        x1 = _mm512_maskz_loadu_ps(m1[v], row + 32 * v + 16);
      } else {
        const __m512i xv = _mm512_maskz_loadu_epi16(m32[v], row + 32 * v);
        x0 = _mm512_castsi512_ps(_mm512_slli_epi32(xv, 16));
        x1 = _mm512_castsi512_ps(_mm512_and_si512(xv, hi));
      }
#pragma GCC unroll 2
      for (int r = 0; r < NR; ++r) {
        s0[r][v] = _mm512_fmadd_ps(cf[r], x0, s0[r][v]);
        s1[r][v] = _mm512_fmadd_ps(cf[r], x1, s1[r][v]);
      }
    }
  }
  // bf16: lane i of s0 / s1 is column 2i / 2i + 1 of the 32; interleave into columns 0–15 and 16–31.
  const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  // (No early exit below: an array indexed past a data-dependent break stays in memory, and GCC then spills every
  // accumulator on every token.)
#pragma GCC unroll 2
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NL; ++v) {
      float* o = out[r] + c0 + 32 * v;
      const __m512 a = f32 ? s0[r][v] : _mm512_permutex2var_ps(s0[r][v], lo_idx, s1[r][v]);
      const __m512 b = f32 ? s1[r][v] : _mm512_permutex2var_ps(s0[r][v], hi_idx, s1[r][v]);
      _mm512_mask_storeu_ps(o, m0[v], a);
      _mm512_mask_storeu_ps(o + 16, m1[v], b);
    }
  }
}
#endif

// The AVX-512 kernels below (dot passes, buckets): bf16 / fp32 rows with unit column stride.
bool sparse_kernels_supported(const at::Tensor& x2, const at::Tensor& g2) {
  return R1_HAVE_AVX512 && cpu::has_avx512_bf16() &&
         (x2.scalar_type() == at::kFloat || x2.scalar_type() == at::kBFloat16) && x2.stride(1) == 1 &&
         g2.stride(1) == 1;
}

// When the sparse backward beats the dense one. Its fixed work (Bᵀ transposed, [A; R] widened, E·(in + out)
// outputs written slab by slab) is paid once a call, and the dense [T, E] GEMMs stay efficient for few tokens of
// wide layers. Measured, router gate, bf16, 2 threads, whole backward sparse vs dense: 4096²: 8 tokens 3.2 vs 2.6
// ms, 64: 10.1 vs 8.6, 256: 27.6 vs 26.6, 384: 37.8 vs 37.1, 512: 46.2 vs 48.2; 768²: 64 tokens 0.85 vs 0.64, 128:
// 1.04 vs 1.00, 256: 1.46 vs 2.58; 768×3072: 128 tokens 2.18 vs 2.80, 256: 3.75 vs 4.76. Hence from 128 tokens
// and from (in + out) / 16.
constexpr int64_t kSparseMinT = 128;

bool sparse_backward_supported(const at::Tensor& x2, const at::Tensor& g2) {
  const int64_t T = x2.size(0);
  return T >= kSparseMinT && 16 * T >= x2.size(1) + g2.size(1) && sparse_kernels_supported(x2, g2);
}

// The T·k selections bucketed by expert (counting sort, tokens ascending within a bucket): start [E + 1] and, in
// bucket order, the token and the flat selection index t·k + j.
struct Buckets {
  std::vector<int64_t> start, tok, sel;
};

Buckets bucket_by_expert(const at::Tensor& idx, int64_t E) {
  const int64_t T = idx.size(0), k = idx.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  Buckets b;
  b.start.assign(E + 1, 0);
  for (int64_t i = 0; i < T * k; ++i) ++b.start[ip[i] + 1];
  for (int64_t e = 0; e < E; ++e) b.start[e + 1] += b.start[e];
  std::vector<int64_t> fill(b.start.begin(), b.start.end() - 1);
  b.tok.resize(T * k);
  b.sel.resize(T * k);
  for (int64_t i = 0; i < T * k; ++i) {
    const int64_t p = fill[ip[i]]++;
    b.tok[p] = i / k;
    b.sel[p] = i;
  }
  return b;
}

// out_r [E, N] (fp32, r < nr) with out_r[e] = Σ_{(t, i) in bucket e} coef_r[i]·src[t]; coef_r indexed by the flat
// selection index t·k + j. Work items (slab, expert) run slab-major.
void bucket_reduce(const at::Tensor& src, const Buckets& b, const std::vector<const float*>& coef,
                   const std::vector<float*>& out, int64_t E) {
#if R1_HAVE_AVX512
  const int64_t N = src.size(1), ld = src.stride(0), nr = static_cast<int64_t>(coef.size());
  const int64_t slabs = (N + kSlabCols - 1) / kSlabCols, n_all = static_cast<int64_t>(b.sel.size());
  // The coefficients in bucket order, once (every slab of an expert reads the same ones).
  std::vector<float> cb(nr * n_all);
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t i = 0; i < n_all; ++i) cb[r * n_all + i] = coef[r][b.sel[i]];
  at::parallel_for(0, slabs * E, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t s = w / E, e = w % E, c0 = s * kSlabCols, cols = std::min(kSlabCols, N - c0);
      const int64_t p0 = b.start[e], n = b.start[e + 1] - p0;
      const float* cp[2] = {cb.data() + p0, nr == 2 ? cb.data() + n_all + p0 : nullptr};
      float* op[2] = {out[0] + e * N, nr == 2 ? out[1] + e * N : nullptr};
      const int64_t* tok = b.tok.data() + p0;
      if (src.scalar_type() == at::kBFloat16) {
        const auto* sp = src.data_ptr<c10::BFloat16>();
        nr == 2 ? bucket_slab<2>(sp, ld, c0, cols, tok, cp, n, op) : bucket_slab<1>(sp, ld, c0, cols, tok, cp, n, op);
      } else {
        const auto* sp = src.data_ptr<float>();
        nr == 2 ? bucket_slab<2>(sp, ld, c0, cols, tok, cp, n, op) : bucket_slab<1>(sp, ld, c0, cols, tok, cp, n, op);
      }
    }
  });
#endif
}

// d [T, k]: d_tj = src_t·rows[idx_tj] (rows [R, N] contiguous, src's dtype), token-major, fp32 sums. Needs
// sparse_kernels_supported.
at::Tensor selected_dots(const at::Tensor& src, const at::Tensor& rows, const at::Tensor& idx) {
  const int64_t T = src.size(0), N = src.size(1), k = idx.size(1);
  at::Tensor d = at::empty({T, k}, src.options().dtype(at::kFloat));
#if R1_HAVE_AVX512
  TORCH_CHECK(rows.is_contiguous() && rows.scalar_type() == src.scalar_type() && rows.size(1) == N,
              "rank1 selected_dots: bad layout");
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* dp = d.data_ptr<float>();
  const int64_t ld = src.stride(0);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (src.scalar_type() == at::kBFloat16) {
        q_token_any(src.data_ptr<c10::BFloat16>() + t * ld, N, ip + t * k, k, rows.data_ptr<c10::BFloat16>(),
                    dp + t * k);
      } else {
        q_token_any(src.data_ptr<float>() + t * ld, N, ip + t * k, k, rows.data_ptr<float>(), dp + t * k);
      }
    }
  });
#endif
  return d;
}

// q [T, E] (zero but at the selected experts, the only entries gate_backward reads): q_tj = g_t·b_ej.
at::Tensor sparse_q(const at::Tensor& g2, const at::Tensor& lora_b, const at::Tensor& idx, int64_t E) {
  const at::Tensor qs = selected_dots(g2, lora_b.t().contiguous(), idx);
  return at::zeros({g2.size(0), E}, qs.options()).scatter_(1, idx, qs);
}

// ---- backward -----------------------------------------------------------------------------------------------
// From act, idx, q = G·B [T, E] (S) and the returned gates' gradient: D = [dh | dz] [T, E or 2E] and
// U [T, E] (u scattered), both in S.
template <typename S>
void gate_backward(const at::Tensor& act, const at::Tensor& prob, const at::Tensor& idx, const at::Tensor& q,
                   const OptTensor& grad_gates,
                   int64_t E, bool router, double scaling, double temperature, std::optional<double> threshold,
                   at::Tensor& D, at::Tensor& U) {
  const int64_t T = act.size(0), k = idx.size(1), ld = act.size(1);
  const S* a = act.data_ptr<S>();
  const S* pp = router ? prob.data_ptr<S>() : nullptr;
  const int64_t* ip = idx.data_ptr<int64_t>();
  const S* qp = q.data_ptr<S>();
  at::Tensor gg;
  if (grad_gates.has_value() && grad_gates->defined()) {
    gg = grad_gates->reshape({T, k}).to(act.scalar_type()).contiguous();
  }
  const S* ggp = gg.defined() ? gg.data_ptr<S>() : nullptr;
  S* dp = D.data_ptr<S>();
  S* Up = U.data_ptr<S>();
  const int64_t ldd = D.size(1);
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    std::vector<S> g(k), dg(k);
    for (int64_t t = t0; t < t1; ++t) {
      S* dh = dp + t * ldd;
      rank1_backward_token(a + t * ld, router ? pp + t * E : static_cast<const S*>(nullptr), E, ip + t * k, k,
                           qp + t * E, ggp ? ggp + t * k : static_cast<const S*>(nullptr), router, scaling,
                           temperature, threshold.has_value(), threshold.value_or(0.0), g.data(), dg.data(), dh,
                           router ? dh + E : static_cast<S*>(nullptr), Up + t * E);
    }
  });
}

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor> rank1_experts_lora_backward_cpu(
    const at::Tensor& grad_y, const OptTensor& grad_gates, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const OptTensor& router, const at::Tensor& indices,
    const at::Tensor& act, double scaling, c10::string_view gate, double temperature,
    std::optional<double> threshold, std::array<bool, 5> mask) {
  const bool use_router = rank1_is_router(std::string_view(gate.data(), gate.size()));
  const int64_t k = indices.size(-1);
  check_rank1_experts_args(x, weight, std::nullopt, lora_a, lora_b, router, std::nullopt, k, use_router, temperature);
  const int64_t in = weight.size(1), out = weight.size(0), E = lora_a.size(0);
  const auto dt = x.scalar_type();
  const auto gd = gate_dtype(x);
  LOWRANK_CHECK_SAME_DTYPE(grad_y, x, "rank1_experts_lora_backward: grad_y", "x");
  const at::Tensor g2 = grad_y.reshape({-1, out});
  const at::Tensor x2 = x.reshape({-1, in});
  const int64_t T = x2.size(0);
  TORCH_CHECK_VALUE(g2.size(0) == T && act.dim() == 2 && act.size(0) == T &&
                        act.size(1) == (use_router ? 2 * E : E) && indices.numel() == T * k,
                    "rank1_experts_lora_backward: grad_y, indices or act do not match x");
  const at::Tensor ar = stacked_factors(lora_a, router, use_router);
  at::Tensor D = at::zeros({T, use_router ? 2 * E : E}, x.options().dtype(gd));
  at::Tensor U = at::zeros({T, E}, x.options().dtype(gd));
  const at::Tensor idx = indices.reshape({T, k}).contiguous();
  // bf16 / fp32 on AVX-512: q, dB and (router) dx's rank part and d[A; R] over the selected experts only.
  const bool sparse = T > 0 && gd == at::kFloat && sparse_backward_supported(x2, g2);
  if (T > 0) {
    const at::Tensor a = act.to(gd).contiguous();
    const at::Tensor prob = router_probs(a, E, use_router);
    at::Tensor q;
    if (sparse) {
      q = sparse_q(g2, lora_b, idx, E);
    } else {
      // The rank products stay with ATen (oneDNN): the AMX tile kernels lora_linear uses for r = 16 measured
      // slower here at E = 64 (fwd+bwd bf16 2048×768×768 and 512×4096×4096: 0.96–1.08× of the dense peer against
      // 0.70–0.93×).
      q = at::mm(g2, lora_b).to(gd).contiguous();  // G·B [T, E]
    }
    AT_DISPATCH_FLOATING_TYPES(gd, "rank1_gate_backward", [&] {
      gate_backward<scalar_t>(a, prob, idx, q, grad_gates, E, use_router, scaling, temperature, threshold, D, U);
    });
  }
  // bf16, 1–8 tokens, no AMX: g·W as one fp32 pass over W (cpu::decode_nn_bf16; oneDNN's GEMM of this form runs
  // at a third of the memory floor on Zen 4), D·[A; R] added in fp32, one rounding.
  OptTensor dx;
  if (mask[0] && T > 0 && dt == at::kBFloat16 && !cpu::has_amx_bf16() && cpu::decode_nn_supported(g2, weight)) {
    at::Tensor d = cpu::decode_nn_bf16(g2, weight);
    d.addmm_(D.to(at::kFloat), ar.to(at::kFloat));
    dx = d.to(dt).view(x.sizes());
    mask[0] = false;
  }
  if (!sparse) {
    const auto d = rank1_backward_products(D, U, g2, x2, weight, ar, E, use_router, mask, x.sizes(), dt);
    return {dx.has_value() ? dx : d[0], d[1], d[2], d[3], d[4]};
  }
  const Buckets bk = bucket_by_expert(idx, E);
  OptTensor dB;
  if (mask[3]) {
    const at::Tensor u = U.gather(1, idx);  // [T, k] s·g·h_sel, as gate_backward formed it
    at::Tensor dbt = at::empty({E, out}, u.options());  // dBᵀ
    bucket_reduce(g2, bk, {u.data_ptr<float>()}, {dbt.data_ptr<float>()}, E);
    dB = dbt.t().to(dt).contiguous();
  }
  if (!use_router) {
    // Self gate: dh is dense (the L2 norm couples all ranks), so D·A and Dᵀ·x stay dense GEMMs.
    mask[3] = false;
    const auto d = rank1_backward_products(D, U, g2, x2, weight, ar, E, use_router, mask, x.sizes(), dt);
    return {dx.has_value() ? dx : d[0], d[1], d[2], dB, d[4]};
  }
  OptTensor dW, dA, dR;
  // D's nonzeros: dh at e_j (column e_j) and dz at e_j (column E + e_j), as [T, 2k] (row of [A; R], coefficient).
  const at::Tensor rows = at::cat({idx, idx + E}, 1).contiguous();
  const at::Tensor coef = D.gather(1, rows).contiguous();
  if (mask[2] || mask[4]) {
    const at::Tensor dh = coef.narrow(1, 0, k).contiguous(), dz = coef.narrow(1, k, k).contiguous();
    at::Tensor dar = at::empty({2 * E, in}, coef.options());
    bucket_reduce(x2, bk, {dh.data_ptr<float>(), dz.data_ptr<float>()},
                  {dar.data_ptr<float>(), dar.data_ptr<float>() + E * in}, E);
    // Separate tensors: the two outputs of one op must not share storage.
    if (mask[2]) dA = dar.narrow(0, 0, E).to(dt, /*non_blocking=*/false, /*copy=*/true);
    if (mask[4]) dR = dar.narrow(0, E, E).to(dt, /*non_blocking=*/false, /*copy=*/true);
  }
  if (mask[0]) {
    // dx = g·W (a fresh output), then += Σ_j dh_tj·a_ej + dz_tj·r_ej in one pass over it.
    at::Tensor d = at::mm(g2, weight);
    expand_sparse_bt_(d, rows, coef, ar.to(at::kFloat).contiguous());
    dx = d.view(x.sizes());
  }
  if (mask[1]) dW = at::mm(g2.t(), x2);
  return {dx, dW, dA, dB, dR};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("rank1_experts_lora", &rank1_experts_lora_cpu);
  m.impl("rank1_experts_lora_backward", &rank1_experts_lora_backward_cpu);
}

}  // namespace lowrank
