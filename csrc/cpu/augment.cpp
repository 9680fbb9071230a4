// x' = [x | s·x·Aᵀ] and the joint [W | B] view: the whole bf16 LoRA layer as one GEMM of K + r (see
// lowrank_kernels.h for the contract, cpu/lora_linear.cpp for where it is used).
//
// Why a K-augmented GEMM: with W' = [W | B] (LoRALinear.pack_() keeps both in one buffer) the rank-r expand is
// r more columns of oneDNN's own micro-kernel, at its full speed, and the output is written once. What is left
// is forming x': one copy of x plus the shrink s·x·Aᵀ (T·K·r MACs). The shrink is where the time goes if done
// with AVX512-BF16 dot products: measured here ~3.5 cycles per VDPBF16PS, 1.1 ms for 2048×768×16 on one core,
// more than the copy (0.35 ms) — so on CPUs with AMX it runs on the tile unit (16 rows × 32 k per TDPBF16PS),
// 0.1 ms for the same shape on two cores; the AVX512-BF16 broadcast kernel below is the fallback elsewhere.
#include "cpu/lowrank_kernels.h"
#include "cpu/amx_tiles.h"
#include "cpu/masks.h"
#include "cpu/isa.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <immintrin.h>
#define LOWRANK_HAVE_AUGMENT_KERNELS 1
#define LOWRANK_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define LOWRANK_AMX_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")))
#else
#define LOWRANK_HAVE_AUGMENT_KERNELS 0
#endif

namespace lowrank::cpu {
namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kRowsAmx = 16;  // rows of an AMX tile
constexpr int64_t kRowsAvx = 8;   // rows per AVX-512 block: 8 independent accumulators cover the dot latency

#if LOWRANK_HAVE_AUGMENT_KERNELS

// 16 rows of x' (x in columns [0, K), column K zero when K is odd, row stride ldo): writes s·x·Aᵀ in bf16 to
// columns [K, K + r). Tiles: 0 = C (16×16 fp32), 1/2 = a 32-wide k chunk of x and A, 3/4 = the k tail.
LOWRANK_AMX_BF16 void amx_rows(bf16* xp, int64_t ldo, const bf16* ap, int64_t r, int64_t K, float s) {
  const int64_t P = (K + 1) / 2, full = (2 * P) / 32, tail = (2 * P) % 32;  // tail is even
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 3; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  if (tail) {
    cfg.rows[3] = 16;
    cfg.colsb[3] = static_cast<uint16_t>(tail * 2);
    cfg.rows[4] = static_cast<uint8_t>(tail / 2);
    cfg.colsb[4] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) float c[16][16];
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t g = 0; g < (r + 15) / 16; ++g) {
    const bf16* apg = ap + g * P * 32;
    _tile_zero(0);
    for (int64_t q = 0; q < full; ++q) {
      _tile_loadd(1, xp + q * 32, ldo * sizeof(bf16));
      _tile_loadd(2, apg + q * 16 * 32, 64);
      _tile_dpbf16ps(0, 1, 2);
    }
    if (tail) {
      _tile_loadd(3, xp + full * 32, ldo * sizeof(bf16));
      _tile_loadd(4, apg + full * 16 * 32, 64);
      _tile_dpbf16ps(0, 3, 4);
    }
    _tile_stored(0, c, 64);
    const int64_t n = std::min<int64_t>(16, r - g * 16);
    const auto m = mask16(n);
    for (int t = 0; t < 16; ++t)
      _mm256_mask_storeu_epi16(xp + t * ldo + K + g * 16, m,
                               (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(c[t]), sv)));
  }
  _tile_release();
}

// TT rows of x (row stride ldx) dotted with A in pairs layout: each step broadcasts one bf16 pair of a row and
// multiplies it into 16 rows of A at once (no horizontal reductions). Writes s·x·Aᵀ to out[t, K + ·].
template <int TT>
LOWRANK_AVX512_BF16 void avx_rows(const bf16* x, int64_t ldx, const bf16* ap, int64_t r, int64_t K, float s,
                                  bf16* out, int64_t ldo) {
  const int64_t P = (K + 1) / 2, Pfull = K / 2;
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t g = 0; g < (r + 15) / 16; ++g) {
    const bf16* apg = ap + g * P * 32;
    __m512 acc[TT];
    for (int t = 0; t < TT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t p = 0; p < Pfull; ++p) {
      const __m512i av = _mm512_loadu_si512(apg + p * 32);
      for (int t = 0; t < TT; ++t) {
        int32_t pair;
        std::memcpy(&pair, x + t * ldx + 2 * p, sizeof(pair));
        acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_set1_epi32(pair), (__m512bh)av);
      }
    }
    if (P != Pfull) {  // odd K: the last element pairs with the zero padding of A
      const __m512i av = _mm512_loadu_si512(apg + Pfull * 32);
      for (int t = 0; t < TT; ++t) {
        uint16_t last;
        std::memcpy(&last, x + t * ldx + K - 1, sizeof(last));
        acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_set1_epi32(last), (__m512bh)av);
      }
    }
    const int64_t n = std::min<int64_t>(16, r - g * 16);
    const auto m = mask16(n);
    for (int t = 0; t < TT; ++t)
      _mm256_mask_storeu_epi16(out + t * ldo + K + g * 16, m,
                               (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[t], sv)));
  }
}
#endif  // LOWRANK_HAVE_AUGMENT_KERNELS

}  // namespace

