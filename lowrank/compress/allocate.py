"""Rank allocation under one global parameter budget.

Parameters are counted, never rank. A Linear W [m, n] (+ bias [m]) costs

    dense:      m·n + m
    rank k:     k·(m + n) + m          (U [m, k], V [k, n], the same bias)

so factorizing saves parameters only for k ≤ k_max = ⌊(m·n − 1)/(m + n)⌋; an allocation that would give a
layer a larger rank keeps it dense instead (rank ``None``). The budget is a fraction β ∈ (0, 1] of the dense
parameters of the layers being compressed: Σ cost ≤ ⌊β·Σ(m·n + m)⌋, always honoured exactly.

Allocators (each returns {name: rank or None}):

  * :func:`allocate_uniform`: the same rank fraction f for every layer, kₗ = max(1, ⌊f·min(mₗ, nₗ)⌋) (dense if
    kₗ > k_max), with the largest f that fits (cost is monotone in f, so a binary search over the finite set
    of break points kₗ/min(mₗ, nₗ) finds it).
  * :func:`allocate_welore`: WeLore. Singular values are min-max normalised per layer,
    σ̃ᵢ = (σᵢ − σ_min)/(σ_max − σ_min), and a layer keeps kₗ(τ) = #{i : σ̃ᵢ ≥ τ}. WeLore hand-tunes τ per
    model; here τ is found by bisection (over the finite set of σ̃ values) as the smallest τ meeting the
    budget. Layers that end up factorized (and reduce rank by more than ``min_reduction``) are LRCs (low-rank
    components, trainable); the others stay dense and are N-LRCs (frozen by
    :func:`lowrank.compress.compress_model`).
  * :func:`allocate_greedy`: every layer starts at rank 1; then the next unit of parameters goes where it buys
    the largest predicted drop of end-to-end distortion per parameter. Layer l's i-th singular direction buys
    gₗ,ᵢ = wₗ·σₗ,ᵢ²/Eₗ at cost mₗ + nₗ (Eₗ = ‖Mₗ‖_F², σₗ the spectrum of the layer in its metric, see
    :mod:`lowrank.compress.spectra`), and turning the layer dense after k_max buys wₗ·(tail energy)/Eₗ at cost
    m·n − k_max·(m + n). wₗ is the layer's end-to-end sensitivity (measured by
    :func:`lowrank.compress.model.measure_sensitivity`: distortion of the model output per unit of relative
    layer error). With wₗ = 1 it minimizes the summed relative layer error. Gains per layer are decreasing
    except for the dense step, so each layer's items are merged into their upper concave hull (adjacent items
    pooled while a later one has a higher gain per parameter) and the hull pieces are taken in order of gain
    per parameter from a heap; a piece that no longer fits is taken in part (the leading rank items that fit).
    For a separable concave objective this is the optimal allocation up to the last partial piece.

References: Jaiswal et al., "From GaLore to WeLore: How low-rank weights non-uniformly emerge from low-rank
gradients", 2024 (normalised-spectrum threshold, LRC / N-LRC); the greedy is the classic marginal-gain
(water-filling) allocation for separable concave objectives.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["LayerShape", "dense_params", "low_rank_params", "max_saving_rank", "check_budget", "budget_limit",
           "allocation_params", "allocate_uniform", "allocate_welore", "allocate_greedy", "auto_greedy_floor"]


@dataclass(frozen=True)
class LayerShape:
    """A Linear layer as the allocators see it: W [out_features, in_features] (+ bias [out_features])."""
    name: str
    out_features: int
    in_features: int
    bias: bool

    @property
    def min_dim(self) -> int:
        return min(self.out_features, self.in_features)


def dense_params(m: int, n: int, bias: bool) -> int:
    """m·n (+ m): the parameters of a dense Linear [m, n]."""
    return m * n + (m if bias else 0)


def low_rank_params(m: int, n: int, k: int, bias: bool) -> int:
    """k·(m + n) (+ m): the parameters of a rank-k factorization of [m, n]."""
    return k * (m + n) + (m if bias else 0)


def max_saving_rank(m: int, n: int) -> int:
    """k_max = ⌊(m·n − 1)/(m + n)⌋, the largest k with k·(m + n) < m·n (0: factorizing never saves)."""
    return (m * n - 1) // (m + n)


def check_budget(budget: object) -> float:
    """Validate β ∈ (0, 1] (a real number, not a bool)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a number in (0, 1], got {type(budget).__name__}")
    budget = float(budget)
    if not (math.isfinite(budget) and 0.0 < budget <= 1.0):
        raise ValueError(f"budget must be in (0, 1] (a fraction of the layers' parameters), got {budget}")
    return budget


