// AMX-BF16 tile versions of the segmented shrink and expand (contract in multi_lora_kernels.h), bf16 only:
//   shrink:  H[i, :rank] = s_a·Z[perm[i], :]·M_aᵀ                 16 tokens × 16 ranks per C tile
//   expand:  Y[perm[i], :] += H[i, :rank]·N_a                      16 tokens × 16 columns per C tile
//   tn:      O_a = Σ_i H[i, :rank_a]ᵀ·Z[perm[i], :]                 16 ranks × 64 columns, 32 tokens a step
// Why: the AVX-512 dot / FMA kernels run the rank-r products at ~70–140 GFLOP/s per core, while the base GEMM
// runs on the tile unit at >1 TFLOP/s; with r = 16 the LoRA products then cost 40–60% of a 768-wide base layer.
// One TDPBF16PS is 16×16×32 MACs. The A tiles are 16 token rows: read in place when the 16 tokens are consecutive
// rows of x and K is whole 32-wide chunks, else gathered into a 16-row scratch while packing (never a gathered
// copy of the activation). H is rounded to bf16 for the expand's A tile, as the unfused bf16 layer rounds h; the
// C tile (fp32) is added to y in fp32 and rounded once. M_a and N_a are packed into the VNNI pair layout of B
// tiles once per call (r × K and r × out elements per active adapter).
#include "cpu/multi_lora_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

#include "cpu/amx_tiles.h"
#include "cpu/masks.h"
#include "cpu/lowrank_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <immintrin.h>
#define LOWRANK_SEG_AMX 1
#define LOWRANK_SEG_AMX_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")))
#else
#define LOWRANK_SEG_AMX 0
#endif

namespace lowrank::cpu {

bool segment_amx_supported(const at::Tensor& t) {
  return LOWRANK_SEG_AMX && has_amx_bf16() && t.scalar_type() == at::kBFloat16 &&
         t.stride(1) == 1;
}

#if LOWRANK_SEG_AMX
namespace {

using bf16 = c10::BFloat16;

// O[(g·P + p)·16 + j] = M[(16g + j)·ld + p] in 32-bit words, rows 16g + j < r, pairs p < kp (the rest stays 0).
LOWRANK_SEG_AMX_BF16 void gather_pairs(const int32_t* M, int64_t ld, int64_t r, int64_t kp, int64_t G, int64_t P,
                                       int32_t* O) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(static_cast<int>(ld)));
  for (int64_t g = 0; g < G; ++g) {
    const int64_t rows = std::min<int64_t>(16, r - 16 * g);
    const __mmask16 m = mask16(rows);
    const int32_t* base = M + 16 * g * ld;
    for (int64_t p = 0; p < kp; ++p)
      _mm512_storeu_si512(O + (g * P + p) * 16, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, base + p, 4));
  }
}

// M [r, K] (any strides) → [G][P][16][2] bf16, G = ⌈r/16⌉ groups of 16 rows, P = ⌈K/32⌉·16 pairs of k: the B
// tiles (B[p][j][e] = M[16g + j][2p + e]), zero padded, written into `out` (resized). The buffers are thread-local
// and reused across calls: a fresh allocation of this size (256 KB for 4096 × 16) is mmapped by glibc and paid
// again in page faults on every call (measured 130 µs per zero fill), more than the packing itself.
void pack_vnni(const at::Tensor& m, std::vector<bf16>& out, int64_t* groups, int64_t* pairs) {
  const int64_t r = m.size(0), K = m.size(1), G = (r + 15) / 16, P = (K + 31) / 32 * 16;
  const at::Tensor mb = m.scalar_type() == at::kBFloat16 ? m : m.to(at::kBFloat16);
  out.assign(static_cast<size_t>(G * P * 32), bf16(0.f));
  const bf16* M = mb.const_data_ptr<bf16>();
  bf16* O = out.data();
  const int64_t s0 = mb.stride(0), s1 = mb.stride(1);
  // A pair (M[j][2p], M[j][2p + 1]) is one 32-bit word, so with unit column stride, an even row stride and even K
  // the packing is a transpose of 32-bit words: one masked 16-lane gather per (group, pair). Otherwise plain loops
  // in M's memory order (a TensorIterator copy into a permuted [.., 16, 2] view runs element by element, inner
  // extent 2: milliseconds per call at 4096 × 16).
  if (s1 == 1 && s0 % 2 == 0 && K % 2 == 0 && 16 * (s0 / 2) < (int64_t{1} << 30) &&
      reinterpret_cast<uintptr_t>(M) % 4 == 0) {
    gather_pairs(reinterpret_cast<const int32_t*>(M), s0 / 2, r, K / 2, G, P, reinterpret_cast<int32_t*>(O));
  } else if (s1 <= s0) {
    for (int64_t j = 0; j < r; ++j) {
      bf16* dst = O + (j / 16) * P * 32 + (j % 16) * 2;
      for (int64_t k = 0; k < K; ++k) dst[(k / 2) * 32 + (k % 2)] = M[j * s0 + k * s1];
    }
  } else {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < r; ++j) O[(j / 16) * P * 32 + (k / 2) * 32 + (j % 16) * 2 + (k % 2)] = M[j * s0 + k * s1];
  }
  *groups = G;
  *pairs = P;
}

