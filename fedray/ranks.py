"""Per-client LoRA ranks, seeded and fixed for a whole run, never above the global max rank.

Two ways to assign them:

- shares of a rank list: ``ranks=[2, 4, 8, 16]`` with ``proportions`` (equal by default);
  client counts are the exact shares by largest remainder, then shuffled by ``seed``.
- resource tiers: each ``ResourceTier`` has a memory budget and a share of the clients; a
  client gets the largest candidate rank whose estimated training memory
  (``estimate_training_memory_bytes``) fits its tier's budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

BYTES_PER_GB = 10**9
SHARE_SUM_TOLERANCE = 1e-6  # proportions/shares may miss 1.0 by this much (float rounding in YAML)
BUDGET_GB_DECIMALS = 2  # the "smallest budget that would work" in errors is rounded up to this many decimals


def estimate_training_memory_bytes(
    *,
    base_param_count: int,
    shapes_per_layer: Mapping[str, tuple[int, int]],
    rank: int,
    batch_size: int,
    seq_len: int,
    hidden_size: int,
    num_layers: int,
    base_bytes_per_param: float = 2.0,
    trainable_bytes_per_param: float = 4.0,
    optimizer_states: int = 2,
    activation_bytes_per_value: float = 2.0,
    activation_values_per_token_per_layer: float = 17.0,
    overhead_bytes: int = 0,
) -> int:
    """Estimated peak bytes to LoRA-train one client at ``rank``; an estimate, not a measurement.

    total = base + adapter + activations + overhead_bytes, where

    - base = base_param_count * base_bytes_per_param: the frozen weights (no grads, no
      optimizer state; 2 bytes for bf16/fp16, 4 for fp32, ~0.6 for 4-bit).
    - adapter = rank * sum(d + k over shapes_per_layer) * trainable_bytes_per_param
      * (2 + optimizer_states): the LoRA factors B (d x r) and A (r x k), their gradients,
      and the optimizer's per-parameter states (2 for Adam's two moments).
    - activations = batch_size * seq_len * activation_bytes_per_value
      * (num_layers * hidden_size * activation_values_per_token_per_layer + rank * len(shapes_per_layer)):
      the values kept for the backward pass. The default 17 values per hidden unit is the
      34 bytes/token/layer (16-bit) of Korthikanti et al. (2022) without stored attention
      scores (fused attention); it is an upper figure for a frozen base. The second term is
      the rank-wide intermediate ``x @ A.T`` kept by every LoRA layer.

    Not counted: the LM head's logits, allocator fragmentation and the CUDA context; put
    them in ``overhead_bytes`` if they matter for the budget.
    """
    for argument, value in {
        "base_param_count": base_param_count,
        "rank": rank,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
    }.items():
        if value < 1:
            raise ValueError(f"{argument}={value} must be at least 1 to estimate training memory.")
    if not shapes_per_layer:
        raise ValueError("shapes_per_layer is empty; give {layer_name: (d, k)} for every LoRA target weight.")
    if optimizer_states < 0:
        raise ValueError(f"optimizer_states={optimizer_states} must be 0 or more (2 for Adam).")
    base = base_param_count * base_bytes_per_param
    adapter_params = rank * sum(d + k for d, k in shapes_per_layer.values())
    adapter = adapter_params * trainable_bytes_per_param * (2 + optimizer_states)
    values_per_token = num_layers * hidden_size * activation_values_per_token_per_layer + rank * len(shapes_per_layer)
    activations = batch_size * seq_len * activation_bytes_per_value * values_per_token
    return math.ceil(base + adapter + activations + overhead_bytes)


@dataclass(frozen=True)
class MemoryModel:
    """What a client trains, minus the rank: the inputs of ``estimate_training_memory_bytes``."""

    base_param_count: int
    shapes_per_layer: Mapping[str, tuple[int, int]]
    batch_size: int
    seq_len: int
    hidden_size: int
    num_layers: int
    base_bytes_per_param: float = 2.0
    trainable_bytes_per_param: float = 4.0
    optimizer_states: int = 2
    activation_bytes_per_value: float = 2.0
    activation_values_per_token_per_layer: float = 17.0
    overhead_bytes: int = 0

    def bytes_for_rank(self, rank: int) -> int:
        return estimate_training_memory_bytes(rank=rank, **asdict(self))


@dataclass(frozen=True)
class ResourceTier:
    """A class of clients: ``share`` of all clients, each with ``memory_gb`` (10^9 bytes) to train in."""

    name: str
    memory_gb: float
    share: float


def counts_from_shares(num_items: int, shares: Sequence[float]) -> list[int]:
    """Split ``num_items`` by ``shares`` (summing to 1) exactly: floors, then the largest remainders.

    Ties in the remainder go to the earlier share, so the counts are deterministic.
    """
    quotas = np.asarray(shares, dtype=float) * num_items
    counts = np.floor(quotas).astype(int)
    leftover = num_items - int(counts.sum())
    by_remainder = np.argsort(-(quotas - counts), kind="stable")
    counts[by_remainder[:leftover]] += 1
    return counts.tolist()


def check_rank_split(
    *,
    max_rank: int,
    ranks: Sequence[int] | None = None,
    proportions: Sequence[float] | None = None,
    tiers: Sequence[ResourceTier] | None = None,
) -> None:
    """Raise ValueError, naming what to change, if clients cannot be split this way.

    Everything ``assign_ranks`` checks before it needs a model (the spec checks it before
    anything loads): ranks in [1, max_rank] and listed once, one proportion per rank and
    tier shares that sum to 1, distinct tier names, not both proportions and tiers.
    """
    if ranks is not None:
        _check_ranks(ranks, max_rank=max_rank)
    if tiers is not None:
        if proportions is not None:
            raise ValueError("proportions and tiers both split clients; give one of them (a tier has its own share).")
        if not tiers:
            raise ValueError("tiers is empty; give at least one tier (name, memory_gb, share) or leave tiers out.")
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names {names} repeat; give each tier a distinct name.")
        _check_shares([tier.share for tier in tiers], argument="tier shares")
    elif proportions is not None:
        if ranks is None:
            raise ValueError("proportions were given without ranks; give ranks=[...] with one proportion each.")
        if len(proportions) != len(ranks):
            raise ValueError(
                f"proportions has {len(proportions)} entries but ranks has {len(ranks)}; give one per rank."
            )
        _check_shares(proportions, argument="proportions")


def _check_shares(shares: Sequence[float], *, argument: str) -> None:
    if any(share < 0 for share in shares):
        raise ValueError(f"{argument}={list(shares)} has a negative entry; use shares between 0 and 1.")
    if abs(sum(shares) - 1.0) > SHARE_SUM_TOLERANCE:
        raise ValueError(f"{argument}={list(shares)} sums to {sum(shares):.6g}; make them sum to 1.")


def _check_ranks(ranks: Sequence[int], *, max_rank: int) -> None:
    if not ranks:
        raise ValueError("ranks is empty; give at least one rank, e.g. ranks=[4, 8].")
    for rank in ranks:
        if rank < 1:
            raise ValueError(f"rank {rank} in ranks={list(ranks)} must be at least 1.")
        if rank > max_rank:
            raise ValueError(
                f"rank {rank} in ranks={list(ranks)} exceeds max_rank={max_rank}; lower it or raise max_rank."
            )
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks={list(ranks)} repeats a rank; list each rank once and weight it with proportions.")


def default_candidate_ranks(max_rank: int) -> list[int]:
    """Powers of two up to ``max_rank``, plus ``max_rank`` itself."""
    return sorted({2**power for power in range(max_rank.bit_length()) if 2**power <= max_rank} | {max_rank})


def rank_for_budget(memory_bytes: float, *, candidate_ranks: Sequence[int], memory_model: MemoryModel) -> int | None:
    """The largest candidate rank whose estimated training memory fits ``memory_bytes``, or None."""
    fitting = [rank for rank in candidate_ranks if memory_model.bytes_for_rank(rank) <= memory_bytes]
    return max(fitting, default=None)


def tier_ranks(
    tiers: Sequence[ResourceTier], *, candidate_ranks: Sequence[int], memory_model: MemoryModel
) -> dict[str, int]:
    """The rank each tier's clients train at; a tier that fits no candidate rank is an error."""
    ranks = {}
    for tier in tiers:
        rank = rank_for_budget(
            tier.memory_gb * BYTES_PER_GB, candidate_ranks=candidate_ranks, memory_model=memory_model
        )
        if rank is None:
            smallest = min(candidate_ranks)
            scale = 10**BUDGET_GB_DECIMALS
            needed_gb = math.ceil(memory_model.bytes_for_rank(smallest) / BYTES_PER_GB * scale) / scale
            raise ValueError(
                f"Tier {tier.name!r} has memory_gb={tier.memory_gb}, too little for the smallest candidate rank "
                f"{smallest}; raise its memory_gb to at least {needed_gb} or shrink batch_size/seq_len."
            )
        ranks[tier.name] = rank
    return ranks


