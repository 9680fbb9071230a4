// Sparse-plus-low-rank linear (SLTrain, LOST), CPU.
//   forward:  y = (x·Aᵀ)·Bᵀ + b + x·Sᵀ             x [T, in], A [r, in], B [out, r], S [out, in] with nnz values
//   backward: gB = g·B;  dx = gB·A + g·S;  dA = gBᵀ·x;  dB = gᵀ·(x·Aᵀ);  dS[k] = Σ_t g[t, row_k]·x[t, col_k]
// S lives on a fixed support in CSR order (row_ptr int32; col_idx uint16 where in <= 65536, else int32; the
// order of s_values), built once per layer by lowrank.ops.SparseLayout. No [out, in] tensor is ever formed, and
// no transpose of the support is kept between calls: 2 index bytes a nonzero at rest.
//
// The rank-r products are skinny GEMMs that MKL/oneDNN already run near their peak, so they stay at::mm. The
// sparse products are hand-written and share one scheme: tokens are processed in blocks of TB (64, or 16 for few
// tokens); the block of a dense operand is transposed once into an fp32 (fp64 for fp64) buffer srcT [n][TB], so
// that each nonzero (i, c, v) becomes TB-wide vector work on row c of that buffer. The buffer is n·TB·4 bytes
// (1 MiB for n = 4096): it stays in L2 while every nonzero reads it, so each x row is read from memory once per
// call however many nonzeros use it. These kernels are bound by those scattered L2 reads, not by the FMAs.
//   forward x·Sᵀ: acc[i] += v·xT[c] (a gather; four AVX-512 FMAs for TB = 64); threads split output rows;
//     row results are gathered in a 16-row tile and added to the [T, out] output row by row. bf16 x on AVX-512:
//     the block stays in bf16 "pairs" (half the bytes a gather; a shift converts exactly).
//   backward, dx += g·S: with a few token blocks or more, the same gather on Sᵀ, whose CSC order (col_ptr,
//     row_idx, permuted values: 6–8 bytes a nonzero) is counting-sorted for the call and dropped after it;
//     with fewer, a scatter from the CSR walk below (dxT[c] += v·gT[i] into a transposed [in][TB] block, added
//     into dx when the block is done), which costs a read-modify-write a nonzero but no sort.
//   backward, dS[k] = gT[i]·xT[c]: one walk over the CSR entries with gT[i] in registers, 16 dot products
//     reduced at once by a shuffle tree; threads take whole token blocks, or split rows (with a private dx block
//     each when the walk also scatters dx) when there are few blocks.
//
// bf16/fp16 inputs are converted in the transposes and accumulated in fp32; each output element is rounded once
// after the sparse sum is added to the GEMM result. The AVX-512 kernels are hand-written; the ISA is chosen at
// run time from CPUID, and elsewhere the portable loops are compiled for AVX2 or baseline x86-64 (function-level
// target attributes, one source), so AVX2-only CPUs run a vectorized path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "common/sparse_lowrank_checks.h"
#include "cpu/isa.h"
#include "cpu/lowrank_kernels.h"
#include "cpu/masks.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SLR_X86 1
#define SLR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define SLR_AVX2 __attribute__((target("avx2,fma")))
#else
#define SLR_X86 0
#define SLR_AVX512
#define SLR_AVX2
#endif
#define SLR_INLINE inline __attribute__((always_inline))
#define SLR_INLINE_LAMBDA __attribute__((always_inline))
// GCC's -O3 unroll-and-jam fuses two nonzeros of the portable SpMM loop into one scalar loop over the tokens
// (measured: 7x slower on AVX2); the portable kernels' wrappers turn that pass off.
#if defined(__GNUC__) && !defined(__clang__)
#define SLR_NO_JAM __attribute__((optimize("no-loop-unroll-and-jam")))
#else
#define SLR_NO_JAM
#endif

