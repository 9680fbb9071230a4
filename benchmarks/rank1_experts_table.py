"""Interleaved ratio table for the rank-1 experts LoRA: nn.Linear floor, dense masked peer, lowrank, one process.

pytest-benchmark (bench_rank1_experts.py) times each case in its own block, so on a shared, loaded machine a
burst of load lands on one implementation only. Here every round calls the three implementations back to back
(rotating their order) and the table reports per-implementation medians over the rounds and their ratios to the
Linear, next to the arithmetic floor of the ratio (extra multiply-adds over the Linear's):
  * fwd:     1 + (E·in + k·out) / (in·out) for "self" (all E rank activations are its selection scores) and
             1 + (E·in + k·in + k·out) / (in·out) for "router" (router scores, then h at the k selected experts);
  * fwd+bwd: 1 + (fwd extra + bwd extra) / (2·in·out) with x requiring grad (the Linear does two GEMMs); the
             backward adds q = G·B and dB = Gᵀ·U at the selected experts (k·out each) and D·[A; R], Dᵀ·x: at the
             selected experts for "router" (2k·in each), dense for "self" (E·in each: the norm makes dh dense).

    python benchmarks/rank1_experts_table.py [--threads 2] [--rounds 15] [--gate router] [--dtype bfloat16]
                                             [--mode fwd] [--shape 2048x768x768]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.bench_rank1_experts import E, K, SHAPES, _forward, _layer

IMPLS = ("linear", "dense", "lowrank")


def floor_ratio(gate: str, mode: str, shape, experts: int = E, k: int = K) -> float:
    _, in_f, out_f = shape
    fwd = (experts + (k if gate == "router" else 0)) * in_f + k * out_f
    if mode == "fwd":
        return 1 + fwd / (in_f * out_f)
    bwd = 2 * k * out_f + (4 * k * in_f if gate == "router" else 2 * experts * in_f)
    return 1 + (fwd + bwd) / (2 * in_f * out_f)


def measure(gate: str, dtype: torch.dtype, shape, mode: str, rounds: int) -> dict[str, float]:
    m, x, ones = _layer(dtype, shape, gate, E, K)
    m.train(mode != "fwd")
    xg = x.detach().requires_grad_(True)
    params = [p for p in (m.lora_a, m.lora_b, m.router) if p is not None]

    def step(impl):
        if mode == "fwd":
            with torch.inference_mode():
                _forward(impl, m, x)
            return
        _forward(impl, m, xg).backward(ones)
        xg.grad = None
        for p in params:
            p.grad = None
    times = {i: [] for i in IMPLS}
    for impl in IMPLS:          # warm-up
        step(impl), step(impl)
    for r in range(rounds):
        order = IMPLS[r % 3:] + IMPLS[:r % 3]
        for impl in order:
            t0 = time.perf_counter()
            step(impl)
            times[impl].append(time.perf_counter() - t0)
    m.expert_counts.zero_()
    return {i: statistics.median(v) for i, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--gate", choices=("router", "self"), action="append")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), action="append")
    ap.add_argument("--mode", choices=("fwd", "fwd+bwd"), action="append")
    ap.add_argument("--shape", action="append", help="TxINxOUT (default: the four benchmark shapes)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    shapes = [tuple(map(int, s.split("x"))) for s in a.shape] if a.shape else SHAPES
    print(f"threads={a.threads} rounds={a.rounds} E={E} k={K} load={os.getloadavg()[0]:.2f} "
          f"torch={torch.__version__} cpu={torch.backends.cpu.get_cpu_capability()}")
    print("| mode | gate | dtype | T×in×out | linear ms | dense ms | lowrank ms | dense/linear | lowrank/linear "
          "| floor | lowrank/dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in a.mode or ("fwd", "fwd+bwd"):
        for gate in a.gate or ("router", "self"):
            for dname in a.dtype or ("bfloat16", "float32"):
                for shape in shapes:
                    t = measure(gate, getattr(torch, dname), shape, mode, a.rounds)
                    lin = t["linear"]
                    print(f"| {mode} | {gate} | {dname} | {'×'.join(map(str, shape))} | {lin * 1e3:.2f} | "
                          f"{t['dense'] * 1e3:.2f} | {t['lowrank'] * 1e3:.2f} | {t['dense'] / lin:.3f} | "
                          f"{t['lowrank'] / lin:.3f} | {floor_ratio(gate, mode, shape):.3f} | "
                          f"{t['lowrank'] / t['dense']:.3f} |", flush=True)
    print(f"load at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
