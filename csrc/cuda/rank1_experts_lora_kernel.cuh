// Mixture of rank-1 experts LoRA, CUDA kernels (torch-free: CUDA headers and csrc/common only, so nvcc can
// compile-check this file alone). Specification: lowrank/reference/rank1_experts_lora.py.
//   gate forward  (one thread per token): top-k selection, gates, u = s·g·h_sel (common/rank1_experts_math.h)
//   expand        (one block per token × 256 columns): y[t, n] += Σ_j u_tj · B[n, e_tj]   (k-of-E, in place)
//   gate backward (one thread per token): D = [dh | dz] and U (u scattered) rows from q = G·B
// The GEMMs around them (x·[A; R]ᵀ, the base, and the backward's products) are cuBLAS calls made by the ATen glue.
// Per-token work is O(E + k log) and tiny next to the GEMMs, which is why a thread per token is enough here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_elem.cuh"
#include "common/rank1_experts_math.h"

namespace lowrank {
namespace kernels {

constexpr int kRank1TokenThreads = 128;
constexpr int kRank1ExpandThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kRank1TokenThreads)
    rank1_gate_fwd_kernel(const elem_acc_t<scalar_t>* __restrict__ act, int64_t ld,
                          const elem_acc_t<scalar_t>* __restrict__ prob, const elem_acc_t<scalar_t>* __restrict__ rb,
                          int64_t T, int64_t E, int64_t k, bool router, double scaling, double temperature,
                          bool has_threshold, double threshold, int64_t* __restrict__ idx,
                          elem_acc_t<scalar_t>* __restrict__ gates, elem_acc_t<scalar_t>* __restrict__ u) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  rank1_forward_token(act + t * ld, router ? prob + t * E : nullptr, rb, E, k, router, scaling, temperature,
                      has_threshold, threshold, idx + t * k, gates + t * k, u + t * k);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRank1ExpandThreads)
    rank1_expand_kernel(const int64_t* __restrict__ idx, const elem_acc_t<scalar_t>* __restrict__ u,
                        const scalar_t* __restrict__ b, int64_t ldb, scalar_t* __restrict__ y, int64_t ldy,
                        int64_t N, int64_t k) {
  using El = Elem<scalar_t>;
  const int64_t t = blockIdx.x;
  const int64_t n = static_cast<int64_t>(blockIdx.y) * kRank1ExpandThreads + threadIdx.x;
  if (n >= N) return;
  elem_acc_t<scalar_t> acc = El::load(y[t * ldy + n]);
  for (int64_t j = 0; j < k; ++j) acc += u[t * k + j] * El::load(b[n * ldb + idx[t * k + j]]);
  y[t * ldy + n] = El::store(acc);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRank1TokenThreads)
    rank1_gate_bwd_kernel(const elem_acc_t<scalar_t>* __restrict__ act, int64_t ld,
                          const elem_acc_t<scalar_t>* __restrict__ prob, int64_t T, int64_t E,
                          const int64_t* __restrict__ idx, int64_t k, const elem_acc_t<scalar_t>* __restrict__ q,
                          const elem_acc_t<scalar_t>* __restrict__ gg, bool router, double scaling,
                          double temperature, bool has_threshold, double threshold,
                          elem_acc_t<scalar_t>* __restrict__ scratch, elem_acc_t<scalar_t>* __restrict__ d,
                          int64_t ldd, elem_acc_t<scalar_t>* __restrict__ uscat) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  elem_acc_t<scalar_t>* dh = d + t * ldd;
  rank1_backward_token(act + t * ld, router ? prob + t * E : nullptr, E, idx + t * k, k, q + t * E,
                       gg ? gg + t * k : nullptr, router, scaling, temperature, has_threshold, threshold,
                       scratch + t * 2 * k, scratch + t * 2 * k + k, dh, router ? dh + E : nullptr, uscat + t * E);
}

