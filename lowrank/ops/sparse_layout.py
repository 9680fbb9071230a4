"""Fixed sparse supports for ``W = B·A + S``: :class:`SparseLayout`.

A layout is the set of positions (i, j) of an [out, in] matrix where S may be nonzero, stored once per layer
(never per call):

* CSR, the order of ``s_values``: ``row_ptr`` int32 [out + 1], ``col_idx`` [nnz], rows ascending and the columns
  of each row strictly ascending. This is exactly SLTrain's order (its ``sparse_index`` is the sorted row-major
  flat position ``i·in + j``), so SLTrain values load without a permutation. On the CPU ``col_idx`` is uint16
  wherever ``in <= 65536`` (every layer of the models this library targets), else int32.
* On a CUDA device only, the CSC transpose the CUDA backward reads for ``dx = g·S``: ``col_ptr`` int32 [in + 1],
  ``row_idx`` int32 [nnz] and ``perm`` int32 [nnz], where CSC entry k is CSR entry ``perm[k]``, built once when
  the layout is created on or moved to the device (``csc``; None elsewhere). The CPU backward walks the CSR
  order alone and scatters g·S into a per-thread transposed block, so no transpose is kept there.

Index memory on the CPU is therefore 2·nnz + 4·(out + 1) bytes (≈ 0.25× SLTrain's int64 flat indices; 4·nnz +
4·(out + 1) past 65536 columns); a CUDA layout holds 4·(3·nnz + out + in + 2) bytes. :meth:`SparseLayout.transpose`
computes the CSC order on demand on any device.

Constructors: :meth:`SparseLayout.random` (SLTrain: ``randperm(out·in)[:nnz]`` sorted, on CPU with a seeded
``torch.Generator``, so a checkpoint needs only (seed, shape, nnz)), :meth:`SparseLayout.channels` (LOST:
whole input columns or output rows), :meth:`SparseLayout.from_mask`, :meth:`SparseLayout.topk` (largest
|score| entries: SHiRA-WM, LIFT-style principal weights, LOST's residual) and
:meth:`SparseLayout.from_indices` (explicit (row, col) pairs, validated: in range, sorted row-major, no duplicates).
"""
from __future__ import annotations

import numbers

import torch

__all__ = ["SparseLayout", "LAYOUT_VERSION", "column_index_dtype"]

LAYOUT_VERSION = 1   # bump when the meaning of the stored (kind, seed, shape, nnz, indices) changes
_INT32_MAX = 2 ** 31 - 1
_UINT16_COLUMNS = 2 ** 16   # up to this many input columns, a CPU layout stores its column indices as uint16


def column_index_dtype(in_features: int, device: torch.device) -> torch.dtype:
    """The dtype of ``col_idx`` for a layout with ``in_features`` columns on ``device``: uint16 on the CPU up to
    65536 columns (the CPU kernels widen it in registers), int32 otherwise (the CUDA and Triton kernels load
    4-byte indices)."""
    return torch.uint16 if device.type == "cpu" and in_features <= _UINT16_COLUMNS else torch.int32


