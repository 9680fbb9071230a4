// Fused LoRA linear, CUDA kernels (torch-free: only CUDA headers, so nvcc can compile-check this file alone).
//
//   y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ      x [T, in], W [out, in], b [out], A [r, in], B [out, r], r = 1..256
//
// The base product x·Wᵀ + b is a large dense GEMM and stays with cuBLAS (at::addmm in lora_linear.cu). The
// low-rank correction is done by two kernels here, following the "shrink / expand" split that Punica and vLLM
// use for batched LoRA serving:
//   shrink:      h[T, r]    = x·Aᵀ             reduces over `in` (long); h is kept in the accumulation type
//                                              (fp32, fp64 for double) and never rounded to x's dtype
//   expand-add:  y[T, out] += s·h·Bᵀ           reduces over r (short); y is read in its dtype, the sum is formed
//                                              in the accumulation type and rounded once when written back
// Why two kernels instead of one: the shrink needs whole rows of x (a reduction over `in`) while the expand is
// parallel over `out`; fusing them would either recompute h in every out-tile (out/64 times the shrink work)
// or need a grid-wide barrier. h is tiny (T·r floats), so the extra launch and the round trip through L2 cost
// less than either. Adding into the cuBLAS output in place avoids an output-sized temporary, and keeping h in
// fp32 makes the result at least as accurate as the unfused layer, which rounds h, h·Bᵀ and s·h·Bᵀ to x's dtype.
//
// Tiling (both kernels): 256 threads as a 16×16 grid; each thread owns a TM×TN register micro-tile, strided by
// 16 in both directions so that a half-warp touches 16 consecutive columns. Per step of kBK along the reduced
// dimension the block stages one tile of each operand in shared memory, converted to the accumulation type and
// stored k-major with one column of padding (conflict-free transposed stores, broadcast reads):
//   shrink:  x tile [BT × kBK] and A tile [BR × kBK]; the x tile is reused by all BR = 16·TN ranks of the
//            block, and with r ≤ 64 one block covers every rank, so x is read from memory exactly once.
//   expand:  h tile [BT × kBK] and B tile [BO × kBK]; B is reused across the BT tokens of the block.
// TM (1 for T ≤ 16, else 4) and TN (1, 2 or 4 from r) are chosen at launch so decode (T = 1) and small ranks do
// not burn work on padding. For decode the grid is tiny, so the shrink also splits `in` across blockIdx.z
// ("split-K"): each split writes its own fp32 partial h_part[split] and the expand kernel sums the partials as
// it stages the h tile. That keeps the result deterministic (no atomics) at the cost of splits·T·r floats of
// workspace, which the caller allocates from lora_shrink_num_splits().
//
// Element types: float, double, __half, __nv_bfloat16 (conversions are explicit, so the file also compiles
// under torch's -D__CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__). Pointers are raw, rows may
// be padded (ld* are row strides in elements, columns must be contiguous), all indices are 64-bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_elem.cuh"

