"""Multi-adapter LoRA linear in one call (SGMV / BGMV semantics).

.. math:: y_t = x_t W^T + b + s_{a_t}\\,(x_t A_{a_t}^T) B_{a_t}^T, \\qquad a_t = \\text{adapter\\_ids}[t]

Shapes: x [..., in] (leading dims flattened into T tokens), weight W [out, in], bias b [out] or None,
lora_a A [n, r, in], lora_b B [n, out, r] (adapter a's PEFT ``lora_A`` / ``lora_B`` weights stacked),
adapter_ids [T] (int32/int64, or ``x.shape[:-1]``; -1 = no adapter for that token), scaling [n]
(each adapter's alpha / r), ranks [n] or None: adapter a uses only its first ``ranks[a]`` ranks (storage padded
to r; the padding takes no part in results or gradients).

Token-level semantics: a superset of PEFT's per-sample ``adapter_names``. The segment metadata
(:class:`AdapterSegments`: tokens sorted by adapter) is built once per batch and can be passed instead of
``adapter_ids`` to every layer of a model, so the sort is paid once per forward, not once per layer.

Ops (schemas in csrc/registration.cpp):
  * ``lowrank::multi_lora_linear``: forward (C++: csrc/cpu/multi_lora_linear.cpp);
  * ``lowrank::multi_lora_linear_backward``: (dx, dW, dA, dB) under an output mask; the bias gradient is a row sum;
  * ``lowrank::multi_lora_linear_triton``: the forward run by the Triton kernel (kernels/triton/multi_lora_linear.py).
This module holds their fakes and autograd. Gradients flow to x, weight, bias, lora_a and lora_b (zero for
adapters no token uses); not to scaling, which is a per-adapter constant.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lowrank.ops._backends import Backend, check_like_x, has_kernel, select, triton_reasons
from lowrank.reference import multi_lora_linear as _reference

__all__ = ["AdapterSegments", "adapter_segments", "multi_lora_linear", "BACKENDS"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_ID_DTYPES = (torch.int32, torch.int64)


# ---- segment metadata -----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AdapterSegments:
    """Tokens grouped by adapter, built once per batch by :func:`adapter_segments` and shared by every layer.

    Attributes:
        adapter_ids: ``[T]`` int64, the flattened ids (-1 = no adapter).
        perm: ``[T]`` int64, token indices stably sorted by adapter, the tokens without adapter last.
        offsets: ``[n + 1]`` int64; adapter a's tokens are ``perm[offsets[a]:offsets[a + 1]]`` and the tokens
            without adapter are ``perm[offsets[n]:]``. Every tensor lives on the device of the ids.
        n_adapters: n, the number of adapters the ids index.
    """

    adapter_ids: torch.Tensor
    perm: torch.Tensor
    offsets: torch.Tensor
    n_adapters: int

    @property
    def num_tokens(self) -> int:
        return self.perm.shape[0]

    @property
    def counts(self) -> torch.Tensor:
        """``[n]`` int64: how many tokens use each adapter."""
        return self.offsets[1:] - self.offsets[:-1]

    def active_adapters(self) -> list[int]:
        """The adapters at least one token uses (syncs with the device)."""
        return torch.nonzero(self.counts).flatten().tolist()


def adapter_segments(adapter_ids: torch.Tensor, n_adapters: int) -> AdapterSegments:
    """Group the tokens of a batch by adapter (a stable sort), once for all layers.

    Args:
        adapter_ids: int32/int64 tensor of any shape (flattened into tokens); values in ``[-1, n_adapters)``.
        n_adapters: the number of adapters (``lora_a.shape[0]`` of the layers it is used with).

    Raises:
        TypeError: ids not an int32/int64 tensor, ``n_adapters`` not an int.
        ValueError: ids outside ``[-1, n_adapters)`` (checked eagerly; under torch.compile by an async assert).
    """
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_segments: adapter_ids must be a torch.Tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"adapter_segments: adapter_ids must be int32 or int64, got {adapter_ids.dtype}")
    if isinstance(n_adapters, bool) or not isinstance(n_adapters, int) or n_adapters < 1:
        raise TypeError(f"adapter_segments: n_adapters must be a positive int, got {n_adapters!r}")
    ids = adapter_ids.reshape(-1).to(torch.int64)
    if torch.compiler.is_compiling():
        torch._assert_async(((ids >= -1) & (ids < n_adapters)).all(),
                            "adapter_segments: adapter_ids out of range [-1, n_adapters)")
    elif ids.numel():
        lo, hi = ids.min().item(), ids.max().item()
        if lo < -1 or hi >= n_adapters:
            bad = lo if lo < -1 else hi
            raise ValueError(f"adapter_segments: adapter_ids has value {bad}, outside [-1, {n_adapters}) "
                             f"(-1 = no adapter; {n_adapters} adapters)")
    key = torch.where(ids < 0, n_adapters, ids)
    perm = torch.argsort(key, stable=True)
    counts = torch.zeros(n_adapters + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts[:n_adapters], 0)])
    return AdapterSegments(ids, perm, offsets, n_adapters)


# ---- fake (meta) implementations -------------------------------------------------------------------------
def _fake_forward(x, weight, bias, lora_a, lora_b, scaling, perm, offsets, ranks):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


torch.library.register_fake("lowrank::multi_lora_linear")(_fake_forward)
torch.library.register_fake("lowrank::multi_lora_linear_triton")(_fake_forward)


@torch.library.register_fake("lowrank::multi_lora_linear_backward")
def _fake_backward(grad_out, x, weight, lora_a, lora_b, scaling, perm, offsets, ranks, output_mask):
    shapes = (x.shape, weight.shape, lora_a.shape, lora_b.shape)
    return tuple(x.new_empty(s) if m else None for s, m in zip(shapes, output_mask))


# ---- autograd ----------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, perm, offsets, ranks = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, scaling, perm, offsets, ranks)


def _backward(ctx, grad):
    x, weight, lora_a, lora_b, scaling, perm, offsets, ranks = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, da, db = torch.ops.lowrank.multi_lora_linear_backward(
        grad, x, weight, lora_a, lora_b, scaling, perm, offsets, ranks, [need[0], need[1], need[3], need[4]])
    dbias = grad.reshape(-1, grad.shape[-1]).sum(0) if need[2] else None
    return dx, dw, dbias, da, db, None, None, None, None


torch.library.register_autograd("lowrank::multi_lora_linear", _backward, setup_context=_setup_context)
torch.library.register_autograd("lowrank::multi_lora_linear_triton", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("multi_lora_linear: double backward (create_graph=True) is not implemented by the "
                              "fused kernels; use backend='torch' for higher-order gradients")


torch.library.register_autograd("lowrank::multi_lora_linear_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ---- backends ----------------------------------------------------------------------------------------------
def _run_op(x, weight, bias, lora_a, lora_b, scaling, seg, ranks):
    return torch.ops.lowrank.multi_lora_linear(x, weight, bias, lora_a, lora_b, scaling, seg.perm, seg.offsets,
                                               ranks)


def _run_reference(x, weight, bias, lora_a, lora_b, scaling, seg, ranks):
    return _reference(x, weight, bias, lora_a, lora_b, seg.adapter_ids, scaling, ranks)


def _triton_probe(device_type: str) -> tuple[str, ...]:
    reasons = triton_reasons(device_type)
    if not reasons:
        # Importing the kernel module registers its implementation of lowrank::multi_lora_linear_triton.
        import lowrank.kernels.triton.multi_lora_linear  # noqa: F401
    return reasons


def _run_triton(x, weight, bias, lora_a, lora_b, scaling, seg, ranks):
    return torch.ops.lowrank.multi_lora_linear_triton(x, weight, bias, lora_a, lora_b, scaling, seg.perm,
                                                      seg.offsets, ranks)


BACKENDS: tuple[Backend, ...] = (
    Backend("cpp", ("cpu",), _FLOAT_DTYPES, _run_op, lambda d: has_kernel("lowrank::multi_lora_linear", d)),
    Backend("cuda", ("cuda",), _FLOAT_DTYPES, _run_op, lambda d: has_kernel("lowrank::multi_lora_linear", d)),
    Backend("triton", ("cuda", "cpu"), _FLOAT_DTYPES, _run_triton, _triton_probe),
    Backend("torch", ("cpu", "cuda"), _FLOAT_DTYPES, _run_reference),
)


# ---- validation ----------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"multi_lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"multi_lora_linear: {name} must be {dim}-D, got shape {tuple(t.shape)}")


def _validate(x, weight, bias, lora_a, lora_b) -> None:
    _check_tensor("x", x)
    _check_tensor("weight", weight, 2)
    _check_tensor("lora_a", lora_a, 3)
    _check_tensor("lora_b", lora_b, 3)
    if bias is not None:
        _check_tensor("bias", bias, 1)
    if x.dim() < 1:
        raise ValueError("multi_lora_linear: x must have at least 1 dimension [..., in], got a 0-D tensor")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"multi_lora_linear: x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    named = [("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)] + ([("bias", bias)] if bias is not None
                                                                          else [])
    check_like_x("multi_lora_linear", x, named)
    out, in_ = weight.shape
    n, r = lora_a.shape[:2]
    if out == 0 or in_ == 0:
        raise ValueError(f"multi_lora_linear: weight must be non-empty [out, in], got shape {tuple(weight.shape)}")
    if n == 0 or r == 0:
        raise ValueError(f"multi_lora_linear: lora_a must be [n >= 1, r >= 1, in], got shape {tuple(lora_a.shape)}")
    if x.shape[-1] != in_:
        raise ValueError(f"multi_lora_linear: x.shape[-1] = {x.shape[-1]} does not match weight [out={out}, "
                         f"in={in_}]")
    if lora_a.shape[2] != in_:
        raise ValueError(f"multi_lora_linear: lora_a must be [n, r, in={in_}], got shape {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (n, out, r):
        raise ValueError(f"multi_lora_linear: lora_b must be [n={n}, out={out}, r={r}] to match weight and lora_a, "
                         f"got shape {tuple(lora_b.shape)}")
    if bias is not None and bias.shape[0] != out:
        raise ValueError(f"multi_lora_linear: bias must be [out={out}], got shape {tuple(bias.shape)}")


def _segments_for(x: torch.Tensor, adapter_ids, n: int) -> AdapterSegments:
    tokens = math.prod(x.shape[:-1])
    if isinstance(adapter_ids, AdapterSegments):
        seg = adapter_ids
        if seg.n_adapters != n:
            raise ValueError(f"multi_lora_linear: adapter segments were built for {seg.n_adapters} adapters but "
                             f"lora_a holds {n}")
    else:
        if not isinstance(adapter_ids, torch.Tensor):
            raise TypeError("multi_lora_linear: adapter_ids must be a torch.Tensor or AdapterSegments, got "
                            f"{type(adapter_ids).__name__}")
        if adapter_ids.dtype not in _ID_DTYPES:
            raise TypeError(f"multi_lora_linear: adapter_ids must be int32 or int64, got {adapter_ids.dtype}")
        if adapter_ids.device != x.device:
            raise ValueError(f"multi_lora_linear: adapter_ids is on {adapter_ids.device} but x is on {x.device}")
        if adapter_ids.numel() != tokens:
            raise ValueError(f"multi_lora_linear: adapter_ids has {adapter_ids.numel()} entries (shape "
                             f"{tuple(adapter_ids.shape)}) but x has {tokens} tokens (shape {tuple(x.shape)})")
        seg = adapter_segments(adapter_ids, n)
    if seg.perm.device != x.device:
        raise ValueError(f"multi_lora_linear: adapter segments are on {seg.perm.device} but x is on {x.device}")
    if seg.num_tokens != tokens:
        raise ValueError(f"multi_lora_linear: adapter segments cover {seg.num_tokens} tokens but x has {tokens} "
                         f"(shape {tuple(x.shape)})")
    return seg


def _scaling_tensor(scaling, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(scaling, torch.Tensor):
        if not scaling.is_floating_point():
            raise TypeError(f"multi_lora_linear: scaling must be a floating tensor, got {scaling.dtype}")
        if scaling.device != device:
            raise ValueError(f"multi_lora_linear: scaling is on {scaling.device} but x is on {device}")
        s = scaling.detach().to(torch.float64)
    elif isinstance(scaling, Sequence) and not isinstance(scaling, str):
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in scaling):
            raise TypeError("multi_lora_linear: scaling must be a tensor or a sequence of Python floats, got "
                            f"{scaling!r}")
        if not all(abs(v) < math.inf for v in scaling):  # False for NaN and both infinities
            raise ValueError(f"multi_lora_linear: scaling must be finite, got {list(scaling)}")
        s = torch.tensor([float(v) for v in scaling], dtype=torch.float64, device=device)
    else:
        raise TypeError(f"multi_lora_linear: scaling must be a tensor [n] or a sequence of n floats, got "
                        f"{type(scaling).__name__}")
    if s.shape != (n,):
        raise ValueError(f"multi_lora_linear: scaling must have n={n} entries, got shape {tuple(s.shape)}")
    return s


def _ranks_tensor(ranks, n: int, r: int, device: torch.device) -> torch.Tensor | None:
    if ranks is None:
        return None
    if isinstance(ranks, torch.Tensor):
        if ranks.dtype not in _ID_DTYPES:
            raise TypeError(f"multi_lora_linear: ranks must be int32 or int64, got {ranks.dtype}")
        if ranks.device != device:
            raise ValueError(f"multi_lora_linear: ranks is on {ranks.device} but x is on {device}")
        t = ranks.to(torch.int64)
    elif isinstance(ranks, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in ranks):
        t = torch.tensor(list(ranks), dtype=torch.int64, device=device)
    else:
        raise TypeError(f"multi_lora_linear: ranks must be None, an int tensor [n] or a sequence of n ints, got "
                        f"{ranks!r}")
    if t.shape != (n,):
        raise ValueError(f"multi_lora_linear: ranks must have n={n} entries, got shape {tuple(t.shape)}")
    if not torch.compiler.is_compiling() and t.numel() and (t.min().item() < 0 or t.max().item() > r):
        raise ValueError(f"multi_lora_linear: ranks must lie in [0, r={r}] (r = lora_a.shape[1]), got "
                         f"{t.tolist()}")
    return t


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, adapter_ids: torch.Tensor | AdapterSegments,
                      scaling: torch.Tensor | Sequence[float], *, ranks: torch.Tensor | Sequence[int] | None = None,
                      backend: str = "auto") -> torch.Tensor:
    """LoRA with a different adapter per token, in one call.

    .. math:: y_t = x_t W^T + b + s_{a_t}\\,(x_t A_{a_t}[{:}r_{a_t}]^T)\\,B_{a_t}[:, {:}r_{a_t}]^T

    Args:
        x: input ``[..., in]``; leading dims are flattened into T tokens.
        weight: base weight ``[out, in]``; bias: ``[out]`` or ``None``.
        lora_a: ``[n, r, in]`` (adapter a's ``lora_A.weight`` at ``lora_a[a]``).
        lora_b: ``[n, out, r]`` (adapter a's ``lora_B.weight`` at ``lora_b[a]``).
        adapter_ids: int32/int64 ``[T]`` or ``x.shape[:-1]``, values in ``[-1, n)`` (-1: base layer only), or the
            :class:`AdapterSegments` built from them once per batch by :func:`adapter_segments`.
        scaling: ``[n]`` per-adapter ``alpha / r`` (a float tensor on x's device, or a sequence of floats).
        ranks: ``None`` (every adapter uses all r ranks) or ``[n]`` ints in ``[0, r]``: adapter a uses its first
            ``ranks[a]`` ranks; the rest of its storage is padding.
        backend: "auto" (cpp on CPU, cuda, triton, torch) or one of those names; a named backend that cannot run
            raises :class:`~lowrank.BackendUnavailableError` listing why.

    Returns:
        ``y`` ``[..., out]`` in x's dtype; differentiable w.r.t. x, weight, bias, lora_a and lora_b (adapters no
        token uses get zero gradients).

    Raises:
        TypeError: non-tensor arguments, mixed dtypes, ids not int32/int64, bad scaling / ranks types.
        ValueError: mismatched shapes, ids out of range, tensors (ids included) on another device than x.
    """
    _validate(x, weight, bias, lora_a, lora_b)
    n, r = lora_a.shape[:2]
    seg = _segments_for(x, adapter_ids, n)
    s = _scaling_tensor(scaling, n, x.device)
    rk = _ranks_tensor(ranks, n, r, x.device)
    impl = select("multi_lora_linear", BACKENDS, backend, x.device, x.dtype)
    return impl.fn(x, weight, bias, lora_a, lora_b, s, seg, rk)
