"""lowrank.nn.peft: PEFT models in and out of LoRALinear, checked against PEFT itself on the real MiniLM.

Parity rule (tests/conftest.py): our fp32 result must be within ERROR_FACTOR of the error PEFT's own fp32
model makes, both against PEFT run in float64; and, more plainly, within 1e-5 (relative to the output scale)
of PEFT fp32. Small synthetic models cover what MiniLM has no room for (Conv1D bases, rsLoRA, dropout,
MultiheadAttention).
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

from lowrank.nn import (
    LoRALinear,
    apply_lora,
    from_peft,
    load_peft_state_dict,
    save_peft_adapter,
    to_peft_state_dict,
)
from tests.conftest import ERROR_FACTOR, ULPS_FLOOR, load_minilm

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
LoraConfig, PeftModel, get_peft_model = peft.LoraConfig, peft.PeftModel, peft.get_peft_model
get_peft_model_state_dict = peft.get_peft_model_state_dict

TARGETS = ["query", "key", "value", "dense"]
SENTENCES = ["A low-rank update is cheap to train.", "The cat sat on the mat."]
REL_TOL = 1e-5


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    """(path, base model in eval mode, tokenized batch of 2); offline, nothing is downloaded."""
    return load_minilm(SENTENCES)


def _randomize_lora_b(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _peft(base: nn.Module, **cfg) -> nn.Module:
    cfg = {"r": 8, "lora_alpha": 16, "target_modules": TARGETS, **cfg}
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    _randomize_lora_b(pm)
    return pm.eval()


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of the module tree sharing ``model``'s parameter storage (cheap; for models that never run)."""
    return copy.deepcopy(model, memo={id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad)
                                      for p in model.parameters()})


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _assert_parity(ours: torch.Tensor, peft32: torch.Tensor, peft64: torch.Tensor, what: str) -> None:
    scale = peft64.abs().max().item()
    floor = ULPS_FLOOR * torch.finfo(torch.float32).eps * max(scale, 1)
    bound = ERROR_FACTOR * max(_max_err(peft32, peft64), floor)
    err = _max_err(ours, peft64)
    assert err <= bound, f"{what}: error {err:.3e} vs fp64 PEFT exceeds {bound:.3e} ({ERROR_FACTOR}x PEFT's)"
    rel = _max_err(ours, peft32) / max(scale, 1e-30)
    assert rel <= REL_TOL, f"{what}: relative difference {rel:.3e} to PEFT fp32 exceeds {REL_TOL}"


def _hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).last_hidden_state


# ---- from_peft ---------------------------------------------------------------------------------------------
def test_from_peft_forward_and_grads_match_peft(minilm):
    _, base, batch = minilm
    pm = _peft(base)
    pm64 = copy.deepcopy(pm).double()
    shell = copy.deepcopy(pm)
    conv = from_peft(shell)

    assert conv is shell.base_model.model and not isinstance(conv, PeftModel)
    n_peft = sum(1 for n, _ in pm.named_modules() if n.endswith(".lora_A"))
    layers = [(n, m) for n, m in conv.named_modules() if isinstance(m, LoRALinear)]
    assert len(layers) == n_peft == 6 * 6 + 1  # q, k, v, 3 denses per layer, the pooler's dense
    assert not any("lora_A" in n for n, _ in conv.named_parameters())
    query = conv.encoder.layer[0].attention.self.query
    peft_query = shell.base_model.model.encoder.layer[0].attention.self.query  # the same object now
    assert query is peft_query and query.scaling == 2.0 and query.r == 8
    assert all(not m.weight.requires_grad and m.lora_a.requires_grad and m.lora_b.requires_grad
               for _, m in layers)

    out32, out64, ours = pm(**batch), pm64(**batch), conv(**batch)
    for key in ("last_hidden_state", "pooler_output"):
        _assert_parity(ours[key], out32[key], out64[key], key)

    # Gradients of every factor w.r.t. one scalar loss.
    gen = torch.Generator().manual_seed(2)
    keys = ("last_hidden_state", "pooler_output")
    probes = [torch.randn(out32[k].shape, generator=gen, dtype=torch.float64) for k in keys]

    def loss(out, dtype):
        return sum((out[k] * p.to(dtype)).sum() for k, p in zip(keys, probes))

    loss(out32, torch.float32).backward()
    loss(out64, torch.float64).backward()
    loss(ours, torch.float32).backward()
    g32 = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    g64 = {n: p.grad for n, p in pm64.named_parameters() if p.requires_grad}
    assert len(g32) == 2 * n_peft
    for name, m in layers:
        for ours_p, peft_name in ((m.lora_a, "lora_A"), (m.lora_b, "lora_B")):
            key = f"base_model.model.{name}.{peft_name}.default.weight"
            assert ours_p.grad is not None, f"no gradient for {name}.{peft_name}"
            _assert_parity(ours_p.grad, g32[key], g64[key], f"grad {key}")
    assert all(m.weight.grad is None for _, m in layers)


