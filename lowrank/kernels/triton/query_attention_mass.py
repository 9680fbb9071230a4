"""Triton query-row attention mass: ``mass[b,h,j] = Σ_i softmax_j(scale·q[b,h,i]·k[b,h/g,j])`` (causal).

Shapes: q [B, Hq, nq, d] (query row i at position offset + i), k [B, Hkv, n, d], Hq a multiple of Hkv; mass
[B, Hq, n] float32 (float64 for fp64). Implements ``lowrank::query_attention_mass_triton`` (schema in
csrc/registration.cpp; fake in lowrank/ops/query_attention_mass.py). Importing this module registers the CPU
(interpreter) and CUDA implementations.

Design: one program per (batch, head) owns that head's output row, so the column sums need no atomics. For each
block of BLOCK_Q query rows it makes two passes over the keys in BLOCK_N blocks: the first keeps the running row
max m and normaliser l (online softmax, as flash attention's forward does), the second recomputes the scores and
adds exp(s - m) / l, summed over the block's rows, into the output row. Only [BLOCK_Q, BLOCK_N] scores exist at
a time; the n×n (or nq×n) attention matrix never does. Scores accumulate in fp32 (fp64 for fp64). Recomputing
the scores in pass 2 costs one more q·kᵀ product (2·nq·n·d flops) instead of nq·n floats of storage.
"""
import torch
import triton
import triton.language as tl

__all__ = ["query_attention_mass_triton"]


@triton.jit
def _query_attention_mass_kernel(
    q_ptr, k_ptr, out_ptr,
    Hq, GROUP, NQ, N, D, OFFSET,
    scale,
    stride_qb, stride_qh, stride_qi, stride_kb, stride_kh, stride_kj,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // Hq
    h = pid % Hq
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    out_base = out_ptr + pid.to(tl.int64) * N
    offs_q = tl.arange(0, BLOCK_Q)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    for q0 in range(0, NQ, BLOCK_Q):
        rows = q0 + offs_q
        mask_q = rows < NQ
        q_tile = tl.load(q_base + rows.to(tl.int64)[:, None] * stride_qi + offs_d[None, :],
                         mask=mask_q[:, None] & mask_d[None, :], other=0.0)
        q_tile = (q_tile.to(ACC_DTYPE) * scale).to(DOT_DTYPE)
        pos = OFFSET + rows                                    # causal limit of each query row
        m = tl.full((BLOCK_Q,), float("-inf"), dtype=ACC_DTYPE)
        l = tl.zeros((BLOCK_Q,), dtype=ACC_DTYPE)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + offs_n
            k_t = tl.load(k_base + cols.to(tl.int64)[None, :] * stride_kj + offs_d[:, None],
                          mask=(cols < N)[None, :] & mask_d[:, None], other=0.0)
            s = tl.dot(q_tile, k_t.to(DOT_DTYPE), input_precision="ieee", out_dtype=ACC_DTYPE)
            ok = (cols[None, :] <= pos[:, None]) & mask_q[:, None]
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            # rows with nothing visible yet keep m = -inf; guard the rescale against (-inf) - (-inf)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
            m = m_new
        inv_l = tl.where(l > 0, 1.0 / tl.where(l > 0, l, 1.0), 0.0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + offs_n
            mask_n = cols < N
            k_t = tl.load(k_base + cols.to(tl.int64)[None, :] * stride_kj + offs_d[:, None],
                          mask=mask_n[None, :] & mask_d[:, None], other=0.0)
            s = tl.dot(q_tile, k_t.to(DOT_DTYPE), input_precision="ieee", out_dtype=ACC_DTYPE)
            ok = (cols[None, :] <= pos[:, None]) & mask_q[:, None]
            p = tl.where(ok, tl.exp(s - m_safe[:, None]) * inv_l[:, None], 0.0)
            acc = tl.load(out_base + cols, mask=mask_n, other=0.0)
            tl.store(out_base + cols, acc + tl.sum(p, axis=0), mask=mask_n)


_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
             torch.float16: tl.float16}


def query_attention_mass_triton(q: torch.Tensor, k: torch.Tensor, scale: float, offset: int) -> torch.Tensor:
    """Launch on validated q [B, Hq, nq, d], k [B, Hkv, n, d]; returns float32 (fp64 for fp64) [B, Hq, n]."""
    B, Hq, NQ, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    acc_torch = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros((B, Hq, N), dtype=acc_torch, device=q.device)
    if out.numel() == 0 or NQ == 0:
        return out
    q = q if q.stride(3) == 1 else q.contiguous()
    k = k if k.stride(3) == 1 else k.contiguous()
    interp = q.device.type != "cuda"
    # The interpreter upcasts bf16 dot operands (its bf16 tl.dot is wrong); fp16 too, for numpy's sake.
    dot = tl.float32 if (interp and q.dtype in (torch.bfloat16, torch.float16)) else _TL_DTYPE[q.dtype]
    block_d = max(16, triton.next_power_of_2(D))
    block_q = 16 if interp else max(16, min(64, triton.next_power_of_2(NQ)))
    block_n = 32 if interp else (32 if q.dtype == torch.float64 else 64)
    _query_attention_mass_kernel[(B * Hq,)](
        q, k, out, Hq, Hq // Hkv, NQ, N, D, offset, float(scale),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        DOT_DTYPE=dot, ACC_DTYPE=tl.float64 if q.dtype == torch.float64 else tl.float32,
        BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=1)
    return out


torch.library.register_kernel("lowrank::query_attention_mass_triton", ("cpu", "cuda"), query_attention_mass_triton)
