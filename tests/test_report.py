"""fedray report over real MLflow runs in a temporary sqlite store: numbers, images, HTML, CLI errors."""

from __future__ import annotations

import base64
import json
import re
import time

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.image import imread
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from fedray.cli import EXIT_BAD_INPUT, main
from fedray.tracking.report import write_report
from fedray.tracking.stats import t_interval

EXPERIMENT = "report-test"
#: Method -> its index k, which sets every known metric value below.
METHODS = {"fedit": 0, "fedplora": 1, "hlora": 2}
SEEDS = (0, 1)
ROUNDS = 5
PNG_NAMES = {
    "eval_accuracy.png",
    "eval_f1_macro.png",
    "eval_loss.png",
    "train_loss.png",
    "init_noise_rel.png",
    "agg_noise_rel.png",
    "bytes.png",
}
#: Pixels of one method's colour that a whole 5-round curve covers at least (a legend swatch covers far fewer).
MIN_LINE_PIXELS = 300


def accuracy(k: int, seed: int, step: int) -> float:
    return 0.55 + 0.05 * k + 0.02 * step + (0.01 + 0.01 * k) * seed


def round_metrics(k: int, seed: int, step: int) -> dict[str, float]:
    """Every per-round metric fedray writes, with known values."""
    return {
        "eval_accuracy": accuracy(k, seed, step),
        "eval_loss": 0.7 - 0.01 * step - 0.1 * k,
        "eval_f1_macro": accuracy(k, seed, step) - 0.05,
        "train_loss": 0.69 - 0.02 * step - 0.1 * k,
        "init_noise": 1.0 + k,
        "init_noise_rel": 0.1 * (k + 1) + 0.01 * step + 0.005 * seed,
        "agg_noise": 0.5 + k,
        "agg_noise_rel": 0.05 * (k + 1) + 0.02 * step + 0.003 * seed,
        "bytes_up": 1.0e6 * (k + 1) + 1.0e4 * seed,
        "bytes_down": 2.0e6 * (k + 1) + 5.0e3 * step,
        "round_s": 1.0 + k + 0.1 * step + 0.2 * seed,
        "client_s_p50": 0.5,
        "client_s_max": 0.8,
        "clients_ok": 2.0,
        "clients_failed": 0.0,
    }


def log_run(
    client: MlflowClient,
    experiment_id: str,
    method: str,
    seed: int,
    *,
    k: int,
    partition: str = "iid",
    status: str = "FINISHED",
    relogged_rounds: int = 0,
    label: str | None = None,
) -> None:
    """One run as fedray's Tracker writes it: params, tags, one metric batch per round.

    The last ``relogged_rounds`` rounds are logged again later, as a resumed run may do.
    """
    tags = {"method": method, "model": "minilm", "dataset": "rotten_tomatoes", "partition": partition}
    if label is not None:
        tags["label"] = label
    run = client.create_run(experiment_id, tags=tags | {"fedray_version": "0.1.0"})
    params = {"method": method, "seed": json.dumps(seed), "partition": partition, "train.lr": json.dumps(3e-3)}
    client.log_batch(run.info.run_id, params=[Param(key, value) for key, value in params.items()])
    now = int(time.time() * 1000)
    for step in [*range(ROUNDS), *range(ROUNDS - relogged_rounds, ROUNDS)]:
        now += 1
        metrics = [Metric(key, value, now, step) for key, value in round_metrics(k, seed, step).items()]
        client.log_batch(run.info.run_id, metrics=metrics)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status=status)