def test_from_peft_shares_storage_and_keeps_flags(minilm):
    pm = _peft(minilm[1], lora_dropout=0.1)
    peft_q = pm.base_model.model.encoder.layer[1].attention.self.query
    ptrs = (peft_q.base_layer.weight.data_ptr(), peft_q.lora_A["default"].weight.data_ptr(),
            peft_q.lora_B["default"].weight.data_ptr())
    conv = from_peft(pm)  # in place, no copy
    q = conv.encoder.layer[1].attention.self.query
    assert (q.weight.data_ptr(), q.lora_a.data_ptr(), q.lora_b.data_ptr()) == ptrs
    assert isinstance(q.dropout, nn.Dropout) and q.dropout.p == 0.1 and not q.training


def test_from_peft_pack_keeps_parameters_and_outputs(minilm, tmp_path):
    """pack=True: the same Parameter objects, now views of one [out, in + r] buffer per layer; in bf16 the
    packed layers take the single-GEMM kernel path, whose outputs agree with the unpacked conversion."""
    _, base, batch = minilm
    pm = _peft(copy.deepcopy(base)).to(torch.bfloat16)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    plain = from_peft(copy.deepcopy(pm))
    peft_q = pm.base_model.model.encoder.layer[1].attention.self.query
    params = (peft_q.base_layer.weight, peft_q.lora_B["default"].weight)
    packed = from_peft(pm, pack=True)
    q = packed.encoder.layer[1].attention.self.query
    assert q.weight is params[0] and q.lora_b is params[1] and q.is_packed
    assert all(m.is_packed for m in packed.modules() if isinstance(m, LoRALinear))
    with torch.no_grad():
        a, b = _hidden(plain, batch).float(), _hidden(packed, batch).float()
    assert (a - b).abs().max() < 0.05 * a.abs().max(), (a - b).abs().max()
    sd = to_peft_state_dict(packed)
    assert torch.equal(sd["base_model.model.encoder.layer.1.attention.self.query.lora_B.weight"], params[1])
    save_peft_adapter(packed, tmp_path, base_model_name_or_path="x", task_type="FEATURE_EXTRACTION")


