// Rank-r products of the LoRA backward on AMX tiles (contract in lowrank_kernels.h):
//   shrink_amx:  H = s · Z·Mᵀ   Z [T, K] bf16, M [r, K] bf16 (any strides)     → [T, r] fp32
//   tn_amx:      D = s · Mᵀ·Z   M [T, r] bf16 (any strides), Z [T, K] bf16     → [r, K] fp32
// Why: these are GEMMs with one side of 16 (N = r or M = r). oneDNN ran them at ~35–60 GFLOP/s here
// (2048×768×16: ~0.4–0.8 ms each, four per backward step, more than the rest of LoRA's extra work), while one
// tile product is 16×16×32 MACs: on the tile unit they cost about one read of Z. Z is read in place for the
// shrink (its rows are A tiles); for tn the reduction runs over tokens, so each 32-token × 32-column piece of Z
// is interleaved into the VNNI pair layout of two B tiles in a 2 KB scratch (two VPERMT2W per row pair).
#include "cpu/lowrank_kernels.h"
#include "cpu/amx_tiles.h"
#include "cpu/masks.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <immintrin.h>
#define LOWRANK_HAVE_RANK_AMX 1
#define LOWRANK_AMX_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")))
#else
#define LOWRANK_HAVE_RANK_AMX 0
#endif

namespace lowrank::cpu {
namespace {

using bf16 = c10::BFloat16;

#if LOWRANK_HAVE_RANK_AMX
// Every tile 16 rows × 64 bytes: C tiles 16×16 fp32, A tiles 16×32 bf16, B tiles 16 pairs × 16 columns.
LOWRANK_AMX_BF16 void load_full_config(TileConfig& cfg) { load_uniform_tile_config(cfg); }

LOWRANK_AMX_BF16 void release_tiles() { _tile_release(); }

// M [r, K] (strides sm0, sm1) → [G][P][16][2] bf16, G = ⌈r/16⌉, P = ⌈K/32⌉·16 (whole 32-wide chunks, zero
// padded): the B tiles of the shrink.
at::Tensor pack_m(const at::Tensor& m) {
  const int64_t r = m.size(0), K = m.size(1), G = (r + 15) / 16, P = (K + 31) / 32 * 16;
  at::Tensor out = at::zeros({G, P, 16, 2}, m.options());
  const bf16* M = m.const_data_ptr<bf16>();
  bf16* O = out.mutable_data_ptr<bf16>();
  const int64_t s0 = m.stride(0), s1 = m.stride(1);
  // Walk M in its memory order: row by row when its columns are the unit stride (A), column by column when its
  // rows are (lora_b.t(), s0 = 1: one row of B per k, where the joint buffer puts B's rows in + r apart).
  if (s1 <= s0) {
    for (int64_t j = 0; j < r; ++j) {
      bf16* dst = O + (j / 16) * P * 32 + (j % 16) * 2;
      for (int64_t k = 0; k < K; ++k) dst[(k / 2) * 32 + (k % 2)] = M[j * s0 + k * s1];
    }
  } else {
    // Each k is a row of B in its own cache line (and, for wide layers, its own page): prefetch rows ahead so
    // that the misses overlap.
    constexpr int64_t kAhead = 32;
    for (int64_t k = 0; k < K; ++k) {
      if (k + kAhead < K) __builtin_prefetch(M + (k + kAhead) * s1);
      for (int64_t j = 0; j < r; ++j) O[(j / 16) * P * 32 + (k / 2) * 32 + (j % 16) * 2 + (k % 2)] = M[j * s0 + k * s1];
    }
  }
  return out;
}

// 16 rows of Z (row stride ldz elements, readable over whole 32-wide chunks) · packed M → s·H rows.
LOWRANK_AMX_BF16 void shrink_rows(const bf16* z, int64_t ldz, int64_t chunks, const bf16* mp, int64_t G,
                                  int64_t P, float s, float* h, int64_t r, int64_t rows) {
  alignas(64) float c[16][16];
  for (int64_t g = 0; g < G; ++g) {
    const bf16* mg = mp + g * P * 32;
    _tile_zero(0);
    for (int64_t q = 0; q < chunks; ++q) {
      _tile_loadd(1, z + q * 32, ldz * static_cast<int64_t>(sizeof(bf16)));
      _tile_loadd(2, mg + q * 16 * 32, 64);
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, c, 64);
    const int64_t n = std::min<int64_t>(16, r - g * 16);
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t j = 0; j < n; ++j) h[t * r + g * 16 + j] = s * c[t][j];
  }
}

// Interleave rows t and t+1 of a 32-column piece: out row p = (z[t][k], z[t+1][k]) for k = 0..15 (tile b0) and
// k = 16..31 (tile b1).
LOWRANK_AMX_BF16 inline void pair_rows(const bf16* r0, const bf16* r1, __mmask32 m, bf16* b0, bf16* b1) {
  static const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39,
                                             7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  static const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55,
                                             23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  const __m512i a = r0 ? _mm512_maskz_loadu_epi16(m, r0) : _mm512_setzero_si512();
  const __m512i b = r1 ? _mm512_maskz_loadu_epi16(m, r1) : _mm512_setzero_si512();
  _mm512_storeu_si512(b0, _mm512_permutex2var_epi16(a, lo, b));
  _mm512_storeu_si512(b1, _mm512_permutex2var_epi16(a, hi, b));
}

// One 32-column block of D = s·Mᵀ·Z for a 16-row group of Mᵀ (mt: [16][Tp] bf16, Tp a multiple of 32).
LOWRANK_AMX_BF16 void tn_block(const bf16* z, int64_t ldz, int64_t T, int64_t K, int64_t k0, const bf16* mt,
                               int64_t Tp, float s, float* d, int64_t rows) {
  alignas(64) bf16 b0[16][32];
  alignas(64) bf16 b1[16][32];
  alignas(64) float c[2][16][16];
  const int64_t cols = std::min<int64_t>(32, K - k0);
  const auto m = mask32(cols);
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t t0 = 0; t0 < Tp; t0 += 32) {
    for (int64_t p = 0; p < 16; ++p) {
      const int64_t t = t0 + 2 * p;
      pair_rows(t < T ? z + t * ldz + k0 : nullptr, t + 1 < T ? z + (t + 1) * ldz + k0 : nullptr, m, b0[p],
                b1[p]);
    }
    _tile_loadd(2, mt + t0, Tp * static_cast<int64_t>(sizeof(bf16)));
    _tile_loadd(3, b0, 64);
    _tile_loadd(4, b1, 64);
    _tile_dpbf16ps(0, 2, 3);
    _tile_dpbf16ps(1, 2, 4);
  }
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) d[i * K + k0 + j] = s * c[j / 16][i][j % 16];
}

