"""`ray job submit` against a real local Ray head, as a cluster user would run fedray."""

from __future__ import annotations

import subprocess
import time

from local_cluster import BIN, REPO, local_cluster
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient

#: Seconds a tiny one-round job may take end to end (start-up included).
JOB_TIMEOUT_S = 300


def test_ray_job_submit_runs_a_fedray_job(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    with local_cluster([2], dashboard=True) as cluster:
        submit = [
            str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO),
            "--", "fedray", "run", "jobs/quickstart.yaml", "name=submitted", "rounds=1", "num_clients=2",
            "clients_per_round=2", "partition=iid", "partition_options={}", "dataset_options.max_examples=200",
            "train.local_steps=1", "train.batch_size=4", "train.max_seq_len=16", "eval.max_examples=8",
            "--tracking-uri", tracking_uri, "--run-dir", str(run_dir), "--quiet",
        ]  # fmt: skip
        started = time.monotonic()
        done = subprocess.run(submit, env=cluster.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=REPO)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (job,) = JobSubmissionClient(cluster.dashboard_url).list_jobs()
        assert job.status == JobStatus.SUCCEEDED
        assert time.monotonic() - started < JOB_TIMEOUT_S

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("submitted")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    assert "eval_accuracy" in mlflow_run.data.metrics
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "workers.json").is_file()
