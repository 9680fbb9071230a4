"""lowrank.nn.SparseLowRankLinear and SparseAdapterLinear: construction, conversions, checkpoints, counts."""
import io

import pytest
import torch
from torch import nn

from lowrank.nn import SparseAdapterLinear, SparseLowRankLinear
from lowrank.ops import SparseLayout
from lowrank.reference import sparse_lowrank_linear as reference


def _linear(n=24, m=20, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n, m)


def test_sltrain_init_and_forward():
    mod = SparseLowRankLinear(24, 20, 4, 0.1, seed=3)
    assert mod.layout == SparseLayout.random(20, 24, 0.1, seed=3)
    assert mod.s_values.shape == (48,) and not mod.lora_b.any()          # SLTrain: B = 0
    x = torch.randn(2, 5, 24)
    y = mod(x)
    torch.testing.assert_close(y, reference(x, mod.lora_a, mod.lora_b, mod.s_values, mod.layout, mod.bias))
    torch.testing.assert_close(y, mod.merged()(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None for p in mod.parameters())


@pytest.mark.parametrize("support", ["random", "topk", "channel"])
def test_from_linear_svd(support):
    lin = _linear()
    mod = SparseLowRankLinear.from_linear(lin, 4, 0.25, support=support, seed=1)
    assert mod.layout.kind == {"random": "random", "topk": "topk", "channel": "channels"}[support]
    w = lin.weight.detach().double()
    u, s, vh = torch.linalg.svd(w)
    lowrank = (u[:, :4] * s[:4]) @ vh[:4]
    err = (mod.dense().double() - w).norm()
    # SVD part exact; the sparse part removes residual energy on its support
    assert err < (w - lowrank).norm()
    torch.testing.assert_close((mod.lora_b @ mod.lora_a).double(), lowrank, rtol=1e-4, atol=1e-5)
    if support == "channel":
        assert mod.layout.nnz == 20 * round(0.25 * 24)
    if support == "topk":   # top-k keeps more residual energy than a random support of the same size
        rand = SparseLowRankLinear.from_linear(lin, 4, 0.25, support="random")
        assert err <= (rand.dense().double() - w).norm()
    x = torch.randn(7, 24)
    torch.testing.assert_close(mod(x), mod.merged()(x), rtol=1e-5, atol=1e-5)
    assert lin.weight.requires_grad   # input not modified


def test_from_linear_full_density_is_exact():
    lin = _linear()
    mod = SparseLowRankLinear.from_linear(lin, 2, 1.0, support="topk")
    torch.testing.assert_close(mod.dense(), lin.weight.detach(), rtol=1e-5, atol=1e-6)


def test_checkpoint_roundtrip_regenerates_random_support():
    mod = SparseLowRankLinear(24, 20, 4, 0.1, seed=7)
    sd = mod.state_dict()
    assert "_extra_state" in sd and "col_idx" not in sd["_extra_state"]["layout"]
    assert {"lora_a", "lora_b", "s_values", "bias"} <= set(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = SparseLowRankLinear(24, 20, 4, 0.1, seed=99)               # different support until loaded
    other.load_state_dict(torch.load(buf, weights_only=False))
    assert other.layout == mod.layout
    x = torch.randn(3, 24)
    torch.testing.assert_close(other(x), mod(x))
    topk = SparseLowRankLinear.from_linear(_linear(), 3, 0.2, support="topk")
    fresh = SparseLowRankLinear(24, 20, 3, 0.2)
    fresh.load_state_dict(topk.state_dict())
    assert fresh.layout == topk.layout
    with pytest.raises(ValueError, match="does not match"):
        SparseLowRankLinear(24, 20, 3, 0.1).load_state_dict(topk.state_dict())


def test_memory_report_is_honest():
    mod = SparseLowRankLinear(300, 200, 8, 0.05)
    rep = mod.memory_report()
    nnz = int(0.05 * 300 * 200)
    assert rep["parameters"] == 8 * 500 + nnz + 200 == sum(p.numel() for p in mod.parameters())
    assert rep["index_bytes"] == 2 * nnz + 4 * 201      # uint16 columns, int32 row pointers, no transpose
    assert rep["index_bytes"] <= 0.5 * rep["index_bytes_int64_flat"]
    assert rep["total_bytes"] == 4 * rep["parameters"] + rep["index_bytes"]


def test_to_moves_layout_and_dtype():
    mod = SparseLowRankLinear(24, 20, 4, 0.1).to(torch.float64)
    assert mod.s_values.dtype == torch.float64 and mod.layout.row_ptr.dtype == torch.int32
    assert mod.layout.row_ptr is mod.row_ptr
    x = torch.randn(3, 24, dtype=torch.float64)
    assert mod(x).dtype == torch.float64


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"rank must be <= min\(out_features, in_features\) = 5"):
        SparseLowRankLinear(5, 8, 6, 0.1)
    with pytest.raises(ValueError, match=r"density must lie in \[0, 1\], got 1.2"):
        SparseLowRankLinear(5, 8, 2, 1.2)
    with pytest.raises(ValueError, match=r"density must lie in \[0, 1\]"):
        SparseLowRankLinear.from_linear(_linear(), 2, -0.5)
    with pytest.raises(ValueError, match="rank must be <= min"):
        SparseLowRankLinear.from_linear(_linear(), 21, 0.1)
    with pytest.raises(ValueError, match="support must be"):
        SparseLowRankLinear.from_linear(_linear(), 2, 0.1, support="rows")
    with pytest.raises(TypeError, match="rank must be an int"):
        SparseLowRankLinear(5, 8, 2.0, 0.1)
    with pytest.raises(ValueError, match=r"layout must be a SparseLayout of shape \(8, 5\)"):
        SparseLowRankLinear(5, 8, 2, 0.1, layout=SparseLayout.random(5, 8, 0.1))


def test_sparse_adapter():
    base = _linear()
    w0 = base.weight.detach().clone()
    ad = SparseAdapterLinear.from_linear(base, 0.1, support="topk")
    assert ad.base is base and ad.base.weight is base.weight            # no copy of the base weight
    assert not base.weight.requires_grad
    x = torch.randn(4, 24)
    torch.testing.assert_close(ad(x), base(x))                          # zero-initialised delta
    with torch.no_grad():
        ad.s_values.normal_()
    torch.testing.assert_close(ad(x), ad.merged()(x), rtol=1e-5, atol=1e-5)
    ad(x).sum().backward()
    assert ad.s_values.grad is not None and base.weight.grad is None
    assert torch.equal(base.weight, w0)
    assert [n for n, p in ad.named_parameters() if p.requires_grad] == ["s_values"]
    # adapter checkpoint: values + layout record only (the base is saved with the base model)
    sd = {k: v for k, v in ad.state_dict().items() if not k.startswith("base.")}
    assert set(sd) == {"s_values", "_extra_state"}


def test_from_sltrain_state_dict():
    """SLTrain's SpLoRaLinear state (values in sorted-flat-index order) loads without permutation."""
    g = torch.Generator().manual_seed(4)
    out, in_, r, nnz, alpha = 20, 24, 4, 37, 32.0
    idx = torch.sort(torch.randperm(out * in_, generator=g)[:nnz]).values
    state = {"lora_A": torch.randn(r, in_, generator=g), "lora_B": torch.randn(out, r, generator=g),
             "sparse_value": torch.randn(nnz, generator=g), "sparse_index": idx,
             "bias": torch.randn(out, generator=g)}
    mod = SparseLowRankLinear.from_sltrain(state, scaling=alpha / r)
    x = torch.randn(5, in_, generator=g)
    s_dense = torch.zeros(out * in_).index_add_(0, idx, state["sparse_value"]).view(out, in_)
    expected = x @ (state["lora_A"] * alpha / r).t() @ state["lora_B"].t() + x @ s_dense.t() + state["bias"]
    torch.testing.assert_close(mod(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(mod.s_values.detach(), state["sparse_value"])
    with pytest.raises(ValueError, match="sorted row-major"):
        SparseLowRankLinear.from_sltrain({**state, "sparse_index": idx.flip(0)}, scaling=1.0)
    with pytest.raises(ValueError, match="no 'sparse_index'"):
        SparseLowRankLinear.from_sltrain({k: v for k, v in state.items() if k != "sparse_index"}, scaling=1.0)
