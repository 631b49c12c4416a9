"""The aggregation actor: owns the method state, streams client results into it, logs.

During a round the driver hands the actor each finished client's result as an ObjectRef
(``add``); a background thread of the actor pulls it and feeds it into the method's
streaming ``aggregate`` in the order of the round's sample (by client id), so a run's
numbers do not depend on which client finished first: float sums depend on their order.
Only results that finish ahead of an earlier client wait for it, so neither the actor
nor the driver holds a whole round of updates unless the first client finishes last.
Every update is checked before it can touch the global state; a bad one is rejected with
its reason and the round goes on.
"""

from __future__ import annotations

import math
import queue
import statistics
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from fedray.config import Spec
from fedray.methods import ClientInit, ClientUpdate, Heatmap, Method
from fedray.methods.lowrank import LowRank, fro_norm
from fedray.tracking.live_metrics import LiveMetrics
from fedray.tracking.names import EVAL_METRICS
from fedray.tracking.store import Tracker
from fedray.worker.results import ClientResult

#: Marks the end of a round's results in the actor's queue.
_END = None
#: Names the head's tensors among the method's in the server optimizer's state.
HEAD_PREFIX = "head:"


@dataclass(frozen=True)
class _Failed:
    """In the actor's queue: the driver gave up on this client (its turn in the order passes)."""

    client_id: int


class TooFewClients(RuntimeError):
    """Fewer clients survived than ``reliability.min_clients_per_round``."""


@dataclass
class _RoundLog:
    """What a round's stream saw besides the updates themselves."""

    client_seconds: list[float] = field(default_factory=list)
    weighted_loss: float = 0.0
    examples: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    clipped: int = 0
    head_sum: dict[str, torch.Tensor] | None = None
    #: What the method's client hooks reported, summed over the round's clients.
    method_sums: dict[str, float] = field(default_factory=dict)


