"""A float32 linear on oneDNN's fp32 GEMM: ``y = x · weightᵀ + bias``.

Shapes: x [..., in], weight [out, in], bias [out] or None; y [..., out]; float32 on the CPU. The math of
``F.linear``; what differs is the GEMM. ``F.linear`` sends a float32 CPU product to MKL's sgemm; PyTorch also ships
oneDNN, whose fp32 GEMM is faster on some CPUs. Measured on an AMD EPYC Zen 4 (AVX-512, 2 threads), 2048 tokens of
MiniLM/BERT shapes (384², 384×1536, 1536×384, 576×1536, 768×3072): 0.68–0.77× F.linear's time; a MiniLM forward
with every Linear on it 0.84×. Its sums are less exact: max error against fp64 2–2.6× MKL's (~1e-7 relative), so
this is an explicit choice (``lowrank.nn.use_onednn``, the rerankers' ``matmul="onednn"``), never a default.

Op (schema in csrc/registration.cpp): ``lowrank::onednn_linear``, CPU only (csrc/cpu/onednn_linear.cpp calls
oneDNN through ATen's ``mkldnn::_linear_pointwise``). No Triton or CUDA twin: on a GPU F.linear's cuBLAS is the
GEMM to use. This module holds its fake and autograd; the backward is plain ATen products:
  dx = g · W,   dW = gᵀ · x,   db = Σ_t g
"""
from __future__ import annotations

import torch

from lowrank.ops._backends import Backend, has_kernel, select
from lowrank.reference import onednn_linear as _reference

__all__ = ["onednn_linear", "BACKENDS"]


@torch.library.register_fake("lowrank::onednn_linear")
def _fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    g2 = grad.reshape(-1, grad.shape[-1])
    dx = (g2 @ weight).view(x.shape) if need[0] else None
    dw = g2.t() @ x.reshape(-1, x.shape[-1]) if need[1] else None
    db = g2.sum(0) if ctx.has_bias and need[2] else None
    return dx, dw, db


torch.library.register_autograd("lowrank::onednn_linear", _backward, setup_context=_setup_context)


def _cpp_probe(device_type: str) -> tuple[str, ...]:
    reasons = has_kernel("lowrank::onednn_linear", device_type)
    if not reasons and not torch.backends.mkldnn.is_available():
        reasons = ("this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)",)
    return reasons


BACKENDS: tuple[Backend, ...] = (
    Backend("cpp", ("cpu",), (torch.float32,), torch.ops.lowrank.onednn_linear, _cpp_probe),
    Backend("torch", ("cpu", "cuda"), (torch.float32,), _reference),
)


def _validate(x, weight, bias) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"onednn_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"onednn_linear: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    for name, t in (("x", x), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if t.dtype != torch.float32:
            raise TypeError(f"onednn_linear: {name} must be float32 (oneDNN's fp32 GEMM), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"onednn_linear: {name} is on {t.device} but x is on {x.device}")
    if x.dim() < 1:
        raise ValueError("onednn_linear: x must be [..., in], got a 0-D tensor")
    if weight.dim() != 2:
        raise ValueError(f"onednn_linear: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out, in_ = weight.shape
    if x.shape[-1] != in_:
        raise ValueError(f"onednn_linear: x.shape[-1] = {x.shape[-1]} does not match weight [out={out}, in={in_}]")
    if bias is not None and tuple(bias.shape) != (out,):
        raise ValueError(f"onednn_linear: bias must be [out={out}], got shape {tuple(bias.shape)}")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  backend: str = "auto") -> torch.Tensor:
    """``y = x · weightᵀ + bias`` in float32 on oneDNN's fp32 GEMM.

    .. math:: y_t = W x_t + b

    Args:
        x: ``[..., in]`` float32.
        weight: ``[out, in]`` float32 (copied to a contiguous buffer per call if it is strided).
        bias: ``[out]`` float32 or ``None``.
        backend: "auto" (cpp on the CPU, else torch), "cpp" (oneDNN) or "torch" (``F.linear``, the reference);
            a named backend that cannot run raises :class:`~lowrank.BackendUnavailableError` listing why.

    Returns:
        ``[..., out]`` float32, within a few fp32 ulps of ``F.linear`` (another summation order). Differentiable
        w.r.t. x, weight and bias.

    Raises:
        TypeError: non-tensors or a dtype other than float32.
        ValueError: shape mismatch or tensors on different devices.
    """
    _validate(x, weight, bias)
    impl = select("onednn_linear", BACKENDS, backend, x.device, x.dtype)
    return impl.fn(x, weight, bias)
