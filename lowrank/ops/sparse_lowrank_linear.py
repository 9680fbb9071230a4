"""Sparse-plus-low-rank linear (SLTrain, LOST): ``y = x·Aᵀ·Bᵀ + x·Sᵀ + b`` with W = B·A + S never formed.

Shapes: x [..., in] (leading dims flattened into tokens, possibly zero tokens), lora_a A [r, in],
lora_b B [out, r] (0 ≤ r ≤ min(in, out)), s_values [nnz] (S's nonzeros in the CSR order of ``s_layout``),
s_layout a :class:`~lowrank.ops.SparseLayout` of shape (out, in) on x's device, bias b [out] or None. One
floating dtype.

Ops (schemas in csrc/registration.cpp):
  * ``lowrank::sparse_lowrank_linear``: forward; C++ kernels for CPU (csrc/cpu/sparse_lowrank_linear.cpp) and
    CUDA (csrc/cuda/sparse_lowrank_linear.cu).
  * ``lowrank::sparse_lowrank_linear_backward``: (dx, dA, dB, d s_values) under an output mask:
        gB = g·B,  dx = gB·A + g·S,  dA = gBᵀ·x,  dB = gᵀ·(x·Aᵀ),  d s_values[k] = Σ_t g[t, row_k]·x[t, col_k]
    (the last is a sampled dense-dense product over the nnz support only; no [out, in] gradient exists).
  * ``lowrank::sparse_lowrank_linear_triton``: the forward with x·Sᵀ in a Triton kernel
    (kernels/triton/sparse_lowrank_linear.py); its backward is the C++/CUDA backward op.
This module holds their fakes and autograd. The backward saves x, the factors, the values and the (shared, not
copied) index tensors; h = x·Aᵀ is recomputed there rather than kept alive across the forward pass.
"""
from __future__ import annotations

import torch

from lowrank.ops._backends import Backend, check_like_x, has_kernel, select, triton_reasons
from lowrank.ops.sparse_layout import SparseLayout
from lowrank.reference import sparse_lowrank_linear as _reference_impl

__all__ = ["sparse_lowrank_linear", "BACKENDS"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---- fake (meta) implementations -------------------------------------------------------------------------
def _fake_forward(x, lora_a, lora_b, s_values, row_ptr, col_idx, col_ptr, row_idx, perm, bias):
    return x.new_empty((*x.shape[:-1], lora_b.shape[0]))


torch.library.register_fake("lowrank::sparse_lowrank_linear")(_fake_forward)
torch.library.register_fake("lowrank::sparse_lowrank_linear_triton")(_fake_forward)


@torch.library.register_fake("lowrank::sparse_lowrank_linear_backward")
def _fake_backward(grad_out, x, lora_a, lora_b, s_values, row_ptr, col_idx, col_ptr, row_idx, perm,
                   output_mask):
    shapes = (x.shape, lora_a.shape, lora_b.shape, s_values.shape)
    return tuple(x.new_empty(s) if m else None for s, m in zip(shapes, output_mask))


# ---- autograd ----------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, lora_a, lora_b, s_values, row_ptr, col_idx, col_ptr, row_idx, perm, bias = inputs
    ctx.save_for_backward(x, lora_a, lora_b, s_values, row_ptr, col_idx, col_ptr, row_idx, perm)


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2], need[3]]
    dx, da, db, dv = torch.ops.lowrank.sparse_lowrank_linear_backward(grad, *saved, mask)
    dbias = grad.reshape(-1, grad.shape[-1]).sum(0) if need[9] else None
    return dx, da, db, dv, None, None, None, None, None, dbias


