"""``fedray report``: one MLflow experiment's finished runs as plots, a table and one HTML page.

Runs are grouped by method (a run's ``label`` tag, when it has one, names a variant of a
method, such as fedit-r2), and by partition too when the runs differ in it. A group's
curve is the mean over its runs (seeds) at each round, with a band of its 95 % t-interval;
rounds are numbered from 1 (MLflow step 0 is round 1). Everything comes from MLflow; nothing is
recomputed from checkpoints.
"""

from __future__ import annotations

import base64
import html
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fedray.tracking.comparison import comparison_table, history_records
from fedray.tracking.names import EVAL_METRICS, MAJORITY_METRIC
from fedray.tracking.stats import t_interval
from fedray.tracking.store import check_tracking_uri, default_tracking_uri

#: The report goes to this folder / <experiment> unless --out names one.
DEFAULT_REPORTS_ROOT = Path("reports")
#: Runs fetched per search_runs call.
SEARCH_PAGE_SIZE = 1000
#: Group i (in sorted order) has colour i of this map in every plot.
COLOUR_MAP = "tab10"
#: Opacity of the 95 % t-interval band around a group's mean curve.
BAND_ALPHA = 0.2
#: Width of the mean curves, in points.
LINE_WIDTH_PT = 2.0
#: Group i also has line style i and marker i (cycled), so curves that lie on top of each
#: other (several methods at zero noise) stay visible.
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
#: Size of each plot in inches, and its resolution.
FIGURE_SIZE_IN = (6.4, 4.0)
FIGURE_DPI = 110
#: Curves drawn when the runs log them: (metric, title).
OPTIONAL_PLOTS = (
    ("eval_f1_macro", "Macro-F1 of the global model"),
    ("eval_exact_match", "Exact match of the global model's answers"),
    ("eval_loss", "Evaluation loss of the global model"),
    ("train_loss", "Training loss of the clients (data-weighted mean)"),
)
REFERENCE_LABELS = {MAJORITY_METRIC: "majority class"}
#: Bytes in the megabytes the communication plot and table show.
BYTES_PER_MB = 1e6


class ReportError(ValueError):
    """Input the user must change: the experiment name, the tracking URI, unfinished runs."""


@dataclass(frozen=True)
class Plot:
    """One PNG: the per-round sum of ``metrics`` (times ``scale``) for every group."""

    file: str
    title: str
    ylabel: str
    metrics: tuple[str, ...]
    scale: float = 1.0
    #: Start the y axis at 0, for quantities whose size matters, not only their order.
    from_zero: bool = False
    #: A metric whose mean over the runs is drawn as a dashed horizontal line.
    reference_line: str | None = None


@dataclass
class Report:
    """What ``write_report`` wrote."""

    out_dir: Path
    eval_metric: str
    #: One row per group, numbers unformatted.
    table: pd.DataFrame
    markdown: str
    pngs: list[Path]
    html: Path
    #: Variants over seeds with 95 % intervals and paired differences (``comparison.md``).
    comparison: str


def write_report(
    experiment: str,
    *,
    tracking_uri: str | None = None,
    out_dir: str | Path | None = None,
    reference: str | None = None,
) -> Report:
    """Read ``experiment``'s FINISHED runs from ``tracking_uri`` and write plots, table.md and report.html.

    ``reference`` names the variant that the comparison's paired differences are taken against."""
    tracking_uri = tracking_uri or default_tracking_uri()
    client = _open(tracking_uri)
    runs = _finished_runs(client, experiment, tracking_uri)
    eval_metric = _eval_metric(runs, experiment)
    plots = [
        Plot(
            f"{eval_metric}.png",
            f"{eval_metric} of the global model",
            eval_metric,
            (eval_metric,),
            reference_line=MAJORITY_METRIC if eval_metric == EVAL_METRICS["classification"] else None,
        ),
        *(
            Plot(f"{metric}.png", title, metric, (metric,))
            for metric, title in OPTIONAL_PLOTS
            if metric != eval_metric and any(metric in run.data.metrics for run in runs)
        ),
        Plot(
            "init_noise_rel.png",
            "Initialization noise (relative)",
            "init_noise_rel",
            ("init_noise_rel",),
            from_zero=True,
        ),
        Plot("agg_noise_rel.png", "Aggregation noise (relative)", "agg_noise_rel", ("agg_noise_rel",), from_zero=True),
        Plot(
            "bytes.png",
            "Communication per round",
            "MB up + down",
            ("bytes_up", "bytes_down"),
            scale=1 / BYTES_PER_MB,
            from_zero=True,
        ),
    ]
    runs_frame = _runs_frame(runs)
    metrics = sorted({metric for plot in plots for metric in plot.metrics} | {"round_s", MAJORITY_METRIC})
    history = _history(client, runs_frame, metrics)

    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_REPORTS_ROOT / experiment
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = [_draw(plot, history, runs_frame, out_dir / plot.file) for plot in plots]
    table = summary_table(runs_frame, history, eval_metric)
    shown = _formatted(table, eval_metric)
    comparison = comparison_table(
        history_records(runs_frame, history, eval_metric, MAJORITY_METRIC),
        variants=sorted(runs_frame.method.unique()),
        reference=reference,
    )
    markdown = _markdown(shown)
    (out_dir / "table.md").write_text(markdown + "\n")
    (out_dir / "comparison.md").write_text(comparison + "\n")
    page = out_dir / "report.html"
    page.write_text(_html(experiment, tracking_uri, len(runs), shown, pngs, comparison))
    return Report(out_dir, eval_metric, table, markdown, pngs, page, comparison)


