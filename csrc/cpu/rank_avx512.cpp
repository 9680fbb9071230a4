// The LoRA backward after its one big GEMM, fused, on AVX512-BF16 without AMX (contract in lowrank_kernels.h,
// next to its tile twin lora_backward_tail_amx in cpu/rank_amx.cpp).
//
// Why: after dx = g·W the rest of a bf16 LoRA backward is five rank-r products (gB = s·g·B, h = s·x·Aᵀ,
// dx += gB·A, dA = gBᵀ·x, dB = gᵀ·h), 5·T·r·(K + N) multiply-adds in all, ~5% of the base GEMMs' work at r = 16.
// As five oneDNN calls on a 2-core AMD EPYC (Zen 4) they took 0.5–0.7 ms each right after the big GEMM (0.18–0.35
// ms each timed alone: x and g come back from memory for every call, and each call wakes the OpenMP workers),
// ~3 ms next to a 6.5 ms dx GEMM at 2048×768×768. Here they are one parallel region over 128-token panels: each
// panel of x, g and dx is read from memory once and used by every product while it sits in L2. Measured there:
// 1.0–1.4 ms after the GEMM, 0.8 ms with warm caches, against a floor of ~0.5 ms of memory traffic (x and g read,
// dx read and written: 12 MB) and ~0.6 ms of VDPBF16PS at one per cycle on two cores, which overlap only partly
// (prefetching the next panel changed nothing).
//
// Every product is VDPBF16PS (pairs of bf16, fp32 sums), in three shapes:
//   shrink (gB, h): a token's bf16 pair broadcast against 16 ranks of the packed factor, 8 tokens in flight;
//   reduction over tokens (dA, dB): rows t and t+1 of x (or g) interleaved into pairs by VPUNPCK{L,H}WD (which
//     permutes columns within 128-bit lanes; the accumulators keep that order and it is undone once, when they
//     are written out), times the broadcast pair (gB[t,k], gB[t+1,k]), 8 ranks × 32 columns in 16 registers
//     for a whole panel;
//   expand (dx += gB·A): a token's pair (gB[t,k], gB[t,k+1]) broadcast against A packed as rank pairs.
// gB and h are rounded to bf16 before use, as an unfused bf16 layer holds them.
#include "cpu/lowrank_kernels.h"
#include "cpu/isa.h"
#include "cpu/masks.h"
#include "cpu/multi_lora_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <immintrin.h>
#define LOWRANK_HAVE_RANK_AVX512 1
#define LOWRANK_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#else
#define LOWRANK_HAVE_RANK_AVX512 0
#endif

namespace lowrank::cpu {
namespace {

using bf16 = c10::BFloat16;

// Tokens per panel: x, g and dx rows of a panel (128 × (2K + N) bf16) stay in a 1 MB L2 up to K, N ≈ 1300; fewer
// for longer rows. Even, so that token pairs never straddle panels.
constexpr int64_t kPanel = 128;
constexpr int64_t kPanelBytes = int64_t{3} << 18;  // 768 KB
constexpr int64_t kRanksPerReduce = 8;             // 8 ranks × 2 halves of 32 columns: 16 accumulators
constexpr int64_t kShrinkTokens = 8;               // 8 independent accumulators cover the VDPBF16PS latency

int64_t panel_tokens(int64_t K, int64_t N) {
  const int64_t fit = kPanelBytes / ((2 * K + N) * static_cast<int64_t>(sizeof(bf16)));
  return std::clamp<int64_t>(fit / 16 * 16, 16, kPanel);
}

#if LOWRANK_HAVE_RANK_AVX512

// A [r, K] → [Rh][Kp][2] bf16, Rh = Rp / 2 rank pairs (Rp = 16·G), Kp = K rounded up to 32, zero padded: the pair
// (A[2q, i], A[2q + 1, i]) at [q][i], the operand of the expand.
at::Tensor pack_expand(const at::Tensor& a, int64_t Rp) {
  const int64_t r = a.size(0), K = a.size(1), Kp = (K + 31) / 32 * 32;
  at::Tensor out = at::zeros({Rp / 2, Kp, 2}, a.options());
  const bf16* A = a.const_data_ptr<bf16>();
  bf16* O = out.mutable_data_ptr<bf16>();
  const int64_t s0 = a.stride(0), s1 = a.stride(1);
  // Packed on every call (per adapter, twice a step): loops that read the source in its memory order.
  if (s0 == 1) {  // Bᵀ of a row-major B: row i of B holds A[:, i]
    for (int64_t i = 0; i < K; ++i)
      for (int64_t k = 0; k < r; ++k) O[((k / 2) * Kp + i) * 2 + (k % 2)] = A[i * s1 + k];
  } else {
    for (int64_t k = 0; k < r; ++k)
      for (int64_t i = 0; i < K; ++i) O[((k / 2) * Kp + i) * 2 + (k % 2)] = A[k * s0 + i * s1];
  }
  return out;
}

inline int32_t load_pair(const bf16* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// out[t][0:16] = Σ_p Z[t][2p : 2p + 2] · MP[p] for NT token rows of Z (row stride ldz, K columns) and one group of
// 16 ranks of the packed factor (MP: [⌈K/2⌉][32]). Self-contained and not inlined: GCC keeps the accumulators in
// registers only when the loop has no masked loads and nothing else in the function competes for them.
template <int NT>
LOWRANK_AVX512_BF16 __attribute__((noinline)) void shrink_tile(const bf16* z, int64_t ldz, int64_t K,
                                                               const bf16* mp, float* out) {
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  const int64_t Pfull = K / 2;
  for (int64_t p = 0; p < Pfull; ++p) {
    const __m512bh b = (__m512bh)_mm512_loadu_si512(mp + p * 32);
    for (int t = 0; t < NT; ++t)
      acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_set1_epi32(load_pair(z + t * ldz + 2 * p)), b);
  }
  if (K % 2) {  // the last element pairs with the zero padding of MP
    const __m512bh b = (__m512bh)_mm512_loadu_si512(mp + Pfull * 32);
    for (int t = 0; t < NT; ++t) {
      uint16_t last;
      std::memcpy(&last, z + t * ldz + K - 1, sizeof(last));
      acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_set1_epi32(last), b);
    }
  }
  for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + 16 * t, acc[t]);
}

