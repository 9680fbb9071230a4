"""``Bf16x3Linear``: an fp32 ``nn.Linear`` whose product runs on bf16 matrix hardware (three bf16 products).

    y = x·Wᵀ + b,   computed as  x_hi·W_hiᵀ + x_hi·W_loᵀ + x_lo·W_hiᵀ + b   (v_hi = bf16(v), v_lo = bf16(v − v_hi))

Shapes: x [..., in], weight W [out, in], bias b [out], y [..., out], all float32. Outputs agree with fp32
``F.linear`` to ~1e-5 relative (not bit for bit; see :mod:`lowrank.ops.bf16x3_linear`); on a CPU with AMX tiles
the layer runs about twice as fast as fp32 ``nn.Linear``. Meant for inference of fp32 models whose outputs must
match the fp32 model closely (rerankers: scores to 1e-4); the gradients are the fp32 linear's own.

:func:`use_bf16x3` converts every ``nn.Linear`` of a model in place, sharing the parameters.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.nn._swap import float32_linears
from lowrank.ops.bf16x3_linear import BACKENDS, bf16x3_linear, pack_bf16x3
from lowrank.ops._backends import select

__all__ = ["Bf16x3GatedMLP", "Bf16x3Linear", "use_bf16x3"]


def _pack_if_cpu_kernel(weight: torch.Tensor, backend: str, *, gated: bool = False) -> torch.Tensor | None:
    """The tile packing of ``weight`` when ``backend`` resolves to the C++ kernel on its device, else None (the
    other backends split in the call)."""
    if weight.device.type != "cpu" or select("bf16x3_linear", BACKENDS, backend, weight.device,
                                                torch.float32).name != "cpp":
        return None
    return pack_bf16x3(weight, gated=gated)


def _version_key(*params: torch.Tensor) -> tuple:
    """Changes whenever one of ``params`` is modified in place, replaced (``.data =``, load_state_dict into new
    storage) or moved to another device: what a cached packing depends on."""
    return tuple((p.device, p.data_ptr(), p._version) for p in params)


class Bf16x3GatedMLP(nn.Module):
    """A gated MLP ``down(silu(gate(x)) · up(x))`` (Llama / Mistral / Qwen2) whose gate and up products are one
    bf16x3 product with the SiLU·mul in its epilogue (``activation="swiglu"``), so the [T, H] gate and up tensors,
    the SiLU and the product are never materialized separately; ``down`` is a :class:`Bf16x3Linear`.

    Built by :meth:`from_mlp` from a module with ``gate_proj``, ``up_proj``, ``down_proj`` (nn.Linear, float32) and
    a SiLU ``act_fn``; keeps those three names (Parameters shared, so state dicts load either way). The stacked
    [gate; up] weight and its tile packing are cached and rebuilt when either weight changes. While autograd
    records (any of the parameters requires grad and grad mode is on) the unfused path runs, so gradients reach the
    gate and up Parameters themselves.
    """

    def __init__(self) -> None:  # use from_mlp
        super().__init__()
        self._stacked: tuple | None = None

    @classmethod
    def from_mlp(cls, mlp: nn.Module, *, backend: str = "auto") -> Bf16x3GatedMLP:
        self = cls()
        self.gate_proj = Bf16x3Linear.from_linear(mlp.gate_proj, backend=backend)
        self.up_proj = Bf16x3Linear.from_linear(mlp.up_proj, backend=backend)
        self.down_proj = Bf16x3Linear.from_linear(mlp.down_proj, backend=backend)
        self.backend = backend
        return self

    def _stacked_weight(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        g, u = self.gate_proj, self.up_proj
        key = _version_key(*g.parameters(), *u.parameters())
        if self._stacked is None or self._stacked[0] != key:
            w = torch.cat([g.weight.detach(), u.weight.detach()])
            b = None if g.bias is None else torch.cat([g.bias.detach(), u.bias.detach()])
            self._stacked = (key, w, b, _pack_if_cpu_kernel(w, self.backend, gated=True))
        return self._stacked[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recording = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if recording or torch.compiler.is_compiling() or (self.gate_proj.bias is None) != (self.up_proj.bias is None):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        w, b, packed = self._stacked_weight()
        h = bf16x3_linear(x, w, b, packed=packed, activation="swiglu", backend=self.backend)
        return self.down_proj(h)


def _check_activation(activation: str) -> str:
    if activation not in ("none", "gelu"):
        raise ValueError(f"Bf16x3Linear: activation must be 'none' or 'gelu', got {activation!r}")
    return activation


class Bf16x3Linear(nn.Module):
    """``nn.Linear`` (float32) computed by :func:`lowrank.ops.bf16x3_linear`.

    Args:
        in_features, out_features: layer sizes.
        bias: whether the layer has a bias [out].
        activation: "none", or "gelu" for ``F.gelu`` (erf form) of the output, fused into the kernel's epilogue.
        backend: as in :func:`lowrank.ops.bf16x3_linear`; checked when the module is built.
        device: of the parameters (float32 always).

    Parameters: ``weight`` [out, in], ``bias`` [out] or None, as ``nn.Linear`` (same names, so state dicts load
    either way). With the CPU kernel the module keeps the weight's bf16 halves in tile layout (a non-persistent
    buffer, 4 bytes per weight): packed at the first forward and again whenever the weight changes (its version
    counter or storage moves, e.g. after an optimizer step or ``load_state_dict``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, activation: str = "none",
                 backend: str = "auto", device: torch.device | str | None = None) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Bf16x3Linear: {name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=torch.float32))
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=torch.float32)) if bias else None)
        self._setup(backend, activation)
        self.reset_parameters()

    def _setup(self, backend: str, activation: str) -> None:
        self.backend, self.activation = backend, _check_activation(activation)
        select("bf16x3_linear", BACKENDS, backend, self.weight.device, torch.float32)  # refuse early, with reasons
        self._packed: tuple | None = None  # (version key, packing or None)

    def reset_parameters(self) -> None:
        """nn.Linear's initialization."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, activation: str = "none", backend: str = "auto") -> Bf16x3Linear:
        """A module sharing ``linear``'s weight and bias Parameters (no copy): training either trains both."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Bf16x3Linear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        if linear.weight.dtype != torch.float32:
            raise TypeError(f"Bf16x3Linear.from_linear: the layer must be float32, got {linear.weight.dtype}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._setup(backend, activation)
        return self

    def _packed_weight(self) -> torch.Tensor | None:
        # the backend is resolved only when the weight changes, not on every call
        key = _version_key(self.weight)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, _pack_if_cpu_kernel(self.weight.detach(), self.backend))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = None if torch.compiler.is_compiling() else self._packed_weight()
        return bf16x3_linear(x, self.weight, self.bias, packed=packed, activation=self.activation,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation!r}, backend={self.backend!r}")


