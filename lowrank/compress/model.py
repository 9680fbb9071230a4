"""Whole-model compression: replace a model's Linear layers by :class:`lowrank.nn.LowRankLinear` under one
global parameter budget.

    compress_model(model, budget=β, method=..., calibration=...)  →  CompressionReport

1. Targets: every ``nn.Linear`` (``targets="all-linear"``; Linears inside ``nn.MultiheadAttention``, which
   reads their weights directly, and Linears whose weight is tied to another parameter are skipped) or a list
   of names.
2. Calibration (optional; texts + tokenizer, token batches or a callable, see
   :mod:`lowrank.compress.calibrate`): per-Linear C = XᵀX/N and mean |x|.
3. Per-layer spectra (:mod:`lowrank.compress.spectra`) in the factorization metric: plain SVD without
   calibration, SVD-LLM whitening with it (``factorization="auto"``); "asvd" and "fwsvd" on request.
4. Rank allocation (:mod:`lowrank.compress.allocate`) with Σ params ≤ β·Σ(m·n + m) over the targets:
   "uniform" (same rank fraction), "welore" (normalised-spectrum threshold by bisection; N-LRC layers stay
   dense and are frozen), "greedy" (default; marginal gain per parameter weighted by end-to-end sensitivity).
5. Layers are replaced in place; the report lists per layer the shape, rank, parameters, retained energy,
   weight error ‖W − U·V‖_F/‖W‖_F and, with calibration, output error √(tr(ΔW·C·ΔWᵀ)/tr(W·C·Wᵀ)).

End-to-end sensitivity (greedy). The greedy allocator models the model's output distortion as additive over
layers, D ≈ Σₗ wₗ·eₗ(kₗ) with eₗ(k) = (tail energy)/Eₗ the relative error of layer l in its metric. wₗ is
measured by :func:`measure_sensitivity`: layer l alone is replaced by its rank-kₗᵖ approximation (kₗᵖ = the
rank the uniform allocation gives it at the same budget, or its largest saving rank where uniform keeps it
dense), the model is run on the probe batches, and wₗ = Dₗ/eₗ(kₗᵖ) with Dₗ = Σ‖y − y₀‖²/Σ‖y₀‖² over the
model's output rows (real tokens). A greedy on the per-layer errors alone (wₗ = Eₗ, absolute output error) was
measured to starve the FFN output matrices and lose to uniform end to end; weighting by wₗ fixes that
(NOTES.md). Probe batches (``sensitivity="auto"``): the calibration batches when given; without calibration,
random-token sequences (:func:`lowrank.compress.calibrate.synthetic_token_batches`) for a token model with
``config.vocab_size``: they need no data, and only the allocation uses them (the factorization stays plain
SVD). For any other model without calibration, ``method="greedy"`` raises a ValueError asking for calibration
data or ``sensitivity="none"`` (unweighted relative-error greedy). Nothing falls back silently: the report's
``details["sensitivity"]`` says which probe was used.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank.compress.allocate import (LayerShape, allocate_greedy, allocate_uniform, allocate_welore,
                                       allocation_params, budget_limit, check_budget, dense_params,
                                       auto_greedy_floor, max_saving_rank)
from lowrank.compress.calibrate import (LayerStats, collect_fisher, collect_statistics, make_batches,
                                        model_outputs, synthetic_token_batches)
from lowrank.compress.spectra import KINDS, LayerSpectrum, check_weight, factorize
from lowrank.nn.low_rank_linear import LowRankLinear

__all__ = ["compress_model", "CompressionReport", "LayerReport", "find_targets", "measure_sensitivity",
           "save_compressed", "load_compressed", "read_manifest", "METHODS", "FACTORIZATIONS"]

METHODS = ("greedy", "welore", "uniform")
FACTORIZATIONS = ("auto", *KINDS)
SENSITIVITIES = ("auto", "calibration", "synthetic", "none")
MANIFEST = "compression.json"
WEIGHTS = "model.safetensors"


@dataclass
class LayerReport:
    """One target layer after compression (rank None: kept dense)."""
    name: str
    out_features: int
    in_features: int
    rank: int | None
    params_before: int
    params_after: int
    retained_energy: float
    weight_error: float
    output_error: float | None
    trainable: bool
    sensitivity: float | None = None


@dataclass
class CompressionReport:
    """Result of :func:`compress_model`; ``print(report)`` shows the per-layer table."""
    layers: list[LayerReport]
    budget: float
    method: str
    factorization: str
    params_before: int
    params_after: int
    model_params_before: int
    model_params_after: int
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """params_after / params_before over the target layers (≤ budget)."""
        return self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A fixed-width per-layer table plus totals."""
        w = max([len("layer")] + [len(r.name) for r in self.layers])
        head = (f"{'layer':<{w}}  {'shape':>11}  {'rank':>6}  {'params':>10}  {'after':>10}  {'kept':>6}  "
                f"{'energy':>6}  {'w-err':>6}  {'out-err':>7}  {'sens':>8}")
        lines = [head, "-" * len(head)]
        for r in self.layers:
            rank = "dense" if r.rank is None else str(r.rank)
            out_err = "-" if r.output_error is None else f"{r.output_error:.4f}"
            sens = "-" if r.sensitivity is None else f"{r.sensitivity:.3g}"
            frozen = "" if r.trainable else " (frozen)"
            kept = r.params_after / r.params_before
            lines.append(f"{r.name:<{w}}  {f'{r.out_features}x{r.in_features}':>11}  {rank:>6}  "
                         f"{r.params_before:>10,}  {r.params_after:>10,}  {kept:>6.1%}  "
                         f"{r.retained_energy:>6.3f}  {r.weight_error:>6.4f}  {out_err:>7}  "
                         f"{sens:>8}{frozen}")
        lines.append("-" * len(head))
        lines.append(f"{len(self.layers)} layers, method={self.method}, factorization={self.factorization}: "
                     f"{self.params_before:,} -> {self.params_after:,} parameters ({self.ratio:.4f}, budget "
                     f"{self.budget}); whole model {self.model_params_before:,} -> "
                     f"{self.model_params_after:,}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def find_targets(model: nn.Module, targets: str | Sequence[str] = "all-linear") -> dict[str, nn.Linear]:
    """{name: nn.Linear} to compress (module docstring, step 1).

    Raises ValueError for an unknown or non-Linear name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    if isinstance(targets, str):
        if targets != "all-linear":
            raise ValueError(f"targets must be 'all-linear' or a list of Linear module names, "
                             f"got {targets!r}")
        owners: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
        skip = {f"{name}.{child}" if name else child
                for name, mod in modules.items() if isinstance(mod, nn.MultiheadAttention)
                for child, _ in mod.named_children()}
        out = {name: mod for name, mod in modules.items()
               if isinstance(mod, nn.Linear) and name not in skip and owners.get(id(mod.weight), 0) == 1}
        if not out:
            raise ValueError("targets='all-linear' found no nn.Linear to compress in the model")
        return out
    if not isinstance(targets, Sequence) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError("targets must be 'all-linear' or a non-empty list of module names")
    out = {}
    for name in targets:
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"targets: {name!r} is not an nn.Linear in the model "
                             f"({'missing' if mod is None else type(mod).__name__})")
        out[name] = mod
    return out


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _head(batches: Sequence[Any], n: int) -> list[Any]:
    """The leading batches holding at least n sequences (rows of a batch's first tensor; callables count
    as 0 rows, so all of them are kept)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"probe_sequences must be a positive int, got {n!r}")
    out, rows = [], 0
    for b in batches:
        if rows >= n:
            break
        out.append(b)
        t = b if isinstance(b, torch.Tensor) else (next(iter(b.values())) if isinstance(b, dict) else None)
        rows += 0 if t is None or t.dim() == 0 else t.shape[0]
    return out


