"""One client's local training on a ``Workbench``: the loop, its optimizer and its batches.

The client's method has its say through ``init.hook`` (an extra loss term, a last step
that may shrink the update), so nothing here knows which method it trains for.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedray.config import TrainSpec
from fedray.data import TextDataset, make_batches
from fedray.methods import ClientInit, ClientUpdate
from fedray.worker.results import ClientResult

if TYPE_CHECKING:
    from fedray.worker.workbench import Workbench

#: ru_maxrss is in KiB on Linux and in bytes on macOS.
RSS_UNIT_BYTES = 1 if sys.platform == "darwin" else 1024


def train_client(
    bench: Workbench,
    init: ClientInit,
    shard: TextDataset,
    settings: TrainSpec,
    *,
    head: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> ClientResult:
    """Train ``init``'s factors (and the head, if ``settings.train_head``) on ``shard``."""
    if len(shard) == 0:
        raise ValueError(f"client {init.client_id!r} has an empty shard; use fewer clients or a larger dataset")
    started = time.perf_counter()
    torch.manual_seed(seed)
    train_head = settings.train_head and head is not None
    with bench.client_model(init, head, train_head=train_head) as (peft_model, lora, head_params):
        factors = [p for pair in lora.values() for p in pair]
        trainable = factors + list(head_params.values())
        optimizer = _optimizer(settings, factors, list(head_params.values()))
        losses = []
        steps = _num_steps(settings, len(shard))
        peft_model.train()
        for batch in _cycle(bench.tokenizer, shard, settings, seed, steps):
            batch = {key: value.to(bench.device) for key, value in batch.items()}
            loss = peft_model(**batch).loss
            objective = loss
            extra = init.hook.loss_term(lora)
            if extra is not None:
                objective = loss + extra
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
        peft_model.eval()
        B = {layer: pair[0].detach().cpu().clone() for layer, pair in lora.items()}
        A = {layer: pair[1].detach().cpu().clone() for layer, pair in lora.items()}
        trained_head = {name: p.detach().cpu().clone() for name, p in head_params.items()} or None
    update, method_metrics = init.hook.finish(ClientUpdate(init.client_id, init.rank, len(shard), B, A), init)
    metrics = {
        "train_loss": float(np.mean(losses)),
        "train_loss_last": losses[-1],
        "examples": float(len(shard)),
        "steps": float(steps),
        "seconds": time.perf_counter() - started,
        "peak_memory_bytes": float(_peak_memory_bytes(bench.device)),
    }
    return ClientResult(update, trained_head, metrics, method_metrics)


def _optimizer(settings: TrainSpec, factors: list, head: list) -> torch.optim.Optimizer:
    groups = [{"params": factors}]
    if head:
        groups.append({"params": head, "lr": settings.head_lr or settings.lr})
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def _num_steps(settings: TrainSpec, num_examples: int) -> int:
    if settings.local_steps is not None:
        return settings.local_steps
    return max(1, math.ceil(settings.local_epochs * num_examples / settings.batch_size))


def _cycle(tokenizer, shard: TextDataset, settings: TrainSpec, seed: int, steps: int) -> Iterator[dict]:
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


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT_BYTES
