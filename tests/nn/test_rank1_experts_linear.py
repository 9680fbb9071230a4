"""lowrank.nn.Rank1ExpertsLinear: conversion, parity with the op's reference, balancing bias, counters, refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank.nn import Rank1ExpertsLinear
from lowrank.reference import rank1_experts_lora as reference


def _module(gate="router", dtype=torch.float32, **kw):
    lin = nn.Linear(24, 20, dtype=dtype)
    m = Rank1ExpertsLinear.from_linear(lin, 8, 3, gate, **kw)
    with torch.no_grad():
        m.lora_b.normal_()
    return lin, m


@pytest.mark.parametrize("gate", ["router", "self"])
def test_fresh_module_computes_its_linear(gate):
    lin = nn.Linear(24, 20)
    m = Rank1ExpertsLinear.from_linear(lin, 8, 3, gate)
    x = torch.randn(5, 24)
    torch.testing.assert_close(m(x), lin(x))
    assert m.weight.data_ptr() == lin.weight.data_ptr() and not m.weight.requires_grad


@pytest.mark.parametrize("gate", ["router", "self"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_matches_reference(gate, dtype):
    _, m = _module(gate, dtype, alpha=4.0, **({"temperature": 0.5} if gate == "self" else {}))
    m.eval()
    x = torch.randn(2, 7, 24).to(dtype)
    y, idx, g = m.forward_with_routing(x)
    kw = {"router": m.router, "router_bias": m.router_bias} if gate == "router" else {"temperature": 0.5}
    ry, ridx, rg = reference(x, m.weight, m.bias, m.lora_a, m.lora_b, 3, scaling=0.5, gate=gate, **kw)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(y, ry, **({"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}))


def test_packed_layout_policy():
    lin = nn.Linear(24, 20, dtype=torch.bfloat16)
    m = Rank1ExpertsLinear.from_linear(lin, 8, 3)
    assert m.is_packed and m.weight.data_ptr() != lin.weight.data_ptr()
    torch.testing.assert_close(m.weight, lin.weight, rtol=0, atol=0)
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=0)     # lora_b = 0: U·Bᵀ adds exact zeros
    assert not m.to(torch.float32).is_packed
    assert m.to(torch.bfloat16).is_packed
    assert not Rank1ExpertsLinear.from_linear(nn.Linear(4, 4), 4, 2).is_packed
    assert Rank1ExpertsLinear.from_linear(nn.Linear(4, 4), 4, 2, pack=True).is_packed


def test_router_and_lora_a_share_one_buffer_after_to():
    _, m = _module()
    for mm in (m, m.to(torch.float64)):
        a, r = mm.lora_a, mm.router
        assert a.untyped_storage().data_ptr() == r.untyped_storage().data_ptr()
        assert r.storage_offset() == a.storage_offset() + a.numel()
    assert m.router_bias.dtype == torch.float32 or m.router_bias.dtype == torch.float64


def test_training_counts_and_update_bias():
    _, m = _module()
    m.train()
    x = torch.randn(50, 24)
    _, idx, _ = m.forward_with_routing(x)
    assert int(m.expert_counts.sum()) == 50 * 3
    torch.testing.assert_close(m.expert_counts, torch.bincount(idx.reshape(-1), minlength=8))
    counts = m.expert_counts.clone()
    used = m.update_bias(rate=0.01)
    assert torch.equal(used, counts) and int(m.expert_counts.sum()) == 0
    mean = counts.float().mean()
    torch.testing.assert_close(m.router_bias, 0.01 * torch.sign(mean - counts.float()))
    # indices and explicit counts give the same step
    before = m.router_bias.clone()
    m.update_bias(idx, rate=0.5)
    torch.testing.assert_close(m.router_bias - before, 0.5 * torch.sign(mean - counts.float()))
    m.update_bias(torch.ones(8), rate=0.5)   # balanced counts: no change
    torch.testing.assert_close(m.router_bias - before, 0.5 * torch.sign(mean - counts.float()))


def test_eval_forward_changes_no_state_and_bias_gets_no_grad():
    _, m = _module()
    m.eval()
    m.router_bias.fill_(0.3)
    m(torch.randn(4, 24)).sum().backward()
    assert int(m.expert_counts.sum()) == 0 and not m.router_bias.requires_grad
    assert m.router.grad is not None and m.lora_a.grad is not None and m.lora_b.grad is not None


def test_balancing_spreads_the_load():
    torch.manual_seed(1)
    _, m = _module()
    with torch.no_grad():
        m.router[0] += 3 * m.router[1:].abs().mean()   # a router biased towards expert 0
    x = torch.randn(256, 24)
    m.train()
    spread0 = m.forward_with_routing(x)[1].reshape(-1).bincount(minlength=8).float().std()
    m.expert_counts.zero_()
    for _ in range(60):
        m.forward_with_routing(x)
        m.update_bias(rate=0.02)
    spread1 = m.forward_with_routing(x)[1].reshape(-1).bincount(minlength=8).float().std()
    assert spread1 < spread0


def test_threshold_only_in_eval():
    _, m = _module("self", threshold=0.4, temperature=0.2)
    x = torch.randn(30, 24)
    m.train()
    assert (m.forward_with_routing(x)[2] > 0).all()
    m.eval()
    g = m.forward_with_routing(x)[2]
    assert (g == 0).any() and not ((g > 0) & (g < 0.4)).any()


def test_refusals_and_bad_arguments():
    _, m = _module()
    with pytest.raises(NotImplementedError, match="input-dependent"):
        m.merged()
    with pytest.raises(ValueError, match="top_k"):
        Rank1ExpertsLinear(4, 4, 3, 4)
    with pytest.raises(ValueError, match="gate"):
        Rank1ExpertsLinear(4, 4, 3, 1, gate="softmax")
    with pytest.raises(TypeError, match="nn.Linear"):
        Rank1ExpertsLinear.from_linear(nn.Conv1d(2, 2, 1), 4, 2)
    with pytest.raises(ValueError, match="counts must be"):
        m.update_bias(torch.ones(5))
    with pytest.raises(ValueError, match="indices must lie"):
        m.update_bias(torch.full((2, 3), 9))
    _, s = _module("self")
    with pytest.raises(RuntimeError, match="no router bias"):
        s.update_bias()


def test_state_dict_round_trip():
    _, m = _module()
    m.router_bias.fill_(0.2)
    _, m2 = _module()
    m2.load_state_dict(m.state_dict())
    x = torch.randn(3, 24)
    m.eval(), m2.eval()
    torch.testing.assert_close(m(x), m2(x))
