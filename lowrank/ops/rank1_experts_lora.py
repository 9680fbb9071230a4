"""Mixture of rank-1 experts LoRA (MoRA / SMoRA): each of the E ranks of a LoRA is an expert.

.. math:: y_t = x_t W^T + b + s \\sum_{e \\in \\mathrm{topk}(t)} g_{te}\\,(a_e \\cdot x_t)\\, b_e

Shapes: x [..., in] (T tokens over the leading dims), weight W [out, in], bias b [out] or None, lora_a [E, in]
(row a_e), lora_b [out, E] (column b_e), router [E, in] and router_bias [E] (gate "router" only). Returns
y [..., out] (x's dtype), indices [..., k] int64 and gates [..., k] float32 (float64 for float64 inputs). The
gate math, selection rule (ties to the lower expert index) and gradient semantics are specified in
lowrank/reference/rank1_experts_lora.py.

Ops (schemas in csrc/registration.cpp):
  * ``lowrank::rank1_experts_lora``: forward, C++ CPU kernel (csrc/cpu/rank1_experts_lora.cpp); it also returns
    act = x·[A; R]ᵀ (the rank activations and router logits, gate dtype) which the backward reuses, so the
    skinny GEMM is not repeated (T·2E·4 bytes kept, small next to x). Under the router gate only the selected
    experts' rank activations are needed (selection reads the router logits), and the CPU kernel may leave the
    others zero (it forms h at the selected experts only, bf16 / fp32 from 64 tokens on AVX-512).
  * ``lowrank::rank1_experts_lora_backward``: (dx, dW, dA, dB, d router) under an output mask.
  * ``lowrank::rank1_experts_lora_triton``: the forward run by the Triton kernels
    (kernels/triton/rank1_experts_lora.py); same outputs, same backward.
Straight-through semantics: the discrete selection gets no gradient; gradients reach x, the selected experts'
a_e and b_e, the router through the gate values, and whatever the caller computes from the returned gates.
"""
from __future__ import annotations

import math

import torch

from lowrank.ops._backends import (Backend, check_factor_shapes, check_like_x, has_kernel, select,
                                   triton_reasons)
from lowrank.reference import rank1_experts_lora as _reference

__all__ = ["rank1_experts_lora", "BACKENDS"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_OP = "rank1_experts_lora"


def _gate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake (meta) implementations -------------------------------------------------------------------------
def _fake_forward(x, weight, bias, lora_a, lora_b, router, router_bias, top_k, scaling, gate, temperature,
                  threshold):
    lead = x.shape[:-1]
    tokens = math.prod(lead)
    E = lora_a.shape[0]
    gd = _gate_dtype(x.dtype)
    return (x.new_empty((*lead, weight.shape[0])), x.new_empty((*lead, top_k), dtype=torch.int64),
            x.new_empty((*lead, top_k), dtype=gd), x.new_empty((tokens, 2 * E if gate == "router" else E), dtype=gd))


torch.library.register_fake("lowrank::rank1_experts_lora")(_fake_forward)
torch.library.register_fake("lowrank::rank1_experts_lora_triton")(_fake_forward)


@torch.library.register_fake("lowrank::rank1_experts_lora_backward")
def _fake_backward(grad_y, grad_gates, x, weight, lora_a, lora_b, router, indices, act, scaling, gate,
                   temperature, threshold, output_mask):
    shapes = (x.shape, weight.shape, lora_a.shape, lora_b.shape, lora_a.shape)
    present = list(output_mask)
    present[4] = present[4] and gate == "router"
    return tuple(x.new_empty(s) if m else None for s, m in zip(shapes, present))


# ---- autograd ----------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, router, router_bias, top_k, scaling, gate, temperature, threshold = inputs
    _, indices, _, act = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, router, indices, act)
    ctx.args = (scaling, gate, temperature, threshold)
    ctx.mark_non_differentiable(indices, act)


