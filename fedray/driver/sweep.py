"""``fedray sweep``: every cell of a grid as a fedray run, several at once on one Ray cluster.

Cells run as threads of this driver over its one Ray connection: they share its workers
and their warm workbenches. As many run at once as the cluster's CPUs hold (each cell's
round asks for ``clients_per_round x resources.num_cpus``), plus one that fills the gaps a
round leaves (its last clients, the evaluation); ``max_concurrent`` caps it. The count is
read again before each cell starts, so an autoscaling cluster that grows runs more.

The sweep directory is the record: ``sweep.json`` (the grid's cells and their spec
digests, the MLflow parent run), ``cells/<cell>/`` (each cell's run directory) and
``results.jsonl`` (one line per finished cell, written once it is whole). A sweep killed
at any point and started again with the same grid skips finished cells and resumes the
others from their last checkpoints; a changed grid is refused, naming the cells that
changed. In MLflow a sweep is one parent run, each cell a child run tagged with its
sweep, cell, variant, seed and axis values.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from rich.console import Console

from fedray import inputs
from fedray.config import SpecError
from fedray.driver.checkpoint import atomic_write
from fedray.driver.cluster import check_services, connect_ray, tasks_that_fit
from fedray.driver.grid import Cell, Grid, grid_digest
from fedray.driver.lifecycle import resume, run, saved_checkpoint
from fedray.driver.outputs import METRICS_FILE
from fedray.driver.storage import RemoteRunDir, is_remote
from fedray.tracking.comparison import comparison_table, score_record
from fedray.tracking.names import EVAL_METRICS
from fedray.tracking.store import DEFAULT_RUNS_ROOT, Tracker, default_tracking_uri

SWEEP_FILE = "sweep.json"
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.md"
CELLS_DIR = "cells"
#: Where sweeps go unless --sweep-dir names one: runs/sweeps/<name>.
SWEEPS_DIR = "sweeps"
#: Seconds between two status lines while cells run.
STATUS_EVERY_S = 30.0
#: Cells that run beside those the cluster's CPUs hold, to fill a round's idle gaps.
GAP_FILLING_CELLS = 1
#: The MLflow tag that makes a run the child of another (the UI nests it).
PARENT_TAG = "mlflow.parentRunId"


@dataclass
class SweepSummary:
    """What a finished sweep leaves behind."""

    #: The sweep folder, or the remote one (its URI when printed).
    sweep_dir: Path | RemoteRunDir
    tracking_uri: str
    parent_run_id: str
    #: Cell id -> its record (the line of ``results.jsonl``).
    results: dict[str, dict[str, Any]]
    table: str


def sweep(
    grid: Grid,
    *,
    sweep_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    max_concurrent: int | None = None,
    again: Sequence[str] = (),
    only: Sequence[str] = (),
    console: Console | None = None,
) -> SweepSummary:
    """Run every cell of ``grid`` that has no result yet; ``again`` names cells to run afresh.

    ``only`` (shell patterns such as ``*/fedit-*/*``) restricts this call to the cells whose
    ids match one of them; the others keep their results and are run by a later call."""
    console = console or Console(stderr=True, soft_wrap=True)
    if max_concurrent is not None and max_concurrent < 1:
        raise SpecError(f"--max-concurrent must be at least 1, got {max_concurrent}")
    remote = None
    if sweep_dir is not None and is_remote(sweep_dir):
        # Staged like a remote run directory; each cell is a remote run directory of its own.
        remote = RemoteRunDir(str(sweep_dir))
        runs_root = DEFAULT_RUNS_ROOT
        sweep_dir = remote.stage_files([SWEEP_FILE, RESULTS_FILE])
    else:
        runs_root = DEFAULT_RUNS_ROOT if sweep_dir is None else Path(sweep_dir).parent
        sweep_dir = Path(sweep_dir) if sweep_dir is not None else DEFAULT_RUNS_ROOT / SWEEPS_DIR / grid.name
    for cell_id in again:
        grid.cell(cell_id)  # one clear error for a name the grid does not have
    chosen = _chosen(grid, only)
    outside = [cell_id for cell_id in again if cell_id not in {cell.id for cell in chosen}]
    if outside:
        raise SpecError(f"--again {' '.join(outside)}: not among the cells --only selects; widen --only or drop it")
    state = _read_state(sweep_dir, grid)
    if tracking_uri is None:
        tracking_uri = state["tracking_uri"] if state else default_tracking_uri(runs_root)
        if not state:
            runs_root.mkdir(parents=True, exist_ok=True)
    elif state and state["tracking_uri"] != tracking_uri:
        raise SpecError(f"sweep {sweep_dir} tracks in {state['tracking_uri']}; leave --tracking-uri out or match it")
    check_services(tracking_uri, address)
    results = _read_results(sweep_dir / RESULTS_FILE)
    todo = [cell for cell in chosen if cell.id not in results or cell.id in again]
    if todo:
        connect_ray(address, *(cell.spec for cell in todo))  # every cell's resources checked
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not state:
        state = _start_state(sweep_dir, grid, tracking_uri, runs_root)
        if remote is not None:
            remote.put(SWEEP_FILE)
    client = MlflowClient(tracking_uri)
    client.update_run(state["parent_run_id"], status="RUNNING")
    for cell_id in again:
        _forget(sweep_dir, client, state["parent_run_id"], cell_id, remote)
        results.pop(cell_id, None)
    _write_results(sweep_dir / RESULTS_FILE, results)  # drops a torn last line too
    if remote is not None:
        remote.put(RESULTS_FILE)
    where = remote or sweep_dir
    done = sum(cell.id in results for cell in grid.cells)
    console.print(f"sweep {grid.name}: {done} of {len(grid.cells)} cells done, {len(todo)} to run"
                  f"{' (--only)' if only else ''}; MLflow parent run {state['parent_run_id']} in {where}")  # fmt: skip
    status = "FAILED"
    try:
        _run_cells(
            todo, grid, sweep_dir, tracking_uri, state["parent_run_id"], max_concurrent, results, console, remote
        )
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(state["parent_run_id"], status=status)
    table = comparison_table(
        (results[cell.id] for cell in grid.cells if cell.id in results),
        variants=grid.variants,
        reference=grid.reference,
    )
    (sweep_dir / SUMMARY_FILE).write_text(f"# Sweep {grid.name}\n\n{table}\n")
    if remote is not None:
        remote.put(SUMMARY_FILE)
    Tracker(tracking_uri, state["parent_run_id"]).log_artifact(sweep_dir / SUMMARY_FILE)
    return SweepSummary(remote or sweep_dir, tracking_uri, state["parent_run_id"], results, table)


def _chosen(grid: Grid, only: Sequence[str]) -> list[Cell]:
    """The cells of ``grid`` whose ids match a pattern of ``only`` (all of them if it is empty)."""
    if not only:
        return list(grid.cells)
    unmatched = [p for p in only if not any(fnmatch.fnmatchcase(cell.id, p) for cell in grid.cells)]
    if unmatched:
        example = grid.cells[0].id
        raise SpecError(f"--only {' '.join(unmatched)} matches no cell of grid {grid.name} (cells read like {example})")
    return [cell for cell in grid.cells if any(fnmatch.fnmatchcase(cell.id, p) for p in only)]


def _run_cells(
    todo: list[Cell],
    grid: Grid,
    sweep_dir: Path,
    tracking_uri: str,
    parent_run_id: str,
    max_concurrent: int | None,
    results: dict[str, dict[str, Any]],
    console: Console,
    remote: RemoteRunDir | None = None,
) -> None:
    waiting = list(todo)
    running: dict[Future, Cell] = {}
    failure: BaseException | None = None
    pool = ThreadPoolExecutor(max_workers=len(todo) or 1, thread_name_prefix="cell")
    try:
        while waiting or running:
            while waiting and failure is None and len(running) < _capacity(waiting[0], max_concurrent):
                cell = waiting.pop(0)
                running[pool.submit(_run_cell, cell, grid, sweep_dir, tracking_uri, parent_run_id, remote)] = cell
            if not running:
                break
            console.print(_status_line(grid, results, running.values(), sweep_dir, remote), markup=False)
            done, _ = wait(running, timeout=STATUS_EVERY_S, return_when=FIRST_COMPLETED)
            for future in done:
                cell = running.pop(future)
                try:
                    record = future.result()
                except Exception as error:  # the cells in flight finish and are recorded first
                    console.print(f"sweep: cell {cell.id} failed: {error}", markup=False)
                    failure = failure or error
                    continue
                results[cell.id] = record
                with (sweep_dir / RESULTS_FILE).open("a") as out:
                    out.write(json.dumps(record) + "\n")
                if remote is not None:
                    remote.put(RESULTS_FILE)
                console.print(f"sweep: {cell.id}: final {record['metric']} {record['final']:.4f}", markup=False)
    finally:
        # Interrupted, do not wait for the cells in flight (hours): they resume from their
        # checkpoints next time.
        pool.shutdown(wait=not running, cancel_futures=True)
    if failure is not None:
        raise failure


def _capacity(cell: Cell, max_concurrent: int | None) -> int:
    """How many cells like ``cell`` run at once on the cluster as it is now: as many rounds
    of its clients as its CPUs (and GPUs, where they ask for some) hold."""
    held = max(1, tasks_that_fit(cell.spec) // cell.spec.sampled_clients) + GAP_FILLING_CELLS
    return held if max_concurrent is None else min(held, max_concurrent)


def _run_cell(
    cell: Cell, grid: Grid, sweep_dir: Path, tracking_uri: str, parent_run_id: str, remote: RemoteRunDir | None
) -> dict[str, Any]:
    """Run (or resume) one cell; its record."""
    location, run_dir = _cell_dirs(sweep_dir, remote, cell.id)
    if saved_checkpoint(location) is not None:
        resume(location, progress=False)
    else:
        # Cut off before its first checkpoint: start over, without a second MLflow run.
        _delete_child_runs(MlflowClient(tracking_uri), parent_run_id, cell.id)
        _clear_cell(sweep_dir, remote, cell.id)
        tags = {PARENT_TAG: parent_run_id, "sweep": grid.name, "cell": cell.id, "variant": cell.variant}
        tags |= {f"axis.{key}": json.dumps(value) for key, value in cell.axes.items()}
        run(cell.spec, run_dir=location, tracking_uri=tracking_uri, progress=False, run_name=cell.id, tags=tags)
    return cell_record(cell, run_dir)


def cell_record(cell: Cell, run_dir: Path) -> dict[str, Any]:
    """A finished cell's line of ``results.jsonl``: its curve, scores and majority-class rate."""
    rounds = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    split = inputs.dataset_split(cell.spec)
    eval_set = inputs.eval_set(cell.spec, split)
    metric = EVAL_METRICS[split.train.task]
    curve = [[record["round"] + 1, record[metric]] for record in rounds if metric in record]
    majority = eval_set.majority_share() if split.train.task == "classification" else None
    scores = score_record(cell.setting, cell.variant, cell.seed, metric, [value for _, value in curve], majority)
    return (
        {"cell": cell.id, "axes": dict(cell.axes)}
        | scores
        | {
            "curve": curve,
            "run_id": saved_checkpoint(run_dir)["run_id"],
            "eval_examples": len(eval_set),
        }
    )


def _status_line(grid: Grid, results: dict, running, sweep_dir: Path, remote: RemoteRunDir | None) -> str:
    in_flight = []
    for cell in running:
        metrics = _cell_dirs(sweep_dir, remote, cell.id)[1] / METRICS_FILE
        done = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        in_flight.append(f"{cell.id} round {done}/{cell.spec.rounds}")
    left = len(grid.cells) - len(results) - len(in_flight)
    running_text = f"{len(in_flight)} running ({', '.join(in_flight)})" if in_flight else "none running"
    return f"sweep: {len(results)}/{len(grid.cells)} done, {running_text}, {left} left"


def _read_state(sweep_dir: Path, grid: Grid) -> dict[str, Any] | None:
    """The sweep begun in ``sweep_dir``, refused if its grid has changed since; None if none."""
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        if sweep_dir.is_dir() and any(sweep_dir.iterdir()):
            raise FileExistsError(f"{sweep_dir} holds files but no sweep; choose another --sweep-dir")
        return None
    state = json.loads(path.read_text())
    before, now = state["cells"], grid.digests()
    if before != now:
        changed = sorted(cell for cell in set(before) & set(now) if before[cell] != now[cell])
        parts = [
            f"{name}: {', '.join(cells[:3])}{' ...' if len(cells) > 3 else ''}"
            for name, cells in (
                ("changed", changed),
                ("added", sorted(set(now) - set(before))),
                ("removed", sorted(set(before) - set(now))),
            )
            if cells
        ]
        raise SpecError(
            f"the grid of sweep {sweep_dir} has changed since it began ({'; '.join(parts)}); restore the grid "
            "and its overrides, or start a new sweep with another --sweep-dir"
        )
    return state


def _start_state(sweep_dir: Path, grid: Grid, tracking_uri: str, runs_root: Path) -> dict[str, Any]:
    params = {
        "grid": str(grid.path),
        "cells": len(grid.cells),
        "variants": list(grid.variants),
        "seeds": list(grid.seeds),
        "reference": grid.reference,
    }
    parent = Tracker.start(
        tracking_uri,
        grid.name,
        artifact_root=runs_root / "mlartifacts",
        run_name=f"sweep-{grid.name}",
        params=params,
        tags={"sweep": grid.name, "grid_digest": grid_digest(grid.digests())},
    )
    state = {"name": grid.name, "tracking_uri": tracking_uri, "parent_run_id": parent.run_id, "cells": grid.digests()}
    atomic_write(sweep_dir / SWEEP_FILE, lambda path: path.write_text(json.dumps(state, indent=1)))
    return state


def _read_results(path: Path) -> dict[str, dict[str, Any]]:
    """Cell id -> its record; a torn last line (a kill mid-write) is dropped: that cell runs again."""
    results = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        results[record["cell"]] = record
    return results


def _write_results(path: Path, results: dict[str, dict[str, Any]]) -> None:
    text = "".join(json.dumps(record) + "\n" for record in results.values())
    atomic_write(path, lambda partial: partial.write_text(text))


def _forget(
    sweep_dir: Path, client: MlflowClient, parent_run_id: str, cell_id: str, remote: RemoteRunDir | None
) -> None:
    """Drop a cell's run directory and MLflow runs, so that it runs afresh (``--again``)."""
    _clear_cell(sweep_dir, remote, cell_id)
    _delete_child_runs(client, parent_run_id, cell_id, finished_too=True)


def _cell_dirs(sweep_dir: Path, remote: RemoteRunDir | None, cell_id: str) -> tuple[str | Path, Path]:
    """Where cell ``cell_id`` runs (its run directory, or its URI on the sweep's store) and
    the local folder that holds its files (the same folder, or its staging folder)."""
    if remote is None:
        folder = sweep_dir / CELLS_DIR / cell_id
        return folder, folder
    cell_remote = remote.child(f"{CELLS_DIR}/{cell_id}")
    return cell_remote.uri, cell_remote.local


def _clear_cell(sweep_dir: Path, remote: RemoteRunDir | None, cell_id: str) -> None:
    """Delete what a cell left, locally and on the sweep's store."""
    shutil.rmtree(_cell_dirs(sweep_dir, remote, cell_id)[1], ignore_errors=True)
    if remote is not None:
        remote.child(f"{CELLS_DIR}/{cell_id}").clear()


def _delete_child_runs(client: MlflowClient, parent_run_id: str, cell_id: str, *, finished_too: bool = False) -> None:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.cell = '{cell_id}'"
    for child in client.search_runs([experiment_id], filter_string=query):
        if finished_too or child.info.status != "FINISHED":
            client.delete_run(child.info.run_id)
