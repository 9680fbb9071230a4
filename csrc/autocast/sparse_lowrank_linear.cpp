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
// x, lora_a, lora_b, s_values, bias; not the integer support (row_ptr, col_idx, col_ptr, row_idx, perm).
constexpr uint64_t kCast = autocast::positions({0, 1, 2, 3, 9});
constexpr char kOp[] = "lowrank::sparse_lowrank_linear";
constexpr char kTriton[] = "lowrank::sparse_lowrank_linear_triton";

template <c10::DeviceType Dev, const char* Name>
using Rule = autocast::Rule<Dev, Name, kCast, Sig>;

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, AutocastCPU, m) {
  m.impl("sparse_lowrank_linear", &Rule<c10::DeviceType::CPU, kOp>::call);
  m.impl("sparse_lowrank_linear_triton", &Rule<c10::DeviceType::CPU, kTriton>::call);
}

TORCH_LIBRARY_IMPL(lowrank, AutocastCUDA, m) {
  m.impl("sparse_lowrank_linear", &Rule<c10::DeviceType::CUDA, kOp>::call);
  m.impl("sparse_lowrank_linear_triton", &Rule<c10::DeviceType::CUDA, kTriton>::call);
}

}  // namespace lowrank
