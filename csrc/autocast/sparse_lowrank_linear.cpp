// torch.autocast rules of lowrank::sparse_lowrank_linear and its Triton twin (see common/autocast.h): x, the
// factors, the sparse values and the bias run in the region's dtype; the integer support (and the optional
// CSC transpose) is passed as it is.
#include <torch/library.h>

#include "common/autocast.h"

namespace lowrank {
namespace {

using OptTensor = std::optional<at::Tensor>;
using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&);

template <c10::DeviceType Dev, bool Triton>
at::Tensor sparse_lowrank_linear_autocast(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                          const at::Tensor& s_values, const at::Tensor& row_ptr,
                                          const at::Tensor& col_idx, const OptTensor& col_ptr,
                                          const OptTensor& row_idx, const OptTensor& perm, const OptTensor& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(Triton ? "lowrank::sparse_lowrank_linear_triton" : "lowrank::sparse_lowrank_linear", "")
          .typed<Sig>();
  const autocast::Region<Dev> c;
  return op.call(c(x), c(lora_a), c(lora_b), c(s_values), row_ptr, col_idx, col_ptr, row_idx, perm, c(bias));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, AutocastCPU, m) {
  m.impl("sparse_lowrank_linear", &sparse_lowrank_linear_autocast<c10::DeviceType::CPU, false>);
  m.impl("sparse_lowrank_linear_triton", &sparse_lowrank_linear_autocast<c10::DeviceType::CPU, true>);
}

TORCH_LIBRARY_IMPL(lowrank, AutocastCUDA, m) {
  m.impl("sparse_lowrank_linear", &sparse_lowrank_linear_autocast<c10::DeviceType::CUDA, false>);
  m.impl("sparse_lowrank_linear_triton", &sparse_lowrank_linear_autocast<c10::DeviceType::CUDA, true>);
}

}  // namespace lowrank