def _check_dim(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"SparseLayout: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"SparseLayout: {name} must be >= 1, got {value}")
    if value > _INT32_MAX:
        raise ValueError(f"SparseLayout: {name} = {value} does not fit the int32 indices")
    return int(value)


def check_density(density: object, name: str = "density") -> float:
    """``density`` as a float in [0, 1]; TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {type(density).__name__}")
    if not 0.0 <= float(density) <= 1.0:   # also False for NaN
        raise ValueError(f"{name} must lie in [0, 1], got {density}")
    return float(density)


class SparseLayout:
    """Support of a sparse [out, in] matrix in CSR order (see the module docstring).

    Attributes:
        shape: (out, in).
        nnz: number of stored positions.
        row_ptr: CSR row pointers, int32 [out + 1].  col_idx: CSR columns [nnz], uint16 or int32
            (:func:`column_index_dtype`).
        csc: (col_ptr, row_idx, perm) int32 on a CUDA device, else None.
        kind: "random", "channels", "mask", "topk" or "indices" (how it was built).
        seed: the generator seed of a "random" layout (None otherwise): with (shape, nnz) it regenerates it.
    """

    def __init__(self, shape: tuple[int, int], row_ptr: torch.Tensor, col_idx: torch.Tensor, *,
                 kind: str = "indices", seed: int | None = None) -> None:
        # Trusted constructor: the classmethods validate; callers with raw indices use from_indices.
        self.shape = (int(shape[0]), int(shape[1]))
        self.row_ptr = row_ptr.to(torch.int32).contiguous()
        device = self.row_ptr.device
        self.col_idx = col_idx.to(device=device, dtype=column_index_dtype(self.shape[1], device)).contiguous()
        self.kind, self.seed = kind, seed
        self.csc = self._build_csc() if device.type == "cuda" else None

    def _build_csc(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(col_ptr, row_idx, perm) int32: the CSC order of this support, on its device."""
        cols = self.col_idx.long()
        # A stable sort of the column keeps rows ascending inside each column because CSR order already sorts rows.
        perm = torch.sort(cols, stable=True).indices
        counts = torch.bincount(cols, minlength=self.shape[1])
        col_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        return col_ptr, self.rows()[perm].to(torch.int32), perm.to(torch.int32)

    # ---- constructors --------------------------------------------------------------------------------------
    @classmethod
    def random(cls, out_features: int, in_features: int, density: float, seed: int = 0) -> "SparseLayout":
        """SLTrain's uniform support: nnz = int(density·out·in) positions drawn without replacement.

        Exactly ``torch.randperm(out·in, generator=torch.Generator().manual_seed(seed))[:nnz]`` sorted, on
        CPU, so the same (seed, shape, density) gives the same support on every machine and device.
        """
        out, in_ = _check_dim("out_features", out_features), _check_dim("in_features", in_features)
        density = check_density(density)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"SparseLayout.random: seed must be an int, got {type(seed).__name__}")
        nnz = int(density * out * in_)
        g = torch.Generator().manual_seed(int(seed))
        flat = torch.sort(torch.randperm(out * in_, generator=g)[:nnz]).values
        return cls._from_sorted_flat(flat, (out, in_), kind="random", seed=int(seed))

    @classmethod
    def from_indices(cls, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> "SparseLayout":
        """Explicit support: (rows[k], cols[k]) sorted row-major (row, then column), in range, no
        duplicates."""
        out, in_ = _check_dim("shape[0]", shape[0]), _check_dim("shape[1]", shape[1])
        for name, t in (("rows", rows), ("cols", cols)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point() or t.is_complex():
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"SparseLayout.from_indices: {name} must be a 1-D integer tensor, got {got}")
        if rows.shape != cols.shape:
            raise ValueError(f"SparseLayout.from_indices: rows {tuple(rows.shape)} and cols "
                             f"{tuple(cols.shape)} must have the same length")
        rows, cols = rows.long().cpu(), cols.long().cpu()
        for name, t, hi in (("rows", rows, out), ("cols", cols, in_)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= hi):
                raise ValueError(f"SparseLayout.from_indices: {name} must lie in [0, {hi}), got values in "
                                 f"[{int(t.min())}, {int(t.max())}]")
        flat = rows * in_ + cols
        if flat.numel() > 1:
            step = flat.diff()
            if bool((step == 0).any()):
                k = int((step == 0).nonzero()[0])
                raise ValueError(f"SparseLayout.from_indices: duplicate support entry (row {int(rows[k])}, "
                                 f"col {int(cols[k])}) at positions {k} and {k + 1}")
            if bool((step < 0).any()):
                k = int((step < 0).nonzero()[0])
                raise ValueError("SparseLayout.from_indices: indices must be sorted row-major (row, then "
                                 f"col); entry {k + 1} ({int(rows[k + 1])}, {int(cols[k + 1])}) follows "
                                 f"({int(rows[k])}, {int(cols[k])})")
        return cls._from_sorted_flat(flat, (out, in_), kind="indices")

    @classmethod
    def from_flat(cls, flat: torch.Tensor, shape: tuple[int, int]) -> "SparseLayout":
        """From SLTrain's ``sparse_index`` (sorted int64 row-major positions ``i·in + j``), validated."""
        if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or flat.is_floating_point():
            raise TypeError("SparseLayout.from_flat: flat must be a 1-D integer tensor")
        in_ = _check_dim("shape[1]", shape[1])
        flat = flat.long().cpu()
        return cls.from_indices(torch.div(flat, in_, rounding_mode="floor"), flat % in_, shape)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "SparseLayout":
        """Support = the True (nonzero) entries of a [out, in] mask (SHiRA's masks)."""
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"SparseLayout.from_mask: mask must be a 2-D [out, in] tensor, got {got}")
        out, in_ = _check_dim("mask.shape[0]", mask.shape[0]), _check_dim("mask.shape[1]", mask.shape[1])
        flat = torch.flatten(mask.detach().cpu() != 0).nonzero().flatten()   # ascending: CSR order
        return cls._from_sorted_flat(flat, (out, in_), kind="mask")

    @classmethod
    def topk(cls, scores: torch.Tensor, density: float) -> "SparseLayout":
        """The int(density·out·in) entries of largest |scores| [out, in] (ties: lower flat position first)."""
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.is_floating_point():
            raise ValueError("SparseLayout.topk: scores must be a 2-D floating [out, in] tensor")
        out = _check_dim("scores.shape[0]", scores.shape[0])
        in_ = _check_dim("scores.shape[1]", scores.shape[1])
        nnz = int(check_density(density) * out * in_)
        mag = scores.detach().abs().flatten().double().cpu()
        order = torch.sort(mag, descending=True, stable=True).indices[:nnz]
        return cls._from_sorted_flat(torch.sort(order).values, (out, in_), kind="topk")

    @classmethod
    def channels(cls, out_features: int, in_features: int, channels: torch.Tensor | list[int], *,
                 dim: int = 1) -> "SparseLayout":
        """Whole channels (LOST): every row of the listed input columns (``dim=1``), or every column of the
        listed output rows (``dim=0``)."""
        out, in_ = _check_dim("out_features", out_features), _check_dim("in_features", in_features)
        if dim not in (0, 1):
            raise ValueError(f"SparseLayout.channels: dim must be 0 (rows) or 1 (columns), got {dim}")
        ch = torch.as_tensor(channels).long().flatten().cpu()
        hi = out if dim == 0 else in_
        if ch.numel() and (int(ch.min()) < 0 or int(ch.max()) >= hi):
            raise ValueError(f"SparseLayout.channels: channels must lie in [0, {hi}), got values in "
                             f"[{int(ch.min())}, {int(ch.max())}]")
        if ch.unique().numel() != ch.numel():
            raise ValueError("SparseLayout.channels: channels contains duplicates")
        mask = torch.zeros(out, in_, dtype=torch.bool)
        if dim == 1:
            mask[:, ch] = True
        else:
            mask[ch, :] = True
        layout = cls.from_mask(mask)
        layout.kind = "channels"
        return layout

    @classmethod
    def _from_sorted_flat(cls, flat: torch.Tensor, shape: tuple[int, int], *, kind: str,
                          seed: int | None = None) -> "SparseLayout":
        out, in_ = shape
        rows = torch.div(flat, in_, rounding_mode="floor")
        counts = torch.bincount(rows, minlength=out)
        row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        if int(row_ptr[-1]) > _INT32_MAX:
            raise ValueError(f"SparseLayout: nnz = {int(row_ptr[-1])} does not fit the int32 indices")
        return cls(shape, row_ptr, flat - rows * in_, kind=kind, seed=seed)

    # ---- views ---------------------------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return self.col_idx.shape[0]

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    @property
    def device(self) -> torch.device:
        return self.row_ptr.device

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """(row_ptr, col_idx, col_ptr, row_idx, perm): what the ``torch.ops.lowrank`` schemas take; the last
        three are the CSC transpose on CUDA and None elsewhere."""
        return (self.row_ptr, self.col_idx) + (self.csc if self.csc is not None else (None, None, None))

    def transpose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(col_ptr [in + 1], row_idx [nnz], perm [nnz]) int32, the CSC order (CSC entry k is CSR entry
        ``perm[k]``); the held copy on CUDA, computed afresh elsewhere."""
        return self.csc if self.csc is not None else self._build_csc()

    def rows(self) -> torch.Tensor:
        """Row index of every CSR entry [nnz] int64."""
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.device),
                                       self.row_ptr.long().diff())

    def flat_indices(self) -> torch.Tensor:
        """Sorted row-major positions ``i·in + j`` [nnz] int64 (SLTrain's ``sparse_index``)."""
        return self.rows() * self.shape[1] + self.col_idx.long()

    def index_bytes(self) -> int:
        """Bytes of index storage this layout holds (CSR, and the CSC transpose where it keeps one)."""
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    def to(self, device: torch.device | str) -> "SparseLayout":
        """A copy on ``device`` (the same layout if already there)."""
        if torch.device(device) == self.device:
            return self
        return SparseLayout(self.shape, self.row_ptr.to(device), self.col_idx.to(device), kind=self.kind,
                            seed=self.seed)

    def state(self) -> dict:
        """Checkpoint record: (version, kind, shape, nnz, seed), plus the CSR indices unless "random"
        (a random support is regenerated from its seed, as SLTrain does)."""
        st = {"layout_version": LAYOUT_VERSION, "kind": self.kind, "shape": list(self.shape), "nnz": self.nnz,
              "seed": self.seed}
        if self.kind != "random":
            st["row_ptr"] = self.row_ptr.cpu()
            st["col_idx"] = self.col_idx.cpu().to(column_index_dtype(self.shape[1], torch.device("cpu")))
        return st

    @classmethod
    def from_state(cls, st: dict) -> "SparseLayout":
        """Inverse of :meth:`state`; checks the version and that a regenerated support has the stored nnz."""
        if st.get("layout_version") != LAYOUT_VERSION:
            raise ValueError(f"SparseLayout.from_state: layout_version {st.get('layout_version')} is not "
                             f"{LAYOUT_VERSION}")
        out, in_ = st["shape"]
        if st["kind"] == "random":
            nnz = st["nnz"]
            # The density that reproduces nnz under int(density·out·in): nnz itself is what is checked.
            layout = cls.random(out, in_, min(1.0, (nnz + 0.5) / (out * in_)), st["seed"])
        else:
            layout = cls(st["shape"], st["row_ptr"], st["col_idx"], kind=st["kind"], seed=st.get("seed"))
        if layout.nnz != st["nnz"]:
            raise ValueError(f"SparseLayout.from_state: regenerated {layout.nnz} entries, checkpoint has "
                             f"{st['nnz']}")
        return layout

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SparseLayout) and self.shape == other.shape
                and torch.equal(self.row_ptr.cpu(), other.row_ptr.cpu())
                and torch.equal(self.col_idx.cpu().long(), other.col_idx.cpu().long()))

    __hash__ = None  # mutable tensors inside: not hashable

    def __repr__(self) -> str:
        return (f"SparseLayout(shape={self.shape}, nnz={self.nnz}, density={self.density:.4g}, "
                f"kind={self.kind!r}"
                + (f", seed={self.seed}" if self.seed is not None else "") + ")")
