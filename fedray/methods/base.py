"""The contract every federated LoRA method follows, and the bookkeeping they share.

A method owns the global adapter. Each round it hands every sampled client a start
(``client_init``), then folds the clients' trained factors into a new global adapter
(``aggregate``). Subclasses supply only the math: what a client starts from, how an
update is accumulated, and how the accumulated updates become the new global state.
Notation follows shared/METHODS.md: ``dW = scale * B @ A``, B is d x r, A is r x k.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedray.methods.lowrank import Fold, as_dense, fro_norm
from fedray.methods.messages import (
    FACTOR_DTYPE,
    ClientId,
    ClientInit,
    ClientUpdate,
    Handout,
    Heatmap,
    Rank,
    RoundStats,
)


def relative(value: float, reference: float) -> float:
    """``value / reference``, with 0/0 read as 0 (no change of a zero delta)."""
    if reference > 0.0:
        return value / reference
    return 0.0 if value == 0.0 else math.inf


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """LoRA's A initialisation: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(k), 1/sqrt(k))."""
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator, dtype=FACTOR_DTYPE) * 2 - 1) * bound


class Method(ABC):
    """Base class of the six methods; see the module docstring for the round protocol."""

    name: ClassVar[str]

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        max_rank: int,
        *,
        scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.shapes = _check_shapes(shapes)
        smallest = min(min(shape) for shape in self.shapes.values())
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
        if max_rank > smallest:
            raise ValueError(
                f"max_rank={max_rank} exceeds the smallest target dimension ({smallest}); "
                f"set max_rank to at most {smallest}"
            )
        if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.max_rank = max_rank
        self.scale = float(scale)
        self.seed = seed
        self.round = 0
        self.last_round: RoundStats | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._handouts: dict[ClientId, Handout] = {}
        self._global_norm_cache: float | None = None

    # ----------------------------------------------------------------- public API

    @property
    def options(self) -> dict[str, Any]:
        """Method-specific options, as passed to ``create_method`` (JSON-friendly)."""
        return {}

    def client_init(self, client_id: ClientId, rank: Rank) -> ClientInit:
        """Hand ``client_id`` its start for this round at ``rank``."""
        if client_id in self._handouts:
            raise ValueError(f"client {client_id!r} was already given client_init this round")
        requested = self._layer_ranks(rank, f"client {client_id!r}")
        ranks = self._start_ranks(client_id, requested)
        if ranks != requested:  # a HETLoRA client that pruned itself earlier trains smaller
            rank = ranks
        init, init_noise_sq, memo = self._make_init(client_id, rank, ranks)
        self._handouts[client_id] = Handout(ranks, init_noise_sq, init.nbytes(), memo, init.hook.shrunk_ranks(ranks))
        return init

    def validate(self, update: ClientUpdate) -> None:
        """Raise ValueError naming the client and the problem if ``update`` is unusable."""
        who = f"client {update.client_id!r}"
        handout = self._handouts.get(update.client_id)
        if handout is None:
            raise ValueError(f"{who} was not given client_init this round; its update is rejected")
        if isinstance(update.num_examples, bool) or not isinstance(update.num_examples, int) or update.num_examples < 1:
            raise ValueError(f"{who}: num_examples must be a positive integer, got {update.num_examples!r}")
        ranks = self._layer_ranks(update.rank, who)
        if ranks != handout.ranks and ranks != handout.shrunk_ranks:
            expected = f"{handout.ranks}" + (f" (or {handout.shrunk_ranks} if shrunk)" if handout.shrunk_ranks else "")
            raise ValueError(f"{who}: update has rank {update.rank!r}, but was initialised at {expected}")
        expected = set(self.shapes)
        for name, factors in (("B", update.B), ("A", update.A)):
            if set(factors) != expected:
                missing = sorted(expected - set(factors))
                unexpected = sorted(set(factors) - expected)
                raise ValueError(f"{who}: {name} has wrong layers (missing {missing}, unexpected {unexpected})")
        for layer, (d, k) in self.shapes.items():
            r = ranks[layer]
            for name, tensor, shape in (("B", update.B[layer], (d, r)), ("A", update.A[layer], (r, k))):
                if not isinstance(tensor, Tensor):
                    raise ValueError(f"{who}: {name}[{layer!r}] is a {type(tensor).__name__}, not a torch tensor")
                if tuple(tensor.shape) != shape:
                    raise ValueError(f"{who}: {name}[{layer!r}] has shape {tuple(tensor.shape)}, expected {shape}")
                if not tensor.is_floating_point():
                    raise ValueError(f"{who}: {name}[{layer!r}] has dtype {tensor.dtype}, expected a float dtype")
                if not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"{who}: {name}[{layer!r}] contains NaN or Inf")

    def aggregate(self, updates: Iterable[ClientUpdate]) -> RoundStats:
        """End the round: fold ``updates`` (consumed once, streamed) into the global adapter.

        A bad update raises ValueError before any global state changes; the round stays
        open, so the caller may aggregate again with the good updates.
        """
        accumulator = self._new_accumulator()
        seen: set[ClientId] = set()
        total_examples = 0
        bytes_up = 0
        for update in updates:
            if update.client_id in seen:
                raise ValueError(f"client {update.client_id!r} sent more than one update this round")
            self.validate(update)
            seen.add(update.client_id)
            total_examples += update.num_examples
            bytes_up += update.nbytes()
            self._accumulate(accumulator, _as_factor_dtype(update), self._handouts[update.client_id])
        if not seen:
            raise ValueError("aggregate() got no client updates; a round needs at least one")

        init_noises = [math.sqrt(h.init_noise_sq) for h in self._handouts.values()]
        init_noise = sum(init_noises) / len(init_noises)
        init_noise_rel = relative(init_noise, self._global_norm())

        agg_noise = math.sqrt(max(self._commit(accumulator, total_examples), 0.0))
        self._global_norm_cache = None
        stats = RoundStats(
            round=self.round,
            clients_initialised=len(self._handouts),
            clients_aggregated=len(seen),
            num_examples=total_examples,
            init_noise=init_noise,
            init_noise_rel=init_noise_rel,
            agg_noise=agg_noise,
            agg_noise_rel=relative(agg_noise, self._global_norm()),
            bytes_down=sum(h.nbytes for h in self._handouts.values()),
            bytes_up=bytes_up,
        )
        self._handouts.clear()
        self.round += 1
        self.last_round = stats
        return stats

    def abandon_round(self) -> None:
        """Forget this round's client starts without aggregating (the round is re-run)."""
        self._handouts.clear()

    def heatmaps(self) -> dict[str, Heatmap]:
        """Figures of the last aggregated round, by file stem; a method with none returns {}."""
        return {}

    @classmethod
    def check_client_ranks(cls, ranks: Sequence[int], max_rank: int) -> None:
        """Raise ValueError, naming what to change, if clients may not train at ``ranks``
        (checked on the spec before a run starts); any rank in [1, max_rank] is fine by default."""
        return None

    def global_delta(self) -> dict[str, Tensor]:
        """What the global model adds to each frozen weight (dense, d x k)."""
        return {layer: as_dense(self._layer_global(layer)).to(FACTOR_DTYPE) for layer in self.shapes}

    def server_state(self) -> dict[str, Tensor]:
        """The global state a server optimizer steps (``fedray.methods.server_optimizer``),
        as named float32 tensors of fixed shapes. By default the method's own state tensors
        (the factors of FedIT, HETLoRA and Fed-PLoRA); a method whose state does not add up
        that way (FLoRA, FlexLoRA, HLoRA: the dense global delta) overrides both this and
        ``load_server_state``."""
        return dict(self._state_tensors())

    def load_server_state(self, tensors: Mapping[str, Tensor]) -> None:
        """Make ``tensors`` (shaped as ``server_state()``) the global state."""
        self._load_state_tensors(tensors)
        self._global_norm_cache = None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: ``{"tensors": {...}, "meta": {...}}``.

        Tensors only under "tensors" and JSON values only under "meta" (safetensors can
        store both: see ``fedray.methods.save_state``). An open round is not saved. The
        tensors are the method's own; it replaces them on update and never writes into them.
        """
        tensors = {"generator": self._generator.get_state()}
        tensors.update({f"global.{key}": value for key, value in self._state_tensors().items()})
        meta = {
            "method": self.name,
            "shapes": {layer: list(shape) for layer, shape in self.shapes.items()},
            "max_rank": self.max_rank,
            "scale": self.scale,
            "seed": self.seed,
            "options": self.options,
            "round": self.round,
        }
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` of the same method, shapes and settings."""
        meta = dict(state["meta"])
        mine = self.state_dict()["meta"]
        # A state saved before an option existed had that option's default.
        meta["options"] = self._option_defaults() | meta["options"]
        for key in ("method", "shapes", "max_rank", "scale", "options"):
            if meta[key] != mine[key]:
                raise ValueError(f"saved state has {key}={meta[key]!r}, this method has {mine[key]!r}")
        tensors = state["tensors"]
        prefix = "global."
        self._load_state_tensors(
            {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        )
        self._generator.set_state(tensors["generator"])
        self.seed = meta["seed"]
        self.round = int(meta["round"])
        self._handouts.clear()
        self._global_norm_cache = None
        self.last_round = None

    # ------------------------------------------------------------ subclass hooks

    def _start_ranks(self, client_id: ClientId, ranks: dict[str, int]) -> dict[str, int]:
        """The ranks ``client_id`` trains at this round; a method that lets clients shrink overrides it."""
        return ranks

    @abstractmethod
    def _layer_global(self, layer: str) -> Fold:
        """The global delta of ``layer`` (scale included), as factors or dense."""

    @abstractmethod
    def _make_init(self, client_id: ClientId, rank: Rank, ranks: dict[str, int]) -> tuple[ClientInit, float, Any]:
        """The client's start, its squared init noise summed over layers, and a memo the
        method keeps in the client's ``Handout`` until the round ends (None if it needs none)."""

    @abstractmethod
    def _new_accumulator(self) -> Any:
        """Fresh running sums for one aggregation (nothing global changes before commit)."""

    @abstractmethod
    def _accumulate(self, accumulator: Any, update: ClientUpdate, handout: Handout) -> None:
        """Add one validated update (float32 factors) to the running sums."""

    @abstractmethod
    def _commit(self, accumulator: Any, total_examples: int) -> float:
        """Replace the global state; return the squared aggregation noise over layers."""

    @abstractmethod
    def _state_tensors(self) -> dict[str, Tensor]:
        """The global state as named tensors."""

    @abstractmethod
    def _load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Inverse of ``_state_tensors``."""

    # ------------------------------------------------------------------ helpers

    def _layer_ranks(self, rank: Rank, who: str) -> dict[str, int]:
        if isinstance(rank, Mapping):
            if set(rank) != set(self.shapes):
                raise ValueError(
                    f"{who}: per-layer ranks must name exactly the layers {sorted(self.shapes)}, got {sorted(rank)}"
                )
            ranks = dict(rank)
        else:
            ranks = dict.fromkeys(self.shapes, rank)
        for layer, r in ranks.items():
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= self.max_rank:
                raise ValueError(
                    f"{who}: rank {r!r} for layer {layer!r} must be an integer in [1, max_rank={self.max_rank}]"
                )
        return ranks

    def _option_defaults(self) -> dict[str, Any]:
        """The default of each option, as ``__init__`` declares it."""
        parameters = inspect.signature(type(self).__init__).parameters
        return {key: parameters[key].default for key in self.options}

    def _global_norm(self) -> float:
        if self._global_norm_cache is None:
            squares = (self._layer_global_norm(layer) ** 2 for layer in self.shapes)
            self._global_norm_cache = math.sqrt(sum(squares))
        return self._global_norm_cache

    def _layer_global_norm(self, layer: str) -> float:
        """||global delta of ``layer``||_F; methods with a cheaper exact form override it."""
        return fro_norm(self._layer_global(layer))

    def _kaiming(self, rows: int, cols: int) -> Tensor:
        return kaiming_uniform(rows, cols, self._generator)


def _check_shapes(shapes: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    if not shapes:
        raise ValueError("shapes is empty: name at least one target layer as {layer: (d, k)}")
    checked = {}
    for layer, shape in shapes.items():
        dims = tuple(shape)
        if len(dims) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in dims):
            raise ValueError(f"shape of layer {layer!r} must be (d, k) with positive integers, got {shape!r}")
        checked[str(layer)] = (dims[0], dims[1])
    return checked


def _as_factor_dtype(update: ClientUpdate) -> ClientUpdate:
    def convert(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {layer: t.detach().to(device="cpu", dtype=FACTOR_DTYPE) for layer, t in tensors.items()}

    return ClientUpdate(update.client_id, update.rank, update.num_examples, convert(update.B), convert(update.A))