// acc[k][h][·] += Σ_p pair(mt[k·ldm + p]) · interleave(Z[2p][32 columns], Z[2p + 1][32 columns]) for the 8 ranks
// k of this call: h = 0 the VPUNPCKLWD half, h = 1 the VPUNPCKHWD half (lane 4L + j ↔ column 8L + 4h + j). The
// 16 sums stay in registers for the whole panel; acc (rank stride lda floats) is read and written once.
LOWRANK_AVX512_BF16 __attribute__((noinline)) void reduce_block(const bf16* z, int64_t ldz, int64_t npairs,
                                                                const int32_t* mt, int64_t ldm, float* acc,
                                                                int64_t lda) {
  __m512 s[kRanksPerReduce][2];
  for (int k = 0; k < kRanksPerReduce; ++k) s[k][0] = s[k][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < npairs; ++p) {
    const __m512i r0 = _mm512_loadu_si512(z + 2 * p * ldz);
    const __m512i r1 = _mm512_loadu_si512(z + (2 * p + 1) * ldz);
    const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(r0, r1);
    const __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(r0, r1);
    for (int k = 0; k < kRanksPerReduce; ++k) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(mt[k * ldm + p]);
      s[k][0] = _mm512_dpbf16_ps(s[k][0], w, lo);
      s[k][1] = _mm512_dpbf16_ps(s[k][1], w, hi);
    }
  }
  for (int k = 0; k < kRanksPerReduce; ++k)
    for (int h = 0; h < 2; ++h) {
      float* dst = acc + k * lda + 16 * h;
      _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), s[k][h]));
    }
}

// out[t][0:32] = Σ_q pair(gb[t][2q : 2q + 2]) · AE[q][32 columns] for NT token rows of gB (bf16, row stride ldg,
// Rh rank pairs), AE the expand pack at this 32-column block (pair-row stride lde elements).
template <int NT>
LOWRANK_AVX512_BF16 __attribute__((noinline)) void expand_tile(const bf16* gb, int64_t ldg, int64_t Rh,
                                                               const bf16* ae, int64_t lde, float* out) {
  __m512 acc[NT][2];
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t q = 0; q < Rh; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(ae + q * lde);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(ae + q * lde + 32);
    for (int t = 0; t < NT; ++t) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(load_pair(gb + t * ldg + 2 * q));
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], w, b0);
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], w, b1);
    }
  }
  for (int t = 0; t < NT; ++t) {
    _mm512_storeu_ps(out + 32 * t, acc[t][0]);
    _mm512_storeu_ps(out + 32 * t + 16, acc[t][1]);
  }
}

// fp32 twins of the three kernels (FMA, 16 products a step instead of 32, no pairs). Accuracy: each sum is split
// over several accumulators (the shrink: four chains of K/4 terms, combined pairwise; the reduction: even and odd
// tokens), because one long fp32 chain was measurably less accurate than MKL's blocked GEMM (max error vs fp64 up
// to 2.2× PEFT's on MiniLM's 384-wide layers, over the repo's 2× rule).
template <int NT>
LOWRANK_AVX512_BF16 __attribute__((noinline)) void shrink_tile_f32(const float* z, int64_t ldz, int64_t K,
                                                                   const float* mp, float* out) {
  __m512 acc[NT][4];
  for (int t = 0; t < NT; ++t)
    for (int c = 0; c < 4; ++c) acc[t][c] = _mm512_setzero_ps();
  const int64_t K4 = K / 4 * 4;
  for (int64_t i = 0; i < K4; i += 4) {
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512 b = _mm512_loadu_ps(mp + (i + c) * 16);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) acc[t][c] = _mm512_fmadd_ps(_mm512_set1_ps(z[t * ldz + i + c]), b, acc[t][c]);
    }
  }
  for (int64_t i = K4; i < K; ++i) {  // (a constant index: a variable one would put acc in memory)
    const __m512 b = _mm512_loadu_ps(mp + i * 16);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) acc[t][0] = _mm512_fmadd_ps(_mm512_set1_ps(z[t * ldz + i]), b, acc[t][0]);
  }
  for (int t = 0; t < NT; ++t)
    _mm512_storeu_ps(out + 16 * t, _mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3])));
}

// acc[k][0:32] += Σ_t mt[k·ldm + t] · Z[t][32 columns] for the 4 ranks k of this call, over ntok token rows (even
// and odd tokens in separate sums).
constexpr int64_t kRanksPerReduceF32 = 4;
LOWRANK_AVX512_BF16 __attribute__((noinline)) void reduce_block_f32(const float* z, int64_t ldz, int64_t ntok,
                                                                    const float* mt, int64_t ldm, float* acc,
                                                                    int64_t lda) {
  __m512 s[kRanksPerReduceF32][2][2];
  for (int k = 0; k < kRanksPerReduceF32; ++k)
    for (int p = 0; p < 2; ++p) s[k][p][0] = s[k][p][1] = _mm512_setzero_ps();
  const int64_t even = ntok / 2 * 2;
  for (int64_t t = 0; t < even; t += 2) {
#pragma GCC unroll 2
    for (int p = 0; p < 2; ++p) {
      const __m512 r0 = _mm512_loadu_ps(z + (t + p) * ldz);
      const __m512 r1 = _mm512_loadu_ps(z + (t + p) * ldz + 16);
#pragma GCC unroll 4
      for (int k = 0; k < kRanksPerReduceF32; ++k) {
        const __m512 w = _mm512_set1_ps(mt[k * ldm + t + p]);
        s[k][p][0] = _mm512_fmadd_ps(w, r0, s[k][p][0]);
        s[k][p][1] = _mm512_fmadd_ps(w, r1, s[k][p][1]);
      }
    }
  }
  if (even < ntok) {
    const __m512 r0 = _mm512_loadu_ps(z + even * ldz);
    const __m512 r1 = _mm512_loadu_ps(z + even * ldz + 16);
    for (int k = 0; k < kRanksPerReduceF32; ++k) {
      const __m512 w = _mm512_set1_ps(mt[k * ldm + even]);
      s[k][0][0] = _mm512_fmadd_ps(w, r0, s[k][0][0]);
      s[k][0][1] = _mm512_fmadd_ps(w, r1, s[k][0][1]);
    }
  }
  for (int k = 0; k < kRanksPerReduceF32; ++k)
    for (int h = 0; h < 2; ++h) {
      float* dst = acc + k * lda + 16 * h;
      _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), _mm512_add_ps(s[k][0][h], s[k][1][h])));
    }
}

