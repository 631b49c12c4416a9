"""Live metrics: what one round adds to each Prometheus series (Ray's metric classes faked;
tests/test_dashboards.py scrapes the real ones)."""

from __future__ import annotations

import pytest

from fedray.tracking import live_metrics


class Recorder:
    """Stands in for Ray's Gauge and Histogram: keeps what the run records."""

    def __init__(self, name, description="", boundaries=None, tag_keys=()):
        self.name, self.tag_keys, self.boundaries = name, tag_keys, boundaries
        self.values: list[float] = []
        self.tags = None

    def set_default_tags(self, tags):
        self.tags = tags

    def set(self, value):
        self.values.append(value)

    observe = set


@pytest.fixture
def live(monkeypatch):
    for name in ("Gauge", "Histogram"):
        monkeypatch.setattr(live_metrics, name, Recorder)
    return live_metrics.LiveMetrics("run-1", "fedplora")


ROUND = {"clients_ok": 3.0, "clients_failed": 0.0, "bytes_up": 1200.0, "bytes_down": 2400.0}


def _totals(live) -> list:
    return [live.rounds, live.clients_ok, live.clients_failed, live.bytes_up, live.bytes_down]


def test_every_total_is_published_at_zero_from_the_start_with_the_runs_tags(live):
    for total in _totals(live):
        assert total._gauge.tags == {"run": "run-1", "method": "fedplora"}
        assert total._gauge.values == [0.0], total._gauge.name  # present before the first round ends
        assert total._gauge.name.endswith("_total")
    assert live.client_seconds.boundaries == live_metrics.CLIENT_SECONDS_BUCKETS
    assert live.client_seconds.tags == live.eval_metric.tags == {"run": "run-1", "method": "fedplora"}


def test_a_round_adds_its_clients_bytes_and_seconds(live):
    live.record_round(ROUND, [1.5, 2.0, 7.0])
    live.record_round(ROUND | {"clients_ok": 2.0, "clients_failed": 1.0}, [3.0, 4.0])
    live.record_eval(0.75)
    assert live.rounds._gauge.values == [0.0, 1.0, 2.0]
    assert live.clients_ok._gauge.values == [0.0, 3.0, 5.0]
    assert live.clients_failed._gauge.values == [0.0, 1.0]  # a round without failures sets nothing
    assert (live.bytes_up.value, live.bytes_down.value) == (2400.0, 4800.0)
    assert live.client_seconds.values == [1.5, 2.0, 7.0, 3.0, 4.0]
    assert live.eval_metric.values == [0.75]
