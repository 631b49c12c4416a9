"""One federated round on the driver: sample, launch a task per client, retry or drop the
failed ones, evaluate, checkpoint, log.

The driver reads only each task's small status: a finished client's result goes to the
aggregation actor by reference, a failed or timed-out one is retried and then dropped, and
a round with too few survivors is re-run with a fresh sample. After each round the driver
writes an atomic checkpoint, then the metrics are logged, so a resumed run neither
repeats nor misses a round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from fedray.config import Spec
from fedray.driver import outputs
from fedray.driver.aggregator import TooFewClients
from fedray.driver.checkpoint import write_checkpoint
from fedray.driver.cluster import task_resources
from fedray.driver.sampling import client_seed, sample_clients
from fedray.driver.storage import RemoteRunDir
from fedray.tracking.store import Tracker
from fedray.worker.evaluation import classification_metrics
from fedray.worker.tasks import eval_task, train_task

#: How often the driver looks at running client tasks (progress, timeouts).
POLL_S = 0.5
#: Characters of a failure's message kept in the round's record.
REASON_CHARS = 300

#: Shows one line of progress.
Show = Callable[[str], None]


class RunFailed(RuntimeError):
    """The run cannot make progress; its last checkpoint stays valid."""


@dataclass(frozen=True)
class RunContext:
    """A run's fixed ingredients, shared by its rounds."""

    spec: Spec
    run_dir: Path
    shards: list
    client_ranks: list[int]
    #: The ObjectRef of the shared base model.
    shared_ref: Any
    #: The aggregation actor's handle.
    aggregator: Any
    tracker: Tracker
    #: The key of the run's workbenches in the worker processes (unique per driver run).
    run_key: str
    #: Where the run directory lives when it is not local (run_dir is then its staging folder).
    remote: RemoteRunDir | None = None
    #: Evaluation tasks a round's evaluation is split into (classification: one per client
    #: slot, each scoring every k-th batch), combined on the driver.
    eval_parts: int = 1

    @property
    def resources(self) -> dict[str, float]:
        return task_resources(self.spec)


@dataclass
class _ClientTask:
    """A launched client task the driver waits on."""

    client: int
    #: Retries used so far (0 on the first try).
    tries: int
    #: ``time.monotonic()`` when the task began to run on a worker; None while it waits.
    started: float | None = None


def play_round(run: RunContext, round_index: int, show: Show) -> dict[str, Any]:
    """One round, re-sampled while too few clients survive; checkpointed, then logged."""
    spec = run.spec
    started = time.perf_counter()
    attempts_failures: list[str] = []
    for attempt in range(spec.reliability.round_attempts):
        sampled = sample_clients(spec, round_index, attempt)
        inits = {client: run.aggregator.client_init.remote(client, run.client_ranks[client]) for client in sampled}
        ray.get(run.aggregator.begin_round.remote(sampled))
        try:
            retried = _run_clients(run, round_index, attempt, inits, show)
            metrics = ray.get(run.aggregator.end_round.remote())
            break
        except TooFewClients as error:
            attempts_failures.append(failure_reason(error))
            show(f"round {round_index + 1}: too few clients, sampling again")
        except BaseException:
            ray.get(run.aggregator.abandon_round.remote())
            raise
    else:
        raise RunFailed(
            f"round {round_index + 1} failed {spec.reliability.round_attempts} times ({attempts_failures[-1]}); "
            f"the checkpoint of round {round_index} in {run.run_dir} is valid: fix the cause and "
            f"`fedray run --resume {run.run_dir}`"
        )
    failures = metrics.pop("failures")
    metrics["round_attempts"] = float(attempt + 1)
    metrics["client_retries"] = float(sum(len(reasons) for reasons in retried.values()))
    if round_index == spec.rounds - 1 or (round_index + 1) % spec.eval.every == 0:
        state_ref = run.aggregator.global_state.remote()
        metrics |= _evaluate(run, state_ref)
    metrics["round_s"] = time.perf_counter() - started
    record = {"round": round_index, "clients": sampled, **metrics, "failures": failures, "retries": retried}
    method_state, head, server_state = ray.get(run.aggregator.state.remote())
    info = {
        "run_id": run.tracker.run_id,
        "tracking_uri": run.tracker.uri,
        "experiment": spec.name,
        "spec_digest": spec.digest(),
        "metrics": record,
    }
    write_checkpoint(run.run_dir, round_index, method_state, head, info, server_state)
    outputs.append_metrics(run.run_dir, record)
    if run.remote is not None:
        run.remote.upload_round(round_index)
    ray.get(run.aggregator.log_metrics.remote(round_index, outputs.numbers(record)))
    return record