@pytest.fixture(scope="module")
def store(tracking_uri):
    """The session's sqlite store, holding the experiments below."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(EXPERIMENT)
    for method, k in METHODS.items():
        for seed in SEEDS:
            log_run(client, experiment_id, method, seed, k=k, relogged_rounds=2 if seed == 0 else 0)
    # Runs that did not finish must not count: their values would shift every mean.
    log_run(client, experiment_id, "fedplora", 2, k=7, status="FAILED")
    log_run(client, experiment_id, "hlora", 3, k=9, status="RUNNING")
    unfinished = client.create_experiment("report-unfinished")
    log_run(client, unfinished, "fedit", 0, k=0, status="RUNNING")
    partitions = client.create_experiment("report-partitions")
    log_run(client, partitions, "fedplora", 0, k=1, partition="iid")
    log_run(client, partitions, "fedplora", 0, k=3, partition="dirichlet")
    labelled = client.create_experiment("report-labels")
    log_run(client, labelled, "fedit", 0, k=2, label="fedit-r16")
    log_run(client, labelled, "fedit", 0, k=4, label="fedit-r2")
    return tracking_uri


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    return write_report(EXPERIMENT, tracking_uri=store, out_dir=tmp_path_factory.mktemp("report"))


def parse_markdown(markdown: str) -> list[dict[str, str]]:
    header, separator, *rows = markdown.splitlines()
    assert set(separator.replace("|", "").replace("-", "").replace(":", "")) <= {""}
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    return [dict(zip(columns, (cell.strip() for cell in row.strip("|").split("|")))) for row in rows]


def test_table_numbers_match_an_independent_computation(report):
    rows = {row["method"]: row for row in parse_markdown(report.markdown)}
    assert set(rows) == set(METHODS)
    assert "partition" not in rows["fedit"]
    for method, k in METHODS.items():
        finals = [accuracy(k, seed, ROUNDS - 1) for seed in SEEDS]
        per_round = [round_metrics(k, seed, step) for seed in SEEDS for step in range(ROUNDS)]
        total_mb = [
            sum(
                round_metrics(k, seed, step)["bytes_up"] + round_metrics(k, seed, step)["bytes_down"]
                for step in range(ROUNDS)
            )
            / 1e6
            for seed in SEEDS
        ]
        row = rows[method]
        assert row["runs"] == str(len(SEEDS))
        assert float(row["final eval_accuracy (mean)"]) == pytest.approx(np.mean(finals), abs=5e-5)
        assert float(row["final eval_accuracy (std)"]) == pytest.approx(np.std(finals, ddof=1), abs=5e-5)
        assert float(row["round s (mean)"]) == pytest.approx(np.mean([m["round_s"] for m in per_round]), abs=5e-3)
        assert float(row["MB up+down per run"]) == pytest.approx(np.mean(total_mb), abs=5e-4)
    assert (report.out_dir / "table.md").read_text() == report.markdown + "\n"


def test_the_comparison_has_intervals_over_seeds_and_paired_differences(store, tmp_path):
    report = write_report(EXPERIMENT, tracking_uri=store, out_dir=tmp_path, reference="fedit")
    rows = {line.split(" | ")[0].strip("| "): line for line in report.comparison.splitlines() if line.startswith("| ")}
    for method, k in METHODS.items():
        finals = [accuracy(k, seed, ROUNDS - 1) for seed in SEEDS]
        assert f"| {t_interval(finals).text()} |" in rows[method]
    # Differences paired by seed, against fedit, from the same known values.
    for method, k in METHODS.items():
        if method == "fedit":
            continue
        differences = [accuracy(k, seed, ROUNDS - 1) - accuracy(METHODS["fedit"], seed, ROUNDS - 1) for seed in SEEDS]
        assert t_interval(differences).text() in rows[method]
    assert (tmp_path / "comparison.md").read_text() == report.comparison + "\n"


def test_runs_that_differ_in_partition_get_a_row_each(store, tmp_path):
    partitioned = write_report("report-partitions", tracking_uri=store, out_dir=tmp_path)
    rows = parse_markdown(partitioned.markdown)
    assert sorted((row["method"], row["partition"]) for row in rows) == [("fedplora", "dirichlet"), ("fedplora", "iid")]
    by_partition = {row["partition"]: row for row in rows}
    assert float(by_partition["dirichlet"]["final eval_accuracy (mean)"]) == pytest.approx(accuracy(3, 0, ROUNDS - 1))
    # One run per row: the spread is undefined, not zero.
    assert {row["final eval_accuracy (std)"] for row in rows} == {"-"}


def test_labelled_variants_of_one_method_get_a_row_each(store, tmp_path):
    rows = {
        row["method"]: row
        for row in parse_markdown(write_report("report-labels", tracking_uri=store, out_dir=tmp_path).markdown)
    }
    assert set(rows) == {"fedit-r16", "fedit-r2"}
    assert float(rows["fedit-r2"]["final eval_accuracy (mean)"]) == pytest.approx(accuracy(4, 0, ROUNDS - 1))


def test_pngs_show_one_curve_per_method_in_its_own_colour(report):
    assert {png.name for png in report.pngs} == PNG_NAMES
    colours = np.array(colormaps["tab10"].colors)
    for png in report.pngs:
        image = imread(png)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, png.name
        rgb = image[..., :3].reshape(-1, 3)
        assert len(np.unique(np.round(rgb, 2), axis=0)) > 20, f"{png.name} looks blank"
        # Methods are drawn in sorted order, colour i of tab10 for method i; no fourth colour.
        for index, colour in enumerate(colours[: len(METHODS) + 1]):
            pixels = int(np.all(np.abs(rgb - colour) < 0.01, axis=1).sum())
            if index < len(METHODS):
                assert pixels >= MIN_LINE_PIXELS, f"{png.name}: {sorted(METHODS)[index]} has {pixels} pixels"
            else:
                assert pixels == 0, f"{png.name}: an extra curve"


def test_html_embeds_every_png_and_the_table(report):
    page = report.html.read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(data) for data in embedded) == sorted(png.read_bytes() for png in report.pngs)
    assert "<table" in page
    # Self-contained: nothing is fetched when the page opens.
    assert not re.search(r'(src|href)="(?!data:)', page)
    for row in parse_markdown(report.markdown):
        for cell in row.values():
            assert f"<td>{cell}</td>" in page


def test_cli_prints_the_table_and_writes_under_reports_by_default(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", EXPERIMENT, "--tracking-uri", store]) == 0
    out_dir = tmp_path / "reports" / EXPERIMENT
    printed = (out_dir / "table.md").read_text() + "\n" + (out_dir / "comparison.md").read_text()
    assert capsys.readouterr().out == printed
    assert {path.name for path in out_dir.iterdir()} == PNG_NAMES | {"table.md", "comparison.md", "report.html"}


@pytest.mark.parametrize(
    ("experiment", "uri", "expected"),
    [
        ("nope", None, ["no experiment 'nope'", EXPERIMENT, "report-partitions"]),
        ("report-unfinished", None, ["no FINISHED runs", "1 RUNNING"]),
        (EXPERIMENT, "sqlite:///{tmp}/missing.db", ["no MLflow store at", "missing.db"]),
        (EXPERIMENT, "http://127.0.0.1:9", ["does not answer"]),
    ],
)
def test_cli_exits_2_naming_what_to_fix(store, tmp_path, capsys, experiment, uri, expected):
    uri = (uri or store).format(tmp=tmp_path)
    assert main(["report", experiment, "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    for text in expected:
        assert text in error
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "missing.db").exists()
