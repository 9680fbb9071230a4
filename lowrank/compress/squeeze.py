"""LoRA-Squeeze: the exact truncated SVD of a LoRA update ΔW = B·A from its factors, never forming ΔW.

Shapes (PEFT's layout): A = ``lora_a`` ``[..., r, n]``, B = ``lora_b`` ``[..., m, r]``, ΔW = B·A
``[..., m, n]`` (m = out_features, n = in_features, r = r_src). Leading dimensions are a batch (many layers).

Exact path (``method="exact"``), O((m + n)·r²) time and O((m + n)·r) memory:

    B  = Q_B·R_B           Householder QR, Q_B [m, p_B], R_B [p_B, r], p_B = min(m, r)
    Aᵀ = Q_A·R_A           Q_A [n, p_A], R_A [p_A, r], p_A = min(n, r)
    ΔW = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ = Q_B·C·Q_Aᵀ,   C [p_B, p_A] the small core
    C  = U_c·diag(S)·V_cᵀ  thin SVD of the core; Q_B, Q_A have orthonormal columns, so S are the
                           p = min(m, n, r) singular values of ΔW
    U  = Q_B·U_c[:, :k],  Vh = (Q_A·V_c[:, :k])ᵀ     (only the k kept columns are ever formed)
    B' = U·diag(√S_k)  [m, k],   A' = diag(√S_k)·Vh  [k, n]

Q_B and Q_A stay implicit (``torch.geqrf`` reflectors, applied to the k kept columns by ``torch.ormqr``), which
skips forming them: 2.6× faster than ``torch.linalg.qr`` + GEMM at 4096×64, k = 16. B'·A' is the best rank-k
approximation of ΔW (Eckart–Young–Mirsky) up to rounding, with balanced factors (B'ᵀB' = A'A'ᵀ = diag(S_k)).
Signs are deterministic: the largest-|.| entry of each column of U is positive (the rule of
``lowrank.reference.rsvd.fix_signs`` and ``lowrank.linalg.rsvd``). The m×n product is never formed.

RSVD path (``method="rsvd"``): ``lowrank.linalg.rsvd`` on a ``FactoredOperator(B, A)`` (products B·(A·X)),
O((m + n)·r·l) per product with l = k + p; it pays only when r ≫ k (a very large source rank), and is
randomized (error ≤ ~1.02× optimal, see ``lowrank.linalg.rsvd``). ``method="auto"`` takes it only when a
cost model (``_auto_method``) says it is ≥ RSVD_MIN_SPEEDUP× faster (at 4096², k = 16: from r ≈ 1024); with
``energy=`` the whole spectrum is needed, so auto always runs the exact path.

Rank selection: ``rank=k`` or ``energy=e`` (the smallest k with Σ_{i≤k} σᵢ² ≥ e·Σ σᵢ²). For a batch, each
matrix has its own smallest rank (``SqueezeResult.ranks``); the returned factors have k = the largest of them,
so every matrix keeps at least its energy (slice ``[..., :ranks[i], :]`` for the minimal factors).

Model level: :func:`squeeze_model` squeezes every :class:`lowrank.nn.LoRALinear` (``rank`` / ``energy`` /
``budget``; a budget is a fraction of all LoRA parameters, allocated globally to the largest singular values
of the scaled updates s·ΔW). PEFT adapter directories: ``lowrank.compress.squeeze_peft``. Rank annealing
during training: ``lowrank.compress.anneal``. The plain dense specification is ``lowrank.reference.squeeze``.

Reference: I. Vulić, A. Grycner, Q. de Laroussilhe, J. Pfeiffer, "LoRA-Squeeze: Simple and Effective
Post-Tuning and In-Tuning Compression of LoRA Modules", arXiv:2602.10993, 2026 (the method: train at a high
rank, compress ΔW by a truncated (R)SVD to a lower rank, post hoc or annealed during tuning; its
memory-efficient variant avoids materializing ΔW). The QR-of-both-factors reduction of the SVD of a product
of thin factors is textbook numerical linear algebra.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from lowrank.linalg import FactoredOperator, rsvd
from lowrank.linalg.rsvd import _check_int, default_oversample
from lowrank.nn.lora_linear import LoRALinear
from lowrank.nn.peft import _alpha_for

__all__ = ["METHODS", "RSVD_MIN_SPEEDUP", "LayerSqueeze", "SqueezeReport", "SqueezeResult",
           "set_lora_factors", "squeeze_lora", "squeeze_model"]

METHODS = ("auto", "exact", "rsvd")
RSVD_MIN_SPEEDUP = 3.0  # auto takes the randomized path only when the cost model says it is this much faster


class SqueezeResult(NamedTuple):
    """Result of :func:`squeeze_lora`.

    Fields:
        lora_a: A' ``[..., k, n]`` = diag(√S)·Vh, in the input dtype (a new tensor).
        lora_b: B' ``[..., m, k]`` = U·diag(√S), in the input dtype (a new tensor).
        S: ``[..., k]`` kept singular values of ΔW = B·A, descending, in the compute dtype (fp32 for
            bf16/fp16 inputs, else the input dtype).
        S_src: ``[..., min(m, n, r)]`` every singular value of ΔW (exact path), None on the RSVD path.
        ranks: ``[...]`` int64, each matrix's own rank (k everywhere unless ``energy`` chose per-matrix
            ranks).
        method: "exact" or "rsvd", the path that ran.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    S: torch.Tensor
    S_src: torch.Tensor | None
    ranks: torch.Tensor
    method: str

    @property
    def rank(self) -> int:
        """k, the rank of the returned factors."""
        return self.lora_a.shape[-2]

    @property
    def retained_energy(self) -> torch.Tensor | None:
        """``[...]``: Σ_{i≤k} σᵢ² / Σ σᵢ² per matrix (1 where ΔW = 0); None on the RSVD path."""
        if self.S_src is None:
            return None
        return _retained(self.S, self.S_src)


