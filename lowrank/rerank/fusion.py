"""Fusion of a first-stage run and a reranker run.

Linear fusion of min-max-normalized scores, per query q over the union of both lists::

    s~(d) = (s(d) - min_q s) / (max_q s - min_q s)       (all-equal scores -> 1; a document a run lacks -> 0)
    fused(d) = (1 - w) * s~_first(d) + w * s~_rerank(d)

Reciprocal-rank fusion (Cormack, Clarke & Büttcher, SIGIR 2009), ranks from 1, k = 60 by default::

    rrf(d) = sum_runs 1 / (k + rank_run(d))               (a run lacking d contributes 0)

The weight w is best chosen on training queries (:func:`tune_fusion_weight`): the two score scales differ
(BM25 is unbounded, cosine lives in [-1, 1]) and min-max is only a first correction for that.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lowrank.rerank.evaluate import METRICS, evaluate
from lowrank.rerank.retrieve import Run

__all__ = ["linear_fusion", "minmax_normalize", "rrf", "tune_fusion_weight"]


def _check_run(run: Mapping, name: str) -> None:
    if not isinstance(run, Mapping):
        raise TypeError(f"{name} must be a mapping qid -> [(docid, score), ...], got {type(run).__name__}")


def _sorted(scores: dict[str, float]) -> list[tuple[str, float]]:
    # score descending, ties by doc id so fused runs are reproducible whatever the input order
    return sorted(scores.items(), key=lambda x: (-x[1], x[0]))


def minmax_normalize(run: Mapping[str, Sequence[tuple[str, float]]]) -> Run:
    """Scale each query's scores to [0, 1]; a list whose scores are all equal maps to 1.0 (no information)."""
    _check_run(run, "run")
    out: Run = {}
    for qid, hits in run.items():
        if not hits:
            out[qid] = []
            continue
        s = np.asarray([float(x) for _, x in hits], dtype=np.float64)
        lo, hi = s.min(), s.max()
        norm = (s - lo) / (hi - lo) if hi > lo else np.ones_like(s)
        out[qid] = [(d, float(v)) for (d, _), v in zip(hits, norm)]
    return out


def linear_fusion(first: Mapping[str, Sequence[tuple[str, float]]],
                  second: Mapping[str, Sequence[tuple[str, float]]], weight: float = 0.5) -> Run:
    """``(1 - weight) * minmax(first) + weight * minmax(second)`` per query, over the union of the two lists.

    ``weight`` = 0 reproduces the first run's ranking, 1 the second's (on the documents either run holds).
    """
    _check_run(first, "first")
    _check_run(second, "second")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"weight must be a number, got {type(weight).__name__}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    n1, n2 = minmax_normalize(first), minmax_normalize(second)
    out: Run = {}
    for qid in dict.fromkeys([*n1, *n2]):
        fused: dict[str, float] = {}
        for run, w in ((n1, 1.0 - weight), (n2, weight)):
            for d, v in run.get(qid, []):
                fused[d] = fused.get(d, 0.0) + w * v
        out[qid] = _sorted(fused)
    return out


def rrf(runs: Sequence[Mapping[str, Sequence[tuple[str, float]]]], k: int = 60,
        weights: Sequence[float] | None = None) -> Run:
    """Reciprocal-rank fusion of ``runs`` (each qid -> [(docid, score), ...]); ranks come from score order."""
    if isinstance(runs, Mapping) or not isinstance(runs, Sequence) or not runs:
        raise TypeError("runs must be a non-empty sequence of runs")
    for i, r in enumerate(runs):
        _check_run(r, f"runs[{i}]")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k < 0:
        raise ValueError(f"k must be a non-negative number, got {k!r}")
    if weights is None:
        weights = [1.0] * len(runs)
    if len(weights) != len(runs):
        raise ValueError(f"weights has {len(weights)} entries for {len(runs)} runs")
    out: Run = {}
    qids = dict.fromkeys(q for r in runs for q in r)
    for qid in qids:
        fused: dict[str, float] = {}
        for run, w in zip(runs, weights):
            # Rank by score, not by list position, so a run given in any order fuses the same; stable for ties.
            ranked = sorted(run.get(qid, []), key=lambda x: -float(x[1]))
            for rank, (d, _) in enumerate(ranked, start=1):
                fused[d] = fused.get(d, 0.0) + w / (k + rank)
        out[qid] = _sorted(fused)
    return out


def tune_fusion_weight(first: Mapping[str, Sequence[tuple[str, float]]],
                       second: Mapping[str, Sequence[tuple[str, float]]], qrels: Mapping[str, Mapping[str, int]],
                       metric: str = "ndcg@10", grid: Sequence[float] | None = None) -> tuple[float, dict[float, float]]:
    """The linear-fusion weight that maximizes mean ``metric`` over ``qrels``'s queries (train queries, so the
    test figure stays honest). Returns ``(best weight, {weight: mean metric})``; ties go to the weight nearest 0.5.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    grid = [round(float(w), 6) for w in (np.linspace(0.0, 1.0, 21) if grid is None else grid)]
    if not grid or any(not 0.0 <= w <= 1.0 for w in grid):
        raise ValueError("grid must be a non-empty sequence of weights in [0, 1]")
    table = {w: evaluate(qrels, linear_fusion(first, second, w), metrics=[metric]).mean[metric] for w in grid}
    best = max(table, key=lambda w: (table[w], -abs(w - 0.5)))
    return best, table
