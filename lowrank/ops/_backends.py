"""Backend records and selection.

Every op owns a small table of :class:`Backend` records ("cpp", "cuda", "triton", "torch"), each declaring the
devices and dtypes it serves and a probe that says why it cannot run. ``select`` takes the first backend with no
reasons against it for ``backend="auto"`` (never Triton for CPU tensors: there it runs only in its interpreter, a
testing aid); a named backend that cannot run raises :class:`BackendUnavailableError` listing every reason.
Selection depends only on the device, dtype and what was built or installed, never on mutable globals or
environment switches of ours, and there is no silent fallback.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lowrank import _build


class BackendUnavailableError(RuntimeError):
    """A named backend cannot run the requested call; the message lists why."""


@dataclass(frozen=True)
class Backend:
    """One way to run an op.

    Attributes:
        name: "cpp", "cuda", "triton" or "torch".
        devices: device types it runs on (``"cpu"``, ``"cuda"``).
        dtypes: floating dtypes it supports.
        fn: the implementation, called with the op's validated arguments.
        probe: returns reasons it cannot run on ``device`` (empty when it can). Only build and install facts.
    """

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    fn: Callable
    probe: Callable[[str], tuple[str, ...]] = field(default=lambda device_type: ())

    def reasons(self, device: torch.device, dtype: torch.dtype) -> list[str]:
        out = []
        if device.type not in self.devices:
            out.append(f"runs on {'/'.join(self.devices)}, not {device.type}")
        if dtype not in self.dtypes:
            out.append(f"supports {', '.join(str(d).replace('torch.', '') for d in self.dtypes)}, not "
                       f"{str(dtype).replace('torch.', '')}")
        if not out:
            out.extend(_probe(self.probe, device.type))
        return out


@torch.compiler.assume_constant_result
def _probe(probe: Callable[[str], tuple[str, ...]], device_type: str) -> tuple[str, ...]:
    # Build/install facts do not change during a process; torch.compile treats the answer as a constant.
    return tuple(probe(device_type))


def autocast_dtypes(device_type: str) -> Callable[[torch.Tensor], torch.dtype]:
    """``t -> the dtype the op's kernel sees for t``. Under ``torch.autocast`` on ``device_type`` the ops' autocast
    rules (csrc/autocast/) cast fp32/bf16/fp16 tensors on that device to the region's dtype, as F.linear's rule
    does; fp64 tensors and tensors on other devices are not cast. Outside autocast: ``t.dtype``."""
    if not torch.is_autocast_enabled(device_type):
        return lambda t: t.dtype
    low = torch.get_autocast_dtype(device_type)
    return lambda t: (low if t.dtype in (torch.float32, torch.bfloat16, torch.float16)
                      and t.device.type == device_type else t.dtype)


def check_like_x(op: str, x: torch.Tensor, named: Sequence[tuple[str, torch.Tensor]], *,
                 dtype_note: str = "all tensors must share one dtype") -> None:
    """Every ``(name, tensor)`` of ``named`` must have the dtype the kernel sees for ``x`` (under torch.autocast:
    :func:`autocast_dtypes`) and live on x's device; TypeError / ValueError naming the argument otherwise."""
    eff = autocast_dtypes(x.device.type)
    for name, t in named:
        if eff(t) != eff(x):
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has dtype {x.dtype}; {dtype_note}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def check_factor_shapes(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        lora_a: torch.Tensor, lora_b: torch.Tensor, *, k: str = "r",
                        k_empty: str = "have rank r >= 1") -> tuple[int, int, int]:
    """Shapes of a linear with a rank-k update: weight [out, in] non-empty, x [..., in], lora_a [k, in] with
    k >= 1, lora_b [out, k], bias [out] or None. Returns (out, in, k); ValueError naming the argument otherwise.

    ``k`` names the inner dimension in messages ("r" for LoRA, "E" for rank-1 experts) and ``k_empty`` completes
    "lora_a must ..." when it is 0.
    """
    out, in_ = weight.shape
    kk = lora_a.shape[0]
    if out == 0 or in_ == 0:
        raise ValueError(f"{op}: weight must be non-empty [out, in], got shape {tuple(weight.shape)}")
    if kk == 0:
        raise ValueError(f"{op}: lora_a must {k_empty}, got shape {tuple(lora_a.shape)}")
    if x.shape[-1] != in_:
        raise ValueError(f"{op}: x.shape[-1] = {x.shape[-1]} does not match weight [out={out}, in={in_}]")
    if lora_a.shape[1] != in_:
        raise ValueError(f"{op}: lora_a must be [{k}, in={in_}], got shape {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (out, kk):
        raise ValueError(f"{op}: lora_b must be [out={out}, {k}={kk}] to match weight and lora_a, "
                         f"got shape {tuple(lora_b.shape)}")
    if bias is not None and bias.shape[0] != out:
        raise ValueError(f"{op}: bias must be [out={out}], got shape {tuple(bias.shape)}")
    return out, in_, kk


def select(op: str, table: Sequence[Backend], requested: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """Pick the backend that runs ``op`` for this device and dtype.

    Raises:
        ValueError: ``requested`` is not a backend name of this op.
        BackendUnavailableError: the named backend (or, for "auto", every backend) cannot run; lists why.
    """
    names = [b.name for b in table]
    if requested != "auto" and requested not in names:
        raise ValueError(f"{op}: backend must be 'auto' or one of {names}, got {requested!r}")
    candidates = table if requested == "auto" else [b for b in table if b.name == requested]
    why = {}
    for b in candidates:
        if requested == "auto" and b.name == "triton" and device.type == "cpu":
            # On CPU tensors Triton runs only in its interpreter, a testing aid thousands of times slower than any
            # other backend: "auto" means the fastest that runs, so it is never that; backend="triton" still is.
            why[b.name] = ["'auto' never picks Triton for CPU tensors (there it runs only in its interpreter); "
                           "pass backend='triton' to run it"]
            continue
        reasons = b.reasons(device, dtype)
        if not reasons:
            return b
        why[b.name] = reasons
    detail = "; ".join(f"{name}: {', '.join(r)}" for name, r in why.items())
    raise BackendUnavailableError(
        f"{op}: no backend can run on {device.type} with dtype {str(dtype).replace('torch.', '')} "
        f"(requested {requested!r}): {detail}")


def has_kernel(qualname: str, device_type: str) -> tuple[str, ...]:
    """Reasons why the compiled op ``qualname`` has no kernel for ``device_type`` in this build."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    if device_type == "cuda" and not _build.with_cuda:
        return (f"lowrank._C was built without CUDA (torch {_build.torch_version}, CUDA {_build.torch_cuda_version})",)
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
        return (f"{qualname} has no {key} kernel in this build",)
    return ()


def triton_reasons(device_type: str) -> tuple[str, ...]:
    """Reasons why Triton kernels cannot run on ``device_type`` here."""
    if importlib.util.find_spec("triton") is None:
        return ("triton is not installed (pip install 'lowrank[triton]')",)
    import triton

    if device_type == "cpu" and not triton.knobs.runtime.interpret:
        return ("Triton runs on CPU tensors only under its interpreter (TRITON_INTERPRET=1 before import)",)
    if device_type == "cuda" and not torch.cuda.is_available():
        return ("no CUDA device",)
    return ()


def cpu_isa() -> str:
    """The instruction-set level the C++ CPU kernels run at: "base", "avx2", "avx512", "avx512_bf16" or "amx"
    (read once from CPUID, capped by the environment variable LOWRANK_MAX_CPU_ISA)."""
    return _cpu_isa()


@torch.compiler.assume_constant_result
def _cpu_isa() -> str:
    return torch.ops.lowrank.cpu_isa()
