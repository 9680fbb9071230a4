"""PEFT interop: LoRA models in and out of :class:`~lowrank.nn.LoRALinear`.

What maps to what. PEFT's ``lora.Linear`` computes, for its one active adapter,

    y = base_layer(x) + s·lora_B(lora_A(dropout(x))),    s = layer.scaling[adapter]

with ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r]: exactly ``LoRALinear``'s ``lora_a`` /
``lora_b`` layout, so a conversion moves Parameters, it never copies or transposes the factors. ``s`` is read
from ``layer.scaling`` (not recomputed from ``lora_alpha / r``), so rsLoRA (``alpha / sqrt(r)``) and
``set_scale`` are covered; ``LoRALinear.alpha`` is set to ``s·r`` (nudged by an ulp where needed so that
``alpha / r == s`` exactly). A ``transformers`` ``Conv1D`` base (GPT-2 style, PEFT's ``fan_in_fan_out=True``)
stores W as [in, out]; it becomes a ``LoRALinear`` whose weight is the transposed *view* of the same storage
(``fan_in_fan_out`` only changes how PEFT merges, its forward always calls the base layer, so the view is all
that is needed).

Why: the fused op runs base GEMM + LoRA branch in one dispatcher call and saves only x for backward, while the
PEFT layer runs three ``nn.Linear`` calls and an add. Training or serving a PEFT checkpoint through lowrank
needs (1) the model converted (:func:`from_peft`), (2) checkpoints read and written in PEFT's own format
(:func:`to_peft_state_dict`, :func:`load_peft_state_dict`, :func:`save_peft_adapter`) so the result goes back
to ``peft.PeftModel.from_pretrained`` unchanged, and (3) LoRA on models that never saw PEFT
(:func:`apply_lora`, same target-module rules as PEFT's ``LoraConfig.target_modules``).

Refused, never approximated (``ValueError`` / ``TypeError`` naming the layer and the feature): LoRA variants
(DoRA, aLoRA, Arrow, BD-LoRA, ...), ``lora_bias=True``, merged layers, disabled adapters, several active
adapters, LoRA on Embedding / Conv / MultiheadAttention / ``target_parameters`` / quantized layers, trainable
tokens, adapter factors in a different dtype than the base weight (PEFT's ``autocast_adapter_dtype`` upcasts
adapters of fp16/bf16 models to fp32; pass ``cast_adapter_dtype=True`` to cast them to the base dtype
instead). ``modules_to_save`` wrappers are unwrapped to their active copy.

Key format: PEFT saves ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (the adapter name
is stripped) and ``base_model.model.<module path>.<param>`` for ``modules_to_save``.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from lowrank.nn.lora_linear import LoRALinear

__all__ = ["PeftLoadResult", "apply_lora", "from_peft", "load_peft_state_dict", "save_peft_adapter",
           "to_peft_state_dict"]

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_SEQ_CLS_HEAD_NAMES = ("score", "classifier")  # PEFT's SEQ_CLS_HEAD_NAMES
_MAX_LISTED = 10


# ---- small helpers -----------------------------------------------------------------------------------------
def _hf_conv1d():
    """``transformers.pytorch_utils.Conv1D`` if that module is loaded, else None.

    A model holding a Conv1D has necessarily loaded the module that defines it, so this never imports
    transformers (which takes seconds) for models that do not use it.
    """
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _listing(names: Iterable[str]) -> str:
    names = list(names)
    head = ", ".join(names[:_MAX_LISTED])
    return head + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _alpha_for(scaling: float, r: int) -> float:
    """An alpha with ``alpha / r == scaling`` exactly (LoRALinear stores alpha, PEFT stores the scaling)."""
    a = scaling * r
    for cand in (a, math.nextafter(a, math.inf), math.nextafter(a, -math.inf)):
        if cand / r == scaling:
            return cand
    return a


def _plain_linear_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of an unmodified ``nn.Linear`` or HF ``Conv1D``; None for anything else.

    Subclasses that override ``forward`` (quantized and tensor-parallel linears) are not plain: their weight
    does not say what they compute.
    """
    conv1d = _hf_conv1d()
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return module.weight, module.bias
    if conv1d is not None and isinstance(module, conv1d) and type(module).forward is conv1d.forward:
        # Conv1D stores [in, out]: a transposed view of the same storage, a leaf with the same requires_grad
        return nn.Parameter(module.weight.detach().T, requires_grad=module.weight.requires_grad), module.bias
    return None


