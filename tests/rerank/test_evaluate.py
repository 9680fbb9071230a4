"""lowrank.rerank.evaluate: metrics against hand-computed values on graded qrels, and the timing helpers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lowrank.rerank import docs_per_second, evaluate, latency_stats

QRELS = {"q1": {"a": 2, "b": 1, "c": 0}, "q2": {"z": 1}}


def test_graded_ndcg_recall_mrr_by_hand():
    run = {"q1": [("x", 3.0), ("a", 2.0), ("b", 1.0), ("c", 0.5)], "q2": [(f"n{i}", 100.0 - i) for i in range(10)]
           + [("z", 1.0)]}
    r = evaluate(QRELS, run)
    # q1: gains (0, 2, 1, 0) at ranks 1..4 vs ideal (2, 1): trec_eval's linear gain, log2(rank + 1) discount
    dcg = 2 / math.log2(3) + 1 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert r.per_query["q1"]["ndcg@10"] == pytest.approx(dcg / idcg, abs=1e-6)
    assert r.per_query["q1"]["recall@100"] == 1.0
    assert r.per_query["q1"]["mrr@10"] == pytest.approx(0.5)
    # q2: the relevant document is at rank 11, outside every @10 cut but inside @100
    assert r.per_query["q2"] == {"ndcg@10": 0.0, "recall@100": 1.0, "mrr@10": 0.0}
    assert r["ndcg@10"] == pytest.approx(dcg / idcg / 2, abs=1e-6)
    assert r.mean["recall@100"] == 1.0


def test_missing_queries_count_as_zero_and_extra_queries_are_ignored():
    r = evaluate(QRELS, {"q1": [("a", 1.0)], "extra": [("a", 1.0)]})
    assert set(r.per_query) == {"q1", "q2"}
    assert r.per_query["q2"] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    assert r.mean["mrr@10"] == pytest.approx(0.5)
    assert evaluate(QRELS, {"q1": [], "q2": []}).mean["ndcg@10"] == 0.0


def test_list_order_is_ignored_and_ties_follow_trec_eval():
    shuffled = {"q1": [("b", 1.0), ("x", 3.0), ("a", 2.0)], "q2": [("z", 1.0)]}
    as_dict = {"q1": {"a": 2.0, "x": 3.0, "b": 1.0}, "q2": {"z": 1.0}}
    assert evaluate(QRELS, shuffled).mean == evaluate(QRELS, as_dict).mean
    # 11 tied documents: trec_eval ranks ties by doc id descending, so "a0" comes last (rank 11). The MRR@10 cut
    # must agree with that order: 0, although the list puts "a0" first.
    tied = {"q": [("a0", 1.0)] + [(f"d{i:02d}", 1.0) for i in range(10)]}
    assert evaluate({"q": {"a0": 1}}, tied).mean["mrr@10"] == 0.0
    assert evaluate({"q": {"d09": 1}}, tied).mean["mrr@10"] == 1.0


def test_queries_without_relevant_documents_are_skipped():
    r = evaluate({"q": {"a": 1}, "none": {"b": 0}}, {"q": [("a", 1.0)], "none": [("b", 1.0)]})
    assert set(r.per_query) == {"q"} and r.mean["ndcg@10"] == 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="metrics: unknown"):
        evaluate(QRELS, {}, metrics=["map"])
    with pytest.raises(ValueError, match="qrels must be"):
        evaluate({}, {})
    with pytest.raises(ValueError, match="no query has a relevant"):
        evaluate({"q": {"a": 0}}, {})
    with pytest.raises(TypeError, match="run must be"):
        evaluate(QRELS, [("a", 1.0)])
    with pytest.raises(ValueError, match=r"run\['q1'\]: score of document 'a' is nan"):
        evaluate(QRELS, {"q1": [("a", float("nan"))]})
    with pytest.raises(ValueError, match="appears twice"):
        evaluate(QRELS, {"q1": [("a", 1.0), ("a", 0.5)]})
    with pytest.raises(TypeError, match=r"run\['q1'\] must hold \(docid, score\) pairs"):
        evaluate(QRELS, {"q1": ["a", "b"]})


def test_latency_and_throughput_helpers():
    lat = [i / 1000 for i in range(1, 101)]
    s = latency_stats(lat)
    assert s["p50"] == pytest.approx(np.percentile(lat, 50)) and s["p95"] == pytest.approx(0.09505)
    assert s["max"] == 0.1 and s["mean"] == pytest.approx(0.0505)
    assert latency_stats(x for x in (0.2,))["p95"] == 0.2
    with pytest.raises(ValueError, match="seconds is empty"):
        latency_stats([])
    with pytest.raises(ValueError, match="finite, non-negative"):
        latency_stats([0.1, -1.0])
    assert docs_per_second(300, 1.5) == 200.0
    with pytest.raises(ValueError, match="seconds must be > 0"):
        docs_per_second(10, 0.0)
    with pytest.raises(ValueError, match="n_docs must be"):
        docs_per_second(-1, 1.0)
