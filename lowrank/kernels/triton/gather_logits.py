"""Triton identifier-logit gather: ``logits[t, j] = hidden[t]·weight[ids[j]] + bias[ids[j]]``.

Shapes: hidden [T, d] (rows may be strided), weight [V, d], ids [k] int32/int64 (validated in range by the caller),
bias [V] or None; logits [T, k] in hidden's dtype. Implements
``lowrank::gather_logits_triton`` (schema in csrc/registration.cpp; fake and autograd in
lowrank/ops/gather_logits.py). Importing this module registers the CPU (interpreter) and CUDA implementations.

Design: one program per (BLOCK_T tokens × BLOCK_K identifiers) tile. The identifier rows of W are gathered
straight from the LM head by pointer arithmetic (ids[j]·stride), so no [k, d] copy of W exists; the tile's dot
products run as one tl.dot per BLOCK_D slice of d, accumulated in fp32 (fp64 for fp64). k is small (20 for
FIRST), so one program usually covers every identifier and the hidden rows are read once.
"""
import torch
import triton
import triton.language as tl

__all__ = ["gather_logits_triton"]


@triton.jit
def _gather_logits_kernel(
    h_ptr, w_ptr, ids_ptr, bias_ptr, out_ptr,
    T, K, D,
    stride_ht, stride_hd, stride_wv, stride_wd, stride_ot,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_k = offs_k < K
    rows_w = tl.load(ids_ptr + offs_k, mask=mask_k, other=0).to(tl.int64) * stride_wv
    rows_h = offs_t.to(tl.int64) * stride_ht
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        mask_d = dd < D
        h_tile = tl.load(h_ptr + rows_h[:, None] + dd[None, :] * stride_hd,
                         mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        w_t_tile = tl.load(w_ptr + dd[:, None] * stride_wd + rows_w[None, :],          # W[ids]ᵀ tile [BLOCK_D, BLOCK_K]
                           mask=mask_d[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(h_tile.to(DOT_DTYPE), w_t_tile.to(DOT_DTYPE), acc, input_precision="ieee", out_dtype=ACC_DTYPE)
    if HAS_BIAS:
        ids = tl.load(ids_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
        acc += tl.load(bias_ptr + ids, mask=mask_k, other=0.0).to(ACC_DTYPE)[None, :]
    out_ptrs = out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + offs_k[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_k[None, :])


_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
             torch.float16: tl.float16}


def _dot_dtype(x: torch.Tensor):
    # The Triton interpreter (CPU tensors) computes bf16 tl.dot wrongly; upcast those operands to fp32 there.
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return tl.float32
    return _TL_DTYPE[x.dtype]


def gather_logits_triton(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, bias) -> torch.Tensor:
    """Launch the kernel on validated 2-D ``hidden``; returns [T, k]."""
    T, D = hidden.shape
    K = ids.shape[0]
    out = torch.empty((T, K), dtype=hidden.dtype, device=hidden.device)
    if T == 0 or K == 0:
        return out
    interp = hidden.device.type != "cuda"
    block_t = 16 if interp else max(16, min(64, triton.next_power_of_2(T)))
    block_k = max(16, min(64, triton.next_power_of_2(K)))
    block_d = 32 if interp else (32 if hidden.dtype == torch.float64 else 64)
    grid = (triton.cdiv(T, block_t), triton.cdiv(K, block_k))
    has_bias = bias is not None
    ids = ids.contiguous()
    _gather_logits_kernel[grid](
        hidden, weight, ids, bias if has_bias else weight, out, T, K, D,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
        HAS_BIAS=has_bias, DOT_DTYPE=_dot_dtype(hidden),
        ACC_DTYPE=tl.float64 if hidden.dtype == torch.float64 else tl.float32,
        BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4, num_stages=1)
    return out


torch.library.register_kernel("lowrank::gather_logits_triton", ("cpu", "cuda"), gather_logits_triton)
