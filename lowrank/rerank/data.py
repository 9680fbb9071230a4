"""Retrieval collections in BEIR layout: corpus, queries and graded relevance judgements.

Layout read by :func:`load_beir` (BEIR, Thakur et al., NeurIPS 2021 Datasets & Benchmarks)::

    DIR/corpus.jsonl     one JSON object a line: {"_id", "title", "text", ...}
    DIR/queries.jsonl    one JSON object a line: {"_id", "text", ...}
    DIR/qrels/<split>.tsv  or  DIR/qrels_<split>.tsv  or (split "test" only) DIR/qrels.tsv
                         query-id <TAB> corpus-id <TAB> score   (header optional; TREC's 4-column
                         "qid iter docid rel" is accepted too)

Ids are kept as strings whatever their JSON type (``4983`` and ``"4983"`` are the same document), because qrels
files carry them as text. Relevance grades are integers; a grade <= 0 means judged non-relevant, as in trec_eval.

Data problems are reported rather than left to crash later: a missing file raises ``FileNotFoundError`` naming the
paths tried; a malformed line raises ``ValueError`` with file and line number; queries without judgements,
judgements for unknown queries and empty documents are counted in one :class:`DataWarning` each.
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["BeirDataset", "DataWarning", "Document", "example_dataset", "load_beir"]


class DataWarning(UserWarning):
    """A data problem the loader worked around (dropped queries, empty documents, ...); filter it by class."""


class Document(NamedTuple):
    """One corpus entry; a plain ``(title, text)`` tuple, so ``title, text = corpus[doc_id]`` works."""

    title: str
    text: str

    @property
    def full_text(self) -> str:
        """``title + " " + text``, the text every stage indexes/encodes (BEIR's convention), without edge spaces."""
        return f"{self.title} {self.text}".strip()


@dataclass
class BeirDataset:
    """A retrieval collection: ``corpus`` id -> Document, ``queries`` id -> text, ``qrels`` qid -> {docid: grade}.

    ``corpus`` keeps file order (the order BM25 indexes and dense retrieval encodes), so results are reproducible.
    Every query in ``queries`` has a qrels entry unless the dataset was loaded with ``keep_unjudged=True``.
    """

    corpus: dict[str, Document]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    name: str = ""
    split: str = "test"
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Accept plain (title, text) tuples from callers building a dataset by hand.
        self.corpus = {str(k): v if isinstance(v, Document) else Document(*v) for k, v in self.corpus.items()}
        self.queries = {str(k): v for k, v in self.queries.items()}
        self.qrels = {str(q): {str(d): int(g) for d, g in rel.items()} for q, rel in self.qrels.items()}

    def __repr__(self) -> str:
        n_judged = sum(len(r) for r in self.qrels.values())
        return (f"BeirDataset(name={self.name!r}, split={self.split!r}, docs={len(self.corpus)}, "
                f"queries={len(self.queries)}, judgements={n_judged})")

    def doc_text(self, doc_id: str) -> str:
        """``title + " " + text`` of one document; ``KeyError`` naming the id if it is not in the corpus."""
        try:
            return self.corpus[doc_id].full_text
        except KeyError:
            raise KeyError(f"document id {doc_id!r} is not in the corpus of {self.name or 'this dataset'}") from None

    def subset(self, query_ids: Iterable[str]) -> BeirDataset:
        """The same corpus with only the given queries (and their qrels); ``KeyError`` for an unknown query id."""
        qids = [str(q) for q in query_ids]
        missing = [q for q in qids if q not in self.queries]
        if missing:
            raise KeyError(f"query ids not in the dataset: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return BeirDataset(self.corpus, {q: self.queries[q] for q in qids},
                           {q: self.qrels[q] for q in qids if q in self.qrels}, self.name, self.split)


# --------------------------------------------------------------------------------------------------- reading
def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; ValueError with file:line for anything not a JSON object."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # a trailing blank line is common and harmless
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004 (bad file content)
            yield lineno, obj


def _id_of(obj: dict[str, Any], path: Path, lineno: int) -> str:
    """The record's id as a string; BEIR uses "_id", some exports use "id". Ints and strings both accepted."""
    raw = obj.get("_id", obj.get("id"))
    if raw is None:
        raise ValueError(f"{path}:{lineno}: record has no '_id' (or 'id') field")
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise ValueError(f"{path}:{lineno}: id must be a string or an integer, got {type(raw).__name__} {raw!r}")  # noqa: TRY004 (bad file content)
    doc_id = str(raw).strip()
    if not doc_id:
        raise ValueError(f"{path}:{lineno}: empty id")
    return doc_id


def _text_field(obj: dict[str, Any], key: str, path: Path, lineno: int) -> str:
    """A text field; missing or null reads as "" (BEIR corpora often have no title), anything else must be a str."""
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{path}:{lineno}: field {key!r} must be a string, got {type(value).__name__}")  # noqa: TRY004 (bad file content)
    return value


def _read_corpus(path: Path) -> tuple[dict[str, Document], int]:
    corpus: dict[str, Document] = {}
    first_line: dict[str, int] = {}
    n_empty = 0
    for lineno, obj in _read_jsonl(path):
        doc_id = _id_of(obj, path, lineno)
        if doc_id in corpus:
            raise ValueError(f"{path}:{lineno}: duplicate document id {doc_id!r} (first on line {first_line[doc_id]})")
        doc = Document(_text_field(obj, "title", path, lineno), _text_field(obj, "text", path, lineno))
        n_empty += not doc.full_text
        corpus[doc_id] = doc
        first_line[doc_id] = lineno
    return corpus, n_empty


def _read_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for lineno, obj in _read_jsonl(path):
        qid = _id_of(obj, path, lineno)
        if qid in queries:
            raise ValueError(f"{path}:{lineno}: duplicate query id {qid!r}")
        text = _text_field(obj, "text", path, lineno).strip()
        if not text:
            raise ValueError(f"{path}:{lineno}: query {qid!r} has empty text")
        queries[qid] = text
    return queries


def _parse_grade(raw: str, path: Path, lineno: int) -> int:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: relevance score {raw!r} is not a number") from None
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{path}:{lineno}: relevance score {raw!r} is not an integer grade")
    return int(value)


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            # Tabs are the BEIR separator; fall back to whitespace for TREC-style files.
            parts = line.split("\t") if "\t" in line else line.split()
            parts = [p.strip() for p in parts]
            if len(parts) == 3:
                qid, doc_id, raw = parts
            elif len(parts) == 4:
                qid, _, doc_id, raw = parts  # TREC qrels: qid iter docid rel
            else:
                raise ValueError(f"{path}:{lineno}: expected 3 tab-separated fields (query-id, corpus-id, score) "
                                 f"or 4 (TREC), got {len(parts)}")
            if lineno == 1 and not _is_number(raw):
                continue  # header row, e.g. "query-id corpus-id score"
            if not qid or not doc_id:
                raise ValueError(f"{path}:{lineno}: empty query or document id")
            qrels.setdefault(qid, {})[doc_id] = _parse_grade(raw, path, lineno)
    if not qrels:
        raise ValueError(f"{path}: no relevance judgements")
    return qrels


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------------- layout
def _qrels_candidates(root: Path, split: str) -> list[Path]:
    paths = [root / "qrels" / f"{split}.tsv", root / f"qrels_{split}.tsv"]
    if split == "test":
        paths.append(root / "qrels.tsv")  # single-split collections (and ../shared/data/scifact)
    return paths


def _queries_candidates(root: Path, split: str) -> list[Path]:
    # BEIR keeps every split's queries in queries.jsonl; some exports keep only one split there and all of them in
    # queries_all.jsonl (SciFact in ../shared/data: test queries / train + test), hence the ordered fallbacks.
    return [root / f"queries_{split}.jsonl", root / "queries.jsonl", root / "queries_all.jsonl"]


def _first_existing(paths: list[Path], what: str) -> Path:
    for p in paths:
        if p.is_file():
            return p
    raise FileNotFoundError(f"no {what} file; looked for: {', '.join(str(p) for p in paths)}")


def load_beir(path: str | Path, split: str = "test", *, keep_unjudged: bool = False,
              corpus_file: str | Path | None = None, queries_file: str | Path | None = None,
              qrels_file: str | Path | None = None, name: str | None = None) -> BeirDataset:
    """Load a BEIR-layout collection from directory ``path``.

    Args:
        path: the collection directory.
        split: which qrels to read: ``qrels/<split>.tsv``, ``qrels_<split>.tsv``, or ``qrels.tsv`` for "test".
        keep_unjudged: keep queries that have no qrels for this split (they then score 0 in evaluation);
            by default they are dropped, with one counted :class:`DataWarning`.
        corpus_file, queries_file, qrels_file: explicit files (relative to ``path`` or absolute) overriding the
            layout search.
        name: dataset name for messages (default: the directory name).

    Returns:
        A :class:`BeirDataset`; its ``stats`` records what was dropped or found empty.

    Raises:
        TypeError: ``path`` or ``split`` of the wrong type.
        FileNotFoundError: the directory or a needed file is missing (message lists the paths tried).
        ValueError: a malformed line (message has file:line), duplicate ids, or no query left with judgements.
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    if not isinstance(split, str) or not split:
        raise TypeError(f"split must be a non-empty str, got {split!r}")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist")

    def candidates(explicit: str | Path | None, default: list[Path]) -> list[Path]:
        if explicit is None:
            return default
        p = Path(explicit)
        return [p if p.is_absolute() else root / p]

    corpus_path = _first_existing(candidates(corpus_file, [root / "corpus.jsonl"]), "corpus")
    qrels_path = _first_existing(candidates(qrels_file, _qrels_candidates(root, split)), f"qrels (split {split!r})")
    qrels = _read_qrels(qrels_path)

    # The queries file: the first candidate that covers every judged query; otherwise the one covering most.
    q_candidates = candidates(queries_file, _queries_candidates(root, split))
    q_paths = [p for p in q_candidates if p.is_file()] or [_first_existing(q_candidates, "queries")]
    queries: dict[str, str] = {}
    best = -1
    for p in q_paths:
        cand = _read_queries(p)
        covered = sum(q in cand for q in qrels)
        if covered > best:
            queries, best = cand, covered
        if covered == len(qrels):
            break

    corpus, n_empty = _read_corpus(corpus_path)
    if not corpus:
        raise ValueError(f"{corpus_path}: the corpus is empty")
    label = name if name is not None else root.name
    stats = {"empty_docs": n_empty, "unjudged_queries": 0, "qrels_unknown_queries": 0, "qrels_unknown_docs": 0}

    if n_empty:
        warnings.warn(f"{label}: {n_empty} of {len(corpus)} documents have neither title nor text "
                      f"({corpus_path}); they are kept but can never match", DataWarning, stacklevel=2)
    unknown_q = [q for q in qrels if q not in queries]
    if unknown_q:
        stats["qrels_unknown_queries"] = len(unknown_q)
        warnings.warn(f"{label}: {len(unknown_q)} judged queries of {qrels_path} are not in the queries file "
                      f"(e.g. {unknown_q[:3]}); their judgements are ignored", DataWarning, stacklevel=2)
        qrels = {q: r for q, r in qrels.items() if q in queries}
    n_unknown_docs = sum(d not in corpus for rel in qrels.values() for d in rel)
    if n_unknown_docs:
        # Kept: they still count as relevant (recall cannot reach 1), which is how trec_eval and BEIR score them.
        stats["qrels_unknown_docs"] = n_unknown_docs
        warnings.warn(f"{label}: {n_unknown_docs} judgements in {qrels_path} name documents not in the corpus",
                      DataWarning, stacklevel=2)
    unjudged = [q for q in queries if q not in qrels]
    if unjudged:
        stats["unjudged_queries"] = len(unjudged)
        if keep_unjudged:
            warnings.warn(f"{label}: {len(unjudged)} of {len(queries)} queries have no qrels for split {split!r}; "
                          "kept (keep_unjudged=True), they score 0", DataWarning, stacklevel=2)
        else:
            warnings.warn(f"{label}: dropped {len(unjudged)} of {len(queries)} queries that have no qrels for "
                          f"split {split!r} (pass keep_unjudged=True to keep them)", DataWarning, stacklevel=2)
            queries = {q: t for q, t in queries.items() if q in qrels}
    if not queries:
        raise ValueError(f"{label}: no query of split {split!r} has both text and relevance judgements")
    return BeirDataset(corpus, queries, qrels, name=label, split=split, stats=stats)


def example_path() -> Path:
    """Directory of the tiny example collection shipped with the package (lowrank/rerank/example)."""
    return Path(str(resources.files("lowrank.rerank") / "example"))


def example_dataset() -> BeirDataset:
    """The tiny collection shipped with the package: 16 documents on home bread baking, 5 queries, graded qrels.

    Written for this project (original text); it is the embedded default of ``lowrank demo`` and of the tests.
    """
    return load_beir(example_path(), name="example")


def as_queries(queries: Mapping[str, str] | BeirDataset) -> dict[str, str]:
    """Normalize a queries argument (a dataset or a qid -> text mapping); TypeError names the argument."""
    if isinstance(queries, BeirDataset):
        return queries.queries
    if not isinstance(queries, Mapping):
        raise TypeError(f"queries must be a mapping of query id -> text or a BeirDataset, got {type(queries).__name__}")
    out = {}
    for qid, text in queries.items():
        if not isinstance(text, str):
            raise TypeError(f"queries[{qid!r}] must be a str, got {type(text).__name__}")
        out[str(qid)] = text
    return out
