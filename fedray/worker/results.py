"""What a client task hands the aggregation actor. Kept apart from the workbench so the
actor, which unpickles it, imports neither transformers nor peft."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedray.methods import ClientUpdate
from fedray.methods.wire import reduce_dataclass


@dataclass
class ClientResult:
    """What a client task returns: the method's update, its head and its metrics."""

    update: ClientUpdate
    head: dict[str, torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)
    #: What the method's client hook reported (e.g. HETLoRA's clients_pruned); summed over the round.
    method_metrics: dict[str, float] = field(default_factory=dict)

    def __reduce__(self) -> tuple:
        return reduce_dataclass(self)  # tensors as arrays: see fedray.methods.wire
