// fp32 linear on the bf16 tile unit, each operand split in two bf16 halves ("bf16x3"), CPU (AMX).
//   y = x·Wᵀ + b  computed as  x_hi·W_hiᵀ + x_hi·W_loᵀ + x_lo·W_hiᵀ  with fp32 accumulation, where
//   v_hi = bf16(v) (round to nearest even) and v_lo = bf16(v − v_hi).
// Why: an fp32 GEMM on this CPU runs on the AVX-512 FMA units (MKL sgemm, ~250 GFLOP/s on 2 cores), while the
// AMX tile unit does 16× the multiply-adds per cycle in bf16. v_hi + v_lo keeps 16 of fp32's 24 significand bits
// (|v − v_hi − v_lo| ≤ 2⁻¹⁸|v|), each bf16 product is exact in fp32, and the dropped x_lo·W_lo term is ≤ 2⁻¹⁸
// of the product: ~4e-6 relative per product against fp32's 6e-8, at a third of the tile unit's speed.
// Layouts:
//   packed weight  [Nt][Kc][2][16][32] bf16: for 16 output features (Nt = ⌈N/16⌉) and 32 inputs (Kc = ⌈K/32⌉)
//                  the B tiles of W_hi then W_lo in the VNNI pair layout (row i holds k = 2i, 2i+1 of each of the
//                  16 features); zero padded. Built once per weight by bf16x3_pack.
//   x panel        [PR][Kp] bf16 twice (hi, lo), Kp = 32·Kc, built per thread from PR fp32 rows of x and reused
//                  for every output tile, zero padded past K and past the last row.
// Non-finite values: v_hi = ±inf/NaN carries them and v_lo is 0, so inf and NaN propagate as in fp32; |v| above
// bf16's largest finite value (3.39e38) rounds to inf.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/checks.h"
#include "cpu/amx_tiles.h"
#include "cpu/isa.h"
#include "cpu/masks.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <immintrin.h>
#define LOWRANK_HAVE_BF16X3_AMX 1
#define LOWRANK_AMX_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")))
#else
#define LOWRANK_HAVE_BF16X3_AMX 0
#endif

namespace lowrank {
namespace {

using bf16 = c10::BFloat16;
using cpu::TileConfig;
constexpr int64_t kTileElems = 16 * 32;  // one B tile: 16 pair rows × 16 features × 2

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_weight(const at::Tensor& weight, const char* op) {
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat, op, ": weight must be float32, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.device().is_cpu(), op, ": weight must be on the CPU, got ", weight.device());
}

#if LOWRANK_HAVE_BF16X3_AMX
using cpu::mask16;

// 16 fp32 values → their bf16 halves hi = bf16(v), lo = bf16(v − hi) (both round to nearest even). Where v − hi is
// not finite (v = ±inf or NaN: inf − inf, NaN − NaN) lo is 0 and hi carries the value (0x99 = NaN or ±inf).
LOWRANK_AMX_BF16 inline void split16(__m512 v, __m256i* hi, __m256i* lo) {
  *hi = (__m256i)_mm512_cvtneps_pbh(v);
  const __m512 d = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(*hi), 16)));
  *lo = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_mov_ps((__mmask16)~_mm512_fpclass_ps_mask(d, 0x99), d));
}

// Rows [n0, n1) of W (fp32, row stride ldw) into the packed layout: each pair (k, k+1) of a row is one 32-bit
// unit, at [n / 16][k / 32][part][(k % 32) / 2][n % 16].
LOWRANK_AMX_BF16 void pack_rows(const float* W, int64_t ldw, int64_t K, int64_t Kc, int64_t n0, int64_t n1,
                                uint32_t* O) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t t = n / 16, j = n % 16;
    for (int64_t c = 0; c < Kc; ++c) {
      uint32_t* hi = O + ((t * Kc + c) * 2) * (kTileElems / 2) + j;  // 32-bit units; tile rows are 16 units
      uint32_t* lo = hi + kTileElems / 2;
      const int64_t k0 = 32 * c;
      alignas(64) uint16_t h[32], l[32];
      for (int v = 0; v < 2; ++v) {
        const int64_t k = k0 + 16 * v;
        split16(_mm512_maskz_loadu_ps(mask16(K - k), W + n * ldw + k), reinterpret_cast<__m256i*>(h + 16 * v),
                reinterpret_cast<__m256i*>(l + 16 * v));
      }
      const uint32_t* h32 = reinterpret_cast<const uint32_t*>(h);
      const uint32_t* l32 = reinterpret_cast<const uint32_t*>(l);
      for (int i = 0; i < 16; ++i) {
        hi[16 * i] = h32[i];
        lo[16 * i] = l32[i];
      }
    }
  }
}
#endif

