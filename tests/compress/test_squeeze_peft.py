"""lowrank.compress.squeeze_peft_adapter: PEFT adapters in and out, checked by PEFT itself on the real MiniLM.

The acceptance check: a PEFT LoRA adapter of rank 64 on every attention / FFN Linear of all-MiniLM-L6-v2 (lora_B
randomized with a decaying column scale so that ΔW ≠ 0 and its spectrum has gaps), squeezed to rank 16, loads
back with ``PeftModel.from_pretrained`` and computes what the dense reference model computes: the base weights
plus s·(truncated SVD of B·A) from ``lowrank.reference.squeeze`` folded in, evaluated in float64. Tolerance:
1e-5 of the output scale, and 1e-2 of the change the truncation itself makes (so a wrong rank or a wrong
scaling cannot pass). Synthetic adapter directories cover the config corner cases without a model.
"""
from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

from lowrank.compress import squeeze_peft_adapter
from lowrank.nn.peft import _pattern_value
from lowrank.reference.squeeze import truncated_delta
from tests.conftest import load_minilm

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TARGETS = ["query", "key", "value", "dense"]
SENTENCES = ["A low-rank update is cheap to train.", "The cat sat on the mat, and then it left."]
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def minilm():
    """(path, base model in eval mode, tokenized batch); offline, nothing is downloaded."""
    return load_minilm(SENTENCES)


def _trained_adapter(base, tmp_path, **cfg):
    """Save a PEFT adapter (r = 64 by default) with random lora_B, its columns scaled by decayʲ (decay 0.85 or 0.95,
    alternating over layers, so that spectra differ between layers); return (dir, {layer: (A, B, s)})."""
    cfg = {"r": 64, "lora_alpha": 32, "target_modules": TARGETS, **cfg}
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    gen = torch.Generator().manual_seed(0)
    layers = {}
    with torch.no_grad():
        for name, mod in pm.base_model.model.named_modules():
            if isinstance(mod, peft.tuners.lora.LoraLayer) and "default" in mod.lora_A:
                b = mod.lora_B["default"].weight
                decay = 0.85 if len(layers) % 2 else 0.95
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02 * decay ** torch.arange(b.shape[1]))
                layers[name] = (mod.lora_A["default"].weight.detach().clone(), b.detach().clone(),
                                mod.scaling["default"])
    src = tmp_path / "src"
    pm.save_pretrained(src)
    return src, layers


def _dense_reference(base, layers: dict, ranks: dict[str, int] | None):
    """float64 copy of the base model with s·truncated_k(B·A) (s·B·A if ``ranks`` is None) added to each LoRA
    layer's weight."""
    ref = copy.deepcopy(base).double()
    with torch.no_grad():
        for name, (a, b, s) in layers.items():
            a, b = a.double(), b.double()
            delta = b @ a if ranks is None else truncated_delta(a, b, ranks[name])
            ref.get_submodule(name).weight.add_(s * delta)
    return ref


def _check_outputs(base, dst, layers, ranks, batch):
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), dst).eval()
    ref = _dense_reference(base, layers, ranks)
    untruncated = _dense_reference(base, layers, None)
    with torch.no_grad():
        got = loaded(**batch).last_hidden_state.double()
        want = ref(**batch).last_hidden_state
        full = untruncated(**batch).last_hidden_state
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    effect = (full - want).abs().max().item()
    assert err <= REL_TOL * scale, f"max error {err:.3e} vs output scale {scale:.3e}"
    assert err <= 1e-2 * effect, f"max error {err:.3e} vs the truncation's own effect {effect:.3e}"
    return loaded


