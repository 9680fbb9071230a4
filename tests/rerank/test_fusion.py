"""lowrank.rerank.fusion: min-max linear fusion, reciprocal-rank fusion, weight tuning on training queries."""
from __future__ import annotations

import pytest

from lowrank.rerank import evaluate, linear_fusion, minmax_normalize, rrf, tune_fusion_weight

FIRST = {"q": [("a", 10.0), ("b", 6.0), ("c", 2.0)]}
SECOND = {"q": [("c", 0.9), ("b", 0.5), ("d", 0.1)]}


def test_minmax_normalize():
    out = minmax_normalize({"q": [("a", 10.0), ("b", 6.0), ("c", 2.0)], "flat": [("x", 3.0), ("y", 3.0)], "e": []})
    assert out["q"] == [("a", 1.0), ("b", 0.5), ("c", 0.0)]
    assert out["flat"] == [("x", 1.0), ("y", 1.0)] and out["e"] == []


def test_linear_fusion_by_hand():
    fused = dict(linear_fusion(FIRST, SECOND, weight=0.25)["q"])
    # first normalized: a 1, b .5, c 0; second normalized: c 1, b .5, d 0; a document a run lacks gets 0
    assert fused == pytest.approx({"a": 0.75, "b": 0.5, "c": 0.25, "d": 0.0})
    assert [d for d, _ in linear_fusion(FIRST, SECOND, 0.0)["q"]][:3] == ["a", "b", "c"]
    assert [d for d, _ in linear_fusion(FIRST, SECOND, 1.0)["q"]][:2] == ["c", "b"]
    # queries in only one run are kept
    assert linear_fusion(FIRST, {"other": [("z", 1.0)]}, 0.5)["other"] == [("z", 0.5)]


def test_rrf_by_hand():
    fused = dict(rrf([FIRST, SECOND], k=60)["q"])
    assert fused == pytest.approx({"a": 1 / 61, "b": 2 / 62, "c": 1 / 63 + 1 / 61, "d": 1 / 63})
    shuffled = {"q": [("c", 2.0), ("a", 10.0), ("b", 6.0)]}
    assert rrf([shuffled, SECOND]) == rrf([FIRST, SECOND]), "ranks come from scores, not list positions"
    weighted = dict(rrf([FIRST, SECOND], k=0, weights=[2.0, 1.0])["q"])
    assert weighted == pytest.approx({"a": 2.0, "b": 1.0 + 0.5, "c": 2 / 3 + 1.0, "d": 1 / 3})


def test_tune_fusion_weight_picks_the_useful_run():
    qrels = {"q1": {"c": 2, "d": 1}, "q2": {"y": 1}}
    first = {"q1": [("a", 3.0), ("b", 2.0), ("c", 1.0), ("d", 0.5)], "q2": [("x", 2.0), ("y", 1.0)]}
    second = {"q1": [("c", 0.9), ("d", 0.8), ("a", 0.1), ("b", 0.0)], "q2": [("y", 0.7), ("x", 0.2)]}
    w, table = tune_fusion_weight(first, second, qrels)
    assert len(table) == 21 and table[1.0] == 1.0 and table[0.0] < 1.0
    assert w > 0.5 and table[w] == max(table.values())
    assert evaluate(qrels, linear_fusion(first, second, w)).mean["ndcg@10"] == table[w]
    w2, t2 = tune_fusion_weight(first, first, qrels, grid=[0.0, 0.5, 1.0])
    assert w2 == 0.5 and len(set(t2.values())) == 1, "ties go to the weight nearest 0.5"


def test_bad_input():
    with pytest.raises(ValueError, match="weight must be in"):
        linear_fusion(FIRST, SECOND, 1.5)
    with pytest.raises(TypeError, match="weight must be a number"):
        linear_fusion(FIRST, SECOND, "0.5")
    with pytest.raises(TypeError, match="second must be"):
        linear_fusion(FIRST, [("a", 1.0)])
    with pytest.raises(TypeError, match="runs must be"):
        rrf(FIRST)
    with pytest.raises(ValueError, match="k must be"):
        rrf([FIRST], k=-1)
    with pytest.raises(ValueError, match="weights has 1 entries for 2 runs"):
        rrf([FIRST, SECOND], weights=[1.0])
    with pytest.raises(ValueError, match="metric must be"):
        tune_fusion_weight(FIRST, SECOND, {"q": {"a": 1}}, metric="map")
    with pytest.raises(ValueError, match="grid must be"):
        tune_fusion_weight(FIRST, SECOND, {"q": {"a": 1}}, grid=[0.5, 2.0])


def test_fusion_of_bm25_and_minilm_on_the_example(example, example_runs):
    bm25, rerank = example_runs
    fused = evaluate(example.qrels, linear_fusion(bm25, rerank, 0.5)).mean["ndcg@10"]
    assert fused >= evaluate(example.qrels, bm25).mean["ndcg@10"]
    assert evaluate(example.qrels, rrf([bm25, rerank])).mean["ndcg@10"] > 0.8
