"""The aggregation actor: owns the method state, streams client results into it, logs.

Client results reach the actor as ObjectRefs; it pulls each one as it finishes
(``ray.wait``) and feeds it straight into the method's streaming ``aggregate``, so
neither it nor the driver ever holds a whole round of updates.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from fedray.client import ClientResult
from fedray.config import Spec
from fedray.methods import ClientInit, ClientUpdate, create_method
from fedray.tracking import Tracker


@dataclass
class _RoundLog:
    """What a round's stream saw besides the updates themselves."""

    client_seconds: list[float] = field(default_factory=list)
    weighted_loss: float = 0.0
    examples: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    head_sum: dict[str, torch.Tensor] | None = None
    #: Fed-PLoRA, last round: per client, {module j: its trained factors, flattened}.
    modules: list[dict[int, torch.Tensor]] = field(default_factory=list)


@ray.remote(num_cpus=0)
class Aggregator:
    def __init__(
        self,
        spec: Spec,
        shapes: Mapping[str, tuple[int, int]],
        head: Mapping[str, torch.Tensor] | None,
        tracking_uri: str,
        run_id: str,
    ) -> None:
        # The actor shares cores with client tasks: extra BLAS threads would spin, not help.
        torch.set_num_threads(spec.resources.aggregator_threads)
        self.spec = spec
        self.method = create_method(
            spec.method, shapes, spec.max_rank, scale=spec.scale, seed=spec.seed, **spec.method_options
        )
        self.head = dict(head) if head else None
        self.tracker = Tracker(tracking_uri, run_id)
        self.inits: dict[int, ClientInit] = {}
        self.workers: dict[str, dict[str, Any]] = {}
        self.last_modules: list[dict[int, torch.Tensor]] = []

    def client_init(self, client_id: int, rank: int) -> ClientInit:
        init = self.method.client_init(client_id, rank)
        self.inits[client_id] = init
        return init

    def global_head(self) -> dict[str, torch.Tensor] | None:
        return self.head

    def global_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        return self.method.global_delta(), self.head

    def run_round(self, round_index: int, result_box: list, collect_modules: bool) -> dict[str, float]:
        """Aggregate the round's client results (``result_box[0]``: their ObjectRefs) and log it."""
        log = _RoundLog()
        stats = self.method.aggregate(self._updates(result_box[0], log, collect_modules))
        if log.head_sum is not None:
            self.head = {name: total / log.examples for name, total in log.head_sum.items()}
        if collect_modules:
            self.last_modules = log.modules
        self.inits.clear()
        metrics = {
            "train_loss": log.weighted_loss / log.examples,
            "init_noise": stats.init_noise,
            "init_noise_rel": stats.init_noise_rel,
            "agg_noise": stats.agg_noise,
            "agg_noise_rel": stats.agg_noise_rel,
            "bytes_up": float(stats.bytes_up),
            "bytes_down": float(stats.bytes_down),
            "client_s_p50": statistics.median(log.client_seconds),
            "client_s_max": max(log.client_seconds),
            "clients_ok": float(stats.clients_aggregated),
            "clients_failed": float(len(log.failures)),
            "examples": float(stats.num_examples),
        }
        self.tracker.log_metrics(round_index, metrics)
        return metrics | {"failures": dict(log.failures)}

    def log_metrics(self, round_index: int, metrics: Mapping[str, float]) -> None:
        self.tracker.log_metrics(round_index, metrics)

    def module_factors(self) -> list[dict[int, torch.Tensor]]:
        return self.last_modules

    def worker_builds(self) -> dict[str, dict[str, Any]]:
        """Per worker process, how many times it built the base model, and where it ran."""
        return self.workers

    def state_dict(self) -> dict[str, Any]:
        return self.method.state_dict()

    def _updates(self, refs: list, log: _RoundLog, collect_modules: bool) -> Iterator[ClientUpdate]:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                result: ClientResult = ray.get(done[0])
            except ray.exceptions.RayError as error:
                log.failures[done[0].hex()] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                continue
            worker = result.metrics.pop("worker")
            self.workers[f"{worker['node_id']}:{worker['pid']}"] = worker
            n = result.update.num_examples
            log.client_seconds.append(result.metrics["seconds"])
            log.weighted_loss += result.metrics["train_loss"] * n
            log.examples += n
            if result.head is not None:
                if log.head_sum is None:
                    log.head_sum = {name: torch.zeros_like(value) for name, value in result.head.items()}
                for name, value in result.head.items():
                    log.head_sum[name] += n * value
            if collect_modules:
                log.modules.append(self._module_vectors(result.update))
            yield result.update
        if not log.examples:
            raise RuntimeError(f"every client of the round failed: {log.failures}")

    def _module_vectors(self, update: ClientUpdate) -> dict[int, torch.Tensor]:
        modules = self.inits[update.client_id].modules
        vectors: dict[int, list[torch.Tensor]] = {}
        for layer, chosen in modules.items():
            for column, j in enumerate(chosen.tolist()):
                vectors.setdefault(j, []).extend([update.B[layer][:, column], update.A[layer][column]])
        return {j: torch.cat(parts) for j, parts in vectors.items()}
