// See multi_lora_kernels.h for what these compute and why.
#include "cpu/multi_lora_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "cpu/lowrank_kernels.h"
#include "cpu/masks.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LOWRANK_SEG_AVX512_KERNELS 1
#define LOWRANK_SEG_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#else
#define LOWRANK_SEG_AVX512_KERNELS 0
#endif

namespace lowrank::cpu {

std::vector<Segment> host_segments(const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& scaling,
                                   const std::optional<at::Tensor>& ranks, int64_t r, int64_t tokens,
                                   int64_t* rows) {
  TORCH_CHECK(perm.device().is_cpu() && offsets.device().is_cpu(), "host_segments: CPU tensors only");
  const at::Tensor off = offsets.contiguous();
  const at::Tensor pm = perm.contiguous();
  const at::Tensor sc = scaling.to(at::kDouble).contiguous();
  const bool has_ranks = ranks.has_value() && ranks->defined();
  const at::Tensor rk = has_ranks ? ranks->to(at::kLong).contiguous() : at::Tensor();
  const int64_t n = off.size(0) - 1;
  const int64_t* o = off.const_data_ptr<int64_t>();
  const int64_t* p = pm.const_data_ptr<int64_t>();
  const double* s = sc.const_data_ptr<double>();
  TORCH_CHECK_VALUE(o[0] == 0, "offsets[0] must be 0, got ", o[0]);
  for (int64_t a = 0; a < n; ++a)
    TORCH_CHECK_VALUE(o[a + 1] >= o[a], "offsets must be non-decreasing, got offsets[", a, "] = ", o[a],
                      " > offsets[", a + 1, "] = ", o[a + 1]);
  TORCH_CHECK_VALUE(o[n] <= tokens, "offsets[-1] = ", o[n], " exceeds the number of tokens ", tokens);
  for (int64_t i = 0; i < o[n]; ++i)
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < tokens, "perm[", i, "] = ", p[i], " is not a token index in [0, ", tokens,
                      ")");
  std::vector<Segment> segs;
  for (int64_t a = 0; a < n; ++a) {
    const int64_t k = has_ranks ? rk.const_data_ptr<int64_t>()[a] : r;
    TORCH_CHECK_VALUE(k >= 0 && k <= r, "ranks[", a, "] = ", k, " is outside [0, ", r, "]");
    TORCH_CHECK_VALUE(std::isfinite(s[a]), "scaling[", a, "] = ", s[a], " is not finite");
    if (o[a + 1] > o[a] && k > 0 && s[a] != 0.0) segs.push_back({a, o[a], o[a + 1], k, s[a]});
  }
  *rows = o[n];
  return segs;
}

