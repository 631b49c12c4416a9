"""How fedray's messages cross process boundaries: their tensors travel as numpy arrays.

Pickling a torch tensor writes its storage through torch's own serializer, about 0.1 ms a
tensor however small; a numpy array goes to Ray as a pickle-5 buffer, without a copy. A
client's start and its update hold a few dozen factor tensors each (24 for MiniLM's
quickstart: unpickled in 2.7 ms as tensors, 0.04 ms as arrays), and every client of
every round sends both through the aggregation actor, so the messages (``ClientInit``,
``ClientUpdate``, ``LowRank``, ``ClientResult``) pickle their tensors as arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class _Packed:
    """A CPU tensor's values; bfloat16 (which numpy lacks) as its 16-bit patterns."""

    array: np.ndarray
    bfloat16: bool


def pack(value: Any) -> Any:
    """``value`` with its CPU tensors (also inside dicts) as ``_Packed`` arrays."""
    if isinstance(value, Tensor) and value.device.type == "cpu" and not value.requires_grad:
        tensor = value.detach().contiguous()
        if tensor.dtype == torch.bfloat16:
            return _Packed(tensor.view(torch.int16).numpy(), True)
        return _Packed(tensor.numpy(), False)
    if isinstance(value, dict):
        return {key: pack(item) for key, item in value.items()}
    return value


def unpack(value: Any) -> Any:
    """The inverse of ``pack``: tensors that own writable memory (Ray hands arrays over read-only)."""
    if isinstance(value, _Packed):
        array = value.array if value.array.flags.writeable else value.array.copy()
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if value.bfloat16 else tensor
    if isinstance(value, dict):
        return {key: unpack(item) for key, item in value.items()}
    return value


def reduce_dataclass(message: Any) -> tuple:
    """``__reduce__`` of a dataclass message: its fields packed, rebuilt by its constructor."""
    return _rebuild, (type(message), {field.name: pack(getattr(message, field.name)) for field in fields(message)})


def _rebuild(cls: type, values: dict[str, Any]) -> Any:
    return cls(**{name: unpack(value) for name, value in values.items()})
