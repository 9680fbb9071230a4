// y = bias + x·Wᵀ for 1–16 tokens on AMX tiles (contract in lowrank_kernels.h).
//
// Why: a few-token layer has to stream W once (32 MB for 4096², ~1.1 ms at this machine's ~30 GB/s), but
// oneDNN took ~2.2 ms for 8×4096×4096 in bf16 and the AVX512-BF16 dot-product kernel is compute-bound
// (VDPBF16PS at ~3.5 cycles here). On the tile unit the products are cheap, so the pass runs at the speed
// of reading W. Orientation: C[16 outputs × T tokens] += W[16 rows × 32 k] · xᵀ[32 k × T]: W's rows are
// loaded as A tiles straight from memory (any row stride, so the joint [W | B] buffer is read in place)
// and only x is repacked (into the VNNI pair layout of a B tile, T·K elements).
#include "cpu/lowrank_kernels.h"
#include "cpu/amx_tiles.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <immintrin.h>
#define LOWRANK_HAVE_SKINNY_AMX 1
#define LOWRANK_AMX_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")))
#else
#define LOWRANK_HAVE_SKINNY_AMX 0
#endif

namespace lowrank::cpu {
namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kMaxTokens = 16;  // the N side of one C tile (16 fp32 columns)
constexpr int64_t kBlockRows = 32;  // two 16-row C tiles per step, two independent accumulation chains
constexpr int64_t kPrefetch = 8;    // chunks (of 32 k) ahead

#if LOWRANK_HAVE_SKINNY_AMX
// Tiles: 0/1 = C of the two 16-row halves, 2/3 = their W chunk (16 rows × 32 k), 4 = the x chunk (16 pairs ×
// T), 5/6/7 = the same for the k tail (an even count < 32).
LOWRANK_AMX_BF16 void load_config(TileConfig& cfg, int64_t T, int64_t rows0, int64_t rows1, int64_t tail) {
  cfg = TileConfig{};
  cfg.palette_id = 1;
  const auto cb = static_cast<uint16_t>(4 * T);
  const int64_t rows[2] = {rows0, rows1};
  for (int h = 0; h < 2; ++h) {
    if (rows[h] == 0) continue;
    cfg.rows[h] = static_cast<uint8_t>(rows[h]);
    cfg.colsb[h] = cb;
    cfg.rows[2 + h] = static_cast<uint8_t>(rows[h]);
    cfg.colsb[2 + h] = 64;
    if (tail) {
      cfg.rows[5 + h] = static_cast<uint8_t>(rows[h]);
      cfg.colsb[5 + h] = static_cast<uint16_t>(2 * tail);
    }
  }
  cfg.rows[4] = 16;
  cfg.colsb[4] = cb;
  if (tail) {
    cfg.rows[7] = static_cast<uint8_t>(tail / 2);
    cfg.colsb[7] = cb;
  }
  _tile_loadconfig(&cfg);
}

// One block of up to 32 output rows starting at W row n0. xp: x in pair layout [Ke/2][T][2].
LOWRANK_AMX_BF16 void skinny_block(const bf16* W, int64_t ldw, int64_t n0, int64_t rows0, int64_t rows1,
                                   const bf16* xp, int64_t T, int64_t Ke, float (&c)[2][16][16]) {
  const int64_t full = Ke / 32, tail = Ke % 32;
  const bf16* w0 = W + n0 * ldw;
  const bf16* w1 = w0 + 16 * ldw;
  const int64_t ldw_b = ldw * static_cast<int64_t>(sizeof(bf16)), ldx_b = 4 * T;
  _tile_zero(0);
  if (rows1) _tile_zero(1);
  for (int64_t q = 0; q < full; ++q) {
    // 32 rows are 32 separate streams 8 KB apart, more than the hardware prefetcher follows; ask for the
    // cache lines kPrefetch chunks ahead explicitly.
    if (q + kPrefetch < full) {
      for (int64_t i = 0; i < rows0; ++i) _mm_prefetch(reinterpret_cast<const char*>(w0 + i * ldw + (q + kPrefetch) * 32), _MM_HINT_T0);
      for (int64_t i = 0; i < rows1; ++i) _mm_prefetch(reinterpret_cast<const char*>(w1 + i * ldw + (q + kPrefetch) * 32), _MM_HINT_T0);
    }
    _tile_loadd(4, xp + q * 16 * 2 * T, ldx_b);
    _tile_loadd(2, w0 + q * 32, ldw_b);
    _tile_dpbf16ps(0, 2, 4);
    if (rows1) {
      _tile_loadd(3, w1 + q * 32, ldw_b);
      _tile_dpbf16ps(1, 3, 4);
    }
  }
  if (tail) {
    _tile_loadd(7, xp + full * 16 * 2 * T, ldx_b);
    _tile_loadd(5, w0 + full * 32, ldw_b);
    _tile_dpbf16ps(0, 5, 7);
    if (rows1) {
      _tile_loadd(6, w1 + full * 32, ldw_b);
      _tile_dpbf16ps(1, 6, 7);
    }
  }
  _tile_stored(0, c[0], 64);
  if (rows1) _tile_stored(1, c[1], 64);
}

LOWRANK_AMX_BF16 void release_tiles() { _tile_release(); }
#endif  // LOWRANK_HAVE_SKINNY_AMX

}  // namespace

