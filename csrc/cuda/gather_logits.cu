// Identifier-logit gather, CUDA: ATen glue around csrc/cuda/gather_logits_kernel.cuh.
//   logits[t, j] = hidden[t] · weight[ids[j]] + bias[ids[j]]      hidden [T, d], weight [V, d], ids [k], bias [V]
// The range check of ids runs on the device (one aminmax); the Python wrapper checks it first with a friendlier
// message.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/scoring_checks.h"
#include "cuda/gather_logits_kernel.cuh"

namespace lowrank {
namespace {

template <typename cuda_t>
void run(const at::Tensor& h, const at::Tensor& w, const at::Tensor& ids, const at::Tensor& bias, at::Tensor& out,
         cudaStream_t stream) {
  C10_CUDA_CHECK(kernels::launch_gather_logits<cuda_t>(
      reinterpret_cast<const cuda_t*>(h.const_data_ptr()), h.stride(0),
      reinterpret_cast<const cuda_t*>(w.const_data_ptr()), w.stride(0), ids.const_data_ptr<int64_t>(),
      bias.defined() ? reinterpret_cast<const cuda_t*>(bias.const_data_ptr()) : nullptr,
      reinterpret_cast<cuda_t*>(out.mutable_data_ptr()), h.size(0), ids.size(0), h.size(1), stream));
}

at::Tensor gather_logits_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& ids,
                              const std::optional<at::Tensor>& bias) {
  check_gather_logits_args(hidden, weight, ids, bias);
  const bool has_bias = bias.has_value() && bias->defined();
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor ids64 = ids.to(at::kLong).contiguous();
  if (ids64.numel() > 0) {
    const auto [lo, hi] = at::aminmax(ids64);
    TORCH_CHECK_INDEX(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < weight.size(0),
                      "gather_logits: ids must lie in [0, V=", weight.size(0), ")");
  }
  at::Tensor out = at::empty({hidden.size(0), ids.size(0)}, hidden.options());
  if (out.numel() == 0) return out;
  if (hidden.size(1) == 0) return has_bias ? bias->index_select(0, ids64).expand(out.sizes()).contiguous() : out.zero_();
  const at::Tensor h = hidden.stride(1) == 1 ? hidden : hidden.contiguous();
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.get_device()).stream();
  switch (hidden.scalar_type()) {
    case at::kFloat: run<float>(h, w, ids64, b, out, stream); break;
    case at::kDouble: run<double>(h, w, ids64, b, out, stream); break;
    case at::kHalf: run<__half>(h, w, ids64, b, out, stream); break;
    case at::kBFloat16: run<__nv_bfloat16>(h, w, ids64, b, out, stream); break;
    default: TORCH_CHECK_TYPE(false, "gather_logits (CUDA): unsupported dtype ", hidden.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) { m.impl("gather_logits", &gather_logits_cuda); }

}  // namespace lowrank
