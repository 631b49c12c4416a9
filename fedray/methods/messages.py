"""What travels between a method and its clients, and what a round reports.

A client gets a ``ClientInit`` (its trainable start, a fold for its frozen weights and
the method's ``ClientHook``) and sends back a ``ClientUpdate``; the method remembers a
``Handout`` per client until the round ends and reports ``RoundStats`` and ``Heatmap``s.
Notation follows shared/METHODS.md: ``dW = scale * B @ A``, B is d x r, A is r x k.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedray.methods.lowrank import Fold, as_dense, fold_nbytes, tensor_nbytes
from fedray.methods.wire import reduce_dataclass

ClientId = int | str
#: A client's LoRA rank: one rank for every layer, or a rank per layer.
Rank = int | Mapping[str, int]
#: The dtype of every factor a method hands out or keeps.
FACTOR_DTYPE = torch.float32


@dataclass(frozen=True)
class ClientUpdate:
    """What a client returns at the end of a round: its trained factors and data size."""

    client_id: ClientId
    rank: Rank
    num_examples: int
    B: Mapping[str, Tensor]
    A: Mapping[str, Tensor]

    def __reduce__(self) -> tuple:
        return reduce_dataclass(self)  # tensors as arrays: see fedray.methods.wire

    def nbytes(self) -> int:
        return sum(tensor_nbytes(t) for t in (*self.B.values(), *self.A.values()))


class ClientHook:
    """A method's part in one client's local training: the trainer calls it at named points.

    It travels to the worker inside ``ClientInit.hook``; this base class adds nothing. As
    with peft's LoRA variants, a method hooks in here instead of the trainer testing which
    method it runs (HETLoRA's tail regulariser and self-pruning are such a hook).
    """

    def loss_term(self, factors: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor | None:
        """An extra loss on the client's trainable factors ``{layer: (B, A)}``; None adds nothing."""
        return None

    def finish(self, update: ClientUpdate, init: ClientInit) -> tuple[ClientUpdate, dict[str, float]]:
        """After training: the update the client sends (it may shrink it), and metrics that
        the server sums over the round's clients."""
        return update, {}

    def shrunk_ranks(self, ranks: Mapping[str, int]) -> dict[str, int] | None:
        """The per-layer ranks of an update that ``finish`` shrank, for the server's check; None if it never shrinks."""
        return None


#: The hook of a method that has no say in local training.
NO_HOOK = ClientHook()


@dataclass(frozen=True)
class ClientInit:
    """A client's start for one round: trainable factors plus a fold for its frozen weights.

    ``fold`` holds, per layer, what the method adds to the frozen base weight before
    training (already scaled); layers without a fold are absent.
    """

    client_id: ClientId
    rank: Rank
    scale: float
    B: Mapping[str, Tensor]
    A: Mapping[str, Tensor]
    fold: Mapping[str, Fold] = field(default_factory=dict)
    #: The method's part in the client's training (an extra loss, a last step).
    hook: ClientHook = NO_HOOK

    def __reduce__(self) -> tuple:
        return reduce_dataclass(self)  # tensors as arrays: see fedray.methods.wire

    def layer_ranks(self) -> dict[str, int]:
        """The rank the client trains at in each layer."""
        return {layer: B.shape[1] for layer, B in self.B.items()}

    def fold_delta(self) -> dict[str, Tensor]:
        """The dense folded delta of every layer that has one."""
        return {layer: as_dense(fold) for layer, fold in self.fold.items()}

    def effective_delta(self) -> dict[str, Tensor]:
        """What the client's model adds to each frozen weight before training."""
        delta = {layer: self.scale * (self.B[layer] @ self.A[layer]) for layer in self.B}
        for layer, fold in self.fold.items():
            delta[layer] = delta[layer] + as_dense(fold)
        return delta

    def nbytes(self) -> int:
        """Bytes of the payload a client downloads (factors and folds as they travel)."""
        factors = sum(tensor_nbytes(t) for t in (*self.B.values(), *self.A.values()))
        return factors + sum(fold_nbytes(fold) for fold in self.fold.values())


@dataclass(frozen=True)
class RoundStats:
    """What one round did, for the tracker (noise definitions in shared/METHODS.md)."""

    round: int
    clients_initialised: int
    clients_aggregated: int
    num_examples: int
    init_noise: float
    init_noise_rel: float
    agg_noise: float
    agg_noise_rel: float
    bytes_down: int
    bytes_up: int


@dataclass
class Handout:
    """What the method remembers about a client's start until it aggregates the round."""

    ranks: dict[str, int]
    init_noise_sq: float
    nbytes: int
    #: What the method itself keeps about this start (e.g. Fed-PLoRA's module choice).
    memo: Any = None
    #: The update's ranks if the client's hook shrinks it (e.g. HETLoRA self-pruning).
    shrunk_ranks: dict[str, int] | None = None


@dataclass(frozen=True)
class Heatmap:
    """A matrix a method offers to be drawn at the end of a run (e.g. Fed-PLoRA's module similarity)."""

    #: rows x cols; NaN where a cell is undefined.
    values: Tensor
    title: str
    xlabel: str
    ylabel: str
    #: What a cell's value means (the colour bar's label).
    value_label: str
    #: The colour range, (low, high).
    value_range: tuple[float, float]
    #: A line under the figure, e.g. what an empty (NaN) cell means.
    caption: str = ""
