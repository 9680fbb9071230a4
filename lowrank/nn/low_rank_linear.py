"""``LowRankLinear``: a Linear layer whose weight is stored as a rank-k product.

    y = (x·Vᵀ)·Uᵀ + b,     W ≈ U·V

Shapes: x [..., in], u U [out, k], v V [k, in], bias b [out], y [..., out]. It costs k·(in + out) (+ out)
parameters and 2·k·(in + out) flops a token against in·out (+ out) and 2·in·out for the dense layer, so it
pays when k < in·out / (in + out).

Conversions return new modules: :meth:`LowRankLinear.from_linear` (truncated SVD, optionally in a data-aware
metric: W·S is factorized for an input-side transform S, e.g. SVD-LLM's whitening S = chol(XᵀX) or ASVD's
diagonal activation scaling, and mapped back by S⁻¹, see :mod:`lowrank.compress.spectra`),
:meth:`LowRankLinear.from_factors` and :meth:`LowRankLinear.dense`.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LowRankLinear"]


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LowRankLinear: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"LowRankLinear: {name} must be >= 1, got {value}")
    return value


class LowRankLinear(nn.Module):
    """Linear layer with a factored weight, ``y = (x·vᵀ)·uᵀ + bias``.

    Args:
        in_features, out_features: layer sizes (n, m).
        rank: k, 1 ≤ k ≤ min(m, n).
        bias: whether the layer has a bias [m].
        device, dtype: of the parameters.

    Parameters: ``u`` [m, k], ``v`` [k, n], ``bias`` [m] or None. A fresh module is initialized so that U·V
    has the variance of ``nn.Linear``'s default init. ``forward`` never changes module state.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        n = _check_size("in_features", in_features)
        m = _check_size("out_features", out_features)
        k = _check_size("rank", rank)
        if k > min(m, n):
            raise ValueError(f"LowRankLinear: rank must be <= min(out_features, in_features) = {min(m, n)}, "
                             f"got {k}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = n, m, k
        self.u = nn.Parameter(torch.empty(m, k, **kw))
        self.v = nn.Parameter(torch.empty(k, n, **kw))
        self.bias = nn.Parameter(torch.empty(m, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Var((U·V)ᵢⱼ) = k·Var(u)·Var(v) = 1/(3n), the variance of nn.Linear's Kaiming-uniform(a=√5) weight.

        v ~ U(±1/√n) (Var 1/(3n)) and u ~ U(±√(3/k)) (Var 1/k); the bias as in nn.Linear.
        """
        if self.u.is_meta:
            return
        bound_v = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.v, -bound_v, bound_v)
        nn.init.uniform_(self.u, -math.sqrt(3 / self.rank), math.sqrt(3 / self.rank))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound_v, bound_v)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor | None = None) -> "LowRankLinear":
        """A module holding copies of ``u`` [m, k], ``v`` [k, n] and ``bias`` [m] (the inputs are not
        aliased)."""
        for name, t in (("u", u), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"LowRankLinear.from_factors: {name} must be a torch.Tensor, "
                                f"got {type(t).__name__}")
            if t.dim() != 2 or not t.is_floating_point():
                raise ValueError(f"LowRankLinear.from_factors: {name} must be a 2-D floating tensor, got "
                                 f"{tuple(t.shape)} {t.dtype}")
        m, k = u.shape
        if v.shape[0] != k:
            raise ValueError(f"LowRankLinear.from_factors: v must be [{k}, in] to match u [{m}, {k}], "
                             f"got {tuple(v.shape)}")
        if v.dtype != u.dtype or v.device != u.device:
            raise ValueError(f"LowRankLinear.from_factors: u and v must share dtype and device, got "
                             f"{u.dtype}/{u.device} and {v.dtype}/{v.device}")
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (m,):
                got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"LowRankLinear.from_factors: bias must be a [{m}] tensor, got {got}")
        n = v.shape[1]
        mod = cls(n, m, k, bias=bias is not None, dtype=u.dtype, device="meta")
        # Row-major copies whatever the factorization returned (SVD factors are often column-major): the GEMMs
        # then see one layout, so a saved and reloaded model computes bit for bit what the original did.
        mod.u = nn.Parameter(u.detach().clone(memory_format=torch.contiguous_format))
        mod.v = nn.Parameter(v.detach().clone(memory_format=torch.contiguous_format))
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().to(device=u.device, dtype=u.dtype).clone())
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, *, scale: torch.Tensor | None = None,
                    row_scale: torch.Tensor | None = None) -> "LowRankLinear":
        """Rank-``rank`` truncated SVD of ``linear.weight`` (W [m, n]), optionally in a data-aware metric.

        Without ``scale`` this is Eckart–Young: W ≈ U·V with U = P_k·√Σ_k, V = √Σ_k·Q_kᵀ from W = P·Σ·Qᵀ.
        With an input-side ``scale`` S ([n] positive diagonal, or [n, n] invertible, typically the lower
        Cholesky factor of XᵀX/N): W·S = P·Σ·Qᵀ and V = √Σ_k·Q_kᵀ·S⁻¹, the rank-k Ŵ minimizing ‖(W − Ŵ)·S‖_F,
        i.e. the output error on activations whose Gram matrix is S·Sᵀ (SVD-LLM; ASVD for a diagonal S).
        ``row_scale`` d [m] weights output rows (FWSVD): D·W·S is factorized and U = D⁻¹·P_k·√Σ_k.

        Computed in float64; the factors take the weight's dtype and device, the bias is copied. ``linear`` is
        not modified.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``; rank not an int.
            ValueError: rank outside [1, min(m, n)]; non-finite weight; badly shaped / non-invertible scale.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LowRankLinear.from_linear: linear must be an nn.Linear, "
                            f"got {type(linear).__name__}")
        from lowrank.compress.spectra import check_rank, check_weight, factorize  # lazy: compress imports nn

        w = check_weight(linear.weight, "linear.weight")
        m, n = w.shape
        check_rank(rank, m, n)
        spec = factorize(w, col_transform=scale, row_scale=row_scale)
        u, v = spec.factors(rank)
        bias = None if linear.bias is None else linear.bias.detach()
        kw = {"device": w.device, "dtype": w.dtype}
        return cls.from_factors(u.to(**kw), v.to(**kw), bias)

    def dense_weight(self) -> torch.Tensor:
        """The dense weight U·V [m, n] (detached, in the factors' dtype; computed in fp32 for half types)."""
        u, v = self.u.detach(), self.v.detach()
        if u.dtype in (torch.float16, torch.bfloat16):
            return (u.float() @ v.float()).to(u.dtype)
        return u @ v

    def dense(self) -> nn.Linear:
        """A new ``nn.Linear`` with weight U·V and a copy of the bias."""
        w = self.dense_weight()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                        dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias.detach())
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._low_rank_forward(x)

    def _low_rank_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two skinny GEMMs, x·Vᵀ first: [.., n] → [.., k] → [.., m] costs 2·k·(m + n) flops a token.
        # (One place to route through a compiled lowrank op later.)
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")
