"""Metrics of a model on an evaluation set: accuracy and macro F1 for classification,
ROUGE-L and exact match of greedy continuations for generation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedray.config import EvalSpec
from fedray.data import TextDataset


@dataclass(frozen=True)
class ClassificationOutputs:
    """What scoring some batches leaves: each example's prediction and label, the summed loss."""

    predictions: np.ndarray
    labels: np.ndarray
    loss_sum: float


def classification_outputs(
    model: torch.nn.Module, batches: Iterable[dict], device: torch.device
) -> ClassificationOutputs:
    losses, predictions, labels = [], [], []
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        output = model(**batch)
        losses.append(float(output.loss) * len(batch["labels"]))
        predictions.append(output.logits.argmax(dim=-1).cpu())
        labels.append(batch["labels"].cpu())
    return ClassificationOutputs(torch.cat(predictions).numpy(), torch.cat(labels).numpy(), sum(losses))


def classification_metrics(parts: Sequence[ClassificationOutputs]) -> dict[str, float]:
    """Accuracy, macro F1 and mean loss over the examples of ``parts`` (an evaluation set
    scored in one task, or split into batches scored by several)."""
    # Here, not at the top: scikit-learn and SciPy add seconds to every worker's start,
    # and most workers only train.
    from sklearn.metrics import f1_score

    predicted = np.concatenate([part.predictions for part in parts])
    truth = np.concatenate([part.labels for part in parts])
    return {
        "eval_accuracy": float((predicted == truth).mean()),
        "eval_f1_macro": float(f1_score(truth, predicted, average="macro")),
        "eval_loss": sum(part.loss_sum for part in parts) / len(truth),
    }


def generation_metrics(
    model: torch.nn.Module,
    tokenizer,
    batches: Iterable[dict],
    dataset: TextDataset,
    settings: EvalSpec,
    max_seq_len: int,
    device: torch.device,
) -> dict[str, float]:
    from rouge_score import rouge_scorer

    total_loss, total_tokens = 0.0, 0
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total_loss += float(model(**batch).loss) * tokens
        total_tokens += tokens
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    generated = generate(model, tokenizer, dataset, settings, max_seq_len, device)
    pairs = list(zip(dataset.targets, generated, strict=True))
    scores = [scorer.score(target, text)["rougeL"].fmeasure for target, text in pairs]
    exact = [answer_text(text) == answer_text(target) for target, text in pairs]
    return {
        "eval_rougeL": float(np.mean(scores)),
        "eval_exact_match": float(np.mean(exact)),
        "eval_loss": total_loss / max(total_tokens, 1),
    }


def answer_text(text: str) -> str:
    """What exact match compares: the first line, lower case, runs of spaces as one, without
    a closing full stop (a continuation that goes on after its answer's line still matches)."""
    first_line = text.strip().split("\n", 1)[0]
    return " ".join(first_line.lower().split()).removesuffix(".")


def generate(
    model: torch.nn.Module, tokenizer, dataset: TextDataset, settings: EvalSpec, max_seq_len: int, device: torch.device
) -> list[str]:
    """Greedy continuations of ``dataset.texts`` (prompts), truncated to ``max_seq_len``."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    outputs = []
    try:
        for start in range(0, len(dataset), settings.batch_size):
            prompts = dataset.texts[start : start + settings.batch_size]
            encoded = tokenizer(prompts, truncation=True, max_length=max_seq_len, padding=True, return_tensors="pt").to(
                device
            )
            generated = model.generate(
                **encoded,
                max_new_tokens=settings.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            outputs += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return outputs