def summary_table(runs: pd.DataFrame, history: pd.DataFrame, eval_metric: str) -> pd.DataFrame:
    """Per group: runs, the final ``eval_metric``'s mean and sample std over runs, mean round seconds, mean total MB.

    A run's final value is its last logged step; its round seconds are its mean ``round_s``;
    its total MB is ``bytes_up + bytes_down`` summed over its rounds.
    """
    per_metric = history.groupby(["metric", "run_id"])
    final = per_metric.value.last().get(eval_metric)
    round_s = per_metric.value.mean().get("round_s")
    total_bytes = history[history.metric.isin(["bytes_up", "bytes_down"])].groupby("run_id").value.sum()
    per_run = runs.set_index("run_id").assign(final=final, round_s=round_s, total_mb=total_bytes / BYTES_PER_MB)
    return (
        per_run.groupby(_group_columns(runs))
        .agg(
            runs=("final", "size"),
            final_mean=("final", "mean"),
            final_std=("final", "std"),
            round_s=("round_s", "mean"),
            total_mb=("total_mb", "mean"),
        )
        .reset_index()
    )


def _open(tracking_uri: str) -> MlflowClient:
    if tracking_uri.startswith("sqlite:///"):
        # MLflow would create an empty store at a mistyped path; say so instead.
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ReportError(f"no MLflow store at {path}; run `fedray run` first or fix --tracking-uri")
    check_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri)


def _finished_runs(client: MlflowClient, experiment: str, tracking_uri: str) -> list[Run]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(known.name for known in client.search_experiments())
        raise ReportError(
            f"no experiment {experiment!r} in {tracking_uri}; pick one of: {', '.join(names) or '(none)'}"
        )
    # fedray runs, not a sweep's parent run (which logs no rounds).
    runs = [
        run
        for run in _search(client, found.experiment_id, "attributes.status = 'FINISHED'")
        if "clients_ok" in run.data.metrics
    ]
    if not runs:
        statuses = Counter(run.info.status for run in _search(client, found.experiment_id, ""))
        seen = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items())) or "no runs at all"
        raise ReportError(
            f"experiment {experiment!r} has no FINISHED runs ({seen}); let a `fedray run` of it finish first"
        )
    return runs


