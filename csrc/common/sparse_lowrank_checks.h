// Argument checks of the sparse-plus-low-rank linear ops, shared by the CPU and CUDA kernels so direct
// torch.ops.lowrank callers get the same errors on either device (lowrank/ops/sparse_lowrank_linear.py raises
// friendlier ValueError/TypeError first).
//   x [..., in], lora_a A [r, in], lora_b B [out, r], s_values [nnz], bias [out] or none
//   CSR: row_ptr [out + 1] int32, col_idx [nnz] int32 or uint16 (the CPU layout's type where in <= 65536);
//   optional CSC transpose (the CUDA backward reads it): col_ptr [in + 1], row_idx [nnz], perm [nnz], all int32
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common/checks.h"

namespace lowrank {

inline void check_index_tensor(const at::Tensor& t, int64_t n, const at::Tensor& x, const char* name,
                               bool allow_uint16 = false) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || (allow_uint16 && t.scalar_type() == at::kUInt16), name,
                   allow_uint16 ? " must be int32 or uint16, got " : " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must be [", n, "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

inline void check_sparse_lowrank_args(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                      const at::Tensor& s_values, const at::Tensor& row_ptr,
                                      const at::Tensor& col_idx, const std::optional<at::Tensor>& col_ptr,
                                      const std::optional<at::Tensor>& row_idx,
                                      const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dimension");
  LOWRANK_CHECK_DIM(lora_a, 2, "lora_a");
  LOWRANK_CHECK_DIM(lora_b, 2, "lora_b");
  LOWRANK_CHECK_DIM(s_values, 1, "s_values");
  LOWRANK_CHECK_FLOATING(x, "x");
  LOWRANK_CHECK_SAME_DTYPE(lora_a, x, "lora_a", "x");
  LOWRANK_CHECK_SAME_DTYPE(lora_b, x, "lora_b", "x");
  LOWRANK_CHECK_SAME_DTYPE(s_values, x, "s_values", "x");
  LOWRANK_CHECK_SAME_DEVICE(lora_a, x, "lora_a", "x");
  LOWRANK_CHECK_SAME_DEVICE(lora_b, x, "lora_b", "x");
  LOWRANK_CHECK_SAME_DEVICE(s_values, x, "s_values", "x");
  const int64_t in = lora_a.size(1), r = lora_a.size(0), out = lora_b.size(0), nnz = s_values.size(0);
  TORCH_CHECK_VALUE(x.size(-1) == in, "x.shape[-1] = ", x.size(-1), " but lora_a is ", lora_a.sizes());
  TORCH_CHECK_VALUE(lora_b.size(1) == r, "lora_b must be [out, r=", r, "], got ", lora_b.sizes());
  check_index_tensor(row_ptr, out + 1, x, "row_ptr");
  check_index_tensor(col_idx, nnz, x, "col_idx", /*allow_uint16=*/true);
  const int given = int(col_ptr.has_value()) + int(row_idx.has_value()) + int(perm.has_value());
  TORCH_CHECK_VALUE(given == 0 || given == 3, "col_ptr, row_idx and perm (the CSC transpose) must be given together "
                    "or not at all");
  if (given == 3) {
    check_index_tensor(*col_ptr, in + 1, x, "col_ptr");
    check_index_tensor(*row_idx, nnz, x, "row_idx");
    check_index_tensor(*perm, nnz, x, "perm");
  }
  check_linear_bias(bias, x, out);
}

inline void check_sparse_lowrank_grad(const at::Tensor& grad_out, const at::Tensor& x, int64_t in, int64_t out) {
  check_linear_grad_out(grad_out, x, in, out);
}

// Content of a compressed index on the CPU: ptr[0] = 0, non-decreasing, ptr[n] = nnz, idx in [0, bound).
// O(n + nnz) reads, 1/T of the kernel's work; it keeps a malformed direct call from reading out of bounds.
template <typename idx_t>
inline void check_compressed_cpu_typed(const at::Tensor& ptr, const at::Tensor& idx, int64_t bound,
                                       const char* what) {
  const int32_t* p = ptr.const_data_ptr<int32_t>();
  const int64_t n = ptr.size(0) - 1, nnz = idx.size(0);
  TORCH_CHECK_VALUE(p[0] == 0 && p[n] == nnz, what, ": pointers must start at 0 and end at nnz = ", nnz,
                    ", got ", p[0], " and ", p[n]);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] <= p[i + 1], what, ": pointers must be non-decreasing (entry ", i, ")");
  }
  const idx_t* q = idx.const_data_ptr<idx_t>();
  int64_t lo = 0, hi = 0;
  for (int64_t k = 0; k < nnz; ++k) {
    lo = std::min<int64_t>(lo, q[k]);
    hi = std::max<int64_t>(hi, q[k]);
  }
  TORCH_CHECK_INDEX(nnz == 0 || (lo >= 0 && hi < bound), what, ": indices must lie in [0, ", bound, "), got [", lo,
                    ", ", hi, "]");
}

inline void check_compressed_cpu(const at::Tensor& ptr, const at::Tensor& idx, int64_t bound, const char* what) {
  if (idx.scalar_type() == at::kUInt16) {
    check_compressed_cpu_typed<uint16_t>(ptr, idx, bound, what);
  } else {
    check_compressed_cpu_typed<int32_t>(ptr, idx, bound, what);
  }
}

}  // namespace lowrank
