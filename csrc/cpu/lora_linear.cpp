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
#include "cpu/lowrank_kernels.h"

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
  if (x.scalar_type() == at::kDouble) {
    // fp64 is the testing dtype (gradcheck): keep every product in double through ATen.
    const at::Tensor h = at::mm(x2, lora_a.t());
    y = has_bias ? at::addmm(*bias, h, lora_b.t(), /*beta=*/1, /*alpha=*/scaling)
                 : at::mm(h, lora_b.t()).mul_(scaling);
  } else {
    const at::Tensor h = cpu::shrink(x2, lora_a, scaling);         // s·x·Aᵀ, fp32 [T, r]
    y = cpu::expand(h, lora_b.t(), bias, x.scalar_type());          // b + s·h·Bᵀ, the output's first write
  }
  y.addmm_(x2, weight.t());
  return y.view(out_shape);
}

// Same math as lora_linear_backward_aten, with the rank-r products (g·B, gB·A, x·Aᵀ) on the register-tiled
// kernels; the reductions over tokens (dA = gBᵀ·x, dB = gᵀ·h) and the base GEMMs stay with ATen.
std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> lora_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, double scaling, std::array<bool, 4> output_mask) {
  if (x.scalar_type() == at::kDouble) {
    return lora_linear_backward_aten(grad_out, x, weight, lora_a, lora_b, scaling, output_mask);
  }
  check_lora_linear_args(x, weight, std::nullopt, lora_a, lora_b);
  check_lora_linear_grad(grad_out, x, weight);
  const auto in = weight.size(1), out = weight.size(0);
  const auto dtype = x.scalar_type();
  const at::Tensor g2 = grad_out.reshape({-1, out});
  const at::Tensor x2 = x.reshape({-1, in});
  OptTensor dx, dw, da, db;
  at::Tensor gb;  // s·(g·B) in fp32 [T, r], shared by dx and dA
  if (output_mask[0] || output_mask[2]) gb = cpu::shrink(g2, lora_b.t(), scaling);
  if (output_mask[0]) {
    at::Tensor d = cpu::expand(gb, lora_a, std::nullopt, dtype);  // gB·A, then the base GEMM accumulates
    d.addmm_(g2, weight);
    dx = d.view(x.sizes());
  }
  if (output_mask[1]) dw = at::mm(g2.t(), x2);
  if (output_mask[2]) da = at::mm(gb.to(dtype).t(), x2);
  if (output_mask[3]) db = at::mm(g2.t(), cpu::shrink(x2, lora_a, scaling).to(dtype));
  return {dx, dw, da, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace lowrank
