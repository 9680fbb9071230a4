// See lowrank_kernels.h for what these compute and why.
#include "cpu/lowrank_kernels.h"
#include "cpu/masks.h"
#include "cpu/isa.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LOWRANK_HAVE_AVX512_KERNELS 1
#define LOWRANK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#else
#define LOWRANK_HAVE_AVX512_KERNELS 0
#endif

namespace lowrank::cpu {
namespace {

constexpr int64_t L = 16;   // fp32 lanes of an AVX-512 register
constexpr int64_t RB = 4;   // rows of a register tile
constexpr int64_t CV = 4;   // registers per tile row (64 columns)
constexpr int kDecodeMaxT = 8;  // most tokens the decode kernel takes (see decode_supported for why)

}  // namespace

const c10::OperatorHandle* onednn_linear_op() {
  static const c10::OperatorHandle* op = [] {
    auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    return h.has_value() ? new c10::OperatorHandle(*h) : nullptr;
  }();
  return op;
}

at::Tensor onednn_linear(const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_INTERNAL_ASSERT(onednn_linear_op() != nullptr && w.is_contiguous(), "onednn_linear: unavailable or strided w");
  torch::jit::Stack stack{x2.contiguous(), w, bias, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                          c10::IValue()};
  onednn_linear_op()->callBoxed(&stack);
  return stack.back().toTensor();
}

bool has_avx512_bf16() {
#if LOWRANK_HAVE_AVX512_KERNELS
  return cpu_isa() >= CpuIsa::kAvx512Bf16;
#else
  return false;
#endif
}

namespace {

// fp32 copy of a [r, K] matrix padded with zeros to a multiple of 64 columns, so tiles never read past it.
at::Tensor pad_f32(const at::Tensor& m) {
  const int64_t K = m.size(-1);
  const int64_t Kp = (std::max<int64_t>(K, 1) + CV * L - 1) / (CV * L) * (CV * L);
  at::Tensor out = at::zeros({m.dim() == 1 ? 1 : m.size(0), Kp}, m.options().dtype(at::kFloat));
  out.narrow(1, 0, K).copy_(m.dim() == 1 ? m.unsqueeze(0) : m);
  return out;
}

#if LOWRANK_HAVE_AVX512_KERNELS
LOWRANK_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
LOWRANK_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
LOWRANK_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
LOWRANK_AVX512 inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));  // round to nearest even
}

// Y[i, n0 + ·] += bias + Σ_k H[i, k] · N[k, n0 + ·] for rb ≤ RB rows × up to 64 columns.
template <typename T>
LOWRANK_AVX512 void expand_add_tile(const float* h, int64_t r, const float* N, int64_t Np, const float* bias,
                                    int64_t n0, int64_t cols, int64_t rb, T* y, int64_t ldy, const T* src,
                                    int64_t lds) {
  // The rank-r sum is formed on its own and added to src once at the end, as y + (h·N) would be: accumulating
  // into src itself would round every partial sum at src's magnitude (r roundings instead of one), measured as a
  // max error up to 2.3x PEFT's on MiniLM's fp32 LoRA gradients.
  __m512 acc[RB][CV];
  for (int64_t v = 0; v < CV; ++v) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + n0 + v * L) : _mm512_setzero_ps();
    for (int64_t i = 0; i < RB; ++i) acc[i][v] = b;
  }
  for (int64_t k = 0; k < r; ++k) {
    __m512 nv[CV];
    for (int64_t v = 0; v < CV; ++v) nv[v] = _mm512_loadu_ps(N + k * Np + n0 + v * L);
    for (int64_t i = 0; i < RB; ++i) {
      const __m512 hv = _mm512_set1_ps(i < rb ? h[i * r + k] : 0.f);
      for (int64_t v = 0; v < CV; ++v) acc[i][v] = _mm512_fmadd_ps(hv, nv[v], acc[i][v]);
    }
  }
  for (int64_t i = 0; i < rb; ++i)
    for (int64_t v = 0; v < CV && v * L < cols; ++v) {
      const __mmask16 m = mask16(cols - v * L);
      store16(y + i * ldy + n0 + v * L, _mm512_add_ps(load16(src + i * lds + n0 + v * L, m), acc[i][v]), m);
    }
}