# ---------------------------------------------------------------------------------------------- checks
def _check_rank(rank: object, name: str = "rank") -> int:
    return _check_int(name, rank, 1)


def _check_fraction(value: object, name: str) -> float:
    """A real number in (0, 1] (``energy``, ``budget``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in (0, 1], got {type(value).__name__} {value!r}")
    value = float(value)
    if not 0.0 < value <= 1.0:  # also refuses nan
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def _check_choice(rank, energy, budget=None, *, allow_budget: bool = False) -> None:
    given = [n for n, v in (("rank", rank), ("energy", energy), ("budget", budget)) if v is not None]
    options = "rank, energy or budget" if allow_budget else "rank or energy"
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise ValueError(f"give exactly one of {options}; got {what}")


def _compute_dtype(dtype: torch.dtype, name: str) -> torch.dtype:
    if dtype in (torch.float32, torch.float64):
        return dtype
    if dtype in (torch.bfloat16, torch.float16):
        return torch.float32  # LAPACK has no half-precision QR / SVD; the result is cast back
    raise TypeError(f"{name} must have a real floating dtype (float64, float32, bfloat16, float16), got "
                    f"{dtype}")


def _check_factors(lora_a: object, lora_b: object) -> tuple[int, int, int]:
    """Validate the pair; return (r, m, n)."""
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dimensions, got shape {tuple(t.shape)}")
        _compute_dtype(t.dtype, name)
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"lora_a and lora_b must share a dtype, got {lora_a.dtype} and {lora_b.dtype}")
    if lora_a.device != lora_b.device:
        raise ValueError(f"lora_a and lora_b must be on one device, got {lora_a.device} and {lora_b.device}")
    r, n = lora_a.shape[-2:]
    m, r_b = lora_b.shape[-2:]
    if r != r_b or lora_a.shape[:-2] != lora_b.shape[:-2]:
        raise ValueError(f"shape mismatch: lora_a {tuple(lora_a.shape)} must be [..., r, in] and lora_b "
                         f"{tuple(lora_b.shape)} [..., out, r] with the same r and batch dimensions")
    if min(r, m, n) < 1:
        raise ValueError(f"empty factors: lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        # one reduction instead of an element-wise mask (0.05 vs 0.9 ms at 4096×64): an inf or nan entry
        # makes the sum non-finite; only then is the exact mask computed (a finite overflowing sum passes)
        if not bool(torch.isfinite(t.detach().sum())) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains non-finite values (inf or nan)")
    return r, m, n


# ------------------------------------------------------------------------------------------- the core
@dataclass
class _Core:
    """Householder QR factors and the core SVD of ΔW = B·A (compute dtype).

    qr_b / tau_b: ``torch.geqrf`` of B (Q_B kept implicit as reflectors), rb = R_B [..., p_B, r]; likewise
    qr_a / tau_a / ra for Aᵀ; uc [..., p_B, p], s [..., p], vc [..., p_A, p] the SVD of R_B·R_Aᵀ, so that
    ΔW = (Q_B·uc)·diag(s)·(Q_A·vc)ᵀ.
    """

    qr_b: torch.Tensor
    tau_b: torch.Tensor
    rb: torch.Tensor
    qr_a: torch.Tensor
    tau_a: torch.Tensor
    ra: torch.Tensor
    uc: torch.Tensor
    s: torch.Tensor
    vc: torch.Tensor

    def __getitem__(self, i: int) -> _Core:
        return _Core(*(getattr(self, f)[i] for f in self.__dataclass_fields__))

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U [..., m, k], S_k, Vh [..., k, n], sign [..., 1, k]) with the deterministic sign rule applied
        (sign is what multiplied the columns of uc[..., :k] and vc[..., :k])."""
        u = _apply_q(self.qr_b, self.tau_b, self.uc[..., :k])
        idx = u.abs().argmax(dim=-2, keepdim=True)
        sign = torch.sign(torch.gather(u, -2, idx))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        vh = _apply_q(self.qr_a, self.tau_a, self.vc[..., :k] * sign).mT
        return u * sign, self.s[..., :k], vh, sign

    def lora(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A' = √S·Vh [..., k, n], B' = U·√S [..., m, k]) in the compute dtype."""
        u, s, vh, _ = self.factors(k)
        root = s.clamp_min(0).sqrt()
        return root.unsqueeze(-1) * vh, u * root.unsqueeze(-2)


def _apply_q(packed: torch.Tensor, tau: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Q·X for the implicit Q [..., m, p] of ``torch.geqrf`` and X [..., p, k] -> [..., m, k].

    ``ormqr`` applies the p Householder reflectors to [X; 0] (4·m·p·k flops) instead of forming Q
    (``orgqr``, ~2·m·p² more): measured 2.6x faster than ``torch.linalg.qr`` + GEMM at 4096×64, k = 16.
    """
    m, p = packed.shape[-2], x.shape[-2]
    padded = x.new_zeros(*x.shape[:-2], m, x.shape[-1])
    padded[..., :p, :] = x
    return torch.ormqr(packed, tau, padded)


