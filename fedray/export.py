"""A run's global model as a standard PEFT LoRA folder, and loading it back.

``export_adapter`` factors every layer's dense global delta into rank-R LoRA factors (the
best rank-R approximation, Eckart-Young) and writes them, with the trained task head, as
a folder that ``PeftModel.from_pretrained(base_model, folder)`` loads with no fedray code.
The run's single scale ``s`` becomes ``lora_alpha = s * R`` so that peft's
``lora_alpha / r`` equals ``s`` (shared/METHODS.md).

The folder also holds ``fedray_base.json``, the ``ModelSpec`` of the base it was trained
on (a mean-pooled head is not what ``AutoModelForSequenceClassification`` builds);
``load_adapter(folder)`` rebuilds that base and loads the adapter onto it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, TaskType
from torch import Tensor
from transformers import PreTrainedModel

from fedray.methods.lowrank import Fold, LowRank, svd
from fedray.models import PEFT_PREFIX, ModelSpec, load_base, lora_model, peft_quietly, target_layers

#: File in the adapter folder that names the base model (a ``ModelSpec`` as JSON).
BASE_SPEC_FILE = "fedray_base.json"
#: Name of the one adapter an export holds (peft's default, dropped from the saved keys).
ADAPTER_NAME = "default"
#: Model-class name endings -> the peft task type that restores that model class's head.
TASK_TYPES = {"ForSequenceClassification": TaskType.SEQ_CLS, "ForCausalLM": TaskType.CAUSAL_LM}


@dataclass(frozen=True)
class ExportInfo:
    """How much of the global delta the rank-R export could not carry."""

    #: ||delta - best rank-R approximation||_F / ||delta||_F over all layers together (0 for a zero delta).
    dropped_fraction: float
    #: The same fraction for each layer on its own.
    per_layer_dropped: dict[str, float]
    #: The LoRA rank of the export (R).
    rank: int


def export_adapter(
    out_dir: str | Path,
    *,
    base_model: PreTrainedModel,
    global_delta: Mapping[str, Fold],
    head: Mapping[str, Tensor] | None,
    scale: float,
    max_rank: int,
    source: str,
    model_spec: ModelSpec | None = None,
) -> ExportInfo:
    """Write the global model (W0 + ``global_delta``, task head ``head``) as a PEFT LoRA folder.

    Each layer's delta is factored at rank ``max_rank`` from the SVD of ``delta / scale``:
    ``B = U_R S_R^(1/2)``, ``A = S_R^(1/2) V_R^T``, so ``scale * B @ A`` is the best rank-R
    approximation (exact when the delta's rank is at most R). A delta given as ``LowRank``
    factors is decomposed from them, without a dense d x k SVD. ``head`` ({parameter name:
    value}, None keeps the base's head) goes into ``modules_to_save``. ``source`` is recorded
    as the adapter's ``base_model_name_or_path``; ``model_spec``, the spec ``base_model`` was
    loaded from, goes into ``fedray_base.json`` for ``load_adapter``. ``base_model`` is not
    modified: peft wraps a copy of its module tree that shares the (untouched) weights.
    """
    if not scale > 0:
        raise ValueError(f"scale={scale} is invalid; pass the run's LoRA scale, a positive number.")
    if max_rank < 1:
        raise ValueError(f"max_rank={max_rank} is invalid; pass the run's global LoRA rank, 1 or more.")
    if not global_delta:
        raise ValueError("global_delta is empty; pass the run's global delta, one matrix per target layer.")
    _check_delta_shapes(base_model, global_delta)
    model = _model_with_head(base_model, head)
    factors, per_layer_dropped, dropped_sq, total_sq = {}, {}, 0.0, 0.0
    for layer, delta in global_delta.items():
        B, A, layer_dropped_sq, layer_total_sq = _rank_factors(_divided(delta, scale), max_rank)
        factors[layer] = (B, A)
        per_layer_dropped[layer] = _fraction(layer_dropped_sq, layer_total_sq)
        dropped_sq += layer_dropped_sq
        total_sq += layer_total_sq

    # A head is named by its top-level module (classifier, score), as in fedray.models.HEAD_MODULES. A task
    # type of SEQ_CLS makes peft save that module even without a trained head.
    head_modules = sorted({name.split(".")[0] for name in head}) if head else None
    config = LoraConfig(
        r=max_rank,
        lora_alpha=scale * max_rank,
        target_modules=list(global_delta),
        modules_to_save=head_modules,
        lora_dropout=0.0,
        bias="none",
        task_type=_task_type(base_model),
    )
    peft_model = lora_model(model, config, adapter_name=ADAPTER_NAME)
    _load_factors(peft_model, factors, scale)
    saved_config = peft_model.peft_config[ADAPTER_NAME]
    saved_config.base_model_name_or_path = source
    if saved_config.modules_to_save is not None:
        # peft appends its own head names for SEQ_CLS; list each module once.
        saved_config.modules_to_save = list(dict.fromkeys(saved_config.modules_to_save))
    # No embedding layer is a target, so peft need not look the source up to decide whether to save one.
    peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
    if model_spec is not None:
        (Path(out_dir) / BASE_SPEC_FILE).write_text(json.dumps(dataclasses.asdict(model_spec), indent=1))
    return ExportInfo(
        dropped_fraction=_fraction(dropped_sq, total_sq), per_layer_dropped=per_layer_dropped, rank=max_rank
    )


def load_adapter(folder: str | Path) -> PeftModel:
    """The model an export holds: its base rebuilt from ``fedray_base.json``, the adapter on top, in eval mode."""
    folder = Path(folder)
    spec_file = folder / BASE_SPEC_FILE
    if not spec_file.is_file():
        raise ValueError(
            f"{folder} has no {BASE_SPEC_FILE}; load the base model yourself and call "
            "PeftModel.from_pretrained(base, folder)."
        )
    base = load_base(ModelSpec(**json.loads(spec_file.read_text())))
    with peft_quietly():
        return PeftModel.from_pretrained(base.model, str(folder)).eval()


def _check_delta_shapes(model: PreTrainedModel, global_delta: Mapping[str, Fold]) -> None:
    """One clear error for a layer the model lacks or a delta of the wrong shape."""
    module_names = {name for name, _ in model.named_modules()}
    for layer, delta in global_delta.items():
        if layer not in module_names:
            raise ValueError(
                f"global_delta has layer {layer!r}, which the base model does not have; export a delta "
                "of the run's own base model, keyed by full module names."
            )
        try:
            ((_, shape),) = target_layers(model, (layer,)).items()
        except ValueError:
            raise ValueError(
                f"global_delta has layer {layer!r}, which is not a Linear layer of the base model; "
                "LoRA deltas belong to Linear layers only."
            ) from None
        if tuple(delta.shape) != shape:
            raise ValueError(
                f"global_delta[{layer!r}] has shape {tuple(delta.shape)} but the layer is (out, in) = {shape}; "
                "export the delta of the run's own base model."
            )


def _model_with_head(base_model: PreTrainedModel, head: Mapping[str, Tensor] | None) -> PreTrainedModel:
    """A copy of ``base_model``'s module tree with ``head``'s values in the task head.

    The copy is shallow in the weights: its modules hold the base's own tensors, so peft can
    replace modules in it without touching ``base_model``'s tree, and nothing large is duplicated.
    """
    shared_tensors = {id(tensor): tensor for tensor in (*base_model.parameters(), *base_model.buffers())}
    model = copy.deepcopy(base_model, shared_tensors)
    parameters = dict(model.named_parameters())
    for name, value in (head or {}).items():
        if name not in parameters:
            raise ValueError(f"head has parameter {name!r}, which the base model does not have; pass its task head.")
        original = parameters[name]
        if value.shape != original.shape:
            raise ValueError(
                f"head parameter {name!r} has shape {tuple(value.shape)} but the model's is "
                f"{tuple(original.shape)}; pass the head trained on this base model."
            )
        # New tensors, not writes into the shared ones; peft copies them into modules_to_save.
        module_name, _, attribute = name.rpartition(".")
        new = value.detach().to(device=original.device, dtype=original.dtype).clone()
        setattr(model.get_submodule(module_name), attribute, torch.nn.Parameter(new, requires_grad=False))
    return model


def _divided(matrix: Fold, divisor: float) -> Fold:
    if isinstance(matrix, LowRank):
        return LowRank(matrix.left / divisor, matrix.right)
    return matrix / divisor


def _rank_factors(matrix: Fold, rank: int) -> tuple[Tensor, Tensor, float, float]:
    """B (d x R), A (R x k) with B @ A the best rank-R approximation of ``matrix``, and the
    squared norms of what it drops and of the whole matrix. Zero columns pad a layer whose
    sides are shorter than R."""
    decomposition = svd(matrix)
    kept = min(rank, decomposition.S.numel())
    root = decomposition.S[:kept].sqrt()
    d, k = matrix.shape
    B = torch.zeros(d, rank, dtype=root.dtype, device=root.device)
    A = torch.zeros(rank, k, dtype=root.dtype, device=root.device)
    B[:, :kept] = decomposition.U[:, :kept] * root
    A[:kept] = root[:, None] * decomposition.Vh[:kept]
    squares = decomposition.S.square()
    return B, A, float(squares[kept:].sum()), float(squares.sum())


def _fraction(dropped_sq: float, total_sq: float) -> float:
    """sqrt(dropped / total), 0 for a zero matrix (nothing to drop)."""
    return float(np.sqrt(dropped_sq / total_sq)) if total_sq > 0 else 0.0


def _task_type(model: PreTrainedModel) -> TaskType | None:
    """The peft task type of the model's class, so loading builds the matching PeftModel; None if unknown."""
    class_name = type(model).__name__
    return next((task for ending, task in TASK_TYPES.items() if class_name.endswith(ending)), None)


def _load_factors(peft_model: PeftModel, factors: Mapping[str, tuple[Tensor, Tensor]], scale: float) -> None:
    for layer, (B, A) in factors.items():
        wrapper = peft_model.get_submodule(PEFT_PREFIX + layer)
        assert wrapper.scaling[ADAPTER_NAME] == scale, (wrapper.scaling, scale)
        with torch.no_grad():
            wrapper.lora_B[ADAPTER_NAME].weight.copy_(B)
            wrapper.lora_A[ADAPTER_NAME].weight.copy_(A)
