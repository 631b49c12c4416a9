"""The run spec: one typed schema, loaded from YAML with ``dotted.key=value`` overrides.

Every field has a default and a line saying what it is. ``load_spec`` validates the whole
spec before anything expensive starts and raises ``SpecError`` with one sentence per
problem, naming the field, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedray.methods import METHODS, create_method, method_options
from fedray.methods.server_optimizer import SERVER_RULES, ServerOptimizer, ServerRule
from fedray.ranks import ResourceTier, check_rank_split

#: How a classification head reads the encoder: ``cls`` is the architecture's own head
#: (BERT: the pooler on the first token), ``mean`` the attention-masked mean of the last
#: hidden states, ``auto`` what the model was trained with (its sentence-transformers
#: pooling config when it ships one, else ``cls``).
Pooling = Literal["auto", "cls", "mean"]
#: The dtype the frozen base is held in; LoRA factors stay float32 whatever it is.
ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
#: What a dataset asks of the model: a label per text, or a continuation of a prompt.
Task = Literal["classification", "generation"]
TASKS: tuple[Task, ...] = get_args(Task)

#: How many ``extends`` links a spec may chain.
MAX_EXTENDS_DEPTH = 8


class SpecError(ValueError):
    """A run spec that cannot run; the message says what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainSpec(_Strict):
    """Local training on each client."""

    local_steps: int | None = Field(10, ge=1, description="optimizer steps per client per round")
    local_epochs: float | None = Field(None, gt=0, description="passes over the shard instead of local_steps")
    batch_size: int = Field(16, ge=1, description="examples per step")
    lr: float = Field(5e-4, gt=0, description="learning rate of the LoRA factors")
    head_lr: float | None = Field(None, gt=0, description="learning rate of the task head; default lr")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="local optimizer")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (AdamW) or L2 (SGD)")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm; null for none")
    max_seq_len: int = Field(64, ge=8, description="tokens per example after truncation")
    train_head: bool = Field(True, description="train the task head too (averaged by data size)")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, about a third more compute"
    )
    head_rounds: int | None = Field(
        None, ge=1, description="train the head in the first this many rounds only, then keep it; null: every round"
    )
    prox_mu: float = Field(
        0.0, ge=0, description="FedProx: mu of the term mu/2 ||theta - theta_start||^2 on the trained values; 0 off"
    )
    logit_adjust: float = Field(
        0.0,
        ge=0,
        description="classification: train on logits + this * log(client's label shares) (1: balanced softmax); 0 off",
    )

    @model_validator(mode="after")
    def _one_budget(self) -> TrainSpec:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("set exactly one of train.local_steps and train.local_epochs (the other to null)")
        if self.head_rounds is not None and not self.train_head:
            raise ValueError("train.head_rounds limits when the head trains, but train.train_head is false")
        return self

    def trains_head(self, round_index: int) -> bool:
        """Whether clients train the head in round ``round_index`` (0-based)."""
        return self.train_head and (self.head_rounds is None or round_index < self.head_rounds)


class EvalSpec(_Strict):
    """Evaluation of the global model on the server's test split."""

    every: int = Field(1, ge=1, description="evaluate every this many rounds (and after the last)")
    max_examples: int | None = Field(400, ge=1, description="test examples used; null for the whole split")
    batch_size: int = Field(64, ge=1, description="examples per evaluation batch")
    max_new_tokens: int = Field(24, ge=1, description="generation tasks: greedy tokens per example")