namespace lowrank {
namespace {

using cpu::CpuIsa;

enum class Isa { kBase, kAvx2, kAvx512 };

// The widest of these kernels' instruction sets this CPU runs: cpu/isa.h's level (CPUID, capped by
// LOWRANK_MAX_CPU_ISA, so that tests on an AVX-512 machine also run the AVX2 and portable paths).
Isa cpu_isa() {
  const CpuIsa level = lowrank::cpu::cpu_isa();
  return level >= CpuIsa::kAvx512 ? Isa::kAvx512 : level >= CpuIsa::kAvx2 ? Isa::kAvx2 : Isa::kBase;
}

using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kRowTile = 16;  // rows gathered before the transposed add into the output

// ---- portable loops (compiled per ISA by the wrappers below) -------------------------------------------------
// out[j, r] += tile[r][j] for r < nr, tokens j < tb (tile: nr rows of TB, contiguous).
template <typename acc_t, int TB, typename out_t>
SLR_INLINE void add_tile_impl(const acc_t* __restrict__ tile, int64_t nr, out_t* __restrict__ out, int64_t ldo,
                              int64_t tb) {
  // __restrict__: without it a store to out may alias the tile, and GCC keeps the loop scalar and in order.
  for (int64_t j = 0; j < tb; ++j) {
    out_t* __restrict__ o = out + j * ldo;
    for (int64_t r = 0; r < nr; ++r) o[r] = static_cast<out_t>(static_cast<acc_t>(o[r]) + tile[r * TB + j]);
  }
}

// out[j, i] += Σ_{k in row i} val[k]·srcT[idx[k]][j]  for rows i in [r0, r1), tokens j < tb.
template <typename acc_t, int TB, typename out_t, typename idx_t>
SLR_INLINE void spmm_rows_impl(const int32_t* ptr, const idx_t* idx, const acc_t* val, const acc_t* srcT,
                               int64_t r0, int64_t r1, out_t* out, int64_t ldo, int64_t tb) {
  alignas(64) acc_t tile[kRowTile][TB];
  for (int64_t rb = r0; rb < r1; rb += kRowTile) {
    const int64_t nr = std::min(kRowTile, r1 - rb);
    for (int64_t r = 0; r < nr; ++r) {
      // A local accumulator (not the tile row) so the compiler can keep it in vector registers.
      acc_t acc[TB];
      for (int j = 0; j < TB; ++j) acc[j] = 0;
      for (int32_t k = ptr[rb + r]; k < ptr[rb + r + 1]; ++k) {
        const acc_t v = val[k];
        const acc_t* s = srcT + static_cast<int64_t>(idx[k]) * TB;
        // simd: without it GCC guards the loop with an aliasing check and often runs its scalar copy.
#pragma omp simd
        for (int j = 0; j < TB; ++j) acc[j] += v * s[j];
      }
      for (int j = 0; j < TB; ++j) tile[r][j] = acc[j];
    }
    add_tile_impl<acc_t, TB>(&tile[0][0], nr, out + rb, ldo, tb);
  }
}

// The backward's sparse work in one walk over the CSR entries k = (i, c) of rows [r0, r1) of a token block:
//   DV: dv[k] += Σ_j gT[i][j]·xT[c][j]     (d s_values, the sampled product)
//   DX: dxT[c][j] += val[k]·gT[i][j]       (g·S scattered into the block's transposed dx, [in][TB])
// Scattering through the CSR order is what lets the layout skip the CSC transpose (8 more index bytes a nonzero):
// both products read the same c, so the entry is visited once, with gT[i] hot for the whole row.
template <typename acc_t, int TB, typename idx_t, bool DX, bool DV>
SLR_INLINE void backward_rows_impl(const int32_t* ptr, const idx_t* idx, const acc_t* val, const acc_t* gT,
                                   const acc_t* xT, int64_t r0, int64_t r1, acc_t* dxT, acc_t* dv) {
  for (int64_t i = r0; i < r1; ++i) {
    acc_t g[TB];
    for (int j = 0; j < TB; ++j) g[j] = gT[i * TB + j];
    for (int32_t k = ptr[i]; k < ptr[i + 1]; ++k) {
      const int64_t c = static_cast<int64_t>(idx[k]) * TB;
      if constexpr (DV) {
        const acc_t* s = xT + c;
        acc_t d = 0;
#pragma omp simd reduction(+ : d)
        for (int j = 0; j < TB; ++j) d += g[j] * s[j];
        dv[k] += d;
      }
      if constexpr (DX) {
        const acc_t v = val[k];
        acc_t* o = dxT + c;
#pragma omp simd
        for (int j = 0; j < TB; ++j) o[j] += v * g[j];
      }
    }
  }
}

template <typename acc_t, int TB, typename out_t, typename idx_t>
SLR_NO_JAM void spmm_rows_base(const int32_t* p, const idx_t* i, const acc_t* v, const acc_t* s, int64_t r0, int64_t r1,
                    out_t* o, int64_t ldo, int64_t tb) {
  spmm_rows_impl<acc_t, TB>(p, i, v, s, r0, r1, o, ldo, tb);
}
template <typename acc_t, int TB, typename out_t, typename idx_t>
SLR_AVX2 SLR_NO_JAM void spmm_rows_avx2(const int32_t* p, const idx_t* i, const acc_t* v, const acc_t* s, int64_t r0,
                             int64_t r1, out_t* o, int64_t ldo, int64_t tb) {
  spmm_rows_impl<acc_t, TB>(p, i, v, s, r0, r1, o, ldo, tb);
}
template <typename acc_t, int TB, typename idx_t, bool DX, bool DV>
SLR_NO_JAM void backward_rows_base(const int32_t* p, const idx_t* i, const acc_t* v, const acc_t* g, const acc_t* x,
                                   int64_t r0, int64_t r1, acc_t* dxT, acc_t* dv) {
  backward_rows_impl<acc_t, TB, idx_t, DX, DV>(p, i, v, g, x, r0, r1, dxT, dv);
}
template <typename acc_t, int TB, typename idx_t, bool DX, bool DV>
SLR_AVX2 SLR_NO_JAM void backward_rows_avx2(const int32_t* p, const idx_t* i, const acc_t* v, const acc_t* g,
                                            const acc_t* x, int64_t r0, int64_t r1, acc_t* dxT, acc_t* dv) {
  backward_rows_impl<acc_t, TB, idx_t, DX, DV>(p, i, v, g, x, r0, r1, dxT, dv);
}
template <typename acc_t, int TB, typename out_t>
void add_tile_base(const acc_t* t, int64_t nr, out_t* o, int64_t ldo, int64_t tb) {
  add_tile_impl<acc_t, TB>(t, nr, o, ldo, tb);
}
template <typename acc_t, int TB, typename out_t>
SLR_AVX2 void add_tile_avx2(const acc_t* t, int64_t nr, out_t* o, int64_t ldo, int64_t tb) {
  add_tile_impl<acc_t, TB>(t, nr, o, ldo, tb);
}

// ---- AVX-512 ------------------------------------------------------------------------------------------------
#if SLR_X86
// 16 fp32 lanes from 16 elements (masked tail reads nothing past the mask).
SLR_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
SLR_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
SLR_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
SLR_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
SLR_AVX512 inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  // Round to nearest even, as c10::BFloat16 does (NaN stays a quiet NaN); plain AVX-512F, no BF16 extension.
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}
SLR_AVX512 inline void store16(c10::Half* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// In-register 16×16 fp32 transpose: r[q] lane c becomes r[c] lane q.
SLR_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4g + k], 128-bit lane L: column 4L + k of rows 4g .. 4g + 3
  for (int g = 0; g < 4; ++g) {
    r[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    r[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    r[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    r[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 v1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88), v2 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
    const __m512 w1 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    const __m512 w2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
    t[k] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    t[8 + k] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
    t[4 + k] = _mm512_shuffle_f32x4(v2, w2, 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(v2, w2, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// dst[c][j] = src[j, c] (j < tb, zero up to TB) for columns [c0, c1): 16×16 register transposes, so both the
// reads (16 contiguous elements of a row) and the writes (16 contiguous tokens of a column) are whole vectors.
template <typename scalar_t, int TB>
SLR_AVX512 void pack_avx512(const scalar_t* src, int64_t lds, int64_t tb, int64_t c0, int64_t c1, float* dst) {
  for (int64_t cb = c0; cb < c1; cb += 16) {
    const int64_t nc = std::min<int64_t>(16, c1 - cb);
    const __mmask16 cm = cpu::mask16(nc);
    for (int64_t j0 = 0; j0 < TB; j0 += 16) {
      __m512 r[16];
      for (int64_t q = 0; q < 16; ++q) r[q] = j0 + q < tb ? load16(src + (j0 + q) * lds + cb, cm) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t k = 0; k < nc; ++k) _mm512_storeu_ps(dst + (cb + k) * TB + j0, r[k]);
    }
  }
}

// out[j, 0:nr] += tile[0:nr][j] for tokens j < tb: the tile transposed 16 tokens at a time, then one vector
// read-modify-write of 16 contiguous outputs per token.
template <int TB, typename out_t>
SLR_AVX512 void add_tile_avx512(const float (*tile)[TB], int64_t nr, out_t* out, int64_t ldo, int64_t tb) {
  const __mmask16 rm = cpu::mask16(nr);
  for (int64_t j0 = 0; j0 < tb; j0 += 16) {
    __m512 r[16];
    for (int64_t q = 0; q < 16; ++q) r[q] = q < nr ? _mm512_load_ps(tile[q] + j0) : _mm512_setzero_ps();
    transpose16(r);
    const int64_t kn = std::min<int64_t>(16, tb - j0);
    for (int64_t k = 0; k < kn; ++k) {
      out_t* o = out + (j0 + k) * ldo;
      store16(o, _mm512_add_ps(load16(o, rm), r[k]), rm);
    }
  }
}

// The row loop of the AVX-512 gathers: out[j, i] += Σ_k val[k]·srcT[idx[k]][j] for rows [r0, r1). Entry k is
// added into TB/16 fp32 registers by add(a, broadcast val[k], k) (a functor over the block's layout); two
// accumulator sets (even/odd entries) so that the FMA chains hide the FMA latency even for TB = 16. Row sums are
// gathered in a 16-row tile and added to the [T, out] output row by row.
template <int TB, typename out_t, typename Add>
SLR_AVX512 SLR_INLINE void gather_rows_avx512(const int32_t* ptr, const float* val, int64_t r0, int64_t r1,
                                              out_t* out, int64_t ldo, int64_t tb, const Add& add) {
  constexpr int NV = TB / 16;
  alignas(64) float tile[kRowTile][TB];
  for (int64_t rb = r0; rb < r1; rb += kRowTile) {
    const int64_t nr = std::min(kRowTile, r1 - rb);
    for (int64_t r = 0; r < nr; ++r) {
      __m512 a0[NV], a1[NV];
      for (int v = 0; v < NV; ++v) a0[v] = a1[v] = _mm512_setzero_ps();
      int32_t k = ptr[rb + r];
      const int32_t ke = ptr[rb + r + 1];
      for (; k + 1 < ke; k += 2) {
        add(a0, _mm512_set1_ps(val[k]), k);
        add(a1, _mm512_set1_ps(val[k + 1]), k + 1);
      }
      if (k < ke) add(a0, _mm512_set1_ps(val[k]), k);
      for (int v = 0; v < NV; ++v) _mm512_store_ps(tile[r] + 16 * v, _mm512_add_ps(a0[v], a1[v]));
    }
    add_tile_avx512<TB>(tile, nr, out + rb, ldo, tb);
  }
}

// fp32 block srcT [n][TB]: one FMA per 16 tokens.
template <int TB, typename idx_t>
struct AddFp32Row {
  const float* srcT;
  const idx_t* idx;
  SLR_AVX512 SLR_INLINE void operator()(__m512* a, __m512 v, int32_t k) const {
    const float* s = srcT + static_cast<int64_t>(idx[k]) * TB;
    for (int q = 0; q < TB / 16; ++q) a[q] = _mm512_fmadd_ps(v, _mm512_loadu_ps(s + 16 * q), a[q]);
  }
};

// fp32 gather; fp64 runs the portable loops compiled for AVX-512.
template <typename acc_t, int TB, typename out_t, typename idx_t>
SLR_AVX512 SLR_NO_JAM void spmm_rows_avx512(const int32_t* ptr, const idx_t* idx, const acc_t* val,
                                            const acc_t* srcT, int64_t r0, int64_t r1, out_t* out, int64_t ldo,
                                            int64_t tb) {
  if constexpr (!std::is_same_v<acc_t, float>) {
    spmm_rows_impl<acc_t, TB>(ptr, idx, val, srcT, r0, r1, out, ldo, tb);
  } else {
    gather_rows_avx512<TB>(ptr, val, r0, r1, out, ldo, tb, AddFp32Row<TB, idx_t>{srcT, idx});
  }
}

// ---- bf16 pairs: the forward's transposed block kept in bf16 -------------------------------------------------
// The gather in spmm_rows is bound by the L2 reads of srcT rows (one per nonzero and token block), not by the
// FMAs. For bf16 x the block can stay in bf16, exactly, at half the bytes a row: each 32-bit lane j of a 32-token
// group holds token j in its low half and token j + 16 in its high half, so a left shift by 16 and a mask give
// the two tokens' fp32 values with no shuffles, in token order.
// dst[c][16·q + j] = (bits of src[32q + j, c]) | (bits of src[32q + 16 + j, c]) << 16, zero past tb.
template <int TB>
SLR_AVX512 void pack_pairs_avx512(const c10::BFloat16* src, int64_t lds, int64_t tb, int64_t c0, int64_t c1,
                                  uint32_t* dst) {
  static_assert(TB % 32 == 0, "pairs pack 32-token groups");
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t cb = c0; cb < c1; cb += 16) {
    const int64_t nc = std::min<int64_t>(16, c1 - cb);
    const __mmask16 cm = cpu::mask16(nc);
    for (int64_t j0 = 0; j0 < TB; j0 += 32) {
      __m512 lo[16], hi[16];
      for (int64_t q = 0; q < 16; ++q) {
        lo[q] = j0 + q < tb ? load16(src + (j0 + q) * lds + cb, cm) : _mm512_setzero_ps();
        hi[q] = j0 + 16 + q < tb ? load16(src + (j0 + 16 + q) * lds + cb, cm) : _mm512_setzero_ps();
      }
      transpose16(lo);
      transpose16(hi);
      for (int64_t k = 0; k < nc; ++k) {
        const __m512i w = _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(lo[k]), 16),
                                          _mm512_and_si512(_mm512_castps_si512(hi[k]), hi_mask));
        _mm512_storeu_si512(dst + (cb + k) * (TB / 2) + j0 / 2, w);
      }
    }
  }
}

// One 64-byte line of a pairs block as fp32: lo = tokens 32q + 0..15, hi = tokens 32q + 16..31 (exact).
SLR_AVX512 SLR_INLINE __m512 pairs_lo(__m512i w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); }
SLR_AVX512 SLR_INLINE __m512 pairs_hi(__m512i w) {
  return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// bf16 pairs block srcT [n][TB/2] (pack_pairs_avx512): per 32 tokens one load, a shift and a mask, two FMAs.
template <int TB, typename idx_t>
struct AddPairsRow {
  const uint32_t* srcT;
  const idx_t* idx;
  SLR_AVX512 SLR_INLINE void operator()(__m512* a, __m512 v, int32_t k) const {
    const uint32_t* s = srcT + static_cast<int64_t>(idx[k]) * (TB / 2);
    for (int l = 0; l < TB / 32; ++l) {
      const __m512i w = _mm512_loadu_si512(s + 16 * l);
      a[2 * l] = _mm512_fmadd_ps(v, pairs_lo(w), a[2 * l]);
      a[2 * l + 1] = _mm512_fmadd_ps(v, pairs_hi(w), a[2 * l + 1]);
    }
  }
};

// The gather on a pairs block: out[j, i] += Σ_k val[k]·x[j, idx[k]], fp32 accumulation.
template <int TB, typename idx_t>
SLR_AVX512 SLR_NO_JAM void spmm_rows_pairs_avx512(const int32_t* ptr, const idx_t* idx, const float* val,
                                                  const uint32_t* srcT, int64_t r0, int64_t r1, c10::BFloat16* out,
                                                  int64_t ldo, int64_t tb) {
  gather_rows_avx512<TB>(ptr, val, r0, r1, out, ldo, tb, AddPairsRow<TB, idx_t>{srcT, idx});
}

// 16 vectors p[0..15] -> one vector whose lane q is the sum of p[q]'s lanes: a shuffle tree (45 instructions for
// 16 dot products), instead of one horizontal reduction (a serial 8-instruction chain) per dot product.
SLR_AVX512 inline __m512 reduce16(const __m512 p[16]) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i) {
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * i], p[2 * i + 1]), _mm512_unpackhi_ps(p[2 * i], p[2 * i + 1]));
  }
  // u[i], 128-bit lane L: the lane-L partial sums of p[4i .. 4i + 3], in order
  for (int i = 0; i < 4; ++i) {
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  }
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

