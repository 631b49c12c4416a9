"""A fedray job submitted with `ray job submit` to a local Ray head with metrics export, as
a cluster user runs it: the job succeeds, and the Grafana dashboard queries metrics that the
live run really exports.

The nodes' metrics endpoints are found through Ray's Prometheus service-discovery file, as
dashboards/prometheus.yml does, and scraped over plain HTTP. When Debian's `prometheus` is
installed, a real Prometheus scrapes the run too and answers every panel's query.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
import yaml
from local_cluster import BIN, REPO, LocalCluster, free_port, local_cluster
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families
from ray.job_submission import JobStatus, JobSubmissionClient
from test_multinode import RUN_TIMEOUT_S, TINY_RUN

DASHBOARD = REPO / "dashboards" / "grafana" / "fedray.json"
PROMETHEUS_YML = REPO / "dashboards" / "prometheus.yml"
#: Where Ray's head writes its service-discovery file by default (and cluster.yaml uses).
RAY_SERVICE_DISCOVERY_FILE = "/tmp/ray/prom_metrics_service_discovery.json"
#: Seconds Ray's metrics agents may take to publish a metric once it is recorded.
PUBLISH_TIMEOUT_S = 60
#: Seconds between two scrapes of the test's own scraper.
SCRAPE_EVERY_S = 1
#: Scrape interval of the test's Prometheus (the shipped config uses 10 s).
PROMETHEUS_SCRAPE_INTERVAL = "1s"
#: Metrics that only nodes with NVIDIA GPUs export.
GPU_ONLY = re.compile(r"^ray_node_(gpus|gram)_")
#: PromQL functions, aggregations and keywords the dashboard may use (anything else is a metric name).
PROMQL_WORDS = frozenset(
    {
        *("sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev", "stdvar", "group"),
        *("rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "label_replace"),
        *("label_join", "vector", "scalar", "clamp", "clamp_min", "clamp_max", "abs", "ceil", "floor", "round"),
        *("time", "timestamp", "absent", "absent_over_time", "avg_over_time", "max_over_time", "min_over_time"),
        *("sum_over_time", "last_over_time", "and", "or", "unless", "offset", "bool", "inf", "nan"),
    }
)


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panel_queries(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _variable_queries(dashboard: dict) -> list[str]:
    return [variable["definition"] for variable in dashboard["templating"]["list"] if variable["type"] == "query"]


def metric_names(promql: str) -> set[str]:
    """Metric names in a PromQL expression (Grafana variables allowed)."""
    promql = re.sub(r"\$\{?\w+\}?", "", promql)  # Grafana variables: $run, ${datasource}, $__rate_interval
    promql = re.sub(r'"(?:[^"\\]|\\.)*"', "", promql)  # string literals
    promql = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", promql)  # label matchers, ranges
    promql = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", promql)
    promql = re.sub(r"^label_values\(([^,)]+)(?:,[^)]*)?\)$", r"\1", promql.strip())
    words = set(re.findall(r"(?<![\w.])[A-Za-z_:][\w:]*", promql))
    return {word for word in words if word.lower() not in PROMQL_WORDS}


def _referenced_names() -> set[str]:
    dashboard = _dashboard()
    return set().union(*(metric_names(query) for query in _panel_queries(dashboard) + _variable_queries(dashboard)))


# --- the files alone


def test_dashboard_queries_name_only_ray_metrics_and_filter_fedray_ones_by_run():
    dashboard = _dashboard()
    names = _referenced_names()
    assert {name for name in names if not name.startswith("ray_")} == set(), "unknown PromQL word or metric name"
    assert any(name.startswith("ray_fedray_") for name in names) and any(n.startswith("ray_node_") for n in names)
    for query in _panel_queries(dashboard):
        if "ray_fedray_" in query:
            assert query.count("ray_fedray_") == query.count('run=~"$run"'), query
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert metric_names(variables["run"]["definition"]) <= names
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_metric_names_reads_promql():
    query = 'histogram_quantile(0.95, sum by (run, le) (rate(ray_fedray_client_seconds_bucket{run=~"$run"}[5m])))'
    assert metric_names(query) == {"ray_fedray_client_seconds_bucket"}
    assert metric_names("sum by (ip) (ray_node_gram_used + ray_node_gram_available) * 1024 * 1e3") == {
        "ray_node_gram_used",
        "ray_node_gram_available",
    }
    assert metric_names("label_values(ray_fedray_rounds_completed_total, run)") == {"ray_fedray_rounds_completed_total"}


def test_prometheus_config_discovers_nodes_through_rays_file():
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = config["scrape_configs"]
    assert [sd["files"] for sd in job["file_sd_configs"]] == [[RAY_SERVICE_DISCOVERY_FILE]]
    promtool = shutil.which("promtool")
    if promtool:
        checked = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_gpu_panels_query_metrics_that_ray_defines():
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    gpu_names = {name for name in _referenced_names() if GPU_ONLY.match(name)}
    assert gpu_names, "the dashboard has GPU panels"
    assert {name.removeprefix("ray_") for name in gpu_names} <= set(METRICS_GAUGES)


# --- a live run


class Scraper:
    """Scrapes every target in the head's service-discovery file, as Prometheus would.

    Keeps the latest value of every series it has seen: Ray drops a gauge from its
    endpoint once nobody has refreshed it for two report intervals (a finished run's
    eval metric, a node gauge between two reports), so one scrape may miss a series.
    """

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        #: {sample name (ray_x_total, ray_x_bucket, ...): {labels: latest value}}
        self.samples: dict[str, dict[frozenset, float]] = {}

    def targets(self) -> list[str]:
        if not self.cluster.service_discovery_file.is_file():
            return []
        groups = json.loads(self.cluster.service_discovery_file.read_text())
        return [target for group in groups for target in group["targets"]]

    def scrape(self) -> None:
        for target in self.targets():
            try:
                with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as response:
                    text = response.read().decode()
            except (urllib.error.URLError, OSError):
                continue  # a component between restarts; the next scrape retries it
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    self.samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value

    def run_values(self, name: str, run_id: str, **labels: str) -> list[float]:
        """The values of ``name`` for fedray run ``run_id`` (and ``labels``), one per series."""
        wanted = {("run", run_id), *labels.items()}
        return [value for series, value in self.samples.get(name, {}).items() if wanted <= series]

    def run_value(self, name: str, run_id: str, **labels: str) -> float:
        values = self.run_values(name, run_id, **labels)
        assert len(values) == 1, (name, values)
        return values[0]


@dataclass
class LiveRun:
    #: The MLflow run id, fedray's ``run`` label.
    run_id: str
    #: The run's metrics.jsonl, one dict per round.
    rounds: list[dict]
    scraper: Scraper
    #: Unix time the job started, for range queries.
    started_s: float
    prometheus_url: str | None
    run_dir: Path
    #: The submitted job's status once the run ended.
    job_status: str
    tracking_uri: str


def _gpus_here() -> bool:
    return shutil.which("nvidia-smi") is not None


def _expected_names() -> set[str]:
    """The dashboard's metric names that this machine can export."""
    return {name for name in _referenced_names() if _gpus_here() or not GPU_ONLY.match(name)}