@ray.remote(num_cpus=0)
class Aggregator:
    """Method state, head, tracking and live metrics of one run.

    Calls run one at a time, in the order the driver sent them; ``add`` only queues a
    result for the round's background aggregation thread, which is the one place the
    method's state changes during a round.
    """

    def __init__(self, *run: Any) -> None:
        """``run``: the arguments of ``start_run``."""
        self.start_run(*run)

    def start_run(
        self,
        spec: Spec,
        method_class: type[Method],
        shapes: Mapping[str, tuple[int, int]],
        head: Mapping[str, torch.Tensor] | None,
        tracking_uri: str,
        run_id: str,
    ) -> None:
        """Take on a run from its start: every attribute of the run is set here, afresh.

        A driver that runs again (a sweep's next cell) hands a finished run's actor a new
        run instead of starting a process and its imports again (``release`` in between)."""
        # The actor shares cores with client tasks: extra BLAS threads would spin, not help.
        torch.set_num_threads(spec.resources.aggregator_threads)
        self.spec = spec
        # The class, not its name: a method registered on the driver alone is known here too.
        self.method = method_class(shapes, spec.max_rank, scale=spec.scale, seed=spec.seed, **spec.method_options)
        self.head = dict(head) if head else None
        #: The server optimizer (None: the method's average is the new state) and the
        #: state it steps from, as the round began.
        self.server = spec.server.create()
        self._before: dict[str, torch.Tensor] = {}
        self.tracker = Tracker(tracking_uri, run_id)
        self.live = LiveMetrics(run_id, spec.method)
        self.workers: dict[str, dict[str, Any]] = {}
        self._round: _Round | None = None
        self._client_seconds: list[float] = []

    def release(self) -> None:
        """Let go of a finished run's state (the method's factors, the tracker): the actor
        waits, idle, for ``start_run``. Its live metrics keep their last values."""
        self.method = self.head = self.server = self.tracker = self.live = None
        self._before, self.workers, self._round, self._client_seconds = {}, {}, None, []

    # ------------------------------------------------------------ between rounds

    def client_init(self, client_id: int, rank: int) -> ClientInit:
        return self.method.client_init(client_id, rank)

    def global_head(self) -> dict[str, torch.Tensor] | None:
        return self.head

    def global_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        return self.method.global_delta(), self.head

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, dict[str, Any] | None]:
        """Everything a checkpoint holds: the method's state dict, the head, the server optimizer's state."""
        return self.method.state_dict(), self.head, None if self.server is None else self.server.state_dict()

    def load_state(
        self,
        method_state: Mapping[str, Any],
        head: Mapping[str, torch.Tensor] | None,
        server_state: Mapping[str, Any] | None = None,
    ) -> None:
        self.method.load_state_dict(method_state)
        self.head = dict(head) if head else None
        if (server_state is None) != (self.server is None):
            saved = "none" if server_state is None else server_state["meta"]["rule"]
            raise ValueError(f"the checkpoint's server optimizer is {saved}, the spec's {self.spec.server.optimizer}")
        if self.server is not None:
            self.server.load_state_dict(server_state)

    def log_metrics(self, round_index: int, metrics: Mapping[str, float]) -> None:
        """Record a finished round in MLflow and the live metrics."""
        self.tracker.log_metrics(round_index, metrics)
        self.live.record_round(metrics, self._client_seconds)
        for name in EVAL_METRICS.values():
            if name in metrics:
                self.live.record_eval(metrics[name])

    def heatmaps(self) -> dict[str, Heatmap]:
        """The method's figures of its last aggregated round."""
        return self.method.heatmaps()

    def worker_builds(self) -> dict[str, dict[str, Any]]:
        """Per worker process, how many times it built the base model, and where it ran."""
        return self.workers

    # ------------------------------------------------------------------- a round

    def begin_round(self, clients: list[int]) -> None:
        """Open a round of ``clients`` (the sample, by id): their updates are aggregated in that order."""
        assert self._round is None, "a round is already open"
        if self.server is not None:
            self._before = self._server_state()
        self._round = _Round(self, clients)

    def add(self, result_box: list) -> None:
        """Queue one client's result (``result_box[0]`` is its ObjectRef, left unresolved)."""
        self._round.results.put(result_box[0])

    def report_failure(self, client_id: int, reason: str) -> None:
        """A client the driver gave up on (task error, lost worker, timeout)."""
        self._round.log.failures[str(client_id)] = reason
        self._round.results.put(_Failed(client_id))

    def end_round(self) -> dict[str, float]:
        """Wait for the round's aggregation; return its metrics (not yet logged).

        Raises ``TooFewClients`` (global state unchanged) when too few updates survived.
        """
        current, self._round = self._round, None
        current.results.put(_END)
        current.thread.join()
        if current.error is not None:
            self.method.abandon_round()
            raise current.error
        stats, log = current.stats, current.log
        if log.head_sum is not None:
            self.head = {name: total / log.examples for name, total in log.head_sum.items()}
        if self.server is not None:
            self._server_step(trained_head=log.head_sum is not None)
        self._client_seconds = log.client_seconds
        return log.method_sums | {
            "train_loss": log.weighted_loss / log.examples,
            "init_noise": stats.init_noise,
            "init_noise_rel": stats.init_noise_rel,
            "agg_noise": stats.agg_noise,
            "agg_noise_rel": stats.agg_noise_rel,
            "bytes_up": float(stats.bytes_up),
            "bytes_down": float(stats.bytes_down),
            "client_s_p50": statistics.median(log.client_seconds),
            "client_s_max": max(log.client_seconds),
            "client_s_sum": sum(log.client_seconds),
            "clients_ok": float(stats.clients_aggregated),
            "clients_failed": float(len(log.failures)),
            "updates_clipped": float(log.clipped),
            "examples": float(stats.num_examples),
            "failures": dict(log.failures),
        }

    def abandon_round(self) -> None:
        """Drop an open round (driver interrupted): global state stays as it was."""
        if self._round is not None:
            self._round.abandon()
            self._round = None
        self.method.abandon_round()

    # ----------------------------------------------------------------- internals

    def _server_state(self) -> dict[str, torch.Tensor]:
        """What the server optimizer steps: the method's ``server_state`` and the head."""
        head = {f"{HEAD_PREFIX}{name}": value for name, value in (self.head or {}).items()}
        return self.method.server_state() | head

    def _server_step(self, trained_head: bool) -> None:
        """Replace the round's plain average by the server optimizer's step from it.

        A head that did not train this round (``train.head_rounds``) is not stepped.
        """
        before = {k: v for k, v in self._before.items() if trained_head or not k.startswith(HEAD_PREFIX)}
        averaged = {k: v for k, v in self._server_state().items() if k in before}
        new = self.server.step(before, averaged)
        self.method.load_server_state({k: v for k, v in new.items() if not k.startswith(HEAD_PREFIX)})
        if trained_head:
            self.head = {k.removeprefix(HEAD_PREFIX): v for k, v in new.items() if k.startswith(HEAD_PREFIX)}

    def _checked(self, update: ClientUpdate, log: _RoundLog) -> ClientUpdate | None:
        """``update`` if it may touch the global state (clipped if the spec says so), else None."""
        try:
            self.method.validate(update)
        except ValueError as error:
            log.failures[str(update.client_id)] = f"rejected: {error}"
            return None
        bound = self.spec.reliability.max_update_norm
        if bound is None:
            return update
        norm = math.sqrt(sum(fro_norm(LowRank(self.spec.scale * update.B[k], update.A[k])) ** 2 for k in update.B))
        if norm <= bound:
            return update
        if self.spec.reliability.on_large_update == "reject":
            log.failures[str(update.client_id)] = (
                f"rejected: update norm {norm:.4g} exceeds reliability.max_update_norm={bound}"
            )
            return None
        log.clipped += 1
        shrink = math.sqrt(bound / norm)  # on both factors: the product shrinks by bound / norm
        return ClientUpdate(
            update.client_id,
            update.rank,
            update.num_examples,
            {k: v * shrink for k, v in update.B.items()},
            {k: v * shrink for k, v in update.A.items()},
        )

    def _record_result(self, result: ClientResult, log: _RoundLog) -> None:
        worker = result.metrics.pop("worker")
        self.workers[f"{worker['node_id']}:{worker['pid']}"] = worker
        n = result.update.num_examples
        log.client_seconds.append(result.metrics["seconds"])
        log.weighted_loss += result.metrics["train_loss"] * n
        log.examples += n
        for name, value in result.method_metrics.items():
            log.method_sums[name] = log.method_sums.get(name, 0.0) + value
        if result.head is not None:
            if log.head_sum is None:
                log.head_sum = {name: torch.zeros_like(value) for name, value in result.head.items()}
            for name, value in result.head.items():
                log.head_sum[name] += n * value


