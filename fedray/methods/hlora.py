"""HLoRA: reconstruct and average the clients' products, redistribute by truncated SVD.

Split of the singular values: ``B = U_r``, ``A = S_r V_r^T``. Ranks may differ per layer
(pass ``{layer: rank}`` to ``client_init``).
"""

from __future__ import annotations

from torch import Tensor

from fedray.methods.redistribute import SVDRedistribution


class HLoRA(SVDRedistribution):
    name = "hlora"

    def _split(self, U: Tensor, S: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
        return U.clone(), S[:, None] * Vh
