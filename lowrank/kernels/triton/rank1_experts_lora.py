"""Triton forward of the mixture of rank-1 experts LoRA (specification: lowrank/reference/rank1_experts_lora.py).

    y_t = x_t·Wᵀ + b + s·Σ_{e ∈ topk(t)} g_te·h_te·b_e,   h = x·Aᵀ [T, E],  z = x·Rᵀ (gate "router")

Shapes: x [T, in] (flattened by the caller, any strides), weight [out, in], bias [out] or None, lora_a [E, in],
lora_b [out, E], router [E, in] / router_bias [E] or None. Implements ``lowrank::rank1_experts_lora_triton`` (schema
in csrc/registration.cpp; fake and autograd in lowrank/ops/rank1_experts_lora.py, whose backward calls
``lowrank::rank1_experts_lora_backward``). Importing this module registers the CPU (interpreter) and CUDA
implementations. Returns (y, indices [T, k] int64, gates [T, k], act [T, E or 2E]) like the C++ op.

Design: two launches.
  1. ``_rank1_gate_kernel``: per BLOCK_T tokens, h and z as two tl.dot K-loops (accumulated in fp32, fp64 for
     fp64) over all E experts in registers, stored to act; then the top-k in registers: k rounds of a row max, the
     lowest index among equal maxima (the selection rule), and masking of the winner. Gates and u = s·g·h_sel go
     to [T, k] buffers (u in fp32/fp64).
  2. ``_rank1_linear_kernel``: one program per (BLOCK_T × BLOCK_N) tile of y: the base product over K = in, then
     the sparse expand in the epilogue: for each of the k slots, gather B[n, e_tj] for the tile's tokens and add
     u_tj·B[n, e_tj]. y is written once; the k-of-E expand costs T·k·out and no output-sized pass.
Precision: tl.dot with input_precision="ieee"; under the interpreter bf16 dots are computed wrongly, so CPU
tensors upcast bf16 operands to fp32 (a constexpr from the device, as in the other Triton kernels here).
"""
import torch
import triton
import triton.language as tl

from lowrank.kernels.triton._tiles import dot_rows

__all__ = ["rank1_experts_lora_triton"]