// Long reductions (a few rows of M against a large Z, e.g. dx = g·W at decode, dA = gBᵀ·x): Z is walked in
// 32-row panels, each pair of rows read front to back (two streams the prefetcher follows; walking 32 rows per
// 32-column block instead was bound by load latency) into the VNNI B tiles of every 32-column block (bscr:
// [blocks][2][16][32] bf16), then one tile product per block, the C tiles living in an fp32 accumulator
// (acc: [blocks][2][16][16]) between panels. Columns [k0, k1) of D, k0 a multiple of 32.
LOWRANK_AMX_BF16 void tn_panels(const bf16* z, int64_t ldz, int64_t T, int64_t K, int64_t k0, int64_t k1,
                                const bf16* mt, int64_t Tp, float s, float* d, int64_t rows, float* acc,
                                bf16* bscr) {
  const int64_t nb = (k1 - k0 + 31) / 32;
  for (int64_t t0 = 0; t0 < Tp; t0 += 32) {
    for (int64_t p = 0; p < 16; ++p) {
      const int64_t t = t0 + 2 * p;
      const bf16* r0 = t < T ? z + t * ldz : nullptr;
      const bf16* r1 = t + 1 < T ? z + (t + 1) * ldz : nullptr;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t kb = k0 + 32 * b, cols = std::min<int64_t>(32, K - kb);
        const auto m = mask32(cols);
        bf16* blk = bscr + b * 1024;
        pair_rows(r0 ? r0 + kb : nullptr, r1 ? r1 + kb : nullptr, m, blk + p * 32, blk + 512 + p * 32);
      }
    }
    _tile_loadd(2, mt + t0, Tp * static_cast<int64_t>(sizeof(bf16)));
    for (int64_t b = 0; b < nb; ++b) {
      float* c = acc + b * 512;
      if (t0 == 0) {
        _tile_zero(0);
        _tile_zero(1);
      } else {
        _tile_loadd(0, c, 64);
        _tile_loadd(1, c + 256, 64);
      }
      _tile_loadd(3, bscr + b * 1024, 64);
      _tile_loadd(4, bscr + b * 1024 + 512, 64);
      _tile_dpbf16ps(0, 2, 3);
      _tile_dpbf16ps(1, 2, 4);
      _tile_stored(0, c, 64);
      _tile_stored(1, c + 256, 64);
    }
  }
  for (int64_t b = 0; b < nb; ++b) {
    const float* c = acc + b * 512;
    const int64_t kb = k0 + 32 * b, cols = std::min<int64_t>(32, K - kb);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) d[i * K + kb + j] = s * c[(j / 16) * 256 + i * 16 + j % 16];
  }
}

