"""The frozen base model of one worker process, and the client models built on it.

A ``Workbench`` holds the base model, built once from the shared arrays, and runs every
client and evaluation of its process on it. A client's fold is applied by swapping new
weight tensors (W0 + fold) into the target layers for the length of the task; the shared
W0 arrays are never written. Its trainable factors are a peft LoRA of rank r_i with
``lora_alpha = scale * r_i``, so peft's scale is the run's single ``scale`` whatever the
rank (shared/METHODS.md).

The task head (e.g. BERT's ``classifier``) can train too (``train.train_head``): it is a
small dense parameter the server averages by data size, outside the LoRA methods, whose
noise figures cover the LoRA layers only.

Plain torch, transformers and peft: no Ray, no MLflow, so it runs anywhere those do.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from peft import LoraConfig
from transformers.pytorch_utils import Conv1D

from fedray.config import EvalSpec, TrainSpec
from fedray.data import TextDataset, make_batches
from fedray.methods import ClientInit, ClientUpdate
from fedray.models import PEFT_PREFIX, SharedBase, build_model, head_state, lora_model, target_layers
from fedray.worker import evaluation, training
from fedray.worker.results import ClientResult

#: A client's model for the length of a block: (peft model, {layer: (lora_B, lora_A)}, trainable head params).
ClientModel = tuple[torch.nn.Module, dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]], dict]


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

    def train(
        self,
        init: ClientInit,
        shard: TextDataset,
        settings: TrainSpec,
        *,
        head: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
        train_head: bool = True,
    ) -> ClientResult:
        """One client's round: train ``init``'s factors (and the head, if ``settings.train_head``
        and ``train_head``: the round's say) on ``shard``.

        The client's method has its say through ``init.hook`` (an extra loss term, a last
        step that may shrink the update), so nothing here knows which method it trains for.
        The non-IID remedies of ``settings`` (``prox_mu``, ``logit_adjust``) apply to every method.
        """
        if len(shard) == 0:
            raise ValueError(f"client {init.client_id!r} has an empty shard; use fewer clients or a larger dataset")
        started = time.perf_counter()
        torch.manual_seed(seed)
        train_head = train_head and settings.train_head and head is not None
        log_shares = None
        if settings.logit_adjust > 0:
            if self.task != "classification":
                raise ValueError("train.logit_adjust applies to classification; set it to 0 for generation tasks")
            log_shares = training.label_log_shares(shard.labels, self.model.config.num_labels)
        with (
            self._checkpointing(settings.gradient_checkpointing),
            self.client_model(init, head, train_head=train_head) as (peft_model, lora, head_params),
        ):
            factors = [p for pair in lora.values() for p in pair]
            trainable = factors + list(head_params.values())
            optimizer = training.optimizer(settings, factors, list(head_params.values()))
            starts = [p.detach().clone() for p in trainable] if settings.prox_mu > 0 else []
            losses = []
            steps = training.num_steps(settings, len(shard))
            peft_model.train()
            for batch in training.cycle(self.tokenizer, shard, settings, seed, steps):
                batch = {key: value.to(self.device) for key, value in batch.items()}
                output = peft_model(**batch)
                loss = output.loss
                if log_shares is not None:
                    loss = training.adjusted_loss(output.logits, batch["labels"], log_shares, settings.logit_adjust)
                objective = loss
                extra = init.hook.loss_term(lora)
                if extra is not None:
                    objective = loss + extra
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                if starts:
                    training.add_proximal_gradient(trainable, starts, settings.prox_mu)
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
            "peak_memory_bytes": float(training.peak_memory_bytes(self.device)),
        }
        return ClientResult(update, trained_head, metrics, method_metrics)

    @torch.no_grad()
    def evaluate(
        self,
        global_delta: Mapping[str, torch.Tensor],
        dataset: TextDataset,
        settings: EvalSpec,
        *,
        max_seq_len: int,
        head: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Metrics of the global model (W0 + global delta, global head) on ``dataset``."""
        if self.task == "classification":
            outputs = self.classification_outputs(
                (global_delta, head), dataset, batch_size=settings.batch_size, max_seq_len=max_seq_len
            )
            return evaluation.classification_metrics([outputs])
        self._check_not_empty(dataset)
        with self.patched(global_delta, head):
            self.model.eval()
            indices = np.arange(len(dataset))
            batches = make_batches(
                self.tokenizer, dataset, indices, batch_size=settings.batch_size, max_seq_len=max_seq_len
            )
            return evaluation.generation_metrics(
                self.model, self.tokenizer, batches, dataset, settings, max_seq_len, self.device
            )

    @torch.no_grad()
    def classification_outputs(
        self,
        state: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None],
        dataset: TextDataset,
        *,
        batch_size: int,
        max_seq_len: int,
        part: tuple[int, int] = (0, 1),
    ) -> evaluation.ClassificationOutputs:
        """The global model's predictions on part ``index`` of ``count`` of ``dataset``'s
        evaluation batches (batches ``index``, ``index + count``, ...): the batches are those
        of the whole set, so parts scored apart give what the whole gives. ``state`` is
        ``(global_delta, head)``."""
        self._check_not_empty(dataset)
        global_delta, head = state
        index, count = part
        size = batch_size
        indices = np.arange(len(dataset))
        mine = [indices[start : start + size] for start in range(index * size, len(dataset), count * size)]
        if not mine:  # more parts than batches
            nothing = np.empty(0, dtype=np.int64)
            return evaluation.ClassificationOutputs(nothing, nothing, 0.0)
        with self.patched(global_delta, head):
            self.model.eval()
            batches = make_batches(
                self.tokenizer, dataset, np.concatenate(mine), batch_size=size, max_seq_len=max_seq_len
            )
            return evaluation.classification_outputs(self.model, batches, self.device)

    @staticmethod
    def _check_not_empty(dataset: TextDataset) -> None:
        if len(dataset) == 0:
            raise ValueError("the evaluation set is empty; raise eval.max_examples or test_fraction")

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

    @contextmanager
    def client_model(
        self, init: ClientInit, head: Mapping[str, torch.Tensor] | None = None, *, train_head: bool = False
    ) -> Iterator[ClientModel]:
        """The client's model for the length of the block: W0 + fold, a peft LoRA holding
        ``init``'s factors, and ``head``. Yields (model, {layer: (lora_B, lora_A)}, head params)."""
        ranks = {layer: init.B[layer].shape[1] for layer in self.layers}
        with self.patched(init.fold_delta(), head), self._lora(ranks, init.scale) as peft_model:
            lora = self._load_factors(peft_model, init)
            yield peft_model, lora, self._head_params(enable=train_head)

    # ---------------------------------------------------------------- internals

    @contextmanager
    def _checkpointing(self, enable: bool) -> Iterator[None]:
        """Activation checkpointing for the length of the block (a client's training), if ``enable``.

        Non-reentrant, so gradients reach the LoRA factors although the frozen inputs need none.
        """
        if not enable:
            yield
            return
        if not self.model.supports_gradient_checkpointing:
            raise ValueError(
                f"{type(self.model).__name__} does not support gradient checkpointing; "
                "set train.gradient_checkpointing=false"
            )
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers 5 renamed it
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            disable = self.model.activation_checkpointing_disable
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            disable = self.model.gradient_checkpointing_disable
        try:
            yield
        finally:
            disable()

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
