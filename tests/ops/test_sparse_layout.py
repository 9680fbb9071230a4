"""lowrank.ops.SparseLayout: SLTrain-exact random supports, the CSC transpose, constructors, errors."""
import pytest
import torch

from lowrank.ops import SparseLayout
from lowrank.reference.sparse_lowrank_linear import flat_indices


def _check_csc(layout: SparseLayout) -> None:
    out, in_ = layout.shape
    flat = layout.flat_indices()
    col_ptr, row_idx, perm = layout.transpose()
    assert col_ptr.dtype == row_idx.dtype == perm.dtype == torch.int32
    cols = torch.repeat_interleave(torch.arange(in_), col_ptr.long().diff())
    # CSC entry k is CSR entry perm[k]: same position
    assert torch.equal(flat[perm.long()], row_idx.long() * in_ + cols)
    assert torch.equal(torch.sort(perm.long()).values, torch.arange(layout.nnz))
    # CSC order: by column, rows ascending inside each column
    key = cols * out + row_idx.long()
    assert bool((key.diff() > 0).all()) if layout.nnz > 1 else True


@pytest.mark.parametrize("shape,density,seed", [((17, 33), 0.05, 0), ((64, 40), 0.5, 3), ((5, 7), 0.0, 1),
                                                ((3, 4), 1.0, 2), ((255, 1), 0.3, 9)])
def test_random_is_sltrain_support(shape, density, seed):
    out, in_ = shape
    layout = SparseLayout.random(out, in_, density, seed=seed)
    nnz = int(density * out * in_)
    gen = torch.Generator().manual_seed(seed)
    expected = torch.sort(torch.randperm(out * in_, generator=gen)[:nnz]).values
    assert layout.nnz == nnz and layout.kind == "random" and layout.seed == seed
    assert torch.equal(layout.flat_indices(), expected)
    assert torch.equal(flat_indices(layout), expected)
    # CPU: int32 row pointers, uint16 columns (in <= 65536), no transpose kept
    assert layout.row_ptr.dtype == torch.int32 and layout.col_idx.dtype == torch.uint16 and layout.csc is None
    _check_csc(layout)
    assert SparseLayout.from_flat(expected, shape) == layout


def test_mask_topk_channels():
    scores = torch.randn(9, 13, generator=torch.Generator().manual_seed(0))
    top = SparseLayout.topk(scores, 0.2)
    k = int(0.2 * 9 * 13)
    kept = scores.abs().flatten()[top.flat_indices()]
    assert top.nnz == k and kept.min() >= scores.abs().flatten().sort(descending=True).values[k - 1]
    _check_csc(top)
    mask = scores > 0.5
    assert torch.equal(SparseLayout.from_mask(mask).flat_indices(), mask.flatten().nonzero().flatten())
    cols = SparseLayout.channels(9, 13, [2, 7], dim=1)
    dense = torch.zeros(9 * 13, dtype=torch.bool)
    dense[cols.flat_indices()] = True
    assert dense.view(9, 13)[:, [2, 7]].all() and dense.sum() == 18 and cols.kind == "channels"
    _check_csc(cols)
    rows = SparseLayout.channels(9, 13, torch.tensor([4]), dim=0)
    assert torch.equal(rows.flat_indices(), torch.arange(4 * 13, 5 * 13))


def test_state_roundtrip_and_index_bytes():
    layout = SparseLayout.random(100, 300, 0.03, seed=5)
    st = layout.state()
    assert "col_idx" not in st and st["nnz"] == 900 and st["seed"] == 5     # regenerated, not stored
    assert SparseLayout.from_state(st) == layout
    top = SparseLayout.topk(torch.randn(20, 30), 0.1)
    assert SparseLayout.from_state(top.state()) == top
    # uint16 columns + int32 row pointers: about a quarter of SLTrain's int64 flat indices (issue 6: <= 0.5x)
    assert layout.index_bytes() == 2 * 900 + 4 * 101 <= 0.5 * 8 * 900
    assert layout.state()["kind"] == "random" and top.state()["col_idx"].dtype == torch.uint16
    # a checkpoint written with int32 columns (before they narrowed) loads into the same layout
    st_top = {**top.state(), "col_idx": top.state()["col_idx"].to(torch.int32)}
    assert SparseLayout.from_state(st_top) == top and SparseLayout.from_state(st_top).col_idx.dtype == torch.uint16
    with pytest.raises(ValueError, match="layout_version"):
        SparseLayout.from_state({**st, "layout_version": 99})