namespace lowrank {
namespace kernels {

// ---- element traits ----------------------------------------------------------------------------------------
// Element traits (load into the accumulation type, round back) are shared: common/cuda_elem.cuh.
template <typename scalar_t>
using LoraElem = Elem<scalar_t>;

// The type h is kept in: float for float/half/bfloat16, double for double.
template <typename scalar_t>
using lora_acc_t = elem_acc_t<scalar_t>;

// ---- tiling constants ----------------------------------------------------------------------------------------
constexpr int kLoraThreads = 256;  // 16 × 16
constexpr int kLoraSide = 16;
constexpr int kLoraBK = 32;        // step along the reduced dimension (in for shrink, r for expand) = warp size
constexpr int kLoraWarps = kLoraThreads / kLoraBK;
constexpr int kLoraMaxSplits = 32;
constexpr int64_t kLoraMinSplitK = 4 * kLoraBK;  // a split reduces at least this many columns of x
constexpr int64_t kLoraMaxGridY = 65535;

// Resident blocks per SM the kernels are compiled for: caps registers at 64 (fp32 accumulation) or 128 (fp64)
// per thread. Without the hint ptxas aims at full occupancy and spills the accumulators of the larger tiles.
template <typename scalar_t>
__host__ __device__ constexpr int lora_min_blocks() {
  return sizeof(lora_acc_t<scalar_t>) == 8 ? 2 : 4;
}

__host__ __device__ constexpr int64_t lora_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of T per thread: 1 for decode-sized batches, 4 otherwise (BT = 16 or 64 tokens per block).
inline int lora_tile_tm(int64_t tokens) { return tokens <= kLoraSide ? 1 : 4; }
// Ranks per thread in the shrink: BR = 16, 32 or 64 ranks per block.
inline int lora_tile_tn(int64_t r) { return r <= 16 ? 1 : (r <= 32 ? 2 : 4); }

// How many splits of `in` the shrink uses: enough blocks for about two waves on `num_sms` multiprocessors,
// at most kLoraMaxSplits, and each split at least kLoraMinSplitK long. The caller sizes the workspace
// h_part [splits, tokens, r] (lora_acc_t) with it and passes the same number to both launches.
inline int lora_shrink_num_splits(int64_t tokens, int64_t r, int64_t in, int num_sms) {
  if (tokens <= 0 || r <= 0) return 1;
  const int64_t tiles = lora_ceil_div(tokens, kLoraSide * lora_tile_tm(tokens)) *
                        lora_ceil_div(r, kLoraSide * lora_tile_tn(r));
  const int64_t want = lora_ceil_div(2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1), tiles);
  int64_t by_k = in / kLoraMinSplitK;
  if (by_k < 1) by_k = 1;
  int64_t splits = want < by_k ? want : by_k;
  if (splits > kLoraMaxSplits) splits = kLoraMaxSplits;
  return static_cast<int>(splits < 1 ? 1 : splits);
}

// The register micro-tile both kernels share: acc[i][j] += Σ_kk us[kk][ty + kLoraSide·i] · vs[kk][tx + kLoraSide·j]
// over one kLoraBK-deep slice staged in shared memory (k-major, so a warp reads consecutive addresses).
template <int TM, int TN, typename acc_t, typename UTile, typename VTile>
__device__ __forceinline__ void lora_tile_fma(const UTile& us, const VTile& vs, int ty, int tx,
                                              acc_t (&acc)[TM][TN]) {
#pragma unroll
  for (int kk = 0; kk < kLoraBK; ++kk) {
    acc_t uf[TM], vf[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) uf[i] = us[kk][ty + kLoraSide * i];
#pragma unroll
    for (int j = 0; j < TN; ++j) vf[j] = vs[kk][tx + kLoraSide * j];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = fma(uf[i], vf[j], acc[i][j]);
  }
}

// ---- shrink: h_part[z] = x[:, kz]·A[:, kz]ᵀ over the z-th slice kz of `in` ------------------------------
template <typename scalar_t, int TM, int TN>
__global__ void __launch_bounds__(kLoraThreads, lora_min_blocks<scalar_t>())
    lora_shrink_kernel(const scalar_t* __restrict__ x, int64_t ldx, const scalar_t* __restrict__ a, int64_t lda,
                       lora_acc_t<scalar_t>* __restrict__ h_part, int64_t tokens, int64_t r, int64_t in,
                       int64_t k_per_split) {
  using E = LoraElem<scalar_t>;
  using acc_t = lora_acc_t<scalar_t>;
  constexpr int BT = kLoraSide * TM;
  constexpr int BR = kLoraSide * TN;
  __shared__ acc_t xs[kLoraBK][BT + 1];
  __shared__ acc_t as[kLoraBK][BR + 1];

  const int tx = threadIdx.x % kLoraSide;
  const int ty = threadIdx.x / kLoraSide;
  const int lane = threadIdx.x % kLoraBK;
  const int warp = threadIdx.x / kLoraBK;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * BT;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * BR;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_per_split;
  const int64_t k_end = k_begin + k_per_split < in ? k_begin + k_per_split : in;
  // Rows ty, ty + 16, ... belong to this thread; if the first is past the end, so are the others.
  const bool active = t0 + ty < tokens;

  acc_t acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = acc_t(0);

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kLoraBK) {
    // Coalesced along k (the contiguous dimension of x and A), transposed into k-major shared tiles.
    // Lane = k, warp = row: each warp reads kBK consecutive elements of one row of x / A.
    const int64_t col = k0 + lane;
#pragma unroll
    for (int it = 0; it < BT / kLoraWarps; ++it) {
      const int tt = warp + kLoraWarps * it;
      const int64_t row = t0 + tt;
      xs[lane][tt] = (row < tokens && col < k_end) ? E::load(x[row * ldx + col]) : acc_t(0);
    }
#pragma unroll
    for (int it = 0; it < BR / kLoraWarps; ++it) {
      const int rr = warp + kLoraWarps * it;
      const int64_t row = r0 + rr;
      as[lane][rr] = (row < r && col < k_end) ? E::load(a[row * lda + col]) : acc_t(0);
    }
    __syncthreads();
    if (active) lora_tile_fma<TM, TN>(xs, as, ty, tx, acc);
    __syncthreads();
  }