torch.library.register_autograd("lowrank::sparse_lowrank_linear", _backward, setup_context=_setup_context)
torch.library.register_autograd("lowrank::sparse_lowrank_linear_triton", _backward,
                                setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("sparse_lowrank_linear: double backward (create_graph=True) is not implemented "
                              "by the kernels; use backend='torch' for higher-order gradients")


torch.library.register_autograd("lowrank::sparse_lowrank_linear_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ---- backends ----------------------------------------------------------------------------------------------
def _triton_probe(device_type: str) -> tuple[str, ...]:
    reasons = triton_reasons(device_type)
    if not reasons:
        import lowrank.kernels.triton.sparse_lowrank_linear  # noqa: F401  (registers the kernel)
    return reasons


def _compiled(op):
    def call(x, lora_a, lora_b, s_values, s_layout, bias):
        return op(x, lora_a, lora_b, s_values, *s_layout.tensors(), bias)
    return call


BACKENDS: tuple[Backend, ...] = (
    Backend("cpp", ("cpu",), _FLOAT_DTYPES, _compiled(torch.ops.lowrank.sparse_lowrank_linear),
            lambda d: has_kernel("lowrank::sparse_lowrank_linear", d)),
    Backend("cuda", ("cuda",), _FLOAT_DTYPES, _compiled(torch.ops.lowrank.sparse_lowrank_linear),
            lambda d: has_kernel("lowrank::sparse_lowrank_linear", d)),
    Backend("triton", ("cuda", "cpu"), _FLOAT_DTYPES,
            _compiled(torch.ops.lowrank.sparse_lowrank_linear_triton), _triton_probe),
    Backend("torch", ("cpu", "cuda"), _FLOAT_DTYPES, _reference_impl),
)


# ---- validation ------------------------------------------------------------------------------------------
def _validate(x, lora_a, lora_b, s_values, s_layout, bias) -> None:
    op = "sparse_lowrank_linear"
    named = [("x", x), ("lora_a", lora_a), ("lora_b", lora_b), ("s_values", s_values)]
    if bias is not None:
        named.append(("bias", bias))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(s_layout, SparseLayout):
        raise TypeError(f"{op}: s_layout must be a lowrank.ops.SparseLayout, got {type(s_layout).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be [..., in], got a 0-D tensor")
    for name, t, dim in (("lora_a", lora_a, 2), ("lora_b", lora_b, 2), ("s_values", s_values, 1)):
        if t.dim() != dim:
            raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    check_like_x(op, x, named[1:])
    if s_layout.device != x.device:
        raise ValueError(f"{op}: s_layout is on {s_layout.device} but x is on {x.device} "
                         "(use s_layout.to(device))")
    out, in_ = s_layout.shape
    r = lora_a.shape[0]
    if x.shape[-1] != in_:
        raise ValueError(f"{op}: x.shape[-1] = {x.shape[-1]} does not match s_layout.shape = "
                         f"(out={out}, in={in_})")
    if lora_a.shape[1] != in_:
        raise ValueError(f"{op}: lora_a must be [r, in={in_}], got shape {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (out, r):
        raise ValueError(f"{op}: lora_b must be [out={out}, r={r}], got shape {tuple(lora_b.shape)}")
    if r > min(in_, out):
        raise ValueError(f"{op}: rank r = {r} exceeds min(in, out) = {min(in_, out)}")
    if s_values.shape[0] != s_layout.nnz:
        raise ValueError(f"{op}: s_values must be [nnz={s_layout.nnz}] (the layout's support), got shape "
                         f"{tuple(s_values.shape)}")
    if bias is not None and tuple(bias.shape) != (out,):
        raise ValueError(f"{op}: bias must be [out={out}], got shape {tuple(bias.shape)}")


def sparse_lowrank_linear(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, s_values: torch.Tensor,
                          s_layout: SparseLayout, bias: torch.Tensor | None = None, *,
                          backend: str = "auto") -> torch.Tensor:
    """Sparse-plus-low-rank linear layer without the dense weight.

    .. math:: y = (x A^T) B^T + x S^T + b, \\qquad S_{i j} = \\text{s\\_values}[k] \\text{ at the k-th support
              entry } (i, j) \\text{ (CSR order)}, \\text{ else } 0

    Args:
        x: input ``[..., in]``.
        lora_a: ``A`` ``[r, in]``.
        lora_b: ``B`` ``[out, r]``; ``0 <= r <= min(in, out)`` (r = 0: a pure sparse layer).
        s_values: ``[nnz]`` values of S in ``s_layout``'s CSR (row-major) order, SLTrain's order.
        s_layout: the fixed support, shape ``(out, in)``, on x's device.
        bias: ``[out]`` or ``None``.
        backend: "auto" (cpp on CPU, cuda, triton, torch in that order) or one of those names; a named
            backend that cannot run raises :class:`~lowrank.BackendUnavailableError` listing why.

    Returns:
        ``y`` ``[..., out]`` in x's dtype, differentiable w.r.t. x, lora_a, lora_b, s_values and bias.
        Low-precision inputs accumulate the sparse sums in fp32. Memory beyond y: the [T, r] rank-r
        intermediate and O(in·64) transposed token blocks per thread; never an [out, in] tensor (backward:
        never a dense weight gradient).

    Raises:
        TypeError: non-tensors, mixed dtypes, a non-SparseLayout layout.
        ValueError: shape mismatches, rank above min(in, out), values not matching the layout's nnz, devices.
    """
    _validate(x, lora_a, lora_b, s_values, s_layout, bias)
    impl = select("sparse_lowrank_linear", BACKENDS, backend, x.device, x.dtype)
    return impl.fn(x, lora_a, lora_b, s_values, s_layout, bias)