namespace {

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool use_avx512(const at::Tensor& z) {
  return has_avx512_bf16() && (z.scalar_type() == at::kBFloat16 || z.scalar_type() == at::kFloat) &&
         z.stride(1) == 1;
}

// ---- portable path: ATen products on a block buffer of at most kSegBlock gathered rows -------------------------
void shrink_aten(const at::Tensor& z2, const at::Tensor& perm, const std::vector<Segment>& segs,
                 const std::vector<at::Tensor>& m, at::Tensor& h) {
  const auto acc = h.scalar_type();
  for (size_t s = 0; s < segs.size(); ++s) {
    const Segment& g = segs[s];
    const at::Tensor mt = m[s].to(acc).t();
    for (int64_t b0 = g.begin; b0 < g.end; b0 += kSegBlock) {
      const int64_t len = std::min(kSegBlock, g.end - b0);
      const at::Tensor zb = at::index_select(z2, 0, perm.narrow(0, b0, len)).to(acc);
      h.narrow(0, b0, len).narrow(1, 0, g.rank).copy_(at::mm(zb, mt).mul_(g.scale));
    }
  }
}

void expand_aten(at::Tensor& y2, const at::Tensor& perm, const std::vector<Segment>& segs, const at::Tensor& h,
                 const std::vector<at::Tensor>& n) {
  const auto acc = h.scalar_type();
  for (size_t s = 0; s < segs.size(); ++s) {
    const Segment& g = segs[s];
    const at::Tensor nt = n[s].to(acc);
    for (int64_t b0 = g.begin; b0 < g.end; b0 += kSegBlock) {
      const int64_t len = std::min(kSegBlock, g.end - b0);
      const at::Tensor idx = perm.narrow(0, b0, len);
      at::Tensor yb = at::index_select(y2, 0, idx).to(acc);
      yb.addmm_(h.narrow(0, b0, len).narrow(1, 0, g.rank), nt);
      y2.index_copy_(0, idx, yb.to(y2.scalar_type()));
    }
  }
}

std::vector<at::Tensor> tn_aten(const at::Tensor& h, const at::Tensor& perm, const std::vector<Segment>& segs,
                                const at::Tensor& z2) {
  const auto acc = h.scalar_type();
  std::vector<at::Tensor> out;
  for (const Segment& g : segs) {
    at::Tensor o = at::zeros({g.rank, z2.size(1)}, z2.options().dtype(acc));
    for (int64_t b0 = g.begin; b0 < g.end; b0 += kSegBlock) {
      const int64_t len = std::min(kSegBlock, g.end - b0);
      const at::Tensor zb = at::index_select(z2, 0, perm.narrow(0, b0, len)).to(acc);
      o.addmm_(h.narrow(0, b0, len).narrow(1, 0, g.rank).t(), zb);
    }
    out.push_back(o);
  }
  return out;
}

#if LOWRANK_SEG_AVX512_KERNELS
constexpr int64_t L = 16;  // fp32 lanes
constexpr int TT = 4;      // tokens per shrink / expand tile
constexpr int NB = 4;      // ranks per shrink tile: TT·NB = 16 accumulators
constexpr int CV = 4;      // registers per row of an expand / tn tile (64 columns)

LOWRANK_SEG_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
LOWRANK_SEG_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
LOWRANK_SEG_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
LOWRANK_SEG_AVX512 inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));  // round to nearest even
}

// Dot products of TT token rows with NB rows of M over K: bf16 pairs into fp32 (VDPBF16PS), 32 elements a step.
LOWRANK_SEG_AVX512 inline void dots(const c10::BFloat16* const* z, const c10::BFloat16* m, int64_t ldm, int64_t K,
                                    int nb, __m512 (&acc)[TT][NB]) {
  for (int64_t i = 0; i < K; i += 32) {
    const __mmask32 mk = mask32(K - i);
    __m512i mv[NB];
    for (int j = 0; j < NB; ++j) mv[j] = j < nb ? _mm512_maskz_loadu_epi16(mk, m + j * ldm + i) : _mm512_setzero_si512();
    for (int t = 0; t < TT; ++t) {
      const __m512i zv = _mm512_maskz_loadu_epi16(mk, z[t] + i);
      for (int j = 0; j < NB; ++j) acc[t][j] = _mm512_dpbf16_ps(acc[t][j], (__m512bh)zv, (__m512bh)mv[j]);
    }
  }
}
// The same in fp32 with FMA, 16 elements a step.
LOWRANK_SEG_AVX512 inline void dots(const float* const* z, const float* m, int64_t ldm, int64_t K, int nb,
                                    __m512 (&acc)[TT][NB]) {
  for (int64_t i = 0; i < K; i += L) {
    const __mmask16 mk = mask16(K - i);
    __m512 mv[NB];
    for (int j = 0; j < NB; ++j) mv[j] = j < nb ? _mm512_maskz_loadu_ps(mk, m + j * ldm + i) : _mm512_setzero_ps();
    for (int t = 0; t < TT; ++t) {
      const __m512 zv = _mm512_maskz_loadu_ps(mk, z[t] + i);
      for (int j = 0; j < NB; ++j) acc[t][j] = _mm512_fmadd_ps(zv, mv[j], acc[t][j]);
    }
  }
}

