// Mixture of rank-1 experts LoRA (lowrank/reference/rank1_experts_lora.py is the specification): argument
// checks shared by the CPU and CUDA kernels (ATen); the per-token gate math is torch-free in rank1_experts_math.h.
//   y_t = x_t·Wᵀ + b + s·Σ_{e ∈ topk(t)} g_te·h_te·b_e,  h = x·Aᵀ [T, E], act = [h | z] (z = x·routerᵀ, router gate)
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string_view>

#include "common/checks.h"
#include "common/rank1_experts_math.h"

namespace lowrank {

// Whether gate names the router gate (true) or self gate (false); anything else is an error.
inline bool rank1_is_router(std::string_view gate) {
  TORCH_CHECK_VALUE(gate == "router" || gate == "self", "rank1_experts_lora: gate must be 'router' or 'self', got '",
                    std::string(gate), "'");
  return gate == "router";
}

inline void check_rank1_experts_args(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                     const at::Tensor& lora_b, const std::optional<at::Tensor>& router,
                                     const std::optional<at::Tensor>& router_bias, int64_t top_k, bool use_router,
                                     double temperature) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "rank1_experts_lora: x must have at least 1 dimension");
  LOWRANK_CHECK_DIM(weight, 2, "rank1_experts_lora: weight");
  LOWRANK_CHECK_DIM(lora_a, 2, "rank1_experts_lora: lora_a");
  LOWRANK_CHECK_DIM(lora_b, 2, "rank1_experts_lora: lora_b");
  LOWRANK_CHECK_FLOATING(x, "rank1_experts_lora: x");
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, {&lora_a, "lora_a"}, {&lora_b, "lora_b"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "rank1_experts_lora: ", name, " has dtype ",
                     t->scalar_type(), " but x has dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), "rank1_experts_lora: ", name, " is on ", t->device(),
                      " but x is on ", x.device());
  }
  const int64_t in = weight.size(1), out = weight.size(0), E = lora_a.size(0);
  TORCH_CHECK_VALUE(x.size(-1) == in, "rank1_experts_lora: x.shape[-1] = ", x.size(-1), " but weight is ",
                    weight.sizes());
  TORCH_CHECK_VALUE(E >= 1 && lora_a.size(1) == in, "rank1_experts_lora: lora_a must be [E >= 1, ", in, "], got ",
                    lora_a.sizes());
  TORCH_CHECK_VALUE(lora_b.size(0) == out && lora_b.size(1) == E, "rank1_experts_lora: lora_b must be [", out, ", ",
                    E, "], got ", lora_b.sizes());
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= E, "rank1_experts_lora: top_k must be in [1, E=", E, "], got ", top_k);
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature),
                    "rank1_experts_lora: temperature must be positive and finite, got ", temperature);
  if (bias.has_value() && bias->defined()) {
    LOWRANK_CHECK_SAME_DTYPE(*bias, x, "rank1_experts_lora: bias", "x");
    LOWRANK_CHECK_SAME_DEVICE(*bias, x, "rank1_experts_lora: bias", "x");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, "rank1_experts_lora: bias must be [", out,
                      "], got ", bias->sizes());
  }
  const bool has_router = router.has_value() && router->defined();
  const bool has_rbias = router_bias.has_value() && router_bias->defined();
  if (use_router) {
    TORCH_CHECK_VALUE(has_router, "rank1_experts_lora: gate='router' needs a router [E, in]");
    LOWRANK_CHECK_SAME_DTYPE(*router, x, "rank1_experts_lora: router", "x");
    LOWRANK_CHECK_SAME_DEVICE(*router, x, "rank1_experts_lora: router", "x");
    TORCH_CHECK_VALUE(router->dim() == 2 && router->size(0) == E && router->size(1) == in,
                      "rank1_experts_lora: router must be [", E, ", ", in, "], got ", router->sizes());
    if (has_rbias) {
      LOWRANK_CHECK_FLOATING(*router_bias, "rank1_experts_lora: router_bias");
      LOWRANK_CHECK_SAME_DEVICE(*router_bias, x, "rank1_experts_lora: router_bias", "x");
      TORCH_CHECK_VALUE(router_bias->dim() == 1 && router_bias->size(0) == E, "rank1_experts_lora: router_bias "
                        "must be [", E, "], got ", router_bias->sizes());
    }
  } else {
    TORCH_CHECK_VALUE(!has_router && !has_rbias,
                      "rank1_experts_lora: gate='self' takes no router or router_bias");
  }
}

}  // namespace lowrank
