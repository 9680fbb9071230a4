"""fp32 linear on bf16 matrix hardware: ``y = x·Wᵀ + b`` with x and W split into bf16 halves ("bf16x3").

Each float32 v is written as v_hi + v_lo with v_hi = bf16(v) and v_lo = bf16(v − v_hi) (16 of fp32's 24
significand bits), and

    y = x_hi·W_hiᵀ + x_hi·W_loᵀ + x_lo·W_hiᵀ + b        (fp32 accumulation)

Every bf16 product is exact in fp32 and the dropped x_lo·W_lo is ~2⁻¹⁸ of a product, so y matches fp32
``F.linear`` to ~1e-5 relative (fp32's own rounding is ~6e-8): close enough for inference whose scores must agree
with an fp32 model to 1e-4, at a fraction of the cost where bf16 tiles are much faster than fp32 FMA (Intel AMX:
16× the multiply-adds per cycle, so three bf16 products still beat one fp32 GEMM ~2×). It is not bit-identical
to fp32 and not meant for training a model's weights (the backward is plain fp32: dx = g·W, dW = gᵀ·x, db = Σg).

Shapes: x [..., in] float32, weight [out, in] float32, bias [out] float32 or None; y [..., out] float32.

Ops (schemas in csrc/registration.cpp):
  * ``lowrank::bf16x3_pack(weight)``: W_hi and W_lo as AMX B tiles ([⌈out/16⌉, ⌈in/32⌉, 2, 16, 32] bf16), built once
    per weight (a frozen layer packs at conversion: :class:`lowrank.nn.Bf16x3Linear`).
  * ``lowrank::bf16x3_linear(x, weight, bias, packed, activation)``: the C++ CPU kernel on AMX tiles (csrc/cpu/bf16x3_linear.cpp);
    packed None packs inside the call.
  * ``lowrank::bf16x3_linear_triton(x, weight, bias, activation)``: the Triton kernel (kernels/triton/bf16x3_linear.py), which
    splits both operands in registers (three ``tl.dot`` per tile).
No CUDA kernel: on NVIDIA GPUs fp32 GEMMs already have TF32 / cuBLAS emulation paths, and none can run here.
"""
from __future__ import annotations

import torch

from lowrank.ops._backends import Backend, cpu_isa, has_kernel, select, triton_reasons
from lowrank.reference import bf16x3_linear as _reference
from lowrank.reference.bf16x3_linear import activate as _activate

__all__ = ["bf16x3_linear", "pack_bf16x3", "BACKENDS"]