// H rows [i0, i0 + cnt) of one segment: every rank in groups of NB. Rows past cnt point at the first row and
// their results are dropped (a full tile keeps the inner loop branch-free).
template <typename T>
LOWRANK_SEG_AVX512 void shrink_tile(const T* Z, int64_t ldz, const int64_t* perm, int64_t i0, int64_t cnt,
                                    const T* M, int64_t ldm, int64_t K, int64_t rank, float scale, float* H,
                                    int64_t ldh) {
  const T* z[TT];
  for (int t = 0; t < TT; ++t) z[t] = Z + perm[i0 + (t < cnt ? t : 0)] * ldz;
  for (int64_t k0 = 0; k0 < rank; k0 += NB) {
    const int nb = static_cast<int>(std::min<int64_t>(NB, rank - k0));
    __m512 acc[TT][NB];
    for (int t = 0; t < TT; ++t)
      for (int j = 0; j < NB; ++j) acc[t][j] = _mm512_setzero_ps();
    dots(z, M + k0 * ldm, ldm, K, nb, acc);
    for (int t = 0; t < cnt; ++t)
      for (int j = 0; j < nb; ++j) H[(i0 + t) * ldh + k0 + j] = scale * _mm512_reduce_add_ps(acc[t][j]);
  }
}

// Y[perm[i0 + t], n0 : n0 + cols] += Σ_k H[i0 + t, k]·N[k, n0 : ...] for t < cnt ≤ TT, cols ≤ 64; N is fp32 with
// its columns padded to a multiple of 64 (Np), so its loads need no mask.
template <typename T>
LOWRANK_SEG_AVX512 void expand_tile(T* Y, int64_t ldy, const int64_t* perm, int64_t i0, int64_t cnt, const float* H,
                                    int64_t ldh, int64_t rank, const float* N, int64_t Np, int64_t n0, int64_t cols) {
  __m512 acc[TT][CV];
  T* y[TT];
  for (int t = 0; t < TT; ++t) y[t] = Y + perm[i0 + (t < cnt ? t : 0)] * ldy + n0;
  // The rank sum is formed on its own and added to Y once (one rounding at Y's magnitude, not one per rank: see
  // expand_add_tile in lowrank_kernels.cpp).
  for (int v = 0; v < CV; ++v)
    for (int t = 0; t < TT; ++t) acc[t][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < rank; ++k) {
    __m512 nv[CV];
    for (int v = 0; v < CV; ++v) nv[v] = _mm512_loadu_ps(N + k * Np + n0 + v * L);
    for (int t = 0; t < TT; ++t) {
      const __m512 hv = _mm512_set1_ps(t < cnt ? H[(i0 + t) * ldh + k] : 0.f);
      for (int v = 0; v < CV; ++v) acc[t][v] = _mm512_fmadd_ps(hv, nv[v], acc[t][v]);
    }
  }
  for (int t = 0; t < cnt; ++t)
    for (int v = 0; v < CV && v * L < cols; ++v) {
      const __mmask16 m = mask16(cols - v * L);
      store16(y[t] + v * L, _mm512_add_ps(load16(y[t] + v * L, m), acc[t][v]), m);
    }
}

