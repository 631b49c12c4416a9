"""fedray's live metrics, exported through Ray's metrics service (Prometheus format).

Ray prefixes application metrics with ``ray_`` when it exports them; the Grafana
dashboard in ``dashboards/grafana/fedray.json`` queries the exported names.

The run's running totals (rounds, clients, bytes) are gauges that the actor sets, not Ray
counters: a counter can only be increased by more than zero, so it would first appear at
its first increment, which hides that increase from ``rate()``, and ``clients_failed``
would not exist until a client fails. A gauge is published at 0 from the start. The
names keep Prometheus' ``_total`` ending of running totals, and ``rate()`` reads them as
it reads counters (a resumed run's new actor starts again from 0, which ``rate()`` takes
for a counter reset).
"""

from __future__ import annotations

from collections.abc import Mapping

from ray.util.metrics import Gauge, Histogram

#: Labels of every fedray metric: which run and which method it belongs to.
TAG_KEYS = ("run", "method")
#: Histogram buckets of client task seconds (CPU demo clients to large GPU clients).
CLIENT_SECONDS_BUCKETS = [0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800]


class RunningTotal:
    """A total that only grows, published as a gauge from 0 on."""

    def __init__(self, name: str, description: str, tags: Mapping[str, str]) -> None:
        self.value = 0.0
        self._gauge = Gauge(name, description, tag_keys=TAG_KEYS)
        self._gauge.set_default_tags(dict(tags))
        self._gauge.set(self.value)

    def add(self, amount: float) -> None:
        if amount:
            self.value += amount
            self._gauge.set(self.value)


class LiveMetrics:
    """The metrics of one run; created inside the aggregation actor."""

    def __init__(self, run: str, method: str) -> None:
        tags = {"run": run, "method": method}
        self.rounds = RunningTotal("fedray_rounds_completed_total", "Federated rounds completed", tags)
        self.clients_ok = RunningTotal("fedray_clients_ok_total", "Client updates aggregated", tags)
        self.clients_failed = RunningTotal("fedray_clients_failed_total", "Client tasks failed or rejected", tags)
        self.bytes_up = RunningTotal("fedray_bytes_up_total", "Factor bytes sent by clients", tags)
        self.bytes_down = RunningTotal("fedray_bytes_down_total", "Factor and fold bytes sent to clients", tags)
        self.client_seconds = Histogram(
            "fedray_client_seconds", "Seconds per client task", boundaries=CLIENT_SECONDS_BUCKETS, tag_keys=TAG_KEYS
        )
        self.client_seconds.set_default_tags(tags)
        self.eval_metric = Gauge(
            "fedray_eval_metric", "Latest evaluation metric of the global model", tag_keys=TAG_KEYS
        )
        self.eval_metric.set_default_tags(tags)

    def record_round(self, metrics: Mapping[str, float], client_seconds: list[float]) -> None:
        """Count a finished round and observe each of its clients' seconds."""
        self.rounds.add(1.0)
        for total, name in (
            (self.clients_ok, "clients_ok"),
            (self.clients_failed, "clients_failed"),
            (self.bytes_up, "bytes_up"),
            (self.bytes_down, "bytes_down"),
        ):
            total.add(metrics[name])
        for seconds in client_seconds:
            self.client_seconds.observe(seconds)

    def record_eval(self, value: float) -> None:
        self.eval_metric.set(value)
