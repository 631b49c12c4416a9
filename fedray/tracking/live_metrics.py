"""fedray's live metrics, exported through Ray's metrics service (Prometheus format).

Ray prefixes application metrics with ``ray_`` when it exports them; the Grafana
dashboard in ``dashboards/grafana/fedray.json`` queries the exported names.
"""

from __future__ import annotations

from collections.abc import Mapping

from ray.util.metrics import Counter, Gauge, Histogram

#: Labels of every fedray metric: which run and which method it belongs to.
TAG_KEYS = ("run", "method")
#: Histogram buckets of client task seconds (CPU demo clients to large GPU clients).
CLIENT_SECONDS_BUCKETS = [0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800]


class LiveMetrics:
    """The metrics of one run; created inside the aggregation actor."""

    def __init__(self, run: str, method: str) -> None:
        self._tags = {"run": run, "method": method}
        self.rounds = Counter("fedray_rounds_completed", "Federated rounds completed", tag_keys=TAG_KEYS)
        self.clients_ok = Counter("fedray_clients_ok", "Client updates aggregated", tag_keys=TAG_KEYS)
        self.clients_failed = Counter("fedray_clients_failed", "Client tasks failed or rejected", tag_keys=TAG_KEYS)
        self.client_seconds = Histogram(
            "fedray_client_seconds", "Seconds per client task", boundaries=CLIENT_SECONDS_BUCKETS, tag_keys=TAG_KEYS
        )
        self.bytes_up = Counter("fedray_bytes_up", "Factor bytes sent by clients", tag_keys=TAG_KEYS)
        self.bytes_down = Counter("fedray_bytes_down", "Factor and fold bytes sent to clients", tag_keys=TAG_KEYS)
        self.eval_metric = Gauge(
            "fedray_eval_metric", "Latest evaluation metric of the global model", tag_keys=TAG_KEYS
        )
        metrics = (self.rounds, self.clients_ok, self.clients_failed, self.client_seconds)
        for metric in (*metrics, self.bytes_up, self.bytes_down, self.eval_metric):
            metric.set_default_tags(self._tags)
        # Publish every counter at 0 from the start: a counter that first appears at its
        # first increment hides that increase from rate(), and clients_failed would not
        # exist until a client fails. Counter.inc() refuses 0, hence the private call.
        for counter in (self.rounds, self.clients_ok, self.clients_failed, self.bytes_up, self.bytes_down):
            counter._record(0.0)

    def record_round(self, metrics: Mapping[str, float], client_seconds: list[float]) -> None:
        """Count a finished round and observe each of its clients' seconds."""
        self.rounds.inc()
        if metrics["clients_ok"]:
            self.clients_ok.inc(metrics["clients_ok"])
        if metrics["clients_failed"]:
            self.clients_failed.inc(metrics["clients_failed"])
        for seconds in client_seconds:
            self.client_seconds.observe(seconds)
        for counter, name in ((self.bytes_up, "bytes_up"), (self.bytes_down, "bytes_down")):
            if metrics[name]:
                counter.inc(metrics[name])

    def record_eval(self, value: float) -> None:
        self.eval_metric.set(value)