at::Tensor pack_plain(const at::Tensor& weight);

// gated: weight = [gate; up] ([2H, K]); the B tiles come in pairs (gate features 16t..16t+15, then the same up
// features), so that one 32-column block of the kernel holds matching gate and up columns for the SwiGLU epilogue.
at::Tensor bf16x3_pack_cpu(const at::Tensor& weight, bool gated) {
  check_weight(weight, "bf16x3_pack");
  if (!gated) return pack_plain(weight);
  TORCH_CHECK_VALUE(weight.size(0) % 2 == 0, "bf16x3_pack: a gated weight stacks gate and up rows ([2H, in]), got ",
                    weight.sizes());
  const int64_t H = weight.size(0) / 2, K = weight.size(1), Ht = ceil_div(H, 16);
  const auto halves = weight.split(H, 0);
  const at::Tensor g = at::constant_pad_nd(halves[0], {0, 0, 0, Ht * 16 - H}).view({Ht, 1, 16, K});
  const at::Tensor u = at::constant_pad_nd(halves[1], {0, 0, 0, Ht * 16 - H}).view({Ht, 1, 16, K});
  return pack_plain(at::cat({g, u}, 1).view({2 * Ht * 16, K}));
}

at::Tensor pack_plain(const at::Tensor& weight) {
  const int64_t N = weight.size(0), K = weight.size(1), Nt = ceil_div(N, 16), Kc = ceil_div(K, 32);
  if (N == 0 || K == 0) return at::zeros({Nt, Kc, 2, 16, 32}, weight.options().dtype(at::kBFloat16));
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const float* W = w.const_data_ptr<float>();
  const int64_t ldw = w.stride(0);
#if LOWRANK_HAVE_BF16X3_AMX
  if (cpu::cpu_isa() >= cpu::CpuIsa::kAvx512Bf16) {
    // Every unit of rows < N is written (k past K as zeros), so only the padding features of the last tile need
    // clearing: no memset of the whole buffer (it is packed per call by lora_linear).
    at::Tensor out = at::empty({Nt, Kc, 2, 16, 32}, weight.options().dtype(at::kBFloat16));
    uint32_t* O = reinterpret_cast<uint32_t*>(out.mutable_data_ptr<bf16>());
    if (N % 16) {
      uint32_t* last = O + (Nt - 1) * Kc * 2 * (kTileElems / 2);
      for (int64_t u = 0; u < Kc * 2 * 16; ++u)
        std::fill(last + u * 16 + N % 16, last + u * 16 + 16, 0u);
    }
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { pack_rows(W, ldw, K, Kc, n0, n1, O); });
    return out;
  }
#endif
  at::Tensor out = at::zeros({Nt, Kc, 2, 16, 32}, weight.options().dtype(at::kBFloat16));
  bf16* O = out.mutable_data_ptr<bf16>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t t = n / 16, j = n % 16;
      for (int64_t k = 0; k < K; ++k) {
        const float v = W[n * ldw + k];
        const bf16 hi(v);  // c10's float → bf16 rounds to nearest even
        const float d = v - static_cast<float>(hi);
        const bf16 lo(std::isfinite(d) ? d : 0.f);
        bf16* tile = O + ((t * Kc + k / 32) * 2) * kTileElems + ((k % 32) / 2) * 32 + 2 * j + (k % 2);
        tile[0] = hi;
        tile[kTileElems] = lo;
      }
    }
  });
  return out;
}

