"""Training data for reranker fine-tuning: (query, positive, hard negative) triples in a resumable order.

From a BEIR-layout train split (``qrels_train.tsv`` / ``qrels/train.tsv``):

    pairs     P = [(q, d⁺) for every judgement with grade > 0]           (file order of the qrels, then doc id)
    negatives N(q) = BM25 top-``depth`` of q over the whole corpus, minus every document judged for q
    stream    the epochs e = 0, 1, ... concatenated, each a permutation π_e of P drawn from
              ``torch.Generator().manual_seed(seed + e)``
    batch s   stream positions [s·B, (s+1)·B); each pair gets one hard negative, N(q)[j] with
              j ~ U{0, |N(q)| - 1} from ``torch.Generator().manual_seed(seed·1_000_003 + s)``, or with
              ``negatives=n > 1`` the first min(n, |N(q)|) entries of a permutation of N(q) from that generator
              (cycled to n when N(q) is shorter), so n distinct negatives where there are n

so batch s is a pure function of (seed, s): a run resumed at step s sees exactly the batches it would have seen
(no data repeated or skipped), and no RNG state has to be stored. BM25 is the stack's own first stage
(:class:`lowrank.rerank.BM25Retriever`); hard negatives from it are the classic recipe of DPR (Karpukhin et al.,
EMNLP 2020) and of the sentence-transformers MultipleNegativesRankingLoss with mined negatives.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank.rerank.data import BeirDataset, DataWarning, load_beir
from lowrank.rerank.retrieve import BM25Retriever

__all__ = ["TrainBatch", "TrainingData", "load_training_data"]


@dataclass
class TrainBatch:
    """One step's examples: parallel lists of query ids/texts and positive doc ids/texts; the hard negatives are
    ``n`` per pair, pair i's at positions [i·n, (i+1)·n) of ``neg_ids`` / ``negatives``."""

    qids: list[str]
    queries: list[str]
    pos_ids: list[str]
    positives: list[str]
    neg_ids: list[str]
    negatives: list[str]