def test_wide_layouts_keep_int32_columns():
    # past 65536 columns uint16 cannot hold a column: int32, and the kernels read either
    layout = SparseLayout.from_indices(torch.tensor([0, 0, 1]), torch.tensor([3, 70_000, 65_536]), (2, 70_001))
    assert layout.col_idx.dtype == torch.int32 and layout.col_idx.tolist() == [3, 70_000, 65_536]
    edge = SparseLayout.from_indices(torch.tensor([0, 1]), torch.tensor([0, 65_535]), (2, 65_536))
    assert edge.col_idx.dtype == torch.uint16 and edge.flat_indices().tolist() == [0, 2 * 65_536 - 1]
    assert layout.index_bytes() == 4 * 3 + 4 * 3
    assert layout.to("meta").col_idx.dtype == torch.int32 and layout.to("meta").csc is None


def test_bad_input():
    with pytest.raises(ValueError, match=r"density must lie in \[0, 1\], got 1.5"):
        SparseLayout.random(4, 4, 1.5)
    with pytest.raises(ValueError, match=r"density must lie in \[0, 1\], got -0.1"):
        SparseLayout.random(4, 4, -0.1)
    with pytest.raises(ValueError, match="density must lie in"):
        SparseLayout.random(4, 4, float("nan"))
    with pytest.raises(TypeError, match="density must be a real number"):
        SparseLayout.random(4, 4, "0.1")
    with pytest.raises(ValueError, match="density must lie in"):
        SparseLayout.topk(torch.randn(3, 3), 2.0)
    with pytest.raises(ValueError, match="out_features must be >= 1"):
        SparseLayout.random(0, 4, 0.1)
    r, c = torch.tensor([0, 0, 1]), torch.tensor([1, 3, 0])
    assert SparseLayout.from_indices(r, c, (2, 4)).nnz == 3
    with pytest.raises(ValueError, match=r"cols must lie in \[0, 4\), got values in \[0, 4\]"):
        SparseLayout.from_indices(r, torch.tensor([1, 4, 0]), (2, 4))
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 2\)"):
        SparseLayout.from_indices(torch.tensor([0, 0, 2]), c, (2, 4))
    with pytest.raises(ValueError, match=r"rows must lie in"):
        SparseLayout.from_indices(torch.tensor([-1, 0, 1]), c, (2, 4))
    with pytest.raises(ValueError, match=r"sorted row-major.*entry 2 \(0, 0\) follows \(1, 3\)"):
        SparseLayout.from_indices(torch.tensor([0, 1, 0]), torch.tensor([1, 3, 0]), (2, 4))
    with pytest.raises(ValueError, match=r"duplicate support entry \(row 0, col 3\)"):
        SparseLayout.from_indices(torch.tensor([0, 0, 0]), torch.tensor([1, 3, 3]), (2, 4))
    with pytest.raises(ValueError, match="duplicate"):
        SparseLayout.from_flat(torch.tensor([1, 5, 5]), (2, 4))
    with pytest.raises(TypeError, match="rows must be a 1-D integer tensor"):
        SparseLayout.from_indices(torch.tensor([0.0]), torch.tensor([0]), (2, 4))
    with pytest.raises(ValueError, match="same length"):
        SparseLayout.from_indices(torch.tensor([0]), torch.tensor([0, 1]), (2, 4))
    with pytest.raises(ValueError, match="channels contains duplicates"):
        SparseLayout.channels(4, 4, [1, 1])
