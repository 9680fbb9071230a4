"""Triton sparse-plus-low-rank linear forward: ``y = (x·Aᵀ)·Bᵀ + b + x·Sᵀ``.

Shapes: x [..., in], lora_a A [r, in], lora_b B [out, r], s_values [nnz] in CSR order of the support (row_ptr
int32 [out + 1], col_idx [nnz], uint16 or int32, widened in the kernel; the CSC tensors, present on CUDA, are
accepted for the shared schema and unused here),
bias [out] or None; y [..., out]. Implements ``lowrank::sparse_lowrank_linear_triton`` (schema in
csrc/registration.cpp; fake and autograd in lowrank/ops/sparse_lowrank_linear.py, whose backward is the
C++/CUDA ``sparse_lowrank_linear_backward``). Importing this module registers the CPU (interpreter) and CUDA
implementations.

Design: the rank-r part is two skinny GEMMs (cuBLAS / MKL run those at their peak; the second writes the
output with the bias). The kernel then adds x·Sᵀ in place: one program per (BLOCK_T tokens × one output row
i); it walks row i's nonzeros BLOCK_K at a time, gathers the [BLOCK_T, BLOCK_K] tile x[t, col_k] (the row's
columns are sorted, so the gather touches few cache lines of each x row), multiplies by the values and
reduces over k, accumulating in fp32 (fp64 for fp64). Each output element is read once and written once,
rounded once.
"""
import torch
import triton
import triton.language as tl

__all__ = ["sparse_lowrank_linear_triton"]


@triton.jit
def _sparse_add_fwd_kernel(
    x_ptr, y_ptr, row_ptr_ptr, col_idx_ptr, val_ptr,
    T, stride_xt, stride_yt,
    ACC_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    row = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    rows_x = offs_t.to(tl.int64) * stride_xt
    start = tl.load(row_ptr_ptr + row)
    end = tl.load(row_ptr_ptr + row + 1)
    acc = tl.zeros((BLOCK_T,), dtype=ACC_DTYPE)
    for k0 in range(start, end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < end
        cols = tl.load(col_idx_ptr + ks, mask=mask_k, other=0).to(tl.int64)
        vals = tl.load(val_ptr + ks, mask=mask_k, other=0.0).to(ACC_DTYPE)
        xt = tl.load(x_ptr + rows_x[:, None] + cols[None, :], mask=mask_t[:, None] & mask_k[None, :],
                     other=0.0)
        acc += tl.sum(xt.to(ACC_DTYPE) * vals[None, :], axis=1)
    y_ptrs = y_ptr + offs_t.to(tl.int64) * stride_yt + row
    y = tl.load(y_ptrs, mask=mask_t, other=0.0).to(ACC_DTYPE)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask_t)


def sparse_lowrank_linear_triton(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                                 s_values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                                 col_ptr: torch.Tensor | None, row_idx: torch.Tensor | None,
                                 perm: torch.Tensor | None, bias) -> torch.Tensor:
    """Launch on validated arguments (lowrank.ops.sparse_lowrank_linear checks them); returns [..., out]."""
    in_, out = lora_a.shape[1], lora_b.shape[0]
    x2 = x.reshape(-1, in_)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    h = x2 @ lora_a.t()
    y = torch.addmm(bias, h, lora_b.t()) if bias is not None else h @ lora_b.t()
    y = y.contiguous()
    T, nnz = x2.shape[0], s_values.shape[0]
    if T > 0 and nnz > 0:
        interp = x.device.type != "cuda"
        block_t = 16 if interp else max(16, min(64, triton.next_power_of_2(T)))
        grid = (triton.cdiv(T, block_t), out)
        _sparse_add_fwd_kernel[grid](
            x2, y, row_ptr, col_idx, s_values.contiguous(), T, x2.stride(0), y.stride(0),
            ACC_DTYPE=tl.float64 if x.dtype == torch.float64 else tl.float32,
            BLOCK_T=block_t, BLOCK_K=16 if interp else 32, num_warps=4, num_stages=1)
    return y.view(*x.shape[:-1], out)


torch.library.register_kernel("lowrank::sparse_lowrank_linear_triton", ("cpu", "cuda"),
                              sparse_lowrank_linear_triton)
