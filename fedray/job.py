"""The ingredients of a run derived from its spec, the same on the driver and in workers.

Workers rebuild their client's shard from the dataset registry and the shard indices, so
data never travels between processes; these helpers make sure both sides agree.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from fedray.client import head_state
from fedray.config import Spec
from fedray.data import DatasetSplit, TextDataset, load_dataset
from fedray.models import Base, ModelSpec, target_layers
from fedray.ranks import MemoryModel, ResourceTier, assign_ranks

#: Bytes of a trainable value (LoRA factors, head, their gradients and optimizer states: float32).
TRAINABLE_BYTES = 4


def dataset_split(spec: Spec) -> DatasetSplit:
    """The run's train pool and server test split (cached per process)."""
    return _cached_split(spec.dataset, spec.seed, spec.test_fraction, json.dumps(spec.dataset_options, sort_keys=True))


@lru_cache(maxsize=4)
def _cached_split(name: str, seed: int, test_fraction: float, options_json: str) -> DatasetSplit:
    return load_dataset(name, split_seed=seed, test_fraction=test_fraction, **json.loads(options_json))


def model_spec(spec: Spec, split: DatasetSplit) -> ModelSpec:
    """Which base model and head the run trains, given its data's task."""
    train = split.train
    return ModelSpec(
        name=spec.model,
        task=train.task,
        num_labels=train.num_labels if train.task == "classification" else None,
        target_modules=tuple(spec.target_modules) if spec.target_modules else None,
        seed=spec.seed,
        pooling=spec.pooling,
    )


def memory_model(spec: Spec, base: Base) -> MemoryModel:
    """What one client of ``spec`` holds in memory to train on ``base``, but for its rank."""
    model = base.model
    weights = list(model.parameters())
    states = 2 if spec.train.optimizer == "adamw" else int(spec.train.momentum > 0)
    head_values = sum(weight.numel() for weight in head_state(model).values()) if spec.train.train_head else 0
    return MemoryModel(
        base_param_count=sum(weight.numel() for weight in weights),
        shapes_per_layer=target_layers(model, base.target_modules),
        batch_size=spec.train.batch_size,
        seq_len=spec.train.max_seq_len,
        hidden_size=model.config.hidden_size,
        num_layers=model.config.num_hidden_layers,
        base_bytes_per_param=weights[0].element_size(),
        trainable_bytes_per_param=TRAINABLE_BYTES,
        optimizer_states=states,
        overhead_bytes=head_values * TRAINABLE_BYTES * (2 + states),
    )


def client_ranks(spec: Spec, base: Base) -> list[int]:
    """The rank of every client, fixed for the run: by ``rank_proportions``, or by memory with ``rank_tiers``."""
    if spec.rank_tiers is None:
        return assign_ranks(
            spec.num_clients,
            max_rank=spec.max_rank,
            ranks=spec.ranks,
            proportions=spec.rank_proportions,
            seed=spec.seed,
        )
    tiers = [ResourceTier(tier.name, tier.memory_gb, tier.share) for tier in spec.rank_tiers]
    try:
        return assign_ranks(
            spec.num_clients,
            max_rank=spec.max_rank,
            ranks=spec.ranks,
            tiers=tiers,
            memory_model=memory_model(spec, base),
            seed=spec.seed,
        )
    except ValueError as error:
        raise ValueError(f"rank_tiers: {error}") from None


def eval_set(spec: Spec, split: DatasetSplit) -> TextDataset:
    """The part of the server's test split that every evaluation uses."""
    size = len(split.test) if spec.eval.max_examples is None else min(spec.eval.max_examples, len(split.test))
    return split.test.subset(np.arange(size))


def client_seed(spec: Spec, round_index: int, client_id: int) -> int:
    """A seed for one client's round, independent of scheduling order."""
    return int(np.random.SeedSequence([spec.seed, round_index, client_id]).generate_state(1)[0])


def sample_clients(spec: Spec, round_index: int, attempt: int = 0) -> list[int]:
    """The clients of round ``round_index`` (seeded per round and attempt, so a resumed run agrees)."""
    rng = np.random.default_rng([spec.seed, round_index, attempt])
    return sorted(int(c) for c in rng.choice(spec.num_clients, size=spec.sampled_clients, replace=False))