// A [r, K] → the VNNI B tiles of the expand gB·A: [CB = ⌈K/16⌉][RC = Rp/32][16 pairs][16 columns][2] bf16, zero
// padded (Rp = r rounded up to 32, the k depth of one tile product).
at::Tensor pack_expand(const at::Tensor& a, int64_t Rp) {
  const int64_t r = a.size(0), K = a.size(1), CB = (K + 15) / 16, RC = Rp / 32;
  at::Tensor out = at::zeros({CB, RC, 16, 16, 2}, a.options());
  const bf16* A = a.const_data_ptr<bf16>();
  bf16* O = out.mutable_data_ptr<bf16>();
  const int64_t s0 = a.stride(0), s1 = a.stride(1);
  for (int64_t k = 0; k < r; ++k) {
    const int64_t rc = k / 32, p = (k % 32) / 2, e = k % 2;
    for (int64_t i = 0; i < K; ++i) O[(((i / 16) * RC + rc) * 16 + p) * 32 + (i % 16) * 2 + e] = A[k * s0 + i * s1];
  }
  return out;
}

// Tokens per panel of the fused backward tail, at most: 4 reduction steps of 32 tokens per load/store of the dA/dB
// accumulators. Fewer for long rows (panel_tokens), so that a panel of x, g and dx stays in L2.
constexpr int64_t kPanel = 128;
constexpr int64_t kPanelBytes = int64_t{1} << 20;

int64_t panel_tokens(int64_t K, int64_t N) {
  const int64_t fit = kPanelBytes / ((2 * K + N) * static_cast<int64_t>(sizeof(bf16)));
  return std::clamp<int64_t>(fit / 32 * 32, 32, kPanel);
}

struct TailArgs {
  const bf16* x;  // [T, K] (row stride ldx)
  int64_t ldx;
  const bf16* g;  // [T, N] (row stride ldg)
  int64_t ldg;
  int64_t T, K, N, r, G, Rp;
  int64_t panel;         // tokens per panel (a multiple of 32, ≤ kPanel)
  const bf16* a_shrink;  // pack_m(A): [G][Pa][16][2]
  int64_t Pa;
  const bf16* b_shrink;  // pack_m(Bᵀ): [G][Pb][16][2]
  int64_t Pb;
  const bf16* a_expand;  // pack_expand(A, Rp)
  float s;
  bf16* dx;  // [T, K] contiguous, holding g·W on entry; null when dx is not wanted
  bool want_gb, want_da, want_db;
};

