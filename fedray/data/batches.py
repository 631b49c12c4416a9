"""Tokenised batches of a dataset, padded per batch, for classification and generation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedray.data.dataset import TextDataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF models) skip
MIN_PROMPT_TOKENS = 1  # a generation example keeps at least this many prompt tokens


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
