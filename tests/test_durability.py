"""A run survives the loss of one process: the aggregation actor, the driver of a job that
is submitted again (``--resume-if-exists``), or the head node of a run whose directory is
on object storage (a real S3-protocol server on loopback)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from fedray.cli import main
from fedray.config import SpecError, load_spec
from fedray.driver import lifecycle, rounds
from fedray.driver.checkpoint import read_checkpoint
from fedray.driver.grid import load_grid
from fedray.driver.lifecycle import run, run_or_resume
from fedray.driver.storage import RemoteRunDir
from fedray.driver.sweep import sweep
from fedray.methods import method_from_state
from tests.test_reliability import REPO, RUN_TIMEOUT_S, TINY, _cli, _history, stop_after_checkpoint
from tests.test_sweep import _tiny_grid


def _ending(run_dir):
    checkpoint = read_checkpoint(run_dir)
    return method_from_state(checkpoint.method_state).global_delta(), checkpoint.head


def _assert_identical(whole, other, tracking_uri, rounds_done: int):
    (delta_a, head_a), (delta_b, head_b) = _ending(whole), _ending(other)
    assert all(torch.equal(delta_a[layer], delta_b[layer]) for layer in delta_a)
    assert all(torch.equal(head_a[name], head_b[name]) for name in head_a)
    run_ids = [read_checkpoint(path).info["run_id"] for path in (whole, other)]
    for name in ("eval_accuracy", "train_loss", "clients_ok"):
        first, second = (_history(tracking_uri, run_id, name) for run_id in run_ids)
        assert [step for step, _ in second] == list(range(rounds_done)), name  # each round once
        assert [value for _, value in first] == [value for _, value in second], name
    lines = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(rounds_done))


def test_a_killed_aggregation_actor_is_replaced_and_the_run_ends_identically(
    ray_session, tmp_path, tracking_uri, monkeypatch, reference_run
):
    """Killed twice: right after round 0's checkpoint (before the round is logged; it is
    written while round 1 trains), and in round 2 once its clients are sampled, while
    round 1's evaluation is still out."""
    spec = load_spec("jobs/quickstart.yaml", [*TINY, "rounds=3", "method=fedplora", "name=actor-loss"])
    whole, hit = reference_run("fedplora", 3), tmp_path / "hit"

    started, kills = [], []
    start_aggregator, write_checkpoint, run_clients = (
        lifecycle._start_aggregator,
        rounds.write_checkpoint,
        rounds._run_clients,
    )

    def remember(*args):
        started.append(start_aggregator(*args))
        return started[-1]

    def kill_once(where: str) -> None:
        if where not in kills:
            kills.append(where)
            ray.kill(started[-1], no_restart=True)

    def checkpoint_then_kill(run_dir, round_index, *args):
        write_checkpoint(run_dir, round_index, *args)
        if round_index == 0:
            kill_once("after checkpoint 0")

    def kill_then_run(run_context, round_index, *args, **kwargs):
        if round_index == 2:
            kill_once("in round 2")
        return run_clients(run_context, round_index, *args, **kwargs)

    monkeypatch.setattr(lifecycle, "_start_aggregator", remember)
    monkeypatch.setattr(rounds, "write_checkpoint", checkpoint_then_kill)
    monkeypatch.setattr(rounds, "_run_clients", kill_then_run)
    summary = run(spec, run_dir=hit, tracking_uri=tracking_uri, progress=False)

    assert kills == ["after checkpoint 0", "in round 2"] and len(started) == 3
    assert [record["round"] for record in summary.rounds] == [0, 1, 2]
    _assert_identical(whole, hit, tracking_uri, rounds_done=3)
    assert MlflowClient(tracking_uri).get_run(summary.run_id).info.status == "FINISHED"


def test_a_resubmitted_job_continues_its_run(ray_session, tmp_path, tracking_uri, monkeypatch, reference_run):
    spec = load_spec("jobs/quickstart.yaml", [*TINY, "rounds=2", "method=hlora", "name=resubmit"])
    whole, job = reference_run("hlora", 2), tmp_path / "job"

    stop_after_checkpoint(monkeypatch)  # the head node went away right after round 0's checkpoint
    with pytest.raises(KeyboardInterrupt):
        run_or_resume(spec, job, tracking_uri=tracking_uri, progress=False)
    monkeypatch.undo()

    other = load_spec("jobs/quickstart.yaml", [*TINY, "rounds=2", "method=hlora", "name=resubmit", "seed=1"])
    with pytest.raises(SpecError, match="holds a run of another spec"):
        run_or_resume(other, job, tracking_uri=tracking_uri, progress=False)
    summary = run_or_resume(spec, job, tracking_uri=tracking_uri, progress=False)  # the same job, again
    assert summary.run_id == read_checkpoint(job).info["run_id"]
    assert [record["round"] for record in summary.rounds] == [1]
    _assert_identical(whole, job, tracking_uri, rounds_done=2)
    again = run_or_resume(spec, job, tracking_uri=tracking_uri, progress=False)  # a finished run: nothing to do
    assert again.rounds == [] and again.run_id == summary.run_id


