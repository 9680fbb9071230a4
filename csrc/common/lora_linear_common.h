// Shared by the CPU and CUDA lora_linear kernels: argument checks (so direct torch.ops.lowrank callers get the
// same errors on either device) and the backward, which is four GEMMs that ATen already runs at the device's
// library speed (MKL/oneDNN, cuBLAS); what the op adds is sharing gB between dx and dA and the output mask.
//   gB = s·(g·B) [T, r];  dx = g·W + gB·A;  dW = gᵀ·x;  dA = gBᵀ·x;  dB = s·gᵀ·(x·Aᵀ)
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/checks.h"

namespace lowrank {

inline void check_lora_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                   const at::Tensor& lora_b) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dimension");
  LOWRANK_CHECK_DIM(weight, 2, "weight");
  LOWRANK_CHECK_DIM(lora_a, 2, "lora_a");
  LOWRANK_CHECK_DIM(lora_b, 2, "lora_b");
  LOWRANK_CHECK_FLOATING(x, "x");
  LOWRANK_CHECK_SAME_DTYPE(weight, x, "weight", "x");
  LOWRANK_CHECK_SAME_DTYPE(lora_a, x, "lora_a", "x");
  LOWRANK_CHECK_SAME_DTYPE(lora_b, x, "lora_b", "x");
  LOWRANK_CHECK_SAME_DEVICE(weight, x, "weight", "x");
  LOWRANK_CHECK_SAME_DEVICE(lora_a, x, "lora_a", "x");
  LOWRANK_CHECK_SAME_DEVICE(lora_b, x, "lora_b", "x");
  const auto in = weight.size(1), out = weight.size(0), r = lora_a.size(0);
  TORCH_CHECK_VALUE(x.size(-1) == in, "x.shape[-1] = ", x.size(-1), " but weight is ", weight.sizes());
  TORCH_CHECK_VALUE(lora_a.size(1) == in, "lora_a must be [r, ", in, "], got ", lora_a.sizes());
  TORCH_CHECK_VALUE(lora_b.size(0) == out && lora_b.size(1) == r, "lora_b must be [", out, ", ", r, "], got ",
                    lora_b.sizes());
  check_linear_bias(bias, x, out);
}

inline void check_lora_linear_grad(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight) {
  check_linear_grad_out(grad_out, x, weight.size(1), weight.size(0));
}

using OptTensor = std::optional<at::Tensor>;

// (dx, dW, dA, dB); an entry is nullopt where output_mask is false.
inline std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> lora_linear_backward_aten(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, double scaling, std::array<bool, 4> output_mask) {
  check_lora_linear_args(x, weight, std::nullopt, lora_a, lora_b);
  check_lora_linear_grad(grad_out, x, weight);
  const auto in = weight.size(1), out = weight.size(0);
  const at::Tensor g2 = grad_out.reshape({-1, out});
  const at::Tensor x2 = x.reshape({-1, in});
  OptTensor dx, dw, da, db;
  at::Tensor gb;  // s·(g·B), shared by dx and dA
  if (output_mask[0] || output_mask[2]) {
    gb = at::mm(g2, lora_b);
    gb.mul_(scaling);
  }
  if (output_mask[0]) {
    // gB·A first, then the base GEMM accumulates into it (beta = 1), so the read-modify-write of the [T, in]
    // result happens inside the large GEMM's micro-kernel instead of in a separate memory-bound pass.
    at::Tensor d = at::mm(gb, lora_a);
    d.addmm_(g2, weight);
    dx = d.view(x.sizes());
  }
  if (output_mask[1]) dw = at::mm(g2.t(), x2);
  if (output_mask[2]) da = at::mm(gb.t(), x2);
  if (output_mask[3]) {
    const at::Tensor h = at::mm(x2, lora_a.t());
    db = at::mm(g2.t(), h);
    db->mul_(scaling);
  }
  return {dx, dw, da, db};
}

}  // namespace lowrank