# ---- fake (meta) implementations -------------------------------------------------------------------------
def _packed_shape(weight_shape, gated: bool) -> tuple[int, ...]:
    out, in_ = weight_shape
    tiles = 2 * ((out // 2 + 15) // 16) if gated else (out + 15) // 16
    return (tiles, (in_ + 31) // 32, 2, 16, 32)


def _out_features(weight, activation) -> int:
    return weight.shape[0] // 2 if activation == "swiglu" else weight.shape[0]


@torch.library.register_fake("lowrank::bf16x3_pack")
def _fake_pack(weight, gated=False):
    return weight.new_empty(_packed_shape(weight.shape, gated), dtype=torch.bfloat16)


@torch.library.register_fake("lowrank::bf16x3_linear")
def _fake_forward(x, weight, bias, packed, activation):
    return x.new_empty((x.shape[0], _out_features(weight, activation)))


@torch.library.register_fake("lowrank::bf16x3_linear_triton")
def _fake_forward_triton(x, weight, bias, activation):
    return x.new_empty((x.shape[0], _out_features(weight, activation)))


# ---- autograd: the fp32 linear's own gradients ---------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    ctx.activation = inputs[-1]
    ctx.save_for_backward(x, weight, bias if ctx.activation != "none" else None)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    if ctx.activation != "none":
        # the pre-activation is recomputed in fp32 rather than kept alive from the forward
        with torch.enable_grad():
            z = torch.nn.functional.linear(x.detach(), weight.detach(), None if bias is None else bias.detach())
            z.requires_grad_(True)
            (grad,) = torch.autograd.grad(_activate(z, ctx.activation), z, grad)
    dx = grad @ weight if need[0] else None
    dw = grad.t() @ x if need[1] else None
    db = grad.sum(0) if ctx.has_bias and need[2] else None
    return (dx, dw, db) + (None,) * (len(need) - 3)


torch.library.register_autograd("lowrank::bf16x3_linear", _backward, setup_context=_setup_context)
torch.library.register_autograd("lowrank::bf16x3_linear_triton", _backward, setup_context=_setup_context)


class _TorchBackend(torch.autograd.Function):
    """The reference forward with the ops' gradients (the reference's own autograd would differentiate through
    the rounding of the halves and give W_hi + W_lo instead of W)."""

    @staticmethod
    def forward(x, weight, bias, activation):
        return _reference(x, weight, bias, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad)


# ---- backends ----------------------------------------------------------------------------------------------
def _cpp_probe(device_type: str) -> tuple[str, ...]:
    reasons = has_kernel("lowrank::bf16x3_linear", device_type)
    if not reasons and cpu_isa() != "amx":
        reasons = (f"the CPU kernel runs on AMX-BF16 tiles; this CPU's level is {cpu_isa()!r} (LOWRANK_MAX_CPU_ISA "
                   "can only lower it)",)
    return reasons


def _triton_probe(device_type: str) -> tuple[str, ...]:
    reasons = triton_reasons(device_type)
    if not reasons:
        import lowrank.kernels.triton.bf16x3_linear  # noqa: F401  (registers the kernel)
    return reasons


BACKENDS: tuple[Backend, ...] = (
    Backend("cpp", ("cpu",), (torch.float32,),
            lambda x, w, b, p, act: torch.ops.lowrank.bf16x3_linear(x, w, b, p, act), _cpp_probe),
    Backend("triton", ("cuda", "cpu"), (torch.float32,),
            lambda x, w, b, p, act: torch.ops.lowrank.bf16x3_linear_triton(x, w, b, act), _triton_probe),
    Backend("torch", ("cpu", "cuda"), (torch.float32,), lambda x, w, b, p, act: _TorchBackend.apply(x, w, b, act)),
)


ACTIVATIONS = ("none", "gelu", "swiglu")


def _validate(x, weight, bias, packed, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"bf16x3_linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bf16x3_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("packed", packed)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"bf16x3_linear: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError("bf16x3_linear: x must be [..., in], got a 0-D tensor")
    if weight.dim() != 2:
        raise ValueError(f"bf16x3_linear: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    for name, t in (("x", x), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if t.dtype != torch.float32:
            raise TypeError(f"bf16x3_linear: {name} must be float32 (the op computes an fp32 linear), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"bf16x3_linear: {name} is on {t.device} but x is on {x.device}")
    out, in_ = weight.shape
    if x.shape[-1] != in_:
        raise ValueError(f"bf16x3_linear: x.shape[-1] = {x.shape[-1]} does not match weight [out={out}, in={in_}]")
    if activation == "swiglu" and out % 2:
        raise ValueError(f"bf16x3_linear: activation 'swiglu' needs weight = [gate; up] with an even number of rows, "
                         f"got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (out,):
        raise ValueError(f"bf16x3_linear: bias must be [out={out}], got shape {tuple(bias.shape)}")
    if packed is not None:
        gated = activation == "swiglu"
        want = _packed_shape(weight.shape, gated)
        if packed.dtype != torch.bfloat16 or tuple(packed.shape) != want or packed.device != x.device:
            raise ValueError(f"bf16x3_linear: packed must be pack_bf16x3(weight, gated={gated}), a bfloat16 tensor "
                             f"of shape {want} on {x.device}; got {packed.dtype} {tuple(packed.shape)} on "
                             f"{packed.device}")


def pack_bf16x3(weight: torch.Tensor, *, gated: bool = False) -> torch.Tensor:
    """W_hi and W_lo of a float32 ``weight [out, in]`` in the tile layout the CPU kernel reads.

    Returns a bfloat16 tensor ``[⌈out/16⌉, ⌈in/32⌉, 2, 16, 32]`` (no gradient); with ``gated`` (for
    ``activation="swiglu"``, weight = [gate; up] [2H, in]) ``[2·⌈H/16⌉, ...]`` with gate and up tiles in pairs. Pack
    once for a frozen weight and pass it as ``packed=``; repack whenever the weight changes (the kernel cannot tell).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"pack_bf16x3: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(f"pack_bf16x3: weight must be a 2-D float32 CPU tensor [out, in], got {weight.dtype} "
                         f"{tuple(weight.shape)} on {weight.device}")
    if gated and weight.shape[0] % 2:
        raise ValueError(f"pack_bf16x3: a gated weight stacks gate and up rows ([2H, in]), got {tuple(weight.shape)}")
    with torch.no_grad():
        return torch.ops.lowrank.bf16x3_pack(weight, gated)


def bf16x3_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  packed: torch.Tensor | None = None, activation: str = "none", backend: str = "auto") -> torch.Tensor:
    """fp32 ``x·weightᵀ + bias`` computed from bf16 halves of both operands (three bf16 products, fp32 sums).

    .. math:: y = x_{hi} W_{hi}^\\top + x_{hi} W_{lo}^\\top + x_{lo} W_{hi}^\\top + b, \\quad
              v_{hi} = \\mathrm{bf16}(v),\\; v_{lo} = \\mathrm{bf16}(v - v_{hi})

    Agrees with fp32 ``F.linear`` to ~1e-5 relative (see the module docstring); not bit-identical.

    Args:
        x: ``[..., in]`` float32.
        weight: ``[out, in]`` float32.
        bias: ``[out]`` float32 or None.
        packed: :func:`pack_bf16x3` of ``weight`` (CPU kernel only; other backends ignore it), or None to pack in
            the call (costs about one pass over the weight).
        activation: "none"; "gelu" for ``F.gelu(y)`` (exact erf form) applied in the kernel's epilogue, so that a
            Linear + GELU (BERT's FFN) writes its output once; or "swiglu" for a gated MLP's first half: weight =
            [gate; up] ([2H, in]), bias [2H] or None, result ``silu(y_gate) · y_up`` ([..., H]; Llama's MLP).
        backend: "auto" (cpp on CPUs with AMX, then triton, then torch) or one of "cpp", "triton", "torch"; a named
            backend that cannot run raises :class:`~lowrank.BackendUnavailableError` with the reasons.

    Returns:
        ``[..., out]`` float32. Differentiable w.r.t. x, weight and bias (fp32 linear gradients).

    Raises:
        TypeError: non-tensors or a dtype other than float32.
        ValueError: shape mismatch, tensors on different devices, a packed weight of the wrong shape.
    """
    _validate(x, weight, bias, packed, activation)
    impl = select("bf16x3_linear", BACKENDS, backend, x.device, x.dtype)
    lead = x.shape[:-1]
    y = impl.fn(x.reshape(-1, x.shape[-1]), weight, bias, packed, activation)
    return y.reshape(*lead, _out_features(weight, activation))