def _fusable_gelu(parent: nn.Module) -> bool:
    """Whether ``parent`` is a transformers BERT-family FFN input block, ``forward(h) = act(dense(h))`` with the
    exact (erf) GELU, whose activation can move into the Linear's epilogue."""
    if type(parent).__name__ not in ("BertIntermediate", "RobertaIntermediate", "XLMRobertaIntermediate"):
        return False
    act = getattr(parent, "intermediate_act_fn", None)
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    # transformers.activations.GELUActivation wraps F.gelu (erf) unless built with use_gelu_python
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu


def _fusable_swiglu(m: nn.Module) -> bool:
    """Whether ``m`` is a transformers gated MLP, ``down(silu(gate(x)) * up(x))``, with float32 nn.Linear parts."""
    if type(m).__name__ not in ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"):
        return False
    parts = [getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(type(p) is nn.Linear and p.weight.dtype == torch.float32 for p in parts):
        return False
    act = getattr(m, "act_fn", None)
    # transformers' ACT2FN["silu"]: SiLUActivation (F.silu), or nn.SiLU in older releases
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return silu and parts[0].weight.shape == parts[1].weight.shape


def use_bf16x3(model: nn.Module, *, backend: str = "auto", fuse: bool = True) -> int:
    """Replace every float32 ``nn.Linear`` (exact type, not subclasses) inside ``model`` by a
    :class:`Bf16x3Linear` sharing its Parameters; returns how many Linears now run as bf16x3.

    With ``fuse``, two transformers blocks also get their activation into the kernel's epilogue: a BERT-family
    FFN input (``BertIntermediate``: ``GELU(dense(h))``, exact GELU) gets ``activation="gelu"`` on its Linear and
    ``nn.Identity`` as its activation; a gated MLP (``LlamaMLP``, ``MistralMLP``, ``Qwen2MLP``, ``Qwen3MLP`` with SiLU)
    becomes a :class:`Bf16x3GatedMLP`. Raises :class:`~lowrank.BackendUnavailableError` (before changing anything)
    when ``backend`` cannot run on the model's device; layers of other dtypes are left as they are.
    """
    targets = float32_linears(model, "use_bf16x3", "bf16x3_linear", BACKENDS, backend)
    count = 0
    if fuse:
        mlps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                if _fusable_swiglu(child)]
        for parent, name, child in mlps:
            setattr(parent, name, Bf16x3GatedMLP.from_mlp(child, backend=backend))
            count += 3
        done = {id(getattr(child, n)) for _, _, child in mlps for n in ("gate_proj", "up_proj", "down_proj")}
        targets = [t for t in targets if id(t[2]) not in done]
    for parent, name, child in targets:
        gelu = fuse and name == "dense" and _fusable_gelu(parent)
        setattr(parent, name, Bf16x3Linear.from_linear(child, activation="gelu" if gelu else "none",
                                                       backend=backend))
        if gelu:
            parent.intermediate_act_fn = nn.Identity()
        count += 1
    return count