template <typename T>
void expand_add_avx512(at::Tensor& y, const at::Tensor& h, const at::Tensor& np, const float* bias,
                       const at::Tensor& src) {
  const int64_t T_ = h.size(0), r = h.size(1), Np = np.size(1), Nout = y.size(1), ldy = y.stride(0);
  const int64_t lds = src.stride(0);
  const T* S = src.const_data_ptr<T>();
  const float* H = h.const_data_ptr<float>();
  const float* N = np.const_data_ptr<float>();
  T* Y = y.mutable_data_ptr<T>();
  // grain: a thread gets at least 8 row blocks (32 rows); below that waking the pool costs more than the work.
  at::parallel_for(0, (T_ + RB - 1) / RB, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t = b * RB, rb = std::min(RB, T_ - t);
      for (int64_t n0 = 0; n0 < Nout; n0 += CV * L)
        expand_add_tile<T>(H + t * r, r, N, Np, bias, n0, std::min(CV * L, Nout - n0), rb, Y + t * ldy, ldy,
                           S + t * lds, lds);
    }
  });
}

// Horizontal sum of 16 lanes, a tree as _mm512_reduce_add_ps is.
LOWRANK_AVX512 inline float hsum(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  b = _mm_add_ss(b, _mm_movehdup_ps(b));
  return _mm_cvtss_f32(b);
}

// sum[t][j] += Σ_i x[t, i] · w[j, i] over i < K for j < nb, in bf16 pairs with fp32 accumulation. NB rows of W
// are streamed together so each x chunk loaded serves NB dot products; the TT·NB accumulators live in registers.
// Rows past nb re-read row nb - 1 (their sums are discarded) so the loop has no per-row branch.
// Prefetch: while a block is summed, the same offsets of the next block's NB rows (w + NB·ldw) are prefetched,
// one block (~NB·TT·K/32 cycles of work) ahead. Without it the hardware prefetcher, following a few row streams,
// lets W's DRAM latency show once the work per byte grows: measured on an AMD EPYC Zen 4, 2 threads, 8×4096²
// (standalone loop, W resident in L3): 2.20 ms without, 1.53 ms with (1.24 ms at NB = 3); 1 token 0.53 → 0.45.
// Self-contained, not inlined, unmasked loads and a scalar tail, on purpose: with masked loads in the loop (or the
// accumulators passed in by reference, or a per-row branch) GCC kept the accumulators in memory and stored all
// TT·NB of them every step.
template <int TT, int NB, bool kPrefetch>
LOWRANK_AVX512 __attribute__((noinline)) void dot_sums(const c10::BFloat16* x, int64_t ldx,
                                                       const c10::BFloat16* w, int64_t ldw, int64_t K, int64_t nb,
                                                       float (&sum)[TT][NB]) {
  const c10::BFloat16* wr[NB];
  for (int j = 0; j < NB; ++j) wr[j] = w + std::min<int64_t>(j, nb - 1) * ldw;
  const int64_t pf = NB * ldw;
  __m512 acc[TT][NB];
  for (int t = 0; t < TT; ++t)
    for (int j = 0; j < NB; ++j) acc[t][j] = _mm512_setzero_ps();
  const int64_t Kv = K / 32 * 32;
  for (int64_t i = 0; i < Kv; i += 32) {
    __m512i wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_si512(wr[j] + i);
    // (A prefetch past the end of W is harmless: prefetches never fault.)
    if constexpr (kPrefetch)
      for (int j = 0; j < NB; ++j) _mm_prefetch(reinterpret_cast<const char*>(wr[j] + pf + i), _MM_HINT_T0);
    for (int t = 0; t < TT; ++t) {
      const __m512i xv = _mm512_loadu_si512(x + t * ldx + i);
      for (int j = 0; j < NB; ++j) acc[t][j] = _mm512_dpbf16_ps(acc[t][j], (__m512bh)xv, (__m512bh)wv[j]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int j = 0; j < NB; ++j) sum[t][j] += hsum(acc[t][j]);
  // The < 32 tail in fp32 scalars (exact products of bf16 values, as VDPBF16PS forms them).
  for (int64_t i = Kv; i < K; ++i)
    for (int t = 0; t < TT; ++t) {
      const float xi = static_cast<float>(x[t * ldx + i]);
      for (int j = 0; j < NB; ++j) sum[t][j] += xi * static_cast<float>(wr[j][i]);
    }
}

template <int TT, int NB, typename Out>
void decode_impl(const at::Tensor& x2, const at::Tensor& w, const float* bias, const at::Tensor& u,
                 const at::Tensor& v, at::Tensor& y) {
  const int64_t N = w.size(0), K = w.size(1), ldx = x2.stride(0), ldw = w.stride(0), ldy = y.stride(0);
  const bool two = u.defined();
  const int64_t r = two ? u.size(1) : 0;
  const auto* X = x2.const_data_ptr<c10::BFloat16>();
  const auto* W = w.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* U = two ? u.const_data_ptr<c10::BFloat16>() : nullptr;
  const c10::BFloat16* V = two ? v.const_data_ptr<c10::BFloat16>() : nullptr;
  const int64_t ldu = two ? u.stride(0) : 0, ldv = two ? v.stride(0) : 0;
  Out* Y = y.mutable_data_ptr<Out>();
  at::parallel_for(0, (N + NB - 1) / NB, 64 / NB, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * NB, nb = std::min<int64_t>(NB, N - n);
      float sum[TT][NB] = {};
      dot_sums<TT, NB, true>(X, ldx, W + n * ldw, ldw, K, nb, sum);
      if (two) dot_sums<TT, NB, false>(U, ldu, V + n * ldv, ldv, r, nb, sum);
      for (int t = 0; t < TT; ++t)
        for (int64_t j = 0; j < nb; ++j) Y[t * ldy + n + j] = static_cast<Out>(sum[t][j] + (bias ? bias[n + j] : 0.f));
    }
  });
}

