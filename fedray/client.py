"""Local training of one client and evaluation of the global model (plain torch + peft).

A ``Workbench`` holds the frozen base model of one process, built once from the shared
arrays, and runs every client and evaluation of that process on it. A client's fold is
applied by swapping new weight tensors (W0 + fold) into the target layers for the length
of the task; the shared W0 arrays are never written. Its trainable factors are a peft
LoRA of rank r_i with ``lora_alpha = scale * r_i``, so peft's scale is the run's single
``scale`` whatever the rank (shared/METHODS.md).

The task head (e.g. BERT's ``classifier``) can train too (``train.train_head``): it is a
small dense parameter the server averages by data size, outside the LoRA methods, whose
noise figures cover the LoRA layers only.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from peft import LoraConfig
from transformers.pytorch_utils import Conv1D

from fedray.config import Spec, TrainSpec
from fedray.data import TextDataset, make_batches
from fedray.methods import ClientInit, ClientUpdate
from fedray.models import HEAD_MODULES, SharedBase, build_model, lora_model, target_layers
from fedray.results import ClientResult

#: Prefix of the modules peft puts around the model.
PEFT_PREFIX = "base_model.model."
#: ru_maxrss is in KiB on Linux and in bytes on macOS.
RSS_UNIT_BYTES = 1 if sys.platform == "darwin" else 1024


def head_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``model``'s task head parameters (empty for a model without one)."""
    return {
        name: param.detach().cpu().clone()
        for name, param in model.named_parameters()
        if name.split(".")[0] in HEAD_MODULES
    }


