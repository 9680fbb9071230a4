"""lowrank.nn.LowRankLinear: construction, forward, from_linear (plain or data-aware), from_factors and
dense()."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lowrank.nn.low_rank_linear import LowRankLinear


def _linear(m: int = 24, n: int = 40, bias: bool = True, dtype=torch.float64) -> nn.Linear:
    lin = nn.Linear(n, m, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_()
    return lin


@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_two_linears_over_leading_dims(bias):
    mod = LowRankLinear(13, 7, 3, bias=bias, dtype=torch.float64)
    x = torch.randn(2, 5, 13, dtype=torch.float64)
    want = x @ (mod.u @ mod.v).T + (mod.bias if bias else 0)
    torch.testing.assert_close(mod(x), want)
    assert mod(x[0, 0]).shape == (7,)
    assert set(dict(mod.named_parameters())) == ({"u", "v", "bias"} if bias else {"u", "v"})
    assert mod.u.shape == (7, 3) and mod.v.shape == (3, 13)


def test_init_matches_linear_variance():
    mod = LowRankLinear(512, 256, 64)
    var = mod.dense_weight().var().item()
    assert abs(var - 1 / (3 * 512)) / (1 / (3 * 512)) < 0.1


@pytest.mark.parametrize("rank, err", [(0, ValueError), (25, ValueError), (2.0, TypeError),
                                       (True, TypeError)])
def test_bad_rank(rank, err):
    with pytest.raises(err, match="rank"):
        LowRankLinear(40, 24, rank)


def test_from_linear_is_eckart_young_and_leaves_input_alone():
    lin = _linear()
    before = lin.weight.detach().clone()
    s = torch.linalg.svdvals(lin.weight.detach())
    for k in (1, 7, 24):
        mod = LowRankLinear.from_linear(lin, k)
        err2 = ((lin.weight - mod.dense_weight()) ** 2).sum().item()
        assert math.isclose(err2, (s[k:] ** 2).sum().item(), rel_tol=1e-9, abs_tol=1e-9)
        assert mod.rank == k and mod.u.dtype == torch.float64
        torch.testing.assert_close(mod.bias, lin.bias)
        assert mod.bias.data_ptr() != lin.bias.data_ptr()
    torch.testing.assert_close(lin.weight, before, rtol=0, atol=0)
    x = torch.randn(3, 40, dtype=torch.float64)
    torch.testing.assert_close(LowRankLinear.from_linear(lin, 24)(x), lin(x))  # full rank: exact
    # Σ split evenly: both factors carry √σ
    mod = LowRankLinear.from_linear(lin, 5)
    torch.testing.assert_close(mod.u.norm(dim=0), mod.v.norm(dim=1))


def test_from_linear_whitened_minimizes_output_error():
    """With S = chol(XᵀX/N), the factorization beats plain SVD on the activations X and hits the optimum."""
    torch.manual_seed(1)
    lin = _linear(32, 48)
    mix = torch.randn(48, 48, dtype=torch.float64) * torch.logspace(0, -3, 48, dtype=torch.float64)
    x = torch.randn(500, 48, dtype=torch.float64) @ mix.T   # strongly anisotropic activations
    c = x.T @ x / x.shape[0]
    s = torch.linalg.cholesky(c)
    k = 8
    white = LowRankLinear.from_linear(lin, k, scale=s)
    plain = LowRankLinear.from_linear(lin, k)

    def out_err(mod):
        return ((x @ (lin.weight - mod.dense_weight()).T) ** 2).sum().item() / x.shape[0]

    opt = (torch.linalg.svdvals(lin.weight.detach() @ s)[k:] ** 2).sum().item()
    assert math.isclose(out_err(white), opt, rel_tol=1e-6)
    assert out_err(white) < 0.5 * out_err(plain)
    # a diagonal scale (ASVD) is accepted too, and a general (non-triangular) invertible S gives the same
    # layer
    diag = LowRankLinear.from_linear(lin, k, scale=x.abs().mean(0).sqrt())
    assert diag.rank == k
    q = torch.linalg.qr(torch.randn(48, 48, dtype=torch.float64)).Q
    general = LowRankLinear.from_linear(lin, k, scale=s @ q)
    torch.testing.assert_close(general.dense_weight(), white.dense_weight())


def test_from_linear_row_scale_weights_rows():
    lin = _linear(20, 30)
    d = torch.ones(20, dtype=torch.float64)
    d[:5] = 100.0
    plain = LowRankLinear.from_linear(lin, 4)
    weighted = LowRankLinear.from_linear(lin, 4, row_scale=d)
    top = lambda mod: (lin.weight[:5] - mod.dense_weight()[:5]).norm().item()  # noqa: E731
    assert top(weighted) < top(plain)


def test_from_linear_bad_input():
    lin = _linear(6, 9)
    with pytest.raises(TypeError, match="linear"):
        LowRankLinear.from_linear(nn.Conv1d(3, 3, 1), 1)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear.from_linear(lin, 7)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear.from_linear(lin, 0)
    bad = _linear(6, 9)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="linear.weight"):
        LowRankLinear.from_linear(bad, 2)
    with pytest.raises(ValueError, match="scale"):
        LowRankLinear.from_linear(lin, 2, scale=torch.ones(5))
    with pytest.raises(ValueError, match="scale"):
        LowRankLinear.from_linear(lin, 2, scale=torch.zeros(9, 9))


def test_from_factors_copies_and_dense_roundtrip():
    u, v, b = torch.randn(5, 2), torch.randn(2, 7), torch.randn(5)
    mod = LowRankLinear.from_factors(u, v, b)
    assert mod.u.data_ptr() != u.data_ptr()
    with torch.no_grad():
        mod.u.zero_()
    assert u.abs().sum() > 0, "from_factors must not alias its inputs"
    mod = LowRankLinear.from_factors(u, v, b)
    lin = mod.dense()
    assert type(lin) is nn.Linear
    x = torch.randn(4, 7)
    torch.testing.assert_close(lin(x), mod(x))
    with pytest.raises(ValueError, match="v"):
        LowRankLinear.from_factors(u, torch.randn(3, 7))
    with pytest.raises(ValueError, match="bias"):
        LowRankLinear.from_factors(u, v, torch.randn(4))
    assert "rank=2" in repr(mod)


def test_trains_and_forward_is_stateless():
    mod = LowRankLinear(8, 6, 2)
    x = torch.randn(3, 8)
    before = {k: t.clone() for k, t in mod.state_dict().items()}
    y = mod(x)
    y.sum().backward()
    assert mod.u.grad is not None and mod.v.grad is not None and mod.bias.grad is not None
    for k, t in mod.state_dict().items():
        torch.testing.assert_close(t, before[k], rtol=0, atol=0)
    torch.testing.assert_close(y, F.linear(F.linear(x, mod.v), mod.u, mod.bias))
