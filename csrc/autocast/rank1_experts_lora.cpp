// torch.autocast rules of lowrank::rank1_experts_lora and its Triton twin (see common/autocast.h): x, weight, bias,
// the factors and the router run in the region's dtype; router_bias (selection only, any floating dtype) is
// passed as it is, and the gates come out in fp32 as without autocast.
#include <torch/library.h>

#include "common/autocast.h"

namespace lowrank {
namespace {

using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, double, c10::string_view, double,
    std::optional<double>);
// x, weight, bias, lora_a, lora_b, router; not router_bias (kept in its precision) or the scalars.
constexpr uint64_t kCast = autocast::positions({0, 1, 2, 3, 4, 5});
constexpr char kOp[] = "lowrank::rank1_experts_lora";
constexpr char kTriton[] = "lowrank::rank1_experts_lora_triton";

template <c10::DeviceType Dev, const char* Name>
using Rule = autocast::Rule<Dev, Name, kCast, Sig>;

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, AutocastCPU, m) {
  m.impl("rank1_experts_lora", &Rule<c10::DeviceType::CPU, kOp>::call);
  m.impl("rank1_experts_lora_triton", &Rule<c10::DeviceType::CPU, kTriton>::call);
}

TORCH_LIBRARY_IMPL(lowrank, AutocastCUDA, m) {
  m.impl("rank1_experts_lora", &Rule<c10::DeviceType::CUDA, kOp>::call);
  m.impl("rank1_experts_lora_triton", &Rule<c10::DeviceType::CUDA, kTriton>::call);
}

}  // namespace lowrank
