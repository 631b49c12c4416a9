"""``fedray sweep`` through the real Ray path: cells under one MLflow parent, resumable
without loss, a changed grid refused, a kill survived."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from fedray.cli import main
from fedray.config import SpecError
from fedray.driver.grid import load_grid
from fedray.driver.sweep import PARENT_TAG, RESULTS_FILE, sweep
from fedray.tracking.stats import t_interval

JOBS = Path(__file__).resolve().parent.parent / "jobs"
#: Seconds the killed sweep test waits for its first cell.
FIRST_CELL_TIMEOUT_S = 240


def _tiny_grid(tmp_path: Path, name: str, rounds: int = 1, seeds: tuple[int, ...] = (0, 1)) -> Path:
    grid = {
        "name": name,
        "base": str(JOBS / "quickstart.yaml"),
        "overrides": {
            "rounds": rounds,
            "num_clients": 4,
            "clients_per_round": 2,
            "partition": "iid",
            "partition_options": {},
            "dataset_options.max_examples": 200,
            "train.local_steps": 1,
            "train.batch_size": 4,
            "train.max_seq_len": 16,
            "resources.num_cpus": 0.5,
        },
        "axes": {"train.lr": [0.001]},
        "variants": {"fedplora": {"method": "fedplora"}, "fedit-r4": {"method": "fedit", "ranks": [4], "max_rank": 4}},
        "seeds": list(seeds),
        "reference": "fedit-r4",
        "eval_max_examples": 32,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def _children(client: MlflowClient, parent_run_id: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def test_a_grid_runs_as_child_runs_of_one_parent_with_honest_statistics(ray_session, tracking_uri, tmp_path):
    grid = load_grid(_tiny_grid(tmp_path, "sweep-test"))
    with pytest.raises(SpecError, match=r"--only \*/fedit-r8/\* matches no cell of grid sweep-test"):
        sweep(grid, sweep_dir=tmp_path / "sweep", only=["*/fedit-*/*", "*/fedit-r8/*"])
    with pytest.raises(SpecError, match=r"--again .*fedplora/s0: not among the cells --only selects"):
        sweep(grid, sweep_dir=tmp_path / "sweep", only=["*/fedit-*/*"], again=[grid.cells[0].id])
    # Some cells first (--only), then the rest: the second call runs only what is left.
    first = sweep(grid, sweep_dir=tmp_path / "sweep", tracking_uri=tracking_uri, only=["*/fedit-*/*"])
    assert sorted(first.results) == sorted(cell.id for cell in grid.cells if cell.variant == "fedit-r4")
    summary = sweep(grid, sweep_dir=tmp_path / "sweep", tracking_uri=tracking_uri, max_concurrent=2)
    assert all(summary.results[cell_id] == record for cell_id, record in first.results.items())

    client = MlflowClient(tracking_uri)
    children = _children(client, summary.parent_run_id)
    assert sorted(run.data.tags["cell"] for run in children) == sorted(cell.id for cell in grid.cells)
    for run in children:
        cell = grid.cell(run.data.tags["cell"])
        assert run.info.status == "FINISHED" and run.info.run_name == cell.id
        assert run.data.tags["variant"] == cell.variant and run.data.tags["seed"] == str(cell.seed)
        assert run.data.tags["axis.train.lr"] == "0.001" and run.data.tags["sweep"] == "sweep-test"
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert "summary.md" in {artifact.path for artifact in client.list_artifacts(summary.parent_run_id)}

    # The records and the table agree with the cells' own metrics.jsonl.
    finals = {}
    for cell in grid.cells:
        record = summary.results[cell.id]
        lines = (summary.sweep_dir / "cells" / cell.id / "metrics.jsonl").read_text().splitlines()
        curve = [json.loads(line)["eval_accuracy"] for line in lines]
        assert record["final"] == curve[-1] and record["best"] == max(curve)
        assert record["eval_examples"] == 32 and 0.0 < record["majority_rate"] < 1.0
        finals.setdefault(cell.variant, []).append(record["final"])
    header = next(line for line in summary.table.splitlines() if line.startswith("| variant"))
    assert header.split(" | ")[2:5] == ["final", "best over rounds", "mean of last 3"]
    fedplora_row = next(line for line in summary.table.splitlines() if line.startswith("| fedplora"))
    assert f"| {t_interval(finals['fedplora']).text()} |" in fedplora_row

    # Started again: nothing runs; with --again one cell runs afresh, still one MLflow run per cell.
    assert sweep(grid, sweep_dir=tmp_path / "sweep").results == summary.results
    again = grid.cells[0].id
    rerun = sweep(grid, sweep_dir=tmp_path / "sweep", again=[again])
    assert rerun.results[again]["run_id"] != summary.results[again]["run_id"]
    assert all(rerun.results[c.id] == summary.results[c.id] for c in grid.cells[1:])
    cells = [run.data.tags["cell"] for run in _children(client, summary.parent_run_id)]
    assert sorted(cells) == sorted(cell.id for cell in grid.cells)

    # A changed grid is refused, naming what changed.
    with pytest.raises(SpecError, match=r"has changed since it began \(changed: .*fedit-r4/s0"):
        sweep(load_grid(_tiny_grid(tmp_path, "sweep-test"), ["train.local_steps=2"]), sweep_dir=tmp_path / "sweep")


def test_a_bad_cell_stops_the_sweep_before_any_cell_runs(tmp_path):
    grid = yaml.safe_load(_tiny_grid(tmp_path, "bad").read_text())
    grid["variants"]["too-wide"] = {"ranks": [32]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(grid))
    command = [sys.executable, "-m", "fedray.cli", "sweep", str(tmp_path / "bad.yaml"), "--sweep-dir", "sweep"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and "cell train.lr=0.001/too-wide/s0: invalid spec" in done.stderr
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "runs").exists()


def test_a_killed_sweep_goes_on_without_rerunning_or_duplicating(ray_session, tmp_path, capsys):
    path = _tiny_grid(tmp_path, "killed", rounds=2, seeds=(0,))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    arguments = ["sweep", str(path), "--sweep-dir", str(tmp_path / "sweep"), "--tracking-uri", tracking_uri,
                 "--max-concurrent", "1"]  # fmt: skip
    results = tmp_path / "sweep" / RESULTS_FILE
    command = [sys.executable, "-m", "fedray.cli", *arguments]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + FIRST_CELL_TIMEOUT_S
    while not (results.is_file() and results.read_text().strip()) and time.monotonic() < deadline:
        assert first.poll() is None, first.stderr.read().decode()[-3000:]
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    (done_before,) = [json.loads(line) for line in results.read_text().splitlines()]

    # Started again (here in this session's Ray).
    assert main(arguments) == 0
    assert "1 of 2 cells done, 1 to run" in capsys.readouterr().err
    records = {json.loads(line)["cell"]: json.loads(line) for line in results.read_text().splitlines()}
    assert len(records) == 2 and records[done_before["cell"]] == done_before
    state = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    children = _children(MlflowClient(tracking_uri), state["parent_run_id"])
    assert sorted(run.data.tags["cell"] for run in children) == sorted(records)
    assert {run.info.run_id for run in children} == {record["run_id"] for record in records.values()}


def test_cells_at_once_count_gpus_too_and_every_cell_resources_are_checked(tmp_path, monkeypatch):
    import ray

    from fedray.driver import cluster
    from fedray.driver.sweep import GAP_FILLING_CELLS, _capacity

    grid = load_grid(_tiny_grid(tmp_path, "capacity"), ["resources.num_cpus=1"])
    cpu_cell = grid.cells[0]
    gpu_cell = load_grid(_tiny_grid(tmp_path, "capacity"), ["resources.num_cpus=1", "resources.num_gpus=0.5"]).cells[0]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0})
    # Two clients a round: 8 rounds fit in the CPUs, but one only in the GPU.
    assert _capacity(cpu_cell, None) == 8 + GAP_FILLING_CELLS
    assert _capacity(gpu_cell, None) == 1 + GAP_FILLING_CELLS
    assert _capacity(gpu_cell, 1) == 1

    # A local start checks what every cell asks, not only the first cell.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **options: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster.connect_ray(None, cpu_cell.spec, cpu_cell.spec)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0})
    with pytest.raises(ValueError, match=r"resources.num_gpus=0.5 but this machine offers 0 GPU"):
        cluster.connect_ray(None, cpu_cell.spec, gpu_cell.spec)