@triton.jit
def _rank1_gate_kernel(
    x_ptr, a_ptr, r_ptr, rb_ptr, act_ptr, idx_ptr, g_ptr, u_ptr,
    T, K, E, TOPK,
    scaling: tl.float64, inv_temp: tl.float64, threshold: tl.float64,
    stride_xt, stride_xk, stride_ae, stride_ak, stride_re, stride_rk, stride_act,
    ROUTER: tl.constexpr, HAS_RB: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    mask_t = offs_t < T
    mask_e = offs_e < E
    rows_x = offs_t.to(tl.int64) * stride_xt
    h = tl.zeros((BLOCK_T, BLOCK_E), dtype=ACC_DTYPE)
    z = tl.zeros((BLOCK_T, BLOCK_E), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        xt = tl.load(x_ptr + rows_x[:, None] + kk[None, :] * stride_xk, mask=mask_t[:, None] & mask_k[None, :],
                     other=0.0).to(DOT_DTYPE)
        at = tl.load(a_ptr + kk[:, None] * stride_ak + offs_e[None, :] * stride_ae,
                     mask=mask_k[:, None] & mask_e[None, :], other=0.0).to(DOT_DTYPE)
        h = tl.dot(xt, at, h, input_precision="ieee", out_dtype=ACC_DTYPE)
        if ROUTER:
            rt = tl.load(r_ptr + kk[:, None] * stride_rk + offs_e[None, :] * stride_re,
                         mask=mask_k[:, None] & mask_e[None, :], other=0.0).to(DOT_DTYPE)
            z = tl.dot(xt, rt, z, input_precision="ieee", out_dtype=ACC_DTYPE)
    act_rows = act_ptr + offs_t.to(tl.int64)[:, None] * stride_act
    mask_te = mask_t[:, None] & mask_e[None, :]
    tl.store(act_rows + offs_e[None, :], h, mask=mask_te)
    neg_inf = float("-inf")
    if ROUTER:
        tl.store(act_rows + E + offs_e[None, :], z, mask=mask_te)
        p = 1.0 / (1.0 + tl.exp(-z))
        sel = p
        if HAS_RB:
            sel = sel + tl.load(rb_ptr + offs_e, mask=mask_e, other=0.0).to(ACC_DTYPE)[None, :]
        score = p
    else:
        r = tl.maximum(tl.sqrt(tl.sum(h * h, axis=1)), 1e-12)
        n = h / r[:, None]
        sel = n
        score = (n / (1.0 / inv_temp)).to(ACC_DTYPE)   # n / temperature, as the reference divides
    sel = tl.where(mask_e[None, :], sel, neg_inf)
    # Pass 1: the k winners in order; their raw gate terms and h values go to the [T, k] buffers.
    rows_k = offs_t.to(tl.int64) * TOPK
    total = tl.zeros((BLOCK_T,), dtype=ACC_DTYPE)
    top = tl.zeros((BLOCK_T,), dtype=ACC_DTYPE)
    for j in range(0, TOPK):
        m = tl.max(sel, axis=1)
        win = tl.min(tl.where(sel == m[:, None], offs_e[None, :], BLOCK_E), axis=1)   # ties: lower index
        hit = offs_e[None, :] == win[:, None]
        s_w = tl.sum(tl.where(hit, score, 0.0), axis=1)
        h_w = tl.sum(tl.where(hit, h, 0.0), axis=1)
        if ROUTER:
            term = s_w.to(ACC_DTYPE)
        else:
            if j == 0:
                top = s_w
            term = tl.exp((s_w - top).to(ACC_DTYPE))
        total += term
        tl.store(idx_ptr + rows_k + j, win.to(tl.int64), mask=mask_t)
        tl.store(g_ptr + rows_k + j, term, mask=mask_t)
        tl.store(u_ptr + rows_k + j, h_w, mask=mask_t)
        sel = tl.where(hit, neg_inf, sel)
    tl.debug_barrier()
    # Pass 2: normalise, prune, and form u = s·g·h_sel.
    for j in range(0, TOPK):
        g = tl.load(g_ptr + rows_k + j, mask=mask_t, other=0.0) / total
        if HAS_THRESHOLD:
            g = tl.where(g < threshold, 0.0, g)
        hw = tl.load(u_ptr + rows_k + j, mask=mask_t, other=0.0)
        tl.store(g_ptr + rows_k + j, g.to(ACC_DTYPE), mask=mask_t)
        tl.store(u_ptr + rows_k + j, (scaling * g * hw).to(ACC_DTYPE), mask=mask_t)


@triton.jit
def _rank1_linear_kernel(
    x_ptr, w_ptr, bias_ptr, b_ptr, idx_ptr, u_ptr, y_ptr,
    T, N, K, TOPK,
    stride_xt, stride_xk, stride_wn, stride_wk, stride_bn, stride_be, stride_yt,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_t = offs_t < T
    mask_n = offs_n < N
    rows_x = offs_t.to(tl.int64) * stride_xt
    rows_w = offs_n.to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC_DTYPE)
    acc = dot_rows(acc, x_ptr, rows_x, mask_t, stride_xk, w_ptr, rows_w, mask_n, stride_wk, K,
                   DOT_DTYPE, ACC_DTYPE, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    rows_k = offs_t.to(tl.int64) * TOPK
    mask_tn = mask_t[:, None] & mask_n[None, :]
    for j in range(0, TOPK):
        e = tl.load(idx_ptr + rows_k + j, mask=mask_t, other=0)
        u = tl.load(u_ptr + rows_k + j, mask=mask_t, other=0.0)
        b = tl.load(b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + e[:, None] * stride_be, mask=mask_tn,
                    other=0.0)
        acc += u[:, None] * b.to(ACC_DTYPE)
    tl.store(y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_tn)


_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
             torch.float16: tl.float16}


def _dot_dtype(x: torch.Tensor):
    # The interpreter (CPU tensors) computes bf16 tl.dot wrongly: upcast those operands to fp32 there.
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPE[x.dtype]


def rank1_experts_lora_triton(x, weight, bias, lora_a, lora_b, router, router_bias, top_k: int, scaling: float,
                              gate: str, temperature: float, threshold):
    """Launch both kernels on validated arguments; returns (y [..., out], indices, gates, act)."""
    in_, out, E = weight.shape[1], weight.shape[0], lora_a.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_)
    T = x2.shape[0]
    use_router = gate == "router"
    gd = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    act = torch.empty((T, 2 * E if use_router else E), dtype=gd, device=dev)
    idx = torch.empty((T, top_k), dtype=torch.int64, device=dev)
    gates = torch.empty((T, top_k), dtype=gd, device=dev)
    u = torch.empty((T, top_k), dtype=gd, device=dev)
    y = torch.empty((T, out), dtype=x.dtype, device=dev)
    if T > 0:
        interp = dev.type != "cuda"
        acc = tl.float64 if gd == torch.float64 else tl.float32
        dot = _dot_dtype(x)
        block_e = max(16, triton.next_power_of_2(E))
        block_t = 16 if interp or block_e > 128 else 32
        r = router if use_router else lora_a
        has_rb = use_router and router_bias is not None
        rb = router_bias.to(gd).contiguous() if has_rb else act
        _rank1_gate_kernel[(triton.cdiv(T, block_t),)](
            x2, lora_a, r, rb, act, idx, gates, u, T, in_, E, top_k,
            float(scaling), 1.0 / float(temperature), float(threshold) if threshold is not None else 0.0,
            x2.stride(0), x2.stride(1), lora_a.stride(0), lora_a.stride(1), r.stride(0), r.stride(1),
            act.stride(0),
            ROUTER=use_router, HAS_RB=has_rb, HAS_THRESHOLD=threshold is not None, DOT_DTYPE=dot, ACC_DTYPE=acc,
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=32, num_warps=4, num_stages=1)
        bt, bn = (16, 32) if interp else (64, 128 if x.dtype != torch.float64 else 64)
        _rank1_linear_kernel[(triton.cdiv(T, bt), triton.cdiv(out, bn))](
            x2, weight, bias if bias is not None else weight, lora_b, idx, u, y, T, out, in_, top_k,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), lora_b.stride(0), lora_b.stride(1),
            y.stride(0),
            HAS_BIAS=bias is not None, DOT_DTYPE=dot, ACC_DTYPE=acc, BLOCK_T=bt, BLOCK_N=bn,
            BLOCK_K=32, num_warps=4, num_stages=1 if interp else 3)
    return (y.reshape(*lead, out), idx.reshape(*lead, top_k), gates.reshape(*lead, top_k), act)


torch.library.register_kernel("lowrank::rank1_experts_lora_triton", ("cpu", "cuda"), rank1_experts_lora_triton)
