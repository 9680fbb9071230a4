"""``Rank1ExpertsLinear``: a frozen ``nn.Linear`` plus a mixture of rank-1 LoRA experts (MoRA / SMoRA).

    y_t = x_t·Wᵀ + b + s·Σ_{e ∈ topk(t)} g_te·(a_e·x_t)·b_e,        s = alpha / E

Shapes: weight W [out, in], bias b [out], lora_a [E, in], lora_b [out, E] (zero at start, so a fresh module
computes its Linear), router [E, in] (gate "router"), router_bias [E] (float32 buffer, not trained).
Gates and selection: :func:`lowrank.ops.rank1_experts_lora`.

Load balancing (auxiliary-loss-free, DeepSeek-V3 / SMoRA): in training mode every forward adds its per-expert
selection counts to the ``expert_counts`` buffer (the one piece of state a forward changes, like BatchNorm's
running statistics; nothing is recorded in eval mode). The training loop calls :meth:`update_bias` after the
optimizer step: ``router_bias_e += rate·sign(mean count − count_e)`` pushes selection towards under-used experts
without touching the gradients; the counters then restart.

Layout: with gate "router", lora_a and router are the two row blocks of one [2E, in] buffer, so the kernel's
shrink against [A; R] reads them in place (no per-call concatenation). Packed layout (``pack``; default: exactly
the bf16 modules): weight and lora_b are the column blocks of one [out, in + E] buffer, and the CPU kernel runs
the layer as one GEMM [x | U]·[W | B]ᵀ (U: the gated activations scattered over the E columns) instead of a base
GEMM plus a pass over y; the weight is then a copy, not shared with the Linear it came from. ``.to()`` re-packs.
Threshold pruning (``threshold``) applies in eval mode only (it is an inference-time pruning of weak ranks).
``merged()`` is refused: routing depends on the input, so no single weight represents the layer.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lowrank.ops.rank1_experts_lora import rank1_experts_lora

__all__ = ["Rank1ExpertsLinear"]


class Rank1ExpertsLinear(nn.Module):
    """Linear layer with E rank-1 LoRA experts, top-k of them per token.

    Args:
        in_features, out_features: layer sizes.
        experts: E, the number of rank-1 experts (the LoRA rank), >= 1.
        top_k: experts per token, 1 <= top_k <= E.
        gate: "router" (SMoRA: learned sigmoid router with a selection-only balancing bias) or "self" (MoRA:
            scores from the rank activations themselves).
        alpha: ``scaling = alpha / experts`` (default alpha = experts, scaling 1).
        temperature: softmax temperature of gate "self".
        threshold: gates below it are pruned to 0 in eval mode (None: no pruning).
        bias: whether the base layer has a bias.
        backend: backend of :func:`lowrank.ops.rank1_experts_lora`.
        freeze_base: base weight and bias get ``requires_grad=False`` (default).
        pack: layout of weight and lora_b (module docstring): None = packed iff bf16; True / False = always / never.
    """

    def __init__(self, in_features: int, out_features: int, experts: int, top_k: int, *, gate: str = "router",
                 alpha: float | None = None, temperature: float = 1.0, threshold: float | None = None,
                 bias: bool = True, backend: str = "auto", freeze_base: bool = True, pack: bool | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("experts", experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Rank1ExpertsLinear: {name} must be a positive int, got {v!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts:
            raise ValueError(f"Rank1ExpertsLinear: top_k must be an int in [1, experts={experts}], got {top_k!r}")
        if gate not in ("router", "self"):
            raise ValueError(f"Rank1ExpertsLinear: gate must be 'router' or 'self', got {gate!r}")
        if gate == "router" and temperature != 1.0:
            raise ValueError("Rank1ExpertsLinear: temperature applies to gate='self' only")
        alpha = float(experts if alpha is None else alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"Rank1ExpertsLinear: alpha must be finite, got {alpha}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.experts, self.top_k = in_features, out_features, experts, top_k
        self.gate, self.alpha, self.temperature, self.threshold = gate, alpha, float(temperature), threshold
        self.backend = backend
        if pack not in (None, True, False):
            raise TypeError(f"Rank1ExpertsLinear: pack must be None, True or False, got {pack!r}")
        self.pack = pack
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=not freeze_base)
        self.bias = (nn.Parameter(torch.empty(out_features, **kw), requires_grad=not freeze_base) if bias else None)
        self.lora_a = nn.Parameter(torch.empty(experts, in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(out_features, experts, **kw))
        self.router = nn.Parameter(torch.empty(experts, in_features, **kw)) if gate == "router" else None
        self.register_buffer("router_bias", torch.zeros(experts, device=device, dtype=torch.float32))
        self.register_buffer("expert_counts", torch.zeros(experts, device=device, dtype=torch.int64))
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / self.experts

    def reset_parameters(self) -> None:
        """nn.Linear's init for the base; Kaiming-uniform lora_a and router, zero lora_b (PEFT's LoRA init)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_experts()

    @torch.no_grad()
    def reset_experts(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)
        if self.router is not None:
            nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
        self.router_bias.zero_()
        self.expert_counts.zero_()
        self._pack()

    @property
    def is_packed(self) -> bool:
        """Whether weight and lora_b are the column blocks of one [out, in + E] buffer."""
        w, b, k, e = self.weight, self.lora_b, self.in_features, self.experts
        return (w.dtype == b.dtype and w.device == b.device and w.stride() == (k + e, 1)
                and b.stride() == (k + e, 1) and w.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                and b.storage_offset() == w.storage_offset() + k)

    @torch.no_grad()
    def _pack(self) -> None:
        """Bring the storage in line with the layout (Parameter objects kept; ``.data`` re-pointed): [W | B] per
        ``pack``, and lora_a / router in one [2E, in] buffer."""
        w, b = self.weight, self.lora_b
        want = self.pack if self.pack is not None else w.dtype == torch.bfloat16
        if w.device.type != "meta" and w.dtype == b.dtype and w.device == b.device:
            if want and not self.is_packed:
                joint = torch.cat([w.detach(), b.detach()], dim=1)
                self.weight.data = joint[:, :self.in_features]
                self.lora_b.data = joint[:, self.in_features:]
            elif not want and self.is_packed:
                self.weight.data = w.detach().contiguous()
                self.lora_b.data = b.detach().contiguous()
        a, r = self.lora_a, self.router
        if r is None or a.dtype != r.dtype or a.device != r.device or a.device.type == "meta":
            return
        if a.is_contiguous() and r.is_contiguous() and a.untyped_storage().data_ptr() == \
                r.untyped_storage().data_ptr() and r.storage_offset() == a.storage_offset() + a.numel():
            return
        buf = torch.cat([a.detach(), r.detach()], dim=0)
        self.lora_a.data = buf[:self.experts]
        self.router.data = buf[self.experts:]

    def _apply(self, fn, recurse: bool = True):
        # nn.Module converts each Parameter on its own, which splits the [A; R] buffer; re-pack.
        out = super()._apply(fn, recurse)
        self._pack()
        return out

    @classmethod
    def from_linear(cls, linear: nn.Linear, experts: int, top_k: int, gate: str = "router", *,
                    alpha: float | None = None, temperature: float = 1.0, threshold: float | None = None,
                    backend: str = "auto", freeze_base: bool = True, pack: bool | None = None
                    ) -> "Rank1ExpertsLinear":
        """Wrap ``linear`` with fresh experts (lora_b = 0: same outputs). The bias is shared; the weight is shared
        unless the module is packed (``pack``; by default for bf16), where it is copied and ``linear`` is left
        untouched."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Rank1ExpertsLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, experts, top_k, gate=gate, alpha=alpha,
                temperature=temperature, threshold=threshold, bias=linear.bias is not None, backend=backend,
                freeze_base=freeze_base, pack=pack, device="meta", dtype=w.dtype)
        m.weight = nn.Parameter(w.detach(), requires_grad=not freeze_base)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach(), requires_grad=not freeze_base)
        kw = {"device": w.device, "dtype": w.dtype}
        m.lora_a = nn.Parameter(torch.empty(experts, linear.in_features, **kw))
        m.lora_b = nn.Parameter(torch.zeros(linear.out_features, experts, **kw))
        if gate == "router":
            m.router = nn.Parameter(torch.empty(experts, linear.in_features, **kw))
        m.router_bias = torch.zeros(experts, device=w.device, dtype=torch.float32)
        m.expert_counts = torch.zeros(experts, device=w.device, dtype=torch.int64)
        m.reset_experts()
        return m

    def forward_with_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(y [..., out], indices [..., k] int64, gates [..., k])``; gates are differentiable (auxiliary losses).

        In training mode the selection counts are added to ``expert_counts``.
        """
        y, idx, gates = rank1_experts_lora(
            x, self.weight, self.bias, self.lora_a, self.lora_b, self.top_k, scaling=self.scaling,
            router=self.router, router_bias=self.router_bias if self.router is not None else None, gate=self.gate,
            temperature=self.temperature, threshold=None if self.training else self.threshold,
            backend=self.backend)
        if self.training:
            with torch.no_grad():
                self.expert_counts += torch.bincount(idx.reshape(-1), minlength=self.experts)
        return y, idx, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_routing(x)[0]

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor | None = None, rate: float = 1e-3) -> torch.Tensor:
        """Auxiliary-loss-free balancing step: ``router_bias_e += rate·sign(mean(counts) − counts_e)``.

        Args:
            counts: per-expert selection counts ``[E]``, or selected indices ``[tokens, ..., k]`` (int, at least
                2-D, as forward_with_routing returns them) to count, or None
                for the ``expert_counts`` accumulated by training-mode forwards (which are then reset to zero).
            rate: the bias step (DeepSeek-V3's γ), >= 0.

        Returns:
            The counts ``[E]`` (int64) the step used. Under gate "self" there is no router bias: raises.
        """
        if self.router is None:
            raise RuntimeError("Rank1ExpertsLinear.update_bias: gate='self' has no router bias to update (its "
                               "scores are the rank activations)")
        if not rate >= 0:
            raise ValueError(f"Rank1ExpertsLinear.update_bias: rate must be >= 0, got {rate}")
        if counts is None:
            used = self.expert_counts.clone()
            self.expert_counts.zero_()
        elif not isinstance(counts, torch.Tensor):
            raise TypeError(f"Rank1ExpertsLinear.update_bias: counts must be a tensor, got {type(counts).__name__}")
        elif counts.dim() == 1 and counts.shape[0] == self.experts:
            used = counts.to(self.router_bias.device)
        elif not counts.is_floating_point() and counts.dim() >= 2 and counts.shape[-1] == self.top_k:
            flat = counts.reshape(-1).to(self.router_bias.device)
            if flat.numel() and (flat.min() < 0 or flat.max() >= self.experts):
                raise ValueError(f"Rank1ExpertsLinear.update_bias: indices must lie in [0, {self.experts})")
            used = torch.bincount(flat, minlength=self.experts)
        else:
            raise ValueError(f"Rank1ExpertsLinear.update_bias: counts must be [E={self.experts}] counts or "
                             f"[tokens, k={self.top_k}] indices, got shape {tuple(counts.shape)}")
        usedf = used.to(torch.float32)
        self.router_bias += rate * torch.sign(usedf.mean() - usedf)
        return used.to(torch.int64)

    def merged(self) -> nn.Linear:
        """Refused: the experts a token uses depend on the token, so no single weight equals this layer."""
        raise NotImplementedError("Rank1ExpertsLinear.merged: routing is input-dependent (each token picks its own "
                                  "top-k experts), so the layer cannot be folded into one nn.Linear; keep the "
                                  "module, or merge a fixed expert subset yourself if that is what you want")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={self.experts}, "
                f"top_k={self.top_k}, gate={self.gate!r}, alpha={self.alpha}, bias={self.bias is not None}, "
                f"backend={self.backend!r}")