def measure_sensitivity(model: nn.Module, layers: Mapping[str, nn.Linear],
                        spectra: Mapping[str, LayerSpectrum], probe_ranks: Mapping[str, int],
                        batches: Sequence[Any], *,
                        output_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                        progress: bool = False) -> dict[str, tuple[float, float, float]]:
    """End-to-end sensitivity of each layer: {name: (Dₗ, eₗ, wₗ = Dₗ/eₗ)} (module docstring).

    Each layer's weight is overwritten by its rank-``probe_ranks[name]`` approximation for one pass over
    ``batches`` and restored bit for bit afterwards (also on error).
    """
    ref = model_outputs(model, batches, output_fn)
    ref_energy = sum(float((r.double() ** 2).sum()) for r in ref)
    if not ref_energy > 0:
        raise ValueError("the model's output on the probe batches is all zero: cannot measure sensitivity")
    it: Any = list(probe_ranks.items())
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="sensitivity", unit="layer")
    out = {}
    for name, k in it:
        lin, spec = layers[name], spectra[name]
        approx = spec.approximation(k).to(device=lin.weight.device, dtype=lin.weight.dtype)
        saved = lin.weight.detach().clone()
        try:
            with torch.no_grad():
                lin.weight.copy_(approx)
            ys = model_outputs(model, batches, output_fn)
        finally:
            with torch.no_grad():
                lin.weight.copy_(saved)
        dist = sum(float(((y.double() - r.double()) ** 2).sum()) for y, r in zip(ys, ref)) / ref_energy
        rel = spec.tail_energy(k) / spec.total_energy if spec.total_energy > 0 else 0.0
        out[name] = (dist, rel, dist / rel if rel > 0 else 0.0)
    return out


