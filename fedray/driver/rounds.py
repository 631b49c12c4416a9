"""The federated rounds on the driver: sample, launch a task per client, retry or drop the
failed ones, evaluate, checkpoint, log.

The driver reads only each task's small status: a finished client's result goes to the
aggregation actor by reference, a failed or timed-out one is retried and then dropped, and
a round with too few survivors is re-run with a fresh sample. A round's evaluation runs
while the next round trains; once it is in, the driver writes the round's atomic
checkpoint, then its metrics are logged, so a resumed run neither repeats nor misses a
round.
"""

from __future__ import annotations

import contextlib
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


@dataclass
class _Unsettled:
    """A played round whose record waits for its evaluation (running beside the next round)."""

    round_index: int
    #: The round's record but its evaluation and ``round_s``: round, clients, training
    #: metrics, failures, retries.
    record: dict[str, Any]
    #: ``time.perf_counter()`` at the round's start.
    started: float
    #: The evaluation tasks' refs (none when the round is not evaluated).
    evaluation: list
    #: The ref of the aggregation actor's state right after the round, for its checkpoint.
    state: Any
    #: Set when the next round starts.
    round_s: float | None = None


class Rounds:
    """Plays a run's rounds in order; a round's evaluation overlaps the next round's training.

    When a round ends, its global model's evaluation is launched and the next round starts
    at once: the evaluation tasks and the next clients share the cluster's slots, so slots
    the next round leaves idle (a round's last wave, clients fewer than slots, a generation
    task's one evaluation) score the model meanwhile. A round is *settled* when its
    evaluation is in: its checkpoint is written, then its metrics, in round order, and
    ``done`` gets its record. The checkpoint holds the actor's state taken right after the
    round, so resuming from it is bit-exact as before; a run stopped while an evaluation
    runs resumes from the round before, replaying the unsettled one.
    ``round_s`` is the wall time from a round's start to the next round's start (the last
    round: to its record), so the rounds' times add up to the run's.
    """

    def __init__(self, run: RunContext, show: Show, done: Callable[[dict[str, Any]], None]) -> None:
        self.run = run
        self.show = show
        self.done = done
        self._unsettled: _Unsettled | None = None

    def play(self, round_index: int) -> None:
        """One round, re-sampled while too few clients survive; its evaluation launched."""
        run, spec = self.run, self.run.spec
        started = time.perf_counter()
        if self._unsettled is not None:
            self._unsettled.round_s = started - self._unsettled.started
        attempts_failures: list[str] = []
        for attempt in range(spec.reliability.round_attempts):
            sampled = sample_clients(spec, round_index, attempt)
            inits = {client: run.aggregator.client_init.remote(client, run.client_ranks[client]) for client in sampled}
            ray.get(run.aggregator.begin_round.remote(sampled))
            try:
                retried = _run_clients(run, round_index, attempt, inits, show=self.show, between=self.settle_if_ready)
                metrics = ray.get(run.aggregator.end_round.remote())
                break
            except TooFewClients as error:
                attempts_failures.append(failure_reason(error))
                self.show(f"round {round_index + 1}: too few clients, sampling again")
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
        record = {"round": round_index, "clients": sampled, **metrics, "failures": failures, "retries": retried}
        last = round_index == spec.rounds - 1
        evaluation = _evaluate(run) if last or (round_index + 1) % spec.eval.every == 0 else []
        state = run.aggregator.state.remote()  # before the next round changes it (the actor runs calls in order)
        self.settle()  # the round before, first
        self._unsettled = _Unsettled(round_index, record, started, evaluation, state)
        if last or not evaluation:
            self.settle()

    def settle_if_ready(self) -> None:
        """Settle the unsettled round if its evaluation is in (never waits)."""
        pending = self._unsettled
        if pending is not None and pending.evaluation:
            _, waiting = ray.wait(pending.evaluation, num_returns=len(pending.evaluation), timeout=0)
            if waiting:
                return
        self.settle()

    def settle(self) -> None:
        """Wait for the unsettled round's evaluation; write its checkpoint and metrics, log them."""
        pending, self._unsettled = self._unsettled, None
        if pending is None:
            return
        run, record = self.run, dict(pending.record)
        failures, retries = record.pop("failures"), record.pop("retries")
        if pending.evaluation:
            record |= _metrics(run, ray.get(pending.evaluation))
        record["round_s"] = pending.round_s if pending.round_s is not None else time.perf_counter() - pending.started
        record |= {"failures": failures, "retries": retries}
        method_state, head, server_state = ray.get(pending.state)
        info = {
            "run_id": run.tracker.run_id,
            "tracking_uri": run.tracker.uri,
            "experiment": run.spec.name,
            "spec_digest": run.spec.digest(),
            "metrics": record,
        }
        write_checkpoint(run.run_dir, pending.round_index, method_state, head, info, server_state)
        outputs.append_metrics(run.run_dir, record)
        if run.remote is not None:
            run.remote.upload_round(pending.round_index)
        ray.get(run.aggregator.log_metrics.remote(pending.round_index, outputs.numbers(record)))
        self.done(record)

    def settle_or_drop(self, *, wait: bool) -> None:
        """After a lost actor (``wait``) or on a stop (not waiting): settle the unsettled
        round if its evaluation is (or, waiting, comes) in and its state can still be read,
        else drop it, to be replayed from the checkpoint before it."""
        with contextlib.suppress(ray.exceptions.RayError):
            if wait:
                self.settle()
            else:
                self.settle_if_ready()
        self._unsettled = None


def _run_clients(
    run: RunContext,
    round_index: int,
    attempt: int,
    inits: dict[int, Any],
    *,
    show: Show,
    between: Callable[[], None],
) -> dict[str, list[str]]:
    """Train the sampled clients (``inits``: their starts' refs); hand each result to the actor as it finishes.
    ``between`` runs at every look at the tasks (it settles the round before once its evaluation is in).

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
        between()
    ray.get(acknowledgements)
    return retried


def _evaluate(run: RunContext) -> list:
    """Launch the evaluation of the actor's global model now: one task, or ``run.eval_parts``
    at once (each scoring every k-th batch); their refs."""
    state_ref = run.aggregator.global_state.remote()
    launch = eval_task.options(**run.resources).remote
    if run.eval_parts == 1:
        return [launch(run.run_key, [run.shared_ref], state_ref, run.spec)]
    count = run.eval_parts
    return [launch(run.run_key, [run.shared_ref], state_ref, run.spec, (index, count)) for index in range(count)]


def _metrics(run: RunContext, parts: list) -> dict[str, float]:
    """The evaluation's metrics from its tasks' results (combined when split)."""
    return parts[0] if run.eval_parts == 1 else classification_metrics(parts)


def failure_reason(error: BaseException) -> str:
    """One line on why a client task failed: its own exception, else Ray's error."""
    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) and error.cause else error
    lines = str(cause).strip().splitlines() or [""]
    return f"{type(cause).__name__}: {lines[0][:REASON_CHARS]}"
