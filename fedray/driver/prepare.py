"""A run's inputs, checked and built on the driver before Ray starts: data, partition,
client ranks and the base model."""

from __future__ import annotations

from dataclasses import dataclass

from fedray import inputs
from fedray.config import Spec
from fedray.data import DatasetSplit, Partition, create_partitioner
from fedray.models import Base, head_state, load_base, target_layers
from fedray.ranks import MemoryModel, ResourceTier, assign_ranks

#: Bytes of a trainable value (LoRA factors, head, their gradients and optimizer states: float32).
TRAINABLE_BYTES = 4


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` built: everything a run needs besides Ray and MLflow."""

    split: DatasetSplit
    partition: Partition
    #: The rank of every client, fixed for the run.
    client_ranks: list[int]
    base: Base

    @property
    def task(self) -> str:
        """``classification`` or ``generation``: what the run's data asks of the model."""
        return self.split.train.task


def prepare(spec: Spec) -> Prepared:
    """Data, partition, ranks and base model: checked and built before Ray starts."""
    split = inputs.dataset_split(spec)
    if spec.train.logit_adjust > 0 and split.train.task != "classification":
        raise ValueError(
            f"train.logit_adjust={spec.train.logit_adjust} applies to classification, but dataset "
            f"{spec.dataset!r} is a {split.train.task} task; set train.logit_adjust=0"
        )
    partitioner = create_partitioner(spec.partition, **({"seed": spec.seed} | spec.partition_options))
    partition = partitioner.partition(split.train, spec.num_clients)
    base = load_base(inputs.model_spec(spec, split))
    ranks = client_ranks(spec, base)
    for stats, rank in zip(partition.stats, ranks, strict=True):
        stats["rank"] = rank
    return Prepared(split, partition, ranks, base)


def memory_model(spec: Spec, base: Base) -> MemoryModel:
    """What one client of ``spec`` holds in memory to train on ``base``, but for its rank."""
    model = base.model
    weights = list(model.parameters())
    states = 2 if spec.train.optimizer == "adamw" else int(spec.train.momentum > 0)
    head_values = sum(weight.numel() for weight in head_state(model).values()) if spec.train.train_head else 0
    layers = model.config.num_hidden_layers
    per_layer = MemoryModel.activation_values_per_token_per_layer
    if spec.train.gradient_checkpointing:
        # Each layer keeps only its input (one value per hidden unit); one layer at a time
        # holds its full activations while it is recomputed. Not yet checked against a measurement.
        per_layer = 1.0 + per_layer / layers
    return MemoryModel(
        base_param_count=sum(weight.numel() for weight in weights),
        shapes_per_layer=target_layers(model, base.target_modules),
        batch_size=spec.train.batch_size,
        seq_len=spec.train.max_seq_len,
        hidden_size=model.config.hidden_size,
        num_layers=layers,
        base_bytes_per_param=weights[0].element_size(),
        trainable_bytes_per_param=TRAINABLE_BYTES,
        optimizer_states=states,
        activation_values_per_token_per_layer=per_layer,
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
