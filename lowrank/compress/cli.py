"""``lowrank compress MODEL_DIR --budget 0.5 --method greedy --out DIR``: compress a Hugging Face model directory.

Loads the model with ``transformers.AutoModel`` (offline: nothing is downloaded), optionally reads calibration
texts (a .txt file with one text per line, or a .jsonl file with a "text" field per line — BEIR corpus and
queries files qualify, "title" is prefixed when present), runs :func:`lowrank.compress.compress_model`, prints
the per-layer report and writes the result with :func:`lowrank.compress.save_compressed` (weights as
safetensors + ``compression.json``), plus the tokenizer and config so the folder is self-describing. Reload with
``lowrank.compress.load_compressed(MODEL_DIR, OUT_DIR)``.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

METHODS = ("greedy", "welore", "uniform")


def add_parser(sub: Any) -> None:
    """Register the ``compress`` sub-command on an argparse sub-parsers object."""
    p = sub.add_parser("compress", help="compress a model's Linear layers under one parameter budget",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="a Hugging Face model directory (config.json + weights)")
    p.add_argument("--budget", type=float, default=0.5, help="fraction of the Linear parameters kept, in (0, 1]")
    p.add_argument("--method", choices=METHODS, default="greedy", help="rank allocation (default greedy)")
    p.add_argument("--calibration", default=None,
                   help=".txt (one text per line) or .jsonl ('text' field) of calibration texts")
    p.add_argument("--calibration-count", type=int, default=256, help="texts read from --calibration (256)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per calibration text (128)")
    p.add_argument("--greedy-floor", type=_floor, default="auto",
                   help="greedy: every layer keeps at least this fraction of its uniform rank, a number in "
                        "[0, 1] (0 = plain greedy, 1 = uniform) or auto (default: min(1, max(0.75, budget + "
                        "0.05)))")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _floor(value: str) -> float | str:
    """argparse type of ``--greedy-floor``: "auto" or a number in [0, 1]."""
    if value == "auto":
        return value
    try:
        floor = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number in [0, 1], got {value!r}") from None
    if not 0.0 <= floor <= 1.0:
        raise argparse.ArgumentTypeError(f"expected auto or a number in [0, 1], got {value!r}")
    return floor


def read_texts(path: str, count: int) -> list[str]:
    """Up to ``count`` non-empty texts from a .txt or .jsonl file (errors name the file and line)."""
    if not os.path.isfile(path):
        raise ValueError(f"--calibration: no such file {path!r}")
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(texts) >= count:
                break
            line = line.strip()
            if not line:
                continue
            if path.endswith(".jsonl"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"--calibration: {path}:{lineno}: malformed JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError(f"--calibration: {path}:{lineno}: expected an object with a 'text' string")
                line = (rec.get("title") or "").strip() + " " + rec["text"].strip()
                line = line.strip()
            if line:
                texts.append(line)
    if not texts:
        raise ValueError(f"--calibration: {path!r} holds no texts")
    return texts


def run(args: argparse.Namespace) -> int:
    """Execute the parsed ``compress`` command; returns the exit status."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from lowrank.compress.model import compress_model, save_compressed

    if not 0.0 < args.budget <= 1.0:
        raise ValueError(f"--budget must be in (0, 1], got {args.budget}")
    if args.calibration_count < 1 or args.max_length < 1:
        raise ValueError("--calibration-count and --max-length must be >= 1")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise ValueError(f"model_dir: {args.model_dir!r} is not a Hugging Face model directory (no config.json)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(args.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    texts = read_texts(args.calibration, args.calibration_count) if args.calibration else None
    report = compress_model(model, args.budget, args.method, texts, tokenizer=tokenizer,
                            max_length=args.max_length, greedy_floor=args.greedy_floor,
                            progress=not args.no_progress)
    print(report)
    save_compressed(model, report, args.out)
    tokenizer.save_pretrained(args.out)
    model.config.save_pretrained(args.out)
    print(f"wrote {args.out} (reload: lowrank.compress.load_compressed({args.model_dir!r}, {args.out!r}))")
    return 0