def _is_plain_linear(module: nn.Module) -> bool:
    return _plain_linear_parts(module) is not None


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _check_not_in_mha(model: nn.Module, name: str) -> None:
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else None
    if isinstance(parent, nn.MultiheadAttention):
        raise ValueError(f"{name!r}: LoRA on a Linear inside nn.MultiheadAttention is not supported: "
                         "MultiheadAttention reads out_proj.weight directly and would ignore the LoRA branch")


# ---- from_peft ---------------------------------------------------------------------------------------------
def _unwrap_peft_model(model: nn.Module) -> nn.Module:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        cfgs = model.peft_config
        active = model.active_adapters
        if len(active) > 1:
            raise ValueError(f"from_peft: several active adapters {active}; activate one with set_adapter()")
        for name in active:
            peft_type = getattr(cfgs[name].peft_type, "value", cfgs[name].peft_type)
            if peft_type != "LORA":
                raise TypeError(f"from_peft: adapter {name!r} is a {peft_type} adapter; only LORA is "
                                "supported")
        model = model.base_model
    if isinstance(model, BaseTuner):
        if type(model).__name__ != "LoraModel":
            raise TypeError(f"from_peft: {type(model).__name__} is not a LoRA tuner; only LORA is supported")
        model = model.model
    return model


def _convert_lora_layer(name: str, layer: nn.Module, backend: str, cast_adapter_dtype: bool) -> nn.Module:
    """The module that computes what PEFT ``lora.Linear`` ``layer`` computes now."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    where = f"from_peft: layer {name!r}"
    if layer.merged:
        raise ValueError(f"{where} has merged adapters {layer.merged_adapters}; call unmerge_adapter() first")
    base = layer.base_layer
    if isinstance(base, BaseTunerLayer):
        raise TypeError(f"{where} wraps another adapter layer ({type(base).__name__}); nested adapters are "
                        "not supported")
    parts = _plain_linear_parts(base)
    if parts is None:
        raise TypeError(f"{where} has a base layer of type {type(base).__name__}; only nn.Linear and "
                        "transformers Conv1D bases are supported")
    if layer.disable_adapters:
        raise ValueError(f"{where} has its adapters disabled (disable_adapter() context?); converting would "
                         "switch LoRA back on")
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) > 1:
        raise ValueError(f"{where} has several active adapters {active}; LoRALinear carries one, activate "
                         "one with set_adapter()")
    if not active:
        return base  # this layer carries no factors for the active adapter: PEFT runs the base layer alone
    adapter = active[0]
    variant = layer.lora_variant.get(adapter) if hasattr(layer, "lora_variant") else None
    if getattr(layer, "use_dora", {}).get(adapter, False) or variant is not None:
        feature = "DoRA (use_dora=True)" if getattr(layer, "use_dora", {}).get(adapter, False) \
            else f"the LoRA variant {type(variant).__name__}"
        raise ValueError(f"{where} adapter {adapter!r} uses {feature}, which LoRALinear does not compute")
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    if getattr(layer, "lora_bias", {}).get(adapter, False) or lora_b.bias is not None:
        raise ValueError(f"{where} adapter {adapter!r} uses lora_bias=True (a bias on lora_B), which "
                         "LoRALinear does not compute")
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        raise TypeError(f"{where} adapter {adapter!r} has factors of type {type(lora_a).__name__} / "
                        f"{type(lora_b).__name__}; expected nn.Linear")
    weight, bias = parts
    a, b = lora_a.weight, lora_b.weight
    if a.dtype != weight.dtype or b.dtype != weight.dtype:
        if not cast_adapter_dtype:
            raise ValueError(f"{where} adapter {adapter!r} has factors in {a.dtype} but the base weight is "
                             f"{weight.dtype} (PEFT's autocast_adapter_dtype upcasts adapters of "
                             "half-precision models); pass cast_adapter_dtype=True to cast the factors to "
                             "the base dtype")
        a = nn.Parameter(a.detach().to(weight.dtype), requires_grad=a.requires_grad)
        b = nn.Parameter(b.detach().to(weight.dtype), requires_grad=b.requires_grad)
    dropout = layer.lora_dropout[adapter]
    if isinstance(dropout, nn.Dropout):
        p = float(dropout.p)
    elif isinstance(dropout, nn.Identity):
        p = 0.0
    else:
        raise TypeError(f"{where} adapter {adapter!r} has a lora_dropout of type {type(dropout).__name__}")
    r = int(a.shape[0])
    scaling = float(layer.scaling[adapter])
    out_features, in_features = weight.shape
    m = LoRALinear(in_features, out_features, r, _alpha_for(scaling, r), bias=bias is not None, dropout=p,
                   backend=backend, pack=False, device="meta", dtype=weight.dtype)
    # Share, never copy: the same Parameter objects (a Conv1D base gets a transposed view of its storage).
    m.weight = weight
    if bias is not None:
        m.bias = bias
    m.lora_a, m.lora_b = a, b
    m.train(layer.training)
    return m


def _unwrap_aux(name: str, wrapper: nn.Module) -> nn.Module:
    """The module a PEFT ``ModulesToSaveWrapper`` forwards to now."""
    if type(wrapper).__name__ != "ModulesToSaveWrapper":
        raise TypeError(f"from_peft: module {name!r} is a {type(wrapper).__name__} (e.g. trainable tokens), "
                        "which is not supported")
    active = wrapper.active_adapters
    if wrapper.disable_adapters or not active or active[0] not in wrapper.modules_to_save:
        return wrapper.original_module
    if len(active) > 1:
        raise ValueError(f"from_peft: modules_to_save wrapper {name!r} has several active adapters {active}")
    return wrapper.modules_to_save[active[0]]


def from_peft(model: nn.Module, *, backend: str = "auto", cast_adapter_dtype: bool = False,
              pack: bool = False) -> nn.Module:
    """Replace every PEFT LoRA ``Linear`` in ``model`` by a :class:`LoRALinear`; return the bare base model.

    Args:
        model: a ``peft.PeftModel`` (any task subclass), a ``LoraModel``, or a plain model with LoRA layers
            injected (``peft.inject_adapter_in_model``). Exactly one adapter may be active.
        backend: backend for every new ``LoRALinear`` (see :func:`lowrank.ops.lora_linear`).
        cast_adapter_dtype: cast factors whose dtype differs from the base weight's to the base dtype
            (otherwise that is an error; the fused op computes in one dtype).
        pack: call :meth:`LoRALinear.pack_` on every new layer: the Parameter objects stay the same, but the base
            weight and ``lora_B`` move into one [out, in + r] buffer (a copy), the layout the bf16 CPU kernel
            runs as a single GEMM. Off by default (the new layers get ``pack=False``), so that the converted
            model keeps PEFT's storage.

    Returns:
        The underlying model (``peft_model.base_model.model`` for a PeftModel) with each ``lora.Linear``
        replaced by a ``LoRALinear`` holding the *same* Parameter objects (base weight and bias,
        ``lora_A.weight``, ``lora_B.weight``; a Conv1D base gets a transposed view), its dropout probability
        and its scaling; train / eval mode and ``requires_grad`` flags are kept. ``modules_to_save`` wrappers
        become their active copy; layers with no factors for the active adapter become their base layer.

    The input is modified in place and consumed: afterwards the PeftModel wrapper no longer finds its LoRA
    layers and must not be used. Deep-copy it first (``copy.deepcopy``) to keep a working PEFT model.
    Validation of all layers happens before anything is replaced, so a refused model is left untouched.

    Raises:
        ImportError: peft is not installed.
        ValueError / TypeError: an unsupported PEFT feature (see the module docstring), naming the layer.
    """
    try:
        from peft.tuners.lora.layer import Linear as PeftLoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError as e:  # pragma: no cover - peft is a test dependency
        raise ImportError("from_peft needs the `peft` package") from e

    if isinstance(model, BaseTunerLayer):
        raise TypeError(f"from_peft: got a single {type(model).__name__} layer; pass the model that "
                        "contains it")
    root = _unwrap_peft_model(model)
    replacements: list[tuple[str, nn.Module]] = []
    skip_prefixes: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, AuxiliaryTrainingWrapper):
            replacements.append((name, _unwrap_aux(name, module)))
            skip_prefixes.append(name + ".")
        elif isinstance(module, BaseTunerLayer):
            if type(module) is not PeftLoraLinear:
                raise TypeError(f"from_peft: layer {name!r} is a PEFT {type(module).__module__}."
                                f"{type(module).__name__}; only LoRA on plain nn.Linear / Conv1D layers "
                                "(peft.tuners.lora.layer.Linear) is supported (not Embedding, Conv, "
                                "MultiheadAttention, target_parameters, quantized layers or other tuners)")
            _check_not_in_mha(root, name)
            replacements.append((name, _convert_lora_layer(name, module, backend, cast_adapter_dtype)))
            skip_prefixes.append(name + ".")
    if not replacements:
        raise ValueError(f"from_peft: no PEFT LoRA layers found in {type(root).__name__}")
    if any(not name for name, _ in replacements):
        raise TypeError("from_peft: the model itself is a PEFT wrapper; pass the model that contains it")
    for name, new in replacements:
        if pack and isinstance(new, LoRALinear):
            new.pack_()
        _set_submodule(root, name, new)
    return root


# ---- apply_lora --------------------------------------------------------------------------------------------
def _target_matcher(model: nn.Module, target_modules):
    """(match(name) -> bool, is_all_linear, excluded names) following PEFT's target_modules rules."""
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            excluded = set()
            get_out = getattr(model, "get_output_embeddings", None)
            out = get_out() if callable(get_out) else None
            heads = [out] if out is not None else [getattr(model, h, None) for h in _SEQ_CLS_HEAD_NAMES]
            heads = [h for h in heads if isinstance(h, nn.Module)][:1]
            for n, m in model.named_modules():
                if heads and m is heads[0]:
                    excluded.add(n)
            return (lambda n: n not in excluded), True, excluded
        pattern = re.compile(target_modules)
        return (lambda n: pattern.fullmatch(n) is not None), False, set()
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"apply_lora: target_modules must be a non-empty list of module-name suffixes, a "
                         f"regex string or 'all-linear', got {target_modules!r}")
    return (lambda n: any(n == t or n.endswith("." + t) for t in targets)), False, set()


