"""Tests for fedray.ranks: exact rank shares, memory tiers and the memory estimate."""

import math
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedray.ranks import (
    BYTES_PER_GB,
    MemoryModel,
    ResourceTier,
    assign_ranks,
    counts_from_shares,
    default_candidate_ranks,
    estimate_training_memory_bytes,
)

# MiniLM-L6 with LoRA on query and value of its 6 layers.
MINILM = MemoryModel(
    base_param_count=22_700_000,
    shapes_per_layer={f"layer.{i}.{name}": (384, 384) for i in range(6) for name in ("query", "value")},
    batch_size=16,
    seq_len=128,
    hidden_size=384,
    num_layers=6,
)


def _gb_for(rank: int, slack_bytes: int = 1) -> float:
    return (MINILM.bytes_for_rank(rank) + slack_bytes) / BYTES_PER_GB


def test_memory_estimate_matches_the_documented_formula():
    shapes = {"q": (10, 20), "v": (30, 40)}
    estimate = estimate_training_memory_bytes(
        base_param_count=1000,
        shapes_per_layer=shapes,
        rank=4,
        batch_size=2,
        seq_len=8,
        hidden_size=16,
        num_layers=3,
        base_bytes_per_param=2,
        trainable_bytes_per_param=4,
        optimizer_states=2,
        activation_bytes_per_value=2,
        activation_values_per_token_per_layer=17,
        overhead_bytes=5,
    )
    base = 1000 * 2
    adapter = 4 * (30 + 70) * 4 * (1 + 1 + 2)  # weights, grads, two Adam moments
    activations = 2 * 8 * 2 * (3 * 16 * 17 + 4 * 2)
    assert estimate == base + adapter + activations + 5


def test_memory_grows_with_rank():
    assert MINILM.bytes_for_rank(1) < MINILM.bytes_for_rank(8) < MINILM.bytes_for_rank(64)


def test_proportions_are_respected_exactly():
    client_ranks = assign_ranks(10, max_rank=16, ranks=[2, 4, 8, 16], proportions=[0.4, 0.3, 0.2, 0.1], seed=1)
    assert Counter(client_ranks) == {2: 4, 4: 3, 8: 2, 16: 1}


def test_equal_shares_by_largest_remainder():
    client_ranks = assign_ranks(7, max_rank=16, ranks=[2, 4, 8, 16])
    assert Counter(client_ranks) == {2: 2, 4: 2, 8: 2, 16: 1}  # 1.75 each: three largest (tied) remainders


@given(num_items=st.integers(0, 500), weights=st.lists(st.integers(0, 100), min_size=1, max_size=8))
def test_counts_from_shares_are_within_one_of_the_quota(num_items, weights):
    if sum(weights) == 0:
        weights = [1] * len(weights)
    shares = [weight / sum(weights) for weight in weights]
    counts = counts_from_shares(num_items, shares)
    assert sum(counts) == num_items
    assert all(
        math.floor(share * num_items) <= count <= math.ceil(share * num_items)
        for share, count in zip(shares, counts, strict=True)
    )


def test_assignment_is_fixed_by_seed():
    first = assign_ranks(50, max_rank=16, ranks=[2, 4, 8, 16], seed=3)
    assert first == assign_ranks(50, max_rank=16, ranks=[2, 4, 8, 16], seed=3)
    assert first != assign_ranks(50, max_rank=16, ranks=[2, 4, 8, 16], seed=4)


def test_no_ranks_means_everyone_at_max_rank():
    assert assign_ranks(4, max_rank=8) == [8, 8, 8, 8]


def test_tiers_get_the_largest_rank_that_fits():
    tiers = [
        ResourceTier(name="phone", memory_gb=_gb_for(2), share=0.5),
        ResourceTier(name="laptop", memory_gb=_gb_for(8), share=0.3),
        ResourceTier(name="server", memory_gb=100.0, share=0.2),
    ]
    client_ranks = assign_ranks(10, max_rank=16, ranks=[1, 2, 4, 8, 16], tiers=tiers, memory_model=MINILM)
    assert Counter(client_ranks) == {2: 5, 8: 3, 16: 2}
    for tier, rank in (("phone", 2), ("laptop", 8)):
        budget = next(t.memory_gb for t in tiers if t.name == tier) * BYTES_PER_GB
        assert MINILM.bytes_for_rank(rank) <= budget < MINILM.bytes_for_rank(rank * 2)