def budget_limit(layers: Sequence[LayerShape], budget: float) -> int:
    """⌊β·Σ dense parameters⌋: the most parameters an allocation may use."""
    total = sum(dense_params(s.out_features, s.in_features, s.bias) for s in layers)
    return math.floor(check_budget(budget) * total)


def _cost(s: LayerShape, k: int | None) -> int:
    if k is None:
        return dense_params(s.out_features, s.in_features, s.bias)
    return low_rank_params(s.out_features, s.in_features, k, s.bias)


def allocation_params(layers: Sequence[LayerShape], ranks: Mapping[str, int | None]) -> int:
    """Σ cost of an allocation ({name: rank or None = dense})."""
    return sum(_cost(s, ranks[s.name]) for s in layers)


def _minimum(layers: Sequence[LayerShape], limit: int, budget: float) -> None:
    floor_ = allocation_params(layers, {s.name: (1 if max_saving_rank(s.out_features, s.in_features) >= 1
                                                 else None) for s in layers})
    if floor_ > limit:
        total = allocation_params(layers, {s.name: None for s in layers})
        raise ValueError(f"budget {budget} is too small: even rank 1 in every layer needs {floor_} of "
                         f"{total} parameters (budget >= {floor_ / total:.4f})")


def _check_layers(layers: Sequence[LayerShape]) -> None:
    if len(layers) == 0:
        raise ValueError("layers must not be empty")
    names = [s.name for s in layers]
    if len(set(names)) != len(names):
        raise ValueError("layers must have unique names")


def _uniform_ranks(layers: Sequence[LayerShape], f: float) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for s in layers:
        k = max(1, math.floor(f * s.min_dim + 1e-9))
        out[s.name] = k if k <= max_saving_rank(s.out_features, s.in_features) else None
    return out


def allocate_uniform(layers: Sequence[LayerShape], budget: float) -> tuple[dict[str, int | None], float]:
    """Same rank fraction f in every layer (module docstring). Returns (ranks, f)."""
    _check_layers(layers)
    limit = budget_limit(layers, budget)
    _minimum(layers, limit, budget)
    # cost(f) is non-decreasing and piecewise constant with break points at k / min(m, n)
    points = sorted({k / s.min_dim for s in layers for k in range(1, s.min_dim + 1)})
    lo, hi = 0, len(points) - 1
    if allocation_params(layers, _uniform_ranks(layers, points[hi])) <= limit:
        return _uniform_ranks(layers, points[hi]), points[hi]
    # invariant: points[lo] fits (rank 1 everywhere fits, checked above), points[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if allocation_params(layers, _uniform_ranks(layers, points[mid])) <= limit:
            lo = mid
        else:
            hi = mid
    return _uniform_ranks(layers, points[lo]), points[lo]


def _normalized(sigma: torch.Tensor, min_dim: int) -> torch.Tensor:
    s = sigma.detach().to(torch.float64).cpu()
    # a partial spectrum (randomized SVD) does not know σ_min: the lower bound 0 is used when it is incomplete
    smin = float(s[-1]) if s.numel() == min_dim else 0.0
    span = float(s[0]) - smin
    if span <= 0:
        return torch.ones_like(s)  # flat spectrum (e.g. an all-equal or zero weight): nothing to rank by
    return (s - smin) / span


