"""lowrank.compress.squeeze: squeeze_lora against the dense truncated SVD (lowrank.reference.squeeze), batching,
energy, dtypes, the RSVD path, memory at 200 000², bad input, and squeeze_model on LoRALinear models.

Optimality rule: ‖ΔW − B'·A'‖_F / ‖ΔW − SVD_k(ΔW)‖_F = 1 to 1e-5 (relative) on factors with decaying spectra,
measured in float64. Factors are built unbalanced (B = U₀·diag(σ)·G, A = G⁻¹·V₀ᵀ with a random G), as training
leaves them, so the squeeze has to do real work to recover the balanced SVD factors.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank.compress import SqueezeResult, squeeze_lora, squeeze_model
from lowrank.compress.squeeze import _auto_method
from lowrank.nn import LoRALinear
from lowrank.reference.squeeze import squeeze_lora as ref_squeeze
from lowrank.reference.squeeze import truncated_delta

OPT_RTOL = 1e-5


def make_factors(m: int, n: int, r: int, *, batch: tuple[int, ...] = (), dtype=torch.float64,
                 decay: float = 0.8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [..., r, n], B [..., m, r], σ [p]) with ΔW = B·A = U₀·diag(σ)·V₀ᵀ, σᵢ = decayⁱ, p = min(m, n, r)."""
    g = torch.Generator().manual_seed(seed)
    p = min(m, n, r)
    u0 = torch.linalg.qr(torch.randn(*batch, m, p, generator=g, dtype=torch.float64)).Q
    v0 = torch.linalg.qr(torch.randn(*batch, n, p, generator=g, dtype=torch.float64)).Q
    sigma = decay ** torch.arange(p, dtype=torch.float64)
    mix = torch.randn(*batch, p, r, generator=g, dtype=torch.float64) / r ** 0.5
    mix = mix + torch.eye(p, r, dtype=torch.float64)
    b = (u0 * sigma) @ mix                                  # [m, r]
    a = torch.linalg.pinv(mix) @ v0.mT                      # [r, n]: mix·pinv(mix) = I_p
    return a.to(dtype), b.to(dtype), sigma


def _ratio(a: torch.Tensor, b: torch.Tensor, res: SqueezeResult, k: int) -> float:
    delta = b.double() @ a.double()
    err = torch.linalg.matrix_norm(delta - res.lora_b.double() @ res.lora_a.double())
    opt = torch.linalg.matrix_norm(delta - truncated_delta(a.double(), b.double(), k))
    return (err / opt).max().item(), (err / opt).min().item()


# ---- optimality vs the dense reference ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m, n, r, k", [(96, 80, 24, 6), (40, 120, 16, 1), (150, 60, 64, 12),
                                        (30, 200, 48, 29)])
def test_error_is_optimal(dtype, m, n, r, k):
    a, b, _ = make_factors(m, n, r, dtype=dtype)
    res = squeeze_lora(a, b, k)
    hi, lo = _ratio(a, b, res, k)
    assert abs(hi - 1) <= OPT_RTOL and abs(lo - 1) <= OPT_RTOL, (hi, lo)
    assert res.lora_a.shape == (k, n) and res.lora_b.shape == (m, k) and res.S.shape == (k,)
    assert res.lora_a.dtype == dtype and res.lora_b.dtype == dtype and res.method == "exact" and res.rank == k


def test_fp64_matches_reference_factors():
    """fp64: the same factors as the dense SVD (signs included), S and the whole spectrum to rounding."""
    a, b, sigma = make_factors(70, 90, 20)
    ra, rb, rs, rs_all = ref_squeeze(a, b, 7)
    res = squeeze_lora(a, b, 7)
    torch.testing.assert_close(res.lora_a, ra, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.lora_b, rb, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.S, rs, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.S_src, rs_all[:20], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.S_src, sigma, rtol=1e-12, atol=1e-14)
    # balanced: B'ᵀB' = A'A'ᵀ = diag(S)
    torch.testing.assert_close(res.lora_b.mT @ res.lora_b, torch.diag(res.S), rtol=0, atol=1e-12)
    torch.testing.assert_close(res.lora_a @ res.lora_a.mT, torch.diag(res.S), rtol=0, atol=1e-12)