// Row-block width per token count: TT·NB ≤ 24 accumulators, leaving registers for the NB W vectors and one x
// vector (32 in all). Measured on Zen 4, 8×4096², 2 threads, with the prefetch: NB = 2 1.29 ms, NB = 3 1.08 ms;
// 4 tokens NB = 4 0.80, NB = 6 0.77 ms; 6 tokens NB = 3 1.02, NB = 4 0.95 ms.
template <typename Out>
void decode_dispatch(const at::Tensor& x2, const at::Tensor& w, const float* b, const at::Tensor& u,
                     const at::Tensor& v, at::Tensor& y) {
  switch (x2.size(0)) {
    case 1: decode_impl<1, 4, Out>(x2, w, b, u, v, y); break;
    case 2: decode_impl<2, 6, Out>(x2, w, b, u, v, y); break;
    case 3: decode_impl<3, 6, Out>(x2, w, b, u, v, y); break;
    case 4: decode_impl<4, 6, Out>(x2, w, b, u, v, y); break;
    case 5: decode_impl<5, 4, Out>(x2, w, b, u, v, y); break;
    case 6: decode_impl<6, 4, Out>(x2, w, b, u, v, y); break;
    case 7: decode_impl<7, 3, Out>(x2, w, b, u, v, y); break;
    default: decode_impl<8, 3, Out>(x2, w, b, u, v, y); break;
  }
}


// ---- decode_nn_bf16: out = g·W for a few tokens (see lowrank_kernels.h) ----
// Layout of the work: each thread owns a range of 32-column blocks of W; W is walked in panels of kPanelRows
// rows, and within a panel block by block, so every row is read as one 64-byte piece per block (each element of
// W once in all) while the TT × 32 partial sums of the block sit in 2·TT registers. Two rows are interleaved
// (VPUNPCKL/HWD) so one VDPBF16PS multiplies the pair (W[n, c], W[n + 1, c]) by the broadcast token pair
// (g[t, n], g[t, n + 1]). The interleave permutes columns within 128-bit lanes (acc0 lane 4L + q holds column
// 8L + q, acc1 column 8L + 4 + q); the partial sums are kept in that order in the fp32 output and put back in
// column order by one pass at the end. Each row piece of the block kPrefetchBlocks ahead is prefetched: a panel
// has kPanelRows row streams, more than the hardware prefetcher follows.
constexpr int64_t kPanelRows = 128;
constexpr int64_t kPrefetchBlocks = 4;

