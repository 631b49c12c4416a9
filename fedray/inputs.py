"""What both sides derive from a spec: the dataset split, the evaluation set, the base model's spec.

Workers rebuild their client's shard from the dataset registry and the shard indices, so
data never travels between processes; these helpers make sure the driver and the workers
agree.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from fedray.config import Spec
from fedray.data import DatasetSplit, TextDataset, load_dataset
from fedray.models import ModelSpec


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
        dtype=spec.model_dtype,
    )


def eval_set(spec: Spec, split: DatasetSplit) -> TextDataset:
    """The part of the server's test split that every evaluation uses."""
    size = len(split.test) if spec.eval.max_examples is None else min(spec.eval.max_examples, len(split.test))
    return split.test.subset(np.arange(size))
