"""Turn a pytest-benchmark JSON of the LoRA-linear benchmarks into a markdown ratio table (optionally a PNG).

Usage:
    pytest benchmarks --benchmark-only --benchmark-warmup=on --benchmark-json=out.json
    python benchmarks/report.py out.json [--png ratios.png]

    python benchmarks/report.py --run [--threads 2] [--min-rounds 5] [--max-time 1.0] [--json out.json]
                                [--png ratios.png] [-- EXTRA PYTEST ARGS, e.g. -k bfloat16]
        runs the suite first (pytest with warm-up, pinned threads, GC off during timing, JSON to a temporary
        file unless --json is given), then prints the table. Takes a few minutes on 2 cores.

Table: one row per benchmark group (``mode-dtype-TxINxOUT``), the median time of each implementation
("linear" = bare nn.Linear, the floor; "peft" = PEFT's LoRA layer, the peer; "lowrank" = lowrank's
LoRALinear), their ratios, and the arithmetic floor of the ratio over the Linear:
  * fwd:     1 + r·(in+out)/(in·out), LoRA's FLOPs over the Linear's (NOTES.md);
  * fwd+bwd: 1 + r·(4·in+3·out)/(2·in·out) with x requiring grad: the Linear does two GEMMs (forward and
             dx = g·W), LoRA adds h = x·Aᵀ and s·h·Bᵀ forward, and s·g·B, (s·g·B)·A, dA = (s·g·B)ᵀx,
             dB = s·gᵀh and the recomputed h backward.
Medians only; on shared machines compare ratios within one run, not absolute times across runs. The PNG needs
matplotlib; without it the script says so and skips it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMPLS = ("linear", "peft", "lowrank")
MODE_ORDER = ("fwd", "fwd+bwd")
DTYPE_ORDER = ("float32", "bfloat16", "float16", "float64")


from lowrank.cli import floor_overhead  # noqa: E402  (one definition, shared with `lowrank demo`)


def load_groups(data: dict) -> list[dict]:
    """Group the benchmarks: [{group, mode, dtype, shape, r, medians: {impl: s}}], by mode, dtype, shape."""
    groups: dict[str, dict] = {}
    for order, bench in enumerate(data.get("benchmarks", [])):
        info = bench.get("extra_info", {})
        stats = bench.get("stats") or {}
        impl = info.get("impl")
        if impl is None or "median" not in stats:
            continue
        name = bench.get("group") or bench["name"]
        g = groups.setdefault(name, {"group": name, "order": order, "mode": info.get("mode", ""),
                                     "dtype": info.get("dtype", ""), "r": info.get("r"),
                                     "shape": (info.get("T"), info.get("in_features"),
                                               info.get("out_features")),
                                     "medians": {}, "rounds": {}})
        g["medians"][impl] = stats["median"]
        g["rounds"][impl] = stats.get("rounds")

    def key(g):
        mode = MODE_ORDER.index(g["mode"]) if g["mode"] in MODE_ORDER else len(MODE_ORDER)
        dtype = DTYPE_ORDER.index(g["dtype"]) if g["dtype"] in DTYPE_ORDER else len(DTYPE_ORDER)
        return mode, dtype, g["order"]
    return sorted(groups.values(), key=key)


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.3f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.3f}"


def ratio_table(groups: list[dict]) -> str:
    lines = ["| group | linear (ms) | peft (ms) | lowrank (ms) | peft/linear | lowrank/linear | lowrank/peft "
             "| floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for g in groups:
        m = g["medians"]
        lin, peft, low = (m.get(i) for i in IMPLS)
        T, in_f, out_f = g["shape"]
        floor = ("–" if None in (in_f, out_f, g["r"])
                 else f"{1 + floor_overhead(g['mode'], in_f, out_f, g['r']):.3f}")
        lines.append(f"| {g['group']} | {_ms(lin)} | {_ms(peft)} | {_ms(low)} | {_ratio(peft, lin)} | "
                     f"{_ratio(low, lin)} | {_ratio(low, peft)} | {floor} |")
    return "\n".join(lines)


def floor_table(groups: list[dict]) -> str:
    seen = {}
    for g in groups:
        T, in_f, out_f = g["shape"]
        if None not in (in_f, out_f, g["r"]):
            seen.setdefault((T, in_f, out_f, g["r"]), None)
    lines = ["| T×in×out | r | fwd: r·(in+out)/(in·out) | fwd+bwd: r·(4in+3out)/(2·in·out) |",
             "|---|---:|---:|---:|"]
    for T, in_f, out_f, r in seen:
        lines.append(f"| {T}×{in_f}×{out_f} | {r} | {100 * floor_overhead('fwd', in_f, out_f, r):.1f}% | "
                     f"{100 * floor_overhead('fwd+bwd', in_f, out_f, r):.1f}% |")
    return "\n".join(lines)


def header(data: dict) -> str:
    mi = data.get("machine_info", {})
    ci = data.get("commit_info", {})
    cpu = mi.get("cpu", {}).get("brand_raw", mi.get("processor", "?"))
    parts = [f"run {data.get('datetime', '?')}", f"torch {mi.get('torch_version', '?')}",
             f"{mi.get('torch_num_threads', '?')} threads",
             f"CPU {cpu} ({mi.get('torch_cpu_capability', '?')})",
             f"python {mi.get('python_version', '?')}"]
    if mi.get("malloc"):
        parts.append(f"malloc {mi['malloc']}")
    if ci.get("id"):
        parts.append(f"commit {ci['id'][:10]}{' (dirty)' if ci.get('dirty') else ''}")
    return "; ".join(parts)


def report(data: dict) -> str:
    groups = load_groups(data)
    if not groups:
        return ("no timed benchmarks with an 'impl' in extra_info found (was the suite run with "
                "--benchmark-disable? that mode records no timings)")
    return "\n\n".join([
        header(data),
        "Median time per call; ratios of medians. floor = 1 + LoRA's extra FLOPs over the Linear's "
        "(fwd+bwd: frozen base, x requiring grad; the Linear's row is its forward + dx GEMMs).",
        ratio_table(groups),
        "Arithmetic floor per shape (LoRA's extra FLOPs over the bare Linear's):",
        floor_table(groups),
    ])


def plot(groups: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; skipping the plot {path} (pip install matplotlib)")
        return
    names = [g["group"] for g in groups]
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(names)), 4.5))
    width = 0.38
    for k, impl in enumerate(("peft", "lowrank")):
        vals = [(g["medians"].get(impl) or 0) / g["medians"]["linear"] if g["medians"].get("linear") else 0
                for g in groups]
        ax.bar([i + (k - 0.5) * width for i in range(len(names))], vals, width, label=f"{impl} / linear")
    floors = [1 + floor_overhead(g["mode"], g["shape"][1], g["shape"][2], g["r"]) if g["r"] else None
              for g in groups]
    ax.scatter(range(len(names)), floors, marker="_", s=400, color="black", label="arithmetic floor",
               zorder=3)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("time / nn.Linear time (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def run_suite(args, extra: list[str]) -> Path:
    if args.json:
        json_path = Path(args.json)
    else:
        fd, name = tempfile.mkstemp(prefix="lowrank-bench-", suffix=".json")
        os.close(fd)
        json_path = Path(name)
    cmd = [sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider", "--benchmark-only",
           "--benchmark-warmup=on", f"--benchmark-min-rounds={args.min_rounds}",
           f"--benchmark-max-time={args.max_time}", "--benchmark-disable-gc", "--benchmark-sort=name",
           "--benchmark-columns=min,median,max,rounds", f"--benchmark-json={json_path}",
           f"--threads={args.threads}", *extra]
    print("running:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=HERE.parent)
    if rc != 0:
        raise SystemExit(f"benchmark run failed (pytest exit status {rc})")
    return json_path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description="Ratio table from a pytest-benchmark JSON (see the docstring).")
    p.add_argument("json_in", nargs="?", help="pytest-benchmark JSON (from --benchmark-json)")
    p.add_argument("--run", action="store_true", help="run the benchmark suite first, then report")
    p.add_argument("--json", help="with --run: keep the JSON here (default: a temporary file, removed after)")
    p.add_argument("--threads", type=int, default=2, help="with --run: torch threads (default 2)")
    p.add_argument("--min-rounds", type=int, default=5, help="with --run: --benchmark-min-rounds (default 5)")
    p.add_argument("--max-time", type=float, default=1.0,
                   help="with --run: --benchmark-max-time in seconds (default 1.0)")
    p.add_argument("--png", help="also write a bar plot of the ratios here (needs matplotlib)")
    args = p.parse_args(argv)
    if args.run == (args.json_in is not None):
        p.error("give either a JSON file or --run")
    path = run_suite(args, extra) if args.run else Path(args.json_in)
    try:
        data = json.loads(path.read_text())
    finally:
        if args.run and not args.json:
            os.unlink(path)
    print()
    print(report(data))
    if args.png:
        groups = load_groups(data)
        if groups:
            plot(groups, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