def apply_lora(model: nn.Module, target_modules="all-linear", r: int = 8, alpha: float | None = None, *,
               dropout: float = 0.0, backend: str = "auto", pack: bool | None = None) -> nn.Module:
    """Put LoRA on the linear layers of a plain model, in place; returns ``model``.

    Args:
        target_modules: which modules, with PEFT's rules: a list of names matching a module's qualified name
            exactly or as a dotted suffix (``["query", "value"]``); a string is a regex that must match the
            whole qualified name; ``"all-linear"`` takes every ``nn.Linear`` / ``Conv1D`` except the output
            head (``get_output_embeddings()``, else a top-level ``score`` / ``classifier``; PEFT excludes the
            latter only for SEQ_CLS, here always, since a head is normally trained fully, not through LoRA).
        r, alpha, dropout: LoRA rank, alpha (``scaling = alpha / r``; default ``alpha = r``) and dropout.
        backend: backend of the new ``LoRALinear`` layers.
        pack: the layout policy of the new layers (``LoRALinear``'s ``pack``): None (default) packs the bf16
            ones (their base weight is copied into the [out, in + r] buffer; the replaced layer's storage is then
            freed unless something else holds it), True / False always / never.

    Each matched ``nn.Linear`` becomes ``LoRALinear.from_linear(...)`` (fresh factors with B = 0, so outputs
    are unchanged); a Conv1D becomes a LoRALinear over the transposed view of its weight. Then every parameter that is not a LoRA factor gets ``requires_grad=False``.

    Raises:
        ValueError: nothing matched (the message lists candidate names), a match that is not a plain linear
            layer, is already a LoRALinear, or sits inside nn.MultiheadAttention.
    """
    match, all_linear, _ = _target_matcher(model, target_modules)
    lora_children = {n + "." for n, _ in _lora_modules(model)}
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in lora_children) or not match(name):
            continue
        if all_linear:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            if _is_plain_linear(module) and not isinstance(parent, nn.MultiheadAttention):
                chosen.append((name, module))
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"apply_lora: {name!r} is already a LoRALinear")
        if not _is_plain_linear(module):
            raise ValueError(f"apply_lora: target {name!r} matched a {type(module).__name__}; only nn.Linear "
                             "and transformers Conv1D layers can take LoRA (narrow target_modules)")
        _check_not_in_mha(model, name)
        chosen.append((name, module))
    if not chosen:
        candidates = [n for n, m in model.named_modules() if _is_plain_linear(m)]
        leaves = sorted({n.rpartition(".")[2] for n in candidates})
        raise ValueError(f"apply_lora: target_modules={target_modules!r} matched no linear layer of "
                         f"{type(model).__name__}. Linear layers: {_listing(candidates)}; their names end "
                         f"in: {_listing(leaves)}")
    for name, module in chosen:
        weight, bias = _plain_linear_parts(module)
        if isinstance(module, nn.Linear):
            lin = module
        else:  # Conv1D: an nn.Linear shell over the transposed view, so from_linear shares its storage
            lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            lin.weight = weight
            if bias is not None:
                lin.bias = bias
        new = LoRALinear.from_linear(lin, r, alpha, dropout=dropout, backend=backend, pack=pack)
        new.train(module.training)
        _set_submodule(model, name, new)
    lora_params = {id(p) for _, m in _lora_modules(model) for p in (m.lora_a, m.lora_b)}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_params)
    return model