class TrainingData:
    """Pairs of a train split plus BM25 hard negatives; ``batch(step, size)`` is deterministic given ``seed``.

    Args:
        dataset: the train split (a :class:`BeirDataset`).
        seed: seeds the epoch permutations and the hard-negative draws.
        negative_depth: how many BM25 results per query the hard negatives are drawn from (judged docs removed).

    Raises:
        ValueError: a judged query with no positive judgement (grade > 0), or no pair left at all.
    """

    def __init__(self, dataset: BeirDataset, *, seed: int = 0, negative_depth: int = 30) -> None:
        if not isinstance(dataset, BeirDataset):
            raise TypeError(f"dataset must be a BeirDataset, got {type(dataset).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if isinstance(negative_depth, bool) or not isinstance(negative_depth, int) or negative_depth < 1:
            raise ValueError(f"negative_depth must be a positive int, got {negative_depth!r}")
        no_pos = [q for q in dataset.queries if not any(g > 0 for g in dataset.qrels.get(q, {}).values())]
        if no_pos:
            raise ValueError(f"{dataset.name or 'train split'}: {len(no_pos)} judged queries have no positive "
                             f"document (grade > 0), e.g. {no_pos[:5]}; contrastive training needs one per query "
                             "(remove them from the train qrels or give them a positive)")
        missing = [(q, d) for q in dataset.queries for d, g in dataset.qrels[q].items()
                   if g > 0 and d not in dataset.corpus]
        if missing:
            # A positive without text cannot be trained on; load_beir already warned about unknown documents.
            warnings.warn(f"{dataset.name or 'train split'}: {len(missing)} positive judgements name documents not "
                          f"in the corpus (e.g. {missing[:3]}); those pairs are not used", DataWarning, stacklevel=2)
        self.dataset, self.seed, self.negative_depth = dataset, seed, negative_depth
        self.pairs: list[tuple[str, str]] = [(q, d) for q in dataset.queries
                                             for d, g in dataset.qrels[q].items() if g > 0 and d in dataset.corpus]
        if not self.pairs:
            raise ValueError(f"{dataset.name or 'train split'}: no (query, positive document) pair to train on")
        self.negatives = self._mine(negative_depth)
        self._perm_cache: dict[int, list[int]] = {}

    def _mine(self, depth: int) -> dict[str, list[str]]:
        ds = self.dataset
        run = BM25Retriever(ds).retrieve(ds.queries, k=depth + max(len(r) for r in ds.qrels.values()))
        negatives = {}
        empty = []
        for q in ds.queries:
            judged = ds.qrels[q]
            negatives[q] = [d for d, _ in run.get(q, []) if d not in judged][:depth]
            if not negatives[q]:
                empty.append(q)
        if empty:
            raise ValueError(f"{ds.name or 'train split'}: BM25 found no unjudged document for {len(empty)} queries "
                             f"(e.g. {empty[:5]}), so they have no hard negative; the corpus is too small or the "
                             "queries share no term with it")
        return negatives

    @property
    def fingerprint(self) -> str:
        """Hash of everything that decides the batches: pairs, negatives, seed (checked when resuming)."""
        h = hashlib.sha256(f"seed={self.seed}|depth={self.negative_depth}".encode())
        for q, d in self.pairs:
            h.update(f"{q}\0{d}\1".encode())
        for q in sorted(self.negatives):
            h.update((q + "\0" + "\0".join(self.negatives[q]) + "\1").encode())
        return h.hexdigest()[:32]

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm_cache = {epoch: torch.randperm(len(self.pairs), generator=gen).tolist()}
        return self._perm_cache[epoch]

    def cursor(self, step: int, batch_size: int) -> dict[str, int]:
        """Where batch ``step`` starts in the stream: {"epoch", "position"} (recorded in checkpoints)."""
        start = step * batch_size
        return {"epoch": start // len(self.pairs), "position": start % len(self.pairs)}

    def batch(self, step: int, batch_size: int, negatives: int = 1) -> TrainBatch:
        """The examples of training step ``step`` (0-based) at ``batch_size`` pairs per step, ``negatives`` hard
        negatives per pair (module docstring)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 1:
            raise ValueError(f"negatives must be a positive int, got {negatives!r}")
        n = len(self.pairs)
        idx = []
        for pos in range(step * batch_size, (step + 1) * batch_size):
            idx.append(self._perm(pos // n)[pos % n])
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        ds = self.dataset
        out = TrainBatch([], [], [], [], [], [])
        for i in idx:
            q, d = self.pairs[i]
            negs = self.negatives[q]
            if negatives == 1:
                chosen = [negs[int(torch.randint(len(negs), (1,), generator=gen))]]
            else:
                order = torch.randperm(len(negs), generator=gen).tolist()
                chosen = [negs[order[j % len(order)]] for j in range(negatives)]
            out.qids.append(q)
            out.queries.append(ds.queries[q])
            out.pos_ids.append(d)
            out.positives.append(ds.doc_text(d))
            out.neg_ids.extend(chosen)
            out.negatives.extend(ds.doc_text(x) for x in chosen)
        return out


def load_training_data(path: str | Path, split: str = "train", *, seed: int = 0,
                       negative_depth: int = 30) -> TrainingData:
    """Load the ``split`` qrels of the BEIR collection at ``path`` and mine hard negatives (see the module doc).

    Raises:
        FileNotFoundError: no such directory, or no qrels file for ``split`` (the message lists the paths tried).
        ValueError: an empty qrels file, a query without a positive, nothing to train on.
    """
    with warnings.catch_warnings():
        # load_beir drops queries without train qrels (the test queries of queries_all.jsonl): expected here.
        warnings.filterwarnings("ignore", message=r".*queries that have no qrels", category=DataWarning)
        ds = load_beir(path, split=split)
    return TrainingData(ds, seed=seed, negative_depth=negative_depth)
