"""``lowrank rerank``: first stage + neural reranker + evaluation on a BEIR-layout collection.

    lowrank rerank [--data DIR] [--reranker embed|cross|first|icr|none] [--model DIR] [--top-k 100]
                   [--queries N] [--lora PATH] [--compress BUDGET] [--matmul auto|fp32|bf16x3|onednn]
                   [--fusion none|linear|rrf] [--json]

With no ``--data`` it runs on the small example collection shipped in the package. The first stage is BM25
(bm25s, stemmed, k1=1.5, b=0.75). The reranker rescores each query's BM25 top-k; with ``--fusion`` the two runs
are also fused (a linear weight of 0.5, or RRF). Models default to the offline ones of each reranker
(MiniLM for embed/cross, SmolLM2-135M-Instruct for first/icr). ``--lora PATH`` loads a PEFT adapter onto the
reranker's model and converts its LoRA layers to lowrank's fused ``LoRALinear``; ``--compress BUDGET`` runs
``lowrank.compress.compress_model`` on the model's Linear layers (no calibration) before scoring. ``--matmul``
(default auto: bf16x3 on CPUs with AMX tiles) runs the remaining fp32 Linears as ``lowrank.nn.Bf16x3Linear``
(three bf16 products, scores within ~1e-5 of fp32, ~2× faster matmuls); ``--matmul onednn`` runs them as
``lowrank.nn.OneDnnLinear`` (oneDNN's fp32 GEMM, faster than MKL's on AMD CPUs).

Prints a table (nDCG@10, Recall@100, MRR@10 over judged queries; docs/s = candidates scored per second of
reranking; per-query latency p50/p95 in ms); ``--json`` prints the same as one JSON object instead.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

RERANKERS = ("embed", "cross", "first", "icr", "none")


def add_parser(sub: Any) -> None:
    """Register the ``rerank`` sub-command on an argparse sub-parsers object."""
    p = sub.add_parser("rerank", help="BM25 + a neural reranker + evaluation on a BEIR-layout collection",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="BEIR-layout directory (default: the shipped example collection)")
    p.add_argument("--split", default="test", help="qrels split (default test)")
    p.add_argument("--retriever", choices=("bm25",), default="bm25", help="first stage (bm25)")
    p.add_argument("--reranker", choices=RERANKERS, default="embed", help="reranker (default embed)")
    p.add_argument("--model", default=None, help="model directory for the reranker (default: its offline model)")
    p.add_argument("--top-k", type=int, default=100, help="BM25 candidates reranked per query (default 100)")
    p.add_argument("--queries", type=int, default=None, help="only the first N judged queries")
    p.add_argument("--lora", default=None, help="a PEFT LoRA adapter directory to load onto the reranker model")
    p.add_argument("--merge-lora", action="store_true",
                   help="fold the --lora adapter into the base weights (W + s·B·A) before --compress / scoring")
    p.add_argument("--compress", type=float, default=None, metavar="BUDGET",
                   help="compress the reranker model's Linear layers to this parameter budget, in (0, 1]")
    p.add_argument("--fusion", choices=("none", "linear", "rrf"), default="none",
                   help="also fuse BM25 and reranker scores (linear weight 0.5, or RRF)")
    p.add_argument("--matmul", choices=("auto", "fp32", "bf16x3", "onednn"), default="auto",
                   help="how the fp32 model's remaining nn.Linear layers multiply: bf16x3 (lowrank.nn.Bf16x3Linear, "
                        "AMX tiles, ~1e-5 of fp32), onednn (lowrank.nn.OneDnnLinear: oneDNN's fp32 GEMM, faster "
                        "than MKL's on AMD CPUs) or fp32; auto = bf16x3 where the CPU has AMX and the model is "
                        "float32 (after --lora / --compress), else fp32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _model_of(reranker: Any) -> Any:
    """The nn.Module inside a reranker that --lora / --compress modify in place."""
    from lowrank.rerank import EmbeddingReranker

    return reranker.encoder.model if isinstance(reranker, EmbeddingReranker) else reranker.model


def build_reranker(kind: str, model: str | None) -> Any:
    from lowrank import rerank as lr

    if kind == "embed":
        return lr.EmbeddingReranker(lr.Encoder(model))
    if kind == "cross":
        return lr.CrossEncoderReranker(model)
    if kind == "first":
        return lr.ListwiseReranker(model)
    if kind == "icr":
        return lr.AttentionReranker(model)
    raise ValueError(f"--reranker must be one of {RERANKERS}, got {kind!r}")


def apply_matmul_option(module: Any, matmul: str) -> str:
    """--matmul: convert the module's plain fp32 Linears to Bf16x3Linear for "bf16x3" (and for "auto" where the CPU
    has AMX tiles and every parameter is float32) or to OneDnnLinear for "onednn"; returns what was applied."""
    from lowrank.rerank._matmul import apply_matmul, auto_matmul

    if matmul == "auto":
        matmul = auto_matmul(module)
    apply_matmul(module, matmul)
    return matmul


def apply_lora_adapter(module: Any, path: str) -> int:
    """Load a PEFT adapter onto ``module`` and swap its LoRA layers for lowrank LoRALinear; returns how many."""
    import os

    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ValueError(f"--lora: {path!r} is not a PEFT adapter directory (no adapter_config.json)")
    from peft import PeftModel

    from lowrank.nn import from_peft
    from lowrank.nn.lora_linear import LoRALinear

    wrapped = PeftModel.from_pretrained(module, path, is_trainable=False)
    from_peft(wrapped)
    return sum(isinstance(m, LoRALinear) for m in module.modules())


def adapter_carries_head(path: str) -> bool:
    """Whether the PEFT adapter at ``path`` brings its own classification head (``modules_to_save`` names
    ``classifier`` or ``score``), as ``train-reranker --kind cross`` writes it."""
    import os

    from lowrank.rerank.train import HEAD_NAMES

    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            saved = json.load(f).get("modules_to_save") or []
    except (OSError, ValueError):
        return False  # apply_lora_adapter reports a bad adapter directory
    return any(name in HEAD_NAMES for name in saved)


def merge_lora(module: Any) -> int:
    """Replace every LoRALinear of ``module`` by its merged nn.Linear (W + s·B·A); returns how many."""
    from lowrank.nn.lora_linear import LoRALinear

    names = [n for n, m in module.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, child, getattr(owner, child).merged())
    return len(names)


def _table(rows: list[dict[str, Any]]) -> str:
    head = ["run", "nDCG@10", "R@100", "MRR@10", "docs/s", "p50 ms", "p95 ms"]
    lines = [head]
    for r in rows:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append([r["run"], f(r["ndcg@10"], ".4f"), f(r["recall@100"], ".4f"), f(r["mrr@10"], ".4f"),
                      f(r.get("docs_per_s"), ",.1f"), f(r.get("p50_ms"), ".1f"), f(r.get("p95_ms"), ".1f")])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = []
    for j, row in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in
                             enumerate(zip(row, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    import torch

    from lowrank import rerank as lr

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.queries is not None and args.queries < 1:
        raise ValueError(f"--queries must be >= 1, got {args.queries}")
    if args.compress is not None and not 0.0 < args.compress <= 1.0:
        raise ValueError(f"--compress must be in (0, 1], got {args.compress}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if getattr(args, "merge_lora", False) and not args.lora:
        raise ValueError("--merge-lora needs --lora")
    args.merge_lora = getattr(args, "merge_lora", False)
    if args.reranker == "none" and (args.lora or args.compress is not None or args.model):
        raise ValueError("--model, --lora and --compress need a reranker (--reranker none was given)")
    progress = not args.no_progress and not args.json
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()       # weight-loading bars would interleave with the table / JSON
    ds = lr.load_beir(args.data, args.split) if args.data else lr.example_dataset()
    judged = [q for q in ds.queries if q in ds.qrels]
    if not judged:
        raise ValueError(f"{ds.name or args.data}: no query has relevance judgments in split {args.split!r}")
    ds = ds.subset(judged[:args.queries] if args.queries else judged)
    t0 = time.perf_counter()
    bm25 = lr.BM25Retriever(ds).retrieve(ds.queries, k=max(args.top_k, 100))
    rows = [dict(run="bm25", **_metrics(lr, ds, bm25), seconds=time.perf_counter() - t0)]
    info: dict[str, Any] = {"data": ds.name or args.data or "example", "queries": len(ds.queries),
                            "top_k": args.top_k, "reranker": args.reranker}
    if args.reranker != "none":
        with warnings.catch_warnings():
            if args.reranker == "cross" and args.model is None and args.lora and adapter_carries_head(args.lora):
                # the default cross-encoder's seeded head is replaced by the adapter's trained one (modules_to_save)
                warnings.filterwarnings("ignore", message=r"CrossEncoderReranker\(model=None\).*UNTRAINED")
            reranker = build_reranker(args.reranker, args.model)
        module = _model_of(reranker)
        if args.lora:
            info["lora_layers"] = apply_lora_adapter(module, args.lora)
        if args.merge_lora:
            info["merged_lora_layers"] = merge_lora(module)
        if args.compress is not None:
            from lowrank.compress import compress_model

            report = compress_model(module, args.compress, progress=progress)
            info["compress"] = {"budget": args.compress, "params_before": report.params_before,
                                "params_after": report.params_after}
        info["matmul"] = apply_matmul_option(module, getattr(args, "matmul", "fp32"))
        info["params"] = sum(p.numel() for p in module.parameters())  # base (+ LoRA factors), after --compress
        info["lora_params"] = sum(p.numel() for n, p in module.named_parameters() if n.rpartition(".")[2] in
                                  ("lora_a", "lora_b"))
        t0 = time.perf_counter()
        reranked = reranker.rerank(ds, bm25, top_k=args.top_k, show_progress=progress)
        secs = time.perf_counter() - t0
        n_pairs = sum(min(len(bm25.get(q, [])), args.top_k) for q in ds.queries)
        lat = lr.latency_stats(list(reranker.latencies.values())) if reranker.latencies else {}
        rows.append(dict(run=args.reranker, **_metrics(lr, ds, reranked), docs_per_s=n_pairs / secs if secs else None,
                         p50_ms=1e3 * lat["p50"] if lat else None, p95_ms=1e3 * lat["p95"] if lat else None,
                         seconds=secs))
        if args.fusion == "linear":
            rows.append(dict(run="bm25+" + args.reranker + " linear 0.5",
                             **_metrics(lr, ds, lr.linear_fusion(bm25, reranked, 0.5))))
        elif args.fusion == "rrf":
            rows.append(dict(run="bm25+" + args.reranker + " rrf", **_metrics(lr, ds, lr.rrf([bm25, reranked]))))
    if args.json:
        print(json.dumps({**info, "runs": rows}, indent=2))
    else:
        matmul = f" (matmul {info['matmul']})" if 'matmul' in info else ''
        print(f"{info['data']}: {info['queries']} queries, BM25 top-{args.top_k} reranked by {args.reranker}{matmul}")
        print(_table(rows))
    return 0


def _metrics(lr: Any, ds: Any, run_: Any) -> dict[str, float]:
    m = lr.evaluate(ds.qrels, run_).mean
    return {"ndcg@10": m["ndcg@10"], "recall@100": m["recall@100"], "mrr@10": m["mrr@10"]}
