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

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

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
LOWRANK_AMX_BF16 void load_full_config(TileConfig& cfg) {
  cfg = TileConfig{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

LOWRANK_AMX_BF16 void release_tiles() { _tile_release(); }

// M [r, K] (strides sm0, sm1) → [G][P][16][2] bf16, G = ⌈r/16⌉, P = ⌈K/32⌉·16 (whole 32-wide chunks, zero
// padded): the B tiles of the shrink.
at::Tensor pack_m(const at::Tensor& m) {
  const int64_t r = m.size(0), K = m.size(1), G = (r + 15) / 16, P = (K + 31) / 32 * 16;
  at::Tensor out = at::zeros({G, P, 16, 2}, m.options());
  const bf16* M = m.const_data_ptr<bf16>();
  bf16* O = out.mutable_data_ptr<bf16>();
  const int64_t s0 = m.stride(0), s1 = m.stride(1);
  // Walk M in its memory order (lora_b.t() from the joint buffer has s1 = in + r: row by row of B).
  if (s1 == 1 || s0 < s1) {
    for (int64_t j = 0; j < r; ++j) {
      bf16* dst = O + (j / 16) * P * 32 + (j % 16) * 2;
      for (int64_t k = 0; k < K; ++k) dst[(k / 2) * 32 + (k % 2)] = M[j * s0 + k * s1];
    }
  } else {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < r; ++j) O[(j / 16) * P * 32 + (k / 2) * 32 + (j % 16) * 2 + (k % 2)] = M[j * s0 + k * s1];
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
  const auto m = cols >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu) : static_cast<__mmask32>((1u << cols) - 1u);
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
        const auto m = cols >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu) : static_cast<__mmask32>((1u << cols) - 1u);
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

}  // namespace lowrank::cpu