def compress_model(model: nn.Module, budget: float = 0.5, method: str = "greedy", calibration: Any = None, *,
                   tokenizer: Any = None, targets: str | Sequence[str] = "all-linear",
                   factorization: str = "auto", exact_svd: bool = True,
                   sensitivity: str | Mapping[str, float] = "auto",
                   output_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                   loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, ridge: float = 1e-4,
                   alpha: float = 0.5, min_reduction: float = 0.0, batch_size: int = 32,
                   max_length: int = 128, probe_sequences: int = 64, greedy_floor: float | str = "auto",
                   progress: bool = True, seed: int = 0) -> CompressionReport:
    """Compress ``model``'s Linear layers IN PLACE into LowRankLinear layers under one parameter budget.

    The target Linears are replaced (``setattr`` on their parents) by new :class:`LowRankLinear` modules;
    layers the allocation keeps dense are left as they are, except that ``method="welore"`` freezes them
    (``requires_grad=False``: WeLore's N-LRCs). Nothing else in the model changes; probes restore every
    weight.

    Args:
        model: the model (any ``nn.Module``); modified in place.
        budget: β ∈ (0, 1]: the target layers keep at most ⌊β·Σ(m·n + m)⌋ parameters.
        method: "greedy" (default), "welore" or "uniform" (see :mod:`lowrank.compress.allocate`).
        calibration: None, texts (with ``tokenizer``), token batches (dicts of tensors), tensors, or a
            callable ``fn(model)`` (see :mod:`lowrank.compress.calibrate`). A few hundred sentences are
            enough.
        tokenizer: a Hugging Face tokenizer, needed when ``calibration`` is a list of texts.
        targets: "all-linear" or a list of Linear module names.
        factorization: "auto" ("whiten" with calibration, "svd" without), "svd", "whiten", "asvd" or "fwsvd"
            (needs calibration and ``loss_fn(outputs, batch) -> scalar``).
        exact_svd: full SVD per layer (default) or :func:`lowrank.linalg.rsvd` of the leading saving ranks.
        sensitivity: how greedy weights layers: "auto" (calibration batches, else random tokens, module
            docstring), "calibration", "synthetic", "none" (all 1), or {name: weight}.
        output_fn: ``fn(outputs, batch) -> tensor`` compared when measuring sensitivity (default: the model's
            ``last_hidden_state`` / ``logits`` / first tensor, real tokens only).
        ridge: relative whitening ridge; alpha: ASVD exponent; min_reduction: WeLore's minimum rank reduction
            for an LRC.
        batch_size, max_length: tokenization of text calibration.
        probe_sequences: sensitivity is measured on the first batches holding this many sequences (one model
            pass per target layer: the dominant cost of greedy); synthetic probes use this many sequences.
        greedy_floor: greedy only: every layer keeps at least this fraction φ ∈ [0, 1] of the rank uniform
            would give it (see :func:`lowrank.compress.allocate.allocate_greedy`'s ``floor``); 0 = plain
            greedy, 1 = uniform. Default "auto": φ(β) = min(1, max(0.75, β + 0.05)) (0.75 at β ≤ 0.7, 0.95 at
            0.9; :func:`lowrank.compress.allocate.auto_greedy_floor`). On all-MiniLM-L6-v2 reranking SciFact
            (BM25 top 20, SVD-LLM whitening) plain greedy kept the embedding closer (cosine) but ranked worse
            than uniform; a floor of 0.75 fixed that at β = 0.5 / 0.7 but lost more at β = 0.9, where
            uniform is nearly lossless; the rising part was chosen on train queries. On the test queries
            greedy still ranks 0.008 below uniform at β = 0.9 (cosine higher), so it beats uniform end to end
            at β = 0.5 and 0.7 only (docs/benchmarks.md, "greedy with a floor" and "a budget-dependent
            floor"). A number gives a fixed floor (the default was 0.75 before).
        progress: tqdm bars. seed: synthetic probes and randomized SVD.

    Returns:
        CompressionReport (``print`` it for the per-layer table).

    Raises:
        ValueError: budget outside (0, 1] or too small; unknown method / factorization / sensitivity; a target
            that is not a Linear; non-finite weights; a data-aware factorization without calibration.
        TypeError: model not an nn.Module; budget not a number.
    """
    budget = check_budget(budget)
    floor_rule = greedy_floor
    if isinstance(greedy_floor, str) and greedy_floor == "auto":
        greedy_floor = auto_greedy_floor(budget)
    elif isinstance(greedy_floor, bool) or not isinstance(greedy_floor, (int, float)) or \
            not 0.0 <= greedy_floor <= 1.0:
        raise ValueError(f"greedy_floor must be 'auto' or a number in [0, 1], got {greedy_floor!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if factorization not in FACTORIZATIONS:
        raise ValueError(f"factorization must be one of {FACTORIZATIONS}, got {factorization!r}")
    if not (isinstance(sensitivity, Mapping) or sensitivity in SENSITIVITIES):
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES} or a {{name: weight}} mapping, "
                         f"got {sensitivity!r}")
    layers = find_targets(model, targets)
    model_before = _n_params(model)
    for name, lin in layers.items():
        check_weight(lin.weight, f"weight of {name!r}")
    batches = None if calibration is None else make_batches(calibration, tokenizer, batch_size=batch_size,
                                                            max_length=max_length)
    kind = ("whiten" if batches is not None else "svd") if factorization == "auto" else factorization
    if kind in ("whiten", "asvd", "fwsvd") and batches is None:
        raise ValueError(f"factorization={kind!r} needs calibration data (calibration=...)")
    if kind == "fwsvd" and loss_fn is None:
        raise ValueError("factorization='fwsvd' needs loss_fn(outputs, batch) -> scalar "
                         "for the Fisher weights")
    notes: list[str] = []
    stats: dict[str, LayerStats] = ({} if batches is None else
                                    collect_statistics(model, layers, batches, progress=progress))
    fisher = collect_fisher(model, layers, batches, loss_fn) if kind == "fwsvd" else {}

    shapes = [LayerShape(n, lin.out_features, lin.in_features, lin.bias is not None)
              for n, lin in layers.items()]
    spectra: dict[str, LayerSpectrum] = {}
    it: Any = list(layers.items())
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"factorize ({kind})", unit="layer")
    gen = torch.Generator().manual_seed(seed)
    for name, lin in it:
        kmax = max_saving_rank(lin.out_features, lin.in_features)
        if kmax == 0:
            continue  # factorizing never saves parameters here: the layer stays dense
        st = stats.get(name)
        spec = factorize(lin.weight, kind, xtx=None if st is None else st.gram,
                         abs_mean=None if st is None else st.abs_mean, fisher_rows=fisher.get(name),
                         ridge=ridge, alpha=alpha, exact=exact_svd, max_rank=None if exact_svd else kmax,
                         generator=gen)
        notes += [f"{name}: {n}" for n in spec.notes]
        spectra[name] = spec
    fact_shapes = [s for s in shapes if s.name in spectra]

    details: dict[str, Any] = {"limit": budget_limit(shapes, budget)}
    sens: dict[str, tuple[float, float, float]] = {}
    if method == "uniform":
        ranks, frac = allocate_uniform(shapes, budget)
        details["rank_fraction"] = frac
    elif method == "welore":
        ranks, tau, _ = allocate_welore(shapes, {n: spectra[n].s if n in spectra else torch.ones(1)
                                                   for n in layers}, budget, min_reduction=min_reduction)
        details["threshold"] = tau  # LRCs: the factorized layers (trainable); N-LRCs: dense, frozen below
    else:
        weights, source = None, sensitivity
        if isinstance(sensitivity, Mapping):
            missing = [n for n in spectra if n not in sensitivity]
            if missing:
                raise ValueError(f"sensitivity mapping lacks layers: {missing[:5]}")
            weights, source = {n: float(sensitivity[n]) for n in spectra}, "given"
        elif sensitivity != "none":
            probe_batches = None if batches is None else _head(batches, probe_sequences)
            if sensitivity == "synthetic" or (sensitivity == "auto" and batches is None):
                try:
                    probe_batches = synthetic_token_batches(model, n_sequences=probe_sequences, seed=seed)
                except ValueError as exc:
                    raise ValueError(f"method='greedy' measures end-to-end sensitivity on probe inputs: "
                                     f"{exc}; or pass sensitivity='none' (relative-error greedy)") from None
                source = "synthetic"
            elif batches is None:
                raise ValueError("sensitivity='calibration' needs calibration data")
            else:
                source = "calibration"
            uni, _ = allocate_uniform(shapes, budget)
            probes = {n: (uni[n] if uni[n] is not None else max_saving_rank(s.out_features, s.in_features))
                      for s in fact_shapes for n in [s.name]}
            sens = measure_sensitivity(model, {n: layers[n] for n in probes}, spectra, probes, probe_batches,
                                       output_fn=output_fn, progress=progress)
            weights = {n: v[2] for n, v in sens.items()}
        details["sensitivity"] = source
        details["greedy_floor"] = greedy_floor
        if floor_rule == "auto":
            details["greedy_floor_rule"] = "auto"
        ranks = allocate_greedy(shapes, {n: spectra[n].s for n in spectra},
                                {n: spectra[n].total_energy for n in spectra}, budget, weights=weights,
                                floor=greedy_floor) \
            if fact_shapes else {s.name: None for s in shapes}
        for s in shapes:
            ranks.setdefault(s.name, None)

    reports = []
    for s in shapes:
        lin, k = layers[s.name], ranks[s.name]
        before = dense_params(s.out_features, s.in_features, s.bias)
        spec, st = spectra.get(s.name), stats.get(s.name)
        if k is None:
            if method == "welore":
                for p in lin.parameters():
                    p.requires_grad_(False)
            reports.append(LayerReport(s.name, s.out_features, s.in_features, None, before, before, 1.0, 0.0,
                                       None if st is None else 0.0, method != "welore",
                                       sens[s.name][2] if s.name in sens else None))
            continue
        u, v = spec.factors(k)
        w64 = lin.weight.detach().double()
        delta = w64 - (u @ v).to(w64.device)
        werr = float(delta.norm() / w64.norm()) if float(w64.norm()) > 0 else 0.0
        oerr = None
        if st is not None:
            c = st.gram.to(w64.device)
            num, den = float(((delta @ c) * delta).sum()), float(((w64 @ c) * w64).sum())
            oerr = (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0
        dev, dt = lin.weight.device, lin.weight.dtype
        new = LowRankLinear.from_factors(u.to(device=dev, dtype=dt), v.to(device=dev, dtype=dt),
                                         None if lin.bias is None else lin.bias.detach())
        new.train(lin.training)
        _set_module(model, s.name, new)
        reports.append(LayerReport(s.name, s.out_features, s.in_features, k, before,
                                   allocation_params([s], {s.name: k}), spec.retained_energy(k), werr, oerr,
                                   True, sens[s.name][2] if s.name in sens else None))
    params_before = sum(r.params_before for r in reports)
    params_after = sum(r.params_after for r in reports)
    return CompressionReport(reports, budget, method, kind, params_before, params_after, model_before,
                             _n_params(model), details, notes)


def save_compressed(model: nn.Module, report: CompressionReport, directory: str | os.PathLike) -> None:
    """Write ``model.safetensors`` (the whole state dict, tied tensors deduplicated) and ``compression.json``.

    The manifest records every target layer's rank (None = dense), sizes, bias and trainability, plus the
    report's budget, method, factorization and totals. The model must hold the LowRankLinear layers the report
    lists.
    """
    from safetensors.torch import save_model

    if not isinstance(report, CompressionReport):
        raise TypeError(f"report must be a CompressionReport, got {type(report).__name__}")
    modules = dict(model.named_modules())
    for r in report.layers:
        mod = modules.get(r.name)
        ok = (isinstance(mod, LowRankLinear) and mod.rank == r.rank) if r.rank is not None else \
            isinstance(mod, nn.Linear)
        if not ok:
            raise ValueError(f"report: layer {r.name!r} (rank {r.rank}) does not match the model "
                             f"({type(mod).__name__ if mod is not None else 'missing'})")
    os.makedirs(directory, exist_ok=True)
    save_model(model, os.path.join(directory, WEIGHTS))
    manifest = {
        "format": "lowrank.compressed", "version": 1, "model_class": type(model).__name__,
        "budget": report.budget, "method": report.method, "factorization": report.factorization,
        "params_before": report.params_before, "params_after": report.params_after,
        "layers": {r.name: {"rank": r.rank, "in_features": r.in_features, "out_features": r.out_features,
                            "bias": r.params_before > r.in_features * r.out_features,
                            "trainable": r.trainable}
                   for r in report.layers},
    }
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON manifest written by :func:`save_compressed`."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"directory: no {MANIFEST} in {os.fspath(directory)!r}")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != "lowrank.compressed":
        raise ValueError(f"{path} is not a lowrank compression manifest")
    return manifest


def load_compressed(model: nn.Module | str | os.PathLike, directory: str | os.PathLike) -> nn.Module:
    """Rebuild a compressed model saved by :func:`save_compressed`.

    ``model`` is the uncompressed architecture (a skeleton: any weights, they are overwritten) or a path that
    ``transformers.AutoModel.from_pretrained`` loads. Every manifest layer with a rank is replaced by a
    LowRankLinear of that rank, then the saved state dict is loaded strictly (bit-exact) and N-LRC layers are
    frozen again. The skeleton is modified in place and returned.
    """
    from safetensors.torch import load_model

    manifest = read_manifest(directory)
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModel
        model = AutoModel.from_pretrained(os.fspath(model))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a model directory, got {type(model).__name__}")
    modules = dict(model.named_modules())
    for name, spec in manifest["layers"].items():
        mod = modules.get(name)
        if not isinstance(mod, (nn.Linear, LowRankLinear)):
            raise ValueError(f"model: layer {name!r} from the manifest is not a Linear in the model")
        if (mod.out_features, mod.in_features) != (spec["out_features"], spec["in_features"]):
            raise ValueError(f"model: layer {name!r} is {mod.out_features}x{mod.in_features}, the manifest "
                             f"says {spec['out_features']}x{spec['in_features']}")
        p = next(mod.parameters())
        if spec["rank"] is not None:
            new = LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"],
                                dtype=p.dtype, device=p.device)
            new.train(mod.training)
            _set_module(model, name, new)
        elif isinstance(mod, LowRankLinear):
            raise ValueError(f"model: layer {name!r} is low-rank, the manifest says dense")
    load_model(model, os.path.join(directory, WEIGHTS), strict=True)
    for name, spec in manifest["layers"].items():
        if not spec["trainable"]:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(False)
    return model