class Workbench:
    """The frozen base model of one process, reused by every task the process runs."""

    def __init__(self, shared: SharedBase, device: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_model(shared)
        if self.device.type != "cpu":
            # A GPU worker needs its own device copy; the CPU one stays shared and untouched.
            self.model = self.model.to(self.device)
        self.tokenizer = shared.tokenizer
        self.task = shared.spec.task
        if self.task == "generation":
            # Prompts end with their cue (e.g. "Title:"): cut long prompts from the front.
            self.tokenizer.truncation_side = "left"
        self.layers = target_layers(self.model, shared.target_modules)
        self._linears = {name: self.model.get_submodule(name) for name in self.layers}
        self.head_names = list(head_state(self.model))

    def head_state(self) -> dict[str, torch.Tensor]:
        """A copy of the base model's task head (the start of the global head)."""
        return head_state(self.model)

    @contextmanager
    def patched(self, deltas: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor] | None):
        """Swap in ``W0 + delta`` for target layers and ``head`` values; restore on exit."""
        saved: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
        try:
            for layer, delta in deltas.items():
                module = self._linears[layer]
                original = module.weight
                if isinstance(module, Conv1D):
                    delta = delta.T  # GPT-2's Conv1D stores its weight as (in, out)
                new = original.detach() + delta.to(device=original.device, dtype=original.dtype)
                saved.append((module, "weight", original))
                module.weight = torch.nn.Parameter(new, requires_grad=False)
            for name, value in (head or {}).items():
                module_name, _, attribute = name.rpartition(".")
                module = self.model.get_submodule(module_name)
                saved.append((module, attribute, getattr(module, attribute)))
                tensor = value.detach().to(self.device).clone()
                setattr(module, attribute, torch.nn.Parameter(tensor, requires_grad=False))
            yield
        finally:
            for module, attribute, original in reversed(saved):
                setattr(module, attribute, original)

    def train(
        self,
        init: ClientInit,
        shard: TextDataset,
        spec: Spec,
        *,
        head: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
    ) -> ClientResult:
        """Train ``init``'s factors (and the head, if ``spec.train.train_head``) on ``shard``."""
        if len(shard) == 0:
            raise ValueError(f"client {init.client_id!r} has an empty shard; use fewer clients or a larger dataset")
        started = time.perf_counter()
        settings = spec.train
        torch.manual_seed(seed)
        train_head = settings.train_head and head is not None
        with self.client_model(init, head, train_head=train_head) as (peft_model, lora, head_params):
            factors = [p for pair in lora.values() for p in pair]
            trainable = factors + list(head_params.values())
            optimizer = _optimizer(settings, factors, list(head_params.values()))
            losses = []
            steps = _num_steps(settings, len(shard))
            peft_model.train()
            penalty = init.tail_penalty
            for batch in _cycle(self.tokenizer, shard, settings, seed, steps):
                batch = {key: value.to(self.device) for key, value in batch.items()}
                loss = peft_model(**batch).loss
                objective = loss
                if penalty is not None:
                    objective = loss + penalty.weight * tail_norm(lora, penalty.keep, init.scale)
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
        rank, pruned = init.rank, None
        if penalty is not None:
            pairs = {layer: (B[layer], A[layer]) for layer in B}
            start = {layer: (init.B[layer], init.A[layer]) for layer in B}
            with torch.no_grad():
                pruned = bool(tail_norm(pairs, penalty.keep, init.scale) < tail_norm(start, penalty.keep, init.scale))
            if pruned:  # HETLoRA self-pruning: send only the leading components
                B = {layer: B[layer][:, : penalty.keep.get(layer, B[layer].shape[1])] for layer in B}
                A = {layer: A[layer][: penalty.keep.get(layer, A[layer].shape[0])] for layer in A}
                rank = init.pruned_ranks()
        update = ClientUpdate(init.client_id, rank, len(shard), B, A)
        metrics = {
            "train_loss": float(np.mean(losses)),
            "train_loss_last": losses[-1],
            "examples": float(len(shard)),
            "steps": float(steps),
            "seconds": time.perf_counter() - started,
            "peak_memory_bytes": float(_peak_memory_bytes(self.device)),
        }
        if pruned is not None:
            metrics["pruned"] = float(pruned)
        return ClientResult(update, trained_head, metrics)

    @contextmanager
    def client_model(
        self, init: ClientInit, head: Mapping[str, torch.Tensor] | None = None, *, train_head: bool = False
    ) -> Iterator[tuple[torch.nn.Module, dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]], dict]]:
        """The client's model for the length of the block: W0 + fold, a peft LoRA holding
        ``init``'s factors, and ``head``. Yields (model, {layer: (lora_B, lora_A)}, head params)."""
        ranks = {layer: init.B[layer].shape[1] for layer in self.layers}
        with self.patched(init.fold_delta(), head), self._lora(ranks, init.scale) as peft_model:
            lora = self._load_factors(peft_model, init)
            yield peft_model, lora, self._head_params(enable=train_head)

    @torch.no_grad()
    def evaluate(
        self,
        global_delta: Mapping[str, torch.Tensor],
        dataset: TextDataset,
        spec: Spec,
        *,
        head: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Metrics of the global model (W0 + global delta, global head) on ``dataset``."""
        if len(dataset) == 0:
            raise ValueError("the evaluation set is empty; raise eval.max_examples or test_fraction")
        settings = spec.eval
        with self.patched(global_delta, head):
            self.model.eval()
            indices = np.arange(len(dataset))
            batches = make_batches(
                self.tokenizer, dataset, indices, batch_size=settings.batch_size, max_seq_len=spec.train.max_seq_len
            )
            if self.task == "classification":
                return self._evaluate_classification(batches)
            return self._evaluate_generation(batches, dataset, spec)

    # ---------------------------------------------------------------- internals

    @contextmanager
    def _lora(self, ranks: Mapping[str, int], scale: float) -> Iterator[torch.nn.Module]:
        first = next(iter(ranks.values()))
        config = LoraConfig(
            r=first,
            lora_alpha=scale * first,
            target_modules=list(ranks),
            rank_pattern=dict(ranks),
            alpha_pattern={layer: scale * r for layer, r in ranks.items()},
            lora_dropout=0.0,
            bias="none",
        )
        peft_model = lora_model(self.model, config)
        try:
            yield peft_model
        finally:
            self.model = peft_model.unload()
            self._linears = {name: self.model.get_submodule(name) for name in self.layers}

    def _load_factors(self, peft_model: torch.nn.Module, init: ClientInit):
        factors = {}
        for layer in self.layers:
            wrapper = peft_model.get_submodule(PEFT_PREFIX + layer)
            lora_B = wrapper.lora_B["default"].weight
            lora_A = wrapper.lora_A["default"].weight
            assert wrapper.scaling["default"] == init.scale, (wrapper.scaling, init.scale)
            with torch.no_grad():
                lora_B.copy_(init.B[layer])
                lora_A.copy_(init.A[layer])
            factors[layer] = (lora_B, lora_A)
        return factors

    def _head_params(self, enable: bool) -> dict[str, torch.nn.Parameter]:
        if not enable:
            return {}
        params = dict(self.model.named_parameters())
        head = {name: params[name] for name in self.head_names}
        for param in head.values():
            param.requires_grad_(True)
        return head

    def _evaluate_classification(self, batches) -> dict[str, float]:
        # Here, not at the top: scikit-learn and SciPy add seconds to every worker's start,
        # and most workers only train.
        from sklearn.metrics import f1_score

        losses, predictions, labels = [], [], []
        for batch in batches:
            batch = {key: value.to(self.device) for key, value in batch.items()}
            output = self.model(**batch)
            losses.append(float(output.loss) * len(batch["labels"]))
            predictions.append(output.logits.argmax(dim=-1).cpu())
            labels.append(batch["labels"].cpu())
        predicted, truth = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
        return {
            "eval_accuracy": float((predicted == truth).mean()),
            "eval_f1_macro": float(f1_score(truth, predicted, average="macro")),
            "eval_loss": sum(losses) / len(truth),
        }

    def _evaluate_generation(self, batches, dataset: TextDataset, spec: Spec) -> dict[str, float]:
        from rouge_score import rouge_scorer

        total_loss, total_tokens = 0.0, 0
        for batch in batches:
            batch = {key: value.to(self.device) for key, value in batch.items()}
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total_loss += float(self.model(**batch).loss) * tokens
            total_tokens += tokens
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        scores = [
            scorer.score(target, generated)["rougeL"].fmeasure
            for target, generated in zip(dataset.targets, self.generate(dataset, spec), strict=True)
        ]
        return {"eval_rougeL": float(np.mean(scores)), "eval_loss": total_loss / max(total_tokens, 1)}

    def generate(self, dataset: TextDataset, spec: Spec) -> list[str]:
        """Greedy continuations of ``dataset.texts`` (prompts), truncated to ``max_seq_len``."""
        tokenizer = self.tokenizer
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # generation continues from the right edge
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        outputs = []
        try:
            for start in range(0, len(dataset), spec.eval.batch_size):
                prompts = dataset.texts[start : start + spec.eval.batch_size]
                encoded = tokenizer(
                    prompts, truncation=True, max_length=spec.train.max_seq_len, padding=True, return_tensors="pt"
                ).to(self.device)
                generated = self.model.generate(
                    **encoded,
                    max_new_tokens=spec.eval.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new_tokens = generated[:, encoded["input_ids"].shape[1] :]
                outputs += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        finally:
            tokenizer.padding_side = side
        return outputs


def train_client(
    bench: Workbench,
    init: ClientInit,
    shard: TextDataset,
    spec: Spec,
    *,
    head: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> ClientResult:
    """One client's round: start from ``init``, train on ``shard``, return factors + metrics."""
    return bench.train(init, shard, spec, head=head, seed=seed)


def tail_norm(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], keep: Mapping[str, int], scale: float):
    """HETLoRA's self-pruning regulariser: ``sum_l ||scale * B_l[:, keep_l:] @ A_l[keep_l:]||_F``.

    Computed from the small Gram matrices, ``||BA||_F^2 = sum((B^T B) * (A A^T))``, so it
    costs O((d + k) r^2) per layer instead of a d x k product; differentiable everywhere.
    """
    total = 0.0
    for layer, start in keep.items():
        B, A = factors[layer][0][:, start:], factors[layer][1][start:]
        square = ((B.T @ B) * (A @ A.T)).sum()
        total = total + torch.sqrt(square.clamp(min=0.0) + 1e-12)
    return scale * total


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


def _cycle(tokenizer, shard: TextDataset, settings: TrainSpec, seed: int, steps: int):
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
