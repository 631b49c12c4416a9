"""The Ray tasks of client training and evaluation, over one shared copy of the base model.

The base model's arrays live once in the object store. Each worker process builds a
``Workbench`` around them the first time it runs a task of a run and keeps it for every
later task of that run (tasks are scheduled with ``max_calls=0`` so GPU workers are
reused too), so the base is rebuilt once per worker, never once per client-round. Runs
that share a driver (a sweep's concurrent cells) share its workers, so a worker keeps
the workbenches of its few most recent runs rather than only the last one.

The tasks are thin: ``client_round`` and ``evaluate_round`` do the work and can run in
any Ray task (the system benchmarks time them in their own).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import ray
import torch

from fedray import inputs
from fedray.config import Spec
from fedray.methods import ClientInit
from fedray.worker.evaluation import ClassificationOutputs
from fedray.worker.faults import corrupt, fault_seed, inject_fault
from fedray.worker.results import ClientResult
from fedray.worker.workbench import Workbench

#: Runs whose workbench one process keeps at once: as many as a sweep runs cells at once on
#: the CPU, where a workbench reads the shared base and adds ~11 MiB (MiniLM, measured); two
#: on a GPU, where each holds a device copy of its base.
WORKBENCHES_PER_PROCESS = {"cpu": 8, "cuda": 2}
#: Workbenches of this process, by run key, least recently used first.
_BENCHES: OrderedDict[str, Workbench] = OrderedDict()
#: How many times this process built each run's base model (reported in workers.json).
_BUILDS: dict[str, int] = {}
#: Runs whose workbench a warm-up task built in this process (reported in workers.json).
_WARMED: set[str] = set()
#: What a client task yields first, as it begins to run.
STARTED = "started"


def workbench(run_key: str, shared_box: list) -> Workbench:
    """This process's workbench for ``run_key``, built from the shared base on first use."""
    bench = _BENCHES.get(run_key)
    if bench is None:
        limit = WORKBENCHES_PER_PROCESS["cuda" if torch.cuda.is_available() else "cpu"]
        while len(_BENCHES) >= limit:
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
    """Where a task ran, how often that process built ``run_key``'s base model, and whether
    a warm-up task built it before the first round."""
    node_id = ray.get_runtime_context().get_node_id()
    return {"pid": os.getpid(), "node_id": node_id, "builds": _BUILDS[run_key], "warmed": run_key in _WARMED}


def client_round(
    run_key: str,
    shared_box: list,
    init: ClientInit,
    indices,
    spec: Spec,
    head: Mapping[str, torch.Tensor] | None,
    seed: int,
    attempt: int = 0,
    train_head: bool = True,
) -> ClientResult:
    """One client's round in this process (``shared_box`` holds the base's ObjectRef): its
    injected fault if the spec asks for one, then training on the shard ``indices``
    (the head too if ``train_head``: ``TrainSpec.trains_head`` of the round)."""
    corrupted = inject_fault(spec.faults, fault_seed(seed, attempt))
    set_threads(spec)
    bench = workbench(run_key, shared_box)
    shard = inputs.dataset_split(spec).train.subset(indices)
    result = bench.train(init, shard, spec.train, head=head, seed=seed, train_head=train_head)
    if corrupted:
        corrupt(result.update)
    result.metrics["worker"] = worker_info(run_key)
    return result


def evaluate_round(
    run_key: str,
    shared_box: list,
    state: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None],
    spec: Spec,
    part: tuple[int, int] | None = None,
) -> dict[str, float] | ClassificationOutputs:
    """Metrics of the global model ``state = (global_delta, head)`` on the server's test set;
    with ``part = (index, count)`` (classification), that part's predictions, which the
    driver combines with the other parts' (``evaluation.classification_metrics``)."""
    set_threads(spec)
    bench = workbench(run_key, shared_box)
    eval_set = inputs.eval_set(spec, inputs.dataset_split(spec))
    max_seq_len = spec.train.max_seq_len
    if part is not None:
        return bench.classification_outputs(
            state, eval_set, batch_size=spec.eval.batch_size, max_seq_len=max_seq_len, part=part
        )
    global_delta, head = state
    return bench.evaluate(global_delta, eval_set, spec.eval, max_seq_len=max_seq_len, head=head)


@ray.remote(max_calls=0, max_retries=0)
def train_task(*client_round_args: Any) -> Iterator[str | dict[str, Any] | ClientResult]:
    """``client_round(*client_round_args)`` as a Ray generator task.

    Yields ``STARTED`` as it begins (the driver's timeout clock starts there, not while the
    task waits for a slot or a new worker process), then a small status the driver reads,
    then the result it hands on unread. Retries are the driver's (``max_retries=0``), so
    injected faults and timeouts count the same way.
    """
    yield STARTED
    result = client_round(*client_round_args)
    yield {"client_id": result.update.client_id, "seconds": result.metrics["seconds"], **result.metrics["worker"]}
    yield result


eval_task = ray.remote(max_calls=0)(evaluate_round)


def warm_up(run_key: str, shared_box: list, spec: Spec) -> str | None:
    """Import the worker side, build this process's workbench of ``run_key`` and read the
    data, so that the first round's clients find the worker warm. Best effort: returns
    None, or why it failed (the first client on this worker then fails and says so)."""
    try:
        set_threads(spec)
        workbench(run_key, shared_box)
        inputs.dataset_split(spec)
        _WARMED.add(run_key)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


warm_task = ray.remote(max_calls=0, max_retries=0)(warm_up)
