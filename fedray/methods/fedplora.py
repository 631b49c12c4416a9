"""Fed-PLoRA: R parallel rank-1 modules; clients train a random subset, fold the rest.

Select-N-Fold: each round client i draws r_i of the R module indices uniformly without
replacement, folds the other R - r_i modules into its frozen weights and trains the
drawn ones from their global values, so its starting model computes exactly the global
model (zero initialization noise). The server averages each module over the clients
that trained it; a module nobody drew keeps its value.

``ModuleSimilarity`` measures how alike module j of one client is to module j' of
another after a round; the method keeps it for the last aggregated round and offers it
as the ``module_similarity`` heatmap (the paper's module-alignment figure). Every client
starts a module from the same global values, so on the trained factors the diagonal is
near 1 whatever training did; ``module_change_similarity`` takes the same measure on what
the round changed (trained minus handed-out factors), where alignment has to come from
training itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedray.methods.adapter import AdapterMethod, ClientAverage
from fedray.methods.lowrank import LowRank, compact
from fedray.methods.messages import ClientId, ClientInit, ClientUpdate, Handout, Heatmap, Rank

#: Cosine similarities lie in [-1, 1].
SIMILARITY_RANGE = (-1.0, 1.0)


class ModuleSimilarity:
    """Mean cosine similarity of module j of client a and module j' of client b, a != b.

    Clients are added one at a time as ``{module j: its trained vector}`` (a module's B
    column and A row of every layer, concatenated). Only R x D sums are kept, never every
    client's vectors: the sum over ordered pairs a != b is the sum over all pairs minus
    the pairs a = b.
    """

    def __init__(self, max_rank: int) -> None:
        if max_rank < 1:
            raise ValueError(f"max_rank={max_rank} is invalid; pass the run's global LoRA rank, 1 or more.")
        self.max_rank = max_rank
        self.clients = 0
        self._summed_units: Tensor | None = None
        self._summed_trained = torch.zeros(max_rank, dtype=torch.float64)
        self._cosine_sum = torch.zeros(max_rank, max_rank, dtype=torch.float64)
        self._pair_counts = torch.zeros(max_rank, max_rank, dtype=torch.float64)

    def add(self, modules: Mapping[int, Tensor]) -> None:
        """One client's trained modules."""
        lengths = {vector.numel() for vector in modules.values()}
        if self._summed_units is not None:
            lengths.add(self._summed_units.shape[1])
        if len(lengths) > 1:
            raise ValueError(
                f"module vectors have different lengths {sorted(lengths)}; every module must concatenate the same "
                "layers."
            )
        if self._summed_units is None:
            self._summed_units = torch.zeros(self.max_rank, lengths.pop() if lengths else 0, dtype=torch.float64)
        units = torch.zeros_like(self._summed_units)
        trained = torch.zeros(self.max_rank, dtype=torch.float64)
        for module, vector in modules.items():
            if not 0 <= module < self.max_rank:
                raise ValueError(f"module index {module} is outside 0..{self.max_rank - 1}; pass the run's max_rank.")
            units[module] = torch.nn.functional.normalize(vector.detach().cpu().double().flatten(), dim=0)
            trained[module] = 1.0
        self._summed_units += units
        self._summed_trained += trained
        self._cosine_sum -= units @ units.T
        self._pair_counts -= torch.outer(trained, trained)
        self.clients += 1

    def matrix(self) -> Tensor:
        """The R x R mean cosine similarities; NaN where no pair of different clients covers a cell."""
        units = self._summed_units if self._summed_units is not None else torch.zeros(self.max_rank, 0)
        cosine_sum = self._cosine_sum + units @ units.T
        pair_counts = self._pair_counts + torch.outer(self._summed_trained, self._summed_trained)
        return torch.where(pair_counts > 0, cosine_sum / pair_counts.clamp(min=1), torch.nan)