// out[t][0:32] = Σ_k gb[t][k] · AE[k][32 columns] for NT token rows of gB (row stride ldg, R ranks), AE the fp32
// expand pack at this 32-column block (row stride lde).
template <int NT>
LOWRANK_AVX512_BF16 __attribute__((noinline)) void expand_tile_f32(const float* gb, int64_t ldg, int64_t R,
                                                                   const float* ae, int64_t lde, float* out) {
  __m512 acc[NT][2];
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < R; ++k) {
    const __m512 b0 = _mm512_loadu_ps(ae + k * lde);
    const __m512 b1 = _mm512_loadu_ps(ae + k * lde + 16);
    for (int t = 0; t < NT; ++t) {
      const __m512 w = _mm512_set1_ps(gb[t * ldg + k]);
      acc[t][0] = _mm512_fmadd_ps(w, b0, acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(w, b1, acc[t][1]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    _mm512_storeu_ps(out + 32 * t, acc[t][0]);
    _mm512_storeu_ps(out + 32 * t + 16, acc[t][1]);
  }
}

template <typename F>
void dispatch_tokens(int n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// The tile calls of both element types, for nt ≤ 8 tokens. Shrink: rank group g of the packed factor (bf16 pairs
// [G][⌈K/2⌉][32], fp32 [G][K][16]). Expand: the 32-column block at c0 of the packed A (bf16 [Rp/2][Kp][2], fp32
// [Rp][Kp]), from nt rows of the rank-space operand (row stride ldg, Rp ranks).
template <typename E>
LOWRANK_AVX512_BF16 inline void shrink_block(int nt, const E* z, int64_t ldz, int64_t K, const E* mp, int64_t g,
                                             float* out) {
  dispatch_tokens(nt, [&](auto n) {
    if constexpr (std::is_same_v<E, bf16>) {
      shrink_tile<decltype(n)::value>(z, ldz, K, mp + g * ((K + 1) / 2) * 32, out);
    } else {
      shrink_tile_f32<decltype(n)::value>(z, ldz, K, mp + g * K * 16, out);
    }
  });
}
template <typename E>
LOWRANK_AVX512_BF16 inline void expand_block(int nt, const E* gb, int64_t ldg, int64_t Rp, const E* ae, int64_t Kp,
                                             int64_t c0, float* out) {
  dispatch_tokens(nt, [&](auto n) {
    if constexpr (std::is_same_v<E, bf16>) {
      expand_tile<decltype(n)::value>(gb, ldg, Rp / 2, ae + c0 * 2, Kp * 2, out);
    } else {
      expand_tile_f32<decltype(n)::value>(gb, ldg, Rp, ae + c0, Kp, out);
    }
  });
}

// E: the element type, bf16 or float (the fp32 packs are plain rows: shrink [G][K][16], expand [Rp][Kp]).
template <typename E>
struct Tail {
  const E* x;  // [T, K] (row stride ldx)
  int64_t ldx;
  const E* g;  // [T, N] (row stride ldg)
  int64_t ldg;
  int64_t T, K, N, G, Rp;
  int64_t panel;
  const E* a_shrink;  // packed A (bf16: pack_pairs_bf16)
  const E* b_shrink;  // packed Bᵀ
  const E* a_expand;  // packed A for the expand
  float s;
  E* dx;  // [T, K] contiguous holding g·W, or null
  bool want_gb, want_da, want_db;
};

// Per-thread scratch.
template <typename E>
struct Scratch {
  std::vector<float> out;  // [8][32] fp32: one shrink or expand tile
  std::vector<E> gbrow;    // [panel][Rp]: gB rows (the expand's broadcast operands)
  std::vector<E> gbt;      // [Rp][panel]: gBᵀ (dA's; bf16: token pairs adjacent)
  std::vector<E> ht;       // [Rp][panel]: hᵀ (dB's)
  std::vector<E> zs;       // [panel][32]: the last, partial 32-column block of a panel, zero padded
  std::vector<E> odd;      // [2][Cp]: bf16 only: the odd last row of the last panel and a zero row
};

// s·Z·Mᵀ for the panel's rows (rounded to bf16) → rows (optional, [rows][Rp]) and transposed pairs ([Rp][panel]).
LOWRANK_AVX512_BF16 void shrink_panel(const Tail<bf16>& a, const bf16* z, int64_t ldz, int64_t Kz, const bf16* mp,
                                      int64_t rows, bf16* rows_out, bf16* tr, float* out) {
  auto* tr_out = reinterpret_cast<uint16_t*>(tr);
  const __m512 sv = _mm512_set1_ps(a.s);
  for (int64_t t0 = 0; t0 < rows; t0 += kShrinkTokens) {
    const int nt = static_cast<int>(std::min<int64_t>(kShrinkTokens, rows - t0));
    for (int64_t g = 0; g < a.G; ++g) {
      shrink_block<bf16>(nt, z + t0 * ldz, ldz, Kz, mp, g, out);
      alignas(64) uint16_t v[16];
      for (int t = 0; t < nt; ++t) {
        const __m256i b = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(out + 16 * t), sv));
        if (rows_out) _mm256_storeu_si256(reinterpret_cast<__m256i*>(rows_out + (t0 + t) * a.Rp + 16 * g), b);
        _mm256_store_si256(reinterpret_cast<__m256i*>(v), b);
        for (int j = 0; j < 16; ++j) tr_out[(16 * g + j) * a.panel + t0 + t] = v[j];
      }
    }
  }
}

// acc[Rp][nb][2][16] += Mᵀ·Z over the panel's rows (Z: [rows, C], row stride ldz; mt: [Rp][panel] bf16 with token
// pairs adjacent, zero past rows).
LOWRANK_AVX512_BF16 void reduce_panel(const bf16* z, int64_t ldz, int64_t rows, int64_t C, const bf16* mtb,
                                      int64_t panel, int64_t Rp, float* acc, Scratch<bf16>& sc) {
  const auto* mt = reinterpret_cast<const uint16_t*>(mtb);
  const int64_t nb = (C + 31) / 32, full = C / 32, pairs = rows / 2, ldm = panel / 2;
  const int64_t lda = nb * 32;
  auto ranks = [&](const bf16* zz, int64_t ld, int64_t np, int64_t p0, int64_t blk) {
    for (int64_t k0 = 0; k0 < Rp; k0 += kRanksPerReduce)
      reduce_block(zz, ld, np, reinterpret_cast<const int32_t*>(mt + k0 * panel) + p0, ldm,
                   acc + k0 * lda + blk * 32, lda);
  };
  for (int64_t blk = 0; blk < full; ++blk) ranks(z + blk * 32, ldz, pairs, 0, blk);
  if (full < nb && pairs > 0) {
    const int64_t w = C - full * 32;
    std::fill(sc.zs.begin(), sc.zs.end(), bf16(0.f));
    for (int64_t t = 0; t < 2 * pairs; ++t) std::memcpy(sc.zs.data() + t * 32, z + t * ldz + full * 32, w * sizeof(bf16));
    ranks(sc.zs.data(), 32, pairs, 0, full);
  }
  if (rows % 2) {  // the odd last token: its row and a zero row as one pair
    const int64_t Cp = nb * 32;
    std::fill(sc.odd.begin(), sc.odd.begin() + 2 * Cp, bf16(0.f));
    std::memcpy(sc.odd.data(), z + (rows - 1) * ldz, C * sizeof(bf16));
    for (int64_t blk = 0; blk < nb; ++blk) ranks(sc.odd.data() + blk * 32, Cp, 1, pairs, blk);
  }
}

// fp32: s·Z·Mᵀ for the panel's rows → rows (optional, [rows][Rp]) and transposed ([Rp][panel]). 6 tokens per tile:
// 4 accumulators each (24) leave registers for the operands.
constexpr int64_t kShrinkTokensF32 = 6;
LOWRANK_AVX512_BF16 void shrink_panel(const Tail<float>& a, const float* z, int64_t ldz, int64_t Kz,
                                      const float* mp, int64_t rows, float* rows_out, float* tr_out, float* out) {
  for (int64_t t0 = 0; t0 < rows; t0 += kShrinkTokensF32) {
    const int nt = static_cast<int>(std::min<int64_t>(kShrinkTokensF32, rows - t0));
    for (int64_t g = 0; g < a.G; ++g) {
      shrink_block<float>(nt, z + t0 * ldz, ldz, Kz, mp, g, out);
      for (int t = 0; t < nt; ++t)
        for (int j = 0; j < 16; ++j) {
          const float v = a.s * out[16 * t + j];
          if (rows_out) rows_out[(t0 + t) * a.Rp + 16 * g + j] = v;
          tr_out[(16 * g + j) * a.panel + t0 + t] = v;
        }
    }
  }
}

// fp32: acc[Rp][nb][32] += Mᵀ·Z over the panel's rows (mt: [Rp][panel]).
LOWRANK_AVX512_BF16 void reduce_panel(const float* z, int64_t ldz, int64_t rows, int64_t C, const float* mt,
                                      int64_t panel, int64_t Rp, float* acc, Scratch<float>& sc) {
  const int64_t nb = (C + 31) / 32, full = C / 32, lda = nb * 32;
  auto ranks = [&](const float* zz, int64_t ld, int64_t blk) {
    for (int64_t k0 = 0; k0 < Rp; k0 += kRanksPerReduceF32)
      reduce_block_f32(zz, ld, rows, mt + k0 * panel, panel, acc + k0 * lda + blk * 32, lda);
  };
  for (int64_t blk = 0; blk < full; ++blk) ranks(z + blk * 32, ldz, blk);
  if (full < nb) {
    const int64_t w = C - full * 32;
    std::fill(sc.zs.begin(), sc.zs.end(), 0.f);
    for (int64_t t = 0; t < rows; ++t) std::memcpy(sc.zs.data() + t * 32, z + t * ldz + full * 32, w * sizeof(float));
    ranks(sc.zs.data(), 32, full);
  }
}

// d[0:w] += v[0:w] (w ≤ 32 as masks m0 / m1 of the two halves), rounded once for bf16.
LOWRANK_AVX512_BF16 inline void add_row(bf16* d, __mmask16 m0, __mmask16 m1, const float* v) {
  const __m512 d0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m0, d)), 16));
  const __m512 d1 =
      _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m1, d + 16)), 16));
  _mm256_mask_storeu_epi16(d, m0, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(d0, _mm512_loadu_ps(v))));
  _mm256_mask_storeu_epi16(d + 16, m1, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(d1, _mm512_loadu_ps(v + 16))));
}
LOWRANK_AVX512_BF16 inline void add_row(float* d, __mmask16 m0, __mmask16 m1, const float* v) {
  _mm512_mask_storeu_ps(d, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, d), _mm512_loadu_ps(v)));
  _mm512_mask_storeu_ps(d + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, d + 16), _mm512_loadu_ps(v + 16)));
}

