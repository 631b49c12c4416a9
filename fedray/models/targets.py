"""LoRA targets: which layers of a model get LoRA factors, and wrapping a model with peft."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

#: Prefix of the modules peft puts around the model.
PEFT_PREFIX = "base_model.model."

#: How many layer names an unknown-target error lists.
MAX_NAMES_IN_ERROR = 12
#: Layer types LoRA can target (GPT-2's Conv1D is a Linear with its weight transposed).
_LINEAR_TYPES = (torch.nn.Linear, Conv1D)


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """Silence the FutureWarning of peft probing transformers' deprecated ``is_gradient_checkpointing``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def lora_model(model: PreTrainedModel, config: LoraConfig, **kwargs: Any) -> PeftModel:
    """``peft.get_peft_model``, quietly."""
    with peft_quietly():
        return get_peft_model(model, config, **kwargs)


def default_target_modules(model_type: str) -> tuple[str, ...]:
    """The attention query/value LoRA targets of an architecture (peft's defaults)."""
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if targets is None:
        raise ValueError(
            f"there are no default LoRA targets for model type {model_type!r}; set target_modules to its "
            "attention projection names."
        )
    return tuple(targets)


def target_layers(model: torch.nn.Module, target_modules: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Full name -> (d, k) = (out_features, in_features) of every layer a target suffix matches.

    A target matches a module whose name is the target or ends with ``.`` + target, as in
    peft. Only ``nn.Linear`` and GPT-2's ``Conv1D`` count.
    """
    linear = {name: _out_in(module) for name, module in model.named_modules() if isinstance(module, _LINEAR_TYPES)}
    layers: dict[str, tuple[int, int]] = {}
    for target in target_modules:
        matched = {name: shape for name, shape in linear.items() if name == target or name.endswith("." + target)}
        if not matched:
            available = sorted({name.rpartition(".")[2] for name in linear})
            raise ValueError(
                f"target module {target!r} matches no Linear layer of this model; pick from "
                f"{', '.join(available[:MAX_NAMES_IN_ERROR])}."
            )
        layers.update(matched)
    return dict(sorted(layers.items()))


def _out_in(module: torch.nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):
        # Conv1D stores its weight as (in, out).
        return module.nf, module.nx
    return module.out_features, module.in_features
