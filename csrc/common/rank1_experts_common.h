// Mixture of rank-1 experts LoRA (lowrank/reference/rank1_experts_lora.py is the specification): argument
// checks shared by the CPU and CUDA kernels (ATen); the per-token gate math is torch-free in rank1_experts_math.h.
//   y_t = x_t·Wᵀ + b + s·Σ_{e ∈ topk(t)} g_te·h_te·b_e,  h = x·Aᵀ [T, E], act = [h | z] (z = x·routerᵀ, router gate)
#pragma once
#include <ATen/ATen.h>

#include <array>
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

// The backward's products once the gate backward has formed D [T, E or 2E] (the gradient of the rank, and router,
// activations) and U [T, E] (the gated rank activations), the same on every device:
//   dx = D·[A; R] + g·W,  d[A; R] = Dᵀ·x,  dW = gᵀ·x,  dB = gᵀ·U       ([A; R]: ar, R only with the router gate)
// Returns (dx, dW, dA, dB, dR) under mask; dx in x's shape (x_sizes), all in dt.
inline std::array<std::optional<at::Tensor>, 5> rank1_backward_products(
    const at::Tensor& D, const at::Tensor& U, const at::Tensor& g2, const at::Tensor& x2, const at::Tensor& weight,
    const at::Tensor& ar, int64_t E, bool use_router, std::array<bool, 5> mask, at::IntArrayRef x_sizes,
    at::ScalarType dt) {
  std::array<std::optional<at::Tensor>, 5> out;
  if (mask[0] || mask[2] || (mask[4] && use_router)) {
    const at::Tensor Dd = D.to(dt);
    if (mask[0]) {
      // D·[A; R] first, then the base GEMM accumulates into it (beta = 1) inside its micro-kernel.
      at::Tensor d = at::mm(Dd, ar);
      d.addmm_(g2, weight);
      out[0] = d.view(x_sizes);
    }
    if (mask[2] || (mask[4] && use_router)) {
      const at::Tensor dar = at::mm(Dd.t(), x2);  // [E or 2E, in]
      // Clones: the two blocks must not share storage or carry an offset (outputs of one op are separate).
      if (mask[2]) out[2] = dar.narrow(0, 0, E).clone();
      if (mask[4] && use_router) out[4] = dar.narrow(0, E, E).clone();
    }
  }
  if (mask[1]) out[1] = at::mm(g2.t(), x2);
  if (mask[3]) out[3] = at::mm(g2.t(), U.to(dt));
  return out;
}

}  // namespace lowrank
