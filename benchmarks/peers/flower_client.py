"""The Flower ClientApp of the FedIT peer: one fedray client's round, as fedray's client task does it.

Each message names the fedray client it is for (``client-id``) and carries the spec and
the global FedIT state (B and A of every target layer, and the task head). The ClientApp
rebuilds exactly what ``fedray.worker.tasks.train_task`` is given: the client's shard from the
spec's partition, a FedIT start (the global factors, no fold), the global head and
``sampling.client_seed``, and runs fedray's own ``Workbench.train`` on it.

This module is imported by name in Flower's Ray actors (pickled functions refer to it),
so each actor process keeps its base model and data between messages, as a fedray worker
keeps its ``Workbench``; unlike a fedray worker it loads its own copy of the base model,
since Flower hands a ClientApp no shared object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedray import inputs
from fedray.config import Spec
from fedray.data import DatasetSplit, create_partitioner
from fedray.driver.sampling import client_seed
from fedray.methods import ClientInit
from fedray.models import export_base, load_base
from fedray.worker.workbench import Workbench

#: Keys of the message records (Flower's FedAvg defaults for the arrays and config).
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
#: The key FedAvg weights the average by.
NUM_EXAMPLES_KEY = "num-examples"
#: Config keys: the fedray client a message is for, the spec (JSON), the round (from 1).
CLIENT_ID_KEY = "client-id"
SPEC_KEY = "spec"
ROUND_KEY = "server-round"
#: Prefix of the head parameters' array names.
HEAD_PREFIX = "head."


def factor_name(layer: str, factor: str) -> str:
    """The array name of ``layer``'s factor ``"B"`` or ``"A"``: the key fedray's ``Method.state_dict`` gives it."""
    return f"global.{layer}.{factor}"


def to_arrays(
    B: Mapping[str, torch.Tensor], A: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor] | None
) -> ArrayRecord:
    """FedIT's state as one ArrayRecord: every factor and head parameter an array of its own."""
    tensors = {factor_name(layer, "B"): B[layer] for layer in B}
    tensors |= {factor_name(layer, "A"): A[layer] for layer in A}
    tensors |= {HEAD_PREFIX + name: value for name, value in (head or {}).items()}
    return ArrayRecord({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()})


def from_arrays(
    arrays: ArrayRecord, layers: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(B, A, head)`` back from ``to_arrays``' record (head None when the model has none)."""
    tensors = arrays.to_torch_state_dict()
    B = {layer: tensors[factor_name(layer, "B")] for layer in layers}
    A = {layer: tensors[factor_name(layer, "A")] for layer in layers}
    head = {name.removeprefix(HEAD_PREFIX): value for name, value in tensors.items() if name.startswith(HEAD_PREFIX)}
    return B, A, head or None


@dataclass
class _ClientSide:
    """What one actor process keeps for a run: its spec, base model, data and partition."""

    spec: Spec
    bench: Workbench
    split: DatasetSplit
    shards: list[np.ndarray]


#: This process's client side, by spec JSON (a process serves one run at a time).
_SIDES: dict[str, _ClientSide] = {}


def client_side(spec_json: str) -> _ClientSide:
    """This process's client side for the run of ``spec_json``, built on its first message."""
    side = _SIDES.get(spec_json)
    if side is None:
        _SIDES.clear()
        spec = Spec.model_validate_json(spec_json)
        split = inputs.dataset_split(spec)
        partitioner = create_partitioner(spec.partition, **({"seed": spec.seed} | spec.partition_options))
        shards = partitioner.partition(split.train, spec.num_clients).shards
        bench = Workbench(export_base(load_base(inputs.model_spec(spec, split))))
        side = _SIDES[spec_json] = _ClientSide(spec, bench, split, shards)
    return side


def torch_threads(spec: Spec) -> int:
    """Torch threads of a client, by the rule of fedray's tasks (``resources.torch_threads``, else num_cpus)."""
    return spec.resources.torch_threads or max(1, int(spec.resources.num_cpus))


app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the fedray client the message names for one round; reply with its factors and head."""
    config = message.content[CONFIG_KEY]
    side = client_side(str(config[SPEC_KEY]))
    spec = side.spec
    client_id = int(config[CLIENT_ID_KEY])
    round_index = int(config[ROUND_KEY]) - 1
    if torch.get_num_threads() != torch_threads(spec):
        torch.set_num_threads(torch_threads(spec))
    B, A, head = from_arrays(message.content[ARRAYS_KEY], list(side.bench.layers))
    # FedIT's start is the global factors themselves at max_rank, with no fold (FedIT._make_init).
    init = ClientInit(client_id, spec.max_rank, spec.scale, B, A)
    shard = side.split.train.subset(side.shards[client_id])
    result = side.bench.train(init, shard, spec.train, head=head, seed=client_seed(spec, round_index, client_id))
    trained_head = result.head if result.head is not None else head
    metrics = MetricRecord(
        {
            NUM_EXAMPLES_KEY: result.update.num_examples,
            CLIENT_ID_KEY: client_id,
            "train_loss": result.metrics["train_loss"],
            "client_s": result.metrics["seconds"],
        }
    )
    reply = RecordDict({ARRAYS_KEY: to_arrays(result.update.B, result.update.A, trained_head), METRICS_KEY: metrics})
    return Message(reply, reply_to=message)
