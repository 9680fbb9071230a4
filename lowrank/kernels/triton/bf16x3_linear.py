"""Triton fp32 linear from bf16 halves: ``y = x_hi·W_hiᵀ + x_hi·W_loᵀ + x_lo·W_hiᵀ + b``.

Shapes: x [T, in] float32 (rows may be strided), weight [out, in] float32, bias [out] or None; y [T, out] float32
(GELU(y), erf form, for activation "gelu"; for "swiglu" weight = [gate; up] and y = silu(y_gate)·y_up [T, out/2]).
Implements ``lowrank::bf16x3_linear_triton`` (schema in csrc/registration.cpp; fake and autograd in
lowrank/ops/bf16x3_linear.py). Importing this module registers the CPU (interpreter) and CUDA implementations.

Design: one program per (BLOCK_T × BLOCK_N) output tile; for each BLOCK_K slice both operand tiles are loaded once
in fp32 and split in registers (hi = bf16(v), lo = bf16(v − hi), lo = 0 where v − hi is not finite; the rounding is done
on the bit pattern), then three
``tl.dot`` accumulate into one fp32 tile. On a GPU the dots take bf16 operands (tensor cores); under the CPU
interpreter, whose bf16 ``tl.dot`` is wrong, the halves are widened back to fp32 first, which computes the same
exact products.
"""
import torch
import triton
import triton.language as tl

__all__ = ["bf16x3_linear_triton"]


@triton.jit
def _round_bf16(v):
    # fp32 → the nearest bf16 (ties to even), as fp32: integer rounding of the bit pattern, because the CPU
    # interpreter's float → bf16 cast truncates and mangles subnormals. NaN is kept as it is.
    u = v.to(tl.uint32, bitcast=True)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return tl.where(v != v, v, r.to(tl.float32, bitcast=True))


@triton.jit
def _halves(v, DOT_DTYPE: tl.constexpr):
    hi = _round_bf16(v)
    d = v - hi
    d = tl.where((d == d) & (tl.abs(d) < float("inf")), d, 0.0)
    # both halves hold bf16 values exactly, so the cast to the dot's dtype is exact
    return hi.to(DOT_DTYPE), _round_bf16(d).to(DOT_DTYPE)


@triton.jit
def _split_dots(acc, x_hi, x_lo, w_t, DOT_DTYPE: tl.constexpr):
    w_hi, w_lo = _halves(w_t, DOT_DTYPE)
    acc = tl.dot(x_hi, w_lo, acc, input_precision="ieee", out_dtype=tl.float32)
    acc = tl.dot(x_lo, w_hi, acc, input_precision="ieee", out_dtype=tl.float32)
    return tl.dot(x_hi, w_hi, acc, input_precision="ieee", out_dtype=tl.float32)


@triton.jit
def _bf16x3_linear_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    T, N, K,
    stride_xt, stride_xk, stride_wn, stride_wk, stride_yt,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # ACT: 0 none, 1 gelu, 2 swiglu (N = output features H; the up rows of W start at row H)
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_t = offs_t < T
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + kk[None, :] * stride_xk,
                    mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        x_hi, x_lo = _halves(x, DOT_DTYPE)
        w_cols = kk[:, None] * stride_wk + offs_n.to(tl.int64)[None, :] * stride_wn      # Wᵀ tile [BK, BN]
        w_mask = mask_k[:, None] & mask_n[None, :]
        acc = _split_dots(acc, x_hi, x_lo, tl.load(w_ptr + w_cols, mask=w_mask, other=0.0), DOT_DTYPE)
        if ACT == 2:
            w_up = tl.load(w_ptr + N.to(tl.int64) * stride_wn + w_cols, mask=w_mask, other=0.0)
            acc_up = _split_dots(acc_up, x_hi, x_lo, w_up, DOT_DTYPE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if ACT == 2:
            acc_up += tl.load(bias_ptr + N + offs_n, mask=mask_n, other=0.0)[None, :]
    if ACT == 1:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    if ACT == 2:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    tl.store(y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_n[None, :], acc,
             mask=mask_t[:, None] & mask_n[None, :])


def bf16x3_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias, activation: str) -> torch.Tensor:
    """Launch the kernel on validated 2-D float32 ``x``; returns [T, out] ([T, out / 2] for "swiglu")."""
    T, K = x.shape
    N = weight.shape[0] // 2 if activation == "swiglu" else weight.shape[0]
    y = torch.empty((T, N), dtype=torch.float32, device=x.device)
    if T == 0 or N == 0:
        return y
    if K == 0:
        from lowrank.reference.bf16x3_linear import activate

        z = bias.expand(T, weight.shape[0]) if bias is not None else x.new_zeros(T, weight.shape[0])
        return y.copy_(activate(z, activation))
    interp = x.device.type != "cuda"
    block_t = 16 if interp else 64
    block_n = 16 if interp else 64
    block_k = 32
    grid = (triton.cdiv(T, block_t), triton.cdiv(N, block_n))
    has_bias = bias is not None
    _bf16x3_linear_kernel[grid](
        x, weight, bias if has_bias else weight, y, T, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0),
        HAS_BIAS=has_bias, ACT={"none": 0, "gelu": 1, "swiglu": 2}[activation],
        DOT_DTYPE=tl.float32 if interp else tl.bfloat16,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=1 if interp else 3)
    return y


torch.library.register_kernel("lowrank::bf16x3_linear_triton", ("cpu", "cuda"), bf16x3_linear_triton)
