// Argument checks shared by every kernel. Python wrappers raise ValueError/TypeError first with friendlier
// text; these keep direct torch.ops.lowrank callers from reaching a kernel with bad input.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

#define LOWRANK_CHECK_DIM(t, d, name) \
  TORCH_CHECK_VALUE((t).dim() == (d), name " must be ", d, "-D, got shape ", (t).sizes())

#define LOWRANK_CHECK_SAME_DTYPE(t, ref, name, refname)                                            \
  TORCH_CHECK_TYPE((t).scalar_type() == (ref).scalar_type(), name " has dtype ", (t).scalar_type(), \
                   " but " refname " has dtype ", (ref).scalar_type())

#define LOWRANK_CHECK_SAME_DEVICE(t, ref, name, refname)                                                \
  TORCH_CHECK_VALUE((t).device() == (ref).device(), name " is on ", (t).device(), " but " refname " is on ", \
                    (ref).device())

#define LOWRANK_CHECK_FLOATING(t, name)                                                      \
  TORCH_CHECK_TYPE(at::isFloatingType((t).scalar_type()), name " must be a floating tensor, got ", \
                   (t).scalar_type())

namespace lowrank {

// An optional bias of a linear layer with `out` outputs: [out], x's dtype and device.
inline void check_linear_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t out) {
  if (!bias.has_value() || !bias->defined()) return;
  LOWRANK_CHECK_SAME_DTYPE(*bias, x, "bias", "x");
  LOWRANK_CHECK_SAME_DEVICE(*bias, x, "bias", "x");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, "bias must be [", out, "], got ", bias->sizes());
}

// The output gradient of a linear layer x [..., in] -> [..., out]: x's dtype, device and token count.
inline void check_linear_grad_out(const at::Tensor& grad_out, const at::Tensor& x, int64_t in, int64_t out) {
  LOWRANK_CHECK_SAME_DTYPE(grad_out, x, "grad_out", "x");
  LOWRANK_CHECK_SAME_DEVICE(grad_out, x, "grad_out", "x");
  TORCH_CHECK_VALUE(grad_out.dim() >= 1 && grad_out.size(-1) == out &&
                        grad_out.numel() / std::max<int64_t>(out, 1) == x.numel() / std::max<int64_t>(in, 1),
                    "grad_out has shape ", grad_out.sizes(), " for x of shape ", x.sizes(), " and out = ", out);
}

}  // namespace lowrank
