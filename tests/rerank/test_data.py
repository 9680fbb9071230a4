"""lowrank.rerank.data: BEIR layouts, odd ids, graded qrels, and every kind of bad input."""
from __future__ import annotations

import json
import warnings

import pytest

from lowrank.rerank import BeirDataset, DataWarning, Document, example_dataset, example_path, load_beir
from tests.rerank.conftest import SCIFACT, write_collection


def _jsonl(*objs) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


# A collection with the id layouts real exports have: JSON ints, leading zeros (distinct from the int), spaces,
# slashes, non-ASCII, "id" instead of "_id", missing / null titles; qrels without header, CRLF, graded 0..3.
ODD_CORPUS = _jsonl(
    {"_id": 7, "title": "Seven", "text": "an integer id in the JSON"},
    {"_id": "007", "title": None, "text": "leading zeros make a different id"},
    {"_id": "PMC/12 a", "text": "slash and space in the id, and no title"},
    {"id": "é-1", "title": "accent", "text": "a non-ASCII id under the key id"},
)
ODD_QUERIES = _jsonl({"_id": 1, "text": "integer query id"}, {"_id": "q-2", "text": "string query id"})
ODD_QRELS = "1\t7\t3\r\n1\t007\t0\r\n1\tPMC/12 a\t1\r\nq-2\té-1\t2\r\n"


def test_example_collection_is_shipped_and_graded():
    ds = example_dataset()
    assert {p.name for p in example_path().iterdir()} >= {"corpus.jsonl", "queries.jsonl", "qrels.tsv"}
    assert 10 <= len(ds.corpus) <= 20 and 4 <= len(ds.queries) <= 5
    grades = {g for rel in ds.qrels.values() for g in rel.values()}
    assert grades >= {1, 2}, "graded relevance, not binary"
    assert all(d in ds.corpus for rel in ds.qrels.values() for d in rel)
    assert set(ds.qrels) == set(ds.queries)
    title, text = ds.corpus["bake-04"]
    assert title == "What hydration means in bread" and ds.doc_text("bake-04") == f"{title} {text}"
    assert ds.stats["empty_docs"] == 0


@pytest.mark.parametrize("layout", ["qrels.tsv", "qrels/test.tsv", "qrels_test.tsv"])
def test_odd_ids_and_layouts(tmp_path, layout):
    root = write_collection(tmp_path / "odd", ODD_CORPUS, ODD_QUERIES, {layout: ODD_QRELS})
    ds = load_beir(root)
    assert list(ds.corpus) == ["7", "007", "PMC/12 a", "é-1"]
    assert ds.corpus["007"] == Document("", "leading zeros make a different id")
    assert ds.corpus["PMC/12 a"].title == ""
    assert ds.queries == {"1": "integer query id", "q-2": "string query id"}
    assert ds.qrels == {"1": {"7": 3, "007": 0, "PMC/12 a": 1}, "q-2": {"é-1": 2}}
    assert ds.name == "odd" and ds.split == "test"


def test_header_trec_format_and_train_split(tmp_path):
    root = write_collection(tmp_path / "c", ODD_CORPUS, ODD_QUERIES, {
        "qrels/test.tsv": "query-id\tcorpus-id\tscore\n1\t7\t1\n",
        "qrels_train.tsv": "q-2 0 é-1 2\n",  # TREC 4-column, whitespace separated
        "qrels.tsv": "1\t007\t1\n",  # qrels/test.tsv wins over qrels.tsv
    })
    with pytest.warns(DataWarning, match="dropped 1 of 2 queries"):  # q-2 is judged in train only
        assert load_beir(root).qrels == {"1": {"7": 1}}
    with pytest.warns(DataWarning, match="dropped 1 of 2 queries"):
        train = load_beir(root, split="train")
    assert train.qrels == {"q-2": {"é-1": 2}} and list(train.queries) == ["q-2"]
    with pytest.raises(FileNotFoundError, match=r"qrels_dev\.tsv"):
        load_beir(root, split="dev")  # qrels.tsv is only the test split's fallback


