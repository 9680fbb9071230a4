"""Fused LoRA linear: ``y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ``.

Shapes: x [..., in] (any leading dims, possibly zero tokens), weight W [out, in], bias b [out] or None,
lora_a A [r, in], lora_b B [out, r], scaling s = alpha / r (PEFT's layout and meaning). All tensors share one
floating dtype and one device.

Ops (schemas in csrc/registration.cpp):
  * ``lowrank::lora_linear``: forward; C++ kernels for CPU (csrc/cpu/lora_linear.cpp) and CUDA.
  * ``lowrank::lora_linear_backward``: (dx, dW, dA, dB) under an output mask; the bias gradient is a row sum.
  * ``lowrank::lora_linear_triton``: the forward run by the Triton kernel (kernels/triton/lora_linear.py).
This module holds their fake implementations and autograd. The backward saves x and the parameters only; h = x·Aᵀ
is recomputed there (r/out of the forward's work) instead of being kept alive across the whole forward pass.
"""
from __future__ import annotations

import math

import torch

from lowrank.ops._backends import (Backend, check_factor_shapes, check_like_x, has_kernel, select,
                                   triton_reasons)
from lowrank.reference import lora_linear as _reference

__all__ = ["lora_linear", "BACKENDS"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---- fake (meta) implementations -------------------------------------------------------------------------
def _fake_forward(x, weight, bias, lora_a, lora_b, scaling):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


torch.library.register_fake("lowrank::lora_linear")(_fake_forward)
torch.library.register_fake("lowrank::lora_linear_triton")(_fake_forward)


@torch.library.register_fake("lowrank::lora_linear_backward")
def _fake_backward(grad_out, x, weight, lora_a, lora_b, scaling, output_mask):
    shapes = (x.shape, weight.shape, lora_a.shape, lora_b.shape)
    return tuple(x.new_empty(s) if m else None for s, m in zip(shapes, output_mask))


# ---- autograd ----------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b)
    ctx.scaling = scaling


def _backward(ctx, grad):
    x, weight, lora_a, lora_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, da, db = torch.ops.lowrank.lora_linear_backward(
        grad, x, weight, lora_a, lora_b, ctx.scaling, [need[0], need[1], need[3], need[4]])
    dbias = grad.reshape(-1, grad.shape[-1]).sum(0) if need[2] else None
    return dx, dw, dbias, da, db, None


torch.library.register_autograd("lowrank::lora_linear", _backward, setup_context=_setup_context)
torch.library.register_autograd("lowrank::lora_linear_triton", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("lora_linear: double backward (create_graph=True) is not implemented by the fused "
                              "kernels; use backend='torch' for higher-order gradients")


torch.library.register_autograd("lowrank::lora_linear_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ---- backends ----------------------------------------------------------------------------------------------
def _triton_probe(device_type: str) -> tuple[str, ...]:
    reasons = triton_reasons(device_type)
    if not reasons:
        # Importing the kernel module registers its implementation of lowrank::lora_linear_triton.
        import lowrank.kernels.triton.lora_linear  # noqa: F401
    return reasons


BACKENDS: tuple[Backend, ...] = (
    Backend("cpp", ("cpu",), _FLOAT_DTYPES, torch.ops.lowrank.lora_linear,
            lambda d: has_kernel("lowrank::lora_linear", d)),
    Backend("cuda", ("cuda",), _FLOAT_DTYPES, torch.ops.lowrank.lora_linear,
            lambda d: has_kernel("lowrank::lora_linear", d)),
    Backend("triton", ("cuda", "cpu"), _FLOAT_DTYPES, torch.ops.lowrank.lora_linear_triton, _triton_probe),
    Backend("torch", ("cpu", "cuda"), _FLOAT_DTYPES, _reference),
)


# ---- validation ----------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"lora_linear: {name} must be {dim}-D, got shape {tuple(t.shape)}")


def _validate(x, weight, bias, lora_a, lora_b, scaling) -> None:
    _check_tensor("x", x)
    _check_tensor("weight", weight, 2)
    _check_tensor("lora_a", lora_a, 2)
    _check_tensor("lora_b", lora_b, 2)
    if bias is not None:
        _check_tensor("bias", bias, 1)
    if x.dim() < 1:
        raise ValueError("lora_linear: x must have at least 1 dimension [..., in], got a 0-D tensor")
    named = [("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)]
    if bias is not None:
        named.append(("bias", bias))
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"lora_linear: x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    check_like_x("lora_linear", x, named[1:],
                 dtype_note="all tensors must share one dtype (under torch.autocast: fp64 is not cast)")
    check_factor_shapes("lora_linear", x, weight, bias, lora_a, lora_b)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"lora_linear: scaling must be a Python float, got {type(scaling).__name__}")
    # Spelled as a comparison, not math.isfinite, so that a symbolic float under torch.compile(dynamic=True)
    # traces; it is False for NaN and both infinities.
    if not abs(scaling) < math.inf:
        raise ValueError(f"lora_linear: scaling must be finite, got {scaling}")


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, *, backend: str = "auto") -> torch.Tensor:
    """Fused LoRA linear layer.

    .. math:: y = x W^T + b + s\\,(x A^T) B^T

    Args:
        x: input ``[..., in]``; leading dims are flattened into tokens, zero tokens give an empty output.
        weight: base weight ``W`` ``[out, in]`` (usually frozen).
        bias: ``[out]`` or ``None``.
        lora_a: ``A`` ``[r, in]`` (PEFT ``lora_A.weight``).
        lora_b: ``B`` ``[out, r]`` (PEFT ``lora_B.weight``).
        scaling: ``s = alpha / r`` (finite Python float).
        backend: "auto" (first that can run: cpp on CPU, cuda, triton, torch), or one of those names. A named
            backend that cannot run raises :class:`~lowrank.BackendUnavailableError` listing why.

    Returns:
        ``y`` ``[..., out]`` in x's dtype. Differentiable w.r.t. x, weight, bias, lora_a and lora_b.

    Raises:
        TypeError: a non-tensor argument, mixed dtypes, a non-float scaling.
        ValueError: mismatched shapes, empty weight or rank 0, tensors on different devices, non-finite scaling.
    """
    _validate(x, weight, bias, lora_a, lora_b, scaling)
    impl = select("lora_linear", BACKENDS, backend, x.device, x.dtype)
    return impl.fn(x, weight, bias, lora_a, lora_b, float(scaling))