// Packed factors of every segment, in a per-thread pool reused across calls (see pack_vnni).
struct Packed {
  const bf16* data;
  int64_t groups, pairs;
};
std::vector<Packed> pack_all(const std::vector<at::Tensor>& mats, bool transpose, int slot) {
  static thread_local std::vector<std::vector<bf16>> pool[2];
  auto& bufs = pool[slot];
  if (bufs.size() < mats.size()) bufs.resize(mats.size());
  std::vector<Packed> out;
  for (size_t s = 0; s < mats.size(); ++s) {
    int64_t g = 0, p = 0;
    pack_vnni(transpose ? mats[s].t() : mats[s], bufs[s], &g, &p);
    out.push_back({bufs[s].data(), g, p});
  }
  return out;
}

LOWRANK_SEG_AMX_BF16 void config_tiles() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

LOWRANK_SEG_AMX_BF16 void release_tiles() { _tile_release(); }

// 16 rows (cnt valid) of Z starting at perm index i0 into the A-tile source: in place, or gathered into scratch.
LOWRANK_SEG_AMX_BF16 const bf16* a_rows(const bf16* Z, int64_t ldz, int64_t K, int64_t Kp, const int64_t* perm,
                                        int64_t i0, int64_t cnt, bf16* scratch, int64_t* lda) {
  bool consecutive = cnt == 16 && K == Kp;
  for (int64_t t = 1; consecutive && t < 16; ++t) consecutive = perm[i0 + t] == perm[i0] + t;
  if (consecutive) {
    *lda = ldz;
    return Z + perm[i0] * ldz;
  }
  for (int64_t t = 0; t < 16; ++t) {
    bf16* dst = scratch + t * Kp;
    if (t < cnt) {
      std::copy_n(Z + perm[i0 + t] * ldz, K, dst);
      std::fill(dst + K, dst + Kp, bf16(0.f));
    } else {
      std::fill(dst, dst + Kp, bf16(0.f));
    }
  }
  *lda = Kp;
  return scratch;
}

// Interleave two token rows of a 32-column piece into the VNNI pairs of two B tiles: b0[p] = (r0[k], r1[k]) for
// k < 16, b1 for k = 16..31 (a missing row reads as zeros).
LOWRANK_SEG_AMX_BF16 inline void pair_rows(const bf16* r0, const bf16* r1, __mmask32 m, bf16* b0, bf16* b1) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                      37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54,
                                      22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  const __m512i a = r0 ? _mm512_maskz_loadu_epi16(m, r0) : _mm512_setzero_si512();
  const __m512i b = r1 ? _mm512_maskz_loadu_epi16(m, r1) : _mm512_setzero_si512();
  _mm512_storeu_si512(b0, _mm512_permutex2var_epi16(a, lo, b));
  _mm512_storeu_si512(b1, _mm512_permutex2var_epi16(a, hi, b));
}

// (segment, first row) items of 16 rows each, over all segments.
std::vector<std::pair<int64_t, int64_t>> tile_items(const std::vector<Segment>& segs) {
  std::vector<std::pair<int64_t, int64_t>> items;
  for (size_t s = 0; s < segs.size(); ++s)
    for (int64_t i = segs[s].begin; i < segs[s].end; i += 16) items.emplace_back(static_cast<int64_t>(s), i);
  return items;
}

}  // namespace