# ---- state dicts -------------------------------------------------------------------------------------------
def _modules_to_save_names(model: nn.Module, modules_to_save) -> list[str]:
    if not modules_to_save:
        return []
    names = []
    for m in modules_to_save:
        found = [n for n, _ in model.named_modules() if n and (n == m or n.endswith("." + m))]
        if not found:
            raise ValueError(f"modules_to_save entry {m!r} matches no module of {type(model).__name__}")
        names.extend(found)
    lora_names = [n for n, _ in _lora_modules(model)]
    for n in names:
        inner = [ln for ln in lora_names if ln == n or ln.startswith(n + ".")]
        if inner:
            raise ValueError(f"modules_to_save module {n!r} contains LoRA layers ({_listing(inner)}); PEFT "
                             "does not allow adapters inside modules_to_save")
    return names


def to_peft_state_dict(model: nn.Module, adapter_name: str = "default", *,
                       modules_to_save: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The adapter state dict PEFT's ``get_peft_model_state_dict`` / ``save_pretrained`` would produce.

    Keys: ``base_model.model.<path>.lora_A.weight`` and ``...lora_B.weight`` for every LoRALinear at
    ``<path>`` of ``model`` (a model from :func:`from_peft` or :func:`apply_lora`), plus
    ``base_model.model.<path>.<name>`` for the parameters and buffers of each module named in
    ``modules_to_save`` (PEFT's config field: names matched as dotted suffixes). PEFT strips the adapter name
    from saved keys, so ``adapter_name`` does not appear in them; it is accepted for parity with PEFT's
    signature. Values are detached tensors sharing storage with the model (clone before mutating).
    """
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"to_peft_state_dict: adapter_name must be a non-empty string, got {adapter_name!r}")
    layers = _lora_modules(model)
    if not layers:
        raise ValueError(f"to_peft_state_dict: {type(model).__name__} has no LoRALinear layers")
    out: dict[str, torch.Tensor] = {}
    for name, m in layers:
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_a.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_b.detach()
    for name in _modules_to_save_names(model, modules_to_save):
        for k, v in model.get_submodule(name).state_dict().items():
            out[f"{PEFT_PREFIX}{name}.{k}"] = v.detach()
    return out


class PeftLoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def _read_adapter(path) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors.torch import load_file

    path = os.fspath(path)
    config = None
    if os.path.isdir(path):
        cfg_path = os.path.join(path, ADAPTER_CONFIG_NAME)
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        weights = os.path.join(path, ADAPTER_WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise ValueError(f"load_peft_state_dict: {path!r} has no {ADAPTER_WEIGHTS_NAME} (only "
                             f"safetensors adapters are read; found: {_listing(sorted(os.listdir(path)))})")
        path = weights
    elif not path.endswith(".safetensors"):
        raise ValueError(f"load_peft_state_dict: expected an adapter directory or a .safetensors file, got "
                         f"{path!r}")
    return load_file(path), config


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (``get_pattern_key``)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_config(model: nn.Module, config: dict, present: set[str]) -> None:
    """Refuse a config whose r / scaling / features the model's LoRALinear layers do not reproduce."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"load_peft_state_dict: adapter is {peft_type}, only LORA is supported")
    for feature in ("use_dora", "lora_bias"):
        if config.get(feature):
            raise ValueError(f"load_peft_state_dict: adapter config sets {feature}=True, which LoRALinear "
                             "does not compute")
    for name, m in _lora_modules(model):
        if name not in present:
            continue
        r = _pattern_value(config.get("rank_pattern"), name, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if r != m.r or not math.isclose(scaling, m.scaling, rel_tol=1e-12):
            raise ValueError(f"load_peft_state_dict: layer {name!r} has r={m.r}, scaling={m.scaling} but the "
                             f"adapter config gives r={r}, scaling={scaling}; build the layer with "
                             "matching r and alpha")


def load_peft_state_dict(model: nn.Module, state_dict_or_path, *, strict: bool = True,
                         modules_to_save: Iterable[str] | None = None) -> PeftLoadResult:
    """Load a PEFT LoRA adapter into the LoRALinear layers of ``model``, in place.

    Args:
        model: a model from :func:`from_peft` or :func:`apply_lora` (the bare base model, not a PeftModel).
        state_dict_or_path: a dict in PEFT's saved format, a ``.safetensors`` file, or an adapter directory
            (``adapter_model.safetensors`` + optional ``adapter_config.json``). Keys may carry the
            ``base_model.model.`` prefix or be relative to ``model``.
        strict: unknown or missing keys raise (default). With ``strict=False`` they are only reported.
        modules_to_save: module names whose full parameters the adapter may carry (a directory's config
            supplies its own list).

    With a directory whose ``adapter_config.json`` is present, each loaded layer's r and scaling are checked
    against the config (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``), and DoRA
    / lora_bias adapters are refused, so a mismatched model cannot silently compute something else.

    Returns:
        ``PeftLoadResult(missing_keys, unexpected_keys)`` (both empty after a strict load).

    Raises:
        ValueError: unknown or missing keys (strict), a shape mismatch (always; names the key), a config
            mismatch.
    """
    config = None
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state_dict, config = _read_adapter(state_dict_or_path)
    elif isinstance(state_dict_or_path, dict):
        state_dict = state_dict_or_path
    else:
        raise TypeError(f"load_peft_state_dict: expected a state dict or a path, got "
                        f"{type(state_dict_or_path).__name__}")
    if config is not None and modules_to_save is None:
        modules_to_save = config.get("modules_to_save")
    layers = _lora_modules(model)
    if not layers:
        raise ValueError(f"load_peft_state_dict: {type(model).__name__} has no LoRALinear layers; convert it "
                         "with from_peft or apply_lora first")
    targets: dict[str, torch.Tensor] = {}
    for name, m in layers:
        targets[f"{name}.lora_A.weight"] = m.lora_a
        targets[f"{name}.lora_B.weight"] = m.lora_b
    extra: dict[str, torch.Tensor] = {}
    for name in _modules_to_save_names(model, modules_to_save):
        sub = model.get_submodule(name)
        extra.update({f"{name}.{k}": v for k, v in sub.state_dict(keep_vars=True).items()})
    loaded, unexpected = {}, []
    for key, value in state_dict.items():
        rel = key.removeprefix(PEFT_PREFIX)
        dest = targets.get(rel, extra.get(rel))
        if dest is None:
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(dest.shape):
            raise ValueError(f"load_peft_state_dict: {key!r} has shape {tuple(value.shape)} but the model "
                             f"expects {tuple(dest.shape)}")
        loaded[rel] = (dest, value)
    missing = [PEFT_PREFIX + k for k in targets if k not in loaded]
    if strict and (missing or unexpected):
        parts = []
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        raise ValueError("load_peft_state_dict: " + "; ".join(parts))
    if config is not None:
        _check_config(model, config, {k.rpartition(".lora_")[0] for k in loaded if ".lora_" in k})
    with torch.no_grad():
        for dest, value in loaded.values():
            dest.copy_(value)
    return PeftLoadResult(missing, unexpected)


# ---- adapter directory -------------------------------------------------------------------------------------
def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _target_modules_for(model: nn.Module, names: list[str]):
    """Short suffix names where they select exactly ``names`` among the model's modules, else full names."""
    leaves = sorted({n.rpartition(".")[2] for n in names})
    lora_children = tuple(n + "." for n in names)
    candidates = [n for n, _ in model.named_modules() if n and not n.startswith(lora_children)]
    selected = {n for n in candidates if any(n == t or n.endswith("." + t) for t in leaves)}
    return leaves if selected == set(names) else sorted(names)


def save_peft_adapter(model: nn.Module, save_directory, *,
                      base_model_name_or_path: str | os.PathLike | None = None, task_type: str | None = None,
                      modules_to_save: Iterable[str] | None = None) -> str:
    """Write a PEFT adapter directory that ``peft.PeftModel.from_pretrained(base, save_directory)`` loads.

    Files: ``adapter_model.safetensors`` (:func:`to_peft_state_dict`) and ``adapter_config.json`` with
    ``peft_type="LORA"``, ``r`` and ``lora_alpha`` (the most common values; other layers go to
    ``rank_pattern`` / ``alpha_pattern``), ``target_modules`` (short suffix names where they select exactly
    the LoRA layers, else full names), ``lora_dropout`` (the most common probability; PEFT has no per-layer
    dropout, and dropout only matters in training), ``base_model_name_or_path``, ``task_type`` (e.g.
    "FEATURE_EXTRACTION", "SEQ_CLS"; None for a bare model) and ``modules_to_save``. Returns the directory
    path.
    """
    from safetensors.torch import save_file

    state = to_peft_state_dict(model, modules_to_save=modules_to_save)
    layers = _lora_modules(model)
    names = [n for n, _ in layers]
    r = Counter(m.r for _, m in layers).most_common(1)[0][0]
    alpha = Counter(m.alpha for _, m in layers).most_common(1)[0][0]
    dropout = Counter(getattr(m.dropout, "p", 0.0) for _, m in layers).most_common(1)[0][0]
    rank_pattern = {re.escape(n): m.r for n, m in layers if m.r != r}
    alpha_pattern = {re.escape(n): _number(m.alpha) for n, m in layers if m.alpha != alpha}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": (None if base_model_name_or_path is None
                                    else os.fspath(base_model_name_or_path)),
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": float(dropout),
        "target_modules": _target_modules_for(model, names),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "bias": "none",
        "fan_in_fan_out": False,  # PEFT sets it per layer from the base layer's type when it loads
        "use_rslora": False,  # the scaling is carried exactly by lora_alpha / r
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    save_directory = os.fspath(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in state.items()},
              os.path.join(save_directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(save_directory, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return save_directory