// Entries [k0, ke) of a row, 16 at a time: p[q] = entry(k) (its dot product; entry may also scatter), and with DV
// dv[k] += p[q] through one reduce16 a chunk. Whole chunks are unrolled with a compile-time count so that p stays
// in registers (a runtime count puts it on the stack); the last chunk is masked.
template <bool DV, typename Entry>
SLR_AVX512 SLR_INLINE void entry_chunks(int32_t k0, int32_t ke, float* dv, const Entry& entry) {
  for (; k0 + 16 <= ke; k0 += 16) {
    __m512 p[16];
#pragma GCC unroll 16
    for (int q = 0; q < 16; ++q) p[q] = entry(k0 + q);
    if constexpr (DV) _mm512_storeu_ps(dv + k0, _mm512_add_ps(_mm512_loadu_ps(dv + k0), reduce16(p)));
  }
  if (k0 < ke) {
    const int n = ke - k0;
    __m512 p[16];
    for (int q = 0; q < 16; ++q) p[q] = q < n ? entry(k0 + q) : _mm512_setzero_ps();
    if constexpr (DV) {
      const __mmask16 m = cpu::mask16(n);
      _mm512_mask_storeu_ps(dv + k0, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dv + k0), reduce16(p)));
    }
  }
}

// fp32 backward walk (see backward_rows_impl): the row's gT[i] in TB/16 registers; dot products of 16 nonzeros
// are reduced together by reduce16 and added to dv with one vector read-modify-write.
template <typename acc_t, int TB, typename idx_t, bool DX, bool DV>
SLR_AVX512 SLR_NO_JAM void backward_rows_avx512(const int32_t* ptr, const idx_t* idx, const acc_t* val,
                                                const acc_t* gT, const acc_t* xT, int64_t r0, int64_t r1,
                                                acc_t* dxT, acc_t* dv) {
  if constexpr (!std::is_same_v<acc_t, float>) {
    backward_rows_impl<acc_t, TB, idx_t, DX, DV>(ptr, idx, val, gT, xT, r0, r1, dxT, dv);
  } else {
    constexpr int NV = TB / 16;
    for (int64_t i = r0; i < r1; ++i) {
      __m512 g[NV];
      for (int v = 0; v < NV; ++v) g[v] = _mm512_loadu_ps(gT + i * TB + 16 * v);
      // Entry k: its dot product (DV) and its scatter (DX).
      auto entry = [&](int32_t k) SLR_INLINE_LAMBDA {
        const int64_t c = static_cast<int64_t>(idx[k]) * TB;
        if constexpr (DX) {
          const __m512 vk = _mm512_set1_ps(val[k]);
          float* o = dxT + c;
          for (int v = 0; v < NV; ++v) {
            _mm512_storeu_ps(o + 16 * v, _mm512_fmadd_ps(vk, g[v], _mm512_loadu_ps(o + 16 * v)));
          }
        }
        __m512 d = _mm512_setzero_ps();
        if constexpr (DV) {
          const float* s = xT + c;
          d = _mm512_mul_ps(g[0], _mm512_loadu_ps(s));
          for (int v = 1; v < NV; ++v) d = _mm512_fmadd_ps(g[v], _mm512_loadu_ps(s + 16 * v), d);
        }
        return d;
      };
      entry_chunks<DV>(ptr[i], ptr[i + 1], dv, entry);
    }
  }
}

