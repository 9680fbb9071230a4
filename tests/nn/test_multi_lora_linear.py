"""lowrank.nn.MultiLoRALinear: ids per token / per sample / through adapter_context, and parity with PEFT's
mixed-batch forward (``adapter_names=``) on the real MiniLM with three adapters of different rank and alpha.

Parity rule as tests/nn/test_peft.py: our fp32 error against PEFT run in float64 within ERROR_FACTOR of PEFT fp32's
own, and within 1e-5 (relative to the output scale) of PEFT fp32.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowrank.nn import MultiLoRALinear, adapter_context, from_peft_multi
from lowrank.ops import adapter_segments
from lowrank.reference import multi_lora_linear as reference
from tests.conftest import ERROR_FACTOR, ULPS_FLOOR, load_minilm

SENTENCES = ["A low-rank update is cheap to train.", "The cat sat on the mat.", "Adapters per request.",
             "Serving many fine-tunes at once."]


def _layer(dtype=torch.float32) -> MultiLoRALinear:
    m = MultiLoRALinear(12, 10, ["a", "b", "c"], r=[4, 2, 3], alpha=[8.0, 1.0, 3.0], dtype=dtype)
    with torch.no_grad():
        m.lora_b.normal_()
    return m


def _ref(m: MultiLoRALinear, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return reference(x, m.weight, m.bias, m.lora_a, m.lora_b, ids, list(m.scaling), list(m.ranks))


def test_forward_ids_per_token_per_sample_and_context():
    m = _layer()
    x = torch.randn(4, 5, 12)
    per_sample = m.adapter_ids(["a", None, "c", "__base__"])
    per_token = per_sample[:, None].expand(4, 5)
    ref = _ref(m, x, per_token)
    torch.testing.assert_close(m(x, per_token), ref)
    torch.testing.assert_close(m(x, per_sample), ref)
    torch.testing.assert_close(m(x, adapter_segments(per_token, 3)), ref)
    with adapter_context(per_sample):
        torch.testing.assert_close(m(x), ref)
        with adapter_context(torch.full((4,), 1)):           # contexts nest
            torch.testing.assert_close(m(x), _ref(m, x, torch.full((4, 5), 1)))
        torch.testing.assert_close(m(x), ref)
    with pytest.raises(ValueError, match="no adapter_ids given and no adapter_context"):
        m(x)


def test_context_shares_segments_across_layers():
    a, b = _layer(), MultiLoRALinear(10, 12, ["a", "b", "c"], r=2)
    model = nn.Sequential(a, nn.ReLU(), b)
    x = torch.randn(3, 2, 12)
    ids = torch.tensor([2, 0, -1])
    with adapter_context(ids):
        y = model(x)
    expect = b(torch.relu(a(x, ids)), ids)
    torch.testing.assert_close(y, expect)


def test_training_grads_only_for_used_adapters():
    m = _layer()
    x = torch.randn(6, 12)
    m(x, torch.tensor([0, 0, 2, -1, 2, 0])).square().sum().backward()
    assert m.weight.grad is None and torch.count_nonzero(m.lora_a.grad[1]) == 0
    assert torch.count_nonzero(m.lora_a.grad[0]) > 0 and torch.count_nonzero(m.lora_b.grad[2, :, 3:]) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="distinct non-empty names"):
        MultiLoRALinear(4, 4, ["a", "a"], r=2)
    with pytest.raises(ValueError, match="r must be"):
        MultiLoRALinear(4, 4, ["a", "b"], r=[2])
    m = _layer()
    with pytest.raises(ValueError, match="unknown adapters"):
        m.adapter_ids(["a", "zz"])
    with pytest.raises(ValueError, match="fit neither"):
        m(torch.randn(4, 5, 12), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="adapter_ids has value 3"):
        m(torch.randn(2, 12), torch.tensor([0, 3]))


# ---- PEFT mixed batch on MiniLM ------------------------------------------------------------------------------
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

ADAPTERS = {"a": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "key", "value", "dense"]},
            "b": {"r": 4, "lora_alpha": 4, "target_modules": ["query", "value"]},
            "c": {"r": 16, "lora_alpha": 8, "target_modules": ["dense"]}}
NAMES = ["b", "__base__", "a", "c"]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm(SENTENCES)


def _peft_multi(base: nn.Module) -> nn.Module:
    first, *rest = ADAPTERS
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**ADAPTERS[first]), adapter_name=first)
    for name in rest:
        pm.add_adapter(name, peft.LoraConfig(**ADAPTERS[name]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return pm.eval()


def _max_err(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item()


def test_matches_peft_mixed_batch_on_minilm(minilm):
    _, base, batch = minilm
    pm = _peft_multi(base)
    with torch.no_grad():
        peft32 = pm(**batch, adapter_names=NAMES).last_hidden_state
        pm64 = copy.deepcopy(pm).double()
        peft64 = pm64(**batch, adapter_names=NAMES).last_hidden_state
    model, names = from_peft_multi(copy.deepcopy(pm))
    assert names == ("a", "b", "c")
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    assert len(layers) == 6 * 6 + 1  # per block query, key, value and 3 "dense"; the pooler's dense
    ids = layers[0].adapter_ids(NAMES)
    with torch.no_grad(), adapter_context(ids):
        ours = model(**batch).last_hidden_state
    scale = peft64.abs().max().item()
    bound = ERROR_FACTOR * max(_max_err(peft32, peft64), ULPS_FLOOR * torch.finfo(torch.float32).eps * max(scale, 1))
    assert _max_err(ours, peft64) <= bound
    assert _max_err(ours, peft32) / scale <= 1e-5
    # the sample served by no adapter is the base model's output
    with torch.no_grad():
        plain = base(**batch).last_hidden_state
    torch.testing.assert_close(ours[1], plain[1], rtol=1e-5, atol=1e-5)
    assert _max_err(ours[0], plain[0]) > 1e-3
