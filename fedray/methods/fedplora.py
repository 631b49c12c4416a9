"""Fed-PLoRA: R parallel rank-1 modules; clients train a random subset, fold the rest.

Select-N-Fold: each round client i draws r_i of the R module indices uniformly without
replacement, folds the other R - r_i modules into its frozen weights and trains the
drawn ones from their global values, so its starting model computes exactly the global
model (zero initialization noise). The server averages each module over the clients
that trained it; a module nobody drew keeps its value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedray.methods.base import AdapterMethod, ClientAverage, ClientId, ClientInit, ClientUpdate, Handout, Rank
from fedray.methods.lowrank import LowRank, compact


@dataclass
class _Sums:
    B: dict[str, Tensor]
    A: dict[str, Tensor]
    #: Per layer and module, the summed weight of the clients that trained it.
    trained: dict[str, Tensor]
    #: Per layer and module, the examples of the clients that folded it (for the ideal).
    folded: dict[str, Tensor]
    clients: ClientAverage


class FedPLoRA(AdapterMethod):
    name = "fedplora"

    def __init__(self, shapes, max_rank, *, scale=1.0, seed=0, weighted: bool = False) -> None:
        if not isinstance(weighted, bool):
            raise ValueError(f"fedplora option weighted must be true or false, got {weighted!r}")
        super().__init__(shapes, max_rank, scale=scale, seed=seed)
        #: Average a module over its clients by data size (True) or plainly (False, the paper's).
        self.weighted = weighted

    @property
    def options(self) -> dict:
        return {"weighted": self.weighted}

    def _draw(self, rank: int) -> Tensor:
        chosen = torch.randperm(self.max_rank, generator=self._generator)[:rank]
        return chosen.sort().values

    def _make_init(self, client_id: ClientId, rank: Rank, ranks: dict[str, int]):
        # One draw per client when all layers share a rank (the paper's setting); a draw
        # per layer when ranks differ by layer.
        shared = self._draw(rank) if isinstance(rank, int) else None
        modules, B, A, fold = {}, {}, {}, {}
        for layer, r in ranks.items():
            chosen = shared if shared is not None else self._draw(r)
            rest = torch.ones(self.max_rank, dtype=torch.bool)
            rest[chosen] = False
            modules[layer] = chosen
            B[layer] = self._B[layer][:, chosen].clone()
            A[layer] = self._A[layer][chosen].clone()
            if r < self.max_rank:
                fold[layer] = compact(LowRank(self.scale * self._B[layer][:, rest], self._A[layer][rest]))
        init = ClientInit(client_id, rank, self.scale, B, A, fold, modules)
        # The fold and the trained modules together are the global adapter, term for term.
        return init, 0.0

    def _new_accumulator(self) -> _Sums:
        return _Sums(
            B={layer: torch.zeros_like(B) for layer, B in self._B.items()},
            A={layer: torch.zeros_like(A) for layer, A in self._A.items()},
            trained={layer: torch.zeros(self.max_rank, dtype=torch.float64) for layer in self.shapes},
            folded={layer: torch.zeros(self.max_rank, dtype=torch.float64) for layer in self.shapes},
            clients=ClientAverage(self.shapes),
        )

    def _accumulate(self, sums: _Sums, update: ClientUpdate, handout: Handout) -> None:
        n = update.num_examples
        weight = float(n) if self.weighted else 1.0
        assert handout.modules is not None
        for layer, chosen in handout.modules.items():
            sums.B[layer][:, chosen] += weight * update.B[layer]
            sums.A[layer][chosen] += weight * update.A[layer]
            sums.trained[layer][chosen] += weight
            sums.folded[layer] += n
            sums.folded[layer][chosen] -= n
            sums.clients.add(layer, self.scale * update.B[layer], update.A[layer], n)

    def _commit(self, sums: _Sums, total_examples: int) -> float:
        for layer in self.shapes:
            # Folds are untouched global modules: their share of the ideal, before update.
            folded = sums.folded[layer].to(self._B[layer].dtype)
            sums.clients.add(layer, self.scale * self._B[layer] * folded, self._A[layer], 1.0)
            trained = sums.trained[layer] > 0
            weight = sums.trained[layer][trained].to(self._B[layer].dtype)
            # New tensors, not in-place writes: state_dict() callers hold the old ones.
            B, A = self._B[layer].clone(), self._A[layer].clone()
            B[:, trained] = sums.B[layer][:, trained] / weight
            A[trained] = sums.A[layer][trained] / weight[:, None]
            self._B[layer], self._A[layer] = B, A
        return sums.clients.noise_sq(self._global_folds(), total_examples)
