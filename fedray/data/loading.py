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

#: The BIG-bench tasks, read from the bigbench sdist (``fedray.data.bigbench``).
BIGBENCH = "bigbench"
#: bigbench's test split is the same for every run seed: seeds then vary the training only.
BIGBENCH_SPLIT_SEED = 0


def split_by_key(dataset: TextDataset, *, test_fraction: float, seed: int = 0) -> DatasetSplit:
    """A fixed, seeded train/test split within each key: every key (task) holds out its own
    ``test_fraction`` (at least one example of a key with two or more)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie strictly between 0 and 1.")
    assert dataset.keys is not None, "a split by key needs keys"
    rng = np.random.default_rng(seed)
    by_key: dict[str, list[int]] = {}
    for index, key in enumerate(dataset.keys):
        by_key.setdefault(key, []).append(index)
    train, test = [], []
    for indices in by_key.values():
        order = rng.permutation(indices)
        held = min(len(order) - 1, max(1, round(len(order) * test_fraction))) if len(order) > 1 else 0
        test.extend(order[:held])
        train.extend(order[held:])
    return DatasetSplit(train=dataset.subset(sorted(train)), test=dataset.subset(sorted(test)))


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
    tasks: list[str] | None = None,
    max_per_task: int | None = None,
    archive: str | None = None,
) -> DatasetSplit:
    """Load a dataset by name and split it into the clients' train pool and the server's test set.

    ``name`` is a built-in dataset (``BUILTIN_DATASETS``), a local ``.csv``/``.tsv``/``.jsonl``/``.parquet``
    path, or a Hugging Face ``datasets`` name (with ``hf_config`` and ``hf_split``). For tables,
    ``task`` (default classification) picks ``text_column`` + ``label_column`` or
    ``prompt_column`` + ``target_column``; ``key_column`` optionally names a natural key.

    ``bigbench`` (``fedray.data.bigbench``) reads BIG-bench ``tasks`` (at most ``max_per_task``
    examples each) from the bigbench sdist (``archive``, default in fedray's cache); its
    split is fixed whatever ``split_seed`` is, and holds out ``test_fraction`` of every task.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; use one of {list(TASKS)}.")
    bigbench_options = {"tasks": tasks, "max_per_task": max_per_task, "archive": archive}
    if name == BIGBENCH:
        from fedray.data.bigbench import bigbench_dataset

        if max_examples is not None:
            raise ValueError("dataset bigbench takes dataset_options.max_per_task, not max_examples")
        if task not in (None, "generation"):
            raise ValueError(f"dataset bigbench is a generation dataset; drop task={task!r}")
        dataset = bigbench_dataset(tasks or [], max_per_task=max_per_task, archive=archive)
        return split_by_key(dataset, test_fraction=test_fraction, seed=BIGBENCH_SPLIT_SEED)
    if given := sorted(option for option, value in bigbench_options.items() if value is not None):
        raise ValueError(f"dataset_options {given} are for dataset bigbench, not {name!r}")
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