// O[k, c0 : c0 + cols] = Σ_i H[i, k]·Z[perm[i], c0 : ...] over one segment's rows, 4 ranks at a time so that
// the 4 × 64 accumulators stay in registers while the segment's rows stream by (from L2: 128 bytes a row).
template <typename T>
LOWRANK_SEG_AVX512 void tn_cols(const T* Z, int64_t ldz, const int64_t* perm, int64_t begin, int64_t end,
                                const float* H, int64_t ldh, int64_t rank, int64_t c0, int64_t cols, float* O,
                                int64_t ldo) {
  for (int64_t k0 = 0; k0 < rank; k0 += 4) {
    const int kb = static_cast<int>(std::min<int64_t>(4, rank - k0));
    __m512 acc[4][CV];
    for (int j = 0; j < 4; ++j)
      for (int v = 0; v < CV; ++v) acc[j][v] = _mm512_setzero_ps();
    for (int64_t i = begin; i < end; ++i) {
      const T* z = Z + perm[i] * ldz + c0;
      __m512 zv[CV];
      for (int v = 0; v < CV; ++v) zv[v] = load16(z + v * L, mask16(cols - v * L));
      for (int j = 0; j < 4; ++j) {
        const __m512 hv = _mm512_set1_ps(j < kb ? H[i * ldh + k0 + j] : 0.f);
        for (int v = 0; v < CV; ++v) acc[j][v] = _mm512_fmadd_ps(hv, zv[v], acc[j][v]);
      }
    }
    for (int j = 0; j < kb; ++j)
      for (int v = 0; v < CV && v * L < cols; ++v)
        _mm512_mask_storeu_ps(O + (k0 + j) * ldo + c0 + v * L, mask16(cols - v * L), acc[j][v]);
  }
}

// Work items of at most TT consecutive rows (in the segment order) of one segment, over all segments: one
// parallel_for covers every adapter.
struct RowItem {
  int64_t seg, i0, cnt;
};
std::vector<RowItem> row_items(const std::vector<Segment>& segs) {
  std::vector<RowItem> items;
  for (size_t s = 0; s < segs.size(); ++s)
    for (int64_t i = segs[s].begin; i < segs[s].end; i += TT)
      items.push_back({static_cast<int64_t>(s), i, std::min<int64_t>(TT, segs[s].end - i)});
  return items;
}

template <typename T>
void shrink_avx512(const at::Tensor& z2, const int64_t* perm, const std::vector<Segment>& segs,
                   const std::vector<at::Tensor>& m, at::Tensor& h) {
  const int64_t K = z2.size(1), ldz = z2.stride(0), ldh = h.stride(0);
  std::vector<at::Tensor> mc;
  for (const auto& t : m) mc.push_back(t.to(z2.scalar_type()).contiguous());
  const auto items = row_items(segs);
  const T* Z = z2.const_data_ptr<T>();
  float* H = h.mutable_data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const RowItem& it = items[b];
      const Segment& g = segs[it.seg];
      shrink_tile<T>(Z, ldz, perm, it.i0, it.cnt, mc[it.seg].const_data_ptr<T>(), K, K, g.rank,
                     static_cast<float>(g.scale), H, ldh);
    }
  });
}

// fp32 copy of N [rank, Nout] with columns padded to a multiple of 64 (zeros), so the tile loads need no mask.
at::Tensor pad_cols_f32(const at::Tensor& n) {
  const int64_t cols = n.size(1), cp = (std::max<int64_t>(cols, 1) + CV * L - 1) / (CV * L) * (CV * L);
  at::Tensor out = at::zeros({n.size(0), cp}, n.options().dtype(at::kFloat));
  out.narrow(1, 0, cols).copy_(n);
  return out;
}

template <typename T>
void expand_avx512(at::Tensor& y2, const int64_t* perm, const std::vector<Segment>& segs, const at::Tensor& h,
                   const std::vector<at::Tensor>& n) {
  const int64_t Nout = y2.size(1), ldy = y2.stride(0), ldh = h.stride(0);
  std::vector<at::Tensor> np;
  for (const auto& t : n) np.push_back(pad_cols_f32(t));
  T* Y = y2.mutable_data_ptr<T>();
  const float* H = h.const_data_ptr<float>();
  const auto items = row_items(segs);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const RowItem& it = items[b];
      const float* N = np[it.seg].const_data_ptr<float>();
      const int64_t Np = np[it.seg].size(1);
      for (int64_t n0 = 0; n0 < Nout; n0 += CV * L)
        expand_tile<T>(Y, ldy, perm, it.i0, it.cnt, H, ldh, segs[it.seg].rank, N, Np, n0,
                       std::min<int64_t>(CV * L, Nout - n0));
    }
  });
}