def allocate_welore(layers: Sequence[LayerShape], spectra: Mapping[str, torch.Tensor], budget: float, *,
                    min_reduction: float = 0.0) -> tuple[dict[str, int | None], float, dict[str, bool]]:
    """WeLore's normalised-spectrum threshold, τ by bisection to meet the budget (module docstring).

    Args:
        spectra: {name: singular values [r], descending} (r = min(m, n), or fewer from a randomized SVD).
        min_reduction: a layer is factorized (LRC) only if it drops more than this fraction of its rank
            (WeLore's ``min_ratio``); otherwise it stays dense (N-LRC).

    Returns:
        (ranks, τ, lrc) with lrc[name] True for low-rank components, False for dense, frozen N-LRCs.
    """
    _check_layers(layers)
    if not (isinstance(min_reduction, (int, float)) and 0.0 <= min_reduction < 1.0):
        raise ValueError(f"min_reduction must be in [0, 1), got {min_reduction!r}")
    limit = budget_limit(layers, budget)
    _minimum(layers, limit, budget)
    norm = {s.name: _normalized(spectra[s.name], s.min_dim) for s in layers}

    def ranks_at(tau: float) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for s in layers:
            k = max(1, int((norm[s.name] >= tau - 1e-12).sum()))
            saving = k <= max_saving_rank(s.out_features, s.in_features)
            out[s.name] = k if saving and (1 - k / s.min_dim) > min_reduction else None
        return out

    # cost(τ) is non-increasing in τ and steps only at the σ̃ values: search the smallest feasible τ
    taus = sorted({float(t) for v in norm.values() for t in v.tolist()} | {0.0, 1.0 + 1e-9})
    lo, hi = 0, len(taus) - 1
    if allocation_params(layers, ranks_at(taus[lo])) <= limit:
        hi = lo
    else:
        if allocation_params(layers, ranks_at(taus[hi])) > limit:
            # with min_reduction > 0, rank 1 everywhere can still leave layers dense
            raise ValueError(f"budget {budget} cannot be met by WeLore's rule with "
                             f"min_reduction={min_reduction}")
        while hi - lo > 1:  # invariant: taus[lo] infeasible, taus[hi] feasible
            mid = (lo + hi) // 2
            if allocation_params(layers, ranks_at(taus[mid])) <= limit:
                hi = mid
            else:
                lo = mid
    ranks = ranks_at(taus[hi])
    return ranks, min(taus[hi], 1.0), {name: k is not None for name, k in ranks.items()}


