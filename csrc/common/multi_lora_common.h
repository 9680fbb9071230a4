// Argument checks of the multi-adapter LoRA ops, shared by the CPU and CUDA kernels, so that direct
// torch.ops.lowrank callers get the same errors on either device.
//   x [..., in], weight [out, in], bias [out] or none, lora_a [n, r, in], lora_b [n, out, r],
//   scaling [n] float32/float64, perm [T] int64, offsets [n + 1] int64, ranks [n] int32/int64 or none.
// perm and offsets are the segment metadata of lowrank.ops.AdapterSegments: adapter a's tokens are
// perm[offsets[a] : offsets[a + 1]], the tokens without an adapter are perm[offsets[n] :].
// Only shapes, dtypes and devices are checked here (no device sync); the CPU kernel also checks the values.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common/checks.h"

namespace lowrank {

inline void check_multi_lora_args(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                  const at::Tensor& lora_b, const at::Tensor& scaling, const at::Tensor& perm,
                                  const at::Tensor& offsets, const std::optional<at::Tensor>& ranks) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dimension");
  LOWRANK_CHECK_DIM(weight, 2, "weight");
  LOWRANK_CHECK_DIM(lora_a, 3, "lora_a");
  LOWRANK_CHECK_DIM(lora_b, 3, "lora_b");
  LOWRANK_CHECK_DIM(scaling, 1, "scaling");
  LOWRANK_CHECK_DIM(perm, 1, "perm");
  LOWRANK_CHECK_DIM(offsets, 1, "offsets");
  LOWRANK_CHECK_FLOATING(x, "x");
  LOWRANK_CHECK_SAME_DTYPE(weight, x, "weight", "x");
  LOWRANK_CHECK_SAME_DTYPE(lora_a, x, "lora_a", "x");
  LOWRANK_CHECK_SAME_DTYPE(lora_b, x, "lora_b", "x");
  TORCH_CHECK_TYPE(scaling.scalar_type() == at::kFloat || scaling.scalar_type() == at::kDouble,
                   "scaling must be float32 or float64, got ", scaling.scalar_type());
  TORCH_CHECK_TYPE(perm.scalar_type() == at::kLong, "perm must be int64, got ", perm.scalar_type());
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "offsets must be int64, got ", offsets.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{weight, "weight"}, {lora_a, "lora_a"},
                                {lora_b, "lora_b"}, {scaling, "scaling"}, {perm, "perm"}, {offsets, "offsets"}})
    TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  const auto in = weight.size(1), out = weight.size(0), n = lora_a.size(0), r = lora_a.size(1);
  const auto tokens = x.numel() / std::max<int64_t>(in, 1);
  TORCH_CHECK_VALUE(x.size(-1) == in, "x.shape[-1] = ", x.size(-1), " but weight is ", weight.sizes());
  TORCH_CHECK_VALUE(lora_a.size(2) == in, "lora_a must be [n, r, ", in, "], got ", lora_a.sizes());
  TORCH_CHECK_VALUE(lora_b.size(0) == n && lora_b.size(1) == out && lora_b.size(2) == r, "lora_b must be [", n,
                    ", ", out, ", ", r, "], got ", lora_b.sizes());
  TORCH_CHECK_VALUE(scaling.size(0) == n, "scaling must be [", n, "], got ", scaling.sizes());
  TORCH_CHECK_VALUE(perm.size(0) == tokens, "perm must be [", tokens, "] (one entry per token), got ",
                    perm.sizes());
  TORCH_CHECK_VALUE(offsets.size(0) == n + 1, "offsets must be [", n + 1, "], got ", offsets.sizes());
  if (ranks.has_value() && ranks->defined()) {
    TORCH_CHECK_TYPE(ranks->scalar_type() == at::kLong || ranks->scalar_type() == at::kInt,
                     "ranks must be int32 or int64, got ", ranks->scalar_type());
    TORCH_CHECK_VALUE(ranks->dim() == 1 && ranks->size(0) == n, "ranks must be [", n, "], got ", ranks->sizes());
    LOWRANK_CHECK_SAME_DEVICE(*ranks, x, "ranks", "x");
  }
  check_linear_bias(bias, x, out);
}

inline void check_multi_lora_grad(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight) {
  check_linear_grad_out(grad_out, x, weight.size(1), weight.size(0));
}

}  // namespace lowrank
