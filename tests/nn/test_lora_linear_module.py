"""lowrank.nn.LoRALinear: construction, equivalence with nn.Linear, merged(), training, state hygiene."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowrank.nn import LoRALinear
from lowrank.reference import lora_linear as reference


def _randomize(m: LoRALinear) -> LoRALinear:
    with torch.no_grad():
        m.lora_b.normal_()
    return m


@pytest.mark.parametrize("pack", [True, False, None])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_from_linear_starts_equal_to_linear(bias, dtype, pack):
    lin = nn.Linear(17, 9, bias=bias, dtype=dtype)
    w0 = lin.weight.detach().clone()
    m = LoRALinear.from_linear(lin, r=4, alpha=8, pack=pack)
    x = torch.randn(2, 5, 17, dtype=dtype)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=0)
    assert m.is_packed == (pack if pack is not None else dtype == torch.bfloat16)
    if m.is_packed:
        assert m.weight.data_ptr() != lin.weight.data_ptr(), "pack=True copies the weight into the joint buffer"
        assert m.weight.stride() == (17 + 4, 1) and m.lora_b.data_ptr() == m.weight.data_ptr() + 17 * m.weight.itemsize
    else:
        assert m.weight.data_ptr() == lin.weight.data_ptr(), "pack=False shares the base weight"
    assert torch.equal(lin.weight, w0), "from_linear leaves the Linear alone"
    assert not m.weight.requires_grad and m.lora_a.requires_grad and m.lora_b.requires_grad
    assert m.scaling == 2.0


def test_fp32_matmul_precision_high_allows_the_faster_base_gemm():
    """Off Intel, torch.set_float32_matmul_precision("high") lets the fp32 base GEMM run on oneDNN (faster there,
    summing in another order); the default "highest" keeps F.linear's GEMM: bit-identical to the Linear."""
    lin = nn.Linear(64, 48)
    m = LoRALinear.from_linear(lin, r=4, alpha=8)
    x = torch.randn(3, 8, 64)
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        torch.testing.assert_close(m(x), lin(x))
        torch.set_float32_matmul_precision("highest")
        torch.testing.assert_close(m(x), lin(x), rtol=0, atol=0)
    finally:
        torch.set_float32_matmul_precision(prev)


def test_fp32_matmul_precision_high_takes_bf16x3_on_amx():
    """On AMX, from 1024 tokens, "high" (torch: "each float32 number as the sum of two bfloat16 numbers") runs the
    fp32 base GEMM as bf16x3: ~1e-5 relative from fp32, not bit-identical; "highest" stays exact."""
    from lowrank.ops._backends import cpu_isa
    from lowrank.reference.bf16x3_linear import bf16x3_linear as bf16x3_reference

    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    m = _randomize(LoRALinear.from_linear(lin, r=4, alpha=8))
    x = torch.randn(1024, 64)
    exact = reference(*(t.double() for t in (x, m.weight, m.bias, m.lora_a, m.lora_b)), m.scaling)
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        y = m(x)
        torch.set_float32_matmul_precision("highest")
        y_exact = m(x)
    finally:
        torch.set_float32_matmul_precision(prev)
    torch.testing.assert_close(y.double(), exact, rtol=1e-4, atol=1e-4)
    if cpu_isa() == "amx":
        lora_term = y_exact - lin(x)
        torch.testing.assert_close(y - lora_term, bf16x3_reference(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        assert not torch.equal(y, y_exact)


def test_pack_policy_follows_dtype_and_keeps_parameters():
    m = _randomize(LoRALinear(33, 17, r=5))
    assert m.pack is None and not m.is_packed  # fp32: unpacked by default
    params = list(m.parameters())
    x = torch.randn(9, 33)
    y32 = m(x)
    m.to(torch.bfloat16)
    assert m.is_packed and list(m.parameters()) == params and m.weight.dtype == torch.bfloat16
    torch.testing.assert_close(m(x.bfloat16()).float(), y32, rtol=0.05, atol=0.05)
    m.float()
    assert not m.is_packed and m.weight.is_contiguous() and m.lora_b.is_contiguous()
    y_unpacked = m(x)
    m.pack_()
    assert m.pack is True and m.is_packed and list(m.parameters()) == params
    torch.testing.assert_close(m(x), y_unpacked)
    m.double()
    assert m.is_packed, "pack=True keeps the layout through dtype conversions"
    sd = m.state_dict()
    fresh = LoRALinear(33, 17, r=5, dtype=torch.float64, pack=True)
    fresh.load_state_dict(sd)
    assert fresh.is_packed and torch.equal(fresh.lora_b, m.lora_b)
    with pytest.raises(TypeError, match="pack"):
        LoRALinear(4, 4, r=1, pack="yes")


def test_forward_matches_reference_and_merged():
    m = _randomize(LoRALinear(33, 17, r=5, alpha=3.0))
    x = torch.randn(7, 33)
    y = m(x)
    torch.testing.assert_close(y, reference(x, m.weight, m.bias, m.lora_a, m.lora_b, m.scaling))
    merged = m.merged()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    # merged is a new object: changing it leaves the module alone
    with torch.no_grad():
        merged.weight.zero_()
    torch.testing.assert_close(m(x), y)


def test_merged_is_computed_in_fp32():
    m = _randomize(LoRALinear(64, 32, r=8, dtype=torch.bfloat16))
    exact = (m.weight.double() + m.scaling * m.lora_b.double() @ m.lora_a.double()).to(torch.bfloat16)
    assert torch.equal(m.merged().weight, exact)


def test_forward_does_not_mutate_state():
    m = _randomize(LoRALinear(8, 6, r=2))
    before = copy.deepcopy(m.state_dict())
    m(torch.randn(3, 8)).sum().backward()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_training_step_only_moves_lora_factors():
    lin = nn.Linear(16, 8)
    m = LoRALinear.from_linear(lin, r=4)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    w0 = m.weight.clone()
    x, target = torch.randn(32, 16), torch.randn(32, 8)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (m(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(m.weight, w0)


def test_dropout_branch_in_training_and_fused_in_eval():
    m = _randomize(LoRALinear(12, 6, r=3, dropout=0.5))
    x = torch.randn(4, 12)
    m.eval()
    torch.testing.assert_close(m(x), reference(x, m.weight, m.bias, m.lora_a, m.lora_b, m.scaling))
    m.train()
    torch.manual_seed(1)
    y1 = m(x)
    base = nn.functional.linear(x, m.weight, m.bias)
    assert not torch.allclose(y1, reference(x, m.weight, m.bias, m.lora_a, m.lora_b, m.scaling))
    assert y1.shape == base.shape


def test_state_dict_round_trip():
    m = _randomize(LoRALinear(10, 4, r=2))
    m2 = LoRALinear(10, 4, r=2)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(3, 10)
    torch.testing.assert_close(m2(x), m(x))
    assert set(m.state_dict()) == {"weight", "bias", "lora_a", "lora_b"}


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 0}, "r must be a positive int"),
    ({"r": 2.0}, "r must be a positive int"),
    ({"r": 2, "dropout": 1.0}, "dropout"),
    ({"r": 2, "alpha": float("nan")}, "alpha must be finite"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(4, 3, **kwargs)


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="expected nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1), r=2)


def test_backend_is_passed_through():
    m = LoRALinear(4, 3, r=1, backend="cuda")
    if not torch.cuda.is_available():
        from lowrank import BackendUnavailableError
        with pytest.raises(BackendUnavailableError):
            m(torch.randn(2, 4))