// dS alone (dx by the CSC gather) for a bf16 call: the x block in bf16 pairs (pack_pairs_avx512), half the
// bytes a dot product reads; gT[i] in fp32 registers in token order, matched to each pair's low and high tokens.
template <int TB, typename idx_t>
SLR_AVX512 SLR_NO_JAM void dv_rows_pairs_avx512(const int32_t* ptr, const idx_t* idx, const float* gT,
                                                const uint32_t* xP, int64_t r0, int64_t r1, float* dv) {
  constexpr int NV = TB / 16, NL = TB / 32;
  for (int64_t i = r0; i < r1; ++i) {
    __m512 g[NV];
    for (int v = 0; v < NV; ++v) g[v] = _mm512_loadu_ps(gT + i * TB + 16 * v);
    auto dot = [&](int32_t k) SLR_INLINE_LAMBDA {
      const uint32_t* s = xP + static_cast<int64_t>(idx[k]) * (TB / 2);
      __m512 d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps();
      for (int l = 0; l < NL; ++l) {
        const __m512i w = _mm512_loadu_si512(s + 16 * l);
        d0 = _mm512_fmadd_ps(g[2 * l], pairs_lo(w), d0);
        d1 = _mm512_fmadd_ps(g[2 * l + 1], pairs_hi(w), d1);
      }
      return _mm512_add_ps(d0, d1);
    };
    entry_chunks<true>(ptr[i], ptr[i + 1], dv, dot);
  }
}

#endif

template <typename acc_t, int TB, typename out_t, typename idx_t>
void spmm_rows(const int32_t* p, const idx_t* i, const acc_t* v, const acc_t* s, int64_t r0, int64_t r1, out_t* o,
               int64_t ldo, int64_t tb) {
#if SLR_X86
  if (cpu_isa() == Isa::kAvx512) return spmm_rows_avx512<acc_t, TB>(p, i, v, s, r0, r1, o, ldo, tb);
  if (cpu_isa() == Isa::kAvx2) return spmm_rows_avx2<acc_t, TB>(p, i, v, s, r0, r1, o, ldo, tb);
#endif
  spmm_rows_base<acc_t, TB>(p, i, v, s, r0, r1, o, ldo, tb);
}

template <typename acc_t, int TB, typename idx_t, bool DX, bool DV>
void backward_rows(const int32_t* p, const idx_t* i, const acc_t* v, const acc_t* g, const acc_t* x, int64_t r0,
                   int64_t r1, acc_t* dxT, acc_t* dv) {
#if SLR_X86
  if (cpu_isa() == Isa::kAvx512) return backward_rows_avx512<acc_t, TB, idx_t, DX, DV>(p, i, v, g, x, r0, r1, dxT, dv);
  if (cpu_isa() == Isa::kAvx2) return backward_rows_avx2<acc_t, TB, idx_t, DX, DV>(p, i, v, g, x, r0, r1, dxT, dv);
#endif
  backward_rows_base<acc_t, TB, idx_t, DX, DV>(p, i, v, g, x, r0, r1, dxT, dv);
}

