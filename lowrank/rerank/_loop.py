"""The per-query rerank loop shared by the LLM rerankers: argument checks, candidate lists, stable ordering,
latencies, and errors labelled with the query they happened on."""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lowrank.rerank.data import BeirDataset
from lowrank.rerank.retrieve import Run


def _candidate_ids(qid: str, hits: Any, top_k: int) -> list[str]:
    """The first ``top_k`` doc ids of one query's candidates: [(docid, score)] in rank order, [docid], or {docid: score}."""
    if isinstance(hits, Mapping):
        ranked = sorted(hits.items(), key=lambda x: -float(x[1]))
        doc_ids = [str(d) for d, _ in ranked]
    elif isinstance(hits, Sequence) and not isinstance(hits, str):
        doc_ids = [str(h[0]) if isinstance(h, (tuple, list)) else str(h) for h in hits]
    else:
        raise TypeError(f"candidates[{qid!r}] must be a list of (docid, score) or docids, got {type(hits).__name__}")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError(f"candidates[{qid!r}] lists a document more than once")
    return doc_ids[:top_k]


def check_rerank_args(dataset: Any, candidates: Any, top_k: Any) -> None:
    if not isinstance(dataset, BeirDataset):
        raise TypeError(f"dataset must be a BeirDataset, got {type(dataset).__name__}")
    if not isinstance(candidates, Mapping):
        raise TypeError(f"candidates must be a mapping qid -> ranked docs, got {type(candidates).__name__}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    unknown = [q for q in candidates if str(q) not in dataset.queries]
    if unknown:
        raise KeyError(f"candidates hold queries not in the dataset: {unknown[:5]}")


def rerank_loop(dataset: BeirDataset, candidates: Mapping[str, Any], top_k: int,
                score: Callable[[str, list[str]], Sequence[float]], latencies: dict[str, float], *,
                show_progress: bool = False, desc: str = "rerank") -> Run:
    """``{qid: [(docid, score), ...]}`` best first, scores from ``score(qid, doc_ids)``; ties keep candidate order.

    Queries of ``dataset`` without candidates get an empty list. ``latencies`` is cleared and filled with seconds
    per query. An exception is re-raised as is, with a note naming the query.
    """
    check_rerank_args(dataset, candidates, top_k)
    run: Run = {q: [] for q in dataset.queries}
    latencies.clear()
    items = list(candidates.items())
    if show_progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=desc, unit="query")
    for qid, hits in items:
        qid = str(qid)
        try:
            t0 = time.perf_counter()
            doc_ids = _candidate_ids(qid, hits, top_k)
            missing = [d for d in doc_ids if d not in dataset.corpus]
            if missing:
                raise KeyError(f"document ids {missing[:5]} are not in the corpus of {dataset.name or 'the dataset'}")
            if doc_ids:
                scores = [float(s) for s in score(qid, doc_ids)]
                order = sorted(range(len(doc_ids)), key=lambda i: -scores[i])   # stable: ties keep input order
                run[qid] = [(doc_ids[i], scores[i]) for i in order]
            latencies[qid] = time.perf_counter() - t0
        except Exception as e:  # not a fallback: re-raised as is, only labelled with the query
            if hasattr(e, "add_note"):
                e.add_note(f"while reranking query {qid!r} of {dataset.name or 'the dataset'}")
            raise
    return run