// Per-thread scratch of the tail (sizes in tail_scratch_elems).
struct TailScratch {
  bf16* xs;     // [32][Kp]: a 32-token block of x, zero padded, when it cannot be read in place (h's A tiles)
  bf16* gs;     // [32][Np]: the same for g (gB's A tiles)
  bf16* gbrow;  // [kPanel][Rp]: gB rows (the expand's A tiles)
  bf16* gbt;    // [G·16][kPanel]: gBᵀ (dA's A tiles)
  bf16* ht;     // [G·16][kPanel]: hᵀ (dB's A tiles)
  bf16* bp;     // [4][2][16][32]: one 32-column block of a panel of Z in VNNI pairs (the reductions' B tiles)
};

// acc[g][blk] += Mᵀ[g]·Z[panel rows, 32·blk : 32·blk + 32] for every 32-column block of Z (mt: [G·16][kPanel]
// bf16, zero past the panel's rows and past r). The two C tiles of a block stay on the tile unit for the
// panel's ≤ 4 steps of 32 tokens; acc holds them between panels.
LOWRANK_AMX_BF16 void tail_reduce(const bf16* z, int64_t ldz, int64_t rows, int64_t cols_total, const bf16* mt,
                                  int64_t G, float* acc, bf16* bp) {
  const int64_t nb = (cols_total + 31) / 32, steps = (rows + 31) / 32;
  constexpr int64_t ldm = kPanel * static_cast<int64_t>(sizeof(bf16));
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t kb = 32 * b;
    const auto m = mask32(cols_total - kb);
    for (int64_t st = 0; st < steps; ++st)
      for (int64_t p = 0; p < 16; ++p) {
        const int64_t t = 32 * st + 2 * p;
        pair_rows(t < rows ? z + t * ldz + kb : nullptr, t + 1 < rows ? z + (t + 1) * ldz + kb : nullptr, m,
                  bp + st * 1024 + p * 32, bp + st * 1024 + 512 + p * 32);
      }
    for (int64_t g = 0; g < G; ++g) {
      float* c = acc + (g * nb + b) * 512;
      _tile_loadd(0, c, 64);
      _tile_loadd(1, c + 256, 64);
      for (int64_t st = 0; st < steps; ++st) {
        _tile_loadd(2, mt + g * 16 * kPanel + st * 32, ldm);
        _tile_loadd(3, bp + st * 1024, 64);
        _tile_loadd(4, bp + st * 1024 + 512, 64);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
      }
      _tile_stored(0, c, 64);
      _tile_stored(1, c + 256, 64);
    }
  }
}

// dx rows [t0, t0 + rows) (rows ≤ 16) += gB·A in place: the expand on tiles, four 16-column blocks in flight
// (C tiles 0–3, one A tile of gB, B tiles alternating 5/6), then one AVX-512 pass adds it to dx (bf16, rounded
// once from fp32).
LOWRANK_AMX_BF16 void tail_dx(const TailArgs& a, int64_t t0, int64_t rows, const bf16* gbrow) {
  alignas(64) float c[4][16][16];
  const int64_t K = a.K, Rp = a.Rp, CB = (K + 15) / 16, RC = Rp / 32;
  const int64_t lda = Rp * static_cast<int64_t>(sizeof(bf16));
  for (int64_t cb = 0; cb < CB; cb += 4) {
    const int64_t nc = std::min<int64_t>(4, CB - cb);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t rc = 0; rc < RC; ++rc) {
      const bf16* bt = a.a_expand + (cb * RC + rc) * 512;
      _tile_loadd(4, gbrow + rc * 32, lda);
      _tile_loadd(5, bt, 64);
      _tile_dpbf16ps(0, 4, 5);
      if (nc > 1) {
        _tile_loadd(6, bt + RC * 512, 64);
        _tile_dpbf16ps(1, 4, 6);
      }
      if (nc > 2) {
        _tile_loadd(5, bt + 2 * RC * 512, 64);
        _tile_dpbf16ps(2, 4, 5);
      }
      if (nc > 3) {
        _tile_loadd(6, bt + 3 * RC * 512, 64);
        _tile_dpbf16ps(3, 4, 6);
      }
    }
    _tile_stored(0, c[0], 64);
    if (nc > 1) _tile_stored(1, c[1], 64);
    if (nc > 2) _tile_stored(2, c[2], 64);
    if (nc > 3) _tile_stored(3, c[3], 64);
    for (int64_t u = 0; u < nc; ++u) {
      const int64_t col = (cb + u) * 16, cols = std::min<int64_t>(16, K - col);
      const auto m = mask16(cols);
      for (int64_t t = 0; t < rows; ++t) {
        const int64_t row = t0 + t;
        const __m256i raw = _mm256_maskz_loadu_epi16(m, a.dx + row * K + col);
        const __m512 v = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)),
                                       _mm512_load_ps(c[u][t]));
        _mm256_mask_storeu_epi16(a.dx + row * K + col, m, (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
  }
}

