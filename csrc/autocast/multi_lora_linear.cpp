// torch.autocast rules of lowrank::multi_lora_linear and its Triton twin (see common/autocast.h): x, weight, bias and
// the stacked factors run in the region's dtype; the per-adapter scaling tensor keeps its precision.
#include <torch/library.h>

#include "common/autocast.h"

namespace lowrank {
namespace {

using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const std::optional<at::Tensor>&);

template <c10::DeviceType Dev, bool Triton>
at::Tensor multi_lora_linear_autocast(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                      const at::Tensor& lora_b, const at::Tensor& scaling, const at::Tensor& perm,
                                      const at::Tensor& offsets, const std::optional<at::Tensor>& ranks) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow(Triton ? "lowrank::multi_lora_linear_triton" : "lowrank::multi_lora_linear", "")
                             .typed<Sig>();
  const autocast::Region<Dev> c;
  return op.call(c(x), c(weight), c(bias), c(lora_a), c(lora_b), scaling, perm, offsets, ranks);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, AutocastCPU, m) {
  m.impl("multi_lora_linear", &multi_lora_linear_autocast<c10::DeviceType::CPU, false>);
  m.impl("multi_lora_linear_triton", &multi_lora_linear_autocast<c10::DeviceType::CPU, true>);
}

TORCH_LIBRARY_IMPL(lowrank, AutocastCUDA, m) {
  m.impl("multi_lora_linear", &multi_lora_linear_autocast<c10::DeviceType::CUDA, false>);
  m.impl("multi_lora_linear_triton", &multi_lora_linear_autocast<c10::DeviceType::CUDA, true>);
}

}  // namespace lowrank
