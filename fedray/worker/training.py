"""The parts of a client's local training: its optimizer, its step budget, its batches, and
the peak memory it reports (the loop itself is ``Workbench.train``)."""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Iterator

import numpy as np
import torch

from fedray.config import TrainSpec
from fedray.data import TextDataset, make_batches

#: ru_maxrss is in KiB on Linux and in bytes on macOS.
RSS_UNIT_BYTES = 1 if sys.platform == "darwin" else 1024


def optimizer(settings: TrainSpec, factors: list, head: list) -> torch.optim.Optimizer:
    groups = [{"params": factors}]
    if head:
        groups.append({"params": head, "lr": settings.head_lr or settings.lr})
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def num_steps(settings: TrainSpec, num_examples: int) -> int:
    if settings.local_steps is not None:
        return settings.local_steps
    return max(1, math.ceil(settings.local_epochs * num_examples / settings.batch_size))


def cycle(tokenizer, shard: TextDataset, settings: TrainSpec, seed: int, steps: int) -> Iterator[dict]:
    """``steps`` batches, reshuffling the shard (seeded) at every pass."""
    indices = np.arange(len(shard))
    produced, epoch = 0, 0
    while produced < steps:
        for batch in make_batches(
            tokenizer,
            shard,
            indices,
            batch_size=settings.batch_size,
            max_seq_len=settings.max_seq_len,
            shuffle_seed=int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]),
        ):
            yield batch
            produced += 1
            if produced == steps:
                return
        epoch += 1


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT_BYTES
