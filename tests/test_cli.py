"""The ``fedray`` command: exit codes and one-line messages for what a user must change,
before any compute or any file is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedray.cli import EXIT_BAD_INPUT, main

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
    assert message.startswith("fedray: spec file") and "does not exist" in message and message.count("\n") == 1
    # A run directory with its spec but no complete round.
    (tmp_path / "spec.yaml").write_text((JOBS / "quickstart.yaml").read_text())
    assert main(["run", "--resume", str(tmp_path), "--quiet"]) == EXIT_BAD_INPUT
    assert "has no checkpoint (no complete round); start it again without --resume" in capsys.readouterr().err


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


def test_unreachable_tracking_server_fails_fast(tmp_path):
    command = [
        sys.executable, "-m", "fedray.cli", "run", str(JOBS / "quickstart.yaml"),
        "--tracking-uri", "http://127.0.0.1:9", "--run-dir", str(tmp_path / "run"), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_BAD_INPUT
    assert "the MLflow server at http://127.0.0.1:9 does not answer" in done.stderr
    assert not (tmp_path / "run").exists()
