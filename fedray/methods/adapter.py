"""What most methods share: one rank-R adapter per layer as their global state, and the
running FedAvg of the clients' models that their aggregation noise is measured against."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedray.methods.base import Method
from fedray.methods.lowrank import Fold, LowRank, LowRankSum, fro_norm
from fedray.methods.messages import FACTOR_DTYPE


class ClientAverage:
    """Running ``sum_i n_i * (client i's effective delta at the end of training)`` per layer.

    Divided by the round's examples it is the "ideal" FedAvg of what the clients' models
    compute; its distance to the new global delta is the aggregation noise.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        self._sums = {layer: LowRankSum(shape) for layer, shape in shapes.items()}

    def add(self, layer: str, left: Tensor, right: Tensor, weight: float) -> None:
        self._sums[layer].add(left, right, weight)

    def noise_sq(self, new_global: Mapping[str, Fold], total_examples: int) -> float:
        """Squared ``||ideal - new_global||_F`` summed over layers (consumes the sums)."""
        noise_sq = 0.0
        for layer, running in self._sums.items():
            running.add_matrix(new_global[layer], -float(total_examples))
            noise_sq += (fro_norm(running.total()) / total_examples) ** 2
        return noise_sq


class AdapterMethod(Method):
    """A method whose global state is one rank-R adapter (B: d x R, A: R x k) per layer."""

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        max_rank: int,
        *,
        scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(shapes, max_rank, scale=scale, seed=seed)
        self._B = {layer: torch.zeros(d, max_rank, dtype=FACTOR_DTYPE) for layer, (d, _) in self.shapes.items()}
        self._A = {layer: self._kaiming(max_rank, k) for layer, (_, k) in self.shapes.items()}

    def _layer_global(self, layer: str) -> Fold:
        return LowRank(self.scale * self._B[layer], self._A[layer])

    def _global_folds(self) -> dict[str, Fold]:
        return {layer: self._layer_global(layer) for layer in self.shapes}

    def _state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"{layer}.B": B for layer, B in self._B.items()}
        tensors.update({f"{layer}.A": A for layer, A in self._A.items()})
        return tensors

    def _load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        for layer, (d, k) in self.shapes.items():
            B, A = tensors[f"{layer}.B"], tensors[f"{layer}.A"]
            assert B.shape == (d, self.max_rank) and A.shape == (self.max_rank, k)
            self._B[layer] = B.to(FACTOR_DTYPE).clone()
            self._A[layer] = A.to(FACTOR_DTYPE).clone()
