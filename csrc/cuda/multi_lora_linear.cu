// Multi-adapter LoRA linear, CUDA: ATen glue around csrc/cuda/multi_lora_linear_kernel.cuh.
//   forward:  y = x·Wᵀ + b by cuBLAS (at::addmm / at::mm), then the SGMV shrink and expand kernels add each
//             segment's s_a·(x·A_aᵀ)·B_aᵀ into y in place (segment metadata read on the device: no host sync).
//   backward: per adapter that has tokens, ATen GEMMs on that adapter's rows (index_select / index_add_):
//             gB = s_a·g_a·B_a, dx = g·W + Σ_a scatter(gB·A_a), dA_a = gBᵀ·x_a, dB_a = s_a·g_aᵀ·(x_a·A_aᵀ); the
//             segment offsets are copied to the host once (one sync). Unlike the CPU kernel this gathers the rows
//             of x and g per adapter; a segmented backward kernel is future work.
// Includes c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h (see csrc/cuda/lora_linear.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "common/multi_lora_common.h"
#include "cuda/multi_lora_linear_kernel.cuh"

namespace lowrank {
namespace {

using OptTensor = std::optional<at::Tensor>;

at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

template <typename cuda_t>
void add_segments(at::Tensor& y, const at::Tensor& x2, const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& ranks,
                  const at::Tensor& scaling, cudaStream_t stream) {
  using acc_t = kernels::mlora_acc_t<cuda_t>;
  const int64_t tokens = x2.size(0), in = x2.size(1), out = y.size(1), n = a.size(0), r = a.size(1);
  const at::Tensor h = at::empty({tokens, r}, x2.options().dtype(sizeof(acc_t) == 8 ? at::kDouble : at::kFloat));
  C10_CUDA_CHECK(kernels::launch_multi_lora_add<cuda_t>(
      reinterpret_cast<const cuda_t*>(x2.const_data_ptr()), x2.stride(0),
      reinterpret_cast<const cuda_t*>(a.const_data_ptr()), a.stride(0), a.stride(1),
      reinterpret_cast<const cuda_t*>(b.const_data_ptr()), b.stride(0), b.stride(1),
      perm.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
      ranks.defined() ? ranks.const_data_ptr<int64_t>() : nullptr, scaling.const_data_ptr<double>(),
      h.mutable_data_ptr<acc_t>(), reinterpret_cast<cuda_t*>(y.mutable_data_ptr()), y.stride(0),
      tokens, in, out, n, r, stream));
}

at::Tensor multi_lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
                                  const at::Tensor& perm, const at::Tensor& offsets,
                                  const std::optional<at::Tensor>& ranks) {
  check_multi_lora_args(x, weight, bias, lora_a, lora_b, scaling, perm, offsets, ranks);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto in = weight.size(1), out = weight.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out;
  const at::Tensor x2 = unit_last(x.reshape({-1, in}));
  at::Tensor y = bias.has_value() && bias->defined() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  if (x2.size(0) > 0) {
    if (y.stride(1) != 1) y = y.contiguous();
    const at::Tensor pm = perm.contiguous(), off = offsets.contiguous(), sc = scaling.to(at::kDouble).contiguous();
    const at::Tensor rk = ranks.has_value() && ranks->defined() ? ranks->to(at::kLong).contiguous() : at::Tensor();
    const at::Tensor a = unit_last(lora_a), b = unit_last(lora_b);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
    switch (x.scalar_type()) {
      case at::kFloat: add_segments<float>(y, x2, a, b, pm, off, rk, sc, stream); break;
      case at::kDouble: add_segments<double>(y, x2, a, b, pm, off, rk, sc, stream); break;
      case at::kHalf: add_segments<__half>(y, x2, a, b, pm, off, rk, sc, stream); break;
      case at::kBFloat16: add_segments<__nv_bfloat16>(y, x2, a, b, pm, off, rk, sc, stream); break;
      default: TORCH_CHECK_TYPE(false, "multi_lora_linear (CUDA): unsupported dtype ", x.scalar_type());
    }
  }
  return y.view(out_shape);
}

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> multi_lora_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scaling, const at::Tensor& perm, const at::Tensor& offsets,
    const std::optional<at::Tensor>& ranks, std::array<bool, 4> output_mask) {
  check_multi_lora_args(x, weight, std::nullopt, lora_a, lora_b, scaling, perm, offsets, ranks);
  check_multi_lora_grad(grad_out, x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto in = weight.size(1), out = weight.size(0), n = lora_a.size(0), r = lora_a.size(1);
  const at::Tensor g2 = grad_out.reshape({-1, out});
  const at::Tensor x2 = x.reshape({-1, in});
  const at::Tensor off = offsets.to(at::kCPU, at::kLong);
  const at::Tensor sc = scaling.to(at::kCPU, at::kDouble);
  const at::Tensor rk = ranks.has_value() && ranks->defined() ? ranks->to(at::kCPU, at::kLong) : at::Tensor();
  OptTensor dx, dw, da, db;
  at::Tensor d_x = output_mask[0] ? at::mm(g2, weight) : at::Tensor();
  at::Tensor d_a = output_mask[2] ? at::zeros_like(lora_a, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor d_b = output_mask[3] ? at::zeros_like(lora_b, at::MemoryFormat::Contiguous) : at::Tensor();
  for (int64_t ad = 0; ad < n; ++ad) {
    const int64_t o0 = off[ad].item<int64_t>(), o1 = off[ad + 1].item<int64_t>();
    const int64_t k = rk.defined() ? rk[ad].item<int64_t>() : r;
    const double s = sc[ad].item<double>();
    if (o1 <= o0 || k <= 0 || s == 0.0 || !(output_mask[0] || output_mask[2] || output_mask[3])) continue;
    const at::Tensor idx = perm.narrow(0, o0, o1 - o0);
    const at::Tensor A = lora_a.select(0, ad).narrow(0, 0, k), B = lora_b.select(0, ad).narrow(1, 0, k);
    const at::Tensor ga = g2.index_select(0, idx);
    const at::Tensor gb = at::mm(ga, B).mul_(s);  // [t_a, k]
    if (d_x.defined()) d_x.index_add_(0, idx, at::mm(gb, A));
    const at::Tensor xa = (output_mask[2] || output_mask[3]) ? x2.index_select(0, idx) : at::Tensor();
    if (d_a.defined()) d_a.select(0, ad).narrow(0, 0, k).copy_(at::mm(gb.t(), xa));
    if (d_b.defined()) d_b.select(0, ad).narrow(1, 0, k).copy_(at::mm(ga.t(), at::mm(xa, A.t())).mul_(s));
  }
  if (output_mask[0]) dx = d_x.view(x.sizes());
  if (output_mask[1]) dw = at::mm(g2.t(), x2);
  if (output_mask[2]) da = d_a;
  if (output_mask[3]) db = d_b;
  return {dx, dw, da, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("multi_lora_linear", &multi_lora_linear_cuda);
  m.impl("multi_lora_linear_backward", &multi_lora_linear_backward_cuda);
}

}  // namespace lowrank
