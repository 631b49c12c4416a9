"""The dataset registry: turn a name into the clients' train pool and the server's test set.

A name is a built-in dataset, a local ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.parquet`` path or a Hugging
Face ``datasets`` name. Every dataset is deduplicated by its input text so that no example
sits in both the train and the test split.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedray.config import Task
from fedray.data.builtin import BUILTIN_DATASETS
from fedray.data.dataset import TASKS, DatasetSplit, TextDataset
from fedray.data.tables import LOCAL_FILE_SUFFIXES, _from_frame, _load_hub_table, _read_table
from fedray.hub import HUB_PROBE_TIMEOUT_S


def split_dataset(
    dataset: TextDataset, *, test_fraction: float = 0.2, seed: int = 0, max_examples: int | None = None
) -> DatasetSplit:
    """A fixed, seeded train/test split; ``max_examples`` first keeps a seeded random subset."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie strictly between 0 and 1.")
    if max_examples is not None and max_examples < 2:
        raise ValueError(f"max_examples={max_examples} must be at least 2 (one train and one test example).")
    order = np.random.default_rng(seed).permutation(len(dataset))
    if max_examples is not None:
        order = order[:max_examples]
    num_test = max(1, round(len(order) * test_fraction))
    if len(order) - num_test < 1:
        raise ValueError(
            f"Dataset {dataset.name!r} keeps {len(order)} examples, too few to split with "
            f"test_fraction={test_fraction}; raise max_examples or lower test_fraction."
        )
    return DatasetSplit(train=dataset.subset(order[num_test:]), test=dataset.subset(order[:num_test]))


def load_dataset(
    name: str,
    *,
    task: Task | None = None,
    text_column: str = "text",
    label_column: str = "label",
    prompt_column: str = "prompt",
    target_column: str = "target",
    key_column: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    split_seed: int = 0,
    test_fraction: float = 0.2,
    max_examples: int | None = None,
    hub_timeout_s: float = HUB_PROBE_TIMEOUT_S,
) -> DatasetSplit:
    """Load a dataset by name and split it into the clients' train pool and the server's test set.

    ``name`` is a built-in dataset (``BUILTIN_DATASETS``), a local ``.csv``/``.tsv``/``.jsonl``/``.parquet``
    path, or a Hugging Face ``datasets`` name (with ``hf_config`` and ``hf_split``). For tables,
    ``task`` (default classification) picks ``text_column`` + ``label_column`` or
    ``prompt_column`` + ``target_column``; ``key_column`` optionally names a natural key.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; use one of {list(TASKS)}.")
    if name in BUILTIN_DATASETS:
        dataset = BUILTIN_DATASETS[name]()
        if task is not None and task != dataset.task:
            raise ValueError(f"Dataset {name!r} is a {dataset.task} dataset; drop task={task!r} or set it to that.")
        return split_dataset(dataset, test_fraction=test_fraction, seed=split_seed, max_examples=max_examples)

    columns = {
        "task": task or "classification",
        "text_column": text_column,
        "label_column": label_column,
        "prompt_column": prompt_column,
        "target_column": target_column,
        "key_column": key_column,
    }
    path = Path(os.path.expanduser(name))
    if path.suffix in LOCAL_FILE_SUFFIXES:
        if not path.is_file():
            raise ValueError(f"No dataset file at {str(path)!r}; check the path (relative to {os.getcwd()!r}).")
        dataset = _from_frame(name, _read_table(path), **columns)
    else:
        frame, class_names = _load_hub_table(name, hf_config=hf_config, hf_split=hf_split, hub_timeout_s=hub_timeout_s)
        dataset = _from_frame(name, frame, label_names=class_names.get(label_column), **columns)
    if len(dataset) == 0:
        raise ValueError(f"Dataset {name!r} has no rows with values in the columns used; check the file.")
    return split_dataset(dataset, test_fraction=test_fraction, seed=split_seed, max_examples=max_examples)