def test_full_rank_is_a_lossless_refactorization():
    a, b, _ = make_factors(50, 40, 16)
    res = squeeze_lora(a, b, 16)
    torch.testing.assert_close(res.lora_b @ res.lora_a, b @ a, rtol=0, atol=1e-13)
    assert res.retained_energy.item() == pytest.approx(1.0, rel=1e-14)


def test_signs_are_deterministic():
    a, b, _ = make_factors(64, 48, 12, batch=(3,))
    res = squeeze_lora(a, b, 5)
    u = res.lora_b / res.S.sqrt().unsqueeze(-2)
    idx = u.abs().argmax(dim=-2, keepdim=True)
    assert bool((torch.gather(u, -2, idx) > 0).all())
    again = squeeze_lora(a.clone(), b.clone(), 5)
    assert torch.equal(again.lora_a, res.lora_a) and torch.equal(again.lora_b, res.lora_b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_parity(dtype):
    a, b, _ = make_factors(72, 56, 20, batch=(2, 3), dtype=dtype, seed=3)
    res = squeeze_lora(a, b, 8)
    assert res.lora_a.shape == (2, 3, 8, 56) and res.lora_b.shape == (2, 3, 72, 8)
    assert res.S.shape == (2, 3, 8)
    hi, lo = _ratio(a, b, res, 8)
    assert abs(hi - 1) <= OPT_RTOL and abs(lo - 1) <= OPT_RTOL
    tol = {"rtol": 0, "atol": 1e-12 if dtype == torch.float64 else 2e-5}
    for i in range(2):
        for j in range(3):
            one = squeeze_lora(a[i, j], b[i, j], 8)
            torch.testing.assert_close(res.lora_a[i, j], one.lora_a, **tol)
            torch.testing.assert_close(res.lora_b[i, j], one.lora_b, **tol)
            torch.testing.assert_close(res.S[i, j], one.S, **tol)


# ---- energy ------------------------------------------------------------------------------------------------
def test_energy_picks_the_smallest_rank():
    a, b, sigma = make_factors(60, 50, 24, decay=0.7)
    frac = (sigma.square().cumsum(0) / sigma.square().sum())
    for e in (0.5, 0.9, 0.99, 0.999999, 1.0):
        res = squeeze_lora(a, b, energy=e)
        k = res.rank
        assert int(res.ranks) == k
        assert frac[k - 1] >= e - 1e-12 and (k == 1 or frac[k - 2] < e)
        assert res.retained_energy.item() >= e - 1e-12
        assert res.S_src.shape == (24,)
    assert squeeze_lora(a, b, energy=1.0).rank <= 24


def test_energy_batched_returns_max_rank_and_per_matrix_ranks():
    a1, b1, _ = make_factors(40, 40, 16, decay=0.3, seed=1)
    a2, b2, _ = make_factors(40, 40, 16, decay=0.9, seed=2)
    a, b = torch.stack([a1, a2]), torch.stack([b1, b2])
    res = squeeze_lora(a, b, energy=0.95)
    r1, r2 = squeeze_lora(a1, b1, energy=0.95).rank, squeeze_lora(a2, b2, energy=0.95).rank
    assert r1 < r2
    assert res.ranks.tolist() == [r1, r2] and res.rank == r2
    assert bool((res.retained_energy >= 0.95).all())


def test_zero_delta_energy_is_rank_one():
    a = torch.randn(8, 30, dtype=torch.float64)
    b = torch.zeros(20, 8, dtype=torch.float64)
    res = squeeze_lora(a, b, energy=0.9)
    assert res.rank == 1 and res.retained_energy.item() == 1.0
    assert torch.count_nonzero(res.lora_b @ res.lora_a) == 0


# ---- dtypes, inputs untouched ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computed_in_fp32(dtype):
    a, b, _ = make_factors(64, 48, 16, dtype=dtype)
    res = squeeze_lora(a, b, 4)
    assert res.lora_a.dtype == dtype and res.lora_b.dtype == dtype and res.S.dtype == torch.float32
    oracle = squeeze_lora(a.double(), b.double(), 4)
    # the only low-precision step is the final cast: within a rounding of the fp64 factors of the same input
    eps = torch.finfo(dtype).eps
    for got, want in ((res.lora_a, oracle.lora_a), (res.lora_b, oracle.lora_b)):
        assert (got.double() - want).abs().max() <= eps * want.abs().max()


def test_inputs_untouched_and_outputs_new():
    a, b, _ = make_factors(32, 24, 8, dtype=torch.float32)
    a.requires_grad_(True)
    a0, b0 = a.detach().clone(), b.clone()
    res = squeeze_lora(a, b, 8)
    assert torch.equal(a.detach(), a0) and torch.equal(b, b0)
    assert not res.lora_a.requires_grad
    ptrs = {a.data_ptr(), b.data_ptr()}
    assert res.lora_a.data_ptr() not in ptrs and res.lora_b.data_ptr() not in ptrs
    assert res.lora_a.is_contiguous() and res.lora_b.is_contiguous()


def test_huge_layer_never_forms_delta():
    """m = n = 200 000, r = 8: ΔW would take 160 GB in fp32; the factored path needs a few times (m + n)·r."""
    g = torch.Generator().manual_seed(0)
    m = n = 200_000
    a = torch.randn(8, n, generator=g)
    b = torch.randn(m, 8, generator=g) * (0.5 ** torch.arange(8.0))
    res = squeeze_lora(a, b, 4)
    assert res.lora_a.shape == (4, n) and res.lora_b.shape == (m, 4) and res.method == "exact"
    # ‖ΔW‖_F² = tr(BᵀB·AAᵀ) = Σσ², computed from the factors in fp64
    a64, b64 = a.double(), b.double()
    total = ((b64.mT @ b64) * (a64 @ a64.mT)).sum()
    # tolerance from fp32's own error on this sum over 2·10⁵ rows (the Gram form in fp32), with the usual
    # sqrt(n)·eps growth as a floor: the accumulation order differs between CPUs (AVX2 vs AVX-512 MKL kernels)
    total32 = ((b.mT @ b) * (a @ a.mT)).sum().double()
    eps = torch.finfo(torch.float32).eps
    rtol = 2 * max(((total32 - total).abs() / total).item(), n ** 0.5 * eps)
    torch.testing.assert_close(res.S_src.double().square().sum(), total, rtol=rtol, atol=0)
    # balanced orthogonal factors: B'ᵀB' = A'A'ᵀ = diag(S)
    torch.testing.assert_close((res.lora_b.mT @ res.lora_b).double(), torch.diag(res.S).double(), rtol=0,
                               atol=1e-4 * res.S[0].item())
    torch.testing.assert_close((res.lora_a @ res.lora_a.mT).double(), torch.diag(res.S).double(), rtol=0,
                               atol=1e-4 * res.S[0].item())


# ---- the RSVD path -----------------------------------------------------------------------------------------
def test_rsvd_path_near_optimal_and_reproducible():
    a, b, _ = make_factors(400, 300, 200, dtype=torch.float32, decay=0.85)
    res = squeeze_lora(a, b, 8, method="rsvd", generator=torch.Generator().manual_seed(0))
    assert res.method == "rsvd" and res.S_src is None and res.retained_energy is None
    hi, _ = _ratio(a, b, res, 8)
    assert hi <= 1.02
    again = squeeze_lora(a, b, 8, method="rsvd", generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.lora_a, res.lora_a)


def test_auto_dispatch():
    assert _auto_method(4096, 4096, 64, 16) == "exact"
    assert _auto_method(4096, 4096, 256, 16) == "exact"
    assert _auto_method(4096, 4096, 1024, 16) == "rsvd" and _auto_method(4096, 4096, 1024, 64) == "exact"
    assert _auto_method(4096, 4096, 2048, 16) == "rsvd"
    assert _auto_method(100, 100, 64, 60) == "exact"
    a, b, _ = make_factors(30, 20, 8)
    assert squeeze_lora(a, b, energy=0.5).method == "exact"


# ---- bad input ---------------------------------------------------------------------------------------------
def _ab(dtype=torch.float32):
    return torch.randn(4, 10, dtype=dtype), torch.randn(12, 4, dtype=dtype)


@pytest.mark.parametrize("call, exc, match", [
    (lambda a, b: squeeze_lora(a, b, 0), ValueError, "rank must be >= 1"),
    (lambda a, b: squeeze_lora(a, b, 5), ValueError, r"rank must be <= min\(r_src"),
    (lambda a, b: squeeze_lora(a, b, 2.0), TypeError, "rank must be an integer"),
    (lambda a, b: squeeze_lora(a, b, True), TypeError, "rank must be an integer"),
    (lambda a, b: squeeze_lora(a, b), ValueError, "exactly one of rank or energy; got none"),
    (lambda a, b: squeeze_lora(a, b, 2, energy=0.9), ValueError, "got rank and energy"),
    (lambda a, b: squeeze_lora(a, b, energy=0.0), ValueError, r"energy must be in \(0, 1\]"),
    (lambda a, b: squeeze_lora(a, b, energy=1.5), ValueError, r"energy must be in \(0, 1\]"),
    (lambda a, b: squeeze_lora(a, b, energy=float("nan")), ValueError, r"energy must be in \(0, 1\]"),
    (lambda a, b: squeeze_lora(a, b, energy="0.9"), TypeError, "energy must be a real number"),
    (lambda a, b: squeeze_lora(a, b.mT, 2), ValueError, "shape mismatch"),
    (lambda a, b: squeeze_lora(a[:3], b, 2), ValueError, "shape mismatch"),
    (lambda a, b: squeeze_lora(a.expand(2, 4, 10), b, 2), ValueError, "shape mismatch"),
    (lambda a, b: squeeze_lora(a, b.double(), 2), TypeError, "must share a dtype"),
    (lambda a, b: squeeze_lora(a.int(), b.int(), 2), TypeError, "lora_a must have a real floating dtype"),
    (lambda a, b: squeeze_lora(a[0], b, 2), ValueError, "lora_a must have at least 2 dimensions"),
    (lambda a, b: squeeze_lora(a.numpy(), b, 2), TypeError, "lora_a must be a torch.Tensor"),
    (lambda a, b: squeeze_lora(a, b, 2, method="svd"), ValueError, "method must be one of"),
    (lambda a, b: squeeze_lora(a, b, energy=0.9, method="rsvd"), ValueError, "energy needs the whole"),
    (lambda a, b: squeeze_lora(a, b, 2, generator=0), TypeError, "generator must be a torch.Generator"),
])
def test_bad_input(call, exc, match):
    a, b = _ab()
    with pytest.raises(exc, match=match):
        call(a, b)


@pytest.mark.parametrize("which", ["lora_a", "lora_b"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input(which, value):
    a, b = _ab()
    (a if which == "lora_a" else b)[1, 2] = value
    with pytest.raises(ValueError, match=f"{which} contains non-finite values"):
        squeeze_lora(a, b, 2)


# ---- squeeze_model -----------------------------------------------------------------------------------------
def _lora_model(seed: int = 0, dtype=torch.float64) -> nn.Module:
    """Four LoRALinear layers (two of one shape, so they are decomposed as a batch), trained-looking factors."""
    torch.manual_seed(seed)
    shapes = [(48, 40, 16, 32.0), (48, 40, 16, 8.0), (24, 48, 12, 12.0), (40, 24, 8, 16.0)]
    model = nn.Sequential(*[LoRALinear(i, o, r, alpha, dtype=dtype) for i, o, r, alpha in shapes])
    for idx, layer in enumerate(model):
        a, b, _ = make_factors(layer.out_features, layer.in_features, layer.r, decay=0.6 + 0.1 * idx,
                               seed=idx)
        with torch.no_grad():
            layer.lora_a.copy_(a)
            layer.lora_b.copy_(b)
    return model


def _deltas(model: nn.Module) -> list[torch.Tensor]:
    return [m.scaling * (m.lora_b.detach().double() @ m.lora_a.detach().double()) for m in model]


@pytest.mark.parametrize("kwargs", [{"rank": 6}, {"energy": 0.97}, {"budget": 0.35}])
def test_squeeze_model_matches_the_reference(kwargs):
    model = _lora_model()
    before = _deltas(model)
    modules = list(model)
    old_params = [(m.lora_a, m.lora_b, m.lora_a.detach().clone(), m.scaling) for m in model]
    report = squeeze_model(model, **kwargs)
    assert list(model) == modules  # same module objects
    for layer, m, d0, (old_a, old_b, old_a_copy, scaling) in zip(report.layers, model, before, old_params):
        k = layer.new_rank
        assert m.r == k and m.lora_a.shape == (k, m.in_features) and m.lora_b.shape == (m.out_features, k)
        assert m.scaling == pytest.approx(scaling, rel=1e-15)
        assert torch.equal(old_a, old_a_copy)  # old parameters untouched
        if k != layer.old_rank:
            assert m.lora_a is not old_a and m.lora_b is not old_b
            assert isinstance(m.lora_a, nn.Parameter) and m.lora_a.requires_grad
        want = scaling * truncated_delta(old_a.double(), old_b.double(), k)
        torch.testing.assert_close(m.scaling * (m.lora_b @ m.lora_a), want, rtol=0, atol=1e-12)
        sq = torch.linalg.svdvals(d0).square()
        assert layer.retained_energy == pytest.approx(float(sq[:k].sum() / sq.sum()), rel=1e-10)
    if "rank" in kwargs:
        assert [la.new_rank for la in report.layers] == [6, 6, 6, 6]
    if "energy" in kwargs:
        assert all(la.retained_energy >= 0.97 for la in report.layers)
    if "budget" in kwargs:
        assert report.params_after <= 0.35 * report.params_before
    assert "total:" in str(report)


def test_squeeze_model_budget_takes_the_largest_scaled_values():
    """Equal-shape layers (equal cost per triplet): every kept s·σ is ≥ every dropped one, and the budget is met."""
    torch.manual_seed(0)
    model = nn.Sequential(*[LoRALinear(32, 32, 12, alpha, dtype=torch.float64)
                            for alpha in (4.0, 12.0, 24.0)])
    for idx, layer in enumerate(model):
        a, b, _ = make_factors(32, 32, 12, decay=0.75, seed=10 + idx)
        with torch.no_grad():
            layer.lora_a.copy_(a)
            layer.lora_b.copy_(b)
    values = [m.scaling * torch.linalg.svdvals(m.lora_b.detach() @ m.lora_a.detach())[:12] for m in model]
    report = squeeze_model(model, budget=0.5)
    ranks = [la.new_rank for la in report.layers]
    assert sum(ranks) == 18 and report.params_after == 18 * 64
    kept = torch.cat([v[:k] for v, k in zip(values, ranks)])
    dropped = torch.cat([v[k:] for v, k in zip(values, ranks)])
    assert kept.min() >= dropped.max()
    assert ranks[2] > ranks[0]  # the layer with the largest scaling keeps the most


def test_squeeze_model_leaves_layers_at_their_rank_alone_and_forward_matches():
    model = _lora_model(dtype=torch.float32)
    small = model[3]
    a_before = small.lora_a
    report = squeeze_model(model, rank=8)
    assert small.lora_a is a_before and report.layers[3].new_rank == 8  # r = 8 already: untouched
    for m in model:
        x = torch.randn(5, m.in_features)
        torch.testing.assert_close(m(x), m.merged()(x), rtol=1e-5, atol=1e-5)


def test_squeeze_model_errors():
    with pytest.raises(ValueError, match="no lowrank.nn.LoRALinear"):
        squeeze_model(nn.Linear(3, 3), rank=1)
    model = _lora_model()
    with pytest.raises(ValueError, match="exactly one of rank, energy or budget"):
        squeeze_model(model, rank=2, budget=0.5)
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        squeeze_model(model, budget=1.2)
    with pytest.raises(ValueError, match="budget must be >="):
        squeeze_model(model, budget=0.01)
    with torch.no_grad():
        model[1].lora_b[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '1': lora_b contains non-finite"):
        squeeze_model(model, rank=2)