// out[j, r] += tile[r][j] for r < nr, tokens j < tb, on the widest instruction set.
template <typename acc_t, int TB, typename out_t>
void add_tile(const acc_t* tile, int64_t nr, out_t* out, int64_t ldo, int64_t tb) {
#if SLR_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_isa() == Isa::kAvx512) {
      return add_tile_avx512<TB>(reinterpret_cast<const float(*)[TB]>(tile), nr, out, ldo, tb);
    }
  }
  if (cpu_isa() == Isa::kAvx2) return add_tile_avx2<acc_t, TB>(tile, nr, out, ldo, tb);
#endif
  add_tile_base<acc_t, TB>(tile, nr, out, ldo, tb);
}

// out[j, c] += srcT[c][j] for columns c in [c0, c1), tokens j < tb, 16 columns at a time, and srcT[c] = 0 after:
// the 16-column slice is in L1 then, so clearing it here is cheaper than a separate pass over the whole buffer
// (measured on a 512 KiB-L2 AVX2 CPU: the memset pass plus the re-read from L3 cost as much as the rank-r GEMMs).
template <typename acc_t, int TB, typename out_t>
void add_transposed_clear(acc_t* srcT, int64_t c0, int64_t c1, out_t* out, int64_t ldo, int64_t tb) {
  for (int64_t c = c0; c < c1; c += kRowTile) {
    const int64_t nr = std::min(kRowTile, c1 - c);
    acc_t* tile = srcT + c * TB;
    add_tile<acc_t, TB>(tile, nr, out + c, ldo, tb);
    std::fill_n(tile, nr * TB, acc_t(0));
  }
}

// dst[c][j] = src[j, c] for tokens j < tb (zero for tb <= j < TB), columns c < n, converted to acc_t.
template <typename scalar_t, typename acc_t, int TB>
void pack_transposed(const scalar_t* src, int64_t lds, int64_t tb, int64_t n, acc_t* dst) {
  // Grain: about 2^16 converted elements a task; a few-token block is one task.
  const int64_t grain = std::max<int64_t>(256, (int64_t{1} << 16) / std::max<int64_t>(tb, 1));
  at::parallel_for(0, n, grain, [&](int64_t c0, int64_t c1) {
#if SLR_X86
    if constexpr (std::is_same_v<acc_t, float>) {
      if (cpu_isa() == Isa::kAvx512) return pack_avx512<scalar_t, TB>(src, lds, tb, c0, c1, dst);
    }
#endif
    for (int64_t cb = c0; cb < c1; cb += 64) {
      const int64_t ce = std::min(c1, cb + 64);
      for (int64_t j = 0; j < tb; ++j) {
        const scalar_t* s = src + j * lds;
        for (int64_t c = cb; c < ce; ++c) dst[c * TB + j] = static_cast<acc_t>(s[c]);
      }
      for (int64_t c = cb; c < ce; ++c)
        for (int64_t j = tb; j < TB; ++j) dst[c * TB + j] = acc_t(0);
    }
  });
}

// Below this many multiply-adds (nonzeros × block tokens) a block runs on one thread: waking a second one (and,
// on a loaded machine, waiting for it at the barrier) costs more than the work.
constexpr int64_t kMinParallelWork = int64_t{1} << 20;

// Rows are handed to threads in chunks of whole row tiles.
template <typename F>
void parallel_rows(int64_t n, int64_t work, const F& f) {
  const int64_t tiles = (n + kRowTile - 1) / kRowTile;
  if (work < kMinParallelWork) return f(0, n);
  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) { f(b * kRowTile, std::min(n, e * kRowTile)); });
}

// Many tokens: threads take whole token blocks from a shared counter, each with its own transposed buffer, so the
// call is one parallel region with no barrier per block. On this shared 2-core machine, where a thread is often
// descheduled, two barriers per 64-token block made a 2048-token call 5x slower than one thread; the dynamic
// hand-out also absorbs uneven progress. f(block, slot) runs every block once; slot < the returned count.
int64_t block_slots(int64_t n_blocks) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_blocks));
}

template <typename F>
void for_token_blocks(int64_t n_blocks, int64_t slots, const F& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, slots, 1, [&](int64_t b, int64_t e) {
    for (int64_t slot = b; slot < e; ++slot) {
      for (int64_t blk = next.fetch_add(1); blk < n_blocks; blk = next.fetch_add(1)) f(blk, slot);
    }
  });
}

// Token blocks per call from which threads split tokens instead of rows (fewer blocks: rows, so few-token calls
// still use every thread).
bool token_parallel(int64_t n_blocks) { return n_blocks >= 2 * at::get_num_threads() && at::get_num_threads() > 1; }

#if SLR_X86
// pack_pairs_avx512 over columns [0, n), split between threads as pack_transposed is.
template <int TB>
void pack_pairs(const c10::BFloat16* src, int64_t lds, int64_t tb, int64_t n, uint32_t* dst) {
  const int64_t grain = std::max<int64_t>(256, (int64_t{1} << 16) / std::max<int64_t>(tb, 1));
  at::parallel_for(0, n, grain, [&](int64_t c0, int64_t c1) { pack_pairs_avx512<TB>(src, lds, tb, c0, c1, dst); });
}
#endif