def test_tiers_default_to_powers_of_two_up_to_max_rank():
    assert default_candidate_ranks(12) == [1, 2, 4, 8, 12]
    tiers = [ResourceTier(name="big", memory_gb=100.0, share=1.0)]
    assert assign_ranks(3, max_rank=12, tiers=tiers, memory_model=MINILM) == [12, 12, 12]
    tiers = [ResourceTier(name="small", memory_gb=_gb_for(4), share=1.0)]
    assert assign_ranks(3, max_rank=12, tiers=tiers, memory_model=MINILM) == [4, 4, 4]


def test_tier_that_fits_no_rank_names_it_and_the_budget_that_works():
    tiers = [ResourceTier(name="watch", memory_gb=0.01, share=1.0)]
    with pytest.raises(
        ValueError, match=r"Tier 'watch' has memory_gb=0.01.*rank 2; raise its memory_gb to at least "
    ) as error:
        assign_ranks(2, max_rank=8, ranks=[2, 4], tiers=tiers, memory_model=MINILM)
    needed_gb = float(str(error.value).split("at least ")[1].split(" ")[0])
    enough = [ResourceTier(name="watch", memory_gb=needed_gb, share=1.0)]
    assert set(assign_ranks(2, max_rank=8, ranks=[2, 4], tiers=enough, memory_model=MINILM)) <= {2, 4}
    too_little = [ResourceTier(name="watch", memory_gb=needed_gb - 0.01, share=1.0)]
    with pytest.raises(ValueError, match="Tier 'watch'"):
        assign_ranks(2, max_rank=8, ranks=[2, 4], tiers=too_little, memory_model=MINILM)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"ranks": [4, 32]}, r"rank 32 in ranks=\[4, 32\] exceeds max_rank=16"),
        ({"ranks": []}, "ranks is empty"),
        ({"ranks": [0, 4]}, "rank 0 in ranks=.* must be at least 1"),
        ({"ranks": [4, 4]}, "repeats a rank"),
        ({"ranks": [4, 8], "proportions": [0.5, 0.6]}, r"sums to 1.1; make them sum to 1"),
        ({"ranks": [4, 8], "proportions": [1.5, -0.5]}, "negative entry"),
        ({"ranks": [4, 8], "proportions": [1.0]}, "proportions has 1 entries but ranks has 2"),
        ({"proportions": [1.0]}, "proportions were given without ranks"),
        ({"tiers": []}, "tiers is empty"),
        ({"tiers": [ResourceTier("a", 1.0, 1.0)]}, r"tiers need memory_model=MemoryModel"),
        ({"tiers": [ResourceTier("a", 1.0, 0.5)], "memory_model": MINILM}, r"tier shares=\[0.5\] sums to 0.5"),
        ({"tiers": [ResourceTier("a", 1.0, 0.5)] * 2, "memory_model": MINILM}, "give each tier a distinct name"),
        ({"tiers": [ResourceTier("a", 1.0, 1.0)], "proportions": [1.0]}, "proportions and tiers both split clients"),
    ],
)
def test_invalid_input_names_what_to_change(arguments, message):
    with pytest.raises(ValueError, match=message):
        assign_ranks(4, max_rank=16, **arguments)


def test_bad_counts_are_named():
    with pytest.raises(ValueError, match="num_clients=0 must be at least 1"):
        assign_ranks(0, max_rank=8)
    with pytest.raises(ValueError, match="max_rank=0 must be at least 1"):
        assign_ranks(3, max_rank=0)
    with pytest.raises(ValueError, match="shapes_per_layer is empty"):
        estimate_training_memory_bytes(
            base_param_count=1, shapes_per_layer={}, rank=1, batch_size=1, seq_len=1, hidden_size=1, num_layers=1
        )
