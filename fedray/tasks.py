"""Ray tasks for client training and evaluation, over one shared copy of the base model.

The base model's arrays live once in the object store. Each worker process builds a
``Workbench`` around them the first time it runs a task of a run and keeps it for every
later task of that run (tasks are scheduled with ``max_calls=0`` so GPU workers are
reused too), so the base is rebuilt once per worker, never once per client-round.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ray
import torch

from fedray import job
from fedray.client import ClientResult, Workbench
from fedray.config import Spec
from fedray.methods import ClientInit

#: Workbenches of this process, by run key (a process serves one run at a time).
_BENCHES: dict[str, Workbench] = {}
#: How many times this process built each run's base model (the server checks it stays 1).
_BUILDS: dict[str, int] = {}


def workbench(run_key: str, shared_box: list) -> Workbench:
    """This process's workbench for ``run_key``, built from the shared base on first use."""
    bench = _BENCHES.get(run_key)
    if bench is None:
        _BENCHES.clear()  # an older run's model is of no further use
        bench = Workbench(ray.get(shared_box[0]))
        _BENCHES[run_key] = bench
        _BUILDS[run_key] = _BUILDS.get(run_key, 0) + 1
    return bench


def _set_threads(spec: Spec) -> None:
    threads = spec.resources.torch_threads or max(1, int(spec.resources.num_cpus))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def worker_info(run_key: str) -> dict[str, Any]:
    """Where a task ran, and how often that process built ``run_key``'s base model."""
    return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "builds": _BUILDS[run_key]}


@ray.remote(max_calls=0)
def train_task(
    run_key: str,
    shared_box: list,
    init: ClientInit,
    indices,
    spec: Spec,
    head: Mapping[str, torch.Tensor] | None,
    seed: int,
) -> ClientResult:
    """One client's round in a Ray worker (``shared_box`` holds the base's ObjectRef)."""
    _set_threads(spec)
    bench = workbench(run_key, shared_box)
    shard = job.dataset_split(spec).train.subset(indices)
    result = bench.train(init, shard, spec, head=head, seed=seed)
    result.metrics["worker"] = worker_info(run_key)
    return result


@ray.remote(max_calls=0)
def eval_task(
    run_key: str,
    shared_box: list,
    state: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None],
    spec: Spec,
) -> dict[str, float]:
    """Metrics of the global model ``state = (global_delta, head)`` on the server's test set."""
    _set_threads(spec)
    bench = workbench(run_key, shared_box)
    global_delta, head = state
    return bench.evaluate(global_delta, job.eval_set(spec, job.dataset_split(spec)), spec, head=head)
