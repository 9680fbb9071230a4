// Mixture of rank-1 experts LoRA, CUDA: ATen glue around csrc/cuda/rank1_experts_lora_kernel.cuh.
//   forward:  act = x·[A; R]ᵀ (cuBLAS, fp32 out: 16-bit inputs are widened first, as the specification computes
//             the gating in fp32), p = σ(z), the gate kernel (top-k, gates, u), y = x·Wᵀ + b (cuBLAS), then the
//             k-of-E expand kernel adds Σ_j u_tj·b_{e_tj} into y in place.
//   backward: q = G·B (cuBLAS), the gate-backward kernel forms D = [dh | dz] and U, then the same GEMMs as the CPU
//             kernel (csrc/cpu/rank1_experts_lora.cpp): dx = G·W + D·[A; R], d[A; R] = Dᵀ·x, dB = Gᵀ·U, dW = Gᵀ·x.
// Includes c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h (that one pulls cusparse/cublas headers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <string_view>
#include <vector>

#include "common/rank1_experts_common.h"
#include "cuda/rank1_experts_lora_kernel.cuh"

namespace lowrank {
namespace {

using OptTensor = std::optional<at::Tensor>;

at::ScalarType gate_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor stacked(const at::Tensor& lora_a, const OptTensor& router, bool use_router) {
  return use_router ? at::cat({lora_a, *router}, 0) : lora_a;
}

// x·Mᵀ in the gate dtype.
at::Tensor activations(const at::Tensor& x2, const at::Tensor& m, at::ScalarType gd) {
  return at::mm(x2.to(gd), m.to(gd).t()).contiguous();
}

template <typename F>
void dispatch(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK_TYPE(false, what, " (CUDA): unsupported dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rank1_experts_lora_cuda(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const OptTensor& router, const OptTensor& router_bias, int64_t top_k, double scaling,
    c10::string_view gate, double temperature, std::optional<double> threshold) {
  const bool use_router = rank1_is_router(std::string_view(gate.data(), gate.size()));
  check_rank1_experts_args(x, weight, bias, lora_a, lora_b, router, router_bias, top_k, use_router, temperature);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t in = weight.size(1), out = weight.size(0), E = lora_a.size(0);
  const at::Tensor x2 = x.reshape({-1, in});
  const int64_t T = x2.size(0);
  const auto gd = gate_dtype(x);
  const auto gopt = x.options().dtype(gd);
  const at::Tensor act = T > 0 ? activations(x2, stacked(lora_a, router, use_router), gd)
                               : at::empty({0, use_router ? 2 * E : E}, gopt);
  const at::Tensor prob = use_router ? at::sigmoid(act.narrow(1, E, E)).contiguous() : at::Tensor();
  const bool has_rb = use_router && router_bias.has_value() && router_bias->defined();
  const at::Tensor rb = has_rb ? router_bias->to(gd).contiguous() : at::Tensor();
  at::Tensor idx = at::empty({T, top_k}, x.options().dtype(at::kLong));
  at::Tensor gates = at::empty({T, top_k}, gopt);
  at::Tensor u = at::empty({T, top_k}, gopt);
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor y = has_bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  const at::Tensor b = lora_b.stride(1) == 1 ? lora_b : lora_b.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  dispatch(x.scalar_type(), "rank1_experts_lora", [&](auto tag) {
    using cuda_t = decltype(tag);
    using S = kernels::elem_acc_t<cuda_t>;
    C10_CUDA_CHECK(kernels::launch_rank1_gate_fwd<cuda_t>(
        act.const_data_ptr<S>(), act.stride(0), use_router ? prob.const_data_ptr<S>() : nullptr,
        has_rb ? rb.const_data_ptr<S>() : nullptr, T, E, top_k, use_router, scaling, temperature,
        threshold.has_value(), threshold.value_or(0.0), idx.mutable_data_ptr<int64_t>(), gates.mutable_data_ptr<S>(),
        u.mutable_data_ptr<S>(), stream));
    C10_CUDA_CHECK(kernels::launch_rank1_expand<cuda_t>(
        idx.const_data_ptr<int64_t>(), u.const_data_ptr<S>(), reinterpret_cast<const cuda_t*>(b.const_data_ptr()),
        b.stride(0), reinterpret_cast<cuda_t*>(y.mutable_data_ptr()), y.stride(0), T, out, top_k, stream));
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> ks = shape;
  shape.push_back(out);
  ks.push_back(top_k);
  return {y.view(shape), idx.view(ks), gates.view(ks), act};
}

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor> rank1_experts_lora_backward_cuda(
    const at::Tensor& grad_y, const OptTensor& grad_gates, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const OptTensor& router, const at::Tensor& indices,
    const at::Tensor& act, double scaling, c10::string_view gate, double temperature,
    std::optional<double> threshold, std::array<bool, 5> mask) {
  const bool use_router = rank1_is_router(std::string_view(gate.data(), gate.size()));
  const int64_t k = indices.size(-1);
  check_rank1_experts_args(x, weight, std::nullopt, lora_a, lora_b, router, std::nullopt, k, use_router, temperature);
  LOWRANK_CHECK_SAME_DTYPE(grad_y, x, "rank1_experts_lora_backward: grad_y", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t in = weight.size(1), out = weight.size(0), E = lora_a.size(0);
  const auto dt = x.scalar_type();
  const auto gd = gate_dtype(x);
  const at::Tensor g2 = grad_y.reshape({-1, out});
  const at::Tensor x2 = x.reshape({-1, in});
  const int64_t T = x2.size(0);
  TORCH_CHECK_VALUE(g2.size(0) == T && act.dim() == 2 && act.size(0) == T &&
                        act.size(1) == (use_router ? 2 * E : E) && indices.numel() == T * k,
                    "rank1_experts_lora_backward: grad_y, indices or act do not match x");
  at::Tensor D = at::zeros({T, use_router ? 2 * E : E}, x.options().dtype(gd));
  at::Tensor U = at::zeros({T, E}, x.options().dtype(gd));
  if (T > 0) {
    const at::Tensor q = at::mm(g2, lora_b).to(gd).contiguous();
    const at::Tensor a = act.to(gd).contiguous();
    const at::Tensor prob = use_router ? at::sigmoid(a.narrow(1, E, E)).contiguous() : at::Tensor();
    const at::Tensor idx = indices.reshape({T, k}).contiguous();
    const bool has_gg = grad_gates.has_value() && grad_gates->defined();
    const at::Tensor gg = has_gg ? grad_gates->reshape({T, k}).to(gd).contiguous() : at::Tensor();
    at::Tensor scratch = at::empty({T, 2 * k}, x.options().dtype(gd));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
    dispatch(dt, "rank1_experts_lora_backward", [&](auto tag) {
      using cuda_t = decltype(tag);
      using S = kernels::elem_acc_t<cuda_t>;
      C10_CUDA_CHECK(kernels::launch_rank1_gate_bwd<cuda_t>(
          a.const_data_ptr<S>(), a.stride(0), use_router ? prob.const_data_ptr<S>() : nullptr, T, E,
          idx.const_data_ptr<int64_t>(), k, q.const_data_ptr<S>(), has_gg ? gg.const_data_ptr<S>() : nullptr,
          use_router, scaling, temperature, threshold.has_value(), threshold.value_or(0.0),
          scratch.mutable_data_ptr<S>(), D.mutable_data_ptr<S>(), D.stride(0), U.mutable_data_ptr<S>(), stream));
    });
  }
  const auto d = rank1_backward_products(D, U, g2, x2, weight, stacked(lora_a, router, use_router), E, use_router,
                                         mask, x.sizes(), dt);
  return {d[0], d[1], d[2], d[3], d[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("rank1_experts_lora", &rank1_experts_lora_cuda);
  m.impl("rank1_experts_lora_backward", &rank1_experts_lora_backward_cuda);
}

}  // namespace lowrank