// One 32-token step of a rank-r shrink on tiles: s·Z·Mᵀ for rows [0, srows) of Z (row stride ldz, Kz columns;
// read in place when whole 32-wide chunks of a full step lie inside Z, else through the zero-padded scratch),
// M packed by pack_m ([G][P][16][2]), two 16-token C tiles sharing each B tile. The result is rounded to bf16
// and written as token rows (rows_out [32][ldr], optional) and as rank rows (tr_out: [G·16] rows of kPanel
// tokens, this step's 32 columns); rows past srows are zero.
LOWRANK_AMX_BF16 void shrink_step(const bf16* z, int64_t ldz, int64_t Kz, int64_t srows, const bf16* mp, int64_t P,
                                  int64_t G, float s, bf16* scratch, uint16_t* rows_out, int64_t ldr,
                                  uint16_t* tr_out) {
  alignas(64) float c[2][16][16];
  alignas(64) uint16_t hb[32][16];
  const int64_t chunks = P / 16, Kp = chunks * 32;
  const bf16* src = z;
  int64_t ld = ldz;
  if (!(Kz == Kp && srows == 32)) {
    std::memset(scratch, 0, 32 * Kp * sizeof(bf16));
    for (int64_t t = 0; t < srows; ++t) std::memcpy(scratch + t * Kp, z + t * ldz, Kz * sizeof(bf16));
    src = scratch;
    ld = Kp;
  }
  const int64_t ldb = ld * static_cast<int64_t>(sizeof(bf16));
  const __m512 vs = _mm512_set1_ps(s);
  for (int64_t g = 0; g < G; ++g) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t q = 0; q < chunks; ++q) {
      _tile_loadd(4, mp + g * P * 32 + q * 16 * 32, 64);
      _tile_loadd(2, src + q * 32, ldb);
      _tile_dpbf16ps(0, 2, 4);
      _tile_loadd(3, src + 16 * ld + q * 32, ldb);
      _tile_dpbf16ps(1, 3, 4);
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    for (int64_t t = 0; t < 32; ++t) {
      const __m512 v = t < srows ? _mm512_mul_ps(_mm512_load_ps(c[t / 16][t % 16]), vs) : _mm512_setzero_ps();
      _mm256_store_si256(reinterpret_cast<__m256i*>(hb[t]), (__m256i)_mm512_cvtneps_pbh(v));
      if (rows_out != nullptr) std::memcpy(rows_out + t * ldr + g * 16, hb[t], 32);
    }
    for (int64_t j = 0; j < 16; ++j)
      for (int64_t t = 0; t < 32; ++t) tr_out[(g * 16 + j) * kPanel + t] = hb[t][j];
  }
}

