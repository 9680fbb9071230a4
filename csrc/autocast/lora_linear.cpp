// torch.autocast rules of lowrank::lora_linear and lowrank::lora_linear_triton (see common/autocast.h): under
// autocast the layer computes in the region's dtype, like the F.linear it replaces; without a rule, autocast would
// hand the op bf16/fp16 activations with fp32 weights, a dtype mix the op refuses.
#include <torch/library.h>

#include "common/autocast.h"

namespace lowrank {
namespace {

using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                       const at::Tensor&, double);
// x, weight, bias, lora_a, lora_b; not the scaling.
constexpr uint64_t kCast = autocast::positions({0, 1, 2, 3, 4});
constexpr char kOp[] = "lowrank::lora_linear";
constexpr char kTriton[] = "lowrank::lora_linear_triton";

template <c10::DeviceType Dev, const char* Name>
using Rule = autocast::Rule<Dev, Name, kCast, Sig>;

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, AutocastCPU, m) {
  m.impl("lora_linear", &Rule<c10::DeviceType::CPU, kOp>::call);
  m.impl("lora_linear_triton", &Rule<c10::DeviceType::CPU, kTriton>::call);
}

TORCH_LIBRARY_IMPL(lowrank, AutocastCUDA, m) {
  m.impl("lora_linear", &Rule<c10::DeviceType::CUDA, kOp>::call);
  m.impl("lora_linear_triton", &Rule<c10::DeviceType::CUDA, kTriton>::call);
}

}  // namespace lowrank