class ServerSpec(_Strict):
    """How the server turns the round's average into the new global state (Reddi et al., 2021).

    The round's change of the global state is a pseudo-gradient; ``fedavg`` takes it as it
    is, the others step with it (see ``fedray.methods.server_optimizer``).
    """

    optimizer: ServerRule = Field("fedavg", description=f"one of {list(SERVER_RULES)}")
    lr: float = Field(1.0, gt=0, description="server learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm: momentum of the pseudo-gradient")
    betas: tuple[float, float] = Field((0.9, 0.99), description="fedadam, fedyogi: decay of the 1st and 2nd moments")
    tau: float = Field(1e-3, gt=0, description="fedadam, fedyogi: adaptivity (added to sqrt(v))")

    @model_validator(mode="after")
    def _used(self) -> ServerSpec:
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"server.betas={list(self.betas)}: each must be in [0, 1)")
        uses = {"lr": ("fedavgm", "fedadam", "fedyogi"), "momentum": ("fedavgm",)}
        uses |= dict.fromkeys(("betas", "tau"), ("fedadam", "fedyogi"))
        for name, rules in uses.items():
            if self.optimizer not in rules and getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(
                    f"server.{name} applies to server.optimizer in {list(rules)}, not {self.optimizer!r}; "
                    f"remove it or choose one of those"
                )
        return self

    def create(self) -> ServerOptimizer | None:
        """The server optimizer, or None for ``fedavg``."""
        if self.optimizer == "fedavg":
            return None
        return ServerOptimizer(self.optimizer, lr=self.lr, momentum=self.momentum, betas=self.betas, tau=self.tau)


