// Identifier-logit gather, CUDA kernel (torch-free: only CUDA headers, so nvcc can compile-check this file alone).
//
//   logits[t, j] = hidden[t] · weight[ids[j]] + bias[ids[j]]     hidden [T, d], weight [V, d], ids [k], bias [V]
//
// One warp per (token, identifier) pair: the 32 lanes stride over d (coalesced reads of both rows), accumulate in
// fp32 (fp64 for double) and reduce with shuffles; lane 0 adds the bias and writes the rounded result. k is ~20
// and T is 1 in listwise reranking, so the grid is tiny and the cost is reading k rows of the head: k·d elements
// instead of the V·d a full vocabulary projection reads. ids are validated (in range) by the caller.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_elem.cuh"

namespace lowrank {
namespace kernels {

constexpr int kGatherWarps = 4;  // warps (pairs) per block

template <typename scalar_t>
__global__ void __launch_bounds__(32 * kGatherWarps)
    gather_logits_kernel(const scalar_t* __restrict__ hidden, int64_t ldh, const scalar_t* __restrict__ weight,
                         int64_t ldw, const int64_t* __restrict__ ids, const scalar_t* __restrict__ bias,
                         scalar_t* __restrict__ out, int64_t T, int64_t k, int64_t d) {
  using E = Elem<scalar_t>;
  using acc_t = elem_acc_t<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kGatherWarps + threadIdx.x / 32;
  if (pair >= T * k) return;  // whole warps exit together: no shuffle below runs with missing lanes
  const int64_t t = pair / k, j = pair % k;
  const int64_t row = ids[j];
  const scalar_t* h = hidden + t * ldh;
  const scalar_t* w = weight + row * ldw;
  acc_t acc = 0;
  for (int64_t c = lane; c < d; c += 32) acc += E::load(h[c]) * E::load(w[c]);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    if (bias != nullptr) acc += E::load(bias[row]);
    out[t * k + j] = E::store(acc);
  }
}

template <typename scalar_t>
cudaError_t launch_gather_logits(const scalar_t* hidden, int64_t ldh, const scalar_t* weight, int64_t ldw,
                                 const int64_t* ids, const scalar_t* bias, scalar_t* out, int64_t T, int64_t k,
                                 int64_t d, cudaStream_t stream) {
  const int64_t pairs = T * k;
  if (pairs == 0) return cudaSuccess;
  const int64_t blocks = (pairs + kGatherWarps - 1) / kGatherWarps;
  gather_logits_kernel<scalar_t><<<static_cast<unsigned>(blocks), 32 * kGatherWarps, 0, stream>>>(
      hidden, ldh, weight, ldw, ids, bias, out, T, k, d);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace lowrank

// tests/build/test_nvcc.py expands this for float, double, __half and __nv_bfloat16.
#define LOWRANK_GATHER_LOGITS_INSTANTIATE(scalar_t)                                                              \
  template cudaError_t lowrank::kernels::launch_gather_logits<scalar_t>(                                         \
      const scalar_t*, int64_t, const scalar_t*, int64_t, const int64_t*, const scalar_t*, scalar_t*, int64_t, \
      int64_t, int64_t, cudaStream_t);
