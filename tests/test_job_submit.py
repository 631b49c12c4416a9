"""`ray job submit` against a real local Ray head, as a cluster user would run fedray."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
#: Seconds a tiny one-round job may take end to end (start-up included).
JOB_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    env = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    gcs_port, dashboard_port = _free_port(), _free_port()
    temp_dir = Path("/tmp") / f"ray-{gcs_port}"  # short: Ray's socket paths have a length limit
    start = [
        str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
        "--num-cpus=2", "--object-store-memory=300000000", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_a_fedray_job(ray_head, tmp_path):
    address, env = ray_head
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
        "--", "fedray", "run", "jobs/quickstart.yaml", "name=submitted", "rounds=1", "num_clients=2",
        "clients_per_round=2", "partition=iid", "partition_options={}", "dataset_options.max_examples=200",
        "train.local_steps=1", "train.batch_size=4", "train.max_seq_len=16", "eval.max_examples=8",
        "--tracking-uri", tracking_uri, "--run-dir", str(run_dir), "--quiet",
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (job,) = JobSubmissionClient(address).list_jobs()
    assert job.status == JobStatus.SUCCEEDED
    assert time.monotonic() - started < JOB_TIMEOUT_S

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("submitted")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    assert "eval_accuracy" in mlflow_run.data.metrics
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
