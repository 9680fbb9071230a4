// Multi-adapter LoRA (SGMV), CUDA kernels (torch-free: only CUDA headers, so nvcc can compile-check this alone).
//
//   y[perm[i]] += s_a·(x[perm[i]]·A_a[:r_a]ᵀ)·B_a[:, :r_a]ᵀ     for i in adapter a's segment offsets[a]..offsets[a+1]
//
// x [T, in], A [n, r, in], B [n, out, r], perm [T] / offsets [n + 1] int64 (lowrank.ops.AdapterSegments),
// ranks [n] int64 or null (all r), scaling [n] fp64. The base product x·Wᵀ + b is cuBLAS (the glue); these two
// kernels add the LoRA term in place, following the shrink / expand split of Punica's SGMV:
//   shrink:  h[i, k] = s_a·Σ_j x[perm[i], j]·A_a[k, j]    grid (⌈T/16⌉, n, ⌈r/16⌉), 16 segment rows × 16 ranks
//            per block; x rows are gathered through perm while a 16 × 32 tile is staged in shared memory (never a
//            gathered copy in global memory); h [rows, r] is kept in the accumulation type, segment order.
//   expand:  y[perm[i], c] += Σ_k h[i, k]·B_a[c, k]          grid (⌈T/16⌉, n, ⌈out/64⌉), 16 rows × 64 columns
//            per block, each thread 4 columns strided by 16 (a half-warp writes 16 consecutive elements).
// Blocks whose rows lie past their segment's end return at once: the grid is sized for the worst case (one
// adapter holding every token) so that no host sync is needed to size it. Each y row belongs to exactly one
// segment, so the in-place adds never race. Element types: float, double, __half, __nv_bfloat16; columns of x, A
// and B must be contiguous (rows may be padded: ld* are row strides in elements); all indices are 64-bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_elem.cuh"