// dx rows [t0, t0 + rows) += gB·A (bf16: rounded once). Token blocks outside, columns inside: dx comes from the
// GEMM's streaming stores (not in cache), and eight rows read front to back are streams the prefetcher follows;
// walking a column block down the rows instead missed on every row (measured: 0.3 ms of 0.4 at 2048×768).
template <typename E>
LOWRANK_AVX512_BF16 void expand_panel(const Tail<E>& a, int64_t t0, int64_t rows, const E* gbrow, float* out) {
  const int64_t Kp = (a.K + 31) / 32 * 32;
  for (int64_t t = 0; t < rows; t += kShrinkTokens) {
    const int nt = static_cast<int>(std::min<int64_t>(kShrinkTokens, rows - t));
    for (int64_t c0 = 0; c0 < a.K; c0 += 32) {
      // Lane masks of the two 16-column halves of this block of columns.
      const __mmask16 m0 = mask16(a.K - c0), m1 = mask16(a.K - c0 - 16);
      expand_block<E>(nt, gbrow + t * a.Rp, a.Rp, a.Rp, a.a_expand, Kp, c0, out);
      for (int j = 0; j < nt; ++j) add_row(a.dx + (t0 + t + j) * a.K + c0, m0, m1, out + 32 * j);
    }
  }
}

