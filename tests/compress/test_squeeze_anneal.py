"""lowrank.compress.RankAnnealer and the schedules: rank annealing inside a training loop, the optimizer swaps,
and the projection of Adam's moments through the change of basis.

Exactness checks: (1) with a linear loss L = ⟨C, s·B·A⟩ the gradient seen by the new factors is known in closed
form, and the projected ``exp_avg`` must equal it; (2) once the factors are balanced (after a first squeeze) a
further squeeze is a pure truncation, so both moments must be the leading columns / rows of the old ones;
(3) every swap changes s·B·A into exactly its truncated SVD (lowrank.reference.squeeze).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lowrank.compress import RankAnnealer, cosine_schedule, linear_schedule, step_schedule
from lowrank.nn import LoRALinear
from lowrank.reference.squeeze import truncated_delta


def _layer(n_in=24, n_out=20, r=8, alpha=16.0, seed=0, dtype=torch.float64) -> LoRALinear:
    torch.manual_seed(seed)
    layer = LoRALinear(n_in, n_out, r, alpha, dtype=dtype)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.1)
    return layer


def _delta(m: LoRALinear) -> torch.Tensor:
    return m.scaling * (m.lora_b.detach().double() @ m.lora_a.detach().double())


def _best(d: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation of a dense d (the reference, with d = I·d as its factors)."""
    return truncated_delta(d, torch.eye(d.shape[0], dtype=d.dtype), k)


# ---- schedules ---------------------------------------------------------------------------------------------
def test_schedules():
    lin = linear_schedule(64, 16, 10, 58)
    assert [lin(s) for s in (0, 10, 34, 58, 1000)] == [64, 64, 40, 16, 16]
    cos = cosine_schedule(64, 16, 10, 58)
    assert [cos(s) for s in (0, 10, 58, 99)] == [64, 64, 16, 16] and cos(34) == 40
    for f in (lin, cos):
        values = [f(s) for s in range(70)]
        assert all(x >= y for x, y in itertools.pairwise(values))
    st = step_schedule({100: 32, 200: 8})
    assert [st(s) for s in (0, 100, 150, 200, 500)] == [None, 32, 32, 8, 8]
    with pytest.raises(ValueError, match="r_tgt must be <= r_src"):
        linear_schedule(8, 16, 0, 10)
    with pytest.raises(ValueError, match="end must be > start"):
        cosine_schedule(16, 8, 10, 10)
    with pytest.raises(ValueError, match="r_tgt must be >= 1"):
        linear_schedule(16, 0, 0, 10)


# ---- moment projection -------------------------------------------------------------------------------------
def test_exp_avg_equals_the_new_gradient_for_a_linear_loss():
    layer = _layer()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    c = torch.randn(20, 24, dtype=torch.float64)

    def grads(m):
        m.zero_grad()
        (c * (m.scaling * m.lora_b @ m.lora_a)).sum().backward()
        return m.lora_a.grad.clone(), m.lora_b.grad.clone()

    g_a, g_b = grads(layer)
    for p, g in ((layer.lora_a, g_a), (layer.lora_b, g_b)):
        opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": g.clone(), "exp_avg_sq": g.square()}
    before = _delta(layer)
    swaps = RankAnnealer(layer, 3, lambda step: 3, optimizer=opt).step(0)
    assert [s.name for s in swaps] == ["lora_a", "lora_b"] and layer.r == 3
    torch.testing.assert_close(_delta(layer), _best(before, 3), rtol=0, atol=1e-12)
    new_g_a, new_g_b = grads(layer)
    torch.testing.assert_close(opt.state[layer.lora_a]["exp_avg"], new_g_a, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[layer.lora_b]["exp_avg"], new_g_b, rtol=0, atol=1e-12)
    for p in (layer.lora_a, layer.lora_b):
        assert opt.state[p]["step"].item() == 3.0
        v = opt.state[p]["exp_avg_sq"]
        assert v.shape == p.shape and bool((v >= 0).all())
    assert opt.param_groups[0]["params"][-2:] == [layer.lora_a, layer.lora_b]


def test_second_squeeze_of_balanced_factors_truncates_both_moments():
    layer = _layer()
    annealer = RankAnnealer(layer, 2, step_schedule({0: 6, 1: 4}),
                            optimizer=torch.optim.Adam(_trainable(layer), lr=1e-3))
    annealer.step(0)                    # 8 -> 6: the factors are now balanced (U·√S, √S·Vh)
    opt = annealer.optimizer
    state = {p: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
             for p in (layer.lora_a, layer.lora_b)}
    opt.state.update(state)
    old_a, old_b = layer.lora_a, layer.lora_b
    annealer.step(1)                    # 6 -> 4: a pure truncation of the balanced factors
    torch.testing.assert_close(layer.lora_a, old_a[:4], rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.lora_b, old_b[:, :4], rtol=0, atol=1e-12)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[layer.lora_a][key], state[old_a][key][:4], rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.state[layer.lora_b][key], state[old_b][key][:, :4], rtol=0, atol=1e-12)
    assert old_a not in opt.state and old_b not in opt.state
    assert annealer.history == [(0, "", 8, 6), (1, "", 6, 4)]


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# ---- a small training loop ---------------------------------------------------------------------------------
def _student_teacher(seed: int = 0):
    torch.manual_seed(seed)
    base1, base2 = nn.Linear(16, 32, dtype=torch.float64), nn.Linear(32, 8, dtype=torch.float64)
    teacher = nn.Sequential(nn.Linear(16, 32, dtype=torch.float64), nn.Tanh(),
                            nn.Linear(32, 8, dtype=torch.float64))
    with torch.no_grad():
        for t, b in ((teacher[0], base1), (teacher[2], base2)):
            out_f, in_f = b.weight.shape
            low = torch.randn(out_f, 3, dtype=torch.float64) @ torch.randn(3, in_f, dtype=torch.float64) * 0.2
            t.weight.copy_(b.weight + low)
            t.bias.copy_(b.bias)
    student = nn.Sequential(LoRALinear.from_linear(base1, 16, 16.0), nn.Tanh(),
                            LoRALinear.from_linear(base2, 16, 16.0))
    return student, teacher


