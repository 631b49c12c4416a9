"""FedIT: homogeneous federated LoRA; each factor is averaged on its own, weighted by data.

The reference every heterogeneous method is compared against. Its aggregate is biased,
``mean(B) @ mean(A) != mean(B @ A)``, which shows up as aggregation noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedray.methods.adapter import AdapterMethod, ClientAverage
from fedray.methods.messages import ClientId, ClientInit, ClientUpdate, Handout, Rank


@dataclass
class _Sums:
    B: dict[str, Tensor]
    A: dict[str, Tensor]
    clients: ClientAverage


class FedIT(AdapterMethod):
    name = "fedit"

    @classmethod
    def check_client_ranks(cls, ranks: Sequence[int], max_rank: int) -> None:
        if set(ranks) != {max_rank}:
            raise ValueError(
                f"fedit is the homogeneous baseline: every client must train at max_rank={max_rank}, but the "
                f"ranks are {sorted(set(ranks))}; set ranks=[{max_rank}] (= max_rank) or pick a heterogeneous "
                "method (fedplora, hlora, flexlora, hetlora, flora)"
            )

    def _make_init(self, client_id: ClientId, rank: Rank, ranks: dict[str, int]):
        try:
            self.check_client_ranks(list(ranks.values()), self.max_rank)
        except ValueError as error:
            raise ValueError(f"client {client_id!r}: {error}") from None
        B = {layer: B.clone() for layer, B in self._B.items()}
        A = {layer: A.clone() for layer, A in self._A.items()}
        return ClientInit(client_id, rank, self.scale, B, A), 0.0, None

    def _new_accumulator(self) -> _Sums:
        return _Sums(
            B={layer: torch.zeros_like(B) for layer, B in self._B.items()},
            A={layer: torch.zeros_like(A) for layer, A in self._A.items()},
            clients=ClientAverage(self.shapes),
        )

    def _accumulate(self, sums: _Sums, update: ClientUpdate, handout: Handout) -> None:
        n = update.num_examples
        for layer in self.shapes:
            sums.B[layer] += n * update.B[layer]
            sums.A[layer] += n * update.A[layer]
            sums.clients.add(layer, self.scale * update.B[layer], update.A[layer], n)

    def _commit(self, sums: _Sums, total_examples: int) -> float:
        for layer in self.shapes:
            self._B[layer] = sums.B[layer] / total_examples
            self._A[layer] = sums.A[layer] / total_examples
        return sums.clients.noise_sq(self._global_folds(), total_examples)