class ResourcesSpec(_Strict):
    """What each client task asks Ray for."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs per client task")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per client task; fractions share a GPU")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per task; default from num_cpus")
    aggregator_threads: int = Field(
        1, ge=1, description="torch threads of the aggregation actor (raise it on a large head node)"
    )


class FaultSpec(_Strict):
    """Injected client faults, seeded per (round, client, try), to study robustness."""

    raise_prob: float = Field(0.0, ge=0, le=1, description="chance a client task raises an exception")
    kill_prob: float = Field(0.0, ge=0, le=1, description="chance a client task kills its worker process")
    delay_prob: float = Field(0.0, ge=0, le=1, description="chance a client task stalls for delay_s first")
    delay_s: float = Field(0.0, ge=0, description="how long a stalled client task sleeps")
    corrupt_prob: float = Field(0.0, ge=0, le=1, description="chance a client sends NaN factors (a bad update)")

    @model_validator(mode="after")
    def _total(self) -> FaultSpec:
        if self.raise_prob + self.kill_prob + self.delay_prob + self.corrupt_prob > 1:
            raise ValueError("faults.raise_prob + kill_prob + delay_prob + corrupt_prob must be at most 1")
        return self


class ReliabilitySpec(_Strict):
    """How the server treats slow, failing and untrustworthy clients."""

    client_timeout_s: float | None = Field(
        None, gt=0, description="a client task running longer (from its start on a worker) is cancelled"
    )
    client_retries: int = Field(1, ge=0, description="times a failed or timed-out client task is retried")
    min_clients_per_round: int = Field(1, ge=1, description="fewer surviving clients re-run the round")
    round_attempts: int = Field(3, ge=1, description="samples tried for one round before the run stops")
    max_update_norm: float | None = Field(None, gt=0, description="bound on ||scale * B @ A|| of a client update")
    on_large_update: Literal["reject", "clip"] = Field("reject", description="what to do past max_update_norm")
    aggregator_restarts: int = Field(
        3, ge=0, description="times a lost aggregation actor is recreated from the last checkpoint"
    )


class RankTierSpec(_Strict):
    """A class of clients by memory: each gets the largest of ``ranks`` whose training fits ``memory_gb``."""

    name: str = Field(min_length=1, description="what to call these clients (e.g. phone, laptop)")
    memory_gb: float = Field(gt=0, description="memory each of these clients has for training, in 10^9 bytes")
    share: float = Field(ge=0, le=1, description="fraction of all clients in this tier")


class Spec(_Strict):
    """One federated run."""

    name: str = Field("fedray", min_length=1, description="experiment name in MLflow")
    label: str | None = Field(
        None, min_length=1, description="this run's variant in reports (e.g. fedit-r2); default the method"
    )
    seed: int = Field(0, ge=0, description="seed of every random choice in the run")

    method: str = Field("fedplora", description=f"one of {sorted(METHODS)}")
    method_options: dict[str, Any] = Field(default_factory=dict, description="options of the method")
    max_rank: int = Field(16, ge=1, description="global LoRA rank R")
    scale: float = Field(2.0, gt=0, description="LoRA scale s, one constant for every client and rank")

    ranks: list[int] = Field([2, 4, 8, 16], min_length=1, description="client ranks to draw from")
    rank_proportions: list[float] | None = Field(None, description="share of clients per rank; default equal")
    rank_tiers: list[RankTierSpec] | None = Field(
        None,
        description="clients by memory instead of rank_proportions: each tier gets the largest of ranks that fits",
    )

    model: str = Field("minilm", description="model registry name, local folder or hub id")
    model_dtype: ModelDtype = Field(
        "auto", description="dtype of the frozen base: auto (as stored), float32, bfloat16, float16"
    )
    target_modules: list[str] | None = Field(None, description="LoRA targets; default per architecture")
    pooling: Pooling = Field("auto", description="classification head input: cls, mean, or auto (the model's own)")

    dataset: str = Field("rotten_tomatoes", description="dataset registry name, local file or hub name")
    dataset_options: dict[str, Any] = Field(default_factory=dict, description="columns, config, max_examples")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of the data held out for the server")

    partition: Literal["iid", "dirichlet", "by_key"] = Field("dirichlet", description="how data is split")
    partition_options: dict[str, Any] = Field(default_factory=dict, description="e.g. alpha, min_size")
    num_clients: int = Field(20, ge=1, description="clients in the federation")
    clients_per_round: int | float = Field(4, gt=0, description="count, or fraction of num_clients if < 1")
    rounds: int = Field(10, ge=1, description="federated rounds")

    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    server: ServerSpec = Field(default_factory=ServerSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    reliability: ReliabilitySpec = Field(default_factory=ReliabilitySpec)
    faults: FaultSpec = Field(default_factory=FaultSpec)

    @model_validator(mode="after")
    def _consistent(self) -> Spec:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is unknown; choose one of {sorted(METHODS)}")
        allowed = method_options(self.method)
        for key in self.method_options:
            if key not in allowed:
                raise ValueError(f"method_options.{key} is not an option of {self.method}; its options are {allowed}")
        # Building the method on a tiny probe layer checks the option values too.
        probe = {"probe": (self.max_rank, self.max_rank)}
        create_method(self.method, probe, self.max_rank, scale=self.scale, **self.method_options)
        from fedray.data import create_partitioner  # here: the module pulls in pandas and datasets

        try:
            create_partitioner(self.partition, **self.partition_options)
        except (ValueError, TypeError) as error:
            known = _partitioner_options(self.partition)
            fitting = {key: value for key, value in self.partition_options.items() if key in known}
            hint = ""
            if len(fitting) < len(self.partition_options):  # unknown options: name the spec that fits
                hint = f"; keep only its options: partition_options={json.dumps(fitting, separators=(',', ':'))}"
            raise ValueError(
                f"partition_options do not fit partition={self.partition}: {str(error).rstrip('.')}{hint}"
            ) from None
        tiers = None
        if self.rank_tiers is not None:
            tiers = [ResourceTier(tier.name, tier.memory_gb, tier.share) for tier in self.rank_tiers]
        try:
            check_rank_split(max_rank=self.max_rank, ranks=self.ranks, proportions=self.rank_proportions, tiers=tiers)
        except ValueError as error:
            raise ValueError(f"ranks, rank_proportions or rank_tiers: {error}") from None
        METHODS[self.method].check_client_ranks(self.ranks, self.max_rank)
        if isinstance(self.clients_per_round, float) and self.clients_per_round > 1:
            raise ValueError(f"clients_per_round={self.clients_per_round}: a fraction must be in (0, 1]")
        if self.reliability.min_clients_per_round > self.sampled_clients:
            raise ValueError(
                f"reliability.min_clients_per_round={self.reliability.min_clients_per_round} exceeds the "
                f"{self.sampled_clients} clients sampled per round; lower it or sample more clients"
            )
        if self.sampled_clients > self.num_clients:
            raise ValueError(
                f"clients_per_round={self.clients_per_round} exceeds num_clients={self.num_clients}; lower it"
            )
        return self

    @property
    def sampled_clients(self) -> int:
        """Clients sampled each round."""
        if isinstance(self.clients_per_round, float):
            return max(1, round(self.clients_per_round * self.num_clients))
        return self.clients_per_round

    def digest(self, ignore: tuple[str, ...] = ()) -> str:
        """A hash of the spec (but its top-level fields ``ignore``), to recognise the run a checkpoint belongs to."""
        fields = self.model_dump(exclude=set(ignore))
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """The spec as ``{dotted.key: value}`` (for MLflow params)."""
        return _flatten(self.model_dump())


def load_spec(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Read a YAML spec (or the defaults), apply ``key=value`` overrides, validate."""
    raw = load_spec_file(Path(path)) if path is not None else {}
    for override in overrides:
        apply_override(raw, override)
    return validate_spec(raw)


