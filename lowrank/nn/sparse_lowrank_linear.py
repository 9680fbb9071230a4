"""Sparse-plus-low-rank linears that never materialize the dense weight.

``SparseLowRankLinear``: y = x·Aᵀ·Bᵀ + x·Sᵀ + b, W = B·A + S (SLTrain for pretraining from scratch; LOST's
SVD + sparse-residual initialisation from a trained Linear). ``SparseAdapterLinear``: y = base(x) + x·Sᵀ, a
sparse high-rank adapter on a frozen base layer (SHiRA), reading the base weight in place (no copy).

Shapes: x [..., in], lora_a A [r, in], lora_b B [out, r], s_values [nnz] on a fixed
:class:`~lowrank.ops.SparseLayout` of shape (out, in), bias [out]. Both run
:func:`lowrank.ops.sparse_lowrank_linear`.

Parameters and memory are what the layer holds: r·(in + out) + nnz (+ out) values, plus the support (on the
CPU 2·nnz + 4·(out + 1) bytes: uint16 columns, int32 row pointers; a CUDA layout also keeps the int32 CSC
transpose its backward reads; :meth:`memory_report`). Checkpoints
hold the values and, in the module's extra state, the layout record (version, kind, shape, nnz, seed; the
indices themselves only for non-random supports): a random support is regenerated from its seed exactly as
SLTrain does.

References: Han et al., "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
pretraining" (2024); Li et al., "LOST: Low-rank and Sparse Pre-training for Large Language Models" (2025);
Bhardwaj et al., "Sparse High Rank Adapters" (SHiRA, 2024).
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from lowrank.ops import SparseLayout, sparse_lowrank_linear
from lowrank.ops.sparse_layout import check_density
from lowrank.reference.sparse_lowrank_linear import dense_sparse

__all__ = ["SparseLowRankLinear", "SparseAdapterLinear"]

_INDEX_NAMES = ("row_ptr", "col_idx")


def _check_size(cls: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{cls}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{cls}: {name} must be >= 1, got {value}")
    return int(value)


class _SparseSupport(nn.Module):
    """Holds a SparseLayout as non-persistent buffers (so .to()/.cuda() move it) and its checkpoint record."""

    layout: SparseLayout

    def _set_layout(self, layout: SparseLayout) -> None:
        self.layout = layout
        for name in _INDEX_NAMES:
            self.register_buffer(name, getattr(layout, name), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.row_ptr is not self.layout.row_ptr or self.col_idx is not self.layout.col_idx:
            # The buffers were replaced by moved copies: rebuild the layout on their device (its column index
            # dtype and, on CUDA, its CSC transpose depend on the device).
            old = self.layout
            self._set_layout(SparseLayout(old.shape, self.row_ptr, self.col_idx, kind=old.kind, seed=old.seed))
        return self

    def get_extra_state(self) -> dict:
        return {"layout": self.layout.state()}

    def set_extra_state(self, state: dict) -> None:
        layout = SparseLayout.from_state(state["layout"]).to(self.s_values.device)
        if layout.shape != self.layout.shape or layout.nnz != self.s_values.shape[0]:
            raise ValueError(f"{type(self).__name__}: checkpoint layout {layout} does not match this "
                             f"module's shape {self.layout.shape} and {self.s_values.shape[0]} values")
        self._set_layout(layout)

    def memory_report(self) -> dict:
        """Counts and bytes: parameters (all, incl. frozen ones the module owns), the support's indices (CSR,
        plus the CSC transpose a CUDA layout keeps), SLTrain's int64 flat indices and the dense [out, in]
        weight of the same dtype for comparison."""
        params = sum(p.numel() for p in self.parameters())
        pbytes = sum(p.numel() * p.element_size() for p in self.parameters())
        out, in_ = self.layout.shape
        return {"parameters": params, "parameter_bytes": pbytes,
                "index_bytes": self.layout.index_bytes(),
                "index_bytes_int64_flat": 8 * self.layout.nnz,
                "total_bytes": pbytes + self.layout.index_bytes(),
                "dense_weight_bytes": out * in_ * self.s_values.element_size()}


class SparseLowRankLinear(_SparseSupport):
    """``y = (x·Aᵀ)·Bᵀ + x·Sᵀ + bias`` with S on a fixed support (see the module docstring).

    Args:
        in_features, out_features: layer sizes (n, m).
        rank: r, 1 ≤ r ≤ min(m, n).
        density: fraction of the m·n entries in S's support, in [0, 1]; nnz = int(density·m·n).
        bias: whether the layer has a bias [m].
        seed: seed of SLTrain's random support (``SparseLayout.random``).
        layout: an explicit support of shape (m, n) instead of the random one (``density`` is then ignored).

    A fresh module is initialised as SLTrain's: A Kaiming-uniform (a = √5), B = 0, values and bias
    U(±1/√n) and U(±1/√m). ``forward`` never changes module state.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, density: float, bias: bool = True, *,
                 seed: int = 0, layout: SparseLayout | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        n = _check_size("SparseLowRankLinear", "in_features", in_features)
        m = _check_size("SparseLowRankLinear", "out_features", out_features)
        r = _check_size("SparseLowRankLinear", "rank", rank)
        if r > min(m, n):
            raise ValueError("SparseLowRankLinear: rank must be <= min(out_features, in_features) = "
                             f"{min(m, n)}, got {r}")
        density = check_density(density, "SparseLowRankLinear: density")
        if layout is None:
            layout = SparseLayout.random(m, n, density, seed=seed)
        elif not isinstance(layout, SparseLayout) or layout.shape != (m, n):
            raise ValueError(f"SparseLowRankLinear: layout must be a SparseLayout of shape ({m}, {n}), "
                             f"got {layout!r}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = n, m, r
        self.lora_a = nn.Parameter(torch.empty(r, n, **kw))
        self.lora_b = nn.Parameter(torch.empty(m, r, **kw))
        self.s_values = nn.Parameter(torch.empty(layout.nnz, **kw))
        self.bias = nn.Parameter(torch.empty(m, **kw)) if bias else None
        self._set_layout(layout.to(self.s_values.device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """SLTrain's initialisation (see the class docstring)."""
        if self.lora_a.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)
        nn.init.uniform_(self.s_values, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(self.out_features), 1 / math.sqrt(self.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_lowrank_linear(x, self.lora_a, self.lora_b, self.s_values, self.layout, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, density: float, *, support: str = "random",
                    init: str = "svd", seed: int = 0) -> "SparseLowRankLinear":
        """A new layer approximating ``linear`` (not modified), W [m, n] ≈ B·A + S.

        ``init="svd"`` (LOST): B·A is the rank-r truncated SVD of W (B = U_r·√Σ_r, A = √Σ_r·V_rᵀ, computed in
        float64) and S holds the residual R = W − B·A on the support. ``init="random"``: SLTrain's random
        initialisation of the factors and values (pretraining from scratch in ``linear``'s shape); the bias is
        copied either way.

        ``support``: "random" (SLTrain's uniform support, ``seed``), "topk" (the int(density·m·n) largest |R|
        entries; |W| for random init), "channel" (LOST: the round(density·n) input columns of largest residual
        energy ‖R[:, j]‖², every row of them).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLowRankLinear.from_linear: linear must be an nn.Linear, got "
                            f"{type(linear).__name__}")
        if support not in ("random", "topk", "channel"):
            raise ValueError("SparseLowRankLinear.from_linear: support must be 'random', 'topk' or "
                             f"'channel', got {support!r}")
        if init not in ("svd", "random"):
            raise ValueError(f"SparseLowRankLinear.from_linear: init must be 'svd' or 'random', got {init!r}")
        m, n = linear.weight.shape
        w = linear.weight.detach()
        density = check_density(density, "SparseLowRankLinear.from_linear: density")
        r = _check_size("SparseLowRankLinear.from_linear", "rank", rank)
        if r > min(m, n):
            raise ValueError(f"SparseLowRankLinear.from_linear: rank must be <= min(out, in) = {min(m, n)}, "
                             f"got {r}")
        resid = w.double().cpu()
        a = b = None
        if init == "svd":
            u, s, vh = torch.linalg.svd(resid, full_matrices=False)
            root = s[:r].sqrt()
            b, a = u[:, :r] * root, root[:, None] * vh[:r]
            resid = resid - b @ a
        if support == "random":
            layout = SparseLayout.random(m, n, density, seed=seed)
        elif support == "topk":
            layout = SparseLayout.topk(resid, density)
        else:
            k = round(density * n)
            cols = torch.topk(resid.square().sum(0), k).indices if k else torch.zeros(0, dtype=torch.long)
            layout = SparseLayout.channels(m, n, torch.sort(cols).values, dim=1)
        mod = cls(n, m, r, density, bias=linear.bias is not None, layout=layout, dtype=w.dtype,
                  device=w.device)
        with torch.no_grad():
            if init == "svd":
                mod.lora_a.copy_(a)
                mod.lora_b.copy_(b)
                mod.s_values.copy_(resid.flatten()[layout.flat_indices()])
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        return mod

    @classmethod
    def from_sltrain(cls, state: Mapping[str, torch.Tensor], *, scaling: float) -> "SparseLowRankLinear":
        """A layer from the ``state_dict`` of SLTrain's ``SpLoRaLinear`` (no permutation of the values).

        SLTrain stores ``lora_A`` [r, in], ``lora_B`` [out, r], ``sparse_value`` [nnz], ``sparse_index``
        (sorted int64 row-major positions: the CSR order) and ``bias``, and computes
        y = x·(s·A)ᵀ·Bᵀ + x·Sᵀ + b with s = ``scaling`` (``lora_alpha / r``, or ``tanh`` of its trainable
        ``scaling``); s is folded into ``lora_a``. The indices are validated (sorted, unique, in range) and
        kept in the checkpoint record: SLTrain drew them from the global RNG, so no seed regenerates them.
        """
        for key in ("lora_A", "lora_B", "sparse_value", "sparse_index"):
            if key not in state:
                raise ValueError(f"SparseLowRankLinear.from_sltrain: state has no {key!r} "
                                 f"(keys: {sorted(state)})")
        a, b = state["lora_A"], state["lora_B"]
        values, bias = state["sparse_value"], state.get("bias")
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"SparseLowRankLinear.from_sltrain: lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)} are not [r, in] and [out, r]")
        (r, n), m = a.shape, b.shape[0]
        layout = SparseLayout.from_flat(state["sparse_index"], (m, n))
        if values.shape != (layout.nnz,):
            raise ValueError(f"SparseLowRankLinear.from_sltrain: sparse_value {tuple(values.shape)} does not "
                             f"match sparse_index [{layout.nnz}]")
        mod = cls(n, m, r, layout.density, bias=bias is not None, layout=layout, dtype=a.dtype,
                  device=a.device)
        with torch.no_grad():
            mod.lora_a.copy_(a * scaling)
            mod.lora_b.copy_(b)
            mod.s_values.copy_(values)
            if bias is not None:
                mod.bias.copy_(bias)
        return mod

    def dense(self) -> torch.Tensor:
        """The materialized weight W = B·A + S [out, in] (for inspection; the layer never forms it)."""
        with torch.no_grad():
            return self.lora_b @ self.lora_a + dense_sparse(self.s_values, self.layout)

    def merged(self) -> nn.Linear:
        """A new ``nn.Linear`` computing the same function with the dense weight."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.dense())
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone())
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"nnz={self.layout.nnz} ({self.layout.density:.3%}, {self.layout.kind}), "
                f"bias={self.bias is not None}")


class SparseAdapterLinear(_SparseSupport):
    """SHiRA-style sparse adapter: ``y = base(x) + x·Sᵀ`` with S on a fixed support, base frozen.

    Args:
        base: the ``nn.Linear`` to adapt; it is referenced, not copied (its weight is read in place), and its
            parameters are set to ``requires_grad=False`` unless ``freeze_base=False``.
        layout: the support, shape (out, in) (``SparseLayout.random`` / ``.topk`` / ``.from_mask``).

    ``s_values`` starts at zero, so a fresh adapter reproduces ``base``. Trainable parameters: nnz values.
    """

    def __init__(self, base: nn.Linear, layout: SparseLayout, *, freeze_base: bool = True) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SparseAdapterLinear: base must be an nn.Linear, got {type(base).__name__}")
        m, n = base.weight.shape
        if not isinstance(layout, SparseLayout) or layout.shape != (m, n):
            raise ValueError(f"SparseAdapterLinear: layout must be a SparseLayout of shape ({m}, {n}), "
                             f"got {layout!r}")
        self.base = base
        if freeze_base:
            base.requires_grad_(False)
        w = base.weight
        self.in_features, self.out_features = n, m
        self.s_values = nn.Parameter(torch.zeros(layout.nnz, dtype=w.dtype, device=w.device))
        # Rank-0 factors: the op's low-rank GEMMs then add exact zeros (empty tensors, no memory).
        self.register_buffer("_no_a", torch.empty(0, n, dtype=w.dtype, device=w.device), persistent=False)
        self.register_buffer("_no_b", torch.empty(m, 0, dtype=w.dtype, device=w.device), persistent=False)
        self._set_layout(layout.to(w.device))

    @classmethod
    def from_linear(cls, base: nn.Linear, density: float, *, support: str = "random",
                    seed: int = 0) -> "SparseAdapterLinear":
        """Adapter with a "random" (seeded, SLTrain/SHiRA-rand) or "topk" (largest |W|: SHiRA-WM) support."""
        if not isinstance(base, nn.Linear):
            raise TypeError("SparseAdapterLinear.from_linear: base must be an nn.Linear, got "
                            f"{type(base).__name__}")
        m, n = base.weight.shape
        if support == "random":
            layout = SparseLayout.random(m, n, density, seed=seed)
        elif support == "topk":
            layout = SparseLayout.topk(base.weight.detach(), density)
        else:
            raise ValueError("SparseAdapterLinear.from_linear: support must be 'random' or 'topk', got "
                             f"{support!r}")
        return cls(base, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight) + sparse_lowrank_linear(x, self._no_a, self._no_b, self.s_values,
                                                                     self.layout, self.base.bias)

    def delta(self) -> torch.Tensor:
        """S as a dense [out, in] tensor (inspection only)."""
        with torch.no_grad():
            return dense_sparse(self.s_values, self.layout)

    def merged(self) -> nn.Linear:
        """A new ``nn.Linear`` with weight W + S (the base is not modified)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.base.weight.detach() + self.delta())
        if self.base.bias is not None:
            lin.bias = nn.Parameter(self.base.bias.detach().clone())
        return lin

    def extra_repr(self) -> str:
        return f"nnz={self.layout.nnz} ({self.layout.density:.3%}, {self.layout.kind})"
