"""The ``fedray`` command: exit codes and one-line messages for what a user must change,
before any compute or any file is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedray.cli import EXIT_BAD_INPUT, main
from fedray.config import load_spec
from tests.test_reliability import expected_faults

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def test_cli_refuses_bad_input_with_exit_code_2(capsys, tmp_path):
    assert main(["run", str(JOBS / "quickstart.yaml"), "roundz=3"]) == EXIT_BAD_INPUT
    assert "did you mean 'rounds'" in capsys.readouterr().err
    # Bad names that only the registries know fail before Ray or MLflow start.
    run_dir = tmp_path / "run"
    code = main(["run", str(JOBS / "quickstart.yaml"), "dataset=no_such_data", "--run-dir", str(run_dir), "--quiet"])
    assert code == EXIT_BAD_INPUT and not run_dir.exists()
    assert "no_such_data" in capsys.readouterr().err


def test_run_needs_a_spec_or_a_run_to_resume(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run"])
    assert exit_.value.code == EXIT_BAD_INPUT
    assert "name a spec file (e.g. jobs/quickstart.yaml) or --resume RUN_DIR" in capsys.readouterr().err


def test_resume_of_a_directory_without_a_run_says_what_to_do(capsys, tmp_path):
    assert main(["run", "--resume", str(tmp_path)]) == EXIT_BAD_INPUT
    message = capsys.readouterr().err
    assert message.startswith(f"fedray: {tmp_path} is not a fedray run directory") and message.count("\n") == 1
    # A run directory with its spec but no complete round.
    (tmp_path / "spec.yaml").write_text((JOBS / "quickstart.yaml").read_text())
    assert main(["run", "--resume", str(tmp_path), "--quiet"]) == EXIT_BAD_INPUT
    assert "has no checkpoint (no complete round); start it again without --resume" in capsys.readouterr().err


def test_resume_if_exists_needs_the_directory_to_continue_in(capsys):
    assert main(["run", str(JOBS / "quickstart.yaml"), "--resume-if-exists"]) == EXIT_BAD_INPUT
    assert "--resume-if-exists needs --run-dir" in capsys.readouterr().err


def test_an_existing_run_directory_is_not_overwritten(capsys, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert main(["run", str(JOBS / "quickstart.yaml"), "--run-dir", str(tmp_path), "--quiet"]) == EXIT_BAD_INPUT
    assert "already holds a run; choose a new --run-dir or --resume it" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"


def test_report_without_a_store_exits_2_and_creates_none(capsys, tmp_path):
    store = tmp_path / "mlflow.db"
    assert main(["report", "no-such-experiment", "--tracking-uri", f"sqlite:///{store}"]) == EXIT_BAD_INPUT
    assert f"no MLflow store at {store}; run `fedray run` first" in capsys.readouterr().err
    assert not store.exists()


def test_unreachable_tracking_server_fails_fast(capsys, tmp_path):
    done = _here(
        capsys, "run", str(JOBS / "quickstart.yaml"), "--tracking-uri", "http://127.0.0.1:9",
        "--run-dir", str(tmp_path / "run"), "--quiet",
    )  # fmt: skip
    _one_line_error(done, "the MLflow server at http://127.0.0.1:9 does not answer")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------ a new user's first hour

#: A two-round run small enough for a test.
TINY = [
    "rounds=2",
    "num_clients=4",
    "clients_per_round=2",
    "partition=iid",
    "partition_options={}",
    "dataset_options.max_examples=200",
    "train.local_steps=1",
    "train.batch_size=4",
    "train.max_seq_len=16",
    "eval.every=1",
    "eval.max_examples=16",
    "name=first-hour",
]
#: Four half-CPU clients a round.
FRACTIONAL = ["clients_per_round=4", "resources.num_cpus=0.5"]
#: Seconds an injected stall holds a client while the round's others are done.
STALL_S = 3


def _fedray(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real command, its output not a terminal (as in a log file or under ray job submit)."""
    command = [sys.executable, "-m", "fedray.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _here(capsys, *args: str) -> subprocess.CompletedProcess:
    """The command in this process (seconds saved on imports); a few tests keep the real one."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def _one_line_error(done: subprocess.CompletedProcess, *parts: str) -> None:
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-3000:]
    assert done.stderr.startswith("fedray: ") and done.stderr.count("\n") == 1, done.stderr[-3000:]
    for part in parts:
        assert part in done.stderr, done.stderr


def test_a_run_in_a_log_file_has_a_line_per_round_and_its_summary_on_stdout(tmp_path):
    run_dir = tmp_path / "runs" / "mine"
    # What a start that failed before its first round leaves behind: a plain re-run takes it.
    run_dir.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text("left: over\n")
    (run_dir / "partition.json").write_text("[]")
    tracking_uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    # Four half-CPU clients a round on the local Ray that `fedray run` starts. Ray keeps one
    # idle worker per CPU and kills the rest within a second; a stalled client (an injected
    # delay) leaves the others idle for seconds, and a killed worker would build the base again.
    fractional = [*FRACTIONAL, "faults.delay_prob=0.1", f"faults.delay_s={STALL_S}"]
    spec = load_spec(JOBS / "quickstart.yaml", [*TINY, *fractional])
    stalled = [counts["delay"] for counts in expected_faults(spec, 2)]
    assert 0 < stalled[0] < 4, stalled  # in round 0, before round 1 needs the workers again
    done = _fedray(
        "run", str(JOBS / "quickstart.yaml"), *TINY, *fractional, "--run-dir", str(run_dir), "--tracking-uri",
        tracking_uri,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    rounds = [line for line in done.stderr.splitlines() if line.startswith("round ")]
    assert len(rounds) == 2 and rounds[0].startswith("round 1/2: 4 clients ok, 0 failed, eval_accuracy=")
    assert rounds[1].startswith("round 2/2: ") and rounds[1].endswith(" s")
    # Nothing from the libraries before the first useful line.
    assert done.stderr.startswith("fedray: run "), done.stderr[:2000]
    for noise in ("Loading weights", "Creating initial MLflow database tables", "Token authentication", "Started a"):
        assert noise not in done.stderr
    # The summary is stdout, one line each, the UI command whole.
    lines = done.stdout.splitlines()
    assert lines[0].startswith("final: eval_accuracy=")
    assert f"run directory: {run_dir}" in lines
    assert f"open the MLflow UI: mlflow ui --backend-store-uri {tracking_uri}" in lines
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "spec.yaml").read_text() != "left: over\n"
    # One worker per client that fits, each built its workbench once, in a warm-up task
    # while the driver created the MLflow run.
    workers = json.loads((run_dir / "workers.json").read_text())
    at_once = min(4, int((os.cpu_count() or 1) / 0.5))
    assert len(workers) <= at_once and all(worker["builds"] == 1 for worker in workers.values()), workers
    assert all(worker["warmed"] for worker in workers.values()), workers

    # MLflow: the classic view, the seed as a tag, the effective label, a telling run name.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("first-hour")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.data.tags["seed"] == "0" and mlflow_run.data.params["label"] == "fedplora"
    assert mlflow_run.info.run_name == "fedplora-s0-mine"


def test_quiet_json_prints_only_the_summary(ray_session, tracking_uri, tmp_path, capsys):
    run_dir = tmp_path / "json"
    command = ["run", str(JOBS / "quickstart.yaml"), *TINY, "rounds=1", "resources.num_cpus=0.5"]
    assert main([*command, "--run-dir", str(run_dir), "--tracking-uri", tracking_uri, "--quiet", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "round 1/1" not in err
    summary = json.loads(out)
    assert summary["run_dir"] == str(run_dir) and "eval_accuracy" in summary["final_metrics"]


@pytest.mark.parametrize(
    ("tracking_uri", "message"),
    [
        ("foo://bar", "has the unsupported scheme 'foo'"),
        ("runs/mlflow", "is a path, and MLflow 3 tracks runs in a database; use --tracking-uri sqlite:///"),
        ("sqlite:////typo/dir/x.db", "the folder /typo/dir of tracking URI 'sqlite:////typo/dir/x.db' does not exist"),
    ],
)
def test_a_bad_tracking_uri_is_one_sentence_and_writes_nothing(capsys, monkeypatch, tmp_path, tracking_uri, message):
    monkeypatch.chdir(tmp_path)
    done = _here(capsys, "run", str(JOBS / "quickstart.yaml"), "--run-dir", "run", "--tracking-uri", tracking_uri)
    _one_line_error(done, message)
    assert list(tmp_path.iterdir()) == [] and not Path("/typo").exists()


def test_resources_the_machine_lacks_are_refused_before_anything_is_written(tmp_path):
    done = _fedray(
        "run", str(JOBS / "quickstart.yaml"), *TINY, "resources.num_gpus=1", "--run-dir", "run", cwd=tmp_path
    )
    _one_line_error(done, "resources.num_gpus=1", "lower it or join a larger cluster with --address")
    assert not (tmp_path / "run").exists()


def test_an_unknown_model_says_the_hub_cannot_be_reached(tmp_path):
    done = _fedray("run", str(JOBS / "quickstart.yaml"), "model=org/no-such-model", "--run-dir", "run", cwd=tmp_path)
    _one_line_error(done, "model 'org/no-such-model' is not on this machine and the Hub cannot be reached")
    assert not (tmp_path / "run").exists()


def test_a_spec_typo_fails_before_the_driver_is_imported():
    # The driver pulls in Ray, MLflow and transformers (seconds); a typo needs only the spec.
    check = (
        "import sys; from fedray.cli import main; code = main(['run', 'jobs/quickstart.yaml', 'roundz=3']); "
        "print(code, sorted({'ray', 'mlflow', 'transformers'} & {m.split('.')[0] for m in sys.modules}))"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60, cwd=JOBS.parent)
    assert done.stdout.strip() == f"{EXIT_BAD_INPUT} []", done.stderr[-2000:]


def test_resume_misuse_gets_one_sentence(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    _one_line_error(_here(capsys, "run", "--resume", str(tmp_path)), "is not a fedray run directory")
    misuse = _here(capsys, "run", str(JOBS / "quickstart.yaml"), "--resume", str(tmp_path))
    _one_line_error(misuse, "--resume takes no spec")


def test_partition_options_that_do_not_fit_name_the_fix(capsys):
    _one_line_error(
        _here(capsys, "run", str(JOBS / "quickstart.yaml"), "partition=iid"),
        "partition_options do not fit partition=iid",
        "partition_options={}",
    )
