"""Randomized linear algebra: truncated SVD of dense, batched and matrix-free matrices.

    rsvd(A, rank, ...)            -> RSVDResult: U, S, Vh (+ .method, .notes)     A ≈ U·diag(S)·Vh
    rsvd_error(A, U, S, Vh, ...)  -> estimate of ‖A − U·diag(S)·Vh‖₂
    LinearOperator / FactoredOperator / DenseOperator: matrix-free inputs (A·X and Aᵀ·Y only)
"""
from lowrank.linalg.operators import DenseOperator, FactoredOperator, LinearOperator, aslinearoperator
from lowrank.linalg.rsvd import NORMALIZERS, RSVDResult, rsvd, rsvd_error

__all__ = ["rsvd", "rsvd_error", "RSVDResult", "NORMALIZERS", "LinearOperator", "FactoredOperator",
           "DenseOperator", "aslinearoperator"]