def test_round_trip_to_peft_adapter_dir(minilm, tmp_path):
    path, base, batch = minilm
    pm = _peft(base)
    ref = _hidden(pm, batch)
    conv = from_peft(copy.deepcopy(pm))

    sd, peft_sd = to_peft_state_dict(conv), get_peft_model_state_dict(pm)
    assert list(sd) == list(peft_sd)
    assert all(torch.equal(sd[k], peft_sd[k]) for k in sd)

    save_peft_adapter(conv, tmp_path, base_model_name_or_path=path, task_type="FEATURE_EXTRACTION")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert sorted(cfg["target_modules"]) == sorted(TARGETS) and cfg["base_model_name_or_path"] == str(path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(_hidden(loaded, batch), ref)


def test_peft_save_pretrained_into_apply_lora(minilm, tmp_path):
    _, base, batch = minilm
    pm = _peft(base)
    pm.save_pretrained(tmp_path)
    ref = _hidden(pm, batch)

    model = apply_lora(copy.deepcopy(base), TARGETS, r=8, alpha=16)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if n.endswith((".lora_a", ".lora_b"))}
    result = load_peft_state_dict(model, tmp_path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    model.eval()
    with torch.no_grad():
        assert _max_err(_hidden(model, batch), ref) <= REL_TOL * ref.abs().max().item()

    # The adapter config is checked: a layer with another scaling would silently compute something else.
    wrong_alpha = apply_lora(_skeleton(base), TARGETS, r=8, alpha=8)
    with pytest.raises(ValueError, match=r"scaling=1\.0 but the adapter config gives r=8, scaling=2\.0"):
        load_peft_state_dict(wrong_alpha, tmp_path)
    wrong_rank = apply_lora(_skeleton(base), TARGETS, r=4, alpha=8)
    with pytest.raises(ValueError, match=r"lora_A\.weight' has shape \(8, 384\) but the model expects "
                                         r"\(4, 384\)"):
        load_peft_state_dict(wrong_rank, tmp_path)
    fewer = apply_lora(_skeleton(base), ["query"], r=8, alpha=16)
    with pytest.raises(ValueError, match=r"unexpected keys \(62\): base_model\.model\.encoder\.layer\.0\."
                                         r"attention\.output\.dense\.lora_A\.weight"):
        load_peft_state_dict(fewer, tmp_path)
    more = apply_lora(_skeleton(base), "all-linear", r=8, alpha=16)
    sd = {k: v for k, v in get_peft_model_state_dict(pm).items() if "pooler" not in k}
    with pytest.raises(ValueError, match=r"missing keys \(2\): base_model\.model\.pooler\.dense\."
                                         r"lora_A\.weight"):
        load_peft_state_dict(more, sd)
    res = load_peft_state_dict(more, sd, strict=False)
    assert res.missing_keys == ["base_model.model.pooler.dense.lora_A.weight",
                                "base_model.model.pooler.dense.lora_B.weight"]


def test_modules_to_save_round_trip(minilm, tmp_path):
    path, _, batch = minilm
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        seq = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    pm = get_peft_model(copy.deepcopy(seq), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                       task_type="SEQ_CLS"))
    _randomize_lora_b(pm)
    with torch.no_grad():
        # the trained copy differs from the original head
        pm.base_model.model.classifier.modules_to_save["default"].weight.mul_(3.0)
    pm.eval()
    ref = pm(**batch).logits
    conv = from_peft(copy.deepcopy(pm))
    assert isinstance(conv.classifier, nn.Linear)
    assert torch.allclose(conv(**batch).logits, ref, rtol=REL_TOL, atol=REL_TOL * ref.abs().max().item())

    sd = to_peft_state_dict(conv, modules_to_save=["classifier"])
    assert sorted(sd) == sorted(get_peft_model_state_dict(pm))
    save_peft_adapter(conv, tmp_path, base_model_name_or_path=path, task_type="SEQ_CLS",
                      modules_to_save=["classifier"])
    loaded = PeftModel.from_pretrained(copy.deepcopy(seq), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, ref)
    fresh = apply_lora(copy.deepcopy(seq), ["query", "value"], r=4, alpha=8).eval()
    load_peft_state_dict(fresh, tmp_path)
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, ref, rtol=REL_TOL, atol=REL_TOL * ref.abs().max().item())


# ---- refusals ----------------------------------------------------------------------------------------------
def test_from_peft_refuses_dora(minilm):
    pm = _peft(minilm[1], target_modules=["query"], use_dora=True)
    with pytest.raises(ValueError, match=r"layer 'encoder\.layer\.0\.attention\.self\.query' adapter "
                                         r"'default' uses DoRA \(use_dora=True\)"):
        from_peft(pm)
    assert any(n.endswith("lora_A") for n, _ in pm.named_modules())  # refused before anything was replaced


def test_from_peft_refuses_two_active_adapters(minilm):
    pm = _peft(minilm[1], target_modules=["query"])
    pm.add_adapter("other", LoraConfig(r=4, lora_alpha=4, target_modules=["query"]))
    pm.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"several active adapters \['default', 'other'\]"):
        from_peft(pm)


def test_from_peft_refuses_embedding_lora(minilm):
    pm = _peft(minilm[1], target_modules=["word_embeddings", "query"])
    with pytest.raises(TypeError, match=r"layer 'embeddings\.word_embeddings' is a PEFT "
                                        r"peft\.tuners\.lora\.layer\.Embedding; only LoRA on plain "
                                        r"nn\.Linear"):
        from_peft(pm)


def test_from_peft_refuses_merged_lora_bias_and_disabled(minilm):
    pm = _peft(minilm[1], target_modules=["query"])
    pm.merge_adapter()
    with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.attention\.self\.query' has merged adapters"):
        from_peft(pm)
    pm = _peft(minilm[1], target_modules=["query"], lora_bias=True)
    with pytest.raises(ValueError, match=r"uses lora_bias=True"):
        from_peft(pm)
    pm = _peft(minilm[1], target_modules=["query"])
    with pm.disable_adapter(), pytest.raises(ValueError, match=r"has its adapters disabled"):
        from_peft(pm)


