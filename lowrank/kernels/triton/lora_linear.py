"""Triton forward of the fused LoRA linear: ``y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ``.

Shapes: x [..., in] (flattened to [T, in], any strides), weight W [out, in], bias b [out] or None,
lora_a A [r, in], lora_b B [out, r], scaling s; y [..., out] in x's dtype. Implements the op
``lowrank::lora_linear_triton`` (schema in csrc/registration.cpp; fake and autograd in lowrank/ops/lora_linear.py,
whose backward calls ``lowrank::lora_linear_backward``). Importing this module registers the CPU (Triton
interpreter) and CUDA implementations.

Design: two launches.
  1. ``_lora_shrink_kernel``: h = x·Aᵀ [T, r], accumulated and stored in fp32 (fp64 for fp64 inputs). One program
     per (BLOCK_M tokens × BLOCK_R ranks) tile, K-loop over ``in``. h is T·r elements, tiny next to y (r ≪ out).
  2. ``_lora_linear_fwd_kernel``: one program per (BLOCK_M × BLOCK_N) tile of y. It accumulates the base product
     x·Wᵀ over K = in in fp32, then runs the LoRA epilogue as a second, short K-loop over r:
     acc += (s·h_tile)·B_tileᵀ, adds the bias, casts once and stores. y is written exactly once and no
     output-sized temporary exists (an unfused layer writes and re-reads two [T, out] tensors).
Why not recompute h inside every output tile (one launch)? That repeats T·in·r work once per output tile, i.e.
r/BLOCK_N extra work on top of the base GEMM (2× at r = 256, BLOCK_N = 128); computing h once costs one small
launch and a T·r round trip instead. Why h in fp32: the fp32 path keeps full precision, and on 16-bit inputs s is
folded in before h is rounded to the MMA operand dtype once (the unfused reference rounds h, the LoRA product, the
scaled product and the sum).

Precision: every tl.dot uses input_precision="ieee", so fp32 inputs are not silently run at TF32 (torch's
default for matmul is full fp32 too). 16-bit operands go to the MMA natively on CUDA. Under the interpreter
(CPU tensors) tl.dot on bf16 operands is wrong, so for CPU tensors bf16 operands are upcast to fp32 before each
dot; the choice is a constexpr derived from the tensor's device, never from an environment variable.
fp64 is supported end to end (tl.dot on fp64 accumulates in fp64; the scaling is passed as an fp64 scalar).

Row offsets are computed in int64 so that T·stride may exceed 2³¹. Block sizes are constexpr: small ones for the
interpreter (cost grows with the number of programs and the tile size, tests use tiny shapes), and a size
heuristic on CUDA (no autotuning: the choice is deterministic and cheap for the ever-changing token count).
"""
import torch
import triton
import triton.language as tl

from lowrank.kernels.triton._tiles import dot_rows