template <typename E>
LOWRANK_AVX512_BF16 void tail_panel(const Tail<E>& a, int64_t t0, int64_t rows, float* acc_a, float* acc_b,
                                    Scratch<E>& sc) {
  if (std::is_same_v<E, bf16> && rows % 2) {  // pairs (rows - 1, rows): the second is not a token
    for (int64_t k = 0; k < a.Rp; ++k) sc.gbt[k * a.panel + rows] = sc.ht[k * a.panel + rows] = E(0.f);
  }
  if (a.want_gb)
    shrink_panel(a, a.g + t0 * a.ldg, a.ldg, a.N, a.b_shrink, rows, sc.gbrow.data(), sc.gbt.data(), sc.out.data());
  if (a.want_db) {
    shrink_panel(a, a.x + t0 * a.ldx, a.ldx, a.K, a.a_shrink, rows, nullptr, sc.ht.data(), sc.out.data());
    reduce_panel(a.g + t0 * a.ldg, a.ldg, rows, a.N, sc.ht.data(), a.panel, a.Rp, acc_b, sc);
  }
  if (a.want_da) reduce_panel(a.x + t0 * a.ldx, a.ldx, rows, a.K, sc.gbt.data(), a.panel, a.Rp, acc_a, sc);
  if (a.dx != nullptr) expand_panel(a, t0, rows, sc.gbrow.data(), sc.out.data());
}

// Σ over threads of the accumulators ([Rp][nb][32] fp32, `per` floats each), for bf16 the lane order of the
// interleaved halves undone, written (rounded for bf16) into O[j·sj + i·si] for j < r, i < cols.
template <typename E>
void gather(const float* S, int64_t nt, int64_t per, int64_t r, int64_t cols, int64_t nb, E* O, int64_t sj,
            int64_t si) {
  constexpr bool kPairs = std::is_same_v<E, bf16>;
  std::vector<float> row(nb * 32);
  for (int64_t j = 0; j < r; ++j) {
    std::fill(row.begin(), row.end(), 0.f);
    for (int64_t t = 0; t < nt; ++t) {
      const float* src = S + t * per + j * nb * 32;
      for (int64_t blk = 0; blk < nb; ++blk)
        for (int64_t h = 0; h < 2; ++h)
          for (int64_t q = 0; q < 16; ++q)
            row[kPairs ? blk * 32 + 8 * (q / 4) + 4 * h + q % 4 : blk * 32 + 16 * h + q] += src[blk * 32 + 16 * h + q];
    }
    for (int64_t i = 0; i < cols; ++i) O[j * sj + i * si] = E(row[i]);
  }
}
#endif  // LOWRANK_HAVE_RANK_AVX512

}  // namespace

at::Tensor pack_pairs_bf16(const at::Tensor& m) {
  const int64_t r = m.size(0), K = m.size(1), G = (r + 15) / 16, P = (K + 1) / 2;
  at::Tensor out = at::zeros({G, P, 16, 2}, m.options());
  const bf16* M = m.const_data_ptr<bf16>();
  bf16* O = out.mutable_data_ptr<bf16>();
  const int64_t s0 = m.stride(0), s1 = m.stride(1);
  // Packed on every call (per adapter, per step): loops that read the source in its memory order and move a pair
  // at a time when it is contiguous.
  if (s1 == 1) {  // rows contiguous: (M[j, 2p], M[j, 2p + 1]) is one 32-bit word
    for (int64_t j = 0; j < r; ++j) {
      const bf16* row = M + j * s0;
      bf16* dst = O + (j / 16) * P * 32 + (j % 16) * 2;
      for (int64_t p = 0; p < K / 2; ++p) std::memcpy(dst + p * 32, row + 2 * p, 2 * sizeof(bf16));
      if (K % 2) dst[(K / 2) * 32] = row[K - 1];
    }
  } else if (s0 == 1) {  // Mᵀ row-major (Bᵀ of a row-major B): column k of M is contiguous
    for (int64_t k = 0; k < K; ++k) {
      const bf16* col = M + k * s1;
      bf16* dst = O + (k / 2) * 32 + (k % 2);
      for (int64_t j = 0; j < r; ++j) dst[(j / 16) * P * 32 + (j % 16) * 2] = col[j];
    }
  } else {
    for (int64_t j = 0; j < r; ++j) {
      bf16* dst = O + (j / 16) * P * 32 + (j % 16) * 2;
      for (int64_t k = 0; k < K; ++k) dst[(k / 2) * 32 + (k % 2)] = M[j * s0 + k * s1];
    }
  }
  return out;
}