// y[t, i] += Σ_k val[k]·src[t, idx[k]] over a CSR matrix (ptr, idx, val) with n_rows rows: the forward's x·Sᵀ
// (S's CSR, src = x) and the backward's g·S (S's per-call CSC, src = g).
// PAIRS (bf16 src on AVX-512): the transposed block is kept in bf16 pairs (pack_pairs_avx512), else in acc_t.
template <typename scalar_t, typename acc_t, int TB, typename idx_t, bool PAIRS = false>
void spmm_add(const at::Tensor& src, const int32_t* ptr, const idx_t* idx, const acc_t* val, int64_t n_rows,
              at::Tensor& y) {
  const int64_t T = src.size(0), n_src = src.size(1), lds = src.stride(0), ldy = y.stride(0);
  const int64_t n_blocks = (T + TB - 1) / TB;
  const bool by_tokens = token_parallel(n_blocks);
  const int64_t slots = by_tokens ? block_slots(n_blocks) : 1;
  // Buffer elements per column of a block: TB accumulator values, or TB/2 32-bit bf16 pairs.
  constexpr int64_t kCol = PAIRS ? TB / 2 : TB;
  const at::Tensor buf =
      at::empty({slots * n_src * kCol}, src.options().dtype(PAIRS ? at::kInt : c10::CppTypeToScalarType<acc_t>::value));
  const scalar_t* s = src.const_data_ptr<scalar_t>();
  scalar_t* out = y.mutable_data_ptr<scalar_t>();
  auto block = [&](int64_t blk, int64_t slot, bool rows_parallel) {
    const int64_t t0 = blk * TB, tb = std::min<int64_t>(TB, T - t0);
    scalar_t* o = out + t0 * ldy;
    auto over_rows = [&](const auto& rows) {
      if (rows_parallel) {
        parallel_rows(n_rows, ptr[n_rows] * tb, rows);
      } else {
        rows(0, n_rows);
      }
    };
#if SLR_X86
    if constexpr (PAIRS) {
      uint32_t* srcT = reinterpret_cast<uint32_t*>(buf.mutable_data_ptr<int32_t>()) + slot * n_src * kCol;
      pack_pairs<TB>(s + t0 * lds, lds, tb, n_src, srcT);
      return over_rows([&](int64_t r0, int64_t r1) {
        spmm_rows_pairs_avx512<TB>(ptr, idx, val, srcT, r0, r1, o, ldy, tb);
      });
    }
#endif
    acc_t* srcT = buf.mutable_data_ptr<acc_t>() + slot * n_src * kCol;
    pack_transposed<scalar_t, acc_t, TB>(s + t0 * lds, lds, tb, n_src, srcT);
    over_rows([&](int64_t r0, int64_t r1) { spmm_rows<acc_t, TB>(ptr, idx, val, srcT, r0, r1, o, ldy, tb); });
  };
  if (by_tokens) {
    for_token_blocks(n_blocks, slots, [&](int64_t blk, int64_t slot) { block(blk, slot, false); });
  } else {
    for (int64_t blk = 0; blk < n_blocks; ++blk) block(blk, 0, true);
  }
}

// Few tokens: a 16-token block wastes less on padding (a 64-token block costs the same as 64 tokens).
template <typename scalar_t, typename acc_t, typename idx_t>
void spmm_add_dispatch(const at::Tensor& src, const int32_t* ptr, const idx_t* idx, const acc_t* val,
                       int64_t n_rows, at::Tensor& y) {
  if (src.size(0) <= 16) {
    spmm_add<scalar_t, acc_t, 16>(src, ptr, idx, val, n_rows, y);
    return;
  }
#if SLR_X86
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // Measured (1 thread, 4096², 2048 tokens): 128-token pair blocks were no faster than 64 (-5% at 5%, +6% at 1%).
    if (cpu_isa() == Isa::kAvx512) return spmm_add<scalar_t, acc_t, 64, idx_t, true>(src, ptr, idx, val, n_rows, y);
  }
#endif
  spmm_add<scalar_t, acc_t, 64>(src, ptr, idx, val, n_rows, y);
}

// Backward sparse work on the CSR order alone (see backward_rows_impl): dv += SDDMM and dx += g·S, the latter
// scattered into a transposed [in][TB] fp32 block buffer that is added into dx once the block's rows are done.
// Token-parallel calls give each thread its own buffers and dv partial sum [nnz] (added up at the end). Row-parallel
// calls (few token blocks) share the transposed g and x blocks, and each thread scatters into its own dx buffer
// (any row may hit any column); the buffers are then summed into dx by column tiles.
template <typename scalar_t, typename acc_t, int TB, typename idx_t>
void sparse_backward(const at::Tensor& g2, const at::Tensor& x2, const int32_t* row_ptr, const idx_t* col_idx,
                     const acc_t* val, at::Tensor* dx, at::Tensor* dv) {
  const int64_t T = g2.size(0), out = g2.size(1), in = x2.size(1), nnz = row_ptr[out];
  const int64_t n_blocks = (T + TB - 1) / TB;
  const bool by_tokens = token_parallel(n_blocks);
  const int64_t slots = by_tokens ? block_slots(n_blocks) : 1;
  const int64_t dx_slots = dx == nullptr ? 0 : by_tokens ? slots : std::max<int64_t>(1, at::get_num_threads());
  const auto opts = g2.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor gbuf = at::empty({slots * out * TB}, opts);
  // dS alone of a bf16 call on AVX-512: the x block in bf16 pairs (dv_rows_pairs_avx512), half the buffer.
  const bool pairs = std::is_same_v<scalar_t, c10::BFloat16> && TB % 32 == 0 && dx == nullptr && SLR_X86 &&
                     cpu_isa() == Isa::kAvx512;
  const int64_t xcol = pairs ? TB / 2 : TB;  // buffer elements per column of a block
  const at::Tensor xbuf = dv != nullptr ? at::empty({slots * in * xcol}, opts) : at::Tensor();
  // Zero once here: every add into dx clears the slice it read, so a buffer is all zeros between blocks.
  const at::Tensor dxbuf = dx != nullptr ? at::zeros({dx_slots * in * TB}, opts) : at::Tensor();
  const at::Tensor dv_part = dv != nullptr && slots > 1 ? at::zeros({slots - 1, nnz}, opts) : at::Tensor();
  const scalar_t* g = g2.const_data_ptr<scalar_t>();
  const scalar_t* x = x2.const_data_ptr<scalar_t>();
  const int64_t ldg = g2.stride(0), ldx = x2.stride(0), ldo = dx != nullptr ? dx->stride(0) : 0;
  auto walk = [&](const acc_t* gT, const acc_t* xT, acc_t* dxT, acc_t* d, int64_t r0, int64_t r1) {
#if SLR_X86
    if constexpr (std::is_same_v<acc_t, float> && TB % 32 == 0) {
      if (pairs) {
        return dv_rows_pairs_avx512<TB>(row_ptr, col_idx, gT, reinterpret_cast<const uint32_t*>(xT), r0, r1, d);
      }
    }
#endif
    if (dxT != nullptr && d != nullptr) {
      backward_rows<acc_t, TB, idx_t, true, true>(row_ptr, col_idx, val, gT, xT, r0, r1, dxT, d);
    } else if (dxT != nullptr) {
      backward_rows<acc_t, TB, idx_t, true, false>(row_ptr, col_idx, val, gT, xT, r0, r1, dxT, d);
    } else {
      backward_rows<acc_t, TB, idx_t, false, true>(row_ptr, col_idx, val, gT, xT, r0, r1, dxT, d);
    }
  };
  auto block = [&](int64_t blk, int64_t slot, bool rows_parallel) {
    const int64_t t0 = blk * TB, tb = std::min<int64_t>(TB, T - t0);
    acc_t* gT = gbuf.mutable_data_ptr<acc_t>() + slot * out * TB;
    pack_transposed<scalar_t, acc_t, TB>(g + t0 * ldg, ldg, tb, out, gT);
    acc_t* xT = nullptr;
    acc_t* d = nullptr;
    if (dv != nullptr) {
      xT = xbuf.mutable_data_ptr<acc_t>() + slot * in * xcol;
#if SLR_X86
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && TB % 32 == 0) {
        if (pairs) pack_pairs<TB>(x + t0 * ldx, ldx, tb, in, reinterpret_cast<uint32_t*>(xT));
      }
#endif
      if (!pairs) pack_transposed<scalar_t, acc_t, TB>(x + t0 * ldx, ldx, tb, in, xT);
      d = slot == 0 ? dv->mutable_data_ptr<acc_t>() : dv_part.mutable_data_ptr<acc_t>() + (slot - 1) * nnz;
    }
    scalar_t* o = dx != nullptr ? dx->mutable_data_ptr<scalar_t>() + t0 * ldo : nullptr;
    acc_t* dx0 = dx != nullptr ? dxbuf.mutable_data_ptr<acc_t>() : nullptr;
    if (!rows_parallel) {
      acc_t* dxT = dx != nullptr ? dx0 + slot * in * TB : nullptr;
      walk(gT, xT, dxT, d, 0, out);
      if (dxT != nullptr) add_transposed_clear<acc_t, TB>(dxT, 0, in, o, ldo, tb);
      return;
    }
    std::vector<char> used(static_cast<size_t>(dx_slots), 0);
    parallel_rows(out, nnz * tb, [&](int64_t r0, int64_t r1) {
      acc_t* dxT = nullptr;
      if (dx != nullptr) {
        const int64_t tid = at::get_thread_num();
        TORCH_INTERNAL_ASSERT(tid >= 0 && tid < dx_slots, "sparse_lowrank_linear_backward: thread ", tid);
        dxT = dx0 + tid * in * TB;
        used[tid] = 1;
      }
      walk(gT, xT, dxT, d, r0, r1);
    });
    if (dx != nullptr) {
      at::parallel_for(0, in, std::max<int64_t>(kRowTile, (int64_t{1} << 16) / TB), [&](int64_t c0, int64_t c1) {
        for (int64_t sl = 0; sl < dx_slots; ++sl) {
          if (used[sl]) add_transposed_clear<acc_t, TB>(dx0 + sl * in * TB, c0, c1, o, ldo, tb);
        }
      });
    }
  };
  if (by_tokens) {
    for_token_blocks(n_blocks, slots, [&](int64_t blk, int64_t slot) { block(blk, slot, false); });
    // Row by row into dv: sum(0) would hold one more [nnz] temporary at the step's memory peak.
    if (dv_part.defined()) {
      for (int64_t p = 0; p < dv_part.size(0); ++p) dv->add_(dv_part[p]);
    }
  } else {
    for (int64_t blk = 0; blk < n_blocks; ++blk) block(blk, 0, true);
  }
}

