"""``LoRALinear``: a frozen ``nn.Linear`` plus a trainable low-rank update, run by the fused op.

    y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ,    s = alpha / r

Shapes: weight W [out, in], bias b [out], lora_a A [r, in], lora_b B [out, r] (PEFT's ``lora_A`` / ``lora_B``).

Packed layout: W and B are the two column blocks of one row-major [out, in + r] buffer, so ``weight`` and
``lora_b`` are strided views of it (row stride in + r). The CPU kernel then computes the bf16 layer as a single
GEMM, [x | s·x·Aᵀ]·[W | B]ᵀ, with the rank-r expand inside the GEMM's micro-kernel, and the backward's g·[W | B]
gives dx's GEMM and the shrink of g together (``csrc/cpu/augment.cpp``, ``rank_amx.cpp``). Other dtypes gain
nothing from it (fp32 loses oneDNN's base GEMM, which needs a contiguous weight), so the default policy
``pack=None`` packs exactly the bf16 modules, and keeps it so through ``.to(dtype)``; ``pack=True`` / ``False``
force it. Every layout computes the same function; ``is_packed`` tells which one a module has.

B starts at zero, so a fresh module computes the Linear it was built from: bit for bit on the CPU kernel, except
where it picks another GEMM for speed (bf16 with 1–3 tokens; fp32 with 2–64 tokens of weights ≥ 4 M elements),
where it agrees to the GEMM's rounding.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lowrank.ops.lora_linear import lora_linear

__all__ = ["LoRALinear"]


class LoRALinear(nn.Module):
    """Linear layer with a fused LoRA update.

    Args:
        in_features, out_features: layer sizes.
        r: LoRA rank (>= 1).
        alpha: LoRA alpha; ``scaling = alpha / r`` (default ``alpha = r``, i.e. scaling 1).
        bias: whether the base layer has a bias.
        dropout: dropout probability on the LoRA branch's input (PEFT's ``lora_dropout``). While training with
            ``dropout > 0`` the branch sees a different input than the base GEMM, so the layer runs as two
            calls (``F.linear`` + the LoRA branch) instead of the fused op; in eval mode, or with
            ``dropout=0``, it always runs the fused op.
        backend: backend of :func:`lowrank.ops.lora_linear` ("auto", "cpp", "cuda", "triton", "torch").
        freeze_base: base weight and bias get ``requires_grad=False`` (default).
        pack: layout policy (module docstring): None = packed iff the weight is bf16; True / False = always /
            never. Stored as ``self.pack``; ``pack_()`` sets it to True.

    ``forward`` never changes module state; conversions (``from_linear``, ``merged``) return new objects.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float | None = None, *,
                 bias: bool = True, dropout: float = 0.0, backend: str = "auto", freeze_base: bool = True,
                 pack: bool | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"LoRALinear: r must be a positive int, got {r!r}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"LoRALinear: in_features and out_features must be >= 1, got {in_features}, "
                             f"{out_features}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRALinear: dropout must be in [0, 1), got {dropout}")
        alpha = float(r if alpha is None else alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"LoRALinear: alpha must be finite, got {alpha}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r, self.alpha = in_features, out_features, r, alpha
        self.backend = backend
        if pack not in (None, True, False):
            raise TypeError(f"LoRALinear: pack must be None, True or False, got {pack!r}")
        self.pack = pack
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=not freeze_base)
        self.bias = (nn.Parameter(torch.empty(out_features, **kw), requires_grad=not freeze_base)
                     if bias else None)
        self.lora_a = nn.Parameter(torch.empty(r, in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(out_features, r, **kw))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._sync_layout()
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def reset_parameters(self) -> None:
        """nn.Linear's init for the base, PEFT's for the factors (A Kaiming-uniform, B zero)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    @property
    def is_packed(self) -> bool:
        """Whether ``weight`` and ``lora_b`` are the column blocks of one [out, in + r] buffer (see ``pack_``)."""
        w, b = self.weight, self.lora_b
        k, r = self.in_features, self.r
        return (w.dim() == 2 and b.dim() == 2 and w.shape[1] == k and b.shape[1] == r and w.dtype == b.dtype
                and w.device == b.device and w.stride() == (k + r, 1) and b.stride() == (k + r, 1)
                and w.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                and b.storage_offset() == w.storage_offset() + k)

    def _want_packed(self) -> bool:
        return self.pack if self.pack is not None else self.weight.dtype == torch.bfloat16

    @torch.no_grad()
    def _sync_layout(self) -> None:
        """Bring the storage in line with the policy; Parameter objects are kept (``.data`` is re-pointed)."""
        w, b = self.weight, self.lora_b
        if self._want_packed() and not self.is_packed:
            if b.dtype != w.dtype or b.device != w.device:
                raise ValueError(f"LoRALinear: packing needs weight ({w.dtype}, {w.device}) and lora_b "
                                 f"({b.dtype}, {b.device}) in one dtype and device")
            joint = torch.empty(self.out_features, self.in_features + self.r, dtype=w.dtype, device=w.device)
            joint[:, :self.in_features].copy_(w)
            joint[:, self.in_features:].copy_(b)
            self.weight.data = joint[:, :self.in_features]
            self.lora_b.data = joint[:, self.in_features:]
        elif not self._want_packed() and self.is_packed:
            self.weight.data = w.detach().contiguous()
            self.lora_b.data = b.detach().contiguous()

    def pack_(self) -> "LoRALinear":
        """Switch to the packed layout for good (``self.pack = True``), in place; returns ``self``.

        Parameter objects stay the same (optimizers and tied modules keep working); their ``.data`` become views
        of a new buffer holding a copy of both, so storage shared with another module is no longer shared.
        """
        self.pack = True
        self._sync_layout()
        return self

    def _apply(self, fn, recurse: bool = True):
        # nn.Module converts each Parameter on its own, which splits the joint buffer; re-apply the policy.
        out = super()._apply(fn, recurse)
        if self.weight.dtype == self.lora_b.dtype and self.weight.device == self.lora_b.device:
            self._sync_layout()
        return out

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float | None = None, *, dropout: float = 0.0,
                    backend: str = "auto", freeze_base: bool = True, pack: bool | None = None) -> "LoRALinear":
        """Wrap ``linear`` with fresh factors (A Kaiming-uniform, B zero).

        The bias is always shared. The weight is shared (no copy) when the module is not packed; packed (``pack``
        as in the constructor: by default for bf16) it is copied into the [out, in + r] buffer and ``linear``
        itself is left untouched.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, r, alpha, bias=linear.bias is not None, dropout=dropout,
                backend=backend, freeze_base=freeze_base, pack=pack, device="meta", dtype=w.dtype)
        m.weight = nn.Parameter(w.detach(), requires_grad=not freeze_base)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach(), requires_grad=not freeze_base)
        m.lora_a = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=w.dtype))
        m.lora_b = nn.Parameter(torch.zeros(linear.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(m.lora_a, a=math.sqrt(5))
        m._sync_layout()
        return m

    def delta_weight(self) -> torch.Tensor:
        """``s·B·A`` [out, in], computed in fp32 (returned in fp32)."""
        return (self.lora_b.detach().float() @ self.lora_a.detach().float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + s·B·A`` folded in (summed in fp32, stored in the weight's dtype)."""
        w = self.weight.detach()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                        dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_((w.float() + self.delta_weight()).to(w.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias.detach())
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and isinstance(self.dropout, nn.Dropout):
            base = torch.nn.functional.linear(x, self.weight, self.bias)
            return base + self.scaling * torch.nn.functional.linear(
                torch.nn.functional.linear(self.dropout(x), self.lora_a), self.lora_b)
        return lora_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, self.scaling, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")
