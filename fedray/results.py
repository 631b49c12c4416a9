"""What a client task hands the aggregation actor: kept apart from ``fedray.client`` so the
actor, which unpickles it, does not import transformers and peft."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedray.methods import ClientUpdate


@dataclass
class ClientResult:
    """What a client task returns: the method's update, its head and its metrics."""

    update: ClientUpdate
    head: dict[str, torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)
