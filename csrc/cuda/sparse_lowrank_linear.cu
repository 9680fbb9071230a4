// Sparse-plus-low-rank linear, CUDA: ATen glue around csrc/cuda/sparse_lowrank_linear_kernel.cuh.
//   forward:  y = (x·Aᵀ)·Bᵀ + b (two cuBLAS GEMMs, the second writing y with the bias), then y += x·Sᵀ in place
//   backward: gB = g·B;  dx = gB·A (cuBLAS) then dx += g·S through the CSC order;  dA = gBᵀ·x;
//             dB = gᵀ·(x·Aᵀ);  d s_values = SDDMM over the nnz support
// The same math and output_mask semantics as csrc/cpu/sparse_lowrank_linear.cpp; no [out, in] tensor is formed.
// Index contents (sorted, in range) are validated when the layout is built (lowrank.ops.SparseLayout); checking
// them here would cost a device synchronisation per call, so only shapes, dtypes and devices are checked.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "common/sparse_lowrank_checks.h"
#include "cuda/sparse_lowrank_linear_kernel.cuh"

namespace lowrank {
namespace {

using OptTensor = std::optional<at::Tensor>;

at::Tensor rows_view(const at::Tensor& t, int64_t n) {
  at::Tensor t2 = t.reshape({-1, n});
  return t2.stride(1) == 1 ? t2 : t2.contiguous();
}

// The CUDA kernels read int32 column indices (coalesced 4-byte loads); SparseLayout.to("cuda") widens the CPU
// layout's uint16 ones.
void check_cuda_col_idx(const at::Tensor& col_idx) {
  TORCH_CHECK_TYPE(col_idx.scalar_type() == at::kInt, "sparse_lowrank_linear (CUDA): col_idx must be int32, got ",
                   col_idx.scalar_type(), " (SparseLayout.to('cuda') converts it)");
}

// Calls f.template operator()<cuda_t>() with the CUDA element type of `dtype`.
template <typename F>
void dispatch_cuda_type(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK_TYPE(false, "sparse_lowrank_linear (CUDA): unsupported dtype ", dtype);
  }
}

at::Tensor sparse_lowrank_linear_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                      const at::Tensor& s_values, const at::Tensor& row_ptr,
                                      const at::Tensor& col_idx, const OptTensor& col_ptr,
                                      const OptTensor& row_idx, const OptTensor& perm, const OptTensor& bias) {
  check_sparse_lowrank_args(x, lora_a, lora_b, s_values, row_ptr, col_idx, col_ptr, row_idx, perm, bias);
  check_cuda_col_idx(col_idx);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t in = lora_a.size(1), out = lora_b.size(0), nnz = s_values.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out;
  const at::Tensor x2 = rows_view(x, in);
  const at::Tensor h = at::mm(x2, lora_a.t());
  at::Tensor y = bias.has_value() && bias->defined() ? at::addmm(*bias, h, lora_b.t()) : at::mm(h, lora_b.t());
  if (x2.size(0) > 0 && nnz > 0) {
    const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous(), v = s_values.contiguous();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
    dispatch_cuda_type(x.scalar_type(), [&](auto tag) {
      using cuda_t = decltype(tag);
      C10_CUDA_CHECK(kernels::launch_sparse_spmm_add<cuda_t>(
          reinterpret_cast<const cuda_t*>(x2.const_data_ptr()), x2.stride(0), rp.const_data_ptr<int32_t>(),
          ci.const_data_ptr<int32_t>(), nullptr, reinterpret_cast<const cuda_t*>(v.const_data_ptr()),
          reinterpret_cast<cuda_t*>(y.mutable_data_ptr()), y.stride(0), x2.size(0), out, stream));
    });
  }
  return y.view(out_shape);
}

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> sparse_lowrank_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& s_values, const at::Tensor& row_ptr, const at::Tensor& col_idx, const OptTensor& col_ptr,
    const OptTensor& row_idx, const OptTensor& perm, std::array<bool, 4> output_mask) {
  check_sparse_lowrank_args(x, lora_a, lora_b, s_values, row_ptr, col_idx, col_ptr, row_idx, perm, std::nullopt);
  check_cuda_col_idx(col_idx);
  TORCH_CHECK_VALUE(!output_mask[0] || col_ptr.has_value(), "sparse_lowrank_linear_backward (CUDA): dx needs the "
                    "layout's CSC transpose (col_ptr, row_idx, perm); a SparseLayout on a CUDA device carries it");
  const int64_t in = lora_a.size(1), out = lora_b.size(0), nnz = s_values.size(0);
  check_sparse_lowrank_grad(grad_out, x, in, out);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor g2 = rows_view(grad_out, out);
  const at::Tensor x2 = rows_view(x, in);
  const int64_t T = x2.size(0);
  OptTensor dx, da, db, dv;
  at::Tensor gb;
  if (output_mask[0] || output_mask[1]) gb = at::mm(g2, lora_b);
  if (output_mask[0]) dx = at::mm(gb, lora_a);
  if (output_mask[1]) da = at::mm(gb.t(), x2);
  if (output_mask[2]) db = at::mm(g2.t(), at::mm(x2, lora_a.t()));
  if (output_mask[3]) dv = at::zeros({nnz}, s_values.options());
  if (T > 0 && nnz > 0 && (output_mask[0] || output_mask[3])) {
    const at::Tensor v = s_values.contiguous();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
    dispatch_cuda_type(x.scalar_type(), [&](auto tag) {
      using cuda_t = decltype(tag);
      if (output_mask[0]) {
        const at::Tensor cp = col_ptr->contiguous(), ri = row_idx->contiguous(), pm = perm->contiguous();
        C10_CUDA_CHECK(kernels::launch_sparse_spmm_add<cuda_t>(
            reinterpret_cast<const cuda_t*>(g2.const_data_ptr()), g2.stride(0), cp.const_data_ptr<int32_t>(),
            ri.const_data_ptr<int32_t>(), pm.const_data_ptr<int32_t>(),
            reinterpret_cast<const cuda_t*>(v.const_data_ptr()), reinterpret_cast<cuda_t*>(dx->mutable_data_ptr()),
            dx->stride(0), T, in, stream));
      }
      if (output_mask[3]) {
        const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
        C10_CUDA_CHECK(kernels::launch_sparse_sddmm<cuda_t>(
            reinterpret_cast<const cuda_t*>(g2.const_data_ptr()), g2.stride(0),
            reinterpret_cast<const cuda_t*>(x2.const_data_ptr()), x2.stride(0), rp.const_data_ptr<int32_t>(),
            ci.const_data_ptr<int32_t>(), reinterpret_cast<cuda_t*>(dv->mutable_data_ptr()), T, out, stream));
      }
    });
  }
  if (output_mask[0]) dx = dx->view(x.sizes());
  return {dx, da, db, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("sparse_lowrank_linear", &sparse_lowrank_linear_cuda);
  m.impl("sparse_lowrank_linear_backward", &sparse_lowrank_linear_backward_cuda);
}

}  // namespace lowrank
