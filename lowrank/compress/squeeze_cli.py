"""``lowrank squeeze-adapter SRC --rank 16 --out DST``: LoRA-Squeeze a PEFT adapter directory (post-tuning).

Reads ``adapter_config.json`` + ``adapter_model.safetensors`` from SRC, replaces every B·A by its best rank-k
approximation (``lowrank.compress.squeeze_peft.squeeze_peft_adapter``: QR of both factors and an SVD of the
r×r core, never forming B·A; the scaling of each layer is kept) and writes a PEFT adapter to DST. Give exactly one
of ``--rank``, ``--energy`` or ``--budget``. Prints the per-layer ranks and the retained energy.
"""
from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """Register the ``squeeze-adapter`` sub-command on an argparse sub-parsers object."""
    p = sub.add_parser("squeeze-adapter", help="LoRA-Squeeze a PEFT adapter directory to a lower rank",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--rank", type=int, default=None, help="every layer to this rank")
    p.add_argument("--energy", type=float, default=None, help="per layer, keep this fraction of ||BA||_F^2")
    p.add_argument("--budget", type=float, default=None, help="keep this fraction of all LoRA parameters")
    p.add_argument("--out", required=True, help="output adapter directory")


def run(args: argparse.Namespace) -> int:
    """Squeeze ``args.src`` into ``args.out``; ValueError for bad input (the caller prints it)."""
    import os

    from lowrank.compress.squeeze_peft import squeeze_peft_adapter

    if not os.path.isdir(args.src):
        raise ValueError(f"squeeze-adapter: {args.src!r} is not a directory")
    report = squeeze_peft_adapter(args.src, args.out, args.rank, energy=args.energy, budget=args.budget)
    ranks = sorted({layer.new_rank for layer in report.layers})
    src_ranks = sorted({layer.old_rank for layer in report.layers})
    print(f"{args.src} -> {args.out}: {len(report.layers)} layers, rank {src_ranks} -> {ranks}, LoRA parameters "
          f"{report.params_before} -> {report.params_after}, retained energy (all layers, scaled) "
          f"{report.retained_energy:.4f}, lowest layer {min(x.retained_energy for x in report.layers):.4f}")
    return 0