@dataclass
class _Sums:
    B: dict[str, Tensor]
    A: dict[str, Tensor]
    #: Per layer and module, the summed weight of the clients that trained it.
    trained: dict[str, Tensor]
    #: Per layer and module, the examples of the clients that folded it (for the ideal).
    folded: dict[str, Tensor]
    clients: ClientAverage
    similarity: ModuleSimilarity = field(init=False)
    #: The same on each module's change in the round (trained minus handed-out values).
    change_similarity: ModuleSimilarity = field(init=False)


class FedPLoRA(AdapterMethod):
    name = "fedplora"

    def __init__(self, shapes, max_rank, *, scale=1.0, seed=0, weighted: bool = False) -> None:
        if not isinstance(weighted, bool):
            raise ValueError(f"fedplora option weighted must be true or false, got {weighted!r}")
        super().__init__(shapes, max_rank, scale=scale, seed=seed)
        #: Average a module over its clients by data size (True) or plainly (False, the paper's).
        self.weighted = weighted
        #: Module similarity across the clients of the last aggregated round: of the
        #: trained modules, and of their changes in the round.
        self._similarity: ModuleSimilarity | None = None
        self._change_similarity: ModuleSimilarity | None = None

    @property
    def options(self) -> dict:
        return {"weighted": self.weighted}

    def modules_of(self, client_id: ClientId) -> dict[str, Tensor]:
        """Per layer, the global module index of each column of B / row of A that ``client_id`` trains this round."""
        return dict(self._handouts[client_id].memo)

    def heatmaps(self) -> dict[str, Heatmap]:
        if self._similarity is None or self._similarity.clients < 2:
            return {}
        figures = (
            ("module_similarity", self._similarity, "module similarity", "trained modules"),
            (
                "module_change_similarity",
                self._change_similarity,
                "similarity of module changes",
                "each module's change in the round (trained minus handed-out)",
            ),
        )
        return {
            stem: Heatmap(
                similarity.matrix(),
                title=f"Fed-PLoRA {what} across clients, round {self.round}",
                xlabel="module j' (client b)",
                ylabel="module j (client a)",
                value_label="mean cosine similarity",
                value_range=SIMILARITY_RANGE,
                caption=f"of {of}; white: no two different clients trained module j and module j' in that round",
            )
            for stem, similarity, what, of in figures
        }

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
        init = ClientInit(client_id, rank, self.scale, B, A, fold)
        # The fold and the trained modules together are the global adapter, term for term.
        return init, 0.0, modules

    def _new_accumulator(self) -> _Sums:
        sums = _Sums(
            B={layer: torch.zeros_like(B) for layer, B in self._B.items()},
            A={layer: torch.zeros_like(A) for layer, A in self._A.items()},
            trained={layer: torch.zeros(self.max_rank, dtype=torch.float64) for layer in self.shapes},
            folded={layer: torch.zeros(self.max_rank, dtype=torch.float64) for layer in self.shapes},
            clients=ClientAverage(self.shapes),
        )
        sums.similarity = ModuleSimilarity(self.max_rank)
        sums.change_similarity = ModuleSimilarity(self.max_rank)
        return sums

    def _accumulate(self, sums: _Sums, update: ClientUpdate, handout: Handout) -> None:
        n = update.num_examples
        weight = float(n) if self.weighted else 1.0
        modules: dict[str, Tensor] = handout.memo
        vectors: dict[int, list[Tensor]] = {}
        changes: dict[int, list[Tensor]] = {}
        for layer, chosen in modules.items():
            for column, j in enumerate(chosen.tolist()):
                B, A = update.B[layer][:, column], update.A[layer][column]
                vectors.setdefault(j, []).extend([B, A])
                # The global modules stay as handed out until the round commits.
                changes.setdefault(j, []).extend([B - self._B[layer][:, j], A - self._A[layer][j]])
        sums.similarity.add({j: torch.cat(parts) for j, parts in vectors.items()})
        sums.change_similarity.add({j: torch.cat(parts) for j, parts in changes.items()})
        for layer, chosen in modules.items():
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
        self._similarity, self._change_similarity = sums.similarity, sums.change_similarity
        return sums.clients.noise_sq(self._global_folds(), total_examples)
