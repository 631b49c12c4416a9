"""MLflow: one experiment per spec name, one run per execution, metrics in batches.

Single ``log_metric`` calls against sqlite cost tens of milliseconds each, so every
round goes out as one ``log_batch``.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

#: MLflow refuses parameter values longer than this.
MAX_PARAM_CHARS = 6000
#: Seconds to wait for a tracking server's health check before giving up.
SERVER_CHECK_TIMEOUT_S = 5.0
#: MLflow takes at most this many params in one log_batch call.
PARAMS_PER_BATCH = 100
#: The experiment tag by which the MLflow UI (3.x) picks its view, and fedray's value: the
#: classic runs-and-metrics view of model development, not the GenAI (traces) one.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Databases MLflow can track in, by URI scheme (SQLAlchemy's, with an optional +driver).
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
#: Every tracking URI scheme fedray accepts.
TRACKING_SCHEMES = (
    *DATABASE_SCHEMES,
    *(f"{database}+{driver}" for database, driver in (("postgresql", "psycopg2"), ("mysql", "pymysql"))),
    "http",
    "https",
    "databricks",
)


#: Where run directories, and the sqlite store beside them, go unless told otherwise.
DEFAULT_RUNS_ROOT = Path("runs")


def default_tracking_uri(runs_root: Path = DEFAULT_RUNS_ROOT) -> str:
    """The sqlite store beside a run's directory (``runs/mlflow.db``)."""
    return f"sqlite:///{(runs_root / 'mlflow.db').resolve()}"


def check_tracking_uri(uri: str) -> None:
    """Fail within seconds, with one sentence naming what to change, if ``uri`` cannot
    serve as the run's MLflow store: an unsupported scheme, a sqlite file whose folder
    does not exist (MLflow would create it silently), a server that does not answer."""
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        raise ValueError(
            f"tracking URI {uri!r} is a path, and MLflow 3 tracks runs in a database; "
            "use --tracking-uri sqlite:///PATH/mlflow.db (or an http(s):// MLflow server)"
        )
    if scheme not in TRACKING_SCHEMES:
        raise ValueError(
            f"tracking URI {uri!r} has the unsupported scheme {scheme!r}; use sqlite:///PATH/mlflow.db, "
            f"an http(s):// MLflow server, or a database URI ({', '.join(DATABASE_SCHEMES)})"
        )
    if scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise ValueError(
                f"the folder {folder} of tracking URI {uri!r} does not exist; create it or fix --tracking-uri"
            )
    if scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVER_CHECK_TIMEOUT_S):
            return
    except (urllib.error.URLError, OSError) as error:
        raise ConnectionError(
            f"the MLflow server at {uri} does not answer ({error}); start it, fix --tracking-uri, "
            "or leave --tracking-uri out to track in a local sqlite file"
        ) from None


class Tracker:
    """Writes one fedray run into MLflow."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self._client = MlflowClient(uri)

    @classmethod
    def start(
        cls, uri: str, experiment: str, *, artifact_root: Path, run_name: str, params: Mapping[str, Any], tags: dict
    ) -> Tracker:
        client = MlflowClient(uri)
        run = client.create_run(_experiment_id(client, experiment, artifact_root), run_name=run_name, tags=tags)
        tracker = cls(uri, run.info.run_id)
        tracker.log_params(params)
        return tracker

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(key, _param_text(value)) for key, value in params.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[start : start + PARAMS_PER_BATCH])

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if isinstance(value, int | float) and math.isfinite(value)
        ]
        if batch:
            self._client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


def _experiment_id(client: MlflowClient, name: str, artifact_root: Path) -> str:
    """The id of experiment ``name``, created if missing (also when another run creates it at the same moment)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND_TAG not in found.tags:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    # An explicit artifact root: MLflow's default (./mlruns) lands wherever the driver
    # happens to run, e.g. in Ray's temporary working dir.
    location = None if client.tracking_uri.startswith("http") else artifact_root.resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException as error:
        # Runs of one spec started together (a sweep's cells, parallel job submissions) race to create it.
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MAX_PARAM_CHARS]
