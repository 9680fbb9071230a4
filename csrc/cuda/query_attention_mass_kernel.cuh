// Query-row attention mass, CUDA kernel (torch-free: only CUDA headers, so nvcc can compile-check it alone).
//
//   mass[b, h, j] = Σ_i softmax_j(scale · q[b,h,i] · k[b, h/g, j])   over j <= offset + i   (causal)
//   q [B, Hq, nq, d], k [B, Hkv, n, d], out [B, Hq, n] in the accumulation type (float; double for double)
//
// One block per (batch, head) owns that head's output row, so the column sums need no atomics: key j is always
// handled by thread j % blockDim, which keeps its running sum in global memory (read-modify-write by one thread).
// Per query row: the row (pre-scaled, in the accumulation type) is staged in shared memory; pass 1 takes the
// row max over the visible keys, pass 2 the normaliser, pass 3 adds exp(s - max)/Σ into the owned columns. The
// scores are recomputed in each pass (3·nq·n·d flops) instead of being stored (nq·n floats, more than shared
// memory holds at n = 8k); d = 64 dot products from L2-resident key rows are cheap next to the model forward this
// reads out of. Reductions use warp shuffles then one shared slot per warp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_elem.cuh"

namespace lowrank {
namespace kernels {

constexpr int kQamThreads = 256;
constexpr int kQamMaxHeadDim = 256;

template <typename acc_t, bool kMax>
__device__ __forceinline__ acc_t qam_block_reduce(acc_t v, acc_t* slots) {
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t o = __shfl_xor_sync(0xffffffffu, v, off);
    v = kMax ? (o > v ? o : v) : v + o;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // the slots may still be read by the previous reduction
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  acc_t r = slots[0];
  for (int w = 1; w < kQamThreads / 32; ++w) r = kMax ? (slots[w] > r ? slots[w] : r) : r + slots[w];
  return r;
}

// s = qrow · k_row (qrow already scaled, in shared memory).
template <typename scalar_t>
__device__ __forceinline__ elem_acc_t<scalar_t> qam_dot(const elem_acc_t<scalar_t>* qrow,
                                                        const scalar_t* __restrict__ krow, int d) {
  elem_acc_t<scalar_t> s = 0;
  for (int c = 0; c < d; ++c) s += qrow[c] * Elem<scalar_t>::load(krow[c]);
  return s;
}

// minBlocks = 1: with the default bound ptxas spilled a few bytes at 48 registers on sm_80 (seen with CUDA 13);
// 256 threads × 64 registers still fit several blocks per SM.
template <typename scalar_t>
__global__ void __launch_bounds__(kQamThreads, 1)
    query_attention_mass_kernel(const scalar_t* __restrict__ q, int64_t qs0, int64_t qs1, int64_t qs2,
                                const scalar_t* __restrict__ k, int64_t ks0, int64_t ks1, int64_t ks2,
                                elem_acc_t<scalar_t>* __restrict__ out, int64_t Hq, int64_t group, int64_t nq,
                                int64_t n, int64_t d, int64_t offset, elem_acc_t<scalar_t> scale) {
  using E = Elem<scalar_t>;
  using acc_t = elem_acc_t<scalar_t>;
  __shared__ acc_t qrow[kQamMaxHeadDim];
  __shared__ acc_t slots[kQamThreads / 32];
  const int64_t bh = blockIdx.x, b = bh / Hq, h = bh % Hq;
  const scalar_t* khead = k + b * ks0 + (h / group) * ks1;
  acc_t* mass = out + bh * n;
  for (int64_t i = 0; i < nq; ++i) {
    const scalar_t* qi = q + b * qs0 + h * qs1 + i * qs2;
    __syncthreads();  // previous row's readers of qrow are done
    for (int64_t c = threadIdx.x; c < d; c += kQamThreads) qrow[c] = E::load(qi[c]) * scale;
    __syncthreads();
    const int64_t lim = offset + i + 1;
    acc_t mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < lim; j += kQamThreads) {
      const acc_t s = qam_dot<scalar_t>(qrow, khead + j * ks2, static_cast<int>(d));
      mx = s > mx ? s : mx;
    }
    mx = qam_block_reduce<acc_t, true>(mx, slots);
    acc_t sum = 0;
    for (int64_t j = threadIdx.x; j < lim; j += kQamThreads) {
      const acc_t s = qam_dot<scalar_t>(qrow, khead + j * ks2, static_cast<int>(d));
      sum += exp(s - mx);
    }
    const acc_t inv = acc_t(1) / qam_block_reduce<acc_t, false>(sum, slots);
    for (int64_t j = threadIdx.x; j < lim; j += kQamThreads) {
      const acc_t s = qam_dot<scalar_t>(qrow, khead + j * ks2, static_cast<int>(d));
      mass[j] += exp(s - mx) * inv;
    }
  }
}

// out must be zero-filled [B, Hq, n] (contiguous); q and k need unit stride in d; d <= kQamMaxHeadDim.
template <typename scalar_t>
cudaError_t launch_query_attention_mass(const scalar_t* q, int64_t qs0, int64_t qs1, int64_t qs2, const scalar_t* k,
                                        int64_t ks0, int64_t ks1, int64_t ks2, elem_acc_t<scalar_t>* out,
                                        int64_t B, int64_t Hq, int64_t Hkv, int64_t nq, int64_t n, int64_t d,
                                        int64_t offset, double scale, cudaStream_t stream) {
  if (B * Hq == 0 || nq == 0 || n == 0) return cudaSuccess;
  if (d > kQamMaxHeadDim) return cudaErrorInvalidValue;
  query_attention_mass_kernel<scalar_t><<<static_cast<unsigned>(B * Hq), kQamThreads, 0, stream>>>(
      q, qs0, qs1, qs2, k, ks0, ks1, ks2, out, Hq, Hq / Hkv, nq, n, d, offset,
      static_cast<elem_acc_t<scalar_t>>(scale));
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace lowrank

// tests/build/test_nvcc.py expands this for float, double, __half and __nv_bfloat16.
#define LOWRANK_QUERY_ATTENTION_MASS_INSTANTIATE(scalar_t)                                                        \
  template cudaError_t lowrank::kernels::launch_query_attention_mass<scalar_t>(                                   \
      const scalar_t*, int64_t, int64_t, int64_t, const scalar_t*, int64_t, int64_t, int64_t,                    \
      lowrank::kernels::elem_acc_t<scalar_t>*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, \
      double, cudaStream_t);
