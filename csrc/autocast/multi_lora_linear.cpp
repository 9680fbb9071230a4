// torch.autocast rules of lowrank::multi_lora_linear and its Triton twin (see common/autocast.h): x, weight, bias and
// the stacked factors run in the region's dtype; the per-adapter scaling tensor keeps its precision.
#include <torch/library.h>

#include "common/autocast.h"

namespace lowrank {
namespace {

using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const std::optional<at::Tensor>&);
// x, weight, bias, lora_a, lora_b; not scaling, perm, offsets, ranks.
constexpr uint64_t kCast = autocast::positions({0, 1, 2, 3, 4});
constexpr char kOp[] = "lowrank::multi_lora_linear";
constexpr char kTriton[] = "lowrank::multi_lora_linear_triton";

template <c10::DeviceType Dev, const char* Name>
using Rule = autocast::Rule<Dev, Name, kCast, Sig>;

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, AutocastCPU, m) {
  m.impl("multi_lora_linear", &Rule<c10::DeviceType::CPU, kOp>::call);
  m.impl("multi_lora_linear_triton", &Rule<c10::DeviceType::CPU, kTriton>::call);
}

TORCH_LIBRARY_IMPL(lowrank, AutocastCUDA, m) {
  m.impl("multi_lora_linear", &Rule<c10::DeviceType::CUDA, kOp>::call);
  m.impl("multi_lora_linear_triton", &Rule<c10::DeviceType::CUDA, kTriton>::call);
}

}  // namespace lowrank
