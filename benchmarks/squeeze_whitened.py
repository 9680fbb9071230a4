"""Activation-aware squeeze of a trained LoRA adapter: does truncating in the layer's input metric keep more of a
fine-tuned reranker's gain than the plain truncated SVD of s·B·A?  (Issue 7, acceptance 2; an experiment.)

For each LoRA layer, with C = XᵀX/N the Gram of its inputs over calibration texts (SciFact *train* queries and
one positive document each, never the test queries), the output error of a replacement ΔW' is
‖(ΔW − ΔW')·L‖_F with C = L·Lᵀ. The best rank-k ΔW' is the truncated SVD of ΔW·L mapped back by L⁻¹ (SVD-LLM's
whitening, applied to the adapter alone): with B = Q_b·R_b and (A·L)ᵀ = Q_m·R_m, the SVD of the r×r core
s·R_b·R_mᵀ = U·Σ·Vᵀ gives B' = Q_b·U_k·Σ_k and A' = (L⁻ᵀ·Q_m·V_k)ᵀ (scaling 1: alpha = k). Written as a PEFT
adapter directory that ``lowrank rerank --lora`` loads.

    HF_HUB_OFFLINE=1 python benchmarks/squeeze_whitened.py RUN/adapter 16 OUT/adapter [--texts 512]
    HF_HUB_OFFLINE=1 lowrank rerank --data ../shared/data/scifact --reranker embed --lora OUT/adapter --json
"""
from __future__ import annotations

import argparse
import json
import os
import random

import torch


def main() -> None:
    from safetensors.torch import load_file, save_file

    from lowrank.compress.calibrate import collect_statistics, make_batches
    from lowrank.nn.lora_linear import LoRALinear
    from lowrank.rerank import Encoder
    from lowrank.rerank.cli import apply_lora_adapter
    from lowrank.rerank.train_data import load_training_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter", help="the trained PEFT adapter directory (r = 64 in issue 7)")
    ap.add_argument("rank", type=int)
    ap.add_argument("out", help="output PEFT adapter directory")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                    "scifact"))
    ap.add_argument("--texts", type=int, default=512, help="calibration texts (train queries + positives)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    enc = Encoder(None)
    model = enc.model
    apply_lora_adapter(model, args.adapter)
    ds = load_training_data(args.data).dataset
    qids = sorted(ds.qrels)
    random.Random(0).shuffle(qids)
    texts: list[str] = []
    for q in qids:
        doc = ds.corpus[next(iter(ds.qrels[q]))]
        texts += [ds.queries[q], f"{doc.title} {doc.text}".strip()]
        if len(texts) >= args.texts:
            break
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    stats = collect_statistics(model, layers, make_batches(texts, enc.tokenizer, batch_size=32, max_length=256))

    state = load_file(os.path.join(args.adapter, "adapter_model.safetensors"))
    with open(os.path.join(args.adapter, "adapter_config.json")) as f:
        cfg = json.load(f)
    k, new, kept_w, kept_plain = args.rank, {}, [], []
    for name, m in layers.items():
        a, b, s = m.lora_a.detach().double(), m.lora_b.detach().double(), float(m.scaling)
        c = stats[name].gram.double()
        c = c + 1e-6 * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)   # damping: rank-deficient C
        lo = torch.linalg.cholesky(c)
        qb, rb = torch.linalg.qr(b)
        qm, rm = torch.linalg.qr((a @ lo).T)
        u, sv, vh = torch.linalg.svd(s * rb @ rm.T)
        kept_w.append(float((sv[:k] ** 2).sum() / (sv ** 2).sum()))
        sp = torch.linalg.svdvals(s * rb @ torch.linalg.qr(a.T)[1].T)
        kept_plain.append(float((sp[:k] ** 2).sum() / (sp ** 2).sum()))
        a2 = torch.linalg.solve_triangular(lo.T, qm @ vh[:k].T, upper=True).T
        b2 = qb @ u[:, :k] * sv[:k]
        key = next(kk for kk in state if kk.endswith(f"{name}.lora_A.weight"))
        new[key] = a2.to(state[key].dtype).contiguous()
        new[key.replace("lora_A", "lora_B")] = b2.to(state[key].dtype).contiguous()
    os.makedirs(args.out, exist_ok=True)
    cfg.update(r=k, lora_alpha=k)
    with open(os.path.join(args.out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(new, os.path.join(args.out, "adapter_model.safetensors"))
    n = len(kept_w)
    print(f"{n} layers, {stats[next(iter(stats))].count} calibration tokens; mean retained energy at r={k}: "
          f"{sum(kept_w) / n:.3f} in the input metric (plain SVD of s·B·A: {sum(kept_plain) / n:.3f})")


if __name__ == "__main__":
    main()
