"""Low-rank matrices and sums of them, without forming d x k products where avoidable.

A server holding a 4096 x 4096 layer should never pay d * k * min(d, k) for an SVD of a
matrix it knows as a product of thin factors. These helpers keep such matrices as
factors, compute norms and SVDs from the factors (QR of each side, SVD of the small
core), and fall back to a dense matrix only once the factors are larger than it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedray.methods.wire import reduce_dataclass

# Norms and SVDs of differences of nearly equal matrices (aggregation noise) cancel
# badly in float32; the small cores are cheap, so the math runs in float64.
COMPUTE_DTYPE = torch.float64


@dataclass(frozen=True)
class LowRank:
    """The d x k matrix ``left @ right`` kept as its factors (d x q and q x k)."""

    left: Tensor
    right: Tensor

    def __reduce__(self) -> tuple:
        return reduce_dataclass(self)  # tensors as arrays: see fedray.methods.wire

    def __post_init__(self) -> None:
        assert self.left.ndim == 2 and self.right.ndim == 2
        assert self.left.shape[1] == self.right.shape[0], (self.left.shape, self.right.shape)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def dense(self) -> Tensor:
        return self.left @ self.right

    def nbytes(self) -> int:
        return tensor_nbytes(self.left) + tensor_nbytes(self.right)


#: A folded delta as it travels to a client: a dense d x k tensor or its factors.
Fold = Tensor | LowRank


def tensor_nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def fold_nbytes(fold: Fold) -> int:
    return fold.nbytes() if isinstance(fold, LowRank) else tensor_nbytes(fold)


def as_dense(matrix: Fold) -> Tensor:
    return matrix.dense() if isinstance(matrix, LowRank) else matrix


def factors_are_smaller(shape: tuple[int, int], rank: int) -> bool:
    """Whether rank-``rank`` factors of a ``shape`` matrix take fewer numbers than it."""
    d, k = shape
    return rank * (d + k) < d * k


def compact(matrix: LowRank) -> Fold:
    """The smaller of the factors and the dense product, for sending or storing."""
    return matrix if factors_are_smaller(matrix.shape, matrix.rank) else matrix.dense()


def dense64(matrix: Fold) -> Tensor:
    """The dense matrix in the compute dtype (products of factors formed in it too)."""
    if isinstance(matrix, LowRank):
        return matrix.left.to(COMPUTE_DTYPE) @ matrix.right.to(COMPUTE_DTYPE)
    return matrix.to(COMPUTE_DTYPE)


def fro_norm(matrix: Fold) -> float:
    """Frobenius norm; for factors, ||L R|| = ||R_L R|| with L = Q_L R_L (no d x k product)."""
    if isinstance(matrix, LowRank) and matrix.rank == 0:
        return 0.0
    if not isinstance(matrix, LowRank) or not factors_are_smaller(matrix.shape, matrix.rank):
        return float(torch.linalg.matrix_norm(dense64(matrix)))
    left = matrix.left.to(COMPUTE_DTYPE)
    right = matrix.right.to(COMPUTE_DTYPE)
    if left.shape[0] >= left.shape[1]:
        _, r_left = torch.linalg.qr(left, mode="r")
        return float(torch.linalg.matrix_norm(r_left @ right))
    return float(torch.linalg.matrix_norm(left @ right))


@dataclass(frozen=True)
class SVD:
    """Thin SVD ``U @ diag(S) @ Vh`` in descending order of S."""

    U: Tensor
    S: Tensor
    Vh: Tensor

    def dense(self) -> Tensor:
        return (self.U * self.S) @ self.Vh


def svd(matrix: Fold) -> SVD:
    """Exact thin SVD; for factors, from QR of both sides and the SVD of a q x q core.

    Costs O((d + k) q^2 + q^3) for rank-q factors instead of O(d k min(d, k)).
    """
    if isinstance(matrix, LowRank) and factors_are_smaller(matrix.shape, matrix.rank):
        left = matrix.left.to(COMPUTE_DTYPE)
        right = matrix.right.to(COMPUTE_DTYPE)
        q_left, r_left = torch.linalg.qr(left)
        q_right, r_right = torch.linalg.qr(right.T)
        u_core, s, vh_core = torch.linalg.svd(r_left @ r_right.T)
        return SVD(q_left @ u_core, s, vh_core @ q_right.T)
    u, s, vh = torch.linalg.svd(dense64(matrix), full_matrices=False)
    return SVD(u, s, vh)


class LowRankSum:
    """Running sum of weighted low-rank terms for one d x k layer.

    Terms are stacked as factors while that is smaller than the dense matrix; past that
    point the sum is kept dense, so memory is bounded by one d x k matrix however many
    terms (clients) arrive.
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self._lefts: list[Tensor] = []
        self._rights: list[Tensor] = []
        self._rank = 0
        self._dense: Tensor | None = None

    def add(self, left: Tensor, right: Tensor, weight: float = 1.0) -> None:
        left = left.to(COMPUTE_DTYPE) * weight
        right = right.to(COMPUTE_DTYPE)
        if self._dense is not None:
            self._dense += left @ right
            return
        self._lefts.append(left)
        self._rights.append(right)
        self._rank += left.shape[1]
        if not factors_are_smaller(self.shape, self._rank):
            self._dense = dense64(self.total())
            self._lefts, self._rights = [], []

    def add_matrix(self, matrix: Fold, weight: float = 1.0) -> None:
        """Add ``weight * matrix`` for a matrix given as factors or dense."""
        if isinstance(matrix, LowRank):
            self.add(matrix.left, matrix.right, weight)
            return
        if self._dense is None:
            self._dense = dense64(self.total()).clone()
            self._lefts, self._rights = [], []
        self._dense += matrix.to(COMPUTE_DTYPE) * weight

    def total(self) -> Fold:
        """The sum so far: factors while they are smaller, else a dense matrix."""
        if self._dense is not None:
            return self._dense
        d, k = self.shape
        if not self._lefts:
            empty = torch.zeros(d, 0, dtype=COMPUTE_DTYPE)
            return LowRank(empty, torch.zeros(0, k, dtype=COMPUTE_DTYPE))
        return LowRank(torch.cat(self._lefts, dim=1), torch.cat(self._rights, dim=0))
