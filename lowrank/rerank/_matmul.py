"""The ``matmul=`` option of the rerankers: how a float32 model's Linear layers multiply."""
from __future__ import annotations

import torch

MATMULS = ("fp32", "bf16x3", "onednn")


def apply_matmul(model: torch.nn.Module, matmul: str) -> None:
    """``"fp32"``: leave the model as loaded (bit-identical to transformers). ``"bf16x3"``: every float32
    ``nn.Linear`` becomes a :class:`lowrank.nn.Bf16x3Linear` (three bf16 products on AMX tiles: ~2× faster on such
    CPUs, outputs within ~1e-5 relative of fp32). ``"onednn"``: every float32 ``nn.Linear`` becomes a
    :class:`lowrank.nn.OneDnnLinear` (fp32 on oneDNN's GEMM instead of MKL's: 0.68–0.77× the time on an AMD EPYC
    Zen 4, sums within a few fp32 ulps). Raises before changing anything when that cannot run here."""
    if matmul not in MATMULS:
        raise ValueError(f"matmul must be one of {MATMULS}, got {matmul!r}")
    if matmul == "fp32":
        return
    if not _float32(model):
        dtypes = sorted(str(d) for d in {p.dtype for p in model.parameters()})
        raise ValueError(f"matmul={matmul!r} computes float32 Linear layers; this model's parameters are "
                         f"{dtypes} (load it with dtype=torch.float32)")
    if matmul == "onednn":
        from lowrank.nn import use_onednn

        use_onednn(model)
        return
    from lowrank.nn import use_bf16x3

    use_bf16x3(model)


def auto_matmul(model: torch.nn.Module) -> str:
    """What ``lowrank rerank --matmul auto`` picks: "bf16x3" where the CPU kernel runs (a float32 model on the CPU,
    which has AMX tiles), else "fp32". ("onednn" is only chosen by name: it was measured faster on AMD CPUs, and
    on Intel's MKL is the faster fp32 GEMM.)"""
    from lowrank.ops._backends import cpu_isa

    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return "bf16x3" if on_cpu and _float32(model) and cpu_isa() == "amx" else "fp32"


def _float32(model: torch.nn.Module) -> bool:
    return {p.dtype for p in model.parameters()} == {torch.float32}


def matmul_of(model: torch.nn.Module) -> str:
    """"bf16x3" / "onednn" if any layer of ``model`` is a Bf16x3Linear / OneDnnLinear, else "fp32" (part of the
    embedding-cache key)."""
    from lowrank.nn import Bf16x3Linear, OneDnnLinear

    mods = list(model.modules())
    if any(isinstance(m, Bf16x3Linear) for m in mods):
        return "bf16x3"
    return "onednn" if any(isinstance(m, OneDnnLinear) for m in mods) else "fp32"