template <typename T>
std::vector<at::Tensor> tn_avx512(const at::Tensor& h, const int64_t* perm, const std::vector<Segment>& segs,
                                  const at::Tensor& z2) {
  const int64_t K = z2.size(1), ldz = z2.stride(0), ldh = h.stride(0), chunks = (K + CV * L - 1) / (CV * L);
  std::vector<at::Tensor> out;
  for (const Segment& g : segs) out.push_back(at::empty({g.rank, K}, z2.options().dtype(at::kFloat)));
  const T* Z = z2.const_data_ptr<T>();
  const float* H = h.const_data_ptr<float>();
  const int64_t items = static_cast<int64_t>(segs.size()) * chunks;
  at::parallel_for(0, items, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = b / chunks, c0 = (b % chunks) * CV * L;
      const Segment& g = segs[s];
      tn_cols<T>(Z, ldz, perm, g.begin, g.end, H, ldh, g.rank, c0, std::min<int64_t>(CV * L, K - c0),
                 out[s].mutable_data_ptr<float>(), K);
    }
  });
  return out;
}
#endif  // LOWRANK_SEG_AVX512_KERNELS

}  // namespace

at::Tensor segment_shrink(const at::Tensor& z2, const at::Tensor& perm, const std::vector<Segment>& segs,
                          const std::vector<at::Tensor>& m, int64_t rows, int64_t rmax) {
  at::Tensor h = at::zeros({rows, rmax}, z2.options().dtype(acc_dtype(z2.scalar_type())));
  if (segs.empty()) return h;
  if (segment_amx_supported(z2)) {
    segment_shrink_amx(z2, perm.const_data_ptr<int64_t>(), segs, m, h);
    return h;
  }
#if LOWRANK_SEG_AVX512_KERNELS
  if (use_avx512(z2)) {
    const int64_t* p = perm.const_data_ptr<int64_t>();
    if (z2.scalar_type() == at::kBFloat16) {
      shrink_avx512<c10::BFloat16>(z2, p, segs, m, h);
    } else {
      shrink_avx512<float>(z2, p, segs, m, h);
    }
    return h;
  }
#endif
  shrink_aten(z2, perm, segs, m, h);
  return h;
}

void segment_expand_add_(at::Tensor& y2, const at::Tensor& perm, const std::vector<Segment>& segs,
                         const at::Tensor& h, const std::vector<at::Tensor>& n) {
  if (segs.empty()) return;
  if (segment_amx_supported(y2) && h.scalar_type() == at::kFloat) {
    segment_expand_amx(y2, perm.const_data_ptr<int64_t>(), segs, h, n);
    return;
  }
#if LOWRANK_SEG_AVX512_KERNELS
  if (use_avx512(y2) && h.scalar_type() == at::kFloat) {
    const int64_t* p = perm.const_data_ptr<int64_t>();
    if (y2.scalar_type() == at::kBFloat16) {
      expand_avx512<c10::BFloat16>(y2, p, segs, h, n);
    } else {
      expand_avx512<float>(y2, p, segs, h, n);
    }
    return;
  }
#endif
  expand_aten(y2, perm, segs, h, n);
}

std::vector<at::Tensor> segment_tn(const at::Tensor& h, const at::Tensor& perm, const std::vector<Segment>& segs,
                                   const at::Tensor& z2) {
  if (segs.empty()) return {};
  if (segment_amx_supported(z2) && h.scalar_type() == at::kFloat)
    return segment_tn_amx(h, perm.const_data_ptr<int64_t>(), segs, z2);
#if LOWRANK_SEG_AVX512_KERNELS
  if (use_avx512(z2) && h.scalar_type() == at::kFloat) {
    const int64_t* p = perm.const_data_ptr<int64_t>();
    return z2.scalar_type() == at::kBFloat16 ? tn_avx512<c10::BFloat16>(h, p, segs, z2)
                                             : tn_avx512<float>(h, p, segs, z2);
  }
#endif
  return tn_aten(h, perm, segs, z2);
}

}  // namespace lowrank::cpu
