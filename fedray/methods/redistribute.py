"""Shared core of FlexLoRA and HLoRA: average full products, hand out top-r SVD factors.

The server keeps the global delta as its thin SVD. Aggregation averages the clients'
products ``sum_i p_i B_i @ A_i`` (exact, so no aggregation noise) and decomposes the
average from the stacked factors, never as a dense d x k matrix while the stack is
smaller. Client i starts from the top r_i singular triplets; its initialization noise is
the norm of the dropped singular values (Eckart-Young). The two methods differ only in
how they split ``S_r`` between B and A.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

import torch
from torch import Tensor

from fedray.methods.base import Method
from fedray.methods.lowrank import SVD, Fold, LowRank, LowRankSum, svd
from fedray.methods.messages import FACTOR_DTYPE, ClientId, ClientInit, ClientUpdate, Handout, Rank


class SVDRedistribution(Method):
    """Base of the methods that redistribute the top-r SVD of the averaged products."""

    def __init__(self, shapes, max_rank, *, scale=1.0, seed=0) -> None:
        super().__init__(shapes, max_rank, scale=scale, seed=seed)
        #: Per layer, the thin SVD of global_delta / scale, without numerically zero triplets.
        self._svd: dict[str, SVD] = {
            layer: SVD(
                torch.zeros(d, 0, dtype=FACTOR_DTYPE),
                torch.zeros(0, dtype=FACTOR_DTYPE),
                torch.zeros(0, k, dtype=FACTOR_DTYPE),
            )
            for layer, (d, k) in self.shapes.items()
        }

    @abstractmethod
    def _split(self, U: Tensor, S: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
        """Turn the top-r triplets into (B, A) with ``B @ A == U @ diag(S) @ Vh``."""

    def _layer_global(self, layer: str) -> Fold:
        triplets = self._svd[layer]
        return LowRank(self.scale * triplets.U * triplets.S, triplets.Vh)

    def _layer_global_norm(self, layer: str) -> float:
        # U and V are orthonormal: the norm is that of the singular values.
        return self.scale * float(self._svd[layer].S.double().norm())

    def _make_init(self, client_id: ClientId, rank: Rank, ranks: dict[str, int]):
        B, A = {}, {}
        noise_sq = 0.0
        for layer, r in ranks.items():
            triplets = self._svd[layer]
            kept = min(r, triplets.S.numel())
            B_top, A_top = self._split(triplets.U[:, :kept], triplets.S[:kept], triplets.Vh[:kept])
            # Beyond the global delta's rank there is nothing to hand out: those
            # components start as a fresh LoRA (B = 0, A random) so that they can train.
            d, k = self.shapes[layer]
            fresh = r - kept
            B[layer] = torch.cat([B_top, torch.zeros(d, fresh, dtype=FACTOR_DTYPE)], dim=1)
            A[layer] = torch.cat([A_top, self._kaiming(fresh, k)], dim=0)
            noise_sq += self.scale**2 * float(triplets.S[kept:].double().square().sum())
        return ClientInit(client_id, rank, self.scale, B, A), noise_sq, None

    def _new_accumulator(self) -> dict[str, LowRankSum]:
        return {layer: LowRankSum(shape) for layer, shape in self.shapes.items()}

    def _accumulate(self, sums: dict[str, LowRankSum], update: ClientUpdate, handout: Handout) -> None:
        for layer, running in sums.items():
            running.add(update.B[layer], update.A[layer], update.num_examples)

    def _commit(self, sums: dict[str, LowRankSum], total_examples: int) -> float:
        for layer, running in sums.items():
            self._store(layer, running.total(), total_examples)
        # The new global delta is the data-weighted average of the clients' products.
        return 0.0

    def server_state(self) -> dict[str, Tensor]:
        # A server optimizer steps the dense delta (global_delta / scale), not its SVD factors.
        return {layer: triplets.dense().to(FACTOR_DTYPE) for layer, triplets in self._svd.items()}

    def load_server_state(self, tensors: Mapping[str, Tensor]) -> None:
        for layer in self.shapes:
            self._store(layer, tensors[layer], 1.0)
        self._global_norm_cache = None

    def _store(self, layer: str, matrix: Fold, divisor: float) -> None:
        """Keep ``matrix / divisor`` as the layer's thin SVD, without numerically zero triplets."""
        triplets = svd(matrix)
        S = triplets.S / divisor
        d, k = self.shapes[layer]
        tolerance = float(S[0]) * max(d, k) * torch.finfo(FACTOR_DTYPE).eps if S.numel() else 0.0
        keep = tolerance < S
        self._svd[layer] = SVD(
            triplets.U[:, keep].to(FACTOR_DTYPE),
            S[keep].to(FACTOR_DTYPE),
            triplets.Vh[keep].to(FACTOR_DTYPE),
        )

    def _state_tensors(self) -> dict[str, Tensor]:
        tensors = {}
        for layer, triplets in self._svd.items():
            tensors[f"{layer}.U"], tensors[f"{layer}.S"], tensors[f"{layer}.Vh"] = triplets.U, triplets.S, triplets.Vh
        return tensors

    def _load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        for layer in self.shapes:
            self._svd[layer] = SVD(*(tensors[f"{layer}.{part}"].clone() for part in ("U", "S", "Vh")))