namespace lowrank {
namespace kernels {

template <typename scalar_t>
using mlora_acc_t = elem_acc_t<scalar_t>;

constexpr int kMloraSide = 16;      // segment rows per block; ranks per shrink block
constexpr int kMloraThreads = 256;  // 16 × 16
constexpr int kMloraBK = 32;        // step along `in` in the shrink (= warp size)
constexpr int kMloraWarps = kMloraThreads / kMloraBK;
constexpr int kMloraCols = 4;       // output columns per thread in the expand (64 per block)

__host__ __device__ constexpr int64_t mlora_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t>
__global__ void __launch_bounds__(kMloraThreads)
    mlora_shrink_kernel(const scalar_t* __restrict__ x, int64_t ldx, const scalar_t* __restrict__ a, int64_t lda0,
                        int64_t lda1, const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets,
                        const int64_t* __restrict__ ranks, const double* __restrict__ scaling,
                        mlora_acc_t<scalar_t>* __restrict__ h, int64_t in, int64_t r) {
  using E = Elem<scalar_t>;
  using acc_t = mlora_acc_t<scalar_t>;
  __shared__ acc_t xs[kMloraBK][kMloraSide + 1];
  __shared__ acc_t as[kMloraBK][kMloraSide + 1];
  const int64_t adapter = blockIdx.y;
  const int64_t end = offsets[adapter + 1];
  const int64_t i0 = offsets[adapter] + static_cast<int64_t>(blockIdx.x) * kMloraSide;
  const int64_t rank = ranks != nullptr ? ranks[adapter] : r;
  const int64_t k0 = static_cast<int64_t>(blockIdx.z) * kMloraSide;
  if (i0 >= end || k0 >= rank) return;  // uniform over the block, before any barrier
  const int tx = threadIdx.x % kMloraSide;  // rank
  const int ty = threadIdx.x / kMloraSide;  // segment row
  const int lane = threadIdx.x % kMloraBK;
  const int warp = threadIdx.x / kMloraBK;
  const scalar_t* a_ad = a + adapter * lda0;
  acc_t acc = acc_t(0);
  for (int64_t c0 = 0; c0 < in; c0 += kMloraBK) {
    const int64_t col = c0 + lane;
#pragma unroll
    for (int it = 0; it < kMloraSide / kMloraWarps; ++it) {
      const int row = warp + kMloraWarps * it;
      const int64_t i = i0 + row;
      xs[lane][row] = (i < end && col < in) ? E::load(x[perm[i] * ldx + col]) : acc_t(0);
      const int64_t k = k0 + row;
      as[lane][row] = (k < rank && col < in) ? E::load(a_ad[k * lda1 + col]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kMloraBK; ++kk) acc = fma(xs[kk][ty], as[kk][tx], acc);
    __syncthreads();
  }
  const int64_t i = i0 + ty, k = k0 + tx;
  if (i < end && k < rank) h[i * r + k] = static_cast<acc_t>(scaling[adapter]) * acc;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMloraThreads)
    mlora_expand_kernel(const mlora_acc_t<scalar_t>* __restrict__ h, const scalar_t* __restrict__ b, int64_t ldb0,
                        int64_t ldb1, const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets,
                        const int64_t* __restrict__ ranks, scalar_t* __restrict__ y, int64_t ldy, int64_t out,
                        int64_t r) {
  using E = Elem<scalar_t>;
  using acc_t = mlora_acc_t<scalar_t>;
  const int64_t adapter = blockIdx.y;
  const int64_t end = offsets[adapter + 1];
  const int64_t i = offsets[adapter] + static_cast<int64_t>(blockIdx.x) * kMloraSide + threadIdx.x / kMloraSide;
  const int64_t rank = ranks != nullptr ? ranks[adapter] : r;
  if (i >= end || rank <= 0) return;  // no barrier in this kernel: threads may leave on their own
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * kMloraSide * kMloraCols + threadIdx.x % kMloraSide;
  const scalar_t* b_ad = b + adapter * ldb0;
  const acc_t* hi = h + i * r;
  acc_t acc[kMloraCols];
#pragma unroll
  for (int j = 0; j < kMloraCols; ++j) acc[j] = acc_t(0);
  for (int64_t k = 0; k < rank; ++k) {
    const acc_t hk = hi[k];
#pragma unroll
    for (int j = 0; j < kMloraCols; ++j) {
      const int64_t c = c0 + kMloraSide * j;
      if (c < out) acc[j] = fma(hk, E::load(b_ad[c * ldb1 + k]), acc[j]);
    }
  }
  scalar_t* yr = y + perm[i] * ldy;
#pragma unroll
  for (int j = 0; j < kMloraCols; ++j) {
    const int64_t c = c0 + kMloraSide * j;
    if (c < out) yr[c] = E::store(E::load(yr[c]) + acc[j]);
  }
}

// y [tokens, out] (row stride ldy) += the LoRA term of every segment; h: workspace [tokens, r] (accumulation
// type, contents overwritten, rows past offsets[n] unused). x [tokens, in] (row stride ldx), a [n, r, in]
// (strides lda0, lda1, 1), b [n, out, r] (strides ldb0, ldb1, 1); perm, offsets, ranks (or null), scaling on the
// device. Launches on `stream`, does not sync.
template <typename scalar_t>
cudaError_t launch_multi_lora_add(const scalar_t* x, int64_t ldx, const scalar_t* a, int64_t lda0, int64_t lda1,
                                  const scalar_t* b, int64_t ldb0, int64_t ldb1, const int64_t* perm,
                                  const int64_t* offsets, const int64_t* ranks, const double* scaling,
                                  mlora_acc_t<scalar_t>* h, scalar_t* y, int64_t ldy, int64_t tokens, int64_t in,
                                  int64_t out, int64_t n, int64_t r, cudaStream_t stream) {
  if (tokens <= 0 || n <= 0 || r <= 0 || out <= 0) return cudaSuccess;
  const int64_t row_blocks = mlora_ceil_div(tokens, kMloraSide);
  if (row_blocks > 0x7fffffffLL || n > 65535 || mlora_ceil_div(r, kMloraSide) > 65535 ||
      mlora_ceil_div(out, kMloraSide * kMloraCols) > 65535)
    return cudaErrorInvalidValue;
  const dim3 grid_s(static_cast<unsigned>(row_blocks), static_cast<unsigned>(n),
                    static_cast<unsigned>(mlora_ceil_div(r, kMloraSide)));
  mlora_shrink_kernel<scalar_t><<<grid_s, kMloraThreads, 0, stream>>>(x, ldx, a, lda0, lda1, perm, offsets, ranks,
                                                                      scaling, h, in, r);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid_e(static_cast<unsigned>(row_blocks), static_cast<unsigned>(n),
                    static_cast<unsigned>(mlora_ceil_div(out, kMloraSide * kMloraCols)));
  mlora_expand_kernel<scalar_t><<<grid_e, kMloraThreads, 0, stream>>>(h, b, ldb0, ldb1, perm, offsets, ranks, y,
                                                                      ldy, out, r);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace lowrank

// Explicit instantiation of the launcher (and through it both kernels) for one element type; tests/build expands
// it for float, double, __half and __nv_bfloat16.
#define LOWRANK_MULTI_LORA_INSTANTIATE(scalar_t)                                                                 \
  template cudaError_t lowrank::kernels::launch_multi_lora_add<scalar_t>(                                      \
      const scalar_t*, int64_t, const scalar_t*, int64_t, int64_t, const scalar_t*, int64_t, int64_t,          \
      const int64_t*, const int64_t*, const int64_t*, const double*, lowrank::kernels::mlora_acc_t<scalar_t>*, \
      scalar_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, cudaStream_t);
