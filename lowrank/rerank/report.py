"""``lowrank report --runs DIR...``: nDCG@10 against parameters and docs/s, as a markdown table and a PNG plot.

Each run directory holds ``eval.json``, the output of ``lowrank rerank --json`` for that reranker (e.g. the untuned
model, a fine-tuned adapter ``--lora DIR/adapter``, a squeezed adapter, a compressed base ``--compress B``), and
optionally ``train_log.jsonl`` from ``lowrank train-reranker`` (its summed step seconds are shown as the training
time). The BM25 first stage comes from the first run's ``eval.json`` (every run reranks the same BM25 lists).

Columns: run (the directory name, or ``label`` in an optional ``report.json`` beside ``eval.json``), nDCG@10 and
Recall@100 on the evaluated split, the reranker's parameters (base + LoRA factors, after compression), its LoRA
parameters, docs/s (candidates scored per second of reranking, first-time document encoding included), and the
training seconds. The plot has two panels: nDCG@10 against parameters, and against docs/s; BM25 is a horizontal
line. It needs matplotlib (``pip install matplotlib``); without it the command refuses ``--png`` with that message.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "load_runs", "markdown_table", "plot", "run"]


def add_parser(sub: Any) -> None:
    """Register the ``report`` sub-command on an argparse sub-parsers object."""
    p = sub.add_parser("report", help="table and PNG plot of nDCG@10 vs parameters and docs/s over rerank runs",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="run directories, each with an eval.json")
    p.add_argument("--png", default=None, help="write the plot here (needs matplotlib)")
    p.add_argument("--title", default=None, help="plot title (default: the dataset name)")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {what}") from None


def load_runs(dirs: list[str | Path]) -> list[dict[str, Any]]:
    """One row per reranker plus the BM25 row first: {run, ndcg@10, recall@100, params, lora_params, docs_per_s,
    train_s, data, queries}. ValueError for a missing or malformed ``eval.json`` or runs on different data."""
    if not dirs:
        raise ValueError("--runs: give at least one run directory")
    rows: list[dict[str, Any]] = []
    seen_data = None
    for d in map(Path, dirs):
        f = d / "eval.json"
        if not f.is_file():
            raise ValueError(f"--runs: {d} has no eval.json (write it with `lowrank rerank ... --json > {f}`)")
        ev = _read_json(f, "the output of `lowrank rerank --json`")
        runs = ev.get("runs")
        if not isinstance(runs, list) or len(runs) < 2:
            raise ValueError(f"{f}: expected `lowrank rerank --json` output with a bm25 and a reranker run")
        data = (ev.get("data"), ev.get("queries"), ev.get("top_k"))
        if seen_data is None:
            seen_data = data
            bm25 = runs[0]
            rows.append({"run": "BM25", "ndcg@10": bm25["ndcg@10"], "recall@100": bm25["recall@100"],
                         "params": None, "lora_params": None, "docs_per_s": None, "train_s": None,
                         "data": data[0], "queries": data[1]})
        elif data != seen_data:
            raise ValueError(f"{f}: evaluated on {data} but {dirs[0]} on {seen_data}; compare runs on the same "
                             "data, queries and top-k")
        label = d.name
        meta = d / "report.json"
        if meta.is_file():
            label = _read_json(meta, '{"label": ...}').get("label", label)
        train_s = None
        log = d / "train_log.jsonl"
        if log.is_file():
            train_s = sum(json.loads(line)["seconds"] for line in log.read_text().splitlines() if line.strip())
        rr = runs[1]
        rows.append({"run": label, "ndcg@10": rr["ndcg@10"], "recall@100": rr["recall@100"],
                     "params": ev.get("params"), "lora_params": ev.get("lora_params"),
                     "docs_per_s": rr.get("docs_per_s"), "train_s": train_s, "data": data[0], "queries": data[1]})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (nDCG@10 gain over BM25 in its own column)."""
    bm25 = rows[0]["ndcg@10"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    out = ["| run | nDCG@10 | vs BM25 | R@100 | params | LoRA params | docs/s | train s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['run']} | {r['ndcg@10']:.4f} | {r['ndcg@10'] - bm25:+.4f} | {r['recall@100']:.4f} "
                   f"| {f(r['params'], ',')} | {f(r['lora_params'], ',')} | {f(r['docs_per_s'], ',.1f')} "
                   f"| {f(r['train_s'], ',.0f')} |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: str | Path, title: str | None = None) -> None:
    """Two panels: nDCG@10 vs parameters (millions) and vs docs/s; BM25 as a dashed horizontal line."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--png needs matplotlib (pip install 'lowrank[report]' or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bm25 = rows[0]
    pts = rows[1:]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    for ax, key, xlabel, scale in ((axes[0], "params", "parameters (millions)", 1e-6),
                                   (axes[1], "docs_per_s", "docs/s (candidates reranked per second)", 1.0)):
        for i, r in enumerate(pts):
            if r[key] is None:
                continue
            # one colour and marker per run in both panels, named in the shared legend (labels next to the points
            # overlap when runs sit close together)
            ax.scatter(r[key] * scale, r["ndcg@10"], s=44, color=f"C{i % 10}", marker="osD^v<>ph*"[i % 10],
                       label=r["run"])
        ax.margins(x=0.1, y=0.1)
        ax.axhline(bm25["ndcg@10"], ls="--", color="gray", lw=1)
        ax.text(ax.get_xlim()[0], bm25["ndcg@10"], f" BM25 {bm25['ndcg@10']:.3f}", va="bottom", fontsize=8,
                color="gray")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("nDCG@10")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8, frameon=False)
    fig.suptitle(title or f"{bm25['data']} ({bm25['queries']} queries): BM25 top-100 reranked")
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(pts) - 1) // 4), 1, 1))  # leave the bottom to the legend
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Print the table; write the PNG when ``--png`` is given."""
    rows = load_runs(args.runs)
    print(markdown_table(rows))
    if args.png:
        plot(rows, args.png, args.title)
        print(f"plot: {args.png}")
    return 0