@pytest.fixture(scope="module")
def live_run(tmp_path_factory, tracking_uri) -> Iterator[LiveRun]:
    """A two-round run submitted as a Ray job to a local head with metrics export, scraped
    during and after the run."""
    workdir = tmp_path_factory.mktemp("dashboards")
    run_dir = workdir / "run"
    with local_cluster([2], dashboard=True) as cluster:
        scraper = Scraper(cluster)
        _wait_for_node_targets(scraper)
        prometheus = _start_prometheus(cluster, workdir) if shutil.which("prometheus") else None
        try:
            command = [
                str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO),
                "--", "fedray", "run", "jobs/quickstart.yaml", "name=dashboards", *TINY_RUN, "--quiet",
                "--run-dir", str(run_dir), "--tracking-uri", tracking_uri,
            ]  # fmt: skip
            log = workdir / "fedray.log"
            started_s = time.time()
            with log.open("w") as log_file:
                job = subprocess.Popen(command, env=cluster.env, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
                deadline = time.monotonic() + RUN_TIMEOUT_S
                while job.poll() is None and time.monotonic() < deadline:
                    scraper.scrape()
                    time.sleep(SCRAPE_EVERY_S)
                if job.poll() is None:
                    job.kill()
                job.wait()
            assert job.returncode == 0, log.read_text()[-3000:]
            (submitted,) = JobSubmissionClient(cluster.dashboard_url).list_jobs()
            client = MlflowClient(tracking_uri)
            (mlflow_run,) = client.search_runs([client.get_experiment_by_name("dashboards").experiment_id])
            run_id = mlflow_run.info.run_id
            rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            # Ray's agents publish what the run recorded last within a report interval or two.
            deadline = time.monotonic() + PUBLISH_TIMEOUT_S
            while time.monotonic() < deadline:
                scraper.scrape()
                rounds_done = scraper.run_values("ray_fedray_rounds_completed_total", run_id)
                if _expected_names() <= set(scraper.samples) and rounds_done == [len(rounds)]:
                    break
                time.sleep(SCRAPE_EVERY_S)
            yield LiveRun(
                run_id, rounds, scraper, started_s, prometheus[1] if prometheus else None, run_dir,
                submitted.status, tracking_uri,
            )  # fmt: skip
        finally:
            if prometheus:
                prometheus[0].kill()
                prometheus[0].wait(timeout=30)


def _wait_for_node_targets(scraper: Scraper) -> None:
    """Until the head's service-discovery file lists every node's metrics port."""
    deadline = time.monotonic() + PUBLISH_TIMEOUT_S
    while time.monotonic() < deadline:
        if set(scraper.cluster.metrics_ports) <= {int(target.rpartition(":")[2]) for target in scraper.targets()}:
            return
        time.sleep(1)
    raise AssertionError(f"{scraper.cluster.service_discovery_file} never listed ports {scraper.cluster.metrics_ports}")


def _start_prometheus(cluster: LocalCluster, workdir: Path) -> tuple[subprocess.Popen, str]:
    """A real Prometheus on the shipped config, pointed at this cluster's service-discovery file."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"]["scrape_interval"] = PROMETHEUS_SCRAPE_INTERVAL
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(cluster.service_discovery_file)]
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    command = [
        shutil.which("prometheus"), f"--config.file={config_file}", f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address={address}", "--log.level=warn",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"http://{address}"


def test_ray_job_submit_runs_a_fedray_job(live_run):
    assert live_run.job_status == JobStatus.SUCCEEDED
    mlflow_run = MlflowClient(live_run.tracking_uri).get_run(live_run.run_id)
    assert mlflow_run.info.status == "FINISHED" and "eval_accuracy" in mlflow_run.data.metrics
    for output in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "workers.json"):
        assert (live_run.run_dir / output).is_file(), output


def test_every_metric_the_dashboard_queries_is_exported(live_run):
    exported = set(live_run.scraper.samples)
    assert _expected_names() - exported == set()
    # ... and every fedray metric the run exports has a panel.
    exported_fedray = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exported if name.startswith("ray_fedray_")}
    queried_fedray = {re.sub(r"_bucket$", "", name) for name in _referenced_names() if name.startswith("ray_fedray_")}
    assert exported_fedray == queried_fedray


def test_exported_fedray_metrics_match_the_runs_own_record(live_run):
    value, run_id, rounds = live_run.scraper.run_value, live_run.run_id, live_run.rounds
    clients_ok = sum(r["clients_ok"] for r in rounds)
    assert value("ray_fedray_rounds_completed_total", run_id, method="fedplora") == len(rounds)
    assert value("ray_fedray_clients_ok_total", run_id) == clients_ok
    assert value("ray_fedray_client_seconds_count", run_id) == clients_ok
    assert value("ray_fedray_client_seconds_bucket", run_id, le="+Inf") == clients_ok
    assert value("ray_fedray_bytes_up_total", run_id) == sum(r["bytes_up"] for r in rounds)
    assert value("ray_fedray_bytes_down_total", run_id) == sum(r["bytes_down"] for r in rounds)
    assert value("ray_fedray_eval_metric", run_id) == pytest.approx(rounds[-1]["eval_accuracy"])
    # Every client took at most the slowest one: the first bucket above it holds them all.
    slowest_s = max(r["client_s_max"] for r in rounds)
    buckets = live_run.scraper.samples["ray_fedray_client_seconds_bucket"]
    bounds = sorted(float(le) for series in buckets if ("run", run_id) in series for key, le in series if key == "le")
    first_above = next(le for le in bounds if le >= slowest_s)
    assert value("ray_fedray_client_seconds_bucket", run_id, le=str(first_above)) == clients_ok


def _query_range(live_run: LiveRun, promql: str) -> list[dict]:
    """What Grafana asks for a time-series panel: the query over the run's time range."""
    params = {"query": promql, "start": live_run.started_s - 60, "end": time.time(), "step": "2s"}
    with urllib.request.urlopen(f"{live_run.prometheus_url}/api/v1/query_range?{urlencode(params)}") as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus package is not installed")
def test_prometheus_answers_every_panel_query(live_run):
    grafana_variables = {"$run": live_run.run_id, "$__rate_interval": "1m"}
    queries = {}
    for query in _panel_queries(_dashboard()):
        if metric_names(query) <= _expected_names():
            queries[query] = query
            for variable, value in grafana_variables.items():
                queries[query] = queries[query].replace(variable, value)
    deadline = time.monotonic() + PUBLISH_TIMEOUT_S
    unanswered = dict(queries)
    while unanswered and time.monotonic() < deadline:
        unanswered = {query: promql for query, promql in unanswered.items() if not _query_range(live_run, promql)}
        time.sleep(SCRAPE_EVERY_S)
    assert list(unanswered) == []
