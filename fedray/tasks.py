"""Ray tasks for client training and evaluation, over one shared copy of the base model.

The base model's arrays live once in the object store. Each worker process builds a
``Workbench`` around them the first time it runs a task of a run and keeps it for every
later task of that run (tasks are scheduled with ``max_calls=0`` so GPU workers are
reused too), so the base is rebuilt once per worker, never once per client-round. Runs
that share a driver (a sweep's concurrent cells) share its workers, so a worker keeps
the workbenches of its few most recent runs rather than only the last one.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import ray
import torch

from fedray import job
from fedray.client import Workbench
from fedray.config import FaultSpec, Spec
from fedray.methods import ClientInit
from fedray.results import ClientResult

#: Runs whose workbench one process keeps at once. Small: a GPU worker's workbench holds a
#: device copy of its base, and an older run's model is of no further use.
WORKBENCHES_PER_PROCESS = 2
#: Workbenches of this process, by run key, least recently used first.
_BENCHES: OrderedDict[str, Workbench] = OrderedDict()
#: How many times this process built each run's base model (the server checks it stays 1).
_BUILDS: dict[str, int] = {}
#: What a client task yields first, as it begins to run.
STARTED = "started"


def workbench(run_key: str, shared_box: list) -> Workbench:
    """This process's workbench for ``run_key``, built from the shared base on first use."""
    bench = _BENCHES.get(run_key)
    if bench is None:
        while len(_BENCHES) >= WORKBENCHES_PER_PROCESS:
            _BENCHES.popitem(last=False)
        bench = Workbench(ray.get(shared_box[0]))
        _BENCHES[run_key] = bench
        _BUILDS[run_key] = _BUILDS.get(run_key, 0) + 1
    _BENCHES.move_to_end(run_key)
    return bench


def set_threads(spec: Spec) -> None:
    """Give torch the threads a client task of ``spec`` owns (``resources.torch_threads``, else its CPUs)."""
    threads = spec.resources.torch_threads or max(1, int(spec.resources.num_cpus))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def worker_info(run_key: str) -> dict[str, Any]:
    """Where a task ran, and how often that process built ``run_key``'s base model."""
    return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "builds": _BUILDS[run_key]}


class InjectedFault(RuntimeError):
    """A client failure injected on purpose (spec ``faults``)."""


def inject_fault(faults: FaultSpec, seed: int) -> bool:
    """Maybe fail the way ``faults`` asks, decided by ``seed`` (a client's round and try).

    Returns whether the client should corrupt its update; the other faults act here.
    """
    draw = float(np.random.default_rng(seed).random())
    if draw < faults.raise_prob:
        raise InjectedFault(f"injected client failure (draw {draw:.3f} < raise_prob {faults.raise_prob})")
    draw -= faults.raise_prob
    if draw < faults.kill_prob:
        os._exit(1)  # the worker process dies, as on a lost node or an OOM kill
    draw -= faults.kill_prob
    if draw < faults.delay_prob:
        time.sleep(faults.delay_s)
        return False
    draw -= faults.delay_prob
    return draw < faults.corrupt_prob


def fault_seed(client_seed: int, attempt: int) -> int:
    """The seed of a client task's fault draw (its round's client seed and its try)."""
    return int(np.random.SeedSequence([client_seed, attempt]).generate_state(1)[0])


@ray.remote(max_calls=0, max_retries=0)
def train_task(
    run_key: str,
    shared_box: list,
    init: ClientInit,
    indices,
    spec: Spec,
    head: Mapping[str, torch.Tensor] | None,
    seed: int,
    attempt: int = 0,
) -> Iterator[str | dict[str, Any] | ClientResult]:
    """One client's round in a Ray worker (``shared_box`` holds the base's ObjectRef).

    A generator: yields ``STARTED`` as it begins (the driver's timeout clock starts there, not
    while the task waits for a slot or a new worker process), then a small status the driver
    reads, then the result it hands on unread. Retries are the driver's (``max_retries=0``),
    so injected faults and timeouts count the same way.
    """
    yield STARTED
    corrupt = inject_fault(spec.faults, fault_seed(seed, attempt))
    set_threads(spec)
    bench = workbench(run_key, shared_box)
    shard = job.dataset_split(spec).train.subset(indices)
    result = bench.train(init, shard, spec, head=head, seed=seed)
    if corrupt:
        for factor in result.update.B.values():
            factor.fill_(float("nan"))
    worker = worker_info(run_key)
    result.metrics["worker"] = worker
    yield {"client_id": init.client_id, "seconds": result.metrics["seconds"], **worker}
    yield result


def client_status(task: ray.ObjectRefGenerator) -> dict[str, Any]:
    """Wait for a ``train_task`` to end; its status (the task's error is raised)."""
    refs = list(task)[:2]  # STARTED and the status; a failed task's last ref is its error
    return ray.get(refs)[-1]


@ray.remote(max_calls=0)
def eval_task(
    run_key: str,
    shared_box: list,
    state: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None],
    spec: Spec,
) -> dict[str, float]:
    """Metrics of the global model ``state = (global_delta, head)`` on the server's test set."""
    set_threads(spec)
    bench = workbench(run_key, shared_box)
    global_delta, head = state
    return bench.evaluate(global_delta, job.eval_set(spec, job.dataset_split(spec)), spec, head=head)
