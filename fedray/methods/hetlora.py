"""HETLoRA: clients train the leading r_i components of a rank-R global adapter.

The server zero-pads each client's factors to rank R and averages them. By default the
clients are weighted by the Frobenius norm of their update ``||scale * B_i @ A_i||``
(the paper's sparsity-weighted aggregation), per layer; ``weighting="data"`` weights by
number of examples instead.

Rank self-pruning (off unless ``prune_weight > 0``): a client of rank r is asked to
penalise its tail, the components after the leading ``keep = floor(prune_gamma * r)``
(at least one kept, at least one in the tail), with ``prune_weight * ||tail product||_F``
in its loss. If its tail ends the round smaller than the global tail it started from,
it returns only the leading ``keep`` components and trains at that rank from then on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedray.methods.adapter import AdapterMethod, ClientAverage
from fedray.methods.lowrank import LowRank, fro_norm
from fedray.methods.messages import NO_HOOK, ClientHook, ClientId, ClientInit, ClientUpdate, Handout, Rank

WEIGHTINGS = ("norm", "data")
#: Keeps the tail norm's square root differentiable at a zero tail.
TAIL_NORM_EPSILON = 1e-12


def tail_norm(factors: Mapping[str, tuple[Tensor, Tensor]], keep: Mapping[str, int], scale: float):
    """HETLoRA's self-pruning regulariser: ``sum_l ||scale * B_l[:, keep_l:] @ A_l[keep_l:]||_F``.

    Computed from the small Gram matrices, ``||BA||_F^2 = sum((B^T B) * (A A^T))``, so it
    costs O((d + k) r^2) per layer instead of a d x k product; differentiable everywhere.
    """
    total = 0.0
    for layer, start in keep.items():
        B, A = factors[layer][0][:, start:], factors[layer][1][start:]
        square = ((B.T @ B) * (A @ A.T)).sum()
        total = total + torch.sqrt(square.clamp(min=0.0) + TAIL_NORM_EPSILON)
    return scale * total


@dataclass(frozen=True)
class TailPruning(ClientHook):
    """HETLoRA's rank self-pruning, asked of one client (shared/METHODS.md).

    The client adds ``weight * sum over layers of ||scale * B[:, keep:] @ A[keep:]||_F``
    to its loss. If training shrinks that tail below its size at the start, the client
    prunes it: it returns only the leading ``keep`` components of every layer listed.
    """

    weight: float
    #: Per layer with a tail, how many leading components the client keeps if it prunes.
    keep: Mapping[str, int]
    scale: float

    def loss_term(self, factors: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
        return self.weight * tail_norm(factors, self.keep, self.scale)

    def finish(self, update: ClientUpdate, init: ClientInit) -> tuple[ClientUpdate, dict[str, float]]:
        trained = {layer: (update.B[layer], update.A[layer]) for layer in update.B}
        start = {layer: (init.B[layer], init.A[layer]) for layer in update.B}
        with torch.no_grad():
            pruned = bool(tail_norm(trained, self.keep, self.scale) < tail_norm(start, self.keep, self.scale))
        metrics = {"clients_pruned": float(pruned)}
        if not pruned:
            return update, metrics
        B = {layer: B[:, : self.keep.get(layer, B.shape[1])] for layer, B in update.B.items()}
        A = {layer: A[: self.keep.get(layer, A.shape[0])] for layer, A in update.A.items()}
        shrunk = ClientUpdate(update.client_id, self.shrunk_ranks(init.layer_ranks()), update.num_examples, B, A)
        return shrunk, metrics

    def shrunk_ranks(self, ranks: Mapping[str, int]) -> dict[str, int]:
        return dict(ranks) | dict(self.keep)


@dataclass
class _Sums:
    B: dict[str, Tensor]
    A: dict[str, Tensor]
    weight: dict[str, float]
    #: Data-weighted sums, the fallback for a layer whose updates all have zero norm.
    B_data: dict[str, Tensor]
    A_data: dict[str, Tensor]
    clients: ClientAverage
    #: Clients that pruned their tail this round: their new ranks, kept at commit.
    pruned: dict[ClientId, dict[str, int]]


class HETLoRA(AdapterMethod):
    name = "hetlora"

    def __init__(
        self,
        shapes,
        max_rank,
        *,
        scale=1.0,
        seed=0,
        weighting: str = "norm",
        prune_weight: float = 0.0,
        prune_gamma: float = 0.9,
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"hetlora option weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not (isinstance(prune_weight, int | float) and math.isfinite(prune_weight) and prune_weight >= 0):
            raise ValueError(f"hetlora option prune_weight must be a finite number >= 0 (0: off), got {prune_weight!r}")
        if not (isinstance(prune_gamma, int | float) and 0 < prune_gamma < 1):
            raise ValueError(f"hetlora option prune_gamma must be a number in (0, 1), got {prune_gamma!r}")
        super().__init__(shapes, max_rank, scale=scale, seed=seed)
        #: "norm": weight clients by the size of their update (the paper's); "data": by examples.
        self.weighting = weighting
        self.prune_weight = float(prune_weight)
        self.prune_gamma = float(prune_gamma)
        #: Clients that pruned themselves: the per-layer ranks they train at from now on.
        self._pruned: dict[ClientId, dict[str, int]] = {}

    @property
    def options(self) -> dict:
        return {"weighting": self.weighting, "prune_weight": self.prune_weight, "prune_gamma": self.prune_gamma}

    @property
    def pruned_ranks(self) -> dict[ClientId, dict[str, int]]:
        """Per client that pruned its rank, the per-layer ranks it trains at now."""
        return {client: dict(ranks) for client, ranks in self._pruned.items()}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["meta"]["pruned"] = [[client, ranks] for client, ranks in self._pruned.items()]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._pruned = {client: dict(ranks) for client, ranks in state["meta"].get("pruned", [])}

    def _start_ranks(self, client_id: ClientId, ranks: dict[str, int]) -> dict[str, int]:
        pruned = self._pruned.get(client_id, {})
        return {layer: min(r, pruned.get(layer, r)) for layer, r in ranks.items()}

    def _keep(self, rank: int) -> int:
        return min(rank - 1, max(1, math.floor(self.prune_gamma * rank)))

    def _make_init(self, client_id: ClientId, rank: Rank, ranks: dict[str, int]):
        hook = NO_HOOK
        if self.prune_weight > 0:
            keep = {layer: self._keep(r) for layer, r in ranks.items() if r > 1}
            hook = TailPruning(self.prune_weight, keep, self.scale) if keep else hook
        B, A = {}, {}
        noise_sq = 0.0
        for layer, r in ranks.items():
            B[layer] = self._B[layer][:, :r].clone()
            A[layer] = self._A[layer][:r].clone()
            # The truncated tail is exactly what the client's start is missing.
            noise_sq += fro_norm(LowRank(self.scale * self._B[layer][:, r:], self._A[layer][r:])) ** 2
        return ClientInit(client_id, rank, self.scale, B, A, hook=hook), noise_sq, None

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
            pruned={},
        )

    def _accumulate(self, sums: _Sums, update: ClientUpdate, handout: Handout) -> None:
        n = update.num_examples
        ranks = {layer: B.shape[1] for layer, B in update.B.items()}
        if ranks != handout.ranks:  # validated: the client pruned its tail
            sums.pruned[update.client_id] = ranks
        for layer, r in ranks.items():
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
        self._pruned.update(sums.pruned)
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
