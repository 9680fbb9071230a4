"""Triton forward of the multi-adapter LoRA linear (SGMV shrink + BGMV-style fused expand).

    y_t = x_t·Wᵀ + b + s_a·(x_t·A_a[:r_a]ᵀ)·B_a[:, :r_a]ᵀ,    a = adapter of token t (none: base only)

Shapes: x [..., in] (flattened to [T, in]), weight W [out, in], bias [out] or None, lora_a A [n, r, in],
lora_b B [n, out, r], scaling [n] fp64, perm [T] / offsets [n + 1] int64 (lowrank.ops.AdapterSegments),
ranks [n] or None. Implements ``lowrank::multi_lora_linear_triton`` (schema in csrc/registration.cpp; fake and
autograd in lowrank/ops/multi_lora_linear.py, whose backward is ``lowrank::multi_lora_linear_backward``).

Two launches:
  1. ``_mlora_shrink_kernel``, grid (n, ⌈T/BLOCK_M⌉, ⌈r/BLOCK_R⌉): program (a, m, j) takes rows
     offsets[a] + m·BLOCK_M … of adapter a's segment (programs past the segment's end return at once), gathers
     those tokens' rows of x through perm inside its loads (no gathered copy), forms s_a·x·A_aᵀ with tl.dot in
     fp32 (fp64 for fp64) and scatters the result into h [T, r] in token order, with zeros beyond r_a; it also
     writes each token's adapter into aid [T] (-1 stays for tokens without one).
  2. ``_mlora_fwd_kernel``, one program per (BLOCK_M × BLOCK_N) tile of y in token order: the base product x·Wᵀ
     over K with tl.dot, then the per-token epilogue acc[m, :] += Σ_k h[m, k]·B[aid[m], :, k] (a BGMV: each row
     reads its own adapter's B column, masked to k < r_aid), the bias, one cast and one store. y is written once,
     no output-sized temporary.
Precision: tl.dot with input_precision="ieee"; on CPU tensors (the interpreter) bf16/fp16 operands are upcast to
fp32 first (the interpreter's 16-bit tl.dot is wrong), as in kernels/triton/lora_linear.py.
"""
import torch
import triton
import triton.language as tl

from lowrank.kernels.triton._tiles import dot_rows

__all__ = ["multi_lora_linear_triton"]


@triton.jit
def _mlora_shrink_kernel(
    x_ptr, a_ptr, s_ptr, perm_ptr, off_ptr, ranks_ptr, h_ptr, aid_ptr,
    K, R,
    stride_xt, stride_xk, stride_an, stride_ar, stride_ak, stride_ht, stride_hr,
    HAS_RANKS: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h[perm[i], k] = s_a·Σ x[perm[i], :]·A[a, k, :] for one BLOCK_M slice of adapter a's segment."""
    a = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(2)
    begin = tl.load(off_ptr + a)
    end = tl.load(off_ptr + a + 1)
    start = begin + pid_m * BLOCK_M
    if start < end:
        rank = tl.load(ranks_ptr + a) if HAS_RANKS else R
        offs_i = start + tl.arange(0, BLOCK_M)
        mask_m = offs_i < end
        tok = tl.load(perm_ptr + offs_i, mask=mask_m, other=0)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        rows_x = tok.to(tl.int64) * stride_xt
        a_base = a.to(tl.int64) * stride_an
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
        acc = dot_rows(acc, x_ptr, rows_x, mask_m, stride_xk, a_ptr + a_base, offs_r.to(tl.int64) * stride_ar,
                       mask_r, stride_ak, K, DOT_DTYPE, ACC_DTYPE, BLOCK_K)
        s = tl.load(s_ptr + a).to(ACC_DTYPE)
        h_ptrs = h_ptr + tok.to(tl.int64)[:, None] * stride_ht + offs_r[None, :] * stride_hr
        tl.store(h_ptrs, acc * s, mask=mask_m[:, None] & (offs_r[None, :] < R))
        if pid_r == 0:
            tl.store(aid_ptr + tok, tl.zeros((BLOCK_M,), dtype=tl.int64) + a, mask=mask_m)


@triton.jit
def _mlora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, aid_ptr, ranks_ptr, b_ptr, y_ptr,
    T, N, K, R,
    stride_xt, stride_xk, stride_wn, stride_wk, stride_bias, stride_ht, stride_hr,
    stride_bn, stride_bo, stride_br, stride_yt, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y tile = x·Wᵀ + b + per-row h·B[aid]ᵀ (h already scaled and zero beyond each adapter's rank)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < T
    mask_n = offs_n < N
    rows_x = offs_m.to(tl.int64) * stride_xt
    rows_w = offs_n.to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc = dot_rows(acc, x_ptr, rows_x, mask_m, stride_xk, w_ptr, rows_w, mask_n, stride_wk, K,
                   DOT_DTYPE, ACC_DTYPE, BLOCK_K)

    # BGMV epilogue: each row reads its own adapter's B, only over that adapter's true rank.
    aid = tl.load(aid_ptr + offs_m, mask=mask_m, other=-1)
    has = aid >= 0
    safe = tl.where(has, aid, 0)
    rank = tl.load(ranks_ptr + safe, mask=has, other=0) if HAS_RANKS else tl.where(has, R, 0)
    b_rows = safe.to(tl.int64)[:, None] * stride_bn + offs_n.to(tl.int64)[None, :] * stride_bo
    for k in range(0, R):
        use = has & (k < rank)
        hk = tl.load(h_ptr + offs_m.to(tl.int64) * stride_ht + k * stride_hr, mask=mask_m & use, other=0.0)
        bk = tl.load(b_ptr + b_rows + k * stride_br, mask=use[:, None] & mask_n[None, :], other=0.0)
        acc += hk.to(ACC_DTYPE)[:, None] * bk.to(ACC_DTYPE)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_yt + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
             torch.float16: tl.float16}


def _config(device_type: str, dtype: torch.dtype) -> dict:
    if device_type != "cuda":
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 16, "num_warps": 4, "num_stages": 1}
    wide = dtype in (torch.float32, torch.float64)
    return {"BLOCK_M": 64, "BLOCK_N": 64 if dtype == torch.float64 else 128, "BLOCK_K": 16 if wide else 64,
            "BLOCK_R": 16, "num_warps": 4, "num_stages": 2 if wide else 3}