def test_squeeze_64_to_16_loads_into_peft_and_matches_dense_reference(minilm, tmp_path):
    _, base, batch = minilm
    src, layers = _trained_adapter(base, tmp_path)
    report = squeeze_peft_adapter(src, tmp_path / "dst", 16)
    cfg = json.loads((tmp_path / "dst" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 8
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    assert sorted(cfg["target_modules"]) == sorted(TARGETS) and cfg["peft_type"] == "LORA"
    assert set(report.ranks) == set(layers) and set(report.ranks.values()) == {16}
    assert report.params_after * 4 == report.params_before
    loaded = _check_outputs(base, tmp_path / "dst", layers, report.ranks, batch)
    for name, mod in loaded.base_model.model.named_modules():
        if name in layers:
            assert mod.lora_A["default"].weight.shape == (16, mod.in_features)
            assert mod.scaling["default"] == layers[name][2]  # the scaling is kept exactly (32/64 = 8/16)


@pytest.mark.parametrize("choice, extra", [
    ({"budget": 0.3}, {"use_rslora": True}),
    ({"energy": 0.9}, {"alpha_pattern": {"query": 64, "intermediate.dense": 8}}),
])
def test_heterogeneous_ranks_round_trip(minilm, tmp_path, choice, extra):
    _, base, batch = minilm
    src, layers = _trained_adapter(base, tmp_path, **extra)
    report = squeeze_peft_adapter(src, tmp_path / "dst", **choice)
    ranks = report.ranks
    assert len(set(ranks.values())) > 1  # the allocation is per layer
    if "budget" in choice:
        assert report.params_after <= 0.3 * report.params_before
    else:
        assert all(la.retained_energy >= 0.9 for la in report.layers)
    cfg = json.loads((tmp_path / "dst" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] == extra.get("use_rslora", False)
    loaded = _check_outputs(base, tmp_path / "dst", layers, ranks, batch)
    for name, mod in loaded.base_model.model.named_modules():
        if name in layers:
            assert mod.r["default"] == ranks[name]
            assert math.isclose(mod.scaling["default"], layers[name][2], rel_tol=1e-15)


# ---- synthetic adapter directories -------------------------------------------------------------------------
def _write_adapter(path, tensors: dict[str, torch.Tensor], **cfg):
    path.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q"], **cfg}
    (path / "adapter_config.json").write_text(json.dumps(config))


def _pair(name: str, r: int, n_in: int, n_out: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"base_model.model.{name}.lora_A.weight": torch.randn(r, n_in, generator=g),
            f"base_model.model.{name}.lora_B.weight": torch.randn(n_out, r, generator=g)}


def test_suffix_names_get_their_own_patterns_and_extra_tensors_pass_through(tmp_path):
    """'q' is a dotted suffix of 'enc.q': PEFT's first-match rule must still give each layer its own rank."""
    tensors = {**_pair("q", 8, 12, 10, 0), **_pair("enc.q", 8, 12, 10, 1), **_pair("enc.k", 8, 20, 6, 2),
               "base_model.model.classifier.weight": torch.randn(3, 5)}
    with torch.no_grad():  # make the layers' spectra very different so energy picks different ranks
        tensors["base_model.model.q.lora_B.weight"] *= 0.3 ** torch.arange(8.0)
    _write_adapter(tmp_path / "src", tensors, modules_to_save=["classifier"])
    report = squeeze_peft_adapter(tmp_path / "src", tmp_path / "dst", energy=0.99)
    ranks = report.ranks
    assert ranks["q"] < ranks["enc.q"]
    cfg = json.loads((tmp_path / "dst" / "adapter_config.json").read_text())
    keys = list(cfg["rank_pattern"])
    assert keys.index(re.escape("enc.q")) < keys.index(re.escape("q"))
    for name, k in ranks.items():
        assert _pattern_value(cfg["rank_pattern"], name, cfg["r"]) == k
        alpha = _pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"])
        assert alpha / k == pytest.approx(16 / 8, rel=1e-15)
    out = safetensors_torch.load_file(str(tmp_path / "dst" / "adapter_model.safetensors"))
    key = "base_model.model.classifier.weight"
    assert torch.equal(out[key], tensors[key])
    for name, k in ranks.items():
        a, b = (tensors[f"base_model.model.{name}.lora_{w}.weight"].double() for w in "AB")
        a2, b2 = (out[f"base_model.model.{name}.lora_{w}.weight"].double() for w in "AB")
        torch.testing.assert_close(b2 @ a2, truncated_delta(a, b, k), rtol=0, atol=1e-5 * (b @ a).abs().max())


def test_bf16_adapter_stays_bf16(tmp_path):
    tensors = {k: v.bfloat16() for k, v in _pair("q", 8, 16, 16, 0).items()}
    _write_adapter(tmp_path / "src", tensors)
    squeeze_peft_adapter(tmp_path / "src", tmp_path / "dst", 4)
    out = safetensors_torch.load_file(str(tmp_path / "dst" / "adapter_model.safetensors"))
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    assert out["base_model.model.q.lora_A.weight"].shape == (4, 16)


@pytest.mark.parametrize("cfg, tensors, match", [
    ({"use_dora": True}, None, "use_dora=True; this LoRA variant is not supported"),
    ({"lora_bias": True}, None, "lora_bias=True"),
    ({"peft_type": "IA3"}, None, "only LORA adapters"),
    ({"init_lora_weights": "pissa_niter_4"}, None, "rewrites the base weights"),
    ({"init_lora_weights": "olora"}, None, "rewrites the base weights"),
    ({"r": 4}, None, "has factors of rank 8 but the config gives r=4"),
    ({}, {"base_model.model.emb.lora_embedding_A": torch.zeros(8, 5)}, "cannot be squeezed"),
    ({}, {"base_model.model.q.lora_magnitude_vector": torch.zeros(10)}, "cannot be squeezed"),
    ({}, {"base_model.model.c.lora_A.weight": torch.zeros(8, 3, 1, 1),
          "base_model.model.c.lora_B.weight": torch.zeros(4, 8, 1, 1)}, "only 2-D"),
    ({}, {"base_model.model.z.lora_A.weight": torch.zeros(8, 3)}, "no partner factor"),
])
def test_unsupported_adapters_are_refused(tmp_path, cfg, tensors, match):
    _write_adapter(tmp_path / "src", {**_pair("q", 8, 12, 10, 0), **(tensors or {})}, **cfg)
    with pytest.raises(ValueError, match=match):
        squeeze_peft_adapter(tmp_path / "src", tmp_path / "dst", 2)
    assert not (tmp_path / "dst").exists()


def test_argument_errors(tmp_path):
    _write_adapter(tmp_path / "src", _pair("q", 8, 12, 10, 0))
    with pytest.raises(ValueError, match="exactly one of rank, energy or budget"):
        squeeze_peft_adapter(tmp_path / "src", tmp_path / "dst")
    with pytest.raises(ValueError, match="dst_dir must differ"):
        squeeze_peft_adapter(tmp_path / "src", tmp_path / "src", 2)
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        squeeze_peft_adapter(tmp_path, tmp_path / "dst", 2)
    with pytest.raises(ValueError, match="is not a directory"):
        squeeze_peft_adapter(tmp_path / "nope", tmp_path / "dst", 2)
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        squeeze_peft_adapter(tmp_path / "src", tmp_path / "dst", budget=0.0)
    bad = _pair("q", 8, 12, 10, 0)
    bad["base_model.model.q.lora_A.weight"][0, 0] = float("inf")
    _write_adapter(tmp_path / "bad", bad)
    with pytest.raises(ValueError, match="layer 'q': lora_a contains non-finite"):
        squeeze_peft_adapter(tmp_path / "bad", tmp_path / "dst", 2)