void segment_shrink_amx(const at::Tensor& z2, const int64_t* perm, const std::vector<Segment>& segs,
                        const std::vector<at::Tensor>& m, at::Tensor& h) {
  const int64_t K = z2.size(1), Kp = (K + 31) / 32 * 32, chunks = Kp / 32, ldz = z2.stride(0), ldh = h.stride(0);
  const auto mp = pack_all(m, false, 0);
  const bf16* Z = z2.const_data_ptr<bf16>();
  float* H = h.mutable_data_ptr<float>();
  const auto items = tile_items(segs);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 2, [&](int64_t b0, int64_t b1) {
    [&]() LOWRANK_SEG_AMX_BF16 {
      static thread_local std::vector<bf16> scratch;
      scratch.resize(static_cast<size_t>(16 * Kp));
      alignas(64) float c[16][16];
      config_tiles();
      for (int64_t b = b0; b < b1; ++b) {
        const auto [s, i0] = items[b];
        const Segment& g = segs[s];
        const int64_t cnt = std::min<int64_t>(16, g.end - i0), G = mp[s].groups, P = mp[s].pairs;
        int64_t lda = 0;
        const bf16* A = a_rows(Z, ldz, K, Kp, perm, i0, cnt, scratch.data(), &lda);
        const bf16* MP = mp[s].data;
        for (int64_t gi = 0; gi < G; ++gi) {
          _tile_zero(0);
          for (int64_t q = 0; q < chunks; ++q) {
            _tile_loadd(1, A + q * 32, lda * static_cast<int64_t>(sizeof(bf16)));
            _tile_loadd(2, MP + (gi * P + q * 16) * 32, 64);
            _tile_dpbf16ps(0, 1, 2);
          }
          _tile_stored(0, c, 64);
          const int64_t n = std::min<int64_t>(16, g.rank - gi * 16);
          const auto sc = static_cast<float>(g.scale);
          for (int64_t t = 0; t < cnt; ++t)
            for (int64_t j = 0; j < n; ++j) H[(i0 + t) * ldh + gi * 16 + j] = sc * c[t][j];
        }
      }
      release_tiles();
    }();
  });
}