class _Round:
    """One round's background aggregation inside the actor."""

    def __init__(self, owner: Aggregator, clients: list[int]) -> None:
        self.owner = owner
        self.clients = clients
        self.results: queue.Queue = queue.Queue()
        self.log = _RoundLog()
        self.stats = None
        self.error: BaseException | None = None
        self._abandoned = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def abandon(self) -> None:
        self._abandoned = True
        self.results.put(_END)
        self.thread.join()

    def _run(self) -> None:
        try:
            self.stats = self.owner.method.aggregate(self._updates())
        except BaseException as error:  # handed to end_round, which re-raises it in the actor
            self.error = error

    def _updates(self) -> Iterator[ClientUpdate]:
        """The round's accepted updates in ``clients`` order, each once every client before it is done."""
        owner, log = self.owner, self.log
        #: Done clients whose turn has not come: (result, checked update), or None if failed or rejected.
        done: dict[int, tuple[ClientResult, ClientUpdate] | None] = {}
        turn = 0
        while (item := self.results.get()) is not _END:
            if isinstance(item, _Failed):
                done[item.client_id] = None
            else:
                try:
                    result: ClientResult = ray.get(item)
                except ray.exceptions.RayError as error:
                    log.failures[item.hex()] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                    continue
                update = owner._checked(result.update, log)
                done[result.update.client_id] = None if update is None else (result, update)
            while turn < len(self.clients) and self.clients[turn] in done:
                yield from self._take(done.pop(self.clients[turn]))
                turn += 1
        if self._abandoned:
            raise RuntimeError("round abandoned")
        # Waiting behind a client that never reported (its result could not be read): in order.
        order = {client: position for position, client in enumerate(self.clients)}
        for client in sorted(done, key=lambda client: order.get(client, len(order))):
            yield from self._take(done[client])
        needed = owner.spec.reliability.min_clients_per_round
        survivors = len(log.client_seconds)
        if survivors < needed:
            raise TooFewClients(
                f"{survivors} client(s) survived, fewer than reliability.min_clients_per_round={needed}; "
                f"failures: {log.failures}"
            )

    def _take(self, entry: tuple[ClientResult, ClientUpdate] | None) -> Iterator[ClientUpdate]:
        if entry is not None:
            result, update = entry
            self.owner._record_result(result, self.log)
            yield update
