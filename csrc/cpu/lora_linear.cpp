// Fused LoRA linear, CPU.
//   forward:  y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ        x [T, in], W [out, in], A [r, in], B [out, r]
//   backward: gB = s·(g·B) [T, r];  dx = g·W + gB·A;  dW = gᵀ·x;  dA = gBᵀ·x;  dB = s·gᵀ·(x·Aᵀ)
// Why it beats the unfused module: the LoRA expand is accumulated into the base output in place (no
// output-sized temporary), h = x·Aᵀ is the only rank-sized intermediate, the whole layer is one dispatcher call
// (decode is dispatch-bound), and the backward shares gB between dx and dA and never forms Bᵀ·A.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"

namespace lowrank {
namespace {

void check_lora_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
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
}

at::Tensor lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling) {
  check_lora_args(x, weight, lora_a, lora_b);
  const auto in = weight.size(1), out = weight.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out;
  const at::Tensor x2 = x.reshape({-1, in});
  at::Tensor y;
  if (bias.has_value() && bias->defined()) {
    LOWRANK_CHECK_SAME_DTYPE(*bias, x, "bias", "x");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, "bias must be [", out, "], got ", bias->sizes());
    y = at::addmm(*bias, x2, weight.t());
  } else {
    y = at::mm(x2, weight.t());
  }
  if (x2.size(0) > 0 && scaling != 0.0) {
    const at::Tensor h = at::mm(x2, lora_a.t());
    y.addmm_(h, lora_b.t(), /*beta=*/1, /*alpha=*/scaling);
  }
  return y.view(out_shape);
}

using OptTensor = std::optional<at::Tensor>;

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> lora_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, double scaling, std::array<bool, 4> output_mask) {
  check_lora_args(x, weight, lora_a, lora_b);
  const auto in = weight.size(1), out = weight.size(0);
  LOWRANK_CHECK_SAME_DTYPE(grad_out, x, "grad_out", "x");
  TORCH_CHECK_VALUE(grad_out.numel() / std::max<int64_t>(out, 1) == x.numel() / std::max<int64_t>(in, 1) &&
                        grad_out.size(-1) == out,
                    "grad_out has shape ", grad_out.sizes(), " for x of shape ", x.sizes());
  const at::Tensor g2 = grad_out.reshape({-1, out});
  const at::Tensor x2 = x.reshape({-1, in});
  at::Tensor dx, dw, da, db;
  at::Tensor gb;  // s·(g·B), shared by dx and dA
  if (output_mask[0] || output_mask[2]) {
    gb = at::mm(g2, lora_b);
    gb.mul_(scaling);
  }
  if (output_mask[0]) {
    dx = at::mm(g2, weight);
    dx.addmm_(gb, lora_a);
    dx = dx.view(x.sizes());
  }
  if (output_mask[1]) dw = at::mm(g2.t(), x2);
  if (output_mask[2]) da = at::mm(gb.t(), x2);
  if (output_mask[3]) {
    const at::Tensor h = at::mm(x2, lora_a.t());
    db = at::mm(g2.t(), h);
    db.mul_(scaling);
  }
  auto opt = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
  return {opt(dx), opt(dw), opt(da), opt(db)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace lowrank