namespace {
#if LOWRANK_HAVE_RANK_AVX512
// fp32 packs: M [r, K] → [G][K][16] (lane j of row i holds M[16g + j, i]); A [r, K] → [Rp][Kp] (Kp: K rounded up to
// 32), zero padded.
at::Tensor pack_shrink_f32(const at::Tensor& m) {
  const int64_t r = m.size(0), K = m.size(1), G = (r + 15) / 16;
  at::Tensor out = at::zeros({G, K, 16}, m.options());
  for (int64_t g = 0; g < G; ++g) {
    const int64_t n = std::min<int64_t>(16, r - 16 * g);
    out.select(0, g).narrow(1, 0, n).copy_(m.narrow(0, 16 * g, n).t());
  }
  return out;
}
at::Tensor pack_expand_f32(const at::Tensor& a, int64_t Rp) {
  const int64_t r = a.size(0), K = a.size(1), Kp = (K + 31) / 32 * 32;
  at::Tensor out = at::zeros({Rp, Kp}, a.options());
  out.narrow(0, 0, r).narrow(1, 0, K).copy_(a);
  return out;
}
at::Tensor pack_shrink(const at::Tensor& m) {
  return m.scalar_type() == at::kBFloat16 ? pack_pairs_bf16(m) : pack_shrink_f32(m);
}
at::Tensor pack_expand_any(const at::Tensor& a, int64_t Rp) {
  return a.scalar_type() == at::kBFloat16 ? pack_expand(a, Rp) : pack_expand_f32(a, Rp);
}
#endif
#if LOWRANK_HAVE_RANK_AVX512
// H[t, :] = s·Z[t, :]·Mᵀ for blocks of NB tokens (NB: the tile's token count), every rank group of a block while
// its rows are in L1.
template <typename E, int64_t NB, typename Tile>
void shrink_rows(const E* Z, int64_t ldz, int64_t T, int64_t K, const E* MP, int64_t group_elems, int64_t G,
                 int64_t r, float s, float* H, Tile tile) {
  at::parallel_for(0, (T + NB - 1) / NB, 4, [&](int64_t b0, int64_t b1) {
    alignas(64) float out[kShrinkTokens * 16];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * NB;
      const int nt = static_cast<int>(std::min<int64_t>(NB, T - t0));
      for (int64_t g = 0; g < G; ++g) {
        tile(nt, Z + t0 * ldz, MP + g * group_elems, out);
        const int64_t cols = std::min<int64_t>(16, r - 16 * g);
        for (int t = 0; t < nt; ++t)
          for (int64_t j = 0; j < cols; ++j) H[(t0 + t) * r + 16 * g + j] = s * out[16 * t + j];
      }
    }
  });
}
#endif
}  // namespace

at::Tensor shrink_avx512(const at::Tensor& z, const at::Tensor& m, double scale) {
  TORCH_CHECK(tail_avx512_supported(z, m) && m.size(1) == z.size(1), "shrink_avx512: unsupported arguments");
  const int64_t T = z.size(0), K = z.size(1), r = m.size(0), G = (r + 15) / 16, ldz = z.stride(0);
  at::Tensor h = at::empty({T, r}, z.options().dtype(at::kFloat));
#if LOWRANK_HAVE_RANK_AVX512
  float* H = h.mutable_data_ptr<float>();
  const auto s = static_cast<float>(scale);
  if (z.scalar_type() == at::kBFloat16) {
    const at::Tensor mp = pack_pairs_bf16(m);
    shrink_rows<bf16, kShrinkTokens>(z.const_data_ptr<bf16>(), ldz, T, K, mp.const_data_ptr<bf16>(),
                                     mp.size(1) * 32, G, r, s, H, [&](int nt, const bf16* zz, const bf16* mg, float* o) {
      dispatch_tokens(nt, [&](auto n) { shrink_tile<decltype(n)::value>(zz, ldz, K, mg, o); });
    });
  } else {
    const at::Tensor mp = pack_shrink_f32(m);
    shrink_rows<float, kShrinkTokensF32>(z.const_data_ptr<float>(), ldz, T, K, mp.const_data_ptr<float>(), K * 16,
                                         G, r, s, H, [&](int nt, const float* zz, const float* mg, float* o) {
      dispatch_tokens(nt, [&](auto n) { shrink_tile_f32<decltype(n)::value>(zz, ldz, K, mg, o); });
    });
  }
#endif
  return h;
}

bool rank_avx512_supported(const at::Tensor& z, const at::Tensor& m) {
  return has_avx512_bf16() && z.scalar_type() == at::kBFloat16 && m.scalar_type() == at::kBFloat16 &&
         z.dim() == 2 && m.dim() == 2 && z.stride(1) == 1 && z.size(0) >= 1 && z.size(1) >= 1 && m.size(0) >= 1 &&
         m.size(1) >= 1;
}

bool tail_avx512_supported(const at::Tensor& z, const at::Tensor& m) {
  const auto t = z.scalar_type();
  return has_avx512_bf16() && (t == at::kBFloat16 || t == at::kFloat) && m.scalar_type() == t && z.dim() == 2 &&
         m.dim() == 2 && z.stride(1) == 1 && z.size(0) >= 1 && z.size(1) >= 1 && m.size(0) >= 1 && m.size(1) >= 1;
}

