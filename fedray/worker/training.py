"""The parts of a client's local training: its optimizer, its step budget, its batches, the
remedies for non-IID data (FedProx's proximal gradient, logit adjustment by the client's
label shares) and the peak memory it reports (the loop itself is ``Workbench.train``)."""

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


def add_proximal_gradient(params: list[torch.Tensor], starts: list[torch.Tensor], mu: float) -> None:
    """FedProx (Li et al., 2020): add the gradient of ``mu/2 * ||theta - theta_start||^2``,
    ``mu * (theta - theta_start)``, to each parameter's gradient (after ``backward``)."""
    with torch.no_grad():
        for param, start in zip(params, starts, strict=True):
            if param.grad is None:
                param.grad = mu * (param - start)
            else:
                param.grad.add_(param - start, alpha=mu)


def label_log_shares(labels: list[int], num_labels: int) -> torch.Tensor:
    """``log`` of a client's label shares, Laplace-smoothed (a class it lacks gets 1 / (n + C))."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_labels).double()
    return torch.log((counts + 1) / (counts.sum() + num_labels)).float()


def adjusted_loss(logits: torch.Tensor, labels: torch.Tensor, log_shares: torch.Tensor, tau: float) -> torch.Tensor:
    """Logit adjustment (Menon et al., 2021; with tau = 1 the balanced softmax of Ren et al., 2020):
    cross-entropy of ``logits + tau * log_shares``. The model learns logits free of the
    client's own label skew; evaluation reads the logits unadjusted."""
    return torch.nn.functional.cross_entropy(logits + tau * log_shares.to(logits), labels.view(-1))