template <int TT, bool kTail>
LOWRANK_AVX512 __attribute__((noinline)) void nn_block(const c10::BFloat16* g, int64_t ldg,
                                                       const c10::BFloat16* w, int64_t ldw, int64_t n0,
                                                       int64_t n1, int64_t c, int64_t cols, float* out,
                                                       int64_t ldo, bool first) {
  __m512 acc[TT][2];
  if (first) {
    for (int t = 0; t < TT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  } else {
    for (int t = 0; t < TT; ++t) {
      acc[t][0] = _mm512_loadu_ps(out + t * ldo + c);
      acc[t][1] = _mm512_loadu_ps(out + t * ldo + c + 16);
    }
  }
  const __mmask32 m = kTail ? mask32(cols) : mask32(32);
  const int64_t pairs_end = n0 + (n1 - n0) / 2 * 2;
  const auto* G = reinterpret_cast<const uint16_t*>(g);
  for (int64_t n = n0; n < pairs_end; n += 2) {
    const c10::BFloat16* r0 = w + n * ldw + c;
    __m512i a, b;
    if constexpr (kTail) {
      a = _mm512_maskz_loadu_epi16(m, r0);
      b = _mm512_maskz_loadu_epi16(m, r0 + ldw);
    } else {
      a = _mm512_loadu_si512(r0);
      b = _mm512_loadu_si512(r0 + ldw);
      _mm_prefetch(reinterpret_cast<const char*>(r0 + 32 * kPrefetchBlocks), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(r0 + ldw + 32 * kPrefetchBlocks), _MM_HINT_T0);
    }
    const __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
    for (int t = 0; t < TT; ++t) {
      int32_t pair;
      std::memcpy(&pair, G + t * ldg + n, sizeof(pair));
      const __m512i gv = _mm512_set1_epi32(pair);
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], (__m512bh)lo, (__m512bh)gv);
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], (__m512bh)hi, (__m512bh)gv);
    }
  }
  if (pairs_end < n1) {  // odd row count: the last row pairs with zeros
    const __m512i a = _mm512_maskz_loadu_epi16(m, w + pairs_end * ldw + c), z = _mm512_setzero_si512();
    const __m512i lo = _mm512_unpacklo_epi16(a, z), hi = _mm512_unpackhi_epi16(a, z);
    for (int t = 0; t < TT; ++t) {
      const __m512i gv = _mm512_set1_epi32(static_cast<int32_t>(G[t * ldg + pairs_end]));
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], (__m512bh)lo, (__m512bh)gv);
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], (__m512bh)hi, (__m512bh)gv);
    }
  }
  for (int t = 0; t < TT; ++t) {
    _mm512_storeu_ps(out + t * ldo + c, acc[t][0]);
    _mm512_storeu_ps(out + t * ldo + c + 16, acc[t][1]);
  }
}

// Puts one 32-column block of partial sums (interleave order, see above) back in column order, in place.
LOWRANK_AVX512 void nn_unpermute(float* p) {
  const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
  const __m512i i0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i i1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  _mm512_storeu_ps(p, _mm512_permutex2var_ps(a, i0, b));
  _mm512_storeu_ps(p + 16, _mm512_permutex2var_ps(a, i1, b));
}

template <int TT>
void decode_nn_impl(const at::Tensor& g2, const at::Tensor& w, at::Tensor& out) {
  const int64_t N = w.size(0), C = w.size(1), ldw = w.stride(0), ldg = g2.stride(0), ldo = out.stride(0);
  const int64_t nblocks = (C + 31) / 32, Cfull = C / 32 * 32;
  const auto* Gp = g2.const_data_ptr<c10::BFloat16>();
  const auto* Wp = w.const_data_ptr<c10::BFloat16>();
  float* O = out.mutable_data_ptr<float>();
  // The output is padded to whole blocks (ldo ≥ nblocks·32) so every block's partial sums are full vectors.
  at::parallel_for(0, nblocks, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t n0 = 0; n0 < N; n0 += kPanelRows) {
      const int64_t n1 = std::min(N, n0 + kPanelRows);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c = b * 32;
        if (c + 32 <= Cfull)
          nn_block<TT, false>(Gp, ldg, Wp, ldw, n0, n1, c, 32, O, ldo, n0 == 0);
        else
          nn_block<TT, true>(Gp, ldg, Wp, ldw, n0, n1, c, C - c, O, ldo, n0 == 0);
      }
    }
    for (int64_t b = b0; b < b1; ++b)
      for (int t = 0; t < TT; ++t) nn_unpermute(O + t * ldo + b * 32);
  });
}

#endif  // LOWRANK_HAVE_AVX512_KERNELS

bool use_avx512(const at::Tensor& y) {
  return has_avx512_bf16() && (y.scalar_type() == at::kBFloat16 || y.scalar_type() == at::kFloat) &&
         y.stride(1) == 1;
}

}  // namespace

at::Tensor shrink(const at::Tensor& x2, const at::Tensor& m, double scale) {
  if (tail_avx512_supported(x2, m)) return shrink_avx512(x2, m, scale);
  at::Tensor h = at::mm(x2, m.t());
  // Reduced precision widens to fp32; fp64 (the gradcheck dtype) stays fp64 so every product keeps its precision.
  h = (h.scalar_type() == at::kDouble ? h : h.to(at::kFloat)).contiguous();
  return scale == 1.0 ? h : h.mul_(scale);
}

void expand_add_(at::Tensor& y, const at::Tensor& h, const at::Tensor& n, const std::optional<at::Tensor>& bias) {
  expand_add_out(y, y, h, n, bias);
}

