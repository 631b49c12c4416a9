"""Datasets from tables: local ``.csv`` / ``.jsonl`` / ``.parquet`` files and Hugging Face ``datasets``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedray.config import Task
from fedray.data.builtin import BUILTIN_DATASETS
from fedray.data.dataset import TextDataset
from fedray.hub import hub_reachable

LOCAL_FILE_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".jsonl", ".parquet")


def _from_frame(
    name: str,
    frame: pd.DataFrame,
    *,
    task: Task,
    text_column: str,
    label_column: str,
    prompt_column: str,
    target_column: str,
    key_column: str | None,
    label_names: list[str] | None = None,
) -> TextDataset:
    """Build a dataset from a table; rows with a missing value in a used column are dropped."""
    if task == "classification":
        wanted = {"text_column": text_column, "label_column": label_column}
    else:
        wanted = {"prompt_column": prompt_column, "target_column": target_column}
    if key_column is not None:
        wanted["key_column"] = key_column
    missing = [f"{argument}={column!r}" for argument, column in wanted.items() if column not in frame.columns]
    if missing:
        raise ValueError(
            f"Dataset {name!r} has no column for {', '.join(missing)}; set it to one of the columns present: "
            f"{[str(column) for column in frame.columns]}."
        )
    frame = frame.dropna(subset=list(wanted.values()))
    input_column = text_column if task == "classification" else prompt_column
    frame = frame.assign(**{input_column: frame[input_column].astype(str)}).drop_duplicates(input_column)
    keys = frame[key_column].astype(str).tolist() if key_column is not None else None
    if task == "generation":
        return TextDataset(
            name=name,
            task=task,
            texts=frame[prompt_column].tolist(),
            targets=frame[target_column].astype(str).tolist(),
            keys=keys,
        )
    labels, label_names = _encode_labels(frame[label_column], label_names=label_names, name=name)
    return TextDataset(
        name=name,
        task=task,
        texts=frame[text_column].tolist(),
        labels=labels,
        keys=keys,
        label_names=label_names,
    )


def _encode_labels(column: pd.Series, *, label_names: list[str] | None, name: str) -> tuple[list[int], list[str]]:
    """Integer labels are kept as class indices; any other values map to their sorted order."""
    if pd.api.types.is_integer_dtype(column):
        labels = column.astype(int).tolist()
        if min(labels, default=0) < 0:
            raise ValueError(f"Dataset {name!r} has negative integer labels; use class indices 0, 1, ... or names.")
        return labels, label_names or [str(index) for index in range(max(labels, default=-1) + 1)]
    names = sorted(column.astype(str).unique().tolist())
    lookup = {label: index for index, label in enumerate(names)}
    return [lookup[label] for label in column.astype(str)], names


def _read_table(path: Path) -> pd.DataFrame:
    try:
        if path.suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
        if path.suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"Dataset file {str(path)!r} is empty; give it a header row and one row per example."
        ) from None


def _hub_error(name: str, reason: str) -> ValueError:
    return ValueError(
        f"Dataset {name!r} is not a built-in dataset or a local file, and the Hugging Face Hub cannot serve it "
        f"({reason}); use one of the offline datasets {sorted(BUILTIN_DATASETS)} (or bigbench, after "
        f"`make bigbench`), or a local {'/'.join(LOCAL_FILE_SUFFIXES)} file path with text_column/label_column "
        "(or prompt_column/target_column)."
    )


def _load_hub_table(
    name: str, *, hf_config: str | None, hf_split: str, hub_timeout_s: float
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """A Hub dataset split as a table, plus the class names of its ClassLabel columns."""
    import datasets

    # datasets retries an unreachable Hub for ~25 s; probe once so the user hears at once.
    if not datasets.config.HF_HUB_OFFLINE and not hub_reachable(hub_timeout_s):
        raise _hub_error(name, "the Hub is unreachable; set HF_DATASETS_OFFLINE=1 to use a cached copy")
    try:
        hub_dataset = datasets.load_dataset(name, hf_config, split=hf_split)
    except (ConnectionError, FileNotFoundError) as error:
        raise _hub_error(name, f"{type(error).__name__}: {error}") from error
    class_names = {
        column: list(feature.names)
        for column, feature in hub_dataset.features.items()
        if isinstance(feature, datasets.ClassLabel)
    }
    return hub_dataset.to_pandas(), class_names