#if LOWRANK_HAVE_BF16X3_AMX
// Tiles 0–3: C (two row halves × two feature tiles, 16×16 fp32); 4/5: A (x rows 0–15 / 16–31, 32 k); 6/7: B.
LOWRANK_AMX_BF16 void load_config(TileConfig& cfg) { cpu::load_uniform_tile_config(cfg); }

// rows of x (fp32, row stride ldx) → hi and lo panels [PR][Kp]; rows past `rows` and columns past K are zero.
LOWRANK_AMX_BF16 void split_rows(const float* x, int64_t ldx, int64_t rows, int64_t PR, int64_t K, int64_t Kp,
                                 bf16* hi, bf16* lo) {
  for (int64_t i = 0; i < PR; ++i) {
    bf16* h = hi + i * Kp;
    bf16* l = lo + i * Kp;
    if (i >= rows) {
      std::memset(static_cast<void*>(h), 0, Kp * sizeof(bf16));
      std::memset(static_cast<void*>(l), 0, Kp * sizeof(bf16));
      continue;
    }
    const float* xr = x + i * ldx;
    for (int64_t k = 0; k < Kp; k += 16) {
      __m256i vh, vl;
      split16(_mm512_maskz_loadu_ps(mask16(K - k), xr + k), &vh, &vl);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + k), vh);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(l + k), vl);
    }
  }
}

// C[32 rows × 16·NB features] = Σ over Kc chunks of the three products; A rows from the hi/lo panels (row
// stride lda bytes), B tiles from the packed weight (b0, b1 point at the first chunk of each feature tile).
// Stores the C tiles to c (row stride ldc bytes). Per chunk: 6 or 8 tile loads for 6 or 12 tile products.
template <int NB>
LOWRANK_AMX_BF16 void block_kernel(const bf16* ahi, const bf16* alo, int64_t lda, const bf16* b0, const bf16* b1,
                                   int64_t Kc, float* c, int64_t ldc) {
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (NB == 2) {
    _tile_zero(1);
    _tile_zero(3);
  }
  const int64_t a16 = 16 * lda;  // bytes to the second row half
  for (int64_t kc = 0; kc < Kc; ++kc) {
    const char* ah = reinterpret_cast<const char*>(ahi + kc * 32);
    const char* al = reinterpret_cast<const char*>(alo + kc * 32);
    const bf16* bt0 = b0 + kc * 2 * kTileElems;
    const bf16* bt1 = NB == 2 ? b1 + kc * 2 * kTileElems : nullptr;
    _tile_loadd(4, ah, lda);
    _tile_loadd(5, ah + a16, lda);
    _tile_loadd(6, bt0 + kTileElems, 64);  // W_lo
    if constexpr (NB == 2) _tile_loadd(7, bt1 + kTileElems, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (NB == 2) {
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_loadd(6, bt0, 64);  // W_hi
    if constexpr (NB == 2) _tile_loadd(7, bt1, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (NB == 2) {
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_loadd(4, al, lda);  // x_lo
    _tile_loadd(5, al + a16, lda);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (NB == 2) {
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  char* cb = reinterpret_cast<char*>(c);
  _tile_stored(0, cb, ldc);
  _tile_stored(2, cb + 16 * ldc, ldc);
  if constexpr (NB == 2) {
    _tile_stored(1, cb + 64, ldc);
    _tile_stored(3, cb + 16 * ldc + 64, ldc);
  }
}

// e^x for x ≤ 0 (inputs below −88 give 0): x = n·ln2 + r, |r| ≤ ln2/2, e^r by its degree-7 Taylor polynomial
// (relative error < 3e-9), scaled by 2^n.
LOWRANK_AMX_BF16 inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts: exact n·hi
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// GELU(v) = v/2 · (1 + erf(v/√2)), erf by Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7), the formula
// ATen's own vectorized erf (and so F.gelu on CPU) uses.
LOWRANK_AMX_BF16 inline __m512 gelu(__m512 v) {
  const __m512 z = _mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f));
  const __m512 a = _mm512_abs_ps(z);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a,
                                                                         _mm512_set1_ps(1.f)));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  for (const float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f})
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(c));
  const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z)));
  const __m512 erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(poly, t), e, _mm512_set1_ps(1.f));  // 1 − t·poly·e^{−z²}
  const __m512 erf = _mm512_or_ps(erf_abs, _mm512_and_ps(z, _mm512_set1_ps(-0.f)));         // sign of z
  return _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.5f)), _mm512_add_ps(_mm512_set1_ps(1.f), erf));
}

