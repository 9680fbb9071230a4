"""Training parity: a small LLaMA-style MLP language model with SparseLowRankLinear layers (lowrank's kernels)
against the same model run through SLTrain's dense-materializing algorithm, at equal seeds (issue 6, item 3).

Model: token embedding → N blocks of [RMSNorm → SwiGLU MLP (gate, up: d→f; down: f→d), residual] → RMSNorm →
tied head. Every MLP Linear is W = B·A + S (rank r, SLTrain random support at the given density, SLTrain
init). Data: a synthetic first-order Markov source over a small vocabulary (a fixed random table of 4 likely
successors per token, 10% uniform noise), which a per-position MLP can learn: the loss floor (≈ 1.8 nats for
V = 128) lies far below log(V).
Both runs start from bit-identical parameters and see the same batches; they differ only in how each layer's
forward/backward is computed (factored kernels vs dense W = B·A + S and dense Gᵀ·X), so their loss curves
should agree to rounding. The stated margin: |final loss difference| ≤ 1% of the final loss (checked; exit 1
otherwise). Also prints time per step for both and for a dense nn.Linear model of the same shape.

    python benchmarks/train_sparse_lowrank.py [--steps 300] [--threads 1]

One thread by default: on the shared 2-core machine two threads mostly measure the OS scheduler.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

from lowrank.nn import SparseLowRankLinear
from lowrank.reference import sltrain_linear


class SLTrainReferenceLinear(SparseLowRankLinear):
    """Same parameters and support; forward/backward by SLTrain's dense algorithm."""

    def forward(self, x):
        return sltrain_linear(x, self.lora_a, self.lora_b, self.s_values, self.layout, self.bias)


class Block(nn.Module):
    def __init__(self, d, f, make):
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.gate, self.up, self.down = make(d, f), make(d, f), make(f, d)

    def forward(self, h):
        z = self.norm(h)
        return h + self.down(F.silu(self.gate(z)) * self.up(z))


class MLPLM(nn.Module):
    def __init__(self, vocab, d, f, n_blocks, make):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        nn.init.normal_(self.emb.weight, std=0.02)   # tied head: unit-scale logits at init
        self.blocks = nn.ModuleList(Block(d, f, make) for _ in range(n_blocks))
        self.norm = nn.RMSNorm(d)

    def forward(self, ids):
        h = self.emb(ids)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h) @ self.emb.weight.t()


def markov_batches(vocab, batch, seq, steps, seed):
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)   # 4 likely successors of each token
    out = []
    for _ in range(steps):
        ids = torch.empty(batch, seq + 1, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq + 1):
            pick = torch.randint(0, 4, (batch,), generator=g)
            noise = torch.rand(batch, generator=g) < 0.1
            nxt = succ[ids[:, t - 1], pick]
            ids[:, t] = torch.where(noise, torch.randint(0, vocab, (batch,), generator=g), nxt)
        out.append(ids)
    return out


def train(model, batches, lr):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses, t0 = [], time.perf_counter()
    for ids in batches:
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, (time.perf_counter() - t0) / len(batches)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--f", type=int, default=688)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--density", type=float, default=0.03)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = markov_batches(args.vocab, args.batch, args.seq, args.steps, seed=1)

    def build(cls):
        torch.manual_seed(0)
        seeds = iter(range(1000))
        return MLPLM(args.vocab, args.d, args.f, args.blocks,
                     lambda i, o: cls(i, o, args.rank, args.density, bias=False, seed=next(seeds)))

    ours, ref = build(SparseLowRankLinear), build(SLTrainReferenceLinear)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    torch.manual_seed(0)
    dense = MLPLM(args.vocab, args.d, args.f, args.blocks, lambda i, o: nn.Linear(i, o, bias=False))
    l_ours, s_ours = train(ours, batches, args.lr)
    l_ref, s_ref = train(ref, batches, args.lr)
    l_dense, s_dense = train(dense, batches, args.lr)
    k = max(1, args.steps // 10)   # report means over the last 10% of steps (single-batch losses are noisy)
    f_ours, f_ref, f_dense = (sum(v[-k:]) / k for v in (l_ours, l_ref, l_dense))
    gap = max(abs(a - b) for a, b in zip(l_ours, l_ref))
    print(f"LLaMA-style MLP LM: vocab {args.vocab}, d {args.d}, ffn {args.f}, {args.blocks} blocks, "
          f"rank {args.rank}, density {args.density}, batch {args.batch}x{args.seq}, {args.steps} steps, "
          f"AdamW lr {args.lr}, threads {args.threads}")
    print(f"initial loss {l_ours[0]:.4f} (log V = {math.log(args.vocab):.4f})")
    print("| model | final loss (mean of last 10%) | ms / step |")
    print("|---|---|---|")
    print(f"| SparseLowRankLinear (lowrank kernels) | {f_ours:.4f} | {s_ours * 1e3:.1f} |")
    print(f"| same, SLTrain dense-materializing reference | {f_ref:.4f} | {s_ref * 1e3:.1f} |")
    print(f"| dense nn.Linear (not equal-parameter; context) | {f_dense:.4f} | {s_dense * 1e3:.1f} |")
    rel = abs(f_ours - f_ref) / f_ref
    print(f"largest per-step |loss difference| ours vs reference: {gap:.2e}; final relative difference "
          f"{rel:.2e} (margin 1e-2)")
    return 0 if rel <= 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
