"""``lowrank report`` (lowrank.rerank.report) over hand-written ``lowrank rerank --json`` outputs."""
from __future__ import annotations

import json

import pytest

from lowrank import cli


def _eval(root, name, ndcg, params, docs_s, data="scifact", log_seconds=None):
    d = root / name
    d.mkdir()
    runs = [{"run": "bm25", "ndcg@10": 0.686, "recall@100": 0.913, "mrr@10": 0.65},
            {"run": "embed", "ndcg@10": ndcg, "recall@100": 0.913, "mrr@10": 0.7, "docs_per_s": docs_s}]
    (d / "eval.json").write_text(json.dumps({"data": data, "queries": 300, "top_k": 100, "params": params,
                                             "lora_params": 0, "runs": runs}))
    if log_seconds is not None:
        (d / "train_log.jsonl").write_text("".join(json.dumps({"step": i + 1, "seconds": s}) + "\n"
                                                   for i, s in enumerate(log_seconds)))
    return d


def test_table_rows_and_plot(tmp_path, capsys):
    a = _eval(tmp_path, "untuned", 0.663, 22_713_216, 15.0)
    b = _eval(tmp_path, "r64", 0.70, 25_367_424, 12.0, log_seconds=[1.5, 2.5])
    args = ["report", "--runs", str(a), str(b)]
    try:
        import matplotlib  # noqa: F401
        png = tmp_path / "docs" / "plot.png"
        args += ["--png", str(png)]
    except ImportError:
        png = None
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| run | nDCG@10") and len(lines) == 4  # header, BM25, two runs
    assert lines[1].startswith("| BM25 | 0.6860 | +0.0000")
    assert lines[2].startswith("| untuned | 0.6630 | -0.0230") and "22,713,216" in lines[2]
    assert lines[3].startswith("| r64 | 0.7000 | +0.0140") and lines[3].rstrip().endswith("| 4 |")
    if png is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_runs_give_clear_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        cli.main(["report", "--runs", str(empty)])
    assert "has no eval.json" in capsys.readouterr().err
    a = _eval(tmp_path, "a", 0.66, 1, 1.0)
    b = _eval(tmp_path, "b", 0.66, 1, 1.0, data="nfcorpus")
    with pytest.raises(SystemExit):
        cli.main(["report", "--runs", str(a), str(b)])
    assert "same data" in capsys.readouterr().err
