"""Client partitioners: split a train set into one shard of indices per client."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from fedray.data.dataset import TextDataset


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
