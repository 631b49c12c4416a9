"""The six federated LoRA methods behind one interface (see shared/DESIGN.md).

m = create_method("fedplora", {"q": (d, k)}, max_rank=16, scale=2.0, seed=0)
init = m.client_init(client_id, rank)   # per sampled client, start of a round
m.aggregate(updates)                    # ClientUpdate stream, end of the round
m.global_delta()                        # {layer: d x k}
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedray.methods.base import Method
from fedray.methods.fedit import FedIT
from fedray.methods.fedplora import FedPLoRA
from fedray.methods.flexlora import FlexLoRA
from fedray.methods.flora import FLoRA
from fedray.methods.hetlora import HETLoRA
from fedray.methods.hlora import HLoRA
from fedray.methods.messages import NO_HOOK, ClientHook, ClientId, ClientInit, ClientUpdate, Heatmap, Rank, RoundStats

#: The registry: a method's name -> its class. A new method is one module and one entry here.
METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (FedIT, FLoRA, FlexLoRA, HETLoRA, HLoRA, FedPLoRA)}

__all__ = [
    "METHODS",
    "NO_HOOK",
    "ClientHook",
    "ClientId",
    "ClientInit",
    "ClientUpdate",
    "Heatmap",
    "Method",
    "Rank",
    "RoundStats",
    "create_method",
    "load_state",
    "method_from_state",
    "method_options",
    "read_state",
    "register_method",
    "save_state",
]


def register_method(cls: type[Method]) -> type[Method]:
    """Add a method to the registry of this process (also a class decorator), for methods
    that live outside fedray. The driver hands the class itself to the aggregation actor;
    Ray pickles it by reference, so its module must import in Ray's workers too."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not getattr(cls, "name", ""):
        raise ValueError(f"{cls!r} is not a Method subclass with a name; subclass fedray.methods.Method")
    if METHODS.get(cls.name, cls) is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered; give the new one another name")
    METHODS[cls.name] = cls
    return cls


def method_options(name: str) -> dict[str, Any]:
    """The options of method ``name`` beyond the common ones, with their defaults."""
    common = {"self", "shapes", "max_rank", "scale", "seed"}
    parameters = inspect.signature(_method_class(name).__init__).parameters
    return {key: p.default for key, p in parameters.items() if key not in common}


def create_method(
    name: str,
    shapes: Mapping[str, tuple[int, int]],
    max_rank: int,
    *,
    scale: float = 1.0,
    seed: int = 0,
    **options: Any,
) -> Method:
    """Build method ``name`` for target layers ``shapes`` ({layer: (d, k)})."""
    allowed = method_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method {name!r} has no option {unknown[0]!r}; its options are {sorted(allowed) or 'none'}")
    return _method_class(name)(shapes, max_rank, scale=scale, seed=seed, **options)


def save_state(method: Method | Mapping[str, Any], path: str | Path) -> None:
    """Write a method's ``state_dict()`` (or the dict itself) to safetensors (JSON metadata, no pickle)."""
    state = method.state_dict() if isinstance(method, Method) else method
    tensors = {key: value.contiguous() for key, value in state["tensors"].items()}
    save_file(tensors, str(path), metadata={"fedray": json.dumps(state["meta"])})


def read_state(path: str | Path) -> dict[str, Any]:
    """The ``state_dict()`` stored in a file written by ``save_state``."""
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["fedray"])
    return {"tensors": load_file(str(path)), "meta": meta}


def load_state(path: str | Path) -> Method:
    """Rebuild a method from a file written by ``save_state``, exactly as it was saved."""
    return method_from_state(read_state(path))


def method_from_state(state: Mapping[str, Any]) -> Method:
    """Rebuild a method from a ``state_dict()`` (its meta says which method and settings)."""
    meta = state["meta"]
    shapes = {layer: tuple(shape) for layer, shape in meta["shapes"].items()}
    method = create_method(
        meta["method"], shapes, meta["max_rank"], scale=meta["scale"], seed=meta["seed"], **meta["options"]
    )
    method.load_state_dict(state)
    return method


def _method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]