def assign_ranks(
    num_clients: int,
    *,
    max_rank: int,
    ranks: Sequence[int] | None = None,
    proportions: Sequence[float] | None = None,
    tiers: Sequence[ResourceTier] | None = None,
    memory_model: MemoryModel | None = None,
    seed: int = 0,
) -> list[int]:
    """The rank of clients 0..num_clients-1, fixed for the run.

    - neither ``ranks`` nor ``tiers``: every client trains at ``max_rank``.
    - ``ranks`` (+ ``proportions``, equal by default): exact shares, shuffled by ``seed``.
    - ``tiers`` + ``memory_model``: clients split by the tiers' shares (shuffled by ``seed``);
      each gets the largest rank from ``ranks`` (default: powers of two up to ``max_rank``)
      that fits its tier's memory.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients} must be at least 1.")
    if max_rank < 1:
        raise ValueError(f"max_rank={max_rank} must be at least 1.")
    check_rank_split(max_rank=max_rank, ranks=ranks, proportions=proportions, tiers=tiers)
    if tiers is not None:
        client_ranks = _tier_client_ranks(num_clients, ranks, tiers, memory_model, max_rank=max_rank)
    elif ranks is None:
        return [max_rank] * num_clients
    else:
        shares = [1.0 / len(ranks)] * len(ranks) if proportions is None else list(proportions)
        counts = counts_from_shares(num_clients, shares)
        client_ranks = [rank for rank, count in zip(ranks, counts, strict=True) for _ in range(count)]
    order = np.random.default_rng(seed).permutation(num_clients)
    return [int(client_ranks[i]) for i in order]


def _tier_client_ranks(
    num_clients: int,
    ranks: Sequence[int] | None,
    tiers: Sequence[ResourceTier],
    memory_model: MemoryModel | None,
    *,
    max_rank: int,
) -> list[int]:
    """Unshuffled client ranks, tier by tier (the tiers already checked)."""
    if memory_model is None:
        raise ValueError("tiers need memory_model=MemoryModel(...) to estimate what rank fits each tier's memory.")
    rank_of_tier = tier_ranks(
        tiers, candidate_ranks=list(ranks) if ranks else default_candidate_ranks(max_rank), memory_model=memory_model
    )
    counts = counts_from_shares(num_clients, [tier.share for tier in tiers])
    return [rank_of_tier[tier.name] for tier, count in zip(tiers, counts, strict=True) for _ in range(count)]
