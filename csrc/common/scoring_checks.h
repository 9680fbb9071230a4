// Argument checks of the two scoring ops (gather_logits, query_attention_mass), shared by their CPU and CUDA
// kernels so that direct torch.ops.lowrank callers get the same messages on every device. The Python wrappers
// (lowrank/ops/) raise ValueError/TypeError with the same content first.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include "common/checks.h"

namespace lowrank {

// hidden [T, d], weight [V, d], ids [k] int32/int64, bias [V] (optional); one dtype, one device. The range of ids
// is checked by each kernel where the values live.
inline void check_gather_logits_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& ids,
                                     const std::optional<at::Tensor>& bias) {
  LOWRANK_CHECK_DIM(hidden, 2, "gather_logits: hidden");
  LOWRANK_CHECK_DIM(weight, 2, "gather_logits: weight");
  LOWRANK_CHECK_DIM(ids, 1, "gather_logits: ids");
  LOWRANK_CHECK_FLOATING(hidden, "gather_logits: hidden");
  LOWRANK_CHECK_SAME_DTYPE(weight, hidden, "gather_logits: weight", "hidden");
  LOWRANK_CHECK_SAME_DEVICE(weight, hidden, "gather_logits: weight", "hidden");
  LOWRANK_CHECK_SAME_DEVICE(ids, hidden, "gather_logits: ids", "hidden");
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
                   "gather_logits: ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(hidden.size(1) == weight.size(1), "gather_logits: hidden [T, d=", hidden.size(1),
                    "] does not match weight [V, d=", weight.size(1), "]");
  if (bias.has_value() && bias->defined()) {
    LOWRANK_CHECK_DIM(*bias, 1, "gather_logits: bias");
    LOWRANK_CHECK_SAME_DTYPE(*bias, hidden, "gather_logits: bias", "hidden");
    LOWRANK_CHECK_SAME_DEVICE(*bias, hidden, "gather_logits: bias", "hidden");
    TORCH_CHECK_VALUE(bias->size(0) == weight.size(0), "gather_logits: bias must be [V=", weight.size(0),
                      "], got ", bias->sizes());
  }
}

// q [B, Hq, nq, d], k [B, Hkv, n, d] with Hq % Hkv == 0; query rows at positions [offset, offset + nq) ⊆ [0, n).
inline void check_query_attention_mass_args(const at::Tensor& q, const at::Tensor& k, double scale,
                                            int64_t offset) {
  LOWRANK_CHECK_DIM(q, 4, "query_attention_mass: q");
  LOWRANK_CHECK_DIM(k, 4, "query_attention_mass: k");
  LOWRANK_CHECK_FLOATING(q, "query_attention_mass: q");
  LOWRANK_CHECK_SAME_DTYPE(k, q, "query_attention_mass: k", "q");
  LOWRANK_CHECK_SAME_DEVICE(k, q, "query_attention_mass: k", "q");
  const int64_t B = q.size(0), Hq = q.size(1), nq = q.size(2), d = q.size(3), Hkv = k.size(1), n = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == d, "query_attention_mass: k must be [B=", B, ", Hkv, n, d=", d,
                    "], got ", k.sizes());
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "query_attention_mass: q's ", Hq,
                    " heads must be a multiple of k's ", Hkv, " heads");
  TORCH_CHECK_VALUE(offset >= 0 && offset + nq <= n, "query_attention_mass: query rows at positions [", offset, ", ",
                    offset + nq, ") must lie within the ", n, " keys");
  TORCH_CHECK_VALUE(std::isfinite(scale), "query_attention_mass: scale must be finite, got ", scale);
}

}  // namespace lowrank
