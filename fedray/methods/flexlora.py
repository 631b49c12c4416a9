"""FlexLoRA: average full products; client i starts from the best rank-r_i approximation.

Split of the singular values: ``B = U_r S_r^(1/2)``, ``A = S_r^(1/2) V_r^T`` (balanced).
"""

from __future__ import annotations

from torch import Tensor

from fedray.methods.redistribute import SVDRedistribution


class FlexLoRA(SVDRedistribution):
    name = "flexlora"

    def _split(self, U: Tensor, S: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
        root = S.sqrt()
        return U * root, root[:, None] * Vh