void segment_expand_amx(at::Tensor& y2, const int64_t* perm, const std::vector<Segment>& segs,
                        const at::Tensor& h, const std::vector<at::Tensor>& n) {
  const int64_t Nout = y2.size(1), ldy = y2.stride(0), ldh = h.stride(0);
  // N_a [rank, Nout] → B tiles over the rank: packing Nᵀ [Nout, rank] gives [⌈Nout/16⌉][Rp/2][16][2].
  const auto np = pack_all(n, true, 1);
  bf16* Y = y2.mutable_data_ptr<bf16>();
  const float* H = h.const_data_ptr<float>();
  const auto items = tile_items(segs);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 2, [&](int64_t b0, int64_t b1) {
    [&]() LOWRANK_SEG_AMX_BF16 {
      alignas(64) float c[16][16];
      config_tiles();
      for (int64_t b = b0; b < b1; ++b) {
        const auto [s, i0] = items[b];
        const Segment& g = segs[s];
        const int64_t cnt = std::min<int64_t>(16, g.end - i0), P = np[s].pairs, chunks = P / 16;
        // A tile source: H rows rounded to bf16, zero padded to whole 32-wide chunks of the rank.
        std::vector<bf16> ha(16 * P * 2, bf16(0.f));
        for (int64_t t = 0; t < cnt; ++t)
          for (int64_t k = 0; k < g.rank; ++k) ha[t * P * 2 + k] = bf16(H[(i0 + t) * ldh + k]);
        const bf16* NP = np[s].data;
        bf16* yrow[16];
        for (int64_t t = 0; t < 16; ++t) yrow[t] = Y + perm[i0 + (t < cnt ? t : 0)] * ldy;
        for (int64_t n0 = 0; n0 < Nout; n0 += 16) {
          _tile_zero(0);
          for (int64_t q = 0; q < chunks; ++q) {
            _tile_loadd(1, ha.data() + q * 32, P * 2 * static_cast<int64_t>(sizeof(bf16)));
            _tile_loadd(2, NP + ((n0 / 16) * P + q * 16) * 32, 64);
            _tile_dpbf16ps(0, 1, 2);
          }
          _tile_stored(0, c, 64);
          const int64_t cols = std::min<int64_t>(16, Nout - n0);
          const __mmask16 mk = mask16(cols);
          for (int64_t t = 0; t < cnt; ++t) {
            bf16* p = yrow[t] + n0;
            const __m512 yv = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p)), 16));
            _mm256_mask_storeu_epi16(p, mk, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(yv, _mm512_load_ps(c[t]))));
          }
        }
      }
      release_tiles();
    }();
  });
}
std::vector<at::Tensor> segment_tn_amx(const at::Tensor& h, const int64_t* perm, const std::vector<Segment>& segs,
                                       const at::Tensor& z2) {
  // O_a [rank, K] = Σ_i H[i, :rank]ᵀ·Z[perm[i], :]: A tiles = Hᵀ (16 ranks × 32 tokens, H rounded to bf16 as the
  // unfused layer's gB / h are), B tiles = 32 gathered token rows × 16 columns interleaved into VNNI pairs in a
  // 4 KB scratch, 4 C tiles = 16 ranks × 64 columns. Work items: (segment, 64-column chunk).
  const int64_t K = z2.size(1), ldz = z2.stride(0), ldh = h.stride(0), chunks = (K + 63) / 64;
  std::vector<at::Tensor> out;
  for (const Segment& g : segs) out.push_back(at::empty({g.rank, K}, z2.options().dtype(at::kFloat)));
  const bf16* Z = z2.const_data_ptr<bf16>();
  const float* H = h.const_data_ptr<float>();
  // Hᵀ of every segment as A tiles, [⌈rank/16⌉][⌈tokens/32⌉][16][32] bf16, built once here rather than once per
  // 64-column chunk (it is the same for all of them).
  std::vector<std::vector<bf16>> ht(segs.size());
  for (size_t s = 0; s < segs.size(); ++s) {
    const Segment& g = segs[s];
    const int64_t G = (g.rank + 15) / 16, nc = (g.end - g.begin + 31) / 32;
    ht[s].assign(static_cast<size_t>(G * nc * 512), bf16(0.f));
    for (int64_t i = g.begin; i < g.end; ++i) {
      const int64_t c = (i - g.begin) / 32, t = (i - g.begin) % 32;
      for (int64_t k = 0; k < g.rank; ++k) ht[s][((k / 16) * nc + c) * 512 + (k % 16) * 32 + t] = bf16(H[i * ldh + k]);
    }
  }
  const int64_t items = static_cast<int64_t>(segs.size()) * chunks;
  at::parallel_for(0, items, 1, [&](int64_t b0, int64_t b1) {
    [&]() LOWRANK_SEG_AMX_BF16 {
      alignas(64) bf16 bt[4][16][32];
      alignas(64) float c[16][16];
      config_tiles();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = b / chunks, c0 = (b % chunks) * 64, cols = std::min<int64_t>(64, K - c0);
        const Segment& g = segs[s];
        const int64_t nc = (g.end - g.begin + 31) / 32;
        float* O = out[s].mutable_data_ptr<float>();
        for (int64_t r0 = 0; r0 < g.rank; r0 += 16) {
          const int64_t nr = std::min<int64_t>(16, g.rank - r0);
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (int64_t t0 = g.begin; t0 < g.end; t0 += 32) {
            const int64_t nt = std::min<int64_t>(32, g.end - t0);
            const bf16* at_ = ht[s].data() + ((r0 / 16) * nc + (t0 - g.begin) / 32) * 512;
            for (int half = 0; half < 2; ++half) {
              const int64_t cc = c0 + 32 * half, w = std::min<int64_t>(32, K - cc);
              const __mmask32 m = mask32(w);
              for (int64_t p = 0; p < 16; ++p) {
                const int64_t t = 2 * p;
                pair_rows(t < nt ? Z + perm[t0 + t] * ldz + cc : nullptr,
                          t + 1 < nt ? Z + perm[t0 + t + 1] * ldz + cc : nullptr, m, bt[2 * half][p],
                          bt[2 * half + 1][p]);
              }
            }
            _tile_loadd(4, at_, 64);
            _tile_loadd(5, bt[0], 64);
            _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(6, bt[1], 64);
            _tile_dpbf16ps(1, 4, 6);
            _tile_loadd(7, bt[2], 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_loadd(5, bt[3], 64);
            _tile_dpbf16ps(3, 4, 5);
          }
          for (int t = 0; t < 4; ++t) {
            const int64_t cc = c0 + 16 * t, w = std::min<int64_t>(16, cols - 16 * t);
            if (w <= 0) break;
            switch (t) {  // tile numbers are immediates
              case 0: _tile_stored(0, c, 64); break;
              case 1: _tile_stored(1, c, 64); break;
              case 2: _tile_stored(2, c, 64); break;
              default: _tile_stored(3, c, 64); break;
            }
            for (int64_t j = 0; j < nr; ++j) std::copy_n(c[j], w, O + (r0 + j) * K + cc);
          }
        }
      }
      release_tiles();
    }();
  });
  return out;
}
#else
void segment_shrink_amx(const at::Tensor&, const int64_t*, const std::vector<Segment>&, const std::vector<at::Tensor>&,
                        at::Tensor&) {
  TORCH_CHECK(false, "segment_shrink_amx: not built with AMX support");
}
void segment_expand_amx(at::Tensor&, const int64_t*, const std::vector<Segment>&, const at::Tensor&,
                        const std::vector<at::Tensor>&) {
  TORCH_CHECK(false, "segment_expand_amx: not built with AMX support");
}
std::vector<at::Tensor> segment_tn_amx(const at::Tensor&, const int64_t*, const std::vector<Segment>&,
                                       const at::Tensor&) {
  TORCH_CHECK(false, "segment_tn_amx: not built with AMX support");
}
#endif

}  // namespace lowrank::cpu
