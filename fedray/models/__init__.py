"""Model registry: turn a name into a frozen base model and tokenizer, and share it zero-copy.

``load_base`` (``registry``) resolves a built-in model, a local folder or a Hub id into a
frozen model with its tokenizer and LoRA targets (``targets``); ``export_base`` and
``build_model`` (``sharing``) pass its weights to Ray tasks without copying them.
"""

from fedray.models.pooling import MeanPoolingBertForSequenceClassification
from fedray.models.registry import (
    BUILTIN_MODELS,
    CACHE_ENV_VAR,
    DEFAULT_CACHE_DIR,
    DEFAULT_MODEL,
    HEAD_MODULES,
    POOLINGS,
    SENTENCE_POOLING_CONFIG,
    TASKS,
    Base,
    BuiltinModel,
    ModelSpec,
    default_cache_dir,
    head_state,
    load_base,
    resolve_pooling,
)
from fedray.models.sharing import SharedBase, build_model, export_base
from fedray.models.targets import (
    MAX_NAMES_IN_ERROR,
    PEFT_PREFIX,
    default_target_modules,
    lora_model,
    peft_quietly,
    target_layers,
)

__all__ = [
    "BUILTIN_MODELS",
    "CACHE_ENV_VAR",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_MODEL",
    "HEAD_MODULES",
    "MAX_NAMES_IN_ERROR",
    "PEFT_PREFIX",
    "POOLINGS",
    "SENTENCE_POOLING_CONFIG",
    "TASKS",
    "Base",
    "BuiltinModel",
    "MeanPoolingBertForSequenceClassification",
    "ModelSpec",
    "SharedBase",
    "build_model",
    "default_cache_dir",
    "default_target_modules",
    "export_base",
    "head_state",
    "load_base",
    "lora_model",
    "peft_quietly",
    "resolve_pooling",
    "target_layers",
]