def _qr_r(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed reflectors, tau, R [..., min(m, r), r]) of T [..., m, r] by ``torch.geqrf``."""
    packed, tau = torch.geqrf(t)
    p = min(t.shape[-2], t.shape[-1])
    return packed, tau, packed[..., :p, :].triu()


def _core(a: torch.Tensor, b: torch.Tensor) -> _Core:
    """QR of B and of Aᵀ, then the SVD of the small core R_B·R_Aᵀ (module docstring)."""
    qr_b, tau_b, rb = _qr_r(b)
    qr_a, tau_a, ra = _qr_r(a.mT)
    uc, s, vch = torch.linalg.svd(rb @ ra.mT, full_matrices=False)
    return _Core(qr_b, tau_b, rb, qr_a, tau_a, ra, uc, s, vch.mT)


def _retained(s_kept: torch.Tensor, s_all: torch.Tensor) -> torch.Tensor:
    kept = s_kept.double().square().sum(-1)
    total = s_all.double().square().sum(-1)
    return torch.where(total > 0, kept / torch.where(total > 0, total, 1.0), torch.ones_like(total))


def _energy_ranks(s: torch.Tensor, energy: float) -> torch.Tensor:
    """``[...]`` smallest k with Σ_{i≤k} σᵢ² ≥ energy·Σ σᵢ² (1 where ΔW = 0); s ``[..., p]`` descending."""
    cum = s.double().square().cumsum(-1)
    total = cum[..., -1:]
    frac = torch.where(total > 0, cum / torch.where(total > 0, total, 1.0), torch.ones_like(cum))
    return ((frac < energy).sum(-1) + 1).clamp_max(s.shape[-1])


def _auto_method(m: int, n: int, r: int, k: int) -> str:
    """Cost model in GEMM-flop units, fitted to fp32 timings on this project's CPU (1 thread, m = 4096,
    n = 4096 / 11008, r = 128–1024, k = 16 / 64):

        exact       ≈ (m + n)·r² + 10·r³                      geqrf of both factors + the r×r core SVD
        randomized  ≈ 23·(m + n)·r·l + 160·max(m, n)·l²       six skinny products with B·A + panel QRs

    (the skinny products and small QRs run far below GEMM speed, hence the weights). Measured there: the
    randomized path is 0.5× (r = 128), 0.9× (256), 1.8× (512) and 3.6× (1024) as fast as the exact one at
    4096², k = 16, and never faster at k = 64 below r = 512.
    """
    l = min(k + default_oversample(k), m, n)
    exact = float(m + n) * r * r + 10.0 * r ** 3
    randomized = 23.0 * (m + n) * r * l + 160.0 * max(m, n) * l * l
    return "rsvd" if l < r and exact >= RSVD_MIN_SPEEDUP * randomized else "exact"


# ----------------------------------------------------------------------------------------- squeeze_lora
def squeeze_lora(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int | None = None, *,
                 energy: float | None = None, method: str = "auto",
                 generator: torch.Generator | None = None) -> SqueezeResult:
    """Rank-k LoRA factors of the truncated SVD of ΔW = B·A, computed from the factors (module docstring).

    Args:
        lora_a: A ``[..., r, in]`` (PEFT ``lora_A.weight``), fp64 / fp32 / bf16 / fp16.
        lora_b: B ``[..., out, r]`` (PEFT ``lora_B.weight``), same dtype, device and batch dimensions.
        rank: target rank k, 1 ≤ k ≤ min(r, out, in). Exactly one of ``rank`` / ``energy``.
        energy: e in (0, 1]: per matrix the smallest k keeping ≥ e of Σσ² (for a batch the factors have the
            largest such k; ``result.ranks`` holds each matrix's own).
        method: "auto" (exact unless the randomized path is ≥ RSVD_MIN_SPEEDUP× faster), "exact" or "rsvd".
        generator: torch.Generator for the RSVD test matrix (reproducible randomized results).

    Returns:
        :class:`SqueezeResult` (lora_a ``[..., k, in]``, lora_b ``[..., out, k]``, S, S_src, ranks, method).
        The inputs are not modified; the factors are new tensors in the input dtype (bf16/fp16 are computed in
        fp32); the scaling (alpha / r) is not applied: B'·A' ≈ B·A.

    Raises:
        TypeError: non-tensor factors, unsupported or mixed dtypes, non-integer rank, non-numeric energy.
        ValueError: shape mismatch, non-finite entries, rank outside [1, min(r, out, in)], energy outside
            (0, 1], both or neither of rank / energy, energy with method="rsvd", unknown method.
    """
    _check_choice(rank, energy)
    r, m, n = _check_factors(lora_a, lora_b)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    p = min(r, m, n)
    if rank is not None:
        rank = _check_rank(rank)
        if rank > p:
            raise ValueError(f"rank must be <= min(r_src, out, in) = min({r}, {m}, {n}) = {p}, got {rank}")
    else:
        energy = _check_fraction(energy, "energy")
        if method == "rsvd":
            raise ValueError("energy needs the whole spectrum of ΔW, which the randomized path does not "
                             "compute: use method='exact' or 'auto', or give rank")
    in_dtype = lora_a.dtype
    cdtype = _compute_dtype(in_dtype, "lora_a")
    batch = lora_a.shape[:-2]
    with torch.no_grad():
        a, b = lora_a.detach().to(cdtype), lora_b.detach().to(cdtype)
        if method == "auto":
            method = "exact" if rank is None else _auto_method(m, n, r, rank)
        if method == "rsvd":
            u, s, vh = rsvd(FactoredOperator(b, a), rank, method="randomized", generator=generator)[:3]
            root = s.clamp_min(0).sqrt()
            new_a, new_b = root.unsqueeze(-1) * vh, u * root.unsqueeze(-2)
            return SqueezeResult(new_a.to(in_dtype).contiguous(), new_b.to(in_dtype).contiguous(), s, None,
                                 torch.full(batch, rank, dtype=torch.int64), "rsvd")
        core = _core(a, b)
        if rank is None:
            ranks = _energy_ranks(core.s, energy).cpu()
            rank = int(ranks.max()) if ranks.numel() else 1
        else:
            ranks = torch.full(batch, rank, dtype=torch.int64)
        new_a, new_b = core.lora(rank)
        return SqueezeResult(new_a.to(in_dtype).contiguous(), new_b.to(in_dtype).contiguous(),
                             core.s[..., :rank].clone(), core.s, ranks, "exact")


# ----------------------------------------------------------------------------- many layers, one budget
def _spectra(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[_Core]:
    """The :class:`_Core` of every (A, B) pair, batched over pairs of equal shape / dtype / device."""
    groups: dict[tuple, list[int]] = {}
    for i, (a, b) in enumerate(pairs):
        groups.setdefault((tuple(a.shape), tuple(b.shape), a.dtype, a.device), []).append(i)
    cores: list[_Core | None] = [None] * len(pairs)
    with torch.no_grad():
        for (_, _, dtype, _), idx in groups.items():
            cdtype = _compute_dtype(dtype, "lora_a")
            a = torch.stack([pairs[i][0].detach() for i in idx]).to(cdtype)
            b = torch.stack([pairs[i][1].detach() for i in idx]).to(cdtype)
            c = _core(a, b)
            for j, i in enumerate(idx):
                cores[i] = c[j]
    return cores


def _allocate(cores: list[_Core], scalings: list[float], sizes: list[int], rank: int | None,
              energy: float | None, budget: float | None, r_src: list[int]) -> list[int]:
    """Per-layer ranks for ``rank`` (capped at min(r, out, in)), ``energy`` (per layer) or ``budget``.

    Budget: every layer keeps ≥ 1 triplet; the rest of ``budget·Σ r_l·(m_l + n_l)`` parameters goes to the
    triplets with the largest |s_l|·σ_{l,i} over all layers (each costs m_l + n_l parameters), skipping one that
    no longer fits. Per layer the values are descending, so each layer keeps a prefix of its spectrum.
    """
    caps = [c.s.shape[-1] for c in cores]
    if rank is not None:
        return [min(rank, cap) for cap in caps]
    if energy is not None:
        return [int(_energy_ranks(c.s, energy)) for c in cores]
    allowed = budget * sum(r * size for r, size in zip(r_src, sizes))
    used = float(sum(sizes))
    if used > allowed:
        total = sum(r * size for r, size in zip(r_src, sizes))
        raise ValueError(f"budget={budget} allows {int(allowed)} LoRA parameters, but keeping rank 1 in each "
                         f"of the {len(cores)} layers needs {int(used)}: budget must be >= "
                         f"{used / total:.4g}")
    ranks = [1] * len(cores)
    candidates = sorted(((-abs(s_l) * float(sig), layer, i)
                         for layer, (c, s_l) in enumerate(zip(cores, scalings))
                         for i, sig in enumerate(c.s.double().tolist()) if i > 0), key=lambda t: t[:3])
    for _, layer, _ in candidates:
        if used + sizes[layer] <= allowed:
            used += sizes[layer]
            ranks[layer] += 1
    return ranks


@dataclass(frozen=True)
class LayerSqueeze:
    """One layer of a :class:`SqueezeReport`: ranks, sizes and the kept fraction of ‖ΔW‖_F²."""

    name: str
    out_features: int
    in_features: int
    old_rank: int
    new_rank: int
    retained_energy: float
    scaling: float

    @property
    def params_before(self) -> int:
        return self.old_rank * (self.out_features + self.in_features)

    @property
    def params_after(self) -> int:
        return self.new_rank * (self.out_features + self.in_features)


@dataclass(frozen=True)
class SqueezeReport:
    """What :func:`squeeze_model` / ``squeeze_peft_adapter`` did, layer by layer.

    ``retained_energy`` (total) = Σ_l s_l²·Σ_{i≤k_l} σ_{l,i}² / Σ_l s_l²·‖ΔW_l‖_F²: the kept fraction of the
    squared Frobenius norm of all scaled updates together.
    """

    layers: tuple[LayerSqueeze, ...]
    energy_kept: float
    energy_total: float

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def retained_energy(self) -> float:
        return self.energy_kept / self.energy_total if self.energy_total > 0 else 1.0

    @property
    def ranks(self) -> dict[str, int]:
        return {layer.name: layer.new_rank for layer in self.layers}

    def __str__(self) -> str:
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        lines = [f"{'layer':<{width}}  {'shape':>11}  {'rank':>9}  {'params':>17}  energy"]
        for layer in self.layers:
            shape = f"{layer.out_features}x{layer.in_features}"
            lines.append(f"{layer.name:<{width}}  {shape:>11}  {layer.old_rank:>4}→{layer.new_rank:<4}  "
                         f"{layer.params_before:>8}→{layer.params_after:<8}  {layer.retained_energy:.6f}")
        frac = self.params_after / self.params_before if self.params_before else 1.0
        lines.append(f"total: {self.params_before} → {self.params_after} LoRA parameters ({frac:.3f}), "
                     f"retained energy {self.retained_energy:.6f}")
        return "\n".join(lines)


def _report(names: list[str], cores: list[_Core], scalings: list[float], shapes: list[tuple[int, int]],
            r_src: list[int], ranks: list[int]) -> SqueezeReport:
    layers, kept_all, total_all = [], 0.0, 0.0
    for name, c, s_l, (m, n), r, k in zip(names, cores, scalings, shapes, r_src, ranks):
        sq = c.s.double().square()
        kept, total = float(sq[:k].sum()), float(sq.sum())
        kept_all += s_l * s_l * kept
        total_all += s_l * s_l * total
        layers.append(LayerSqueeze(name, m, n, r, k, kept / total if total > 0 else 1.0, s_l))
    return SqueezeReport(tuple(layers), kept_all, total_all)


def squeeze_model(model: nn.Module, rank: int | None = None, *, energy: float | None = None,
                  budget: float | None = None) -> SqueezeReport:
    """Squeeze every :class:`lowrank.nn.LoRALinear` of ``model`` in place, by the exact factored SVD.

    Exactly one of:
        rank: every layer gets min(rank, r, out, in);
        energy: e in (0, 1], per layer the smallest rank keeping ≥ e of ‖ΔW‖_F²;
        budget: b in (0, 1], keep ≤ b·(all LoRA parameters Σ r·(out + in)); rank is allocated globally to the
            largest singular values of the scaled updates s·ΔW (s = alpha / r), at least 1 per layer.

    How the model changes (in place, by replacement): each squeezed LoRALinear stays the same module object
    (hooks and references stay valid), but gets *new* ``lora_a`` [k, in] / ``lora_b`` [out, k] Parameters
    (same ``requires_grad``; the old Parameter tensors are left untouched, so an optimizer built before the call
    still holds the old ones: rebuild it, or use ``lowrank.compress.RankAnnealer`` which swaps them), ``r = k``
    and ``alpha`` set so that ``scaling = alpha / r`` is unchanged. The layer then computes
    W·x + b + s·B'·A'·x with B'·A' the best rank-k approximation of B·A. A layer whose new rank equals its rank
    is left entirely unchanged. Base weights are never touched. Layers of one shape are decomposed as a batch.

    Returns:
        :class:`SqueezeReport`, per layer: name, shape, old / new rank, retained energy.

    Raises:
        ValueError: no LoRALinear in ``model``; not exactly one of rank / energy / budget; a budget below one
            rank per layer; non-finite factors. TypeError / ValueError for ill-typed rank, energy, budget.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_choice(rank, energy, budget, allow_budget=True)
    if rank is not None:
        rank = _check_rank(rank)
    if energy is not None:
        energy = _check_fraction(energy, "energy")
    if budget is not None:
        budget = _check_fraction(budget, "budget")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"squeeze_model: {type(model).__name__} has no lowrank.nn.LoRALinear layers")
    for name, m in layers:
        try:
            _check_factors(m.lora_a, m.lora_b)
        except (TypeError, ValueError) as e:
            raise type(e)(f"squeeze_model: layer {name!r}: {e}") from None
    cores = _spectra([(m.lora_a, m.lora_b) for _, m in layers])
    scalings = [float(m.scaling) for _, m in layers]
    sizes = [m.in_features + m.out_features for _, m in layers]
    r_src = [m.r for _, m in layers]
    ranks = _allocate(cores, scalings, sizes, rank, energy, budget, r_src)
    for (_, m), c, k in zip(layers, cores, ranks):
        if k != m.r:
            new_a, new_b = c.lora(k)
            set_lora_factors(m, new_a, new_b)
    shapes = [(m.out_features, m.in_features) for _, m in layers]
    return _report([n for n, _ in layers], cores, scalings, shapes, r_src, ranks)


def set_lora_factors(module: LoRALinear, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """Give ``module`` new Parameters ``lora_a`` [k, in] / ``lora_b`` [out, k] (cast to its dtype), ``r = k``
    and an alpha that keeps ``scaling`` exactly (``lowrank.nn.peft._alpha_for``)."""
    scaling = module.scaling
    k = lora_a.shape[0]
    dtype = module.lora_a.dtype
    grad_a, grad_b = module.lora_a.requires_grad, module.lora_b.requires_grad
    module.lora_a = nn.Parameter(lora_a.detach().to(dtype).contiguous(), requires_grad=grad_a)
    module.lora_b = nn.Parameter(lora_b.detach().to(dtype).contiguous(), requires_grad=grad_b)
    module.r = k
    module.alpha = _alpha_for(scaling, k)
