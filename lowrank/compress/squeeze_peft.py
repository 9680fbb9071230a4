"""LoRA-Squeeze for PEFT adapter directories: read ``adapter_config.json`` + ``adapter_model.safetensors``,
squeeze every ``lora_A`` / ``lora_B`` pair, write an adapter that ``peft.PeftModel.from_pretrained`` loads.

Per LoRA layer ℓ (module path p, factors A [r, in], B [out, r], PEFT scaling s = alpha / r, or alpha / √r with
``use_rslora``; r and alpha looked up in ``rank_pattern`` / ``alpha_pattern`` exactly as PEFT does):

    B'·A' = best rank-k approximation of B·A         (``lowrank.compress.squeeze``: QR of both factors, SVD
                                                      of the r×r core, never forming the out×in product)
    s'    = s                                        the layer's scaling is kept: alpha' = s·k (s·√k with
                                                      rsLoRA), so training can continue with the same dynamics
    ρ     = s / s'(as PEFT computes it in float64)   folded into the singular values before the √S split, so
                                                      s'·B'·A' reproduces s·(truncated B·A) to rounding even
                                                      where alpha'/k is an ulp off s

Config written: the source config with ``r`` / ``lora_alpha`` set to the most common new rank / alpha; when
layers differ, ``rank_pattern`` / ``alpha_pattern`` list *every* layer by its escaped full path, longest path
first (PEFT takes the first key matching ``(.*\\.)?(key)$``; a short path can be a suffix of a longer one, so the
longer one must come first), and the written patterns are checked against PEFT's lookup rule before anything is
saved. A layer whose new rank equals its rank keeps its tensors and alpha. Tensors that are not LoRA factors
(``modules_to_save`` copies, trainable tokens) are copied unchanged.

Refused with a ValueError naming the feature: non-LoRA adapters, DoRA, ``lora_bias``, QA-LoRA, aLoRA, BD-LoRA,
Arrow, ``target_parameters``, LoRA on embeddings / convolutions (non-2-D factors or ``lora_embedding_*`` keys),
and ``init_lora_weights`` schemes that rewrite the base weights when PEFT loads the adapter (PiSSA, CorDA,
OLoRA, LoftQ, LoRA-GA, MiCA): their factors do not describe a delta on the stock base model.

Reference: I. Vulić et al., "LoRA-Squeeze", arXiv:2602.10993, 2026 (post-hoc squeeze of trained adapters);
PEFT's ``LoraConfig`` semantics (``peft/tuners/lora/{config,model,layer}.py``).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter

import torch

from lowrank.compress.squeeze import (
    SqueezeReport,
    _allocate,
    _check_choice,
    _check_factors,
    _check_fraction,
    _check_rank,
    _report,
    _spectra,
)
from lowrank.nn.peft import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, _pattern_value

__all__ = ["squeeze_peft_adapter"]

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_PREFIX = "base_model.model."
_REFUSED_FLAGS = ("use_dora", "lora_bias", "use_qalora", "alora_invocation_tokens", "use_bdlora",
                  "arrow_config", "target_parameters")
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _peft_scaling(alpha: float, r: int, rslora: bool) -> float:
    """The scaling PEFT computes (``LoraLayer.update_layer``)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def _check_config(config: dict, where: str) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{where}: adapter is of type {peft_type}; only LORA adapters can be squeezed")
    for flag in _REFUSED_FLAGS:
        if config.get(flag):
            raise ValueError(f"{where}: adapter config sets {flag}={config[flag]!r}; this LoRA variant is "
                             "not supported (its layers compute more than s·B·A)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ValueError(f"{where}: init_lora_weights={init!r} rewrites the base weights when PEFT loads "
                         "the adapter, so its factors are not a delta on the stock model; convert it to "
                         "plain LoRA first (PEFT save_pretrained(path_initial_model_for_weight_conversion=...))")


def _read(src_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg_path = os.path.join(src_dir, ADAPTER_CONFIG_NAME)
    weights = os.path.join(src_dir, ADAPTER_WEIGHTS_NAME)
    if not os.path.isdir(src_dir):
        raise ValueError(f"squeeze_peft_adapter: src_dir {src_dir!r} is not a directory")
    for path in (cfg_path, weights):
        if not os.path.isfile(path):
            raise ValueError(f"squeeze_peft_adapter: {src_dir!r} has no {os.path.basename(path)} (found: "
                             f"{sorted(os.listdir(src_dir))})")
    with open(cfg_path, encoding="utf-8") as f:
        config = json.load(f)
    return config, load_file(weights)


def _pairs(state: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, str]]:
    """{module path: {"A": key, "B": key}} for every LoRA pair; refuses LoRA keys of other kinds."""
    pairs: dict[str, dict[str, str]] = {}
    for key in state:
        match = _LORA_KEY.match(key)
        if match is None:
            if re.search(r"(^|\.)lora_", key):
                raise ValueError(f"{where}: key {key!r} is a LoRA tensor of a kind that cannot be squeezed "
                                 "(only Linear lora_A / lora_B weights are supported: no embeddings, "
                                 "convolutions, DoRA magnitudes or LoRA biases)")
            continue
        module = match["module"].removeprefix(_PREFIX)
        pairs.setdefault(module, {})[match["which"]] = key
    if not pairs:
        raise ValueError(f"{where}: the adapter holds no lora_A / lora_B weights")
    for module, keys in pairs.items():
        if set(keys) != {"A", "B"}:
            raise ValueError(f"{where}: layer {module!r} has lora_{next(iter(keys))} but no partner factor")
        for which in "AB":
            if state[keys[which]].ndim != 2:
                shape = tuple(state[keys[which]].shape)
                raise ValueError(f"{where}: {keys[which]!r} has shape {shape}; only 2-D (Linear) LoRA "
                                 "factors are supported")
    return pairs


