// Sparse-plus-low-rank linear, CUDA kernels for the sparse products (torch-free: only CUDA headers, so nvcc can
// compile-check this file alone). The rank-r GEMMs are cuBLAS calls in the ATen glue (sparse_lowrank_linear.cu).
//
//   spmm_add:  y[t, i] += Σ_{k in row i} val[perm[k] or k] · src[t, idx[k]]
//              forward x·Sᵀ: CSR (ptr = row_ptr, idx = col_idx, no perm), src = x, y [T, out]
//              backward dx += g·S: CSC (ptr = col_ptr, idx = row_idx, perm), src = g, y = dx [T, in]
//   sddmm:     dv[k] = Σ_t g[t, i] · x[t, col_idx[k]]   for the CSR entries k of row i (only the nnz support)
//
// spmm_add: one warp per (token, row); the lanes stride over the row's nonzeros (their columns are sorted, so the
// gathered src[t, idx] reads of a warp fall in few cache lines of one src row), accumulate in fp32 (fp64 for
// double) and reduce with shuffles; lane 0 adds the sum to y and rounds once. No two warps write the same
// element, so no atomics. sddmm: one block per output row, each warp one nonzero at a time, the lanes stride
// over tokens (g[t, i] and x[t, c] columns). Index tensors are int32 and validated by the caller.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_elem.cuh"

namespace lowrank {
namespace kernels {

constexpr int kSpmmWarps = 4;   // warps (token, row pairs) per block
constexpr int kSddmmWarps = 4;  // warps per row block

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(32 * kSpmmWarps)
    sparse_spmm_add_kernel(const scalar_t* __restrict__ src, int64_t lds, const int32_t* __restrict__ ptr,
                           const int32_t* __restrict__ idx, const int32_t* __restrict__ perm,
                           const scalar_t* __restrict__ val, scalar_t* __restrict__ y, int64_t ldy, int64_t T,
                           int64_t rows) {
  using E = Elem<scalar_t>;
  using acc_t = elem_acc_t<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kSpmmWarps + threadIdx.x / 32;
  if (pair >= T * rows) return;  // whole warps exit together
  const int64_t t = pair / rows, i = pair % rows;
  const scalar_t* s = src + t * lds;
  acc_t acc = 0;
  for (int32_t k = ptr[i] + lane; k < ptr[i + 1]; k += 32) {
    const int32_t vk = perm != nullptr ? perm[k] : k;
    acc += E::load(val[vk]) * E::load(s[idx[k]]);
  }
  acc = warp_sum(acc);
  if (lane == 0) y[t * ldy + i] = E::store(E::load(y[t * ldy + i]) + acc);
}

template <typename scalar_t>
__global__ void __launch_bounds__(32 * kSddmmWarps)
    sparse_sddmm_kernel(const scalar_t* __restrict__ g, int64_t ldg, const scalar_t* __restrict__ x, int64_t ldx,
                        const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ col_idx,
                        scalar_t* __restrict__ dv, int64_t T) {
  using E = Elem<scalar_t>;
  using acc_t = elem_acc_t<scalar_t>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t i = blockIdx.x;
  for (int32_t k = row_ptr[i] + warp; k < row_ptr[i + 1]; k += kSddmmWarps) {
    const int64_t c = col_idx[k];
    acc_t acc = 0;
    for (int64_t t = lane; t < T; t += 32) acc += E::load(g[t * ldg + i]) * E::load(x[t * ldx + c]);
    acc = warp_sum(acc);
    if (lane == 0) dv[k] = E::store(acc);
  }
}

template <typename scalar_t>
cudaError_t launch_sparse_spmm_add(const scalar_t* src, int64_t lds, const int32_t* ptr, const int32_t* idx,
                                   const int32_t* perm, const scalar_t* val, scalar_t* y, int64_t ldy, int64_t T,
                                   int64_t rows, cudaStream_t stream) {
  const int64_t pairs = T * rows;
  if (pairs == 0) return cudaSuccess;
  const int64_t blocks = (pairs + kSpmmWarps - 1) / kSpmmWarps;
  sparse_spmm_add_kernel<scalar_t><<<static_cast<unsigned>(blocks), 32 * kSpmmWarps, 0, stream>>>(
      src, lds, ptr, idx, perm, val, y, ldy, T, rows);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_sparse_sddmm(const scalar_t* g, int64_t ldg, const scalar_t* x, int64_t ldx,
                                const int32_t* row_ptr, const int32_t* col_idx, scalar_t* dv, int64_t T,
                                int64_t rows, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  sparse_sddmm_kernel<scalar_t><<<static_cast<unsigned>(rows), 32 * kSddmmWarps, 0, stream>>>(
      g, ldg, x, ldx, row_ptr, col_idx, dv, T);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace lowrank

// tests/build/test_nvcc.py expands this for float, double, __half and __nv_bfloat16.
#define LOWRANK_SPARSE_LOWRANK_INSTANTIATE(scalar_t)                                                               \
  template cudaError_t lowrank::kernels::launch_sparse_spmm_add<scalar_t>(                                         \
      const scalar_t*, int64_t, const int32_t*, const int32_t*, const int32_t*, const scalar_t*, scalar_t*, int64_t, \
      int64_t, int64_t, cudaStream_t);                                                                            \
  template cudaError_t lowrank::kernels::launch_sparse_sddmm<scalar_t>(                                            \
      const scalar_t*, int64_t, const scalar_t*, int64_t, const int32_t*, const int32_t*, scalar_t*, int64_t,     \
      int64_t, cudaStream_t);