def test_queries_all_fallback_for_train(tmp_path):
    # ../shared/data/scifact layout: queries.jsonl holds only test queries, queries_all.jsonl all of them.
    root = write_collection(tmp_path / "c", ODD_CORPUS, _jsonl({"_id": 1, "text": "test query"}),
                            {"qrels.tsv": "1\t7\t1\n", "qrels_train.tsv": "q-2\t007\t1\n"})
    (root / "queries_all.jsonl").write_text(_jsonl({"_id": 1, "text": "test query"}, {"_id": "q-2", "text": "train"}))
    with pytest.warns(DataWarning, match="dropped 1 of 2"):
        train = load_beir(root, split="train")
    assert train.queries == {"q-2": "train"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the test split is covered by queries.jsonl: no warning at all
        assert load_beir(root).queries == {"1": "test query"}


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_beir(tmp_path / "nowhere")
    root = write_collection(tmp_path / "c", None, ODD_QUERIES, {"qrels.tsv": ODD_QRELS})
    with pytest.raises(FileNotFoundError, match=r"corpus\.jsonl"):
        load_beir(root)
    root = write_collection(tmp_path / "d", ODD_CORPUS, None, {"qrels.tsv": ODD_QRELS})
    with pytest.raises(FileNotFoundError, match=r"queries\.jsonl"):
        load_beir(root)
    root = write_collection(tmp_path / "e", ODD_CORPUS, ODD_QUERIES, {})
    with pytest.raises(FileNotFoundError, match=r"qrels[/\\]test\.tsv.*qrels\.tsv"):
        load_beir(root)


@pytest.mark.parametrize("corpus, match", [
    ('{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "cut\n', r"corpus\.jsonl:2: malformed JSON"),
    ('{"_id": "a", "text": "ok"}\n\n["not", "an object"]\n', r"corpus\.jsonl:3: expected a JSON object"),
    ('{"title": "no id", "text": "x"}\n', r"corpus\.jsonl:1: record has no '_id'"),
    ('{"_id": "a", "text": 5}\n', r"corpus\.jsonl:1: field 'text' must be a string"),
    ('{"_id": 1.5, "text": "x"}\n', r"corpus\.jsonl:1: id must be a string or an integer"),
    ('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n',
     r"corpus\.jsonl:2: duplicate document id 'a' \(first on line 1\)"),
])
def test_malformed_corpus_reports_file_and_line(tmp_path, corpus, match):
    root = write_collection(tmp_path / "c", corpus, _jsonl({"_id": "q", "text": "x"}), {"qrels.tsv": "q\ta\t1\n"})
    with pytest.raises(ValueError, match=match):
        load_beir(root)


@pytest.mark.parametrize("qrels, match", [
    ("q\ta\t1\nq\ta\n", r"qrels\.tsv:2: expected 3 tab-separated fields"),
    ("q\ta\t1\nq\ta\thigh\n", r"qrels\.tsv:2: relevance score 'high' is not a number"),
    ("q\ta\t0.5\n", r"qrels\.tsv:1: relevance score '0.5' is not an integer"),
    ("query-id\tcorpus-id\tscore\n", r"no relevance judgements"),
])
def test_malformed_qrels_reports_file_and_line(tmp_path, qrels, match):
    root = write_collection(tmp_path / "c", _jsonl({"_id": "a", "text": "x"}), _jsonl({"_id": "q", "text": "x"}),
                            {"qrels.tsv": qrels})
    with pytest.raises(ValueError, match=match):
        load_beir(root)


def test_malformed_queries(tmp_path):
    root = write_collection(tmp_path / "c", _jsonl({"_id": "a", "text": "x"}),
                            '{"_id": "q", "text": "x"}\n{"_id": "r", "text": "  "}\n', {"qrels.tsv": "q\ta\t1\n"})
    with pytest.raises(ValueError, match=r"queries\.jsonl:2: query 'r' has empty text"):
        load_beir(root)


def test_unjudged_queries_dropped_or_kept(tmp_path):
    queries = _jsonl(*({"_id": f"q{i}", "text": f"query {i}"} for i in range(4)))
    root = write_collection(tmp_path / "c", _jsonl({"_id": "a", "text": "x"}), queries, {"qrels.tsv": "q0\ta\t1\n"})
    with pytest.warns(DataWarning, match="dropped 3 of 4 queries that have no qrels"):
        ds = load_beir(root)
    assert list(ds.queries) == ["q0"] and ds.stats["unjudged_queries"] == 3
    with pytest.warns(DataWarning, match="3 of 4 queries have no qrels.*kept"):
        ds = load_beir(root, keep_unjudged=True)
    assert len(ds.queries) == 4 and set(ds.qrels) == {"q0"}


def test_empty_documents_and_unknown_ids_are_counted(tmp_path):
    corpus = _jsonl({"_id": "a", "text": "x"}, {"_id": "e1", "title": "", "text": ""}, {"_id": "e2", "text": " "})
    queries = _jsonl({"_id": "q", "text": "x"})
    qrels = "q\ta\t1\nq\tghost\t1\nnoquery\ta\t1\n"
    root = write_collection(tmp_path / "c", corpus, queries, {"qrels.tsv": qrels})
    with pytest.warns(DataWarning) as record:
        ds = load_beir(root)
    messages = " | ".join(str(w.message) for w in record)
    assert "2 of 3 documents have neither title nor text" in messages
    assert "1 judged queries" in messages and "not in the queries file" in messages
    assert "1 judgements" in messages and "not in the corpus" in messages
    assert ds.stats == {"empty_docs": 2, "unjudged_queries": 0, "qrels_unknown_queries": 1, "qrels_unknown_docs": 1}
    assert ds.qrels == {"q": {"a": 1, "ghost": 1}}, "judgements of missing documents still count against recall"


def test_no_query_left_is_an_error(tmp_path):
    root = write_collection(tmp_path / "c", _jsonl({"_id": "a", "text": "x"}), _jsonl({"_id": "q", "text": "x"}),
                            {"qrels.tsv": "other\ta\t1\n"})
    with pytest.warns(DataWarning), pytest.raises(ValueError, match="no query of split 'test'"):
        load_beir(root)


def test_argument_types(tmp_path):
    with pytest.raises(TypeError, match="path must be"):
        load_beir(123)
    with pytest.raises(TypeError, match="split must be"):
        load_beir(tmp_path, split=None)


def test_dataset_by_hand_and_subset():
    ds = BeirDataset({1: ("t", "x"), "b": Document("", "y")}, {"q": "x", 2: "y"}, {"q": {1: 2}, 2: {"b": "1"}})
    assert ds.corpus["1"] == ("t", "x") and ds.qrels == {"q": {"1": 2}, "2": {"b": 1}}
    sub = ds.subset(["2"])
    assert sub.queries == {"2": "y"} and sub.qrels == {"2": {"b": 1}} and sub.corpus is not None
    with pytest.raises(KeyError, match="not in the dataset"):
        ds.subset(["nope"])
    with pytest.raises(KeyError, match="'zz' is not in the corpus"):
        ds.doc_text("zz")


def test_scifact_splits(scifact):
    assert (len(scifact.corpus), len(scifact.queries), sum(map(len, scifact.qrels.values()))) == (5183, 300, 339)
    with pytest.warns(DataWarning, match="dropped 300 of 1109"):
        train = load_beir(SCIFACT, split="train")
    assert len(train.queries) == 809 and sum(map(len, train.qrels.values())) == 919
    assert not set(train.queries) & set(scifact.queries)
