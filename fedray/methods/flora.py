"""FLoRA: stack the clients' adapters and merge the stack into the global delta.

``[B_1 .. B_m] @ [p_1 A_1; ..; p_m A_m] == sum_i p_i B_i @ A_i`` exactly, so there is no
aggregation noise. Every round each client folds the whole global delta into its frozen
weights and trains a fresh adapter (A random, B = 0): the adapter is thrown away.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedray.methods.base import Method
from fedray.methods.lowrank import Fold, LowRank, LowRankSum, as_dense
from fedray.methods.messages import FACTOR_DTYPE, ClientId, ClientInit, ClientUpdate, Handout, Rank


class FLoRA(Method):
    name = "flora"

    def __init__(self, shapes, max_rank, *, scale=1.0, seed=0) -> None:
        super().__init__(shapes, max_rank, scale=scale, seed=seed)
        self._delta: dict[str, Fold] = {
            layer: LowRank(torch.zeros(d, 0, dtype=FACTOR_DTYPE), torch.zeros(0, k, dtype=FACTOR_DTYPE))
            for layer, (d, k) in self.shapes.items()
        }

    def _layer_global(self, layer: str) -> Fold:
        return self._delta[layer]

    def _make_init(self, client_id: ClientId, rank: Rank, ranks: dict[str, int]):
        B = {layer: torch.zeros(self.shapes[layer][0], r, dtype=FACTOR_DTYPE) for layer, r in ranks.items()}
        A = {layer: self._kaiming(r, self.shapes[layer][1]) for layer, r in ranks.items()}
        # The global delta is already compact (factors while smaller than dense).
        return ClientInit(client_id, rank, self.scale, B, A, dict(self._delta)), 0.0, None

    def _new_accumulator(self) -> dict[str, LowRankSum]:
        return {layer: LowRankSum(shape) for layer, shape in self.shapes.items()}

    def _accumulate(self, stacks: dict[str, LowRankSum], update: ClientUpdate, handout: Handout) -> None:
        for layer, stack in stacks.items():
            stack.add(self.scale * update.B[layer], update.A[layer], update.num_examples)

    def _commit(self, stacks: dict[str, LowRankSum], total_examples: int) -> float:
        for layer, stack in stacks.items():
            merged = LowRankSum(self.shapes[layer])
            merged.add_matrix(self._delta[layer])
            merged.add_matrix(stack.total(), 1.0 / total_examples)
            self._delta[layer] = _to_factor_dtype(merged.total())
        # Stacking is exact: the new global delta is the FedAvg of the clients' models.
        return 0.0

    def server_state(self) -> dict[str, Tensor]:
        # The merged delta grows in rank every round: a server optimizer steps it dense.
        return {layer: as_dense(delta).to(FACTOR_DTYPE) for layer, delta in self._delta.items()}

    def load_server_state(self, tensors: Mapping[str, Tensor]) -> None:
        self._delta = {layer: tensors[layer].to(FACTOR_DTYPE).clone() for layer in self.shapes}
        self._global_norm_cache = None

    def _state_tensors(self) -> dict[str, Tensor]:
        tensors = {}
        for layer, delta in self._delta.items():
            if isinstance(delta, LowRank):
                tensors[f"{layer}.left"], tensors[f"{layer}.right"] = delta.left, delta.right
            else:
                tensors[f"{layer}.dense"] = delta
        return tensors

    def _load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        for layer in self.shapes:
            if f"{layer}.dense" in tensors:
                self._delta[layer] = tensors[f"{layer}.dense"].clone()
            else:
                self._delta[layer] = LowRank(tensors[f"{layer}.left"].clone(), tensors[f"{layer}.right"].clone())


def _to_factor_dtype(matrix: Fold) -> Fold:
    if isinstance(matrix, LowRank):
        return LowRank(matrix.left.to(FACTOR_DTYPE), matrix.right.to(FACTOR_DTYPE))
    return matrix.to(FACTOR_DTYPE)
