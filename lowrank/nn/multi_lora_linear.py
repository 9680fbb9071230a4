"""``MultiLoRALinear``: a frozen ``nn.Linear`` plus several named LoRA adapters, one chosen per token.

    y_t = x_t·Wᵀ + b + s_a·(x_t·A_a[:r_a]ᵀ)·B_a[:, :r_a]ᵀ,    a = adapter of token t (or none),  s_a = alpha_a / r_a

Storage: ``lora_a`` [n, r, in] and ``lora_b`` [n, out, r] with r = max r_a (adapters of smaller rank are zero
padded; ``ranks`` holds the true ones, so neither the work nor the result depends on the padding), run by
:func:`lowrank.ops.multi_lora_linear`.

Choosing adapters. ``forward(x, adapter_ids)`` takes ids of shape ``x.shape[:-1]`` (per token), ``[B]`` with
``B = x.shape[0]`` (per sample, broadcast over the other leading dims), or an :class:`~lowrank.ops.AdapterSegments`;
-1 means the base layer alone. A whole model takes one set of ids per call through :func:`adapter_context`:

    with adapter_context(ids):          # ids per sample [B] or per token; names via layer.adapter_ids(...)
        out = model(**batch)            # every MultiLoRALinear inside uses them

The segment metadata is built once per context and token count and shared by all the layers (the sort is paid
once per forward, not once per layer). :func:`from_peft_multi` converts a PEFT model with several LoRA adapters
loaded (PEFT's mixed-batch ``adapter_names=`` forward then maps to per-sample ids).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lowrank.ops.multi_lora_linear import AdapterSegments, adapter_segments, multi_lora_linear

__all__ = ["MultiLoRALinear", "adapter_context", "from_peft_multi"]

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


class _Context:
    """The ids of one ``adapter_context`` and the segments built from them (per (n, token count), built once)."""

    def __init__(self, ids) -> None:
        self.ids = ids
        self.cache: dict[tuple[int, tuple[int, ...]], AdapterSegments] = {}


_CURRENT: contextvars.ContextVar[_Context | None] = contextvars.ContextVar("lowrank_adapter_context", default=None)


@contextlib.contextmanager
def adapter_context(adapter_ids: torch.Tensor | AdapterSegments) -> Iterator[None]:
    """Every :class:`MultiLoRALinear` called inside uses ``adapter_ids`` (unless given its own).

    ``adapter_ids``: int tensor per sample ``[B]`` or per token (the leading dims of the layers' inputs), or an
    :class:`AdapterSegments`. Contexts nest; leaving one restores the previous.
    """
    if not isinstance(adapter_ids, (torch.Tensor, AdapterSegments)):
        raise TypeError(f"adapter_context: adapter_ids must be a tensor or AdapterSegments, got "
                        f"{type(adapter_ids).__name__}")
    token = _CURRENT.set(_Context(adapter_ids))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _per_token(ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    lead = tuple(x.shape[:-1])
    if tuple(ids.shape) == lead or (ids.dim() == 1 and ids.numel() == math.prod(lead)):
        return ids
    if ids.dim() == 1 and x.dim() >= 2 and ids.shape[0] == x.shape[0]:
        return ids.reshape(-1, *([1] * (x.dim() - 2))).expand(lead)
    raise ValueError(f"MultiLoRALinear: adapter_ids of shape {tuple(ids.shape)} fit neither the tokens "
                     f"{lead} of x nor its {x.shape[0] if x.dim() >= 2 else '-'} samples")


class MultiLoRALinear(nn.Module):
    """Linear layer with several named LoRA adapters, chosen per token (see the module docstring).

    Args:
        in_features, out_features: layer sizes.
        adapters: adapter names (index a of ``adapter_ids`` is ``adapters[a]``).
        r: rank of every adapter, or one rank per adapter (each >= 1).
        alpha: LoRA alpha (one or per adapter; default alpha = r, i.e. scaling 1); scaling_a = alpha_a / r_a.
        bias, backend, freeze_base, device, dtype: as :class:`~lowrank.nn.LoRALinear`.
    No LoRA dropout (a mixed-batch layer is for serving and for training without dropout).
    ``forward`` never changes module state; conversions return new objects.
    """

    def __init__(self, in_features: int, out_features: int, adapters: Sequence[str], r: int | Sequence[int],
                 alpha: float | Sequence[float] | None = None, *, bias: bool = True, backend: str = "auto",
                 freeze_base: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        names = list(adapters)
        if not names or len(set(names)) != len(names) or not all(isinstance(a, str) and a for a in names) \
                or BASE in names:
            raise ValueError(f"MultiLoRALinear: adapters must be distinct non-empty names (not {BASE!r}), got "
                             f"{adapters!r}")
        n = len(names)
        ranks = [r] * n if isinstance(r, int) else list(r)
        if len(ranks) != n or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ranks):
            raise ValueError(f"MultiLoRALinear: r must be a positive int or {n} of them, got {r!r}")
        alphas = ([float(k) for k in ranks] if alpha is None else
                  [float(alpha)] * n if isinstance(alpha, (int, float)) else [float(v) for v in alpha])
        if len(alphas) != n or not all(math.isfinite(v) for v in alphas):
            raise ValueError(f"MultiLoRALinear: alpha must be a finite float or {n} of them, got {alpha!r}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.adapters = tuple(names)
        self.ranks = tuple(ranks)
        self.scaling = tuple(a / k for a, k in zip(alphas, ranks))
        rmax = max(ranks)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=not freeze_base)
        self.bias = (nn.Parameter(torch.empty(out_features, **kw), requires_grad=not freeze_base) if bias else None)
        self.lora_a = nn.Parameter(torch.zeros(n, rmax, in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(n, out_features, rmax, **kw))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                nn.init.uniform_(self.bias, -in_features ** -0.5, in_features ** -0.5)
            for i, k in enumerate(ranks):
                nn.init.kaiming_uniform_(self.lora_a[i, :k], a=math.sqrt(5))

    @property
    def n_adapters(self) -> int:
        return len(self.adapters)

    def adapter_ids(self, names: Sequence[str | None]) -> torch.Tensor:
        """int64 ids for adapter names (None or ``"__base__"`` → -1), e.g. PEFT's ``adapter_names`` list."""
        index = {a: i for i, a in enumerate(self.adapters)}
        unknown = [v for v in names if v is not None and v != BASE and v not in index]
        if unknown:
            raise ValueError(f"MultiLoRALinear: unknown adapters {unknown}; this layer has {list(self.adapters)}")
        return torch.tensor([-1 if v is None or v == BASE else index[v] for v in names], dtype=torch.int64,
                            device=self.weight.device)

    def _segments(self, x: torch.Tensor, adapter_ids) -> AdapterSegments | torch.Tensor:
        if adapter_ids is None:
            ctx = _CURRENT.get()
            if ctx is None:
                raise ValueError("MultiLoRALinear: no adapter_ids given and no adapter_context active")
            if isinstance(ctx.ids, AdapterSegments):
                return ctx.ids
            key = (self.n_adapters, tuple(x.shape[:-1]))
            seg = ctx.cache.get(key)
            if seg is None:
                seg = ctx.cache[key] = adapter_segments(_per_token(ctx.ids, x), self.n_adapters)
            return seg
        if isinstance(adapter_ids, AdapterSegments):
            return adapter_ids
        if not isinstance(adapter_ids, torch.Tensor):
            raise TypeError(f"MultiLoRALinear: adapter_ids must be a tensor or AdapterSegments, got "
                            f"{type(adapter_ids).__name__}")
        return _per_token(adapter_ids, x)

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | AdapterSegments | None = None) -> torch.Tensor:
        return multi_lora_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, self._segments(x, adapter_ids),
                                 list(self.scaling), ranks=list(self.ranks), backend=self.backend)

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """``s_a·B_a·A_a`` [out, in] of one adapter, in fp32."""
        i = self.adapters.index(adapter)
        k = self.ranks[i]
        return (self.lora_b[i, :, :k].detach().float() @ self.lora_a[i, :k].detach().float()) * self.scaling[i]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters={list(self.adapters)}, "
                f"ranks={list(self.ranks)}, scaling={list(self.scaling)}, bias={self.bias is not None}, "
                f"backend={self.backend!r}")

    # ---- conversion -------------------------------------------------------------------------------------------
    @classmethod
    def from_peft_layer(cls, layer: nn.Module, adapters: Sequence[str] | None = None, *, backend: str = "auto",
                        cast_adapter_dtype: bool = False, name: str = "layer") -> nn.Module:
        """A MultiLoRALinear computing PEFT ``lora.Linear`` ``layer``'s mixed-batch forward for ``adapters``
        (default: every adapter the layer holds). The base weight and bias are shared; the factors are copied
        into the stacked storage. Adapters the layer lacks get rank 0 here (base only), so that one id numbering
        serves every layer of a model. Returns the base layer itself if the layer holds none of them.

        Raises ValueError / TypeError for what the op does not compute: DoRA and other LoRA variants,
        ``lora_bias``, merged adapters, LoRA dropout > 0 in training mode, a base that is not nn.Linear / Conv1D.
        """
        from lowrank.nn.peft import _plain_linear_parts

        where = f"from_peft_multi: layer {name!r}"
        if layer.merged:
            raise ValueError(f"{where} has merged adapters {layer.merged_adapters}; call unmerge_adapter() first")
        parts = _plain_linear_parts(layer.base_layer)
        if parts is None:
            raise TypeError(f"{where} has a base layer of type {type(layer.base_layer).__name__}; only nn.Linear "
                            "and transformers Conv1D bases are supported")
        weight, bias = parts
        names = list(layer.lora_A.keys()) if adapters is None else list(adapters)
        present = [a for a in names if a in layer.lora_A]
        if not present:
            return layer.base_layer
        for a in present:
            if getattr(layer, "use_dora", {}).get(a, False) or getattr(layer, "lora_variant", {}).get(a) is not None:
                raise ValueError(f"{where} adapter {a!r} is a LoRA variant (e.g. DoRA), which the op does not "
                                 "compute")
            if getattr(layer, "lora_bias", {}).get(a, False) or layer.lora_B[a].bias is not None:
                raise ValueError(f"{where} adapter {a!r} uses lora_bias=True, which the op does not compute")
            drop = layer.lora_dropout[a]
            if isinstance(drop, nn.Dropout) and drop.p > 0 and layer.training:
                raise ValueError(f"{where} adapter {a!r} has lora_dropout={drop.p} in training mode; "
                                 "MultiLoRALinear has no dropout (call .eval() first)")
            fa = layer.lora_A[a].weight
            if fa.dtype != weight.dtype and not cast_adapter_dtype:
                raise ValueError(f"{where} adapter {a!r} has factors in {fa.dtype} but the base weight is "
                                 f"{weight.dtype}; pass cast_adapter_dtype=True to cast them")
        ranks = [layer.lora_A[a].weight.shape[0] if a in layer.lora_A else 1 for a in names]
        scal = [float(layer.scaling[a]) if a in layer.lora_A else 0.0 for a in names]
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, names, ranks, [s * k for s, k in zip(scal, ranks)], bias=bias is not None,
                backend=backend, device="meta", dtype=weight.dtype)
        m.scaling = tuple(scal)  # exactly PEFT's (alpha·r / r may differ from it in the last ulp)
        m.ranks = tuple(k if a in layer.lora_A else 0 for k, a in zip(ranks, names))
        m.weight = weight
        if bias is not None:
            m.bias = bias
        rmax = max(ranks)
        la = torch.zeros(len(names), rmax, in_f, dtype=weight.dtype, device=weight.device)
        lb = torch.zeros(len(names), out_f, rmax, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            for i, a in enumerate(names):
                if a in layer.lora_A:
                    k = ranks[i]
                    la[i, :k] = layer.lora_A[a].weight.to(weight.dtype)
                    lb[i, :, :k] = layer.lora_B[a].weight.to(weight.dtype)
        m.lora_a, m.lora_b = nn.Parameter(la), nn.Parameter(lb)
        m.train(layer.training)
        return m


def from_peft_multi(model: nn.Module, adapters: Sequence[str] | None = None, *, backend: str = "auto",
                    cast_adapter_dtype: bool = False) -> tuple[nn.Module, tuple[str, ...]]:
    """Replace every PEFT LoRA ``Linear`` of ``model`` (several adapters loaded) by a :class:`MultiLoRALinear`.

    Args:
        model: a ``peft.PeftModel`` / ``LoraModel`` / model with injected LoRA layers.
        adapters: the adapters to carry, in id order (default: all of ``model.peft_config``, else those found).

    Returns:
        (the bare base model, the adapter names): id a selects ``names[a]`` in every layer, so PEFT's
        ``model(..., adapter_names=[...])`` becomes ``with adapter_context(layer.adapter_ids([...])): base(...)``
        (or ids per token). The model is modified in place and consumed, as :func:`lowrank.nn.from_peft` does.
    """
    from peft import PeftModel
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    if adapters is None:
        cfg = getattr(model, "peft_config", None)
        adapters = list(cfg.keys()) if isinstance(cfg, dict) and cfg else None
    root = model
    if isinstance(root, PeftModel):
        root = root.base_model
    if isinstance(root, BaseTuner):
        root = root.model
    layers = [(n, m) for n, m in root.named_modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError(f"from_peft_multi: no PEFT LoRA layers found in {type(root).__name__}")
    for n, m in layers:
        if type(m) is not PeftLoraLinear:
            raise TypeError(f"from_peft_multi: layer {n!r} is a PEFT {type(m).__name__}; only LoRA on nn.Linear / "
                            "Conv1D is supported")
    if adapters is None:
        adapters = list(dict.fromkeys(a for _, m in layers for a in m.lora_A.keys()))
    names = tuple(adapters)
    new = [(n, MultiLoRALinear.from_peft_layer(m, names, backend=backend, cast_adapter_dtype=cast_adapter_dtype,
                                               name=n)) for n, m in layers]
    for n, m in new:
        parent_name, _, attr = n.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, attr, m)
    return root, names