template <typename scalar_t>
cudaError_t launch_rank1_gate_fwd(const elem_acc_t<scalar_t>* act, int64_t ld, const elem_acc_t<scalar_t>* prob,
                                  const elem_acc_t<scalar_t>* rb, int64_t T, int64_t E, int64_t k, bool router,
                                  double scaling, double temperature, bool has_threshold, double threshold,
                                  int64_t* idx, elem_acc_t<scalar_t>* gates, elem_acc_t<scalar_t>* u,
                                  cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned>((T + kRank1TokenThreads - 1) / kRank1TokenThreads);
  rank1_gate_fwd_kernel<scalar_t><<<blocks, kRank1TokenThreads, 0, stream>>>(
      act, ld, prob, rb, T, E, k, router, scaling, temperature, has_threshold, threshold, idx, gates, u);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_rank1_expand(const int64_t* idx, const elem_acc_t<scalar_t>* u, const scalar_t* b, int64_t ldb,
                                scalar_t* y, int64_t ldy, int64_t T, int64_t N, int64_t k, cudaStream_t stream) {
  if (T == 0 || N == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>((N + kRank1ExpandThreads - 1) / kRank1ExpandThreads));
  rank1_expand_kernel<scalar_t><<<grid, kRank1ExpandThreads, 0, stream>>>(idx, u, b, ldb, y, ldy, N, k);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_rank1_gate_bwd(const elem_acc_t<scalar_t>* act, int64_t ld, const elem_acc_t<scalar_t>* prob,
                                  int64_t T, int64_t E, const int64_t* idx, int64_t k,
                                  const elem_acc_t<scalar_t>* q, const elem_acc_t<scalar_t>* gg, bool router,
                                  double scaling, double temperature, bool has_threshold, double threshold,
                                  elem_acc_t<scalar_t>* scratch, elem_acc_t<scalar_t>* d, int64_t ldd,
                                  elem_acc_t<scalar_t>* uscat, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned>((T + kRank1TokenThreads - 1) / kRank1TokenThreads);
  rank1_gate_bwd_kernel<scalar_t><<<blocks, kRank1TokenThreads, 0, stream>>>(
      act, ld, prob, T, E, idx, k, q, gg, router, scaling, temperature, has_threshold, threshold, scratch, d, ldd,
      uscat);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace lowrank

// tests/build/test_nvcc.py expands this for float, double, __half and __nv_bfloat16.
#define LOWRANK_RANK1_EXPERTS_INSTANTIATE(scalar_t)                                                                 \
  template cudaError_t lowrank::kernels::launch_rank1_gate_fwd<scalar_t>(                                           \
      const lowrank::kernels::elem_acc_t<scalar_t>*, int64_t, const lowrank::kernels::elem_acc_t<scalar_t>*,        \
      const lowrank::kernels::elem_acc_t<scalar_t>*, int64_t, int64_t, int64_t, bool, double, double, bool, double, \
      int64_t*, lowrank::kernels::elem_acc_t<scalar_t>*, lowrank::kernels::elem_acc_t<scalar_t>*, cudaStream_t);    \
  template cudaError_t lowrank::kernels::launch_rank1_expand<scalar_t>(                                             \
      const int64_t*, const lowrank::kernels::elem_acc_t<scalar_t>*, const scalar_t*, int64_t, scalar_t*, int64_t,  \
      int64_t, int64_t, int64_t, cudaStream_t);                                                                     \
  template cudaError_t lowrank::kernels::launch_rank1_gate_bwd<scalar_t>(                                           \
      const lowrank::kernels::elem_acc_t<scalar_t>*, int64_t, const lowrank::kernels::elem_acc_t<scalar_t>*,        \
      int64_t, int64_t, const int64_t*, int64_t, const lowrank::kernels::elem_acc_t<scalar_t>*,                     \
      const lowrank::kernels::elem_acc_t<scalar_t>*, bool, double, double, bool, double,                            \
      lowrank::kernels::elem_acc_t<scalar_t>*, lowrank::kernels::elem_acc_t<scalar_t>*, int64_t,                    \
      lowrank::kernels::elem_acc_t<scalar_t>*, cudaStream_t);