def _search(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, max_results=SEARCH_PAGE_SIZE, page_token=token, order_by=["start_time"]
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _eval_metric(runs: list[Run], experiment: str) -> str:
    logged = {key for run in runs for key in run.data.metrics}
    for metric in EVAL_METRICS.values():  # the headline metric: first found wins, classification first
        if metric in logged:
            return metric
    raise ReportError(f"the runs of experiment {experiment!r} log none of {', '.join(EVAL_METRICS.values())}")


def _runs_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per run: run_id, method (its label, if any), partition, seed, and its group's label."""
    frame = pd.DataFrame(
        [
            {
                "run_id": run.info.run_id,
                "method": run.data.tags.get("label") or run.data.tags.get("method", run.data.params.get("method", "?")),
                "partition": run.data.tags.get("partition", run.data.params.get("partition", "?")),
                "seed": run.data.params.get("seed", "?"),
            }
            for run in runs
        ]
    )
    columns = _group_columns(frame)
    frame["group"] = frame[columns].agg(" / ".join, axis=1)
    return frame


def _group_columns(runs: pd.DataFrame) -> list[str]:
    return ["method", "partition"] if runs.partition.nunique() > 1 else ["method"]


def _history(client: MlflowClient, runs: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Long table (run_id, metric, step, timestamp, value), sorted by step; MLflow has one call per run and metric."""
    rows = [
        (run_id, metric, point.step, point.timestamp, point.value)
        for run_id in runs.run_id
        for metric in metrics
        for point in client.get_metric_history(run_id, metric)
    ]
    history = pd.DataFrame(rows, columns=["run_id", "metric", "step", "timestamp", "value"])
    history = history.sort_values(["run_id", "metric", "step", "timestamp"], ignore_index=True)
    # A resumed run can log a round twice; its last value counts, once.
    return history.drop_duplicates(["run_id", "metric", "step"], keep="last", ignore_index=True)


def _draw(plot: Plot, history: pd.DataFrame, runs: pd.DataFrame, path: Path) -> Path:
    shown = history[history.metric.isin(plot.metrics)].merge(runs[["run_id", "group"]], on="run_id")
    per_round = shown.groupby(["group", "run_id", "step"]).value.sum() * plot.scale
    colours = colormaps[COLOUR_MAP].colors
    figure = Figure(figsize=FIGURE_SIZE_IN, layout="constrained")
    axes = figure.add_subplot()
    for index, group in enumerate(sorted(runs.group.unique())):
        if group not in per_round.index.get_level_values("group"):
            continue
        intervals = per_round.loc[group].groupby("step").agg(lambda values: t_interval(list(values)))
        rounds = intervals.index + 1
        band = pd.DataFrame(
            [(i.mean, i.low, i.high) for i in intervals], index=intervals.index, columns=["mean", "low", "high"]
        )
        colour = colours[index % len(colours)]
        # A 95 % t-interval over the group's runs (seeds); none where a group has one run.
        axes.fill_between(rounds, band["low"], band["high"], color=colour, alpha=BAND_ALPHA, linewidth=0)
        axes.plot(
            rounds,
            band["mean"],
            color=colour,
            linewidth=LINE_WIDTH_PT,
            linestyle=LINE_STYLES[index % len(LINE_STYLES)],
            marker=MARKERS[index % len(MARKERS)],
            label=group,
        )
    if plot.reference_line in set(history.metric):
        reference = history[history.metric == plot.reference_line].value.mean()
        axes.axhline(reference, color="grey", linestyle="--", linewidth=1, label=REFERENCE_LABELS[plot.reference_line])
    axes.set(title=plot.title, xlabel="round", ylabel=plot.ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if plot.from_zero:
        # 0 joins the data limits, so a curve at 0 keeps the usual margin off the frame.
        axes.update_datalim([(1, 0)])
        axes.autoscale_view()
    axes.grid(alpha=BAND_ALPHA)
    # Outside the axes, so that it never hides a curve.
    figure.legend(loc="outside right upper")
    figure.savefig(path, dpi=FIGURE_DPI)
    return path


def _formatted(table: pd.DataFrame, eval_metric: str) -> pd.DataFrame:
    """The table as display strings with readable headers; '-' where a number is undefined (std of one run)."""
    formats = {
        "runs": ("runs", "{:.0f}"),
        "final_mean": (f"final {eval_metric} (mean)", "{:.4f}"),
        "final_std": (f"final {eval_metric} (std)", "{:.4f}"),
        "round_s": ("round s (mean)", "{:.2f}"),
        "total_mb": ("MB up+down per run", "{:.3f}"),
    }
    shown = table.copy()
    for column, (_, number_format) in formats.items():
        shown[column] = table[column].map(lambda value, f=number_format: "-" if pd.isna(value) else f.format(value))
    return shown.rename(columns={column: header for column, (header, _) in formats.items()})


def _markdown(shown: pd.DataFrame) -> str:
    lines = [
        "| " + " | ".join(shown.columns) + " |",
        "|" + "|".join("---" if column in ("method", "partition") else "---:" for column in shown.columns) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in shown.astype(str).itertuples(index=False)]
    return "\n".join(lines)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedray report: {experiment}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border-bottom: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }}
.plots {{ display: grid; gap: 1em; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); }}
img {{ max-width: 100%; }}
</style></head>
<body>
<h1>fedray report: {experiment}</h1>
<p>{runs} finished runs from <code>{tracking_uri}</code>, {when}. Curves: mean over the runs of a group
(its seeds), band: its 95 % t-interval; dashed: what always answering the majority class scores.</p>
{table}
<div class="plots">
{images}
</div>
</body></html>
"""


def _html(experiment: str, tracking_uri: str, runs: int, shown: pd.DataFrame, pngs: list[Path], comparison: str) -> str:
    images = "\n".join(
        f'<img alt="{html.escape(png.stem)}" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">'
        for png in pngs
    )
    return _PAGE.format(
        experiment=html.escape(experiment),
        runs=runs,
        tracking_uri=html.escape(tracking_uri),
        when=datetime.now().strftime("%Y-%m-%d %H:%M"),
        table=shown.to_html(index=False, border=0) + f"<pre>{html.escape(comparison)}</pre>",
        images=images,
    )
