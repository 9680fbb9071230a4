"""Single-thread CPU time of ``lowrank.ops.sparse_lowrank_linear``, SLTrain's dense algorithm and nn.Linear.

2048 tokens, rank 128, W 4096×4096 and 1024×4096 ([out, in]), density 1 / 3 / 5 %, fp32 and bf16, forward
(no autograd graph) and forward + backward (gradients of x, A, B, values, bias; nn.Linear: x, W, b). Medians of
``time.process_time`` over 3 interleaved rounds after one warm-up call each. On a shared, loaded 2-core machine
the CPU time of one thread is far more stable than 2-thread wall-clock medians, which mostly measure the
scheduler (bench_sparse_lowrank_linear.py has those, with peak memory). Prints a markdown table.

    python benchmarks/sparse_lowrank_cputime.py [--reps 3] [--dtypes fp32 bf16] [--shapes 4096x4096 1024x4096]
        [--densities 0.01 0.03 0.05]

The last column is the floor: the same op with an empty support (the rank-r GEMMs and the bias alone).
"""
from __future__ import annotations

import argparse
import time

import torch

from lowrank.ops import SparseLayout, sparse_lowrank_linear
from lowrank.reference import sltrain_linear

T, RANK = 2048, 128
SHAPES = ((4096, 4096), (1024, 4096))
DENSITIES = (0.01, 0.03, 0.05)


def cpu_ms(fns: dict, reps: int) -> dict:
    """Median CPU milliseconds of each callable, rounds interleaved so that load drifts hit all alike."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            times[k].append(time.process_time() - t0)
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}


def calls(mode, x, a, b, v, layout, bias, grad, lin):
    if mode == "fwd":
        def run(op):
            def f():
                with torch.no_grad():
                    return op(x, a, b, v, layout, bias)
            return f

        def linear():
            with torch.no_grad():
                return lin(x)
        return {"lowrank": run(sparse_lowrank_linear), "sltrain": run(sltrain_linear), "linear": linear}
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b, v, bias)]
    xl = x.detach().clone().requires_grad_()

    def run(op):
        return lambda: torch.autograd.grad(op(*leaves[:4], layout, leaves[4]), leaves, grad)
    return {"lowrank": run(sparse_lowrank_linear), "sltrain": run(sltrain_linear),
            "linear": lambda: torch.autograd.grad(lin(xl), [xl, lin.weight, lin.bias], grad)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    p.add_argument("--shapes", nargs="+", default=[f"{o}x{i}" for o, i in SHAPES], help="OUTxIN")
    p.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dtypes = [{"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in args.dtypes]
    print("| dtype | mode | W out×in | density | lowrank ms | SLTrain ms | speed-up | nn.Linear ms | floor ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for out, in_ in (tuple(int(n) for n in s.split("x")) for s in args.shapes):
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(T, in_, generator=g).to(dtype)
            grad = torch.randn(T, out, generator=g).to(dtype)
            lin = torch.nn.Linear(in_, out, dtype=dtype)
            for density in args.densities:
                layout = SparseLayout.random(out, in_, density)
                empty = SparseLayout.random(out, in_, 0.0)
                a = (torch.randn(RANK, in_, generator=g) / in_ ** 0.5).to(dtype)
                b = (torch.randn(out, RANK, generator=g) / RANK ** 0.5).to(dtype)
                v = (torch.randn(layout.nnz, generator=g) / in_ ** 0.5).to(dtype)
                bias = torch.randn(out, generator=g).to(dtype)
                for mode in ("fwd", "fwdbwd"):
                    t = cpu_ms(calls(mode, x, a, b, v, layout, bias, grad, lin), args.reps)
                    floor = cpu_ms({"floor": calls(mode, x, a, b, v[:0], empty, bias, grad, lin)["lowrank"]},
                                   args.reps)["floor"]
                    print(f"| {str(dtype)[6:]} | {mode} | {out}×{in_} | {density:.0%} | {t['lowrank']:.1f} | "
                          f"{t['sltrain']:.1f} | {t['sltrain'] / t['lowrank']:.2f}× | {t['linear']:.1f} | "
                          f"{floor:.1f} |", flush=True)


if __name__ == "__main__":
    main()
