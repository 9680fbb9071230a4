// torch.autocast rules of lowrank::lora_linear and lowrank::lora_linear_triton (see common/autocast.h): under
// autocast the layer computes in the region's dtype, like the F.linear it replaces; without a rule, autocast would
// hand the op bf16/fp16 activations with fp32 weights, a dtype mix the op refuses.
#include <torch/library.h>

#include "common/autocast.h"

namespace lowrank {
namespace {

using LoraSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const at::Tensor&, double);

template <c10::DeviceType Dev>
at::Tensor lora_linear_autocast(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lowrank::lora_linear", "").typed<LoraSig>();
  const autocast::Region<Dev> c;
  return op.call(c(x), c(weight), c(bias), c(lora_a), c(lora_b), scaling);
}

template <c10::DeviceType Dev>
at::Tensor lora_linear_triton_autocast(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                       const at::Tensor& lora_b, double scaling) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lowrank::lora_linear_triton", "").typed<LoraSig>();
  const autocast::Region<Dev> c;
  return op.call(c(x), c(weight), c(bias), c(lora_a), c(lora_b), scaling);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, AutocastCPU, m) {
  m.impl("lora_linear", &lora_linear_autocast<c10::DeviceType::CPU>);
  m.impl("lora_linear_triton", &lora_linear_triton_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(lowrank, AutocastCUDA, m) {
  m.impl("lora_linear", &lora_linear_autocast<c10::DeviceType::CUDA>);
  m.impl("lora_linear_triton", &lora_linear_triton_autocast<c10::DeviceType::CUDA>);
}

}  // namespace lowrank
