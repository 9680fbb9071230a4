// Fused LoRA linear, CUDA: ATen glue around csrc/cuda/lora_linear_kernel.cuh.
//   forward:  y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ        x [T, in], W [out, in], A [r, in], B [out, r]
//             base x·Wᵀ + b by cuBLAS (at::addmm / at::mm) into y, then the shrink kernel h = x·Aᵀ (fp32, split
//             over `in` for small T) and the expand-add kernel y += s·h·Bᵀ in place (no output-sized temporary).
//   backward: gB = s·(g·B) [T, r];  dx = g·W + gB·A;  dW = gᵀ·x;  dA = gBᵀ·x;  dB = s·gᵀ·(x·Aᵀ)
//             all ATen GEMMs (cuBLAS); the same math and output_mask semantics as csrc/cpu/lora_linear.cpp.
// Includes c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h: the latter pulls in cusparse.h / cublas
// headers, which a toolkit without those libraries (and the nvcc compile check in tests/build) lacks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>

#include "common/lora_linear_common.h"
#include "cuda/lora_linear_kernel.cuh"

namespace lowrank {
namespace {

// Multiprocessor count of a device, read once per device (it sizes the shrink's split over `in`).
int sm_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cache{};
  int n = cache.at(device).load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache.at(device).store(n, std::memory_order_relaxed);
  }
  return n;
}

// The kernels take a row stride but need unit column stride.
at::Tensor unit_column_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// y [T, out] += scaling·(x2·aᵀ)·bᵀ, with h = x2·aᵀ kept in fp32 (fp64 for double).
template <typename cuda_t>
void add_lora_term(at::Tensor& y, const at::Tensor& x2, const at::Tensor& a, const at::Tensor& b, double scaling,
                   cudaStream_t stream) {
  using acc_t = kernels::lora_acc_t<cuda_t>;
  const int64_t tokens = x2.size(0), in = x2.size(1), out = y.size(1), r = a.size(0);
  const int splits = kernels::lora_shrink_num_splits(tokens, r, in, sm_count(x2.get_device()));
  const at::Tensor h_part =
      at::empty({splits, tokens, r}, x2.options().dtype(sizeof(acc_t) == 8 ? at::kDouble : at::kFloat));
  C10_CUDA_CHECK(kernels::launch_lora_shrink<cuda_t>(
      reinterpret_cast<const cuda_t*>(x2.const_data_ptr()), x2.stride(0),
      reinterpret_cast<const cuda_t*>(a.const_data_ptr()), a.stride(0), h_part.mutable_data_ptr<acc_t>(), tokens, r,
      in, splits, stream));
  C10_CUDA_CHECK(kernels::launch_lora_expand_add<cuda_t>(
      h_part.const_data_ptr<acc_t>(), splits, reinterpret_cast<const cuda_t*>(b.const_data_ptr()), b.stride(0),
      reinterpret_cast<cuda_t*>(y.mutable_data_ptr()), y.stride(0), tokens, out, r, scaling, stream));
}

at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling) {
  check_lora_linear_args(x, weight, bias, lora_a, lora_b);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto in = weight.size(1), out = weight.size(0), r = lora_a.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out;
  const at::Tensor x2 = x.reshape({-1, in});
  at::Tensor y;
  if (bias.has_value() && bias->defined()) {
    y = at::addmm(*bias, x2, weight.t());
  } else {
    y = at::mm(x2, weight.t());
  }
  if (x2.size(0) > 0 && r > 0 && out > 0 && scaling != 0.0) {
    if (y.stride(1) != 1) y = y.contiguous();  // addmm/mm return row-major results; this never copies
    const at::Tensor xk = unit_column_stride(x2), ak = unit_column_stride(lora_a), bk = unit_column_stride(lora_b);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
    switch (x.scalar_type()) {
      case at::kFloat: add_lora_term<float>(y, xk, ak, bk, scaling, stream); break;
      case at::kDouble: add_lora_term<double>(y, xk, ak, bk, scaling, stream); break;
      case at::kHalf: add_lora_term<__half>(y, xk, ak, bk, scaling, stream); break;
      case at::kBFloat16: add_lora_term<__nv_bfloat16>(y, xk, ak, bk, scaling, stream); break;
      default: TORCH_CHECK_TYPE(false, "lora_linear (CUDA): unsupported dtype ", x.scalar_type());
    }
  }
  return y.view(out_shape);
}

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> lora_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, double scaling, std::array<bool, 4> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_linear_backward_aten(grad_out, x, weight, lora_a, lora_b, scaling, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("lora_linear", &lora_linear_cuda);
  m.impl("lora_linear_backward", &lora_linear_backward_cuda);
}

}  // namespace lowrank