// y[rows × cols] = act(acc + bias), rows ≤ 32, cols ≤ 32 (acc row stride 32 floats).
template <bool kGelu>
LOWRANK_AMX_BF16 void store_block(const float* acc, int64_t rows, int64_t cols, const float* bias, float* y,
                                  int64_t ldy) {
  for (int64_t v = 0; v < cols; v += 16) {
    const __mmask16 m = mask16(cols - v);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + v) : _mm512_setzero_ps();
    for (int64_t i = 0; i < rows; ++i) {
      __m512 out = _mm512_add_ps(b, _mm512_loadu_ps(acc + i * 32 + v));
      if constexpr (kGelu) out = gelu(out);
      _mm512_mask_storeu_ps(y + i * ldy + v, m, out);
    }
  }
}

// y[rows × cols] = silu(acc[:, :16] + bias_g) · (acc[:, 16:] + bias_u), rows ≤ 32, cols ≤ 16: the gate and up
// halves of one kernel block. silu(g) = g·σ(g), σ from e = exp(−|g|) ≤ 1 (no overflow for either sign).
LOWRANK_AMX_BF16 void store_swiglu(const float* acc, int64_t rows, int64_t cols, const float* bias_g,
                                   const float* bias_u, float* y, int64_t ldy) {
  const __mmask16 m = mask16(cols);
  const __m512 bg = bias_g ? _mm512_maskz_loadu_ps(m, bias_g) : _mm512_setzero_ps();
  const __m512 bu = bias_u ? _mm512_maskz_loadu_ps(m, bias_u) : _mm512_setzero_ps();
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 g = _mm512_add_ps(bg, _mm512_loadu_ps(acc + i * 32));
    const __m512 u = _mm512_add_ps(bu, _mm512_loadu_ps(acc + i * 32 + 16));
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const __m512 inv = _mm512_div_ps(one, _mm512_add_ps(one, e));
    const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 sig = _mm512_mask_mul_ps(inv, neg, inv, e);  // σ(g) = 1/(1+e), or e/(1+e) for g < 0
    _mm512_mask_storeu_ps(y + i * ldy, m, _mm512_mul_ps(_mm512_mul_ps(g, sig), u));
  }
}

enum : int { kActNone = 0, kActGelu = 1, kActSwiglu = 2 };

struct Problem {
  const float* x;
  int64_t ldx, T, K, Kc, Kp, N, Nt, Npairs, PR, chunks, per_chunk;
  const bf16* packed;
  const float* bias;
  float* y;
  int act;       // kActNone, kActGelu, kActSwiglu
  int64_t ldy;   // output columns: N, or H = N / 2 for SwiGLU
};