def _run_clients(
    run: RunContext, round_index: int, attempt: int, inits: dict[int, Any], show: Show
) -> dict[str, list[str]]:
    """Train the sampled clients (``inits``: their starts' refs); hand each result to the actor as it finishes.

    Returns, per client that was retried, why each of its failed tries failed."""
    spec, reliability = run.spec, run.spec.reliability
    head_ref = run.aggregator.global_head.remote()
    # Each task yields STARTED, its status, then its result (see ``train_task``). A task's
    # timeout clock starts at STARTED: waiting for a free slot or a new worker is not running.
    pending: dict[Any, _ClientTask] = {}
    acknowledgements: list = []
    retried: dict[str, list[str]] = {}

    def launch(client: int, tries: int) -> None:
        task = train_task.options(**run.resources).remote(
            run.run_key,
            [run.shared_ref],
            inits[client],
            run.shards[client],
            spec,
            head_ref,
            client_seed(spec, round_index, client),
            attempt * (reliability.client_retries + 1) + tries,
            spec.train.trains_head(round_index),
        )
        pending[task] = _ClientTask(client, tries)

    def failed(entry: _ClientTask, reason: str) -> None:
        if entry.tries < reliability.client_retries:
            retried.setdefault(str(entry.client), []).append(reason)
            launch(entry.client, entry.tries + 1)
        else:
            acknowledgements.append(run.aggregator.report_failure.remote(entry.client, reason))

    for client in inits:
        launch(client, 0)
    finished = 0
    # Interrupted (Ctrl-C) or failed, the round's clients are not cancelled: cancelling a task
    # whose reply is on its way crashes Ray 2.60's owner ("Tried to complete task that was not
    # pending"), taking the driver down before it marks the run KILLED. Ray ends the tasks with
    # the driver that owns them; a caller that lives on sees them finish and their results dropped.
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
        for task in ready:
            entry = pending[task]
            try:
                ray.get(next(task))  # STARTED, or the status once the client is done
            except ray.exceptions.RayError as error:
                del pending[task]
                failed(entry, failure_reason(error))
                continue
            if entry.started is None:
                entry.started = time.monotonic()
                continue
            del pending[task]
            acknowledgements.append(run.aggregator.add.remote([next(task)]))
            finished += 1
        if reliability.client_timeout_s is not None:
            now = time.monotonic()
            for task, entry in list(pending.items()):
                if entry.started is not None and now - entry.started > reliability.client_timeout_s:
                    ray.cancel(task, force=True)
                    del pending[task]
                    failed(entry, f"timed out after {reliability.client_timeout_s} s")
        show(f"round {round_index + 1}: clients {finished}/{len(inits)}")
    ray.get(acknowledgements)
    return retried


def _evaluate(run: RunContext, state_ref) -> dict[str, float]:
    """The global model's metrics, from one evaluation task or from ``run.eval_parts`` at once."""
    launch = eval_task.options(**run.resources).remote
    if run.eval_parts == 1:
        return ray.get(launch(run.run_key, [run.shared_ref], state_ref, run.spec))
    count = run.eval_parts
    parts = [launch(run.run_key, [run.shared_ref], state_ref, run.spec, (index, count)) for index in range(count)]
    return classification_metrics(ray.get(parts))


def failure_reason(error: BaseException) -> str:
    """One line on why a client task failed: its own exception, else Ray's error."""
    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) and error.cause else error
    lines = str(cause).strip().splitlines() or [""]
    return f"{type(cause).__name__}: {lines[0][:REASON_CHARS]}"