namespace {


template <typename E>
void tail_impl(at::Tensor* dx, const at::Tensor& x2, const at::Tensor& g2, const std::vector<at::Tensor>& a,
               const std::vector<at::Tensor>& b, const std::vector<double>& scale,
               const std::vector<TailPiece>& pieces, std::vector<at::Tensor>* da, std::vector<at::Tensor>* db) {
  const int64_t K = x2.size(1), N = g2.size(1), F = static_cast<int64_t>(a.size());
  const int64_t nbx = (K + 31) / 32, nbn = (N + 31) / 32;
  const int nthreads = std::max(1, at::get_num_threads());
  // Per factor: its rank groups and the offsets of its accumulators in each thread's block.
  std::vector<int64_t> G(F), off_a(F + 1, 0), off_b(F + 1, 0);
  int64_t rp_max = 16;
  for (int64_t f = 0; f < F; ++f) {
    G[f] = (a[f].size(0) + 15) / 16;
    rp_max = std::max(rp_max, 16 * G[f]);
    off_a[f + 1] = off_a[f] + (da ? 16 * G[f] * nbx * 32 : 0);
    off_b[f + 1] = off_b[f] + (db ? 16 * G[f] * nbn * 32 : 0);
  }
  at::Tensor acc_a = da ? at::zeros({nthreads, off_a[F]}, x2.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor acc_b = db ? at::zeros({nthreads, off_b[F]}, x2.options().dtype(at::kFloat)) : at::Tensor();
#if LOWRANK_HAVE_RANK_AVX512
  const int64_t pt = panel_tokens(K, N);
  const bool want_gb = dx != nullptr || da != nullptr;
  std::vector<at::Tensor> packs;
  std::vector<Tail<E>> tails;
  for (int64_t f = 0; f < F; ++f) {
    const at::Tensor a_shrink = pack_shrink(a[f]);
    const at::Tensor b_shrink = want_gb ? pack_shrink(b[f].t()) : a_shrink;
    const at::Tensor a_expand = dx ? pack_expand_any(a[f], 16 * G[f]) : a_shrink;
    packs.insert(packs.end(), {a_shrink, b_shrink, a_expand});
    tails.push_back(Tail<E>{x2.const_data_ptr<E>(), x2.stride(0), g2.const_data_ptr<E>(), g2.stride(0), x2.size(0),
                            K, N, G[f], 16 * G[f], pt, a_shrink.const_data_ptr<E>(), b_shrink.const_data_ptr<E>(),
                            a_expand.const_data_ptr<E>(), static_cast<float>(scale[f]),
                            dx ? dx->mutable_data_ptr<E>() : nullptr, want_gb, da != nullptr, db != nullptr});
  }
  struct Item {
    int64_t factor, t0, rows;
  };
  std::vector<Item> items;  // panels of ≤ pt rows (even: bf16 token pairs never straddle two panels)
  for (const auto& p : pieces)
    for (int64_t t = 0; t < p.rows; t += pt) items.push_back({p.factor, p.row0 + t, std::min(pt, p.rows - t)});
  const int64_t Cp = std::max(nbx, nbn) * 32;
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b0, int64_t b1) {
    const int tid = std::min(at::get_thread_num(), nthreads - 1);
    Scratch<E> sc{std::vector<float>(8 * 32), std::vector<E>(pt * rp_max), std::vector<E>(rp_max * pt, E(0.f)),
                  std::vector<E>(rp_max * pt, E(0.f)), std::vector<E>(pt * 32), std::vector<E>(2 * Cp)};
    float* pa = da ? acc_a.mutable_data_ptr<float>() + tid * acc_a.size(1) : nullptr;
    float* pb = db ? acc_b.mutable_data_ptr<float>() + tid * acc_b.size(1) : nullptr;
    for (int64_t i = b0; i < b1; ++i) {
      const Item& it = items[i];
      tail_panel<E>(tails[it.factor], it.t0, it.rows, pa ? pa + off_a[it.factor] : nullptr,
                    pb ? pb + off_b[it.factor] : nullptr, sc);
    }
  });
#endif
  // dA [r, K] (out[j, i]) or dB [N, r] (out[i, j]); a tensor defined on entry is written in place.
  auto write = [&](const at::Tensor& acc, int64_t off, int64_t r, int64_t cols, int64_t nb, at::Tensor* out,
                   bool transposed) {
    const auto shape = transposed ? std::vector<int64_t>{cols, r} : std::vector<int64_t>{r, cols};
    if (!out->defined()) *out = at::empty(shape, x2.options());
    TORCH_CHECK(out->scalar_type() == x2.scalar_type() && out->sizes() == at::IntArrayRef(shape),
                "lora_backward_tail_avx512: bad output");
    const int64_t sj = transposed ? out->stride(1) : out->stride(0), si = transposed ? out->stride(0) : out->stride(1);
#if LOWRANK_HAVE_RANK_AVX512
    gather<E>(acc.const_data_ptr<float>() + off, acc.size(0), acc.size(1), r, cols, nb, out->mutable_data_ptr<E>(),
              sj, si);
#endif
  };
  for (int64_t f = 0; f < F; ++f) {
    if (da) write(acc_a, off_a[f], a[f].size(0), K, nbx, &(*da)[f], false);
    if (db) write(acc_b, off_b[f], a[f].size(0), N, nbn, &(*db)[f], true);
  }
}

}  // namespace

void lora_backward_tail_multi_avx512(at::Tensor* dx, const at::Tensor& x2, const at::Tensor& g2,
                                     const std::vector<at::Tensor>& lora_a, const std::vector<at::Tensor>& lora_b,
                                     const std::vector<double>& scale, const std::vector<TailPiece>& pieces,
                                     std::vector<at::Tensor>* da, std::vector<at::Tensor>* db) {
  const int64_t T = x2.size(0), K = x2.size(1), N = g2.size(1);
  const size_t F = lora_a.size();
  TORCH_CHECK(F >= 1 && lora_b.size() == F && scale.size() == F && (!da || da->size() == F) &&
                  (!db || db->size() == F) && g2.scalar_type() == x2.scalar_type() && g2.size(0) == T &&
                  (dx == nullptr || (dx->scalar_type() == x2.scalar_type() && dx->is_contiguous() &&
                                     dx->sizes() == x2.sizes())),
              "lora_backward_tail_avx512: unsupported arguments");
  for (size_t f = 0; f < F; ++f)
    TORCH_CHECK(tail_avx512_supported(x2, lora_a[f]) && tail_avx512_supported(g2, lora_b[f]) &&
                    lora_a[f].size(1) == K && lora_b[f].size(0) == N && lora_b[f].size(1) == lora_a[f].size(0),
                "lora_backward_tail_avx512: bad factor shapes");
  for (const auto& p : pieces)
    TORCH_CHECK(p.factor >= 0 && p.factor < static_cast<int64_t>(F) && p.row0 >= 0 && p.rows >= 0 &&
                    p.row0 + p.rows <= T,
                "lora_backward_tail_avx512: piece out of range");
  if (x2.scalar_type() == at::kBFloat16) {
    tail_impl<bf16>(dx, x2, g2, lora_a, lora_b, scale, pieces, da, db);
  } else {
    tail_impl<float>(dx, x2, g2, lora_a, lora_b, scale, pieces, da, db);
  }
}

void lora_backward_tail_avx512(at::Tensor* dx, const at::Tensor& x2, const at::Tensor& g2, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, double scale, at::Tensor* da, at::Tensor* db) {
  std::vector<at::Tensor> das{da ? *da : at::Tensor()}, dbs{db ? *db : at::Tensor()};
  lora_backward_tail_multi_avx512(dx, x2, g2, {lora_a}, {lora_b}, {scale}, {TailPiece{0, 0, x2.size(0)}},
                                  da ? &das : nullptr, db ? &dbs : nullptr);
  if (da) *da = das[0];
  if (db) *db = dbs[0];
}

