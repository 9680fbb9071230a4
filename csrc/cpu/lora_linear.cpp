// Fused LoRA linear, CPU.
//   forward:  y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ        x [T, in], W [out, in], A [r, in], B [out, r]
//   backward: see common/lora_linear_common.h
// Order of work in the forward, and why: h = x·Aᵀ (a skinny GEMM that reads x once), then the output buffer is
// born as E = b + s·h·Bᵀ (bias broadcast for free, one write of [T, out]), then the base GEMM accumulates into it
// with beta = 1. The LoRA term's read-modify-write of the output thus happens inside the base GEMM's micro-kernel,
// overlapped with its arithmetic, instead of in an extra memory-bound pass over [T, out] as in the unfused layer
// (PEFT: result = base(x); result = result + lora_B(lora_A(x)) * s). No output-sized temporary is allocated and
// the whole layer is one dispatcher call, which is what decode (few tokens) is bound by.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/lora_linear_common.h"

namespace lowrank {
namespace {

at::Tensor lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling) {
  check_lora_linear_args(x, weight, bias, lora_a, lora_b);
  const auto in = weight.size(1), out = weight.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out;
  const at::Tensor x2 = x.reshape({-1, in});
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor y;
  if (x2.size(0) == 0 || scaling == 0.0) {
    y = has_bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
    return y.view(out_shape);
  }
  const at::Tensor h = at::mm(x2, lora_a.t());
  if (has_bias) {
    y = at::addmm(*bias, h, lora_b.t(), /*beta=*/1, /*alpha=*/scaling);
  } else {
    y = at::empty({x2.size(0), out}, x.options());
    at::addmm_out(y, y, h, lora_b.t(), /*beta=*/0, /*alpha=*/scaling);  // beta = 0: y's contents are ignored
  }
  y.addmm_(x2, weight.t());
  return y.view(out_shape);
}

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> lora_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, double scaling, std::array<bool, 4> output_mask) {
  return lora_linear_backward_aten(grad_out, x, weight, lora_a, lora_b, scaling, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace lowrank
