// Query-row attention mass, CUDA: ATen glue around csrc/cuda/query_attention_mass_kernel.cuh.
//   mass[b, h, j] = Σ_i softmax_j(scale·q[b,h,i]·k[b,h/g,j]) over j <= offset + i; q [B,Hq,nq,d], k [B,Hkv,n,d]
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "common/scoring_checks.h"
#include "cuda/query_attention_mass_kernel.cuh"

namespace lowrank {
namespace {

template <typename cuda_t>
void run(const at::Tensor& q, const at::Tensor& k, at::Tensor& out, int64_t offset, double scale,
         cudaStream_t stream) {
  using acc_t = kernels::elem_acc_t<cuda_t>;
  C10_CUDA_CHECK(kernels::launch_query_attention_mass<cuda_t>(
      reinterpret_cast<const cuda_t*>(q.const_data_ptr()), q.stride(0), q.stride(1), q.stride(2),
      reinterpret_cast<const cuda_t*>(k.const_data_ptr()), k.stride(0), k.stride(1), k.stride(2),
      out.mutable_data_ptr<acc_t>(), q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), offset, scale,
      stream));
}

at::Tensor query_attention_mass_cuda(const at::Tensor& q, const at::Tensor& k, double scale, int64_t offset) {
  check_query_attention_mass_args(q, k, scale, offset);
  const int64_t B = q.size(0), Hq = q.size(1), nq = q.size(2), d = q.size(3), n = k.size(2);
  TORCH_CHECK_VALUE(d <= kernels::kQamMaxHeadDim, "query_attention_mass (CUDA): head dim ", d, " exceeds ",
                    kernels::kQamMaxHeadDim);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({B, Hq, n}, q.options().dtype(acc));
  if (out.numel() == 0 || nq == 0) return out;
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  switch (q.scalar_type()) {
    case at::kFloat: run<float>(qc, kc, out, offset, scale, stream); break;
    case at::kDouble: run<double>(qc, kc, out, offset, scale, stream); break;
    case at::kHalf: run<__half>(qc, kc, out, offset, scale, stream); break;
    case at::kBFloat16: run<__nv_bfloat16>(qc, kc, out, offset, scale, stream); break;
    default: TORCH_CHECK_TYPE(false, "query_attention_mass (CUDA): unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) { m.impl("query_attention_mass", &query_attention_mass_cuda); }

}  // namespace lowrank