// One panel of up to kPanel tokens of the fused backward tail (see lora_backward_tail_amx).
LOWRANK_AMX_BF16 void tail_panel(const TailArgs& a, int64_t t0, float* acc_a, float* acc_b, const TailScratch& sc) {
  const int64_t rows = std::min<int64_t>(a.panel, a.T - t0), steps = (rows + 31) / 32;
  for (int64_t st = 0; st < steps; ++st) {
    const int64_t s0 = t0 + 32 * st, srows = std::min<int64_t>(32, a.T - s0);
    // gB = s·(g·B), rounded to bf16 as an unfused bf16 layer holds it, as token rows (the expand's A tiles) and
    // rank rows (dA's A tiles: that reduction runs over tokens).
    if (a.want_gb)
      shrink_step(a.g + s0 * a.ldg, a.ldg, a.N, srows, a.b_shrink, a.Pb, a.G, a.s, sc.gs,
                  reinterpret_cast<uint16_t*>(sc.gbrow) + 32 * st * a.Rp, a.Rp,
                  reinterpret_cast<uint16_t*>(sc.gbt) + 32 * st);
    // h = s·x·Aᵀ, recomputed rather than saved by the forward: x is read here anyway.
    if (a.want_db)
      shrink_step(a.x + s0 * a.ldx, a.ldx, a.K, srows, a.a_shrink, a.Pa, a.G, a.s, sc.xs, nullptr, 0,
                  reinterpret_cast<uint16_t*>(sc.ht) + 32 * st);
  }
  if (a.want_db) tail_reduce(a.g + t0 * a.ldg, a.ldg, rows, a.N, sc.ht, a.G, acc_b, sc.bp);
  if (a.want_da) tail_reduce(a.x + t0 * a.ldx, a.ldx, rows, a.K, sc.gbt, a.G, acc_a, sc.bp);
  if (a.dx != nullptr)
    for (int64_t t = 0; t < rows; t += 16) tail_dx(a, t0 + t, std::min<int64_t>(16, rows - t), sc.gbrow + t * a.Rp);
}

// Sum of nt per-thread accumulators of C tiles ([G][nb][2][16][16] fp32, `per` floats each) written as bf16 to
// O[j·sj + i·si] for j < r, i < cols: 16 columns of one tile row at a time.
LOWRANK_AMX_BF16 void gather_tiles(const float* S, int64_t nt, int64_t per, int64_t r, int64_t cols, int64_t nb,
                                   bf16* O, int64_t sj, int64_t si) {
  alignas(64) uint16_t v16[16];
  for (int64_t j = 0; j < r; ++j)
    for (int64_t i0 = 0; i0 < cols; i0 += 16) {
      const float* src = S + ((j / 16) * nb + i0 / 32) * 512 + ((i0 % 32) / 16) * 256 + (j % 16) * 16;
      __m512 v = _mm512_load_ps(src);
      for (int64_t t = 1; t < nt; ++t) v = _mm512_add_ps(v, _mm512_load_ps(src + t * per));
      const int64_t n = std::min<int64_t>(16, cols - i0);
      const __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
      if (si == 1) {
        _mm256_mask_storeu_epi16(O + j * sj + i0, mask16(n), b);
      } else {
        _mm256_store_si256(reinterpret_cast<__m256i*>(v16), b);
        uint16_t* dst = reinterpret_cast<uint16_t*>(O) + j * sj + i0 * si;
        for (int64_t k = 0; k < n; ++k) dst[k * si] = v16[k];
      }
    }
}
#endif  // LOWRANK_HAVE_RANK_AMX

}  // namespace

bool rank_amx_supported(const at::Tensor& z, const at::Tensor& m) {
  return has_amx_bf16() && z.scalar_type() == at::kBFloat16 && m.scalar_type() == at::kBFloat16 &&
         z.dim() == 2 && m.dim() == 2 && z.stride(1) == 1 && z.size(0) >= 1 && z.size(1) >= 1 &&
         m.size(0) >= 1 && m.size(1) >= 1;
}