// Tasks [task0, task1) of (row panel, feature chunk), panel-major, so consecutive tasks share the split panel.
LOWRANK_AMX_BF16 void run_tasks(const Problem& P, int64_t task0, int64_t task1) {
  TileConfig cfg;
  load_config(cfg);
  std::vector<bf16> hi(P.PR * P.Kp), lo(P.PR * P.Kp);
  alignas(64) float acc[32 * 32];
  int64_t have = -1;
  for (int64_t task = task0; task < task1; ++task) {
    const int64_t p = task / P.chunks, q = task % P.chunks;
    const int64_t r0 = p * P.PR, rows = std::min(P.PR, P.T - r0);
    if (p != have) {
      split_rows(P.x + r0 * P.ldx, P.ldx, rows, ceil_div(rows, 32) * 32, P.K, P.Kp, hi.data(), lo.data());
      have = p;
    }
    const int64_t np0 = q * P.per_chunk, np1 = std::min(P.Npairs, np0 + P.per_chunk);
    for (int64_t np = np0; np < np1; ++np) {
      const bool swiglu = P.act == kActSwiglu;
      const int64_t t0 = 2 * np, nb = std::min<int64_t>(2, P.Nt - t0);
      // SwiGLU: tiles 2np / 2np + 1 are gate / up of output features 16np..16np+15
      const int64_t n0 = swiglu ? 16 * np : 16 * t0;
      const int64_t cols = std::min<int64_t>(swiglu ? 16 : 16 * nb, P.ldy - n0);
      const bf16* b0 = P.packed + t0 * P.Kc * 2 * kTileElems;
      const bf16* b1 = b0 + P.Kc * 2 * kTileElems;
      for (int64_t i0 = 0; i0 < rows; i0 += 32) {
        const int64_t rb = std::min<int64_t>(32, rows - i0);
        const bf16* ah = hi.data() + i0 * P.Kp;
        const bf16* al = lo.data() + i0 * P.Kp;
        float* yb = P.y + (r0 + i0) * P.ldy + n0;
        // A full block without bias goes straight to y; otherwise through acc for the bias and the edges.
        const bool direct = rb == 32 && cols == 32 && P.bias == nullptr && P.act == kActNone;
        float* c = direct ? yb : acc;
        const int64_t ldc = direct ? P.ldy * 4 : 32 * 4;
        if (nb == 2)
          block_kernel<2>(ah, al, P.Kp * 2, b0, b1, P.Kc, c, ldc);
        else
          block_kernel<1>(ah, al, P.Kp * 2, b0, b1, P.Kc, c, ldc);
        if (!direct) {
          const float* bb = P.bias ? P.bias + n0 : nullptr;
          if (swiglu)
            store_swiglu(acc, rb, cols, bb, P.bias ? P.bias + P.ldy + n0 : nullptr, yb, P.ldy);
          else if (P.act == kActGelu)
            store_block<true>(acc, rb, cols, bb, yb, P.ldy);
          else
            store_block<false>(acc, rb, cols, bb, yb, P.ldy);
        }
      }
    }
  }
  _tile_release();
}

// N: rows of the (packed) weight; for SwiGLU the packed tiles are the interleaved pairs of bf16x3_pack(gated) and
// the output has N / 2 columns.
void linear_amx(const float* x, int64_t ldx, int64_t T, int64_t K, const bf16* packed, int64_t N, const float* bias,
                float* y, int act) {
  Problem P{x, ldx, T, K, 0, 0, N, 0, 0, 0, 0, 0, packed, bias, y, act, act == kActSwiglu ? N / 2 : N};
  P.Kc = ceil_div(K, 32);
  P.Kp = 32 * P.Kc;
  P.Nt = act == kActSwiglu ? 2 * ceil_div(N / 2, 16) : ceil_div(N, 16);
  P.Npairs = ceil_div(P.Nt, 2);
  // A panel of PR rows (hi + lo: 4·PR·Kp bytes) stays in L2 while every feature tile passes over it; each pair of
  // feature tiles (8·Kp bytes of B tiles) is read once per panel and reused for PR / 32 row blocks.
  const int64_t max_rows = std::clamp<int64_t>((int64_t(1) << 20) / (4 * P.Kp) / 32 * 32, 32, 256);
  const int64_t threads = at::get_num_threads();
  // As many panels as the rows need, rounded up to a multiple of the threads and then evened out (2178 rows: 10
  // panels of 224 rows, 5 per thread, not 9 of 256 split 5 / 4: every thread finishes together).
  int64_t panels = ceil_div(T, max_rows);
  if (panels > threads) panels = ceil_div(panels, threads) * threads;
  P.PR = std::max<int64_t>(32, ceil_div(ceil_div(T, panels), 32) * 32);
  panels = ceil_div(T, P.PR);
  // Few panels (short inputs): split the features too, so that every thread has work.
  P.chunks = std::min<int64_t>(P.Npairs, std::max<int64_t>(1, ceil_div(2 * threads, panels)));
  P.per_chunk = ceil_div(P.Npairs, P.chunks);
  at::parallel_for(0, panels * P.chunks, 1, [&](int64_t t0, int64_t t1) { run_tasks(P, t0, t1); });
}
#endif  // LOWRANK_HAVE_BF16X3_AMX