  // Every split writes its whole tile (zeros for an empty slice): the expand kernel sums all of them.
  acc_t* out = h_part + static_cast<int64_t>(blockIdx.z) * tokens * r;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = t0 + ty + kLoraSide * i;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t col = r0 + tx + kLoraSide * j;
      if (row < tokens && col < r) out[row * r + col] = acc[i][j];
    }
  }
}

// ---- expand-add: y += s·(Σ_z h_part[z])·Bᵀ ----------------------------------------------------------------
template <typename scalar_t, int TM, int TN>
__global__ void __launch_bounds__(kLoraThreads, lora_min_blocks<scalar_t>())
    lora_expand_add_kernel(const lora_acc_t<scalar_t>* __restrict__ h_part, int num_splits,
                           const scalar_t* __restrict__ b, int64_t ldb, scalar_t* __restrict__ y, int64_t ldy,
                           int64_t tokens, int64_t out, int64_t r, lora_acc_t<scalar_t> scale) {
  using E = LoraElem<scalar_t>;
  using acc_t = lora_acc_t<scalar_t>;
  constexpr int BT = kLoraSide * TM;
  constexpr int BO = kLoraSide * TN;
  __shared__ acc_t hs[kLoraBK][BT + 1];
  __shared__ acc_t bs[kLoraBK][BO + 1];

  const int tx = threadIdx.x % kLoraSide;
  const int ty = threadIdx.x / kLoraSide;
  const int lane = threadIdx.x % kLoraBK;
  const int warp = threadIdx.x / kLoraBK;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * BT;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * BO;
  const int64_t split_stride = tokens * r;
  const bool active = t0 + ty < tokens;

  acc_t acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = acc_t(0);

  for (int64_t k0 = 0; k0 < r; k0 += kLoraBK) {
    const int64_t col = k0 + lane;
#pragma unroll
    for (int it = 0; it < BT / kLoraWarps; ++it) {
      const int tt = warp + kLoraWarps * it;
      const int64_t row = t0 + tt;
      acc_t v = acc_t(0);
      if (row < tokens && col < r) {
        const acc_t* p = h_part + row * r + col;
        for (int z = 0; z < num_splits; ++z) v += p[z * split_stride];
      }
      hs[lane][tt] = v;
    }
#pragma unroll
    for (int it = 0; it < BO / kLoraWarps; ++it) {
      const int oo = warp + kLoraWarps * it;
      const int64_t row = o0 + oo;
      bs[lane][oo] = (row < out && col < r) ? E::load(b[row * ldb + col]) : acc_t(0);
    }
    __syncthreads();
    if (active) lora_tile_fma<TM, TN>(hs, bs, ty, tx, acc);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = t0 + ty + kLoraSide * i;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t col = o0 + tx + kLoraSide * j;
      if (row < tokens && col < out) {
        scalar_t* p = y + row * ldy + col;
        *p = E::store(fma(scale, acc[i][j], E::load(*p)));
      }
    }
  }
}

// ---- host launchers --------------------------------------------------------------------------------------------
namespace detail {

template <typename scalar_t, int TM, int TN>
cudaError_t launch_shrink_tiled(const scalar_t* x, int64_t ldx, const scalar_t* a, int64_t lda,
                                lora_acc_t<scalar_t>* h_part, int64_t tokens, int64_t r, int64_t in, int num_splits,
                                cudaStream_t stream) {
  const int64_t k_per_split = lora_ceil_div(lora_ceil_div(in, num_splits), kLoraBK) * kLoraBK;
  const dim3 grid(static_cast<unsigned>(lora_ceil_div(tokens, kLoraSide * TM)),
                  static_cast<unsigned>(lora_ceil_div(r, kLoraSide * TN)), static_cast<unsigned>(num_splits));
  lora_shrink_kernel<scalar_t, TM, TN>
      <<<grid, kLoraThreads, 0, stream>>>(x, ldx, a, lda, h_part, tokens, r, in, k_per_split);
  return cudaGetLastError();
}

template <typename scalar_t, int TM>
cudaError_t shrink_pick_tn(const scalar_t* x, int64_t ldx, const scalar_t* a, int64_t lda,
                           lora_acc_t<scalar_t>* h_part, int64_t tokens, int64_t r, int64_t in, int num_splits,
                           cudaStream_t stream) {
  switch (lora_tile_tn(r)) {
    case 1: return launch_shrink_tiled<scalar_t, TM, 1>(x, ldx, a, lda, h_part, tokens, r, in, num_splits, stream);
    case 2: return launch_shrink_tiled<scalar_t, TM, 2>(x, ldx, a, lda, h_part, tokens, r, in, num_splits, stream);
    default: return launch_shrink_tiled<scalar_t, TM, 4>(x, ldx, a, lda, h_part, tokens, r, in, num_splits, stream);
  }
}

template <typename scalar_t, int TM>
cudaError_t launch_expand_tiled(const lora_acc_t<scalar_t>* h_part, int num_splits, const scalar_t* b, int64_t ldb,
                                scalar_t* y, int64_t ldy, int64_t tokens, int64_t out, int64_t r, double scale,
                                cudaStream_t stream) {
  constexpr int TN = 4;  // 64 output columns per block
  const dim3 grid(static_cast<unsigned>(lora_ceil_div(tokens, kLoraSide * TM)),
                  static_cast<unsigned>(lora_ceil_div(out, kLoraSide * TN)));
  lora_expand_add_kernel<scalar_t, TM, TN><<<grid, kLoraThreads, 0, stream>>>(
      h_part, num_splits, b, ldb, y, ldy, tokens, out, r, static_cast<lora_acc_t<scalar_t>>(scale));
  return cudaGetLastError();
}

}  // namespace detail

