// See lowrank_kernels.h for what these compute and why. The AVX-512 kernels are compiled with a function-level
// target attribute and chosen at run time by the CPU's features; other CPUs (and fp16/fp64) take ATen's GEMMs,
// which compute the same products (the choice is by hardware, the results agree to rounding).
#include "cpu/lowrank_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <vector>

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
constexpr int64_t CV = 4;   // registers per row of an expand tile (64 columns)

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

bool cpu_has_avx512_bf16() {
#if LOWRANK_HAVE_AVX512_KERNELS
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

#if LOWRANK_HAVE_AVX512_KERNELS
// Store 16 fp32 lanes as T, masked to the valid lanes.
LOWRANK_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
LOWRANK_AVX512 inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));  // round to nearest even
}
LOWRANK_AVX512 inline __mmask16 tail_mask(int64_t n) {
  return n >= L ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

// Y[i, n0 + ·] = bias + Σ_k H[i, k] · N[k, n0 + ·] for RB rows × 64 columns (N padded to 64 columns).
template <typename T>
LOWRANK_AVX512 void expand_tile(const float* h, int64_t r, const float* N, int64_t Np, const float* bias,
                                int64_t n0, int64_t cols, int64_t rb, T* y, int64_t ldy) {
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
    for (int64_t v = 0; v < CV && v * L < cols; ++v)
      store16(y + i * ldy + n0 + v * L, acc[i][v], tail_mask(cols - v * L));
}

template <typename T>
void expand_avx512(const at::Tensor& h, const at::Tensor& np, const float* bias, int64_t Nout, at::Tensor& y) {
  const int64_t T_ = h.size(0), r = h.size(1), Np = np.size(1), ldy = y.stride(0);
  const float* H = h.const_data_ptr<float>();
  const float* N = np.const_data_ptr<float>();
  T* Y = y.mutable_data_ptr<T>();
  at::parallel_for(0, (T_ + RB - 1) / RB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t = b * RB, rb = std::min(RB, T_ - t);
      for (int64_t n0 = 0; n0 < Nout; n0 += CV * L)
        expand_tile<T>(H + t * r, r, N, Np, bias, n0, std::min(CV * L, Nout - n0), rb, Y + t * ldy, ldy);
    }
  });
}
#endif  // LOWRANK_HAVE_AVX512_KERNELS

// bf16 only: there oneDNN's K = r expand is the slow path (4.3–5.3 ms above); MKL's fp32 sgemm runs the same
// shape near the floor (1.6 ms in place), so fp32 keeps ATen's products and their rounding.
bool use_avx512(at::ScalarType dtype) { return cpu_has_avx512_bf16() && dtype == at::kBFloat16; }

}  // namespace

at::Tensor pack_rows_f32(const at::Tensor& m, double scale) {
  const int64_t r = m.size(0), K = m.size(1);
  at::Tensor out = at::zeros({r, round_up(std::max<int64_t>(K, 1), CV * L)}, m.options().dtype(at::kFloat));
  out.narrow(1, 0, K).copy_(m);
  if (scale != 1.0) out.mul_(scale);
  return out;
}

at::Tensor shrink(const at::Tensor& x2, const at::Tensor& m, double scale) {
  // An N = r GEMM reads X once at the memory floor in MKL/oneDNN already (measured 0.18 ms for bf16
  // 2048×768×16, faster than a hand-tiled AVX-512 version); only the result is widened and scaled.
  at::Tensor h = at::mm(x2, m.t()).to(at::kFloat);
  return scale == 1.0 ? h : h.mul_(scale);
}

at::Tensor expand(const at::Tensor& h, const at::Tensor& n, const std::optional<at::Tensor>& bias,
                  at::ScalarType dtype) {
  TORCH_CHECK(h.dim() == 2 && n.dim() == 2 && h.size(1) == n.size(0) && h.scalar_type() == at::kFloat &&
                  h.is_contiguous(), "expand: bad arguments");
  const bool has_bias = bias.has_value() && bias->defined();
  if (!use_avx512(dtype) || h.size(0) == 0) {
    const at::Tensor hd = h.to(dtype);
    return has_bias ? at::addmm(*bias, hd, n) : at::mm(hd, n);
  }
#if LOWRANK_HAVE_AVX512_KERNELS
  const int64_t Nout = n.size(1);
  const at::Tensor np = pack_rows_f32(n);
  at::Tensor bf;
  if (has_bias) {
    bf = at::zeros({np.size(1)}, h.options());
    bf.narrow(0, 0, Nout).copy_(*bias);
  }
  at::Tensor y = at::empty({h.size(0), Nout}, h.options().dtype(dtype));
  const float* bp = has_bias ? bf.const_data_ptr<float>() : nullptr;
  if (dtype == at::kBFloat16) {
    expand_avx512<c10::BFloat16>(h, np, bp, Nout, y);
  } else {
    expand_avx512<float>(h, np, bp, Nout, y);
  }
  return y;
#else
  TORCH_CHECK(false, "unreachable");
#endif
}

}  // namespace lowrank::cpu
