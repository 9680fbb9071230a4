"""Identifier-logit gather: ``logits = hidden · weight[ids]ᵀ + bias[ids]``.

Shapes: hidden [..., d] (leading dims flattened into tokens), weight [V, d] (an LM head), ids [k] int32/int64
with 0 <= ids < V (repeats allowed), bias [V] or None; logits [..., k] in hidden's dtype, accumulated in fp32
(fp64 for fp64). Equal to ``(hidden @ weight.T + bias)[..., ids]`` without the V-wide projection: a listwise
reranker (FIRST) reads k = 20 identifier logits at one position, 0.04% of SmolLM2's 49152-row head.

Ops (schemas in csrc/registration.cpp): ``lowrank::gather_logits`` (C++ CPU kernel csrc/cpu/gather_logits.cpp,
CUDA csrc/cuda/gather_logits.cu) and ``lowrank::gather_logits_triton`` (lowrank/kernels/triton/gather_logits.py).
This module holds their fakes and autograd. Backward (plain ATen ops, it is not a hot path):
  d hidden = g · weight[ids]            [T, d]
  d weight = index_add over ids of gᵀ · hidden  (rows not in ids get zero; repeated ids accumulate)
  d bias   = index_add over ids of Σ_t g
"""
from __future__ import annotations

import torch

from lowrank.ops._backends import Backend, has_kernel, select, triton_reasons
from lowrank.reference import gather_logits as _reference

__all__ = ["gather_logits", "BACKENDS"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _fake(hidden, weight, ids, bias):
    return hidden.new_empty((hidden.shape[0], ids.shape[0]))


torch.library.register_fake("lowrank::gather_logits")(_fake)
torch.library.register_fake("lowrank::gather_logits_triton")(_fake)


def _setup_context(ctx, inputs, output):
    hidden, weight, ids, bias = inputs
    ctx.save_for_backward(hidden, weight, ids)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    hidden, weight, ids = ctx.saved_tensors
    need = ctx.needs_input_grad
    idx = ids.long()
    dh = grad @ weight.index_select(0, idx) if need[0] else None
    dw = torch.zeros_like(weight).index_add_(0, idx, grad.t() @ hidden) if need[1] else None
    db = None
    if ctx.has_bias and need[3]:
        db = weight.new_zeros(weight.shape[0]).index_add_(0, idx, grad.sum(0))
    return dh, dw, None, db


torch.library.register_autograd("lowrank::gather_logits", _backward, setup_context=_setup_context)
torch.library.register_autograd("lowrank::gather_logits_triton", _backward, setup_context=_setup_context)


def _triton_probe(device_type: str) -> tuple[str, ...]:
    reasons = triton_reasons(device_type)
    if not reasons:
        import lowrank.kernels.triton.gather_logits  # noqa: F401  (registers the kernel)
    return reasons


BACKENDS: tuple[Backend, ...] = (
    Backend("cpp", ("cpu",), _FLOAT_DTYPES, torch.ops.lowrank.gather_logits,
            lambda d: has_kernel("lowrank::gather_logits", d)),
    Backend("cuda", ("cuda",), _FLOAT_DTYPES, torch.ops.lowrank.gather_logits,
            lambda d: has_kernel("lowrank::gather_logits", d)),
    Backend("triton", ("cuda", "cpu"), _FLOAT_DTYPES, torch.ops.lowrank.gather_logits_triton, _triton_probe),
    Backend("torch", ("cpu", "cuda"), _FLOAT_DTYPES, _reference),
)


def _validate(hidden, weight, ids, bias) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("ids", ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gather_logits: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"gather_logits: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if hidden.dim() < 1:
        raise ValueError("gather_logits: hidden must be [..., d], got a 0-D tensor")
    if weight.dim() != 2:
        raise ValueError(f"gather_logits: weight must be 2-D [V, d], got shape {tuple(weight.shape)}")
    if ids.dim() != 1:
        raise ValueError(f"gather_logits: ids must be 1-D [k], got shape {tuple(ids.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"gather_logits: hidden must be float32, float64, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"gather_logits: weight has dtype {weight.dtype} but hidden has dtype {hidden.dtype}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"gather_logits: ids must be int32 or int64, got {ids.dtype}")
    for name, t in (("weight", weight), ("ids", ids)) + ((("bias", bias),) if bias is not None else ()):
        if t.device != hidden.device:
            raise ValueError(f"gather_logits: {name} is on {t.device} but hidden is on {hidden.device}")
    V, d = weight.shape
    if hidden.shape[-1] != d:
        raise ValueError(f"gather_logits: hidden.shape[-1] = {hidden.shape[-1]} does not match weight [V={V}, d={d}]")
    if bias is not None:
        if bias.dtype != hidden.dtype:
            raise TypeError(f"gather_logits: bias has dtype {bias.dtype} but hidden has dtype {hidden.dtype}")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"gather_logits: bias must be [V={V}], got shape {tuple(bias.shape)}")
    if ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"gather_logits: ids must lie in [0, V={V}), got values in [{lo}, {hi}]")


def gather_logits(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor | None = None,
                  *, backend: str = "auto") -> torch.Tensor:
    """Logits of a few vocabulary entries: ``hidden · weight[ids]ᵀ + bias[ids]``.

    .. math:: \\text{logits}[t, j] = h_t \\cdot W_{\\text{ids}_j} + b_{\\text{ids}_j}

    Args:
        hidden: ``[..., d]`` final hidden states (after the model's last norm).
        weight: ``[V, d]`` LM head (``model.get_output_embeddings().weight``; tied embeddings work as they are).
        ids: ``[k]`` int32/int64 vocabulary indices, each in ``[0, V)``; order is kept and repeats are allowed.
        bias: ``[V]`` or ``None``.
        backend: "auto" (cpp on CPU, cuda, triton, torch in that order) or one of those names; a named backend that
            cannot run raises :class:`~lowrank.BackendUnavailableError` listing why.

    Returns:
        ``[..., k]`` in hidden's dtype. Differentiable w.r.t. hidden, weight and bias.

    Raises:
        TypeError: non-tensors, mixed float dtypes, non-integer ids.
        ValueError: shape mismatch, ids out of range, tensors on different devices.
    """
    _validate(hidden, weight, ids, bias)
    impl = select("gather_logits", BACKENDS, backend, hidden.device, hidden.dtype)
    lead = hidden.shape[:-1]
    out = impl.fn(hidden.reshape(-1, hidden.shape[-1]), weight, ids, bias)
    return out.reshape(*lead, ids.shape[0])
