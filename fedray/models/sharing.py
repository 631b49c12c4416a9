"""Share a loaded base model zero-copy.

``export_base`` turns the model into a small picklable recipe plus one numpy array per
weight; ``build_model`` rebuilds the model around those arrays without copying them, so
every Ray task reads the one object-store copy. Those arrays are shared by every client:
nothing may write into them.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from fedray.models.registry import Base, ModelSpec, _freeze

#: Same-width integer dtypes that carry the bits of torch dtypes numpy has no type for.
_NUMPY_CARRIERS = {torch.bfloat16: torch.int16}


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