void expand_add_out(at::Tensor& y, const at::Tensor& src, const at::Tensor& h, const at::Tensor& n,
                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(src.sizes() == y.sizes() && src.scalar_type() == y.scalar_type() && src.stride(1) == 1 &&
                  y.stride(1) == 1,
              "expand_add_out: src must match y");
  TORCH_CHECK(y.dim() == 2 && h.dim() == 2 && n.dim() == 2 && h.size(0) == y.size(0) && h.size(1) == n.size(0) &&
                  n.size(1) == y.size(1) && (h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble) &&
                  h.is_contiguous(),
              "expand_add_: bad arguments");
  const bool has_bias = bias.has_value() && bias->defined();
  if (y.size(0) == 0) return;
  if (!use_avx512(y) || h.scalar_type() != at::kFloat) {
    if (!src.is_same(y)) y.copy_(src);
    y.addmm_(h.to(y.scalar_type()), n);
    if (has_bias) y.add_(*bias);
    return;
  }
#if LOWRANK_HAVE_AVX512_KERNELS
  const at::Tensor np = pad_f32(n);
  const at::Tensor bp = has_bias ? pad_f32(*bias) : at::Tensor();
  const float* b = has_bias ? bp.const_data_ptr<float>() : nullptr;
  if (y.scalar_type() == at::kBFloat16) {
    expand_add_avx512<c10::BFloat16>(y, h, np, b, src);
  } else {
    expand_add_avx512<float>(y, h, np, b, src);
  }
#endif
}

int64_t fused_decode_max_tokens() { return has_amx_bf16() ? 4 : 8; }

bool decode_supported(const at::Tensor& x2, const at::Tensor& w) {
  return has_avx512_bf16() && x2.scalar_type() == at::kBFloat16 && x2.size(0) >= 1 &&
         x2.size(0) <= kDecodeMaxT && x2.stride(1) == 1 && w.stride(1) == 1;
}

at::Tensor decode_linear_bf16(const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& u, const std::optional<at::Tensor>& v,
                              at::ScalarType out_dtype) {
  TORCH_CHECK(decode_supported(x2, w), "decode_linear_bf16: unsupported arguments");
  at::Tensor y = at::empty({x2.size(0), w.size(0)}, x2.options().dtype(out_dtype));
#if LOWRANK_HAVE_AVX512_KERNELS
  const at::Tensor bf = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor uu = u.has_value() ? u->contiguous() : at::Tensor();
  const at::Tensor vv = v.has_value() ? v->contiguous() : at::Tensor();
  const float* b = bf.defined() ? bf.const_data_ptr<float>() : nullptr;
  if (out_dtype == at::kFloat) {
    decode_dispatch<float>(x2, w, b, uu, vv, y);
  } else {
    TORCH_CHECK(out_dtype == at::kBFloat16, "decode_linear_bf16: out_dtype must be float32 or bfloat16");
    decode_dispatch<c10::BFloat16>(x2, w, b, uu, vv, y);
  }
#endif
  return y;
}

bool decode_nn_supported(const at::Tensor& g2, const at::Tensor& w) {
  return has_avx512_bf16() && g2.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 &&
         g2.dim() == 2 && w.dim() == 2 && g2.size(0) >= 1 && g2.size(0) <= kDecodeMaxT && g2.stride(1) == 1 &&
         w.stride(1) == 1 && g2.size(1) == w.size(0) && w.size(0) >= 1 && w.size(1) >= 1;
}

at::Tensor decode_nn_bf16(const at::Tensor& g2, const at::Tensor& w) {
  TORCH_CHECK(decode_nn_supported(g2, w), "decode_nn_bf16: unsupported arguments");
  const int64_t T = g2.size(0), C = w.size(1), Cp = (C + 31) / 32 * 32;
  at::Tensor out = at::empty({T, Cp}, g2.options().dtype(at::kFloat));
#if LOWRANK_HAVE_AVX512_KERNELS
  switch (T) {
    case 1: decode_nn_impl<1>(g2, w, out); break;
    case 2: decode_nn_impl<2>(g2, w, out); break;
    case 3: decode_nn_impl<3>(g2, w, out); break;
    case 4: decode_nn_impl<4>(g2, w, out); break;
    case 5: decode_nn_impl<5>(g2, w, out); break;
    case 6: decode_nn_impl<6>(g2, w, out); break;
    case 7: decode_nn_impl<7>(g2, w, out); break;
    default: decode_nn_impl<8>(g2, w, out); break;
  }
#endif
  return out.narrow(1, 0, C);
}

}  // namespace lowrank::cpu