@pytest.mark.parametrize("opt_name, project", [("adam", True), ("adam", False), ("sgd", True)])
def test_training_loop_anneals_16_to_4(opt_name, project):
    student, teacher = _student_teacher()
    params = _trainable(student)
    opt = (torch.optim.Adam(params, lr=1e-2) if opt_name == "adam"
           else torch.optim.SGD(params, lr=0.05, momentum=0.9))
    annealer = RankAnnealer(student, 4, linear_schedule(16, 4, 20, 80), optimizer=opt,
                            project_moments=project)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(200):
        x = torch.randn(64, 16, generator=g, dtype=torch.float64)
        loss = (student(x) - teacher(x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        before = [_delta(m) for m in (student[0], student[2])]
        swaps = annealer.step(step)
        if swaps:
            for m, d in zip((student[0], student[2]), before):
                torch.testing.assert_close(_delta(m), _best(d, m.r), rtol=0, atol=1e-12)
    assert annealer.ranks == {"0": 4, "2": 4}
    assert [h[3] for h in annealer.history if h[1] == "0"] == list(range(15, 3, -1))  # one rank at a time
    current = {id(p) for p in _trainable(student)}
    in_opt = [p for group in opt.param_groups for p in group["params"]]
    assert {id(p) for p in in_opt} == current and len(in_opt) == len(current)
    assert all(opt.state[p][k].shape == p.shape for p in in_opt for k in opt.state[p]
               if isinstance(opt.state[p][k], torch.Tensor) and opt.state[p][k].ndim)
    # it keeps learning at rank 4 after the annealing ends (step 80), and gets within a few % of the start
    tail, after = sum(losses[-20:]) / 20, sum(losses[80:100]) / 20
    assert tail < 0.8 * after and tail < 0.05 * losses[0], (losses[0], after, tail)


def test_zero_delta_keeps_the_layer_trainable():
    """B at its zero init: a balanced split would zero both factors; instead A keeps its top-k directions."""
    layer = _layer()
    with torch.no_grad():
        layer.lora_b.zero_()
    a0 = layer.lora_a.detach().clone()
    RankAnnealer(layer, 3, lambda s: 3).step(0)
    assert torch.count_nonzero(layer.lora_b) == 0 and layer.lora_a.shape == (3, 24)
    torch.testing.assert_close(torch.linalg.svdvals(layer.lora_a.detach()), torch.linalg.svdvals(a0)[:3],
                               rtol=1e-12, atol=0)
    x = torch.randn(5, 24, dtype=torch.float64)
    layer(x).square().sum().backward()
    assert layer.lora_b.grad.abs().max() > 0


def test_bf16_layer():
    layer = _layer(dtype=torch.bfloat16)
    RankAnnealer([layer], 2, lambda s: 2).step(0)
    assert layer.lora_a.dtype == torch.bfloat16 and layer.lora_a.shape == (2, 24) and layer.r == 2


def test_errors_and_reset():
    layer = _layer()
    with pytest.raises(ValueError, match="target_rank must be >= 1"):
        RankAnnealer(layer, 0, lambda s: 4)
    with pytest.raises(TypeError, match="schedule must be a callable"):
        RankAnnealer(layer, 2, 4)
    with pytest.raises(ValueError, match="no lowrank.nn.LoRALinear"):
        RankAnnealer(nn.Linear(2, 2), 2, lambda s: 4)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        RankAnnealer(layer, 2, lambda s: 4, optimizer=object())
    with pytest.raises(TypeError, match=r"schedule\(0\) must return a finite number"):
        RankAnnealer(layer, 2, lambda s: "4").step(0)
    opt = torch.optim.Adam(_trainable(layer))
    opt.state[layer.lora_a] = {"foo": torch.zeros_like(layer.lora_a)}
    with pytest.raises(ValueError, match="optimizer state 'foo' of lora_a has the parameter's shape"):
        RankAnnealer(layer, 2, lambda s: 4, optimizer=opt).step(0)
    assert layer.r == 8  # nothing changed
    RankAnnealer(layer, 2, lambda s: 4, optimizer=opt, project_moments=False).step(0)
    assert layer.r == 4 and layer.lora_a not in opt.state and len(opt.state) == 0