def multi_lora_linear_triton(x, weight, bias, lora_a, lora_b, scaling, perm, offsets, ranks, *,
                             blocks: dict | None = None) -> torch.Tensor:
    """Run the two kernels; arguments are validated by ``lowrank.ops.multi_lora_linear``."""
    out_features, in_features = weight.shape
    n, rank = lora_a.shape[:2]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    tokens = x2.shape[0]
    if tokens == 0:
        return x.new_empty((*lead, out_features))
    cfg = _config(x.device.type, x.dtype)
    cfg.update(blocks or {})
    launch = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    dot_dtype = tl.float32 if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)) \
        else _TL_DTYPE[x.dtype]
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc_dtype = _TL_DTYPE[acc_torch]
    has_ranks = ranks is not None
    rk = ranks if has_ranks else offsets  # unused pointer when HAS_RANKS is False

    h = torch.zeros((tokens, rank), dtype=acc_torch, device=x.device)
    aid = torch.full((tokens,), -1, dtype=torch.int64, device=x.device)
    grid_h = (n, triton.cdiv(tokens, cfg["BLOCK_M"]), triton.cdiv(rank, cfg["BLOCK_R"]))
    _mlora_shrink_kernel[grid_h](
        x2, lora_a, scaling, perm, offsets, rk, h, aid, in_features, rank,
        x2.stride(0), x2.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), h.stride(0), h.stride(1),
        HAS_RANKS=has_ranks, DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"], **launch)

    y = torch.empty((tokens, out_features), dtype=x.dtype, device=x.device)
    has_bias = bias is not None
    grid_y = (triton.cdiv(tokens, cfg["BLOCK_M"]), triton.cdiv(out_features, cfg["BLOCK_N"]))
    _mlora_fwd_kernel[grid_y](
        x2, weight, bias if has_bias else weight, h, aid, rk, lora_b, y,
        tokens, out_features, in_features, rank,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), bias.stride(0) if has_bias else 0,
        h.stride(0), h.stride(1), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0), y.stride(1),
        HAS_BIAS=has_bias, HAS_RANKS=has_ranks, DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], **launch)
    return y.view(*lead, out_features)


def _impl(x, weight, bias, lora_a, lora_b, scaling, perm, offsets, ranks):
    return multi_lora_linear_triton(x, weight, bias, lora_a, lora_b, scaling, perm, offsets, ranks)


torch.library.register_kernel("lowrank::multi_lora_linear_triton", ("cpu", "cuda"), _impl)
