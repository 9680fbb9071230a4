"""Ranking metrics (via pytrec_eval, i.e. trec_eval's own C code) and throughput / latency helpers.

Metrics, per query, then averaged over every query with at least one relevant (grade >= 1) document; a query
missing from the run scores 0 (pytrec_eval alone would silently leave it out of the mean and inflate it):

    nDCG@10    sum_{i<=10} g_i / log2(i + 1), divided by the same sum for the ideal ordering; g_i is the graded
               relevance (trec_eval's linear gain), judged-non-relevant and unjudged documents gain 0
    Recall@100 |relevant in top 100| / |relevant|, relevant = grade >= 1
    MRR@10     1 / rank of the first relevant document within the top 10, else 0

Documents are ordered as trec_eval orders them: score descending, ties by document id descending. The run's list
order is ignored, so give distinct scores where order matters. References: Järvelin & Kekäläinen, "Cumulated
gain-based evaluation of IR techniques" (TOIS 2002); Van Gysel & de Rijke, "Pytrec_eval" (SIGIR 2018).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["METRICS", "EvalResult", "docs_per_second", "evaluate", "latency_stats"]

#: Reported name -> (pytrec_eval measure, result key, rank cut-off applied to the run before evaluation or None).
METRICS: dict[str, tuple[str, str, int | None]] = {
    "ndcg@10": ("ndcg_cut.10", "ndcg_cut_10", None),
    "recall@100": ("recall.100", "recall_100", None),
    # trec_eval's recip_rank has no cut-off: MRR@10 is recip_rank over the run cut to its top 10.
    "mrr@10": ("recip_rank", "recip_rank", 10),
}

RunLike = Mapping[str, Sequence[tuple[str, float]]] | Mapping[str, Mapping[str, float]]


@dataclass
class EvalResult:
    """``mean[metric]`` over all judged queries and ``per_query[qid][metric]``; metric names as in METRICS."""

    mean: dict[str, float]
    per_query: dict[str, dict[str, float]]

    def __getitem__(self, metric: str) -> float:
        return self.mean[metric]


def _run_dict(run: RunLike) -> dict[str, dict[str, float]]:
    if not isinstance(run, Mapping):
        raise TypeError(f"run must be a mapping qid -> [(docid, score), ...] or qid -> {{docid: score}}, "
                        f"got {type(run).__name__}")
    out: dict[str, dict[str, float]] = {}
    for qid, hits in run.items():
        items = hits.items() if isinstance(hits, Mapping) else hits
        scores: dict[str, float] = {}
        for pair in items:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"run[{qid!r}] must hold (docid, score) pairs, got {pair!r}")
            doc_id, score = pair
            score = float(score)
            if not math.isfinite(score):
                raise ValueError(f"run[{qid!r}]: score of document {doc_id!r} is {score}")
            if str(doc_id) in scores:
                raise ValueError(f"run[{qid!r}]: document {doc_id!r} appears twice")
            scores[str(doc_id)] = score
        out[str(qid)] = scores
    return out


def _top(scores: dict[str, float], k: int) -> dict[str, float]:
    # trec_eval's order (score desc, then docid desc), so the cut keeps exactly the documents it would rank first.
    ranked = sorted(scores.items(), key=lambda x: (x[1], x[0]), reverse=True)
    return dict(ranked[:k])


def evaluate(qrels: Mapping[str, Mapping[str, int]], run: RunLike,
             metrics: Sequence[str] = ("ndcg@10", "recall@100", "mrr@10")) -> EvalResult:
    """Score ``run`` against graded ``qrels`` with pytrec_eval.

    Args:
        qrels: qid -> {docid: grade} (e.g. ``BeirDataset.qrels``).
        run: qid -> [(docid, score), ...] (any order) or qid -> {docid: score}. Queries not in qrels are ignored.
        metrics: names from :data:`METRICS`.
    """
    import pytrec_eval  # lazy: keeps `import lowrank.rerank` light

    if not isinstance(qrels, Mapping) or not qrels:
        raise ValueError("qrels must be a non-empty mapping qid -> {docid: grade}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics: unknown {unknown}; choose from {list(METRICS)}")
    qrels_d = {str(q): {str(d): int(g) for d, g in rel.items()} for q, rel in qrels.items()}
    # A query with no document of grade >= 1 has no defined nDCG / recall: trec_eval skips it, and so do we.
    qrels_d = {q: rel for q, rel in qrels_d.items() if any(g > 0 for g in rel.values())}
    if not qrels_d:
        raise ValueError("qrels: no query has a relevant (grade >= 1) document")
    run_d = _run_dict(run)
    run_d = {q: s for q, s in run_d.items() if q in qrels_d and s}  # pytrec_eval rejects empty rankings

    per_query: dict[str, dict[str, float]] = {q: {m: 0.0 for m in metrics} for q in qrels_d}
    by_cut: dict[int | None, list[str]] = {}
    for m in metrics:
        by_cut.setdefault(METRICS[m][2], []).append(m)
    for cut, names in by_cut.items():
        cut_run = run_d if cut is None else {q: _top(s, cut) for q, s in run_d.items()}
        evaluator = pytrec_eval.RelevanceEvaluator(qrels_d, {METRICS[m][0] for m in names})
        for qid, values in evaluator.evaluate(cut_run).items():
            for m in names:
                per_query[qid][m] = float(values[METRICS[m][1]])
    mean = {m: float(np.mean([per_query[q][m] for q in per_query])) for m in metrics}
    return EvalResult(mean=mean, per_query=per_query)


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / mean / max of per-query latencies in seconds (linear-interpolated percentiles, numpy default)."""
    a = np.asarray(list(seconds), dtype=np.float64)
    if a.size == 0:
        raise ValueError("seconds is empty: no latencies to summarize")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError("seconds must hold finite, non-negative durations")
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "mean": float(a.mean()), "max": float(a.max())}


def docs_per_second(n_docs: int, seconds: float) -> float:
    """Throughput; ValueError for a non-positive duration (a timer that measured nothing is a bug, not infinity)."""
    if isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs < 0:
        raise ValueError(f"n_docs must be a non-negative int, got {n_docs!r}")
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    return n_docs / seconds
