"""The dataset containers: a labelled text dataset held in memory, and its train/test split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from fedray.config import TASKS, Task


@dataclass(frozen=True)
class TextDataset:
    """A labelled text dataset held in memory.

    ``texts`` are the model inputs (the prompts for generation). Classification has
    ``labels`` (class indices into ``label_names``); generation has ``targets``.
    ``keys`` are an optional natural grouping (movie, topic) for ``KeyPartitioner``.
    """

    name: str
    task: Task
    texts: list[str]
    labels: list[int] | None = None
    targets: list[str] | None = None
    keys: list[str] | None = None
    label_names: list[str] | None = None

    def __post_init__(self) -> None:
        assert self.task in TASKS, self.task
        assert (self.labels is not None) == (self.task == "classification"), "labels iff classification"
        assert (self.targets is not None) == (self.task == "generation"), "targets iff generation"
        for column in (self.labels, self.targets, self.keys):
            assert column is None or len(column) == len(self.texts), "every column has one entry per text"

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        """Number of classes (0 for generation)."""
        if self.labels is None:
            return 0
        return len(self.label_names) if self.label_names else max(self.labels, default=-1) + 1

    def majority_share(self) -> float:
        """What always answering the most common class scores on this dataset (classification)."""
        if self.labels is None or not self.labels:
            raise ValueError(f"dataset {self.name!r} has no labels; the majority share is for classification")
        return max(self.labels.count(label) for label in set(self.labels)) / len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """A new dataset with the examples at ``indices``, in that order (fresh lists)."""
        order = [int(i) for i in indices]

        def pick(column: list | None) -> list | None:
            return None if column is None else [column[i] for i in order]

        return replace(
            self,
            texts=pick(self.texts),
            labels=pick(self.labels),
            targets=pick(self.targets),
            keys=pick(self.keys),
            label_names=None if self.label_names is None else list(self.label_names),
        )


@dataclass(frozen=True)
class DatasetSplit:
    """The clients' pool (``train``) and the server's held-out ``test`` set."""

    train: TextDataset
    test: TextDataset
