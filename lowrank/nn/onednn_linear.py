"""OneDnnLinear: a float32 ``nn.Linear`` whose product runs on oneDNN's fp32 GEMM (:func:`lowrank.ops.onednn_linear`).

y = x·Wᵀ + b with x [..., in], W [out, in], b [out] or none, float32 on the CPU: the math of ``nn.Linear``, summed
by another GEMM (faster on some CPUs, 2–3× less exact than MKL's against fp64; see the op's docstring for the
measurements). :func:`use_onednn` swaps every float32 Linear of a model; the rerankers' ``matmul="onednn"`` uses it.
"""
from __future__ import annotations

import torch
from torch import nn

from lowrank.nn._swap import float32_linears
from lowrank.ops._backends import select
from lowrank.ops.onednn_linear import BACKENDS, onednn_linear


class OneDnnLinear(nn.Module):
    """A float32 ``nn.Linear`` on oneDNN's fp32 GEMM. ``weight`` [out, in] and ``bias`` [out] (or None) are ordinary
    Parameters, shared with the Linear it was made from by :meth:`from_linear`; gradients flow as through
    ``nn.Linear``. ``backend`` is the op's ("auto", "cpp" = oneDNN, "torch" = F.linear).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        lin = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=torch.float32)
        self.weight, self.bias = lin.weight, lin.bias
        select("onednn_linear", BACKENDS, backend, self.weight.device, torch.float32)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, backend: str = "auto") -> OneDnnLinear:
        """The same layer, sharing ``linear``'s Parameters (no copy). ``linear`` must be float32."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"OneDnnLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        if linear.weight.dtype != torch.float32:
            raise TypeError(f"OneDnnLinear.from_linear: the Linear must be float32, got {linear.weight.dtype}")
        select("onednn_linear", BACKENDS, backend, linear.weight.device, torch.float32)
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.in_features, mod.out_features, mod.backend = linear.in_features, linear.out_features, backend
        mod.weight, mod.bias = linear.weight, linear.bias
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"backend={self.backend!r}")


def use_onednn(model: nn.Module, *, backend: str = "auto") -> int:
    """Replace every float32 ``nn.Linear`` (exact type, not subclasses) inside ``model`` by a :class:`OneDnnLinear`
    sharing its Parameters; returns how many. Layers of other dtypes are left as they are. Raises
    :class:`~lowrank.BackendUnavailableError` (before changing anything) when ``backend`` cannot run on a layer's
    device."""
    targets = float32_linears(model, "use_onednn", "onednn_linear", BACKENDS, backend)
    for parent, name, child in targets:
        setattr(parent, name, OneDnnLinear.from_linear(child, backend=backend))
    return len(targets)
