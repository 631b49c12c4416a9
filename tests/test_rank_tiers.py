"""Client ranks by memory: ``rank_tiers`` in the spec, resolved against the real base model."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fedray import inputs
from fedray.config import SpecError, load_spec
from fedray.driver.prepare import client_ranks, memory_model, prepare
from fedray.models import load_base

QUICKSTART = "jobs/quickstart.yaml"
SMALL = ("num_clients=10", "partition=iid", "partition_options={}", "dataset_options.max_examples=400")


def tiers(*entries: tuple[str, float, float]) -> str:
    """A ``rank_tiers=[...]`` override from (name, memory_gb, share) triples."""
    return "rank_tiers=" + json.dumps([{"name": n, "memory_gb": m, "share": s} for n, m, s in entries])


@pytest.fixture(scope="module")
def base():
    spec = load_spec(QUICKSTART, SMALL)
    return load_base(inputs.model_spec(spec, inputs.dataset_split(spec)))


def test_each_tier_trains_at_the_largest_rank_its_memory_fits(base) -> None:
    memory = memory_model(load_spec(QUICKSTART, SMALL), base)
    # Just enough for rank 4 (not 8), and plenty.
    tight_gb = (memory.bytes_for_rank(4) + memory.bytes_for_rank(8)) / 2 / 1e9
    spec = load_spec(QUICKSTART, [*SMALL, tiers(("phone", tight_gb, 0.3), ("laptop", 100.0, 0.7))])

    prepared = prepare(spec)

    assert Counter(prepared.client_ranks) == {4: 3, 16: 7}
    assert [stats["rank"] for stats in prepared.partition.stats] == prepared.client_ranks


def test_memory_model_counts_the_base_the_optimizer_and_the_head(base) -> None:
    adam = memory_model(load_spec(QUICKSTART, SMALL), base)
    sgd = memory_model(load_spec(QUICKSTART, [*SMALL, "train.optimizer=sgd"]), base)
    momentum = memory_model(load_spec(QUICKSTART, [*SMALL, "train.optimizer=sgd", "train.momentum=0.9"]), base)

    assert adam.base_param_count == sum(weight.numel() for weight in base.model.parameters())
    assert adam.base_bytes_per_param == 4  # MiniLM's float32 weights
    assert (adam.optimizer_states, sgd.optimizer_states, momentum.optimizer_states) == (2, 0, 1)
    assert len(adam.shapes_per_layer) == 12  # query and value of 6 layers
    head_values = sum(w.numel() for name, w in base.model.named_parameters() if name.startswith("classifier"))
    assert adam.overhead_bytes == head_values * 4 * (2 + 2)
    assert adam.bytes_for_rank(16) > adam.bytes_for_rank(2) > sgd.bytes_for_rank(2)


def test_a_tier_too_small_for_any_rank_names_the_tier_and_the_memory_that_works(base) -> None:
    spec = load_spec(QUICKSTART, [*SMALL, tiers(("watch", 0.01, 0.5), ("laptop", 100.0, 0.5))])
    with pytest.raises(ValueError, match=r"rank_tiers: Tier 'watch' has memory_gb=0.01.*at least 0\.\d+"):
        client_ranks(spec, base)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (tiers(("a", 1.0, 0.5), ("a", 2.0, 0.5)), "names .* repeat"),
        (tiers(("a", 1.0, 0.5), ("b", 2.0, 0.4)), r"tier shares=\[0.5, 0.4\] sums to 0.9; make them sum to 1"),
        ("rank_tiers=[]", "rank_tiers: tiers is empty"),
        (tiers(("a", 0.0, 1.0)), "memory_gb"),
    ],
)
def test_bad_tiers_are_refused_before_anything_loads(override: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_spec(QUICKSTART, [override])


def test_tiers_and_rank_proportions_do_not_mix() -> None:
    with pytest.raises(SpecError, match="give one of them"):
        load_spec(QUICKSTART, [tiers(("a", 1.0, 1.0)), "rank_proportions=[0.25, 0.25, 0.25, 0.25]"])