// The CSC order of S for one backward call: col_ptr [in + 1], row_idx [nnz] (uint16 where out <= 65536, the row
// of each entry in column order) and the values permuted alike, a counting sort of the CSR entries. It is formed
// here and dropped with the call, so the layout keeps 2 index bytes a nonzero at rest; with it, dx += g·S is the
// forward's gather kernel on Sᵀ (accumulators in registers, one read of a g row per nonzero) instead of the CSR
// walk's scatter (a read-modify-write of a dx row per nonzero), 2-3x faster per token block (measured, 4096², 5%,
// 1 thread: 131 -> ~60 ms fp32). The sort costs ~2 passes over the entries: worth it from a few token blocks.
constexpr int64_t kCscMinBlocks = 4;

template <typename val_t, typename acc_t, typename idx_t, typename ridx_t>
void build_csc(const int32_t* row_ptr, const idx_t* col_idx, const val_t* val, int64_t out, int64_t in,
               int32_t* col_ptr, ridx_t* row_idx, acc_t* val_csc) {
  std::fill_n(col_ptr, in + 1, 0);
  const int64_t nnz = row_ptr[out];
  for (int64_t k = 0; k < nnz; ++k) ++col_ptr[static_cast<int64_t>(col_idx[k]) + 1];
  for (int64_t c = 0; c < in; ++c) col_ptr[c + 1] += col_ptr[c];
  std::vector<int32_t> next(col_ptr, col_ptr + in);
  // Rows in increasing order, so every column's entries come out sorted by row, as a CSR of Sᵀ must be.
  for (int64_t i = 0; i < out; ++i) {
    for (int32_t k = row_ptr[i]; k < row_ptr[i + 1]; ++k) {
      const int32_t pos = next[col_idx[k]]++;
      row_idx[pos] = static_cast<ridx_t>(i);
      val_csc[pos] = static_cast<acc_t>(val[k]);
    }
  }
}

// dx[t, c] += Σ_i g[t, i]·S[i, c] as the gather x·Sᵀ of the forward with S's CSC order in place of the CSR.
// val: s_values in their own dtype, converted to acc_t as they are permuted (no separate converted copy).
template <typename scalar_t, typename acc_t, typename idx_t>
void dx_add_csc(const at::Tensor& g2, const int32_t* row_ptr, const idx_t* col_idx, const scalar_t* val,
                int64_t in, at::Tensor& dx) {
  const int64_t out = g2.size(1), nnz = row_ptr[out];
  const at::Tensor col_ptr = at::empty({in + 1}, g2.options().dtype(at::kInt));
  const at::Tensor vt = at::empty({nnz}, g2.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  auto run = [&](auto ridx_tag) {
    using ridx_t = decltype(ridx_tag);
    const at::Tensor row_idx = at::empty({nnz}, g2.options().dtype(c10::CppTypeToScalarType<ridx_t>::value));
    build_csc(row_ptr, col_idx, val, out, in, col_ptr.mutable_data_ptr<int32_t>(),
              row_idx.mutable_data_ptr<ridx_t>(), vt.mutable_data_ptr<acc_t>());
    spmm_add_dispatch<scalar_t, acc_t>(g2, col_ptr.const_data_ptr<int32_t>(), row_idx.const_data_ptr<ridx_t>(),
                                       vt.const_data_ptr<acc_t>(), in, dx);
  };
  if (out <= 65536) {
    run(uint16_t{});
  } else {
    run(int32_t{});
  }
}

// Calls f(idx_t{}) with the C++ type of the column indices (uint16 where in <= 65536, else int32).
template <typename F>
void dispatch_index(const at::Tensor& col_idx, const F& f) {
  if (col_idx.scalar_type() == at::kUInt16) {
    f(uint16_t{});
  } else {
    f(int32_t{});
  }
}

// 2-D view [tokens, n] with unit column stride (rows may be strided: the transposes read them in place).
at::Tensor rows_view(const at::Tensor& t, int64_t n) {
  at::Tensor t2 = t.reshape({-1, n});
  return t2.stride(1) == 1 ? t2 : t2.contiguous();
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor sparse_lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                     const at::Tensor& s_values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                     const OptTensor& col_ptr, const OptTensor& row_idx, const OptTensor& perm,
                                     const OptTensor& bias) {
  check_sparse_lowrank_args(x, lora_a, lora_b, s_values, row_ptr, col_idx, col_ptr, row_idx, perm, bias);
  const int64_t in = lora_a.size(1), out = lora_b.size(0), nnz = s_values.size(0);
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  check_compressed_cpu(rp, ci, in, "sparse_lowrank_linear: (row_ptr, col_idx)");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out;
  const at::Tensor x2 = rows_view(x, in);
  const bool has_bias = bias.has_value() && bias->defined();
  // Low-rank part and bias: two skinny GEMMs, the second writing the fresh output (bias in its epilogue).
  const at::Tensor h = at::mm(x2, lora_a.t());
  // bf16 with a bias on AVX512-BF16: oneDNN adds the bias in the GEMM's epilogue (addmm's bias fill of the whole
  // output cost 2.9 ms of a 2048×4096 layer's 8.5 ms expand, measured, 1 thread).
  const bool onednn = has_bias && x.scalar_type() == at::kBFloat16 && cpu::has_avx512_bf16() &&
                      cpu::onednn_linear_op() != nullptr && lora_b.is_contiguous();
  at::Tensor y = onednn ? cpu::onednn_linear(h, lora_b, bias)
                        : has_bias ? at::addmm(*bias, h, lora_b.t()) : at::mm(h, lora_b.t());
  if (x2.size(0) > 0 && nnz > 0) {
    const at::Tensor val = s_values.to(acc_type(x.scalar_type())).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sparse_lowrank_linear_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      dispatch_index(ci, [&](auto tag) {
        using idx_t = decltype(tag);
        spmm_add_dispatch<scalar_t, acc_t>(x2, rp.const_data_ptr<int32_t>(), ci.const_data_ptr<idx_t>(),
                                           val.const_data_ptr<acc_t>(), out, y);
      });
    });
  }
  return y.view(out_shape);
}

