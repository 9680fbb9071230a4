// torch.autocast rules of lowrank::rank1_experts_lora and its Triton twin (see common/autocast.h): x, weight, bias,
// the factors and the router run in the region's dtype; router_bias (selection only, any floating dtype) is
// passed as it is, and the gates come out in fp32 as without autocast.
#include <torch/library.h>

#include "common/autocast.h"

namespace lowrank {
namespace {

using Ret = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Sig = Ret(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, double,
                c10::string_view, double, std::optional<double>);

template <c10::DeviceType Dev, bool Triton>
Ret rank1_experts_lora_autocast(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_a, const at::Tensor& lora_b,
                                const std::optional<at::Tensor>& router, const std::optional<at::Tensor>& router_bias,
                                int64_t top_k, double scaling, c10::string_view gate, double temperature,
                                std::optional<double> threshold) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(Triton ? "lowrank::rank1_experts_lora_triton" : "lowrank::rank1_experts_lora", "")
          .typed<Sig>();
  const autocast::Region<Dev> c;
  return op.call(c(x), c(weight), c(bias), c(lora_a), c(lora_b), c(router), router_bias, top_k, scaling, gate,
                 temperature, threshold);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, AutocastCPU, m) {
  m.impl("rank1_experts_lora", &rank1_experts_lora_autocast<c10::DeviceType::CPU, false>);
  m.impl("rank1_experts_lora_triton", &rank1_experts_lora_autocast<c10::DeviceType::CPU, true>);
}

TORCH_LIBRARY_IMPL(lowrank, AutocastCUDA, m) {
  m.impl("rank1_experts_lora", &rank1_experts_lora_autocast<c10::DeviceType::CUDA, false>);
  m.impl("rank1_experts_lora_triton", &rank1_experts_lora_autocast<c10::DeviceType::CUDA, true>);
}

}  // namespace lowrank