def resolve_extends(raw: dict[str, Any], path: Path, depth: int = 0) -> dict[str, Any]:
    """Resolve ``extends: other.yaml`` (relative to ``path``): the parent's fields, overlaid."""
    parent_name = raw.pop("extends", None)
    if parent_name is None:
        return raw
    if depth >= MAX_EXTENDS_DEPTH:
        raise SpecError(f"spec file {str(path)!r}: 'extends' nests deeper than {MAX_EXTENDS_DEPTH}; is it circular?")
    parent = load_spec_file(path.parent / parent_name, depth + 1)
    return _merged(parent, raw)


def load_spec_file(path: Path, depth: int = 0) -> dict[str, Any]:
    """The raw fields of a spec file, ``extends`` resolved, not yet validated."""
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist; pass a YAML file such as jobs/quickstart.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise SpecError(f"spec file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"spec file {str(path)!r} must hold a mapping of fields, got {type(raw).__name__}")
    return resolve_extends(raw, path, depth)


def _merged(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not key.endswith("_options"):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate_spec(raw: dict[str, Any]) -> Spec:
    """A ``Spec`` from plain data, or ``SpecError`` naming the first bad field."""
    try:
        return Spec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(_explain(error, raw)) from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise SpecError(f"override {override!r} must look like key=value (e.g. rounds=4 or train.lr=1e-3)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    set_dotted(raw, key, value, source=f"override {override!r}")


def set_dotted(raw: dict[str, Any], key: str, value: Any, *, source: str) -> None:
    """Set ``raw``'s field at the dotted ``key`` (e.g. ``train.lr``) to ``value``; ``source``
    names where the setting came from in the error for a key that crosses a plain field."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"{source}: {part!r} is not a section of the spec")
        node = child
    node[parts[-1]] = value


def _explain(error: ValidationError, raw: dict[str, Any]) -> str:
    first = error.errors()[0]
    location = [str(part) for part in first["loc"]]
    field = ".".join(location)
    if first["type"] == "extra_forbidden":
        section: type[BaseModel] = Spec
        for part in location[:-1]:
            annotation = section.model_fields[part].annotation
            section = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else section
        known = list(section.model_fields)
        close = difflib.get_close_matches(location[-1], known, n=1)
        hint = f"did you mean {'.'.join([*location[:-1], close[0]])!r}?" if close else f"known fields: {known}"
        return f"unknown spec field {field!r}; {hint}"
    message = first["msg"].removeprefix("Value error, ")
    if not field:
        return f"invalid spec: {message}"
    return f"invalid spec field {field!r} = {first.get('input')!r}: {message}"


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _partitioner_options(name: str) -> set[str]:
    """The keyword options partitioner ``name`` takes (``seed`` is the spec's own)."""
    import dataclasses

    from fedray.data import PARTITIONERS

    return {option.name for option in dataclasses.fields(PARTITIONERS[name])} - {"seed"}