__all__ = ["lora_linear_triton"]


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr,
    T, K, R,
    stride_xt, stride_xk, stride_ar, stride_ak, stride_ht, stride_hr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h[t, j] = sum_k x[t, k]·A[j, k] for one (BLOCK_M × BLOCK_R) tile of h."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < T
    mask_r = offs_r < R
    rows_x = offs_m.to(tl.int64) * stride_xt
    rows_a = offs_r.to(tl.int64) * stride_ar

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    acc = dot_rows(acc, x_ptr, rows_x, mask_m, stride_xk, a_ptr, rows_a, mask_r, stride_ak, K,
                   DOT_DTYPE, ACC_DTYPE, BLOCK_K)

    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_ht + offs_r[None, :] * stride_hr
    tl.store(h_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_linear_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, y_ptr,
    T, N, K, R,
    scaling: tl.float64,
    stride_xt, stride_xk, stride_wn, stride_wk, stride_bias,
    stride_ht, stride_hr, stride_bn, stride_br, stride_yt, stride_yn,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y tile = x·Wᵀ + (s·h)·Bᵀ + b for one (BLOCK_M × BLOCK_N) tile; h = x·Aᵀ comes from the shrink kernel."""
    # Grouped tile order: GROUP_M consecutive row tiles sweep the columns together, so the W columns a program
    # loads are still in L2 when the neighbouring row tiles need them.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(T, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < T
    mask_n = offs_n < N
    rows_x = offs_m.to(tl.int64) * stride_xt
    rows_w = offs_n.to(tl.int64) * stride_wn

    # Base GEMM: acc = x·Wᵀ over K = in.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc = dot_rows(acc, x_ptr, rows_x, mask_m, stride_xk, w_ptr, rows_w, mask_n, stride_wk, K,
                   DOT_DTYPE, ACC_DTYPE, BLOCK_K)

    # LoRA epilogue: acc += (s·h)·Bᵀ, a K-loop over the rank.
    s = tl.full((), scaling, ACC_DTYPE)  # fp64 arg; tl.full keeps its precision under the interpreter too
    rows_h = offs_m.to(tl.int64) * stride_ht
    rows_b = offs_n.to(tl.int64) * stride_bn
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < R
        h_tile = tl.load(h_ptr + rows_h[:, None] + rr[None, :] * stride_hr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b_t_tile = tl.load(b_ptr + rr[:, None] * stride_br + rows_b[None, :],           # Bᵀ tile [BLOCK_R, BLOCK_N]
                           mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot((h_tile * s).to(DOT_DTYPE), b_t_tile.to(DOT_DTYPE), acc,
                     input_precision="ieee", out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_yt + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
             torch.float16: tl.float16}


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _config(device_type: str, dtype: torch.dtype, t: int, n: int, r: int) -> dict:
    """Block sizes and launch options. Every block is >= 16 (the smallest tl.dot tile on NVIDIA)."""
    if device_type != "cuda":
        # Interpreter: tiny tiles keep numpy work per program small on test-sized problems.
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 16, "GROUP_M": 4,
                "num_warps": 4, "num_stages": 1}
    wide = dtype in (torch.float32, torch.float64)
    block_m = _pow2_at_least(t, 16, 64 if dtype == torch.float64 else 128)
    block_n = 64 if (dtype == torch.float64 or n <= 64) else 128
    return {"BLOCK_M": block_m, "BLOCK_N": block_n,
            "BLOCK_K": 16 if dtype == torch.float64 else (32 if wide else 64),
            "BLOCK_R": _pow2_at_least(r, 16, 64), "GROUP_M": 8,
            "num_warps": 8 if block_m * block_n >= 128 * 128 else 4, "num_stages": 2 if wide else 3}


def _dot_dtype(x: torch.Tensor):
    # The Triton interpreter (CPU tensors) computes bf16 tl.dot wrongly; upcast those operands to fp32 there.
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return tl.float32
    return _TL_DTYPE[x.dtype]


def lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       scaling: float, *, blocks: dict | None = None) -> torch.Tensor:
    """Run the two kernels. Arguments are validated by ``lowrank.ops.lora_linear``; ``blocks`` overrides
    ``_config`` entries (tests use it to force multi-iteration loops on small shapes)."""
    out_features, in_features = weight.shape
    rank = lora_a.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)               # a view whenever the leading dims can be flattened
    tokens = x2.shape[0]
    if tokens == 0:
        return x.new_empty((*lead, out_features))

    cfg = _config(x.device.type, x.dtype, tokens, out_features, rank)
    cfg.update(blocks or {})
    launch = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    dot_dtype = _dot_dtype(x)
    acc_dtype = tl.float64 if x.dtype == torch.float64 else tl.float32
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32

    h = torch.empty((tokens, rank), dtype=acc_torch, device=x.device)
    grid_h = (triton.cdiv(tokens, cfg["BLOCK_M"]), triton.cdiv(rank, cfg["BLOCK_R"]))
    _lora_shrink_kernel[grid_h](
        x2, lora_a, h, tokens, in_features, rank,
        x2.stride(0), x2.stride(1), lora_a.stride(0), lora_a.stride(1), h.stride(0), h.stride(1),
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"], **launch)

    y = torch.empty((tokens, out_features), dtype=x.dtype, device=x.device)
    grid_y = (triton.cdiv(tokens, cfg["BLOCK_M"]) * triton.cdiv(out_features, cfg["BLOCK_N"]),)
    has_bias = bias is not None
    _lora_linear_fwd_kernel[grid_y](
        x2, weight, bias if has_bias else weight, h, lora_b, y,
        tokens, out_features, in_features, rank, float(scaling),
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), bias.stride(0) if has_bias else 0,
        h.stride(0), h.stride(1), lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=has_bias, DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, **cfg, **launch)
    return y.view(*lead, out_features)


def _impl(x, weight, bias, lora_a, lora_b, scaling):
    return lora_linear_triton(x, weight, bias, lora_a, lora_b, scaling)


torch.library.register_kernel("lowrank::lora_linear_triton", ("cpu", "cuda"), _impl)