at::Tensor shrink_amx(const at::Tensor& z, const at::Tensor& m, double scale) {
  TORCH_CHECK(rank_amx_supported(z, m) && m.size(1) == z.size(1), "shrink_amx: unsupported arguments");
  const int64_t T = z.size(0), K = z.size(1), r = m.size(0);
  at::Tensor h = at::empty({T, r}, z.options().dtype(at::kFloat));
#if LOWRANK_HAVE_RANK_AMX
  const at::Tensor mp = pack_m(m);
  const int64_t G = mp.size(0), P = mp.size(1), chunks = P / 16, Kp = chunks * 32;
  // Z rows are read in place as A tiles when a whole 16-row block of whole 32-wide chunks lies inside Z;
  // otherwise (row tail, K not a multiple of 32) the block is copied into a zero-padded scratch first.
  const bool in_place = K == Kp;
  const bf16* Z = z.const_data_ptr<bf16>();
  const bf16* MP = mp.const_data_ptr<bf16>();
  float* H = h.mutable_data_ptr<float>();
  const int64_t ldz = z.stride(0);
  const auto s = static_cast<float>(scale);
  at::parallel_for(0, (T + 15) / 16, 4, [&](int64_t b0, int64_t b1) {
    TileConfig cfg;
    load_full_config(cfg);
    std::vector<bf16> scratch;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * 16, rows = std::min<int64_t>(16, T - t0);
      if (in_place && rows == 16) {
        shrink_rows(Z + t0 * ldz, ldz, chunks, MP, G, P, s, H + t0 * r, r, rows);
      } else {
        scratch.assign(16 * Kp, bf16(0.f));
        for (int64_t t = 0; t < rows; ++t)
          std::memcpy(scratch.data() + t * Kp, Z + (t0 + t) * ldz, K * sizeof(bf16));
        shrink_rows(scratch.data(), Kp, chunks, MP, G, P, s, H + t0 * r, r, rows);
      }
    }
    release_tiles();
  });
#endif
  return h;
}

at::Tensor tn_amx(const at::Tensor& m, const at::Tensor& z, double scale) {
  TORCH_CHECK(rank_amx_supported(z, m) && m.size(0) == z.size(0), "tn_amx: unsupported arguments");
  const int64_t T = z.size(0), K = z.size(1), r = m.size(1), G = (r + 15) / 16, Tp = (T + 31) / 32 * 32;
  at::Tensor d = at::empty({r, K}, z.options().dtype(at::kFloat));
#if LOWRANK_HAVE_RANK_AMX
  // Mᵀ, zero padded to [G·16, Tp]: the A tiles (16 rows of r × 32 tokens).
  at::Tensor mt = at::zeros({G * 16, Tp}, m.options());
  mt.narrow(0, 0, r).narrow(1, 0, T).copy_(m.t());
  const bf16* Z = z.const_data_ptr<bf16>();
  const bf16* MT = mt.const_data_ptr<bf16>();
  float* D = d.mutable_data_ptr<float>();
  const int64_t ldz = z.stride(0), nk = (K + 31) / 32;
  const auto s = static_cast<float>(scale);
  if (G == 1) {
    // r ≤ 16 (one row group): panels over the reduction (see tn_panels), the columns split among threads.
    at::parallel_for(0, nk, 4, [&](int64_t i0, int64_t i1) {
      TileConfig cfg;
      load_full_config(cfg);
      std::vector<float> acc((i1 - i0) * 512);
      std::vector<bf16> bscr((i1 - i0) * 1024);
      tn_panels(Z, ldz, T, K, i0 * 32, std::min(K, i1 * 32), MT, Tp, s, D, r, acc.data(), bscr.data());
      release_tiles();
    });
    return d;
  }
  at::parallel_for(0, G * nk, 4, [&](int64_t i0, int64_t i1) {
    TileConfig cfg;
    load_full_config(cfg);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g = i / nk, k0 = (i % nk) * 32;
      tn_block(Z, ldz, T, K, k0, MT + g * 16 * Tp, Tp, s, D + g * 16 * K, std::min<int64_t>(16, r - g * 16));
    }
    release_tiles();
  });
#endif
  return d;
}