// AMX: the CPU feature, the OS's permission for the tile state, and LOWRANK_MAX_CPU_ISA (cpu/isa.h).
bool has_amx_bf16() { return cpu_isa() >= CpuIsa::kAmx; }

at::Tensor joint_weight(const at::Tensor& weight, const at::Tensor& lora_b) {
  if (weight.dim() != 2 || lora_b.dim() != 2 || weight.scalar_type() != lora_b.scalar_type() ||
      weight.device() != lora_b.device() || lora_b.size(0) != weight.size(0))
    return {};
  const int64_t N = weight.size(0), K = weight.size(1), r = lora_b.size(1), ld = K + r;
  if (N < 2 || weight.stride(1) != 1 || lora_b.stride(1) != 1 || weight.stride(0) != ld || lora_b.stride(0) != ld)
    return {};
  if (!weight.storage().is_alias_of(lora_b.storage()) || lora_b.storage_offset() != weight.storage_offset() + K)
    return {};
  const auto elem = static_cast<int64_t>(weight.element_size());
  if (static_cast<int64_t>(weight.storage().nbytes()) < (weight.storage_offset() + N * ld) * elem) return {};
  return weight.as_strided({N, ld}, {ld, 1});
}

bool augment_supported(const at::Tensor& x2, const at::Tensor& a) {
  return has_avx512_bf16() && x2.scalar_type() == at::kBFloat16 && a.scalar_type() == at::kBFloat16 &&
         x2.dim() == 2 && a.dim() == 2 && x2.size(1) == a.size(1) && x2.stride(1) == 1 && a.stride(1) == 1 &&
         a.size(0) >= 1;
}

at::Tensor augment_bf16(const at::Tensor& x2, const at::Tensor& a, double scale) {
  TORCH_CHECK(augment_supported(x2, a), "augment_bf16: unsupported arguments");
  const int64_t T = x2.size(0), K = x2.size(1), r = a.size(0), ldo = K + r;
#if LOWRANK_HAVE_AUGMENT_KERNELS
  const bool amx = has_amx_bf16();
  const int64_t rows = amx ? kRowsAmx : kRowsAvx;
  // AMX reads whole 16-row tiles: the buffer has rows up to a multiple of 16 (zeroed), the result is a view.
  const int64_t Tp = amx ? (T + rows - 1) / rows * rows : T;
  at::Tensor buf = at::empty({Tp, ldo}, x2.options());
  if (Tp > T) buf.narrow(0, T, Tp - T).zero_();
  const at::Tensor ap = pack_pairs_bf16(a);
  const bf16* X = x2.const_data_ptr<bf16>();
  const bf16* AP = ap.const_data_ptr<bf16>();
  bf16* O = buf.mutable_data_ptr<bf16>();
  const int64_t ldx = x2.stride(0);
  const auto s = static_cast<float>(scale);
  // grain: 64 rows per task; below that waking the second thread costs more than the copy.
  at::parallel_for(0, (T + rows - 1) / rows, 64 / rows, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * rows, n = std::min(rows, T - t0);
      for (int64_t t = t0; t < t0 + n; ++t) {
        std::memcpy(O + t * ldo, X + t * ldx, K * sizeof(bf16));
        if (amx && (K & 1)) O[t * ldo + K] = bf16(0.f);  // the tile reads K rounded up to even
      }
      if (amx) {
        amx_rows(O + t0 * ldo, ldo, AP, r, K, s);
      } else if (n == kRowsAvx) {
        avx_rows<kRowsAvx>(X + t0 * ldx, ldx, AP, r, K, s, O + t0 * ldo, ldo);
      } else {
        for (int64_t t = t0; t < t0 + n; ++t) avx_rows<1>(X + t * ldx, ldx, AP, r, K, s, O + t * ldo, ldo);
      }
    }
  });
  return Tp > T ? buf.narrow(0, 0, T) : buf;
#else
  TORCH_CHECK(false, "augment_bf16: built without the x86-64 kernels");
#endif
}

}  // namespace lowrank::cpu
