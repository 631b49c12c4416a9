"""HETLoRA: clients train the leading r_i components of a rank-R global adapter.

The server zero-pads each client's factors to rank R and averages them. By default the
clients are weighted by the Frobenius norm of their update ``||scale * B_i @ A_i||``
(the paper's sparsity-weighted aggregation), per layer; ``weighting="data"`` weights by
number of examples instead. The rank self-pruning regulariser belongs to local training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedray.methods.base import AdapterMethod, ClientAverage, ClientId, ClientInit, ClientUpdate, Handout, Rank
from fedray.methods.lowrank import LowRank, fro_norm

WEIGHTINGS = ("norm", "data")


@dataclass
class _Sums:
    B: dict[str, Tensor]
    A: dict[str, Tensor]
    weight: dict[str, float]
    #: Data-weighted sums, the fallback for a layer whose updates all have zero norm.
    B_data: dict[str, Tensor]
    A_data: dict[str, Tensor]
    clients: ClientAverage


class HETLoRA(AdapterMethod):
    name = "hetlora"

    def __init__(self, shapes, max_rank, *, scale=1.0, seed=0, weighting: str = "norm") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"hetlora option weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        super().__init__(shapes, max_rank, scale=scale, seed=seed)
        #: "norm": weight clients by the size of their update (the paper's); "data": by examples.
        self.weighting = weighting

    @property
    def options(self) -> dict:
        return {"weighting": self.weighting}

    def _make_init(self, client_id: ClientId, rank: Rank, ranks: dict[str, int]):
        B, A = {}, {}
        noise_sq = 0.0
        for layer, r in ranks.items():
            B[layer] = self._B[layer][:, :r].clone()
            A[layer] = self._A[layer][:r].clone()
            # The truncated tail is exactly what the client's start is missing.
            noise_sq += fro_norm(LowRank(self.scale * self._B[layer][:, r:], self._A[layer][r:])) ** 2
        return ClientInit(client_id, rank, self.scale, B, A), noise_sq

    def _new_accumulator(self) -> _Sums:
        def zeros(factors: dict[str, Tensor]) -> dict[str, Tensor]:
            return {layer: torch.zeros_like(t) for layer, t in factors.items()}

        return _Sums(
            B=zeros(self._B),
            A=zeros(self._A),
            weight=dict.fromkeys(self.shapes, 0.0),
            B_data=zeros(self._B),
            A_data=zeros(self._A),
            clients=ClientAverage(self.shapes),
        )

    def _accumulate(self, sums: _Sums, update: ClientUpdate, handout: Handout) -> None:
        n = update.num_examples
        for layer, r in handout.ranks.items():
            B, A = update.B[layer], update.A[layer]
            if self.weighting == "norm":
                weight = fro_norm(LowRank(self.scale * B, A))
                sums.B_data[layer][:, :r] += n * B
                sums.A_data[layer][:r] += n * A
            else:
                weight = float(n)
            # Zero-padding: components r..R get nothing from this client, yet its
            # weight still counts in their denominator.
            sums.B[layer][:, :r] += weight * B
            sums.A[layer][:r] += weight * A
            sums.weight[layer] += weight
            sums.clients.add(layer, self.scale * B, A, n)

    def _commit(self, sums: _Sums, total_examples: int) -> float:
        for layer in self.shapes:
            if sums.weight[layer] > 0:
                self._B[layer] = sums.B[layer] / sums.weight[layer]
                self._A[layer] = sums.A[layer] / sums.weight[layer]
            else:
                self._B[layer] = sums.B_data[layer] / total_examples
                self._A[layer] = sums.A_data[layer] / total_examples
            self._revive_empty_components(layer)
        return sums.clients.noise_sq(self._global_folds(), total_examples)

    def _revive_empty_components(self, layer: str) -> None:
        """Give a component that no client covered (B and A both zero) a fresh A row.

        Zero-padding empties such components, and a LoRA component with B = 0 and A = 0
        has zero gradient forever. A fresh A with B = 0 leaves the global delta unchanged.
        """
        empty = (self._B[layer] == 0).all(dim=0) & (self._A[layer] == 0).all(dim=1)
        count = int(empty.sum())
        if count:
            self._A[layer][empty] = self._kaiming(count, self.shapes[layer][1])