namespace {

#if LOWRANK_HAVE_RANK_AVX512
// Tokens of one work item of the segmented forward: a block of one adapter's rows, small enough that 2 threads
// get balanced shares of a few segments, large enough that an item's packs stay in L1/L2 while it runs.
constexpr int64_t kSegItem = 64;

// One block of ≤ NB tokens of a segment (rows pr[0..nt)): h = s·x·Aᵀ (rounded to E), then y += h·Bᵀ, 32 columns
// at a time. A function with the AVX-512 target (not the parallel lambda) so that add_row and the conversions inline.
template <typename E>
LOWRANK_AVX512_BF16 void segment_block(const E* X, int64_t ldx, int64_t K, E* Y, int64_t ldy, int64_t N,
                                       const int64_t* pr, int nt, int64_t G, float s, const E* mp, const E* ae,
                                       E* zbuf, E* hrow, float* out) {
  constexpr bool kBf16 = std::is_same_v<E, bf16>;
  const int64_t Rp = 16 * G, Np = (N + 31) / 32 * 32;
  bool run = true;  // consecutive token rows (one sequence per adapter): x read in place
  for (int j = 1; j < nt; ++j) run = run && pr[j] == pr[0] + j;
  const E* z = X + pr[0] * ldx;
  int64_t ldz = ldx;
  if (!run) {
    for (int j = 0; j < nt; ++j) std::memcpy(zbuf + j * K, X + pr[j] * ldx, K * sizeof(E));
    z = zbuf;
    ldz = K;
  }
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t g = 0; g < G; ++g) {
    shrink_block<E>(nt, z, ldz, K, mp, g, out);
    for (int j = 0; j < nt; ++j) {
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(out + 16 * j), sv);
      if constexpr (kBf16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(hrow + j * Rp + 16 * g), (__m256i)_mm512_cvtneps_pbh(v));
      } else {
        _mm512_storeu_ps(hrow + j * Rp + 16 * g, v);
      }
    }
  }
  for (int64_t c0 = 0; c0 < N; c0 += 32) {
    const __mmask16 m0 = mask16(N - c0), m1 = mask16(N - c0 - 16);
    expand_block<E>(nt, hrow, Rp, Rp, ae, Np, c0, out);
    for (int j = 0; j < nt; ++j) add_row(Y + pr[j] * ldy + c0, m0, m1, out + 32 * j);
  }
}

template <typename E>
void segment_lora_impl(at::Tensor& y, const at::Tensor& x2, const int64_t* perm, const std::vector<Segment>& segs,
                       const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& bt) {
  constexpr int64_t NB = std::is_same_v<E, bf16> ? kShrinkTokens : kShrinkTokensF32;
  const int64_t K = x2.size(1), N = y.size(1);
  const auto nseg = static_cast<int64_t>(segs.size());
  std::vector<at::Tensor> shr(nseg), expn(nseg);
  std::vector<int64_t> G(nseg);
  int64_t max_rp = 16;
  struct Item {
    int64_t seg, i0, n;
  };
  std::vector<Item> items;
  for (int64_t s = 0; s < nseg; ++s) {
    G[s] = (segs[s].rank + 15) / 16;
    max_rp = std::max(max_rp, 16 * G[s]);
    shr[s] = pack_shrink(a[s]);
    expn[s] = pack_expand_any(bt[s], 16 * G[s]);
    for (int64_t i = segs[s].begin; i < segs[s].end; i += kSegItem)
      items.push_back({s, i, std::min(kSegItem, segs[s].end - i)});
  }
  const E* X = x2.const_data_ptr<E>();
  E* Y = y.mutable_data_ptr<E>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float out[kShrinkTokens * 32];
    std::vector<E> zbuf(NB * K), hrow(NB * max_rp, E(0.f));
    for (int64_t it = b0; it < b1; ++it) {
      const Item& item = items[it];
      const Segment& sg = segs[item.seg];
      for (int64_t t = 0; t < item.n; t += NB)
        segment_block<E>(X, x2.stride(0), K, Y, y.stride(0), N, perm + item.i0 + t,
                         static_cast<int>(std::min<int64_t>(NB, item.n - t)), G[item.seg],
                         static_cast<float>(sg.scale), shr[item.seg].template const_data_ptr<E>(),
                         expn[item.seg].template const_data_ptr<E>(), zbuf.data(), hrow.data(), out);
    }
  });
}
#endif

}  // namespace

bool segment_lora_avx512_supported(const at::Tensor& x2, const at::Tensor& y) {
  return has_avx512_bf16() && (x2.scalar_type() == at::kBFloat16 || x2.scalar_type() == at::kFloat) &&
         y.scalar_type() == x2.scalar_type() && x2.dim() == 2 && y.dim() == 2 && x2.stride(1) == 1 &&
         y.stride(1) == 1 && x2.size(1) >= 1 && y.size(1) >= 1 && y.size(0) == x2.size(0);
}

void segment_lora_add_avx512(at::Tensor& y2, const at::Tensor& x2, const at::Tensor& perm,
                             const std::vector<Segment>& segs, const std::vector<at::Tensor>& a,
                             const std::vector<at::Tensor>& bt) {
  TORCH_CHECK(segment_lora_avx512_supported(x2, y2) && perm.scalar_type() == at::kLong && perm.is_contiguous() &&
                  a.size() == segs.size() && bt.size() == segs.size(),
              "segment_lora_add_avx512: unsupported arguments");
  for (size_t s = 0; s < segs.size(); ++s)
    TORCH_CHECK(a[s].scalar_type() == x2.scalar_type() && bt[s].scalar_type() == x2.scalar_type() &&
                    a[s].size(0) == segs[s].rank && a[s].size(1) == x2.size(1) && bt[s].size(0) == segs[s].rank &&
                    bt[s].size(1) == y2.size(1),
                "segment_lora_add_avx512: bad factor shapes");
#if LOWRANK_HAVE_RANK_AVX512
  if (x2.scalar_type() == at::kBFloat16) {
    segment_lora_impl<bf16>(y2, x2, perm.const_data_ptr<int64_t>(), segs, a, bt);
  } else {
    segment_lora_impl<float>(y2, x2, perm.const_data_ptr<int64_t>(), segs, a, bt);
  }
#endif
}

}  // namespace lowrank::cpu
