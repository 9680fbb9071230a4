"""Matrix-free linear operators for the randomized SVD.

A linear operator stands for a (possibly batched) matrix A of shape ``[..., m, n]`` that is only ever touched
through products:

    matmul(X)  = A·X     X [..., n, j]  ->  [..., m, j]
    rmatmul(Y) = Aᵀ·Y    Y [..., m, j]  ->  [..., n, j]

Anything with ``shape``, ``dtype``, ``matmul`` and ``rmatmul`` satisfies :class:`LinearOperator` (a
``typing.Protocol``; an optional ``device`` attribute tells where the test matrices are drawn, CPU otherwise).
:class:`FactoredOperator` represents A = B·A₀ without ever forming the product, :class:`DenseOperator` wraps a
tensor. ``lowrank.linalg.rsvd`` and ``lowrank.linalg.rsvd_error`` accept a tensor or any such operator.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["LinearOperator", "DenseOperator", "FactoredOperator", "aslinearoperator"]


@runtime_checkable
class LinearOperator(Protocol):
    """Protocol of a matrix A ``[..., m, n]`` known only through ``A·X`` and ``Aᵀ·Y``."""

    @property
    def shape(self) -> tuple[int, ...]:
        """``(*batch, m, n)``."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype ``matmul`` / ``rmatmul`` expect their argument in (and return)."""
        ...

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """A·X: ``[..., n, j] -> [..., m, j]``."""
        ...

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        """Aᵀ·Y: ``[..., m, j] -> [..., n, j]``."""
        ...


class DenseOperator:
    """A dense tensor ``[..., m, n]`` as a :class:`LinearOperator` (products are plain ``matmul``)."""

    def __init__(self, a: torch.Tensor):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"DenseOperator: A must be a torch.Tensor, got {type(a).__name__}")
        if a.ndim < 2:
            raise ValueError(f"DenseOperator: A must have at least 2 dimensions [..., m, n], got shape "
                             f"{tuple(a.shape)}")
        self.a = a

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.a @ x

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        return self.a.mT @ y

    def to(self, dtype: torch.dtype) -> DenseOperator:
        return self if dtype == self.a.dtype else DenseOperator(self.a.to(dtype))

    def dense(self) -> torch.Tensor:
        return self.a


class FactoredOperator:
    """The product ``B·A`` of ``B [..., m, r]`` and ``A [..., r, n]``, applied factor by factor.

    ``matmul(X) = B·(A·X)`` and ``rmatmul(Y) = Aᵀ·(Bᵀ·Y)`` cost O((m + n)·r·j) per product of j columns
    instead of O(m·n·j), and the m×n product is never formed (except by :meth:`dense`, which the exact-SVD
    path of ``rsvd`` calls for small problems). Batch dimensions of the factors broadcast.
    """

    def __init__(self, b: torch.Tensor, a: torch.Tensor):
        for name, t in (("B", b), ("A", a)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"FactoredOperator: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.ndim < 2:
                raise ValueError(f"FactoredOperator: {name} must have at least 2 dimensions, got shape "
                                 f"{tuple(t.shape)}")
        if b.shape[-1] != a.shape[-2]:
            raise ValueError(f"FactoredOperator: inner dimensions differ: B {tuple(b.shape)} has "
                             f"{b.shape[-1]} columns, A {tuple(a.shape)} has {a.shape[-2]} rows")
        if b.dtype != a.dtype:
            raise TypeError(f"FactoredOperator: B and A must share a dtype, got {b.dtype} and {a.dtype}")
        if b.device != a.device:
            raise ValueError(f"FactoredOperator: B and A must be on one device, got {b.device} and "
                             f"{a.device}")
        self.b, self.a = b, a
        batch = torch.broadcast_shapes(b.shape[:-2], a.shape[:-2])
        self._shape = (*batch, b.shape[-2], a.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.b @ (self.a @ x)

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        return self.a.mT @ (self.b.mT @ y)

    def to(self, dtype: torch.dtype) -> FactoredOperator:
        if dtype == self.dtype:
            return self
        return FactoredOperator(self.b.to(dtype), self.a.to(dtype))

    def dense(self) -> torch.Tensor:
        """The m×n product B·A (formed; only for small problems)."""
        return torch.broadcast_to(self.b @ self.a, self._shape)


class _CastOperator:
    """Wrap a foreign operator so that it is applied in its own dtype and answers in ``dtype``."""

    def __init__(self, op: LinearOperator, dtype: torch.dtype):
        self.op, self.dtype = op, dtype
        self.shape = tuple(op.shape)
        self.device = getattr(op, "device", torch.device("cpu"))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.matmul(x.to(self.op.dtype)).to(self.dtype)

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        return self.op.rmatmul(y.to(self.op.dtype)).to(self.dtype)

    def dense(self) -> torch.Tensor:
        *batch, m, n = self.shape
        eye = torch.eye(n, dtype=self.dtype, device=self.device).expand(*batch, n, n)
        return self.matmul(eye)


def is_operator(a: object) -> bool:
    """True for objects with ``shape``, ``dtype``, ``matmul`` and ``rmatmul`` (tensors excluded)."""
    return not isinstance(a, torch.Tensor) and isinstance(a, LinearOperator)


def aslinearoperator(a: torch.Tensor | LinearOperator, dtype: torch.dtype | None = None):
    """A tensor or operator as an operator whose products take and return ``dtype`` (default: its own).

    Tensors and :class:`FactoredOperator` are converted (their data cast once, so the products run in
    ``dtype``); any other operator is applied in its own dtype with arguments and results cast.
    """
    if isinstance(a, torch.Tensor):
        op = DenseOperator(a)
    elif isinstance(a, LinearOperator):
        op = a
    else:
        raise TypeError(f"A must be a torch.Tensor or a LinearOperator (shape, dtype, matmul, rmatmul), got "
                        f"{type(a).__name__}")
    if dtype is None or op.dtype == dtype:
        return op
    if isinstance(op, (DenseOperator, FactoredOperator)):
        return op.to(dtype)
    return _CastOperator(op, dtype)