def _backward(ctx, grad_y, grad_indices, grad_gates, grad_act):
    x, weight, lora_a, lora_b, router, indices, act = ctx.saved_tensors
    need = ctx.needs_input_grad
    scaling, gate, temperature, threshold = ctx.args
    if grad_y is None:
        grad_y = torch.zeros((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
    mask = [need[0], need[1], need[3], need[4], need[5] and router is not None]
    dx, dw, da, db, dr = torch.ops.lowrank.rank1_experts_lora_backward(
        grad_y, grad_gates, x, weight, lora_a, lora_b, router, indices, act, scaling, gate, temperature, threshold,
        mask)
    dbias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if need[2] else None
    return dx, dw, dbias, da, db, dr, None, None, None, None, None, None


torch.library.register_autograd("lowrank::rank1_experts_lora", _backward, setup_context=_setup_context)
torch.library.register_autograd("lowrank::rank1_experts_lora_triton", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("rank1_experts_lora: double backward (create_graph=True) is not implemented by the "
                              "fused kernels; use backend='torch' for higher-order gradients")


torch.library.register_autograd("lowrank::rank1_experts_lora_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def _compiled(op):
    def run(x, weight, bias, lora_a, lora_b, top_k, scaling, router, router_bias, gate, temperature, threshold):
        y, idx, gates, _ = op(x, weight, bias, lora_a, lora_b, router, router_bias, top_k, scaling, gate,
                              temperature, threshold)
        return y, idx, gates
    return run


def _triton_probe(device_type: str) -> tuple[str, ...]:
    reasons = triton_reasons(device_type)
    if not reasons:
        # Importing the kernel module registers its implementation of lowrank::rank1_experts_lora_triton.
        import lowrank.kernels.triton.rank1_experts_lora  # noqa: F401
    return reasons


def _torch(x, weight, bias, lora_a, lora_b, top_k, scaling, router, router_bias, gate, temperature, threshold):
    return _reference(x, weight, bias, lora_a, lora_b, top_k, scaling=scaling, router=router,
                      router_bias=router_bias, gate=gate, temperature=temperature, threshold=threshold)


BACKENDS: tuple[Backend, ...] = (
    Backend("cpp", ("cpu",), _FLOAT_DTYPES, _compiled(torch.ops.lowrank.rank1_experts_lora),
            lambda d: has_kernel("lowrank::rank1_experts_lora", d)),
    Backend("cuda", ("cuda",), _FLOAT_DTYPES, _compiled(torch.ops.lowrank.rank1_experts_lora),
            lambda d: has_kernel("lowrank::rank1_experts_lora", d)),
    Backend("triton", ("cuda", "cpu"), _FLOAT_DTYPES, _compiled(torch.ops.lowrank.rank1_experts_lora_triton),
            _triton_probe),
    Backend("torch", ("cpu", "cuda"), _FLOAT_DTYPES, _torch),
)


# ---- validation ----------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{_OP}: {name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_float(name: str, v, *, positive: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{_OP}: {name} must be a Python float, got {type(v).__name__}")
    # A comparison rather than math.isfinite so that a symbolic float under torch.compile traces.
    if not abs(v) < math.inf or (positive and not v > 0):
        raise ValueError(f"{_OP}: {name} must be {'positive and ' if positive else ''}finite, got {v}")


def _validate(x, weight, bias, lora_a, lora_b, top_k, scaling, router, router_bias, gate, temperature,
              threshold) -> None:
    _check_tensor("x", x)
    _check_tensor("weight", weight, 2)
    _check_tensor("lora_a", lora_a, 2)
    _check_tensor("lora_b", lora_b, 2)
    if x.dim() < 1:
        raise ValueError(f"{_OP}: x must have at least 1 dimension [..., in], got a 0-D tensor")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{_OP}: x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if gate not in ("router", "self"):
        raise ValueError(f"{_OP}: gate must be 'router' or 'self', got {gate!r}")
    named = [("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)]
    if bias is not None:
        _check_tensor("bias", bias, 1)
        named.append(("bias", bias))
    if gate == "router":
        if router is None:
            raise ValueError(f"{_OP}: gate='router' needs router [E, in]")
        _check_tensor("router", router, 2)
        named.append(("router", router))
        if router_bias is not None:
            _check_tensor("router_bias", router_bias, 1)
            if not router_bias.is_floating_point():
                raise TypeError(f"{_OP}: router_bias must be a floating tensor, got {router_bias.dtype}")
            if router_bias.device != x.device:
                raise ValueError(f"{_OP}: router_bias is on {router_bias.device} but x is on {x.device}")
    elif router is not None or router_bias is not None:
        raise ValueError(f"{_OP}: gate='self' takes no router or router_bias (the scores are the rank "
                         "activations themselves)")
    check_like_x(_OP, x, named, dtype_note="all tensors but router_bias must share one dtype")
    _, in_, E = check_factor_shapes(_OP, x, weight, bias, lora_a, lora_b, k="E",
                                    k_empty="hold E >= 1 experts")
    if router is not None and tuple(router.shape) != (E, in_):
        raise ValueError(f"{_OP}: router must be [E={E}, in={in_}], got shape {tuple(router.shape)}")
    if router_bias is not None and router_bias.shape[0] != E:
        raise ValueError(f"{_OP}: router_bias must be [E={E}], got shape {tuple(router_bias.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"{_OP}: top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= E:
        raise ValueError(f"{_OP}: top_k must be in [1, E={E}], got {top_k}")
    _check_float("scaling", scaling)
    _check_float("temperature", temperature, positive=True)
    if gate == "router" and temperature != 1.0:
        raise ValueError(f"{_OP}: temperature applies to gate='self' only (router gates are normalised sigmoid "
                         f"scores), got {temperature}")
    if threshold is not None:
        _check_float("threshold", threshold)


def rank1_experts_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, top_k: int, *, scaling: float = 1.0,
                       router: torch.Tensor | None = None, router_bias: torch.Tensor | None = None,
                       gate: str = "router", temperature: float = 1.0, threshold: float | None = None,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear layer plus a mixture of rank-1 LoRA experts, each token using its top-k experts.

    .. math:: y_t = x_t W^T + b + s \\sum_{e \\in \\mathrm{topk}(t)} g_{te}\\,(a_e \\cdot x_t)\\, b_e

    Args:
        x: input ``[..., in]``; leading dims are flattened into tokens.
        weight: base weight ``[out, in]``; bias: ``[out]`` or None.
        lora_a: ``[E, in]``, row e is expert e's down-projection a_e.
        lora_b: ``[out, E]``, column e is expert e's up-projection b_e.
        top_k: experts per token, ``1 <= top_k <= E``.
        scaling: ``s`` (finite Python float).
        router: ``[E, in]`` for ``gate="router"`` (SMoRA): scores σ(x·routerᵀ), gates = selected scores / their
            sum.
        router_bias: ``[E]`` non-trainable per-expert bias added to the scores for selection only (auxiliary-loss
            -free load balancing); never gets a gradient.
        gate: "router" or "self" (MoRA: scores h/‖h‖₂ from h = x·lora_aᵀ, gates = softmax(scores/temperature)
            over the selected).
        temperature: softmax temperature of ``gate="self"`` (> 0); must stay 1.0 for "router".
        threshold: gates below it become 0 (pruned ranks; meant for inference), or None.
        backend: "auto" (cpp on CPU, cuda, triton, torch) or one of those names; a named backend that cannot run raises
            :class:`~lowrank.BackendUnavailableError`.

    Returns:
        ``(y [..., out], indices [..., k] int64, gates [..., k])``; gates are float32 (float64 for float64
        inputs), indices ordered by descending selection score, ties to the lower expert index. ``y`` and
        ``gates`` are differentiable (straight-through over the selection; see the module docstring).

    Raises:
        TypeError: a non-tensor argument, mixed dtypes, non-int top_k, non-float scalars.
        ValueError: mismatched shapes, top_k outside [1, E], a router with gate="self" (or none with "router"),
            tensors on different devices, non-finite scalars.
    """
    _validate(x, weight, bias, lora_a, lora_b, top_k, scaling, router, router_bias, gate, temperature, threshold)
    impl = select(_OP, BACKENDS, backend, x.device, x.dtype)
    return impl.fn(x, weight, bias, lora_a, lora_b, top_k, float(scaling), router, router_bias, gate,
                   float(temperature), None if threshold is None else float(threshold))