def _patterns(names: list[str], values: list, default) -> dict:
    """``{re.escape(path): value}`` for every layer (longest path first) if any differs from ``default``."""
    if all(v == default for v in values):
        return {}
    order = sorted(range(len(names)), key=lambda i: (-len(names[i]), names[i]))
    return {re.escape(names[i]): values[i] for i in order}


def squeeze_peft_adapter(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, rank: int | None = None, *,
                         energy: float | None = None, budget: float | None = None) -> SqueezeReport:
    """Squeeze the PEFT LoRA adapter in ``src_dir`` and write the result to ``dst_dir`` (module docstring).

    Args:
        src_dir: a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        dst_dir: output directory (created; must differ from ``src_dir``); the same two files are written.
        rank: every layer gets min(rank, r, out, in). Exactly one of rank / energy / budget.
        energy: e in (0, 1]: per layer the smallest rank keeping ≥ e of ‖ΔW‖_F².
        budget: b in (0, 1]: keep ≤ b·(all LoRA parameters), allocated to the largest singular values of the
            scaled updates s·ΔW over all layers (≥ 1 per layer).

    Returns:
        :class:`lowrank.compress.SqueezeReport` (per layer: module path, shape, old / new rank, retained
        energy).

    Raises:
        ValueError: missing files, an unsupported adapter (module docstring), a config whose r disagrees with
            the stored factors, non-finite factors, not exactly one of rank / energy / budget, bad values.
    """
    where = "squeeze_peft_adapter"
    _check_choice(rank, energy, budget, allow_budget=True)
    rank = None if rank is None else _check_rank(rank)
    energy = None if energy is None else _check_fraction(energy, "energy")
    budget = None if budget is None else _check_fraction(budget, "budget")
    src_dir, dst_dir = os.fspath(src_dir), os.fspath(dst_dir)
    if os.path.realpath(src_dir) == os.path.realpath(dst_dir):
        raise ValueError(f"{where}: dst_dir must differ from src_dir ({src_dir!r}); the source is not "
                         "overwritten")
    config, state = _read(src_dir)
    _check_config(config, where)
    pairs = _pairs(state, where)
    rslora = bool(config.get("use_rslora", False))
    names = sorted(pairs)
    factors, scalings, alphas, r_src = [], [], [], []
    for name in names:
        a, b = state[pairs[name]["A"]], state[pairs[name]["B"]]
        try:
            r, _, _ = _check_factors(a, b)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: layer {name!r}: {e}") from None
        r_cfg = _pattern_value(config.get("rank_pattern"), name, config.get("r", 8))
        if r_cfg != r:
            raise ValueError(f"{where}: layer {name!r} has factors of rank {r} but the config gives "
                             f"r={r_cfg}")
        alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        factors.append((a, b))
        alphas.append(alpha)
        scalings.append(_peft_scaling(alpha, r, rslora))
        r_src.append(r)
    cores = _spectra(factors)
    sizes = [a.shape[1] + b.shape[0] for a, b in factors]
    ranks = _allocate(cores, scalings, sizes, rank, energy, budget, r_src)

    out = {k: v for k, v in state.items() if _LORA_KEY.match(k) is None}
    new_alphas = []
    for name, (a, b), core, s, alpha, r, k in zip(names, factors, cores, scalings, alphas, r_src, ranks):
        if k == r:
            new_alphas.append(alpha)
            out[pairs[name]["A"]], out[pairs[name]["B"]] = a, b
            continue
        new_alpha = _number(s * math.sqrt(k) if rslora else s * k)
        rho = s / _peft_scaling(new_alpha, k, rslora)  # 1 up to an ulp: keeps s'·B'·A' = s·B_k·A_k exactly
        new_a, new_b = core.lora(k)
        root = math.sqrt(rho)
        out[pairs[name]["A"]] = (new_a * root).to(a.dtype).contiguous()
        out[pairs[name]["B"]] = (new_b * root).to(b.dtype).contiguous()
        new_alphas.append(new_alpha)

    r_common = Counter(ranks).most_common(1)[0][0]
    alpha_common = Counter(new_alphas).most_common(1)[0][0]
    new_config = dict(config)
    new_config.update(r=r_common, lora_alpha=alpha_common, rank_pattern=_patterns(names, ranks, r_common),
                      alpha_pattern=_patterns(names, new_alphas, alpha_common))
    for name, k, alpha in zip(names, ranks, new_alphas):  # the written config must reproduce every layer
        got_r = _pattern_value(new_config["rank_pattern"], name, r_common)
        got_alpha = _pattern_value(new_config["alpha_pattern"], name, alpha_common)
        if (got_r, got_alpha) != (k, alpha):
            raise RuntimeError(f"{where}: internal error: the written patterns give layer {name!r} "
                               f"r={got_r}, alpha={got_alpha} instead of r={k}, alpha={alpha}")

    from safetensors.torch import save_file

    os.makedirs(dst_dir, exist_ok=True)
    save_file(out, os.path.join(dst_dir, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(dst_dir, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(new_config, f, indent=2)  # not sort_keys: the order of the pattern keys matters to PEFT
    shapes = [(b.shape[0], a.shape[1]) for a, b in factors]
    return _report(names, cores, scalings, shapes, r_src, ranks)