bool skinny_supported(int64_t tokens, const at::Tensor& w) {
  return has_amx_bf16() && w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.stride(1) == 1 &&
         w.size(1) >= 1 && tokens >= 1 && tokens <= kMaxTokens;
}

at::Tensor skinny_linear_amx(const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x2.dim() == 2 && skinny_supported(x2.size(0), w) && x2.scalar_type() == at::kBFloat16 &&
                  x2.size(1) == w.size(1) && x2.stride(1) == 1,
              "skinny_linear_amx: unsupported arguments");
  const int64_t T = x2.size(0), K = x2.size(1), N = w.size(0);
  at::Tensor y = at::empty({T, N}, x2.options());
#if LOWRANK_HAVE_SKINNY_AMX
  // Odd K: the tiles cover the even part (a W row is never read past its end); the last column is added below.
  const int64_t Ke = K & ~int64_t{1}, P = Ke / 2;
  at::Tensor xp = at::empty({std::max<int64_t>(P, 1), T, 2}, x2.options());
  {
    const bf16* X = x2.const_data_ptr<bf16>();
    bf16* XP = xp.mutable_data_ptr<bf16>();
    const int64_t ldx = x2.stride(0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t p = 0; p < P; ++p) {
        XP[(p * T + t) * 2] = X[t * ldx + 2 * p];
        XP[(p * T + t) * 2 + 1] = X[t * ldx + 2 * p + 1];
      }
  }
  const at::Tensor bf = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* B = bf.defined() ? bf.const_data_ptr<float>() : nullptr;
  const bf16* W = w.const_data_ptr<bf16>();
  const bf16* XP = xp.const_data_ptr<bf16>();
  const bf16* X = x2.const_data_ptr<bf16>();
  bf16* Y = y.mutable_data_ptr<bf16>();
  const int64_t ldw = w.stride(0), ldx = x2.stride(0), tail = Ke % 32;
  const bool odd = K & 1;
  // grain: 8 blocks (256 rows, 2 MB of a 4096-wide W) per task.
  at::parallel_for(0, (N + kBlockRows - 1) / kBlockRows, 8, [&](int64_t b0, int64_t b1) {
    alignas(64) float c[2][16][16];
    TileConfig cfg;  // outlives the ldtilecfg that reads it
    int64_t loaded = -1;  // rows of the configuration in the tile registers (full blocks: 32)
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kBlockRows, rows = std::min(kBlockRows, N - n0);
      const int64_t rows0 = std::min<int64_t>(16, rows), rows1 = rows - rows0;
      if (loaded != rows) {
        load_config(cfg, T, rows0, rows1, tail);
        loaded = rows;
      }
      if (Ke > 0) {
        skinny_block(W, ldw, n0, rows0, rows1, XP, T, Ke, c);
      } else {
        std::memset(c, 0, sizeof(c));
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float* ci = c[i / 16][i % 16];
        const int64_t n = n0 + i;
        const float bn = B ? B[n] : 0.f;
        const float wl = odd ? static_cast<float>(W[n * ldw + K - 1]) : 0.f;
        for (int64_t t = 0; t < T; ++t) {
          float v = ci[t] + bn;
          if (odd) v += wl * static_cast<float>(X[t * ldx + K - 1]);
          Y[t * N + n] = static_cast<bf16>(v);
        }
      }
    }
    release_tiles();
  });
#endif
  return y;
}

}  // namespace lowrank::cpu