// h_part [num_splits, tokens, r] (lora_acc_t, contiguous) = split partials of x·Aᵀ.
// x: [tokens, in] with row stride ldx; a: [r, in] with row stride lda. Launches on `stream`, does not sync.
template <typename scalar_t>
cudaError_t launch_lora_shrink(const scalar_t* x, int64_t ldx, const scalar_t* a, int64_t lda,
                               lora_acc_t<scalar_t>* h_part, int64_t tokens, int64_t r, int64_t in, int num_splits,
                               cudaStream_t stream) {
  if (tokens <= 0 || r <= 0) return cudaSuccess;
  if (in < 0 || num_splits < 1 || num_splits > kLoraMaxSplits || lora_ceil_div(r, kLoraSide) > kLoraMaxGridY ||
      lora_ceil_div(tokens, kLoraSide) > 0x7fffffffLL)
    return cudaErrorInvalidValue;
  return lora_tile_tm(tokens) == 1
             ? detail::shrink_pick_tn<scalar_t, 1>(x, ldx, a, lda, h_part, tokens, r, in, num_splits, stream)
             : detail::shrink_pick_tn<scalar_t, 4>(x, ldx, a, lda, h_part, tokens, r, in, num_splits, stream);
}

// y [tokens, out] (row stride ldy) += scale · (Σ_z h_part[z]) · bᵀ, b: [out, r] with row stride ldb.
// h_part as written by launch_lora_shrink with the same num_splits. Launches on `stream`, does not sync.
template <typename scalar_t>
cudaError_t launch_lora_expand_add(const lora_acc_t<scalar_t>* h_part, int num_splits, const scalar_t* b,
                                   int64_t ldb, scalar_t* y, int64_t ldy, int64_t tokens, int64_t out, int64_t r,
                                   double scale, cudaStream_t stream) {
  if (tokens <= 0 || out <= 0 || r <= 0) return cudaSuccess;
  if (num_splits < 1 || lora_ceil_div(out, 4 * kLoraSide) > kLoraMaxGridY ||
      lora_ceil_div(tokens, kLoraSide) > 0x7fffffffLL)
    return cudaErrorInvalidValue;
  return lora_tile_tm(tokens) == 1
             ? detail::launch_expand_tiled<scalar_t, 1>(h_part, num_splits, b, ldb, y, ldy, tokens, out, r, scale,
                                                        stream)
             : detail::launch_expand_tiled<scalar_t, 4>(h_part, num_splits, b, ldb, y, ldy, tokens, out, r, scale,
                                                        stream);
}

}  // namespace kernels
}  // namespace lowrank

// Explicit instantiation of both launchers (and through them every kernel variant) for one element type.
// tests/build/test_nvcc.py expands every LOWRANK_*_INSTANTIATE macro of a kernel header for float, double,
// __half and __nv_bfloat16, so the templates are compiled, not just parsed.
#define LOWRANK_LORA_LINEAR_INSTANTIATE(scalar_t)                                                             \
  template cudaError_t lowrank::kernels::launch_lora_shrink<scalar_t>(                                      \
      const scalar_t*, int64_t, const scalar_t*, int64_t, lowrank::kernels::lora_acc_t<scalar_t>*, int64_t, \
      int64_t, int64_t, int, cudaStream_t);                                                                  \
  template cudaError_t lowrank::kernels::launch_lora_expand_add<scalar_t>(                                  \
      const lowrank::kernels::lora_acc_t<scalar_t>*, int, const scalar_t*, int64_t, scalar_t*, int64_t,      \
      int64_t, int64_t, int64_t, double, cudaStream_t);