void lora_backward_tail_amx(at::Tensor* dx, const at::Tensor& x2, const at::Tensor& g2, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, double scale, at::Tensor* da, at::Tensor* db) {
  const int64_t T = x2.size(0), K = x2.size(1), N = g2.size(1), r = lora_a.size(0);
  TORCH_CHECK(rank_amx_supported(x2, lora_a) && rank_amx_supported(g2, lora_b) && g2.size(0) == T &&
                  lora_a.size(1) == K && lora_b.size(0) == N && lora_b.size(1) == r &&
                  (dx == nullptr || (dx->scalar_type() == at::kBFloat16 && dx->is_contiguous() &&
                                     dx->sizes() == x2.sizes())),
              "lora_backward_tail_amx: unsupported arguments");
  const int64_t G = (r + 15) / 16, Rp = (r + 31) / 32 * 32;
  const int64_t nbx = (K + 31) / 32, nbn = (N + 31) / 32;
  const int nthreads = std::max(1, at::get_num_threads());
  at::Tensor acc_a = da ? at::zeros({nthreads, G * nbx * 512}, x2.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor acc_b = db ? at::zeros({nthreads, G * nbn * 512}, x2.options().dtype(at::kFloat)) : at::Tensor();
#if LOWRANK_HAVE_RANK_AMX
  const int64_t pt = panel_tokens(K, N), npanel = (T + pt - 1) / pt;
  const bool want_gb = dx != nullptr || da != nullptr;
  const at::Tensor a_shrink = pack_m(lora_a);
  const at::Tensor b_shrink = want_gb ? pack_m(lora_b.t()) : a_shrink;
  const at::Tensor a_expand = dx ? pack_expand(lora_a, Rp) : a_shrink;
  TailArgs a{x2.const_data_ptr<bf16>(), x2.stride(0), g2.const_data_ptr<bf16>(), g2.stride(0), T, K, N, r, G, Rp, pt,
             a_shrink.const_data_ptr<bf16>(), a_shrink.size(1), b_shrink.const_data_ptr<bf16>(), b_shrink.size(1),
             a_expand.const_data_ptr<bf16>(), static_cast<float>(scale),
             dx ? dx->mutable_data_ptr<bf16>() : nullptr, want_gb, da != nullptr, db != nullptr};
  const int64_t Kp = a.Pa / 16 * 32, Np = b_shrink.size(1) / 16 * 32;
  at::parallel_for(0, npanel, 1, [&](int64_t b0, int64_t b1) {
    const int tid = std::min(at::get_thread_num(), nthreads - 1);
    TileConfig cfg;
    load_full_config(cfg);
    std::vector<bf16> xs(db ? 32 * Kp : 0), gs(want_gb ? 32 * Np : 0), gbrow(kPanel * Rp), gbt(G * 16 * kPanel),
        ht(G * 16 * kPanel), bp(4 * 1024);
    const TailScratch sc{xs.data(), gs.data(), gbrow.data(), gbt.data(), ht.data(), bp.data()};
    float* pa = da ? acc_a.mutable_data_ptr<float>() + tid * acc_a.size(1) : nullptr;
    float* pb = db ? acc_b.mutable_data_ptr<float>() + tid * acc_b.size(1) : nullptr;
    for (int64_t b = b0; b < b1; ++b) tail_panel(a, b * pt, pa, pb, sc);
    release_tiles();
  });
#endif
  // The per-thread C tiles ([G][blocks][2][16][16] fp32) summed and written, rounded to x's dtype, into
  // out[j, i] (dA: [r, K]) or out[i, j] (dB: [N, r]); a tensor defined on entry is written in place.
  auto gather = [&](const at::Tensor& acc, int64_t cols, int64_t nb, at::Tensor* out, bool transposed) {
    const auto shape = transposed ? std::vector<int64_t>{cols, r} : std::vector<int64_t>{r, cols};
    if (!out->defined()) *out = at::empty(shape, x2.options());
    TORCH_CHECK(out->scalar_type() == at::kBFloat16 && out->sizes() == at::IntArrayRef(shape),
                "lora_backward_tail_amx: bad output");
    const int64_t sj = transposed ? out->stride(1) : out->stride(0), si = transposed ? out->stride(0) : out->stride(1);
#if LOWRANK_HAVE_RANK_AMX
    gather_tiles(acc.const_data_ptr<float>(), acc.size(0), acc.size(1), r, cols, nb, out->mutable_data_ptr<bf16>(),
                 sj, si);
#endif
  };
  if (da) gather(acc_a, K, nbx, da, false);
  if (db) gather(acc_b, N, nbn, db, true);
}

}  // namespace lowrank::cpu
