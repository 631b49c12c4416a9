"""What a run leaves behind and shows: ``metrics.jsonl``, the exported adapter, the
method's figures, MLflow artifacts, the progress bar and the closing summary."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedray.config import Spec
from fedray.methods import Heatmap
from fedray.models import Base
from fedray.tracking.store import Tracker

#: One line of metrics per round.
METRICS_FILE = "metrics.jsonl"
#: Files and folders of a run directory that go to MLflow as artifacts (figures are added).
ARTIFACTS = ("spec.yaml", "partition.json", METRICS_FILE, "adapter")


@dataclass
class RunSummary:
    """What a finished run leaves behind."""

    #: The run directory: a local folder, or the remote run directory (its URI when printed).
    run_dir: Path | Any
    tracking_uri: str
    run_id: str
    experiment: str
    final_metrics: dict[str, float] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    worker_builds: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ui_command(self) -> str:
        if self.tracking_uri.startswith("http"):
            return f"open {self.tracking_uri}"
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"

    def lines(self) -> list[str]:
        """The summary a person reads: final metrics, where the run is, how to open it."""
        final = ", ".join(f"{k}={v:.4f}" for k, v in self.final_metrics.items())
        return [
            f"final: {final}",
            f"run directory: {self.run_dir}",
            f"MLflow run id: {self.run_id} (experiment {self.experiment})",
            f"open the MLflow UI: {self.ui_command}",
        ]

    def as_json(self) -> dict[str, Any]:
        """The summary a script reads."""
        return {
            "final_metrics": self.final_metrics,
            "run_dir": str(self.run_dir),
            "run_id": self.run_id,
            "experiment": self.experiment,
            "tracking_uri": self.tracking_uri,
            "ui_command": self.ui_command,
        }


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a round's record, for MLflow."""
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float) and k != "round"}


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with (run_dir / METRICS_FILE).open("a") as metrics_file:
        metrics_file.write(json.dumps(record) + "\n")


def restore_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Make ``metrics.jsonl`` end at the checkpointed round ``record``.

    The line of that round is written after its checkpoint, so a kill may have left it
    missing or cut off halfway: the checkpoint's own copy of the record replaces it.
    """
    path = run_dir / METRICS_FILE
    lines = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break  # the line the kill cut off: only ever the last
        if entry["round"] < record["round"]:
            lines.append(line)
    path.write_text("".join(line + "\n" for line in [*lines, json.dumps(record)]))


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The evaluation metrics of the run's last round."""
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    last = json.loads(lines[-1])
    return {k: v for k, v in last.items() if k.startswith("eval_")}


def export(
    run_dir: Path,
    state: tuple[dict, dict | None],
    heatmaps: dict[str, Heatmap],
    base: Base,
    spec: Spec,
    tracker: Tracker,
) -> None:
    """Write the final adapter (``state = (global_delta, head)``) and the method's figures; log them as artifacts."""
    from fedray.driver.figures import draw_heatmap
    from fedray.export import export_adapter

    global_delta, head = state
    # The SVDs of the export run while other work may hold every core (a sweep's other
    # cells, the next job): LAPACK on more threads than it gets cores slows 10-40x there.
    with torch_threads(spec.resources.aggregator_threads):
        info = export_adapter(
            run_dir / "adapter",
            base_model=base.model,
            global_delta=global_delta,
            head=head,
            scale=spec.scale,
            max_rank=spec.max_rank,
            source=spec.model,
            model_spec=base.spec,
        )
    tracker.log_metrics(spec.rounds - 1, {"adapter_dropped_fraction": info.dropped_fraction})
    figures = []
    for stem, heatmap in heatmaps.items():
        draw_heatmap(heatmap, run_dir / f"{stem}.png")
        figures.append(f"{stem}.png")
    for name in (*ARTIFACTS, *figures):
        path = run_dir / name
        if path.exists():
            tracker.log_artifact(path, "adapter" if name == "adapter" else None)


class RoundProgress:
    """A run's progress on ``console``: a live bar on a terminal, and elsewhere (a log file,
    ``ray job submit``, CI) one plain line per round. Lines are never wrapped, so paths
    and commands stay whole when copied."""

    def __init__(self, console: Console, *, rounds: int, first_round: int, metric_name: str) -> None:
        self.console = console
        self.rounds = rounds
        self.metric_name = metric_name
        self._bar: Progress | None = None
        if console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]fedray"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=console,
            )
            self._task = self._bar.add_task("rounds", total=rounds, completed=first_round, info="")

    def __enter__(self) -> RoundProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def show(self, info: str) -> None:
        """What the round in flight is doing (the bar only)."""
        if self._bar is not None:
            self._bar.update(self._task, info=info)

    def round_done(self, record: dict[str, Any]) -> None:
        value = record.get(self.metric_name)
        if self._bar is not None:
            self._bar.update(self._task, advance=1, info=f"{self.metric_name}={value:.3f}" if value is not None else "")
            return
        line = (
            f"round {record['round'] + 1}/{self.rounds}: {record['clients_ok']:.0f} clients ok, "
            f"{record['clients_failed']:.0f} failed"
        )
        if value is not None:
            line += f", {self.metric_name}={value:.4f}"
        self.console.print(f"{line}, {record['round_s']:.1f} s", soft_wrap=True, markup=False, highlight=False)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block's torch math on ``count`` threads, then go back to what it was."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