// (dx, dA, dB, d s_values) under output_mask; the bias gradient is a row sum done by the caller. The CSC
// transpose (col_ptr, row_idx, perm), if given, is not read: the sparse work walks the CSR order only.
std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> sparse_lowrank_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& s_values, const at::Tensor& row_ptr, const at::Tensor& col_idx, const OptTensor& col_ptr,
    const OptTensor& row_idx, const OptTensor& perm, std::array<bool, 4> output_mask) {
  check_sparse_lowrank_args(x, lora_a, lora_b, s_values, row_ptr, col_idx, col_ptr, row_idx, perm, std::nullopt);
  const int64_t in = lora_a.size(1), out = lora_b.size(0), nnz = s_values.size(0);
  check_sparse_lowrank_grad(grad_out, x, in, out);
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  if (output_mask[0] || output_mask[3]) {
    check_compressed_cpu(rp, ci, in, "sparse_lowrank_linear_backward: (row_ptr, col_idx)");
  }
  const at::Tensor g2 = rows_view(grad_out, out);
  const at::Tensor x2 = rows_view(x, in);
  const int64_t T = x2.size(0);
  OptTensor dx, da, db, dv;
  at::Tensor gb;  // g·B [T, r], shared by dx and dA
  if (output_mask[0] || output_mask[1]) gb = at::mm(g2, lora_b);
  if (output_mask[0]) dx = at::mm(gb, lora_a);     // fresh [T, in]; the sparse g·S is added in place below
  // (Not kept: contiguous [r, T] copies of gB and h before these products, 1–4 ms faster at 2048 × 4096 × 128
  // but with 1 MB more of oneDNN scratch at the step's memory peak, over issue 6's 0.3× at 1024×4096.)
  // dB before dA: the larger dA [r, in] is then not held while dB's GEMM has its scratch.
  if (output_mask[2]) db = at::mm(g2.t(), at::mm(x2, lora_a.t()));
  if (output_mask[1]) da = at::mm(gb.t(), x2);
  gb = at::Tensor();  // not needed past here: freed before the sparse phase's buffers are allocated
  // Transients are allocated where they are needed and dropped before the next phase (the step's peak memory
  // beyond its activations is one of issue 6's measures): the CSC order lives only during the dx gather, and the
  // converted values and the dS accumulator only during the walk.
  const auto acc_dtype = acc_type(x.scalar_type());
  at::Tensor dv_acc;
  if (T > 0 && nnz > 0 && (output_mask[0] || output_mask[3])) {
    const at::Tensor sv = s_values.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sparse_lowrank_linear_bwd", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      dispatch_index(ci, [&](auto idx_tag) {
        using idx_t = decltype(idx_tag);
        // Many token blocks: dx by the gather on a per-call CSC order, dS by the CSR walk alone.
        const bool csc = output_mask[0] && (T + 63) / 64 >= kCscMinBlocks;
        if (csc) {
          dx_add_csc<scalar_t, acc_t>(g2, rp.const_data_ptr<int32_t>(), ci.const_data_ptr<idx_t>(),
                                      sv.const_data_ptr<scalar_t>(), in, *dx);
          if (!output_mask[3]) return;
        }
        const bool walk_dx = output_mask[0] && !csc;
        const at::Tensor val = walk_dx ? sv.to(acc_dtype) : at::Tensor();
        if (output_mask[3]) dv_acc = at::zeros({nnz}, s_values.options().dtype(acc_dtype));
        auto run = [&](auto tb_tag) {
          constexpr int TB = decltype(tb_tag)::value;
          sparse_backward<scalar_t, acc_t, TB, idx_t>(g2, x2, rp.const_data_ptr<int32_t>(),
                                                      ci.const_data_ptr<idx_t>(),
                                                      walk_dx ? val.const_data_ptr<acc_t>() : nullptr,
                                                      walk_dx ? &*dx : nullptr,
                                                      output_mask[3] ? &dv_acc : nullptr);
        };
        // 32-token blocks past 16 tokens: as fast as 64 (measured, 4096², 1–5%, 1 thread) with half the per-thread
        // transposed buffers, which sit at the step's memory peak.
        if (T <= 16) {
          run(std::integral_constant<int, 16>{});
        } else {
          run(std::integral_constant<int, 32>{});
        }
      });
    });
  }
  if (output_mask[0]) dx = dx->view(x.sizes());
  if (output_mask[3]) {
    dv = dv_acc.defined() ? dv_acc.to(s_values.scalar_type()) : at::zeros({nnz}, s_values.options());
  }
  return {dx, da, db, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("sparse_lowrank_linear", &sparse_lowrank_linear_cpu);
  m.impl("sparse_lowrank_linear_backward", &sparse_lowrank_linear_backward_cpu);
}

}  // namespace lowrank