def allocate_greedy(layers: Sequence[LayerShape], spectra: Mapping[str, torch.Tensor],
                    energies: Mapping[str, float], budget: float, *,
                    weights: Mapping[str, float] | None = None, floor: float = 0.0) -> dict[str, int | None]:
    """Global marginal-gain allocation (module docstring).

    Args:
        spectra: {name: singular values σ [r] of the layer in its metric, descending}.
        energies: {name: Eₗ = ‖Mₗ‖_F²} (≥ Σσ²; the remainder is energy beyond a partial spectrum).
        weights: {name: wₗ ≥ 0}, end-to-end sensitivities (default 1 for every layer).
        floor: φ ∈ [0, 1]: every layer starts at max(1, ⌊φ·k̄ₗ⌋) instead of rank 1, where k̄ₗ is the rank
            :func:`allocate_uniform` gives it at the same budget (k_max when uniform keeps it dense); only the
            rest of the budget is placed by marginal gain. φ = 0 is the plain greedy, φ = 1 is uniform. Why:
            the gains are predicted from a first-order, per-layer-additive model of the distortion; a layer
            that model ranks low can be cut to a handful of ranks, and what those ranks carried (fine
            distinctions a ranking reads but a mean-squared distortion averages away) is lost. The floor
            bounds how far greedy may move from uniform.
    """
    _check_layers(layers)
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be a number in [0, 1], got {floor!r}")
    limit = budget_limit(layers, budget)
    _minimum(layers, limit, budget)
    start = {s.name: 1 for s in layers}
    if floor > 0:
        uni, _ = allocate_uniform(layers, budget)
        for s in layers:
            k_uni = uni[s.name] if uni[s.name] is not None else max_saving_rank(s.out_features, s.in_features)
            start[s.name] = max(1, math.floor(floor * k_uni + 1e-9))
    ranks: dict[str, int | None] = {}
    heap: list[tuple[float, int, int]] = []
    hulls: dict[int, list[list[tuple[int, float, str]]]] = {}
    used = 0
    for idx, s in enumerate(layers):
        m, n = s.out_features, s.in_features
        kmax = max_saving_rank(m, n)
        if kmax == 0:
            ranks[s.name] = None
            used += _cost(s, None)
            continue
        k0 = min(start[s.name], kmax)
        ranks[s.name] = k0
        used += _cost(s, k0)
        w = 1.0 if weights is None else float(weights[s.name])
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"weights[{s.name!r}] must be finite and >= 0, got {w}")
        sig2 = spectra[s.name].detach().to(torch.float64).cpu() ** 2
        energy = float(energies[s.name])
        scale = w / energy if energy > 0 else 0.0
        if sig2.numel() < kmax:
            raise ValueError(f"spectra[{s.name!r}] has {sig2.numel()} values; need at least {kmax}")
        items: list[tuple[int, float, str]] = [(m + n, float(g) * scale, "rank") for g in sig2[k0:kmax]]
        tail = max(energy - float(sig2[:kmax].sum()), 0.0)
        items.append((m * n - kmax * (m + n), tail * scale, "dense"))
        hulls[idx] = _concave_hull(items)
        heapq.heappush(heap, (-_ratio(hulls[idx][0]), idx, 0))
    while heap:
        _, idx, j = heapq.heappop(heap)
        s, piece = layers[idx], hulls[idx][j]
        left = limit - used
        taken = 0
        for cost, _, kind in piece:  # the leading items that fit (all of them when the whole piece fits)
            if cost > left:
                break
            left -= cost
            taken += 1
            if kind == "dense":
                ranks[s.name] = None
            else:
                ranks[s.name] += 1
        used = limit - left
        if taken == len(piece) and j + 1 < len(hulls[idx]):
            heapq.heappush(heap, (-_ratio(hulls[idx][j + 1]), idx, j + 1))
    return ranks


def auto_greedy_floor(budget: float) -> float:
    """The floor φ(β) = min(1, max(0.75, β + 0.05)) that ``greedy_floor="auto"`` gives greedy at budget β.

    0.75 up to β = 0.7, then rising with β (0.85 at 0.8, 0.95 at 0.9, 1 = uniform from 0.95 on): greedy may
    move a layer at most 25% below its uniform rank under strong compression, and less the milder the
    compression. Why: the reallocation is driven by a first-order, per-layer-additive distortion model; at mild
    compression uniform is already close to lossless (all-MiniLM-L6-v2 at β = 0.9 ranks SciFact within 0.004
    nDCG@10 of the uncompressed model), so there is little left for it to win, while what it misjudges costs
    ranking quality (greedy with φ = 0.75 / 0.9 lost 0.012 / 0.008 nDCG@10 to uniform at β = 0.9 on SciFact
    train queries, φ = 0.95 matched it). The constants were chosen on SciFact train queries, not the test
    queries (docs/benchmarks.md, "A budget-dependent floor"). On the test queries φ = 0.95 still ranked
    0.008 below uniform at β = 0.9 (its embedding cosine is higher): the rule narrows that gap, it does not
    close it.
    """
    budget = check_budget(budget)
    return min(1.0, max(0.75, round(budget + 0.05, 9)))  # round: 0.9 + 0.05 is 0.9500000000000001


def _ratio(piece: list[tuple[int, float, str]]) -> float:
    return sum(g for _, g, _ in piece) / sum(c for c, _, _ in piece)


def _concave_hull(items: list[tuple[int, float, str]]) -> list[list[tuple[int, float, str]]]:
    """Pool adjacent items until gain per parameter is non-increasing along the layer (upper concave hull)."""
    pieces: list[list[tuple[int, float, str]]] = []
    for it in items:
        pieces.append([it])
        while len(pieces) > 1 and _ratio(pieces[-1]) > _ratio(pieces[-2]):
            last = pieces.pop()
            pieces[-1] = pieces[-1] + last
    return pieces