at::Tensor bf16x3_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& packed, c10::string_view activation) {
  check_weight(weight, "bf16x3_linear");
  TORCH_CHECK_VALUE(activation == "none" || activation == "gelu" || activation == "swiglu",
                    "bf16x3_linear: activation must be 'none', 'gelu' or 'swiglu', got '", std::string(activation),
                    "'");
  const int act = activation == "gelu" ? kActGelu : activation == "swiglu" ? kActSwiglu : kActNone;
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "bf16x3_linear: x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "bf16x3_linear: x must be 2-D [T, in], got ", x.sizes());
  const int64_t T = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == K, "bf16x3_linear: x [T, in=", K, "] does not match weight ", weight.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, "bf16x3_linear: bias must be float32, got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bf16x3_linear: bias must be [out=", N, "], got ",
                      bias->sizes());
  }
  TORCH_CHECK_VALUE(act != kActSwiglu || N % 2 == 0, "bf16x3_linear: activation 'swiglu' needs weight = [gate; up] "
                    "([2H, in]), got ", weight.sizes());
  const int64_t Nt = act == kActSwiglu ? 2 * ceil_div(N / 2, 16) : ceil_div(N, 16), Kc = ceil_div(K, 32);
  const int64_t Nout = act == kActSwiglu ? N / 2 : N;
  if (packed.has_value() && packed->defined()) {
    TORCH_CHECK_VALUE(packed->scalar_type() == at::kBFloat16 && packed->is_contiguous() &&
                          packed->sizes() == at::IntArrayRef({Nt, Kc, 2, 16, 32}),
                      "bf16x3_linear: packed must be the contiguous bf16 [", Nt, ", ", Kc,
                      ", 2, 16, 32] of bf16x3_pack(weight, gated=", act == kActSwiglu ? "True" : "False", "), got ",
                      packed->scalar_type(), " ", packed->sizes());
  }
#if LOWRANK_HAVE_BF16X3_AMX
  TORCH_CHECK(cpu::cpu_isa() >= cpu::CpuIsa::kAmx, "bf16x3_linear: the CPU kernel needs AMX-BF16 tiles; this CPU (",
              cpu::isa_name(cpu::cpu_isa()), ") has none: use backend='torch'");
  at::Tensor out = at::empty({T, Nout}, x.options());
  if (T == 0 || N == 0) return out;
  if (K == 0) {
    const at::Tensor z = has_bias ? bias->expand({T, N}).contiguous() : at::zeros({T, N}, x.options());
    if (act == kActGelu) return at::gelu(z);
    if (act == kActSwiglu) return at::silu(z.narrow(1, 0, Nout)) * z.narrow(1, Nout, Nout);
    return z;
  }
  const at::Tensor pw = packed.has_value() && packed->defined() ? *packed : bf16x3_pack_cpu(weight, act == kActSwiglu);
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  linear_amx(xc.const_data_ptr<float>(), xc.stride(0), T, K, pw.const_data_ptr<bf16>(), N,
             has_bias ? b.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>(), act);
  return out;
#else
  TORCH_CHECK(false, "bf16x3_linear: the CPU kernel was built without AMX support (needs x86-64 Linux with GCC)");
#endif
}

}  // namespace

namespace cpu {
bool bf16x3_supported() {
#if LOWRANK_HAVE_BF16X3_AMX
  return cpu_isa() >= CpuIsa::kAmx;
#else
  return false;
#endif
}

at::Tensor bf16x3_linear(const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return bf16x3_linear_cpu(x2, w, bias, std::nullopt, "none");
}
}  // namespace cpu

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("bf16x3_pack", &bf16x3_pack_cpu);
  m.impl("bf16x3_linear", &bf16x3_linear_cpu);
}

}  // namespace lowrank
