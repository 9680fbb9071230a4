"""lowrank.rerank: the reference reranking stack (BEIR data, BM25 first stage, neural rerankers, fusion, metrics).

Importing this package is cheap: the heavy libraries (bm25s, transformers, pytrec_eval) load when first used.

    from lowrank.rerank import BM25Retriever, EmbeddingReranker, evaluate, load_beir
    ds = load_beir("data/scifact")
    bm25 = BM25Retriever(ds).retrieve(ds.queries, k=100)
    reranked = EmbeddingReranker().rerank(ds, bm25, top_k=100)
    print(evaluate(ds.qrels, reranked).mean)
"""
from lowrank.rerank.attention import AttentionReranker
from lowrank.rerank.cross import CrossEncoderReranker, default_cross_encoder_dir
from lowrank.rerank.data import BeirDataset, DataWarning, Document, example_dataset, example_path, load_beir
from lowrank.rerank.embed import EmbeddingReranker, Encoder, default_model_path
from lowrank.rerank.evaluate import METRICS, EvalResult, docs_per_second, evaluate, latency_stats
from lowrank.rerank.fusion import linear_fusion, minmax_normalize, rrf, tune_fusion_weight
from lowrank.rerank.listwise import ListwiseReranker
from lowrank.rerank.llm import default_llm_path, load_causal_lm
from lowrank.rerank.retrieve import BM25Retriever, Run

__all__ = [
    "METRICS",
    "AttentionReranker",
    "CrossEncoderReranker",
    "default_cross_encoder_dir",
    "ListwiseReranker",
    "default_llm_path",
    "load_causal_lm",
    "BM25Retriever",
    "BeirDataset",
    "DataWarning",
    "Document",
    "EmbeddingReranker",
    "Encoder",
    "EvalResult",
    "Run",
    "default_model_path",
    "docs_per_second",
    "evaluate",
    "example_dataset",
    "example_path",
    "latency_stats",
    "linear_fusion",
    "load_beir",
    "minmax_normalize",
    "rrf",
    "tune_fusion_weight",
]
