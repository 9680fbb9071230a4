"""In-tuning LoRA-Squeeze: lower the rank of LoRALinear layers on a schedule while training.

A training loop calls ``annealer.step(step)`` once per step (after ``optimizer.step()``). When the scheduled
rank k(step) drops below a layer's rank r, the layer is re-factored through the exact squeeze
(``lowrank.compress.squeeze``): with A [r, n], B [m, r], QR factors B = Q_B·R_B, Aᵀ = Q_A·R_A and the core SVD
R_B·R_Aᵀ = U_c·diag(S)·V_cᵀ (signs fixed),

    B' = B·T_B,   T_B = R_Aᵀ·V_c,k·S_k^(-1/2)   [r, k]        (= U_k·√S_k)
    A' = T_A·A,   T_A = S_k^(-1/2)·U_c,kᵀ·R_B   [k, r]        (= √S_k·Vh_k)

so B'·A' is the best rank-k approximation of B·A (and T_A·T_B = I_k). The scaling s = alpha / r of the layer is
kept (alpha is set to s·k). The layer gets new ``lora_a`` / ``lora_b`` Parameters; the swaps (old → new) are
returned and, when an optimizer is given, applied to its param groups and state.

Optimizer moments (``project_moments=True``). A first moment is a running average of gradients, and gradients
transform contravariantly to the parameters: for any loss gradient G = ∂L/∂(s·ΔW),

    ∂L/∂B' = s·G·A'ᵀ = (∂L/∂B)·T_Aᵀ,       ∂L/∂A' = s·B'ᵀ·G = T_Bᵀ·(∂L/∂A)

exactly (A' = T_A·A and B' = B·T_B). So ``exp_avg`` (and SGD's ``momentum_buffer``, RMSprop's ``grad_avg``)
become m_B·T_Aᵀ and T_Bᵀ·m_A: the average of the past gradients re-expressed for the new factors, exact when those
gradients were taken at the current factors (otherwise the usual first-order approximation). A second moment
holds E[g²] per coordinate; the projected gradient g' = g·M has E[g'²] = Σ_j E[g_j²]·M_j² when the coordinates
are uncorrelated, so ``exp_avg_sq`` / ``max_exp_avg_sq`` (Adagrad's ``sum``, RMSprop's ``square_avg``,
Adadelta's ``acc_delta``) become v_B·(T_Aᵀ)^∘2 and (T_Bᵀ)^∘2·v_A (∘2: element-wise square). This is the
diagonal (independent-coordinate) approximation: non-negative by construction (no clamping needed), and exact
whenever T is a signed truncation of the identity, which is what every squeeze after the first produces (the
factors are then balanced, U·√S / √S·Vh, and a lower rank keeps their leading columns / rows); the first
squeeze of unbalanced factors is where it approximates. Adam's ``step`` count is kept (its bias correction
continues). An optimizer state entry of parameter shape that is not listed above raises
(never projected by guess); ``project_moments=False`` instead drops the state of the swapped parameters, so the
optimizer re-initializes it (Adam restarts its bias correction for them).

Singular values below max(m, n, r)·ε·σ₁ get S^(-1/2) := 0 in the maps (their moments restart at zero). If ΔW is
numerically zero (B still at its zero init), the balanced split would zero both factors and freeze the layer for
good, so the larger factor is truncated to its top-k singular directions instead (T_A = T_Bᵀ = the leading k
left singular vectors of A, or right singular vectors of B): the layer then keeps training at rank k.
A tiny but non-zero ΔW (annealing right after B's zero init) is split as usual, which puts both factors near
the B·A = 0 saddle of the bilinear parametrization: start the schedule once the update has grown.

References: I. Vulić et al., "LoRA-Squeeze", arXiv:2602.10993, 2026 (In-Squeeze: gradual rank annealing during
tuning); D. P. Kingma, J. Ba, "Adam", ICLR 2015 (the moments projected here).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import torch
from torch import nn

from lowrank.compress.squeeze import _check_rank, _compute_dtype, _core, set_lora_factors
from lowrank.nn.lora_linear import LoRALinear

__all__ = ["LINEAR_STATE", "SQUARE_STATE", "ParamSwap", "RankAnnealer", "cosine_schedule", "linear_schedule",
           "step_schedule"]

LINEAR_STATE = ("exp_avg", "momentum_buffer", "grad_avg")
SQUARE_STATE = ("exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg", "acc_delta")


# ------------------------------------------------------------------------------------------- schedules
def _check_schedule_args(r_src: int, r_tgt: int, start: int, end: int) -> None:
    r_src, r_tgt = _check_rank(r_src, "r_src"), _check_rank(r_tgt, "r_tgt")
    if r_tgt > r_src:
        raise ValueError(f"r_tgt must be <= r_src, got r_tgt={r_tgt}, r_src={r_src}")
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    if end <= start:
        raise ValueError(f"end must be > start, got start={start}, end={end}")


def linear_schedule(r_src: int, r_tgt: int, start: int, end: int) -> Callable[[int], int]:
    """k(step) = r_src until ``start``, then ⌈r_src + (r_tgt − r_src)·(step − start)/(end − start)⌉, r_tgt from
    ``end`` on (the ceiling makes the rank reach r_tgt exactly at ``end``)."""
    _check_schedule_args(r_src, r_tgt, start, end)

    def schedule(step: int) -> int:
        t = min(max((step - start) / (end - start), 0.0), 1.0)
        return math.ceil(r_src + (r_tgt - r_src) * t - 1e-9)
    return schedule


def cosine_schedule(r_src: int, r_tgt: int, start: int, end: int) -> Callable[[int], int]:
    """k(step) = ⌈r_tgt + (r_src − r_tgt)·(1 + cos(π·t))/2⌉ with t = (step − start)/(end − start) clipped to
    [0, 1]: slow at both ends, fastest in the middle."""
    _check_schedule_args(r_src, r_tgt, start, end)

    def schedule(step: int) -> int:
        t = min(max((step - start) / (end - start), 0.0), 1.0)
        return math.ceil(r_tgt + (r_src - r_tgt) * 0.5 * (1.0 + math.cos(math.pi * t)) - 1e-9)
    return schedule


def step_schedule(milestones: Mapping[int, int]) -> Callable[[int], int | None]:
    """Piecewise constant: k(step) = the rank of the last milestone ≤ step (None = no change before the first).

    ``milestones`` maps steps to ranks, e.g. ``{100: 32, 200: 16, 300: 8}``.
    """
    if not isinstance(milestones, Mapping) or not milestones:
        raise ValueError(f"milestones must be a non-empty mapping step -> rank, got {milestones!r}")
    points = sorted((int(s), _check_rank(r, f"milestones[{s}]")) for s, r in milestones.items())

    def schedule(step: int) -> int | None:
        rank = None
        for s, r in points:
            if step >= s:
                rank = r
        return rank
    return schedule


# ------------------------------------------------------------------------------------------- the maps
def _maps(a: torch.Tensor, b: torch.Tensor, k: int):
    """(A' [k, n], B' [m, k], T_A [k, r], T_B [r, k]) in the compute dtype (module docstring)."""
    core = _core(a, b)
    m, n, r = b.shape[0], a.shape[1], a.shape[0]
    s = core.s
    eps = torch.finfo(s.dtype).eps
    sigma1 = float(s[0])
    scale = float(torch.linalg.matrix_norm(core.ra)) * float(torch.linalg.matrix_norm(core.rb))
    if sigma1 <= max(m, n, r) * eps * scale:  # ΔW numerically zero: truncate the larger factor instead
        if not bool(a.any()) and not bool(b.any()):
            t_b = torch.eye(r, k, dtype=a.dtype, device=a.device)
        elif float(torch.linalg.matrix_norm(a)) >= float(torch.linalg.matrix_norm(b)):
            t_b = torch.linalg.svd(core.ra.mT, full_matrices=False)[0][:, :k]   # A = R_Aᵀ·Q_Aᵀ: left vectors
        else:
            t_b = torch.linalg.svd(core.rb, full_matrices=False)[2][:k].mT       # B = Q_B·R_B: right vectors
        t_a = t_b.mT
        return t_a @ a, b @ t_b, t_a, t_b
    u, s_k, vh, sign = core.factors(k)
    root = s_k.clamp_min(0).sqrt()
    inv_root = torch.where(s_k > max(m, n, r) * eps * sigma1, s_k.rsqrt(), torch.zeros_like(s_k))
    uc, vc = core.uc[:, :k] * sign, core.vc[:, :k] * sign   # the signs U and Vh were given
    t_b = core.ra.mT @ vc * inv_root                      # [r, k]
    t_a = inv_root.unsqueeze(-1) * (uc.mT @ core.rb)      # [k, r]
    return root.unsqueeze(-1) * vh, u * root, t_a, t_b


def _pname(layer: str, attr: str) -> str:
    return f"{layer}.{attr}" if layer else attr


class ParamSwap(NamedTuple):
    """One parameter replaced by :meth:`RankAnnealer.step`: ``name`` is "<layer>.lora_a" / "<layer>.lora_b"."""

    name: str
    old: nn.Parameter
    new: nn.Parameter


# ----------------------------------------------------------------------------------------- the annealer
class RankAnnealer:
    """Anneal the rank of LoRALinear layers during training (module docstring for the math).

    Args:
        model_or_modules: an ``nn.Module`` (all its :class:`lowrank.nn.LoRALinear` layers), a mapping
            name → LoRALinear, or an iterable of LoRALinear (named "0", "1", ...).
        target_rank: the final rank r_tgt ≥ 1; the schedule is clipped below at it.
        schedule: ``step -> rank`` (int or float, rounded up; None = no change), e.g. :func:`linear_schedule`,
            :func:`cosine_schedule`, :func:`step_schedule` or any callable. Each layer gets
            min(its rank, max(target_rank, schedule(step))); ranks only go down.
        optimizer: a ``torch.optim.Optimizer`` holding the LoRA parameters: the swaps are applied to its param
            groups (same position) and state. Without one, use the returned :class:`ParamSwap` list yourself.
        project_moments: project the optimizer state through the change of basis (module docstring) instead of
            dropping it.

    Call :meth:`step` after ``optimizer.step()`` (the new Parameters carry no ``.grad``). The layers keep their
    module identity; ``lora_a`` / ``lora_b`` become new Parameters, ``r`` / ``alpha`` are updated with the
    scaling kept. ``ranks`` gives the current rank per layer, ``history`` the (step, layer, old, new) changes.
    Wrappers that keep their own references to the parameters (DDP buckets, FSDP flat parameters, gradient
    clippers or EMA copies built from a parameter list) must be refreshed from the returned swaps; a
    ``torch.compile``'d model recompiles for the new shapes.
    """

    def __init__(self, model_or_modules: nn.Module | Mapping[str, LoRALinear] | Iterable[LoRALinear],
                 target_rank: int, schedule: Callable[[int], float | int | None], *,
                 optimizer: torch.optim.Optimizer | None = None, project_moments: bool = True) -> None:
        if isinstance(model_or_modules, LoRALinear):
            layers = [("", model_or_modules)]
        elif isinstance(model_or_modules, nn.Module):
            layers = [(n, m) for n, m in model_or_modules.named_modules() if isinstance(m, LoRALinear)]
        elif isinstance(model_or_modules, Mapping):
            layers = list(model_or_modules.items())
        elif isinstance(model_or_modules, Iterable):
            layers = [(str(i), m) for i, m in enumerate(model_or_modules)]
        else:
            raise TypeError(f"model_or_modules must be an nn.Module, a mapping or an iterable of LoRALinear, "
                            f"got {type(model_or_modules).__name__}")
        if not layers:
            raise ValueError("model_or_modules holds no lowrank.nn.LoRALinear layers")
        for name, m in layers:
            if not isinstance(m, LoRALinear):
                raise TypeError(f"model_or_modules: {name!r} is a {type(m).__name__}, not a LoRALinear")
        if not callable(schedule):
            raise TypeError(f"schedule must be a callable step -> rank, got {type(schedule).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got "
                            f"{type(optimizer).__name__}")
        self.layers: list[tuple[str, LoRALinear]] = layers
        self.target_rank = _check_rank(target_rank, "target_rank")
        self.schedule = schedule
        self.optimizer = optimizer
        self.project_moments = bool(project_moments)
        self.history: list[tuple[int, str, int, int]] = []

    @property
    def ranks(self) -> dict[str, int]:
        return {name: m.r for name, m in self.layers}

    def rank_at(self, step: int) -> int | None:
        """max(target_rank, ⌈schedule(step)⌉), or None when the schedule returns None."""
        value = self.schedule(step)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TypeError(f"schedule({step}) must return a finite number or None, got {value!r}")
        return max(self.target_rank, math.ceil(value))

    def step(self, step: int) -> list[ParamSwap]:
        """Re-factor every layer whose scheduled rank is below its rank; return (and apply) the swaps."""
        target = self.rank_at(step)
        if target is None:
            return []
        plans = []
        with torch.no_grad():
            for name, m in self.layers:
                k = min(target, m.r, m.in_features, m.out_features)
                if k >= m.r:
                    continue
                cdtype = _compute_dtype(m.lora_a.dtype, f"{name}.lora_a")
                a, b = m.lora_a.detach().to(cdtype), m.lora_b.detach().to(cdtype)
                plans.append((name, m, k, _maps(a, b, k)))
            if self.optimizer is not None:
                for name, m, _, _ in plans:   # refuse before changing anything
                    for attr in ("lora_a", "lora_b"):
                        self._check_state(_pname(name, attr), getattr(m, attr))
            swaps: list[ParamSwap] = []
            for name, m, k, (new_a, new_b, t_a, t_b) in plans:
                old_a, old_b, old_r = m.lora_a, m.lora_b, m.r
                set_lora_factors(m, new_a, new_b)
                swaps += [ParamSwap(_pname(name, "lora_a"), old_a, m.lora_a),
                          ParamSwap(_pname(name, "lora_b"), old_b, m.lora_b)]
                if self.optimizer is not None:
                    # m_A' = T_Bᵀ·m_A (left map on [r, n]);  m_B' = m_B·T_Aᵀ (right map on [m, r])
                    self._swap(old_a, m.lora_a, t_b.mT, left=True)
                    self._swap(old_b, m.lora_b, t_a.mT, left=False)
                self.history.append((step, name, old_r, k))
        return swaps

    # ---- optimizer surgery -----------------------------------------------------------------------------
    def _check_state(self, name: str, p: nn.Parameter) -> None:
        if not self.project_moments:
            return
        for key, value in self.optimizer.state.get(p, {}).items():
            if (isinstance(value, torch.Tensor) and value.shape == p.shape
                    and key not in LINEAR_STATE + SQUARE_STATE):
                raise ValueError(f"RankAnnealer: optimizer state {key!r} of {name} has the parameter's shape "
                                 f"but no known projection (known: {LINEAR_STATE + SQUARE_STATE}); pass "
                                 "project_moments=False to reset the state instead")

    def _swap(self, old: nn.Parameter, new: nn.Parameter, t: torch.Tensor, *, left: bool) -> None:
        """Put ``new`` where ``old`` is in the param groups; move the state, projected by x ↦ t·x (``left``) or
        x ↦ x·t (first moments) and v ↦ t^∘2·v / v·t^∘2 (second moments)."""
        opt = self.optimizer
        for group in opt.param_groups:
            params = group["params"]
            for i, p in enumerate(params):
                if p is old:
                    params[i] = new
        state = opt.state.pop(old, None)
        if not state or not self.project_moments:
            return  # dropped: the optimizer initializes the new parameter's state on its next step
        new_state = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == old.shape:
                mat = t.square() if key in SQUARE_STATE else t
                x = value.to(t.dtype)
                out = mat @ x if left else x @ mat
                new_state[key] = out.to(value.dtype).contiguous()
            else:
                new_state[key] = value   # step counts and other scalars carry over
        opt.state[new] = new_state