def test_from_peft_refuses_dtype_mismatch_unless_asked(minilm):
    base16 = copy.deepcopy(minilm[1]).to(torch.bfloat16)
    pm = get_peft_model(base16, LoraConfig(r=8, lora_alpha=16, target_modules=["query"]))  # adapters upcast
    with pytest.raises(ValueError, match=r"factors in torch\.float32 but the base weight is torch\.bfloat16"):
        from_peft(copy.deepcopy(pm))
    conv = from_peft(pm, cast_adapter_dtype=True)
    assert conv.encoder.layer[0].attention.self.query.lora_a.dtype == torch.bfloat16


# ---- small synthetic models --------------------------------------------------------------------------------
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 16))
        self.proj = nn.Linear(16, 16, bias=False)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        return self.classifier(self.proj(self.body(x)))


def test_from_peft_rslora_dropout_and_conv1d():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                                          n_positions=16)).eval()
    cfg = LoraConfig(r=4, lora_alpha=3, use_rslora=True, lora_dropout=0.2, target_modules=["c_attn", "c_fc"],
                     fan_in_fan_out=True)
    pm = get_peft_model(gpt2, cfg)
    _randomize_lora_b(pm)
    pm.eval()
    ids = torch.randint(0, 64, (2, 7))
    ref = pm(input_ids=ids).last_hidden_state
    peft_attn = pm.base_model.model.h[0].attn.c_attn
    w_ptr = peft_attn.base_layer.weight.data_ptr()
    conv = from_peft(copy.deepcopy(pm))
    attn = conv.h[0].attn.c_attn
    assert isinstance(attn, LoRALinear) and attn.weight.shape == (96, 32) and attn.scaling == 3 / 2
    assert isinstance(attn.dropout, nn.Dropout) and attn.dropout.p == 0.2
    assert torch.allclose(conv(input_ids=ids).last_hidden_state, ref, rtol=REL_TOL, atol=REL_TOL)
    conv2 = from_peft(pm)
    assert conv2.h[0].attn.c_attn.weight.data_ptr() == w_ptr  # a transposed view, not a copy
    assert conv2.h[0].attn.c_attn.weight.is_contiguous() is False


def test_apply_lora_matching_rules():
    toy = apply_lora(_Toy(), "all-linear", r=2)
    kinds = {n: type(m).__name__ for n, m in toy.named_children()}
    assert kinds["classifier"] == "Linear" and kinds["proj"] == "LoRALinear"
    assert isinstance(toy.body[0], LoRALinear) and isinstance(toy.body[2], LoRALinear)
    assert not toy.classifier.weight.requires_grad
    toy = apply_lora(_Toy(), r"body\.[02]", r=2, alpha=4)
    assert isinstance(toy.body[0], LoRALinear) and isinstance(toy.proj, nn.Linear)
    assert toy.body[0].scaling == 2.0
    x = torch.randn(5, 12)
    plain = _Toy()
    assert torch.equal(apply_lora(copy.deepcopy(plain), ["proj"], r=3)(x), plain(x))  # B = 0: unchanged


def test_apply_lora_errors():
    with pytest.raises(ValueError, match=r"matched no linear layer of _Toy\. Linear layers: body\.0, "
                                         r"body\.2, proj, classifier; their names end in: 0, 2, classifier, "
                                         r"proj"):
        apply_lora(_Toy(), ["query"])
    with pytest.raises(ValueError, match=r"target 'body' matched a Sequential"):
        apply_lora(_Toy(), ["body"])
    toy = apply_lora(_Toy(), ["proj"])
    with pytest.raises(ValueError, match=r"'proj' is already a LoRALinear"):
        apply_lora(toy, ["proj"])
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match=r"'0\.out_proj': LoRA on a Linear inside nn\.MultiheadAttention"):
        apply_lora(mha, ["out_proj"])
    with pytest.raises(ValueError, match=r"matched no linear layer"):
        apply_lora(mha, "all-linear")  # MultiheadAttention's out_proj is skipped, so nothing is left
    with pytest.raises(ValueError, match=r"has no LoRALinear layers"):
        to_peft_state_dict(_Toy())
    with pytest.raises(ValueError, match=r"expected an adapter directory or a \.safetensors file"):
        load_peft_state_dict(apply_lora(_Toy(), ["proj"]), os.devnull)