def test_an_evaluation_beside_the_next_round_scores_its_own_round(reference_run):
    """Round 0's evaluation runs while round 1 trains (the actor's model has moved on by
    then); it must score round 0's model, as the one-round run's evaluation (nothing after
    it to overlap) does, and land before round 1's record."""
    two, one = (reference_run("hlora", rounds) for rounds in (2, 1))
    records = [[json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()] for path in (two, one)]
    assert [record["round"] for record in records[0]] == [0, 1]
    evaluated = [name for name in records[1][0] if name.startswith("eval_")]
    assert evaluated and all(name in record for record in records[0] for name in evaluated)
    assert {name: records[0][0][name] for name in evaluated} == {name: records[1][0][name] for name in evaluated}
    assert records[0][1]["eval_loss"] != records[0][0]["eval_loss"]  # round 1's model scores otherwise


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-protocol server (moto) on loopback, and the environment that points s3fs at it."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "fedray-test",
        "AWS_SECRET_ACCESS_KEY": "fedray-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("fedray-test")
    yield fs
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def test_a_run_on_s3_killed_and_resumed_ends_like_a_local_run(
    ray_session, tmp_path, tracking_uri, s3_server, reference_run
):
    """SIGKILL after a round, the local staging folder lost too (a new head node), a
    half-uploaded round (objects, no manifest) on the store; the job submitted again with
    --resume-if-exists ignores the half round and ends where an uninterrupted run ends."""
    fs = s3_server
    overrides = [*TINY, "rounds=3", "method=fedplora", "name=s3-run"]
    whole = reference_run("fedplora", 3)

    uri = "s3://fedray-test/runs/killed"
    arguments = ["jobs/quickstart.yaml", *overrides, "--run-dir", uri, "--tracking-uri", tracking_uri]
    process = subprocess.Popen(_cli(*arguments), cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not fs.glob("fedray-test/runs/killed/checkpoint/round-*.json"):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.2)
        fs.invalidate_cache()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    shutil.rmtree(RemoteRunDir(uri).local)

    done = RemoteRunDir(uri).newest_manifest()["round"]
    assert done < 2, "the kill came after the last round"
    fs.pipe_file(f"fedray-test/runs/killed/checkpoint/round-{done + 1:06d}.method.safetensors", b"half-written")
    # The job submitted again, as on a new head node: the same command with --resume-if-exists
    # (here in this session's Ray).
    assert main(["run", *arguments, "--resume-if-exists", "--quiet"]) == 0

    local = tmp_path / "downloaded"
    fs.get("fedray-test/runs/killed", str(local), recursive=True)
    assert RemoteRunDir(uri).newest_manifest()["round"] == 2
    expected, got = (load_file(str(path / "adapter" / "adapter_model.safetensors")) for path in (whole, local))
    assert expected.keys() == got.keys()
    assert max(float((expected[key] - got[key]).abs().max()) for key in expected) <= 1e-6
    lines = [[json.loads(row) for row in (path / "metrics.jsonl").read_text().splitlines()] for path in (whole, local)]
    assert [line["round"] for line in lines[1]] == [0, 1, 2]
    for reference, line in zip(*lines, strict=True):
        assert line["clients"] == reference["clients"]
        assert line["eval_accuracy"] == pytest.approx(reference["eval_accuracy"], abs=1e-6)
        assert line["train_loss"] == pytest.approx(reference["train_loss"], abs=1e-6)


def test_a_missing_filesystem_is_one_error_naming_the_extra():
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ValueError, match=re.escape("pip install 'fedray[gcs]'")):
        RemoteRunDir("gs://bucket/run")


def test_a_sweep_on_s3_keeps_its_record_there_and_goes_on_from_it(ray_session, tmp_path, tracking_uri, s3_server):
    fs = s3_server
    grid_file = _tiny_grid(tmp_path, "s3-sweep")
    grid = yaml.safe_load(grid_file.read_text())
    grid_file.write_text(yaml.safe_dump(grid | {"seeds": [0]}))
    uri = "s3://fedray-test/sweeps/tiny"
    summary = sweep(load_grid(grid_file), sweep_dir=uri, tracking_uri=tracking_uri)
    assert str(summary.sweep_dir) == uri and len(summary.results) == 2
    fs.invalidate_cache()
    lines = fs.cat_file("fedray-test/sweeps/tiny/results.jsonl").decode().splitlines()
    assert sorted(json.loads(line)["cell"] for line in lines) == sorted(summary.results)
    for cell in summary.results:
        assert fs.exists(f"fedray-test/sweeps/tiny/cells/{cell}/adapter/adapter_model.safetensors")
        assert fs.glob(f"fedray-test/sweeps/tiny/cells/{cell}/checkpoint/round-*.json")
    # Another machine (its staging folder gone) goes on from the record on the store: nothing left to run.
    shutil.rmtree(RemoteRunDir(uri).local)
    again = sweep(load_grid(grid_file), sweep_dir=uri)
    assert again.results == summary.results
