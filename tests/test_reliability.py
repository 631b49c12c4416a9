"""Reliability: exact resume after a stop, client faults, bad updates, SIGTERM and Ctrl-C, clear errors.

(A SIGKILLed run resumed with --resume-if-exists: ``tests/test_durability.py``, on S3.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from fedray.cli import main
from fedray.config import SpecError, load_spec
from fedray.driver import rounds
from fedray.driver.checkpoint import read_checkpoint
from fedray.driver.lifecycle import RunFailed, resume, run
from fedray.driver.sampling import client_seed, sample_clients
from fedray.methods import method_from_state
from fedray.worker.faults import fault_seed

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "num_clients=4",
    "clients_per_round=2",
    "max_rank=4",
    "ranks=[1,2,4]",
    "partition=iid",
    "partition_options={}",
    "dataset_options.max_examples=300",
    "train.local_steps=2",
    "train.batch_size=8",
    "train.max_seq_len=24",
    "eval.every=1",
    "eval.max_examples=24",
    "resources.num_cpus=0.5",
]
#: Seconds a tiny CLI run may take before the test gives up on it.
RUN_TIMEOUT_S = 240


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedray.cli", "run", *args, "--quiet"]


def _global_delta(run_dir: Path, method: str) -> dict[str, torch.Tensor]:
    state = read_checkpoint(run_dir).method_state
    assert state["meta"]["method"] == method
    return method_from_state(state).global_delta()


def _history(tracking_uri: str, run_id: str, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri).get_metric_history(run_id, name))


def _wait_for_round(run_dir: Path, round_index: int, process: subprocess.Popen) -> None:
    latest = run_dir / "checkpoint" / "latest.json"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if latest.exists() and json.loads(latest.read_text())["round"] >= round_index:
            return
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.2)
    raise AssertionError(f"round {round_index} never checkpointed")


def _assert_same_ending(whole: Path, resumed: Path, method: str, tracking_uri: str) -> None:
    """The resumed run ends where the uninterrupted one does: global delta, MLflow history, metrics.jsonl."""
    expected, got = _global_delta(whole, method), _global_delta(resumed, method)
    for layer, delta in expected.items():
        assert float((delta - got[layer]).abs().max()) <= 1e-6
    run_ids = [read_checkpoint(path).info["run_id"] for path in (whole, resumed)]
    for name in ("eval_accuracy", "eval_loss", "clients_ok", "init_noise"):
        first, second = (_history(tracking_uri, run_id, name) for run_id in run_ids)
        assert [step for step, _ in second] == [0, 1], name  # no round missing, none twice
        assert np.allclose([v for _, v in first], [v for _, v in second], atol=1e-6), name
    assert MlflowClient(tracking_uri).get_run(run_ids[1]).info.status == "FINISHED"
    lines = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1]
    reference = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    for line, same in zip(lines, reference, strict=True):
        assert line["clients"] == same["clients"]
        assert line["eval_accuracy"] == pytest.approx(same["eval_accuracy"], abs=1e-6)


def stop_after_checkpoint(monkeypatch, cut_metrics: bool = False) -> None:
    """Make a run stop (KeyboardInterrupt) right after round 0's checkpoint, where a kill
    does the most harm; ``cut_metrics`` also leaves metrics.jsonl cut off as a kill would."""
    write_checkpoint = rounds.write_checkpoint

    def checkpoint_then_stop(run_dir, round_index, *args):
        write_checkpoint(run_dir, round_index, *args)
        if round_index == 0:
            if cut_metrics:
                (run_dir / "metrics.jsonl").write_text('{"round": 0, "clie')  # the line the kill cut off
            raise KeyboardInterrupt

    monkeypatch.setattr(rounds, "write_checkpoint", checkpoint_then_stop)


@pytest.mark.parametrize("server", [[], ["server.optimizer=fedadam", "server.lr=0.05"]], ids=["fedavg", "fedadam"])
def test_a_stop_right_after_a_checkpoint_resumes_to_the_same_end(
    ray_session, tmp_path, tracking_uri, monkeypatch, server, reference_run
):
    """HLoRA, whose state is the SVD re-split, stopped where a kill does the most harm; also
    under a server optimizer, whose moments must come back from the checkpoint exactly.

    Round 0 is checkpointed but neither logged to MLflow nor written whole to metrics.jsonl.
    """
    name = f"resume-hlora-{'-'.join(server) or 'fedavg'}"
    spec = load_spec("jobs/quickstart.yaml", [*TINY, "rounds=2", "method=hlora", f"name={name}", *server])
    broken = tmp_path / "broken"
    whole = reference_run("hlora", 2) if not server else tmp_path / "whole"
    if server:  # the server optimizer's run has no shared reference
        run(spec, run_dir=whole, tracking_uri=tracking_uri, progress=False)

    stop_after_checkpoint(monkeypatch, cut_metrics=True)
    with pytest.raises(KeyboardInterrupt):
        run(spec, run_dir=broken, tracking_uri=tracking_uri, progress=False)
    monkeypatch.undo()
    run_id = read_checkpoint(broken).info["run_id"]
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "KILLED"
    assert _history(tracking_uri, run_id, "clients_ok") == []

    resume(broken, progress=False)
    _assert_same_ending(whole, broken, "hlora", tracking_uri)
    ends = [read_checkpoint(path) for path in (whole, broken)]
    for layer, delta in _global_delta(whole, "hlora").items():
        assert torch.equal(delta, _global_delta(broken, "hlora")[layer])  # bit-exact
    for name, value in ends[0].head.items():
        assert torch.equal(value, ends[1].head[name])
    if server:
        moments = [end.server_state["tensors"] for end in ends]
        assert moments[0].keys() == moments[1].keys() and len(moments[0]) > 0
        assert all(torch.equal(moments[0][key], moments[1][key]) for key in moments[0])
        assert ends[1].server_state["meta"]["steps"] == 2


def test_resume_refuses_a_changed_spec_and_extends_rounds_when_allowed(ray_session, tmp_path, tracking_uri):
    spec = load_spec("jobs/quickstart.yaml", [*TINY, "rounds=1", "name=extend"])
    summary = run(spec, run_dir=tmp_path / "run", tracking_uri=tracking_uri, progress=False)
    with pytest.raises(SpecError, match=r"changed spec \(train.lr\).*cannot change"):
        resume(summary.run_dir, ["train.lr=0.1"], allow_spec_change=True, progress=False)
    with pytest.raises(SpecError, match=r"changed spec \(rounds\): pass --allow-spec-change"):
        resume(summary.run_dir, ["rounds=2"], progress=False)
    longer = resume(summary.run_dir, ["rounds=2"], allow_spec_change=True, progress=False)
    assert longer.run_id == summary.run_id
    assert [step for step, _ in _history(tracking_uri, summary.run_id, "clients_ok")] == [0, 1]


def expected_faults(spec, rounds: int) -> list[dict[str, int]]:
    """Per round, how many of the sampled clients the seeded fault draws hit, by kind."""
    faults = spec.faults
    edges = np.cumsum([faults.raise_prob, faults.kill_prob, faults.delay_prob, faults.corrupt_prob])
    kinds = ["raise", "kill", "delay", "corrupt"]
    expected = []
    for round_index in range(rounds):
        counts = dict.fromkeys(kinds, 0)
        for client in sample_clients(spec, round_index, 0):
            draw = float(np.random.default_rng(fault_seed(client_seed(spec, round_index, client), 0)).random())
            hit = int(np.searchsorted(edges, draw, side="right"))
            if hit < len(kinds):
                counts[kinds[hit]] += 1
        expected.append(counts)
    return expected


def test_injected_faults_are_survived_and_counted(ray_session, tmp_path, tracking_uri):
    spec = load_spec(
        "jobs/quickstart.yaml",
        [
            *TINY,
            "name=faults",
            "rounds=2",
            "num_clients=8",
            "clients_per_round=6",
            "seed=69",  # every kind of fault, one timeout to wait out
            "faults.raise_prob=0.1",
            "faults.kill_prob=0.1",
            "faults.delay_prob=0.05",
            "faults.delay_s=90",
            "faults.corrupt_prob=0.05",
            "reliability.client_retries=0",
            "reliability.client_timeout_s=10",  # the clock starts as the task runs (a base build included)
            "resources.num_cpus=1",
        ],
    )
    expected = expected_faults(spec, 2)
    kinds = {kind: sum(counts[kind] for counts in expected) for kind in expected[0]}
    assert min(kinds.values()) >= 1 and all(sum(c.values()) < 6 for c in expected), expected  # the seed's faults
    summary = run(spec, run_dir=tmp_path / "run", tracking_uri=tracking_uri, progress=False)

    failed = [value for _, value in _history(tracking_uri, summary.run_id, "clients_failed")]
    ok = [value for _, value in _history(tracking_uri, summary.run_id, "clients_ok")]
    assert failed == [float(sum(counts.values())) for counts in expected]
    assert ok == [6.0 - f for f in failed]
    for record, counts in zip(summary.rounds, expected, strict=True):
        reasons = list(record["failures"].values())
        assert sum("rejected" in r and "NaN" in r for r in reasons) == counts["corrupt"]
        assert sum("timed out" in r for r in reasons) == counts["delay"]
    for delta in _global_delta(summary.run_dir, "fedplora").values():
        assert bool(torch.isfinite(delta).all())


def test_too_few_survivors_stop_with_a_valid_checkpoint(ray_session, tmp_path, tracking_uri):
    spec = load_spec(
        "jobs/quickstart.yaml",
        [*TINY, "name=hopeless", "rounds=2", "reliability.max_update_norm=1e-9", "reliability.round_attempts=2"],
    )
    with pytest.raises(RunFailed, match=r"round 1 failed 2 times .*max_update_norm.*fedray run --resume"):
        run(spec, run_dir=tmp_path / "run", tracking_uri=tracking_uri, progress=False)
    assert not (tmp_path / "run" / "checkpoint" / "latest.json").exists()
    clipped = load_spec(
        "jobs/quickstart.yaml",
        [*TINY, "name=clipped", "rounds=1", "reliability.max_update_norm=1e-3", "reliability.on_large_update=clip"],
    )
    summary = run(clipped, run_dir=tmp_path / "clipped", tracking_uri=tracking_uri, progress=False)
    assert summary.rounds[0]["updates_clipped"] == 2.0
    norm = sum(float(d.square().sum()) for d in _global_delta(summary.run_dir, "fedplora").values()) ** 0.5
    assert norm <= 1e-3 * (1 + 1e-4)


def test_a_stop_notice_and_ctrl_c_mark_the_run_killed_and_resume_finishes_it(
    ray_session, tmp_path, tracking_uri, monkeypatch, capsys
):
    """SIGTERM (a spot instance's stop notice, `kill`, `ray job stop`) to a command that
    started its own Ray, which replaces Python's SIGTERM handler; then Ctrl-C (SIGINT) to
    the resumed run; each leaves a valid checkpoint and the MLflow run KILLED."""
    run_dir = tmp_path / "run"
    command = _cli("jobs/quickstart.yaml", *TINY, "rounds=3", "name=interrupted", "--run-dir", str(run_dir),
                   "--tracking-uri", tracking_uri)  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    _wait_for_round(run_dir, 0, process)
    process.send_signal(signal.SIGTERM)
    returncode, stderr = process.wait(timeout=120), process.stderr.read()
    assert returncode == 130, stderr[-3000:]
    assert f"continue with `fedray run --resume {run_dir}`" in stderr
    run_id = read_checkpoint(run_dir).info["run_id"]
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "KILLED"

    # Resumed in this session's Ray, and stopped by a real SIGINT right after round 1's checkpoint.
    # (A shell that starts the suite in the background leaves SIGINT ignored: restore the default.)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    write_checkpoint = rounds.write_checkpoint

    def checkpoint_then_ctrl_c(run_dir, round_index, *args):
        write_checkpoint(run_dir, round_index, *args)
        if round_index == 1:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(rounds, "write_checkpoint", checkpoint_then_ctrl_c)
    try:
        assert main(["run", "--resume", str(run_dir), "--quiet"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "the MLflow run is marked KILLED" in capsys.readouterr().err
    assert read_checkpoint(run_dir).info["round"] == 1
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "KILLED"
    monkeypatch.undo()

    resume(run_dir, progress=False)
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FINISHED"
    assert [step for step, _ in _history(tracking_uri, run_id, "clients_ok")] == [0, 1, 2]


def test_unreachable_ray_address_fails_fast(tmp_path):
    started = time.monotonic()
    done = subprocess.run(
        _cli("jobs/quickstart.yaml", *TINY, "--address", "127.0.0.1:9", "--run-dir", str(tmp_path / "run"),
             "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"),
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot join the Ray cluster at '127.0.0.1:9'" in done.stderr
    assert time.monotonic() - started < 60
