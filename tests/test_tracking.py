"""MLflow tracking: runs of one spec share its experiment, however they start."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from fedray.tracking.store import Tracker


def test_runs_of_one_new_spec_started_together_share_its_experiment(tracking_uri, tmp_path, monkeypatch):
    lookup = MlflowClient.get_experiment_by_name
    lookups = []

    def another_run_creates_it_meanwhile(client, name):
        lookups.append(name)
        if len(lookups) == 1:
            # The other run creates the experiment between this run's lookup and its create.
            MlflowClient(client.tracking_uri).create_experiment(name)
            return None
        return lookup(client, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", another_run_creates_it_meanwhile)
    started = [
        Tracker.start(tracking_uri, "started-together", artifact_root=tmp_path, run_name=name, params={}, tags={})
        for name in ("first", "second")
    ]
    monkeypatch.undo()
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("started-together")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["first", "second"]
    assert {run.info.run_id for run in runs} == {tracker.run_id for tracker in started}
