"""The accuracy sweep: every method and reference on every setting, in resumable cells.

A cell is one fedray run (setting x variant x seed) of ``setting.yaml`` plus overrides. A
sitting runs the cells that have no result yet, in order and two at a time, and appends
each finished cell's result as one JSON line to ``results.jsonl``; nothing else is ever
rewritten, so a sitting can end at any moment (Ctrl-C, a time budget, a lost machine)
and the next one goes on. A cell that was cut off mid-run resumes from its last checkpoint.

    python benchmarks/accuracy/sweep.py list                       # cells, done or not
    python benchmarks/accuracy/sweep.py run --budget-min 60        # a sitting of about an hour
    python benchmarks/accuracy/sweep.py run --only rt-dir0.1/fedplora/s0   # one cell, if it has no result
    python benchmarks/accuracy/sweep.py run --again --only rt-iid/hlora/s1  # re-run one cell from scratch
    python benchmarks/accuracy/sweep.py table                      # tables from results.jsonl
    python benchmarks/accuracy/sweep.py table --write              # ... into benchmarks/RESULTS.md
    python benchmarks/accuracy/sweep.py curves                     # fedray report per setting
    python benchmarks/accuracy/sweep.py --smoke                    # two tiny cells, < 1 min (CI)

Runs and their MLflow store live under ``benchmarks/accuracy/runs/`` (not in git); the
results file and the tables are the record.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTING_FILE = HERE / "setting.yaml"
RESULTS_FILE = HERE / "results.jsonl"
RUNS_DIR = HERE / "runs"
CURVES_DIR = HERE / "curves"
RESULTS_MD = HERE.parent / "RESULTS.md"
#: The block of RESULTS.md that ``table --write`` replaces.
TABLE_BEGIN = "<!-- sweep tables: begin (written by benchmarks/accuracy/sweep.py table --write) -->"
TABLE_END = "<!-- sweep tables: end -->"
SEEDS = (0, 1, 2)
HETEROGENEOUS = ("fedplora", "hlora", "flexlora", "hetlora", "flora")

#: Setting name -> (overrides, seeds). Rotten Tomatoes: three partitions, three seeds; BBC: one.
SETTINGS: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "rt-iid": (("partition=iid",), SEEDS),
    "rt-dir0.1": (("partition=dirichlet", "partition_options.alpha=0.1", "partition_options.draw=per_client"), SEEDS),
    "rt-movie": (("partition=by_key",), SEEDS),
    "bbc-dir0.5": (
        (
            "dataset=bbc_news",
            "partition=dirichlet",
            "partition_options.alpha=0.5",
            "partition_options.draw=per_client",
            "train.max_seq_len=64",
        ),
        (0,),
    ),
}

#: Variant name -> overrides. The six methods (FedIT is homogeneous: its rows are the two references).
VARIANTS: dict[str, tuple[str, ...]] = {
    **{method: (f"method={method}",) for method in HETEROGENEOUS},
    "fedit-r16": ("method=fedit", "ranks=[16]"),
    "fedit-r2": ("method=fedit", "max_rank=2", "ranks=[2]"),
}

#: The HLoRA paper's table on the natural non-IID split; "hlora" heterogeneous is the main table's cell.
#: Not on Dirichlet 0.1: there every method, the rank-16 ceiling included, stays at the majority class.
HLORA_SETTING = "rt-movie"
#: Its seeds 1 and 2 run after every other cell.
LAST_SETTING = "rt-dir0.1"
HLORA_VARIANTS: dict[str, tuple[str, ...]] = {
    # Zero-pad each client's factors to rank R and average them by data size.
    "naive-zeropad": ("method=hetlora", "method_options.weighting=data"),
    # Reconstruction + SVD when every client has the rank the weakest one can afford.
    "hlora-homog-r2": ("method=hlora", "ranks=[2]"),
    # One client holding the pooled data, trained for the same number of steps a round as 5 clients.
    "central-r16": (
        "method=fedit",
        "ranks=[16]",
        "partition=iid",
        "partition_options={}",
        "num_clients=1",
        "clients_per_round=1",
        "train.local_steps=40",
        "resources.num_cpus=2",
    ),
}

#: Fed-PLoRA's gap at twice the participation: 10 of the 50 clients a round, so each module's
#: mean covers about 4.7 clients instead of 2.3 (the paper samples 10 a round). Only the
#: number sampled changes; seeds 0 and 1 pair with the main table's cells of the same seed.
PARTICIPATION_SETTING = "rt-iid"
PARTICIPATION_SEEDS = (0, 1)
PARTICIPATION = "clients_per_round=0.2"
PARTICIPATION_VARIANTS: dict[str, tuple[str, ...]] = {
    f"{variant}-10": (*VARIANTS[variant], PARTICIPATION) for variant in ("fedplora", "hlora", "fedit-r16")
}
#: The tables of the main grid; the others ("hlora", "participation") are side tables of one setting.
MAIN_TABLES = ("primary", "secondary")

#: Cells a sitting runs at once: two keep both cores of the 2-core machine busy.
DEFAULT_PARALLEL = 2
#: Tiny overrides for --smoke: seconds per cell.
SMOKE = (
    "rounds=2",
    "num_clients=4",
    "clients_per_round=2",
    "train.local_steps=1",
    "train.batch_size=4",
    "train.max_seq_len=16",
    "eval.every=1",
    "eval.max_examples=16",
)


@dataclass(frozen=True)
class Cell:
    """One run of the sweep."""

    table: str
    setting: str
    variant: str
    seed: int
    overrides: tuple[str, ...]

    @property
    def side(self) -> bool:
        return self.table not in MAIN_TABLES

    @property
    def id(self) -> str:
        prefix = f"{self.table}-table/" if self.side else ""
        return f"{prefix}{self.setting}/{self.variant}/s{self.seed}"

    @property
    def experiment(self) -> str:
        return f"accuracy-{self.table + '-' if self.side else ''}{self.setting}"

    def spec_overrides(self, extra: Sequence[str] = ()) -> list[str]:
        return [
            f"name={self.experiment}",
            f"label={self.variant}",
            f"seed={self.seed}",
            *SETTINGS[self.setting][0],
            *self.overrides,
            *extra,
        ]


def all_cells() -> list[Cell]:
    """Every cell, in the order a sitting runs them.

    Seed 0 of everything first, so early sittings give whole rows; then the other seeds,
    with Dirichlet 0.1's last: its seed 0 stays at the majority class for every variant.
    """
    cells = []
    for seed in SEEDS:
        for setting, (_, seeds) in SETTINGS.items():
            if seed in seeds:
                table = "secondary" if setting.startswith("bbc") else "primary"
                cells += [Cell(table, setting, variant, seed, ov) for variant, ov in VARIANTS.items()]
        cells += [Cell("hlora", HLORA_SETTING, variant, seed, ov) for variant, ov in HLORA_VARIANTS.items()]
    cells = sorted(cells, key=lambda cell: cell.seed > 0 and cell.setting == LAST_SETTING)
    # Added after the main sweep had run: last, so the cells before keep their order.
    return cells + [
        Cell("participation", PARTICIPATION_SETTING, variant, seed, ov)
        for seed in PARTICIPATION_SEEDS
        for variant, ov in PARTICIPATION_VARIANTS.items()
    ]


def read_results(path: Path) -> dict[str, dict]:
    """Cell id -> its result (the last line wins if a cell was re-run on purpose)."""
    if not path.exists():
        return {}
    results = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A sitting killed mid-write leaves a torn last line; the cell simply runs again.
            print(f"sweep: ignoring unreadable line {number} of {path}", file=sys.stderr)
            continue
        results[record["cell"]] = record
    return results


def run_cell(cell: Cell, *, runs_dir: Path, tracking_uri: str, extra: Sequence[str] = (), fresh: bool = False) -> dict:
    """Run (or resume) one cell and return its result record; ``fresh`` starts over even from a checkpoint."""
    from fedray.config import load_spec
    from fedray.driver.checkpoint import CHECKPOINT_DIR, LATEST
    from fedray.driver.lifecycle import resume, run

    run_dir = runs_dir / cell.id
    spec = load_spec(SETTING_FILE, cell.spec_overrides(extra))
    started = time.perf_counter()
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    if (run_dir / CHECKPOINT_DIR / LATEST).exists():
        print(f"sweep: resuming {cell.id} from its last checkpoint", file=sys.stderr)
        summary = resume(run_dir, progress=False)
    else:
        # Cut off before its first checkpoint: nothing to keep.
        shutil.rmtree(run_dir, ignore_errors=True)
        summary = run(spec, run_dir=run_dir, tracking_uri=tracking_uri, progress=False)
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [[r["round"] + 1, r["eval_accuracy"]] for r in rounds if r.get("eval_accuracy") is not None]
    return {
        "cell": cell.id,
        "table": cell.table,
        "setting": cell.setting,
        "variant": cell.variant,
        "seed": cell.seed,
        "final_accuracy": curve[-1][1],
        "curve": curve,
        "train_loss_last": rounds[-1].get("train_loss"),
        "round_s_mean": statistics.fmean(r["round_s"] for r in rounds),
        "sitting_wall_s": round(time.perf_counter() - started, 1),
        "mb_up_down": sum(r["bytes_up"] + r["bytes_down"] for r in rounds) / 1e6,
        "run_id": summary.run_id,
        "overrides": cell.spec_overrides(extra),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
    }


def sitting(
    cells: Sequence[Cell],
    *,
    results_file: Path,
    runs_dir: Path,
    budget_s: float | None,
    extra: Sequence[str] = (),
    again: bool = False,
    parallel: int = 1,
) -> int:
    """Run the cells without a result until the budget is spent; returns how many finished.

    ``parallel`` cells run at once, as threads of this driver over its one Ray instance and
    its warm workers: a lone cell leaves a core idle while a round's last client trains
    alone and while the server evaluates, and a second cell's tasks fill those gaps. A
    client task owns its threads either way, so a cell computes what it computes alone.
    ``again`` runs the cells that have a result too, from scratch: the new line in the
    results file wins, and the old MLflow run is deleted once the new one has finished, so
    the curves hold one run per cell. Ctrl-C ends the sitting at once; the cells in flight
    resume from their last checkpoints in the next one.
    """
    import ray
    from mlflow.tracking import MlflowClient

    from fedray.config import load_spec
    from fedray.driver.cluster import connect_ray
    from fedray.tracking.store import check_tracking_uri

    if parallel < 1:
        raise SystemExit(f"--parallel must be at least 1, got {parallel}")
    runs_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{runs_dir / 'mlflow.db'}"
    check_tracking_uri(tracking_uri)
    done = read_results(results_file)
    todo = list(cells) if again else [cell for cell in cells if cell.id not in done]
    print(f"sweep: {len(cells) - len(todo)} of {len(cells)} cells done, {len(todo)} to run", file=sys.stderr)
    if todo:
        # Once, before the threads: concurrent cells join the same instance.
        connect_ray(None, load_spec(SETTING_FILE, todo[0].spec_overrides(extra)))
    #: The cells this sitting runs at once (the record's share of the machine).
    concurrency = min(parallel, len(todo))
    started = time.perf_counter()
    waiting = iter(todo)
    running: dict[Future, Cell] = {}
    finished, failure = 0, None

    def start_next(pool: ThreadPoolExecutor) -> bool:
        if budget_s is not None and time.perf_counter() - started > budget_s:
            return False
        cell = next(waiting, None)
        if cell is None:
            return False
        future = pool.submit(run_cell, cell, runs_dir=runs_dir, tracking_uri=tracking_uri, extra=extra, fresh=again)
        running[future] = cell
        return True

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="cell") as pool:
        try:
            while True:
                while failure is None and len(running) < parallel and start_next(pool):
                    pass
                if not running:
                    break
                for future in wait(running, return_when=FIRST_COMPLETED).done:
                    cell = running.pop(future)
                    try:
                        record = future.result()
                    except Exception as error:  # the others in flight finish and are recorded first
                        failure = failure or error
                        continue
                    record["parallel"] = concurrency
                    with results_file.open("a") as out:
                        out.write(json.dumps(record) + "\n")
                    if again and cell.id in done:
                        _delete_run(MlflowClient(tracking_uri), done[cell.id]["run_id"])
                    finished += 1
                    print(
                        f"sweep: {cell.id}: final accuracy {record['final_accuracy']:.4f} "
                        f"({record['sitting_wall_s']:.0f} s)",
                        file=sys.stderr,
                    )
        except KeyboardInterrupt:
            print("sweep: interrupted; the cells in flight resume from their checkpoints next sitting", file=sys.stderr)
            sys.stderr.flush()
            ray.shutdown()
            os._exit(130)  # the cell threads cannot be interrupted; their checkpoints are on disk
    if ray.is_initialized():
        ray.shutdown()
    if failure is not None:
        raise failure
    if next(waiting, None) is not None:
        print("sweep: time budget spent; the next sitting goes on from here", file=sys.stderr)
    return finished


def _delete_run(client, run_id: str) -> None:
    """Delete a replaced cell's MLflow run, unless it is not in this store (made on another machine)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        client.delete_run(run_id)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        print(f"sweep: the replaced run {run_id} is not in this store; nothing to delete", file=sys.stderr)


# ----------------------------------------------------------------------------- tables


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def tables(results: dict[str, dict], cells: Sequence[Cell]) -> str:
    """Markdown: final eval accuracy, mean ± sample std over seeds (n = seeds done of planned)."""
    by_key: dict[tuple[str, str, str], list[float]] = {}
    planned: dict[tuple[str, str, str], int] = {}
    for cell in cells:
        key = (cell.table, cell.setting, cell.variant)
        planned[key] = planned.get(key, 0) + 1
        if cell.id in results:
            by_key.setdefault(key, []).append(results[cell.id]["final_accuracy"])

    def cell_text(key: tuple[str, str, str]) -> str:
        values = by_key.get(key, [])
        if not values:
            return "-"
        return f"{_mean_spread(values)} (n={len(values)}/{planned[key]})"

    lines = []
    primary = [s for s in SETTINGS if not s.startswith("bbc")]
    for title, table, settings in (
        ("Rotten Tomatoes, 50 clients, 5 a round: final eval accuracy", "primary", primary),
        ("BBC News, Dirichlet 0.5, 50 clients, 5 a round: final eval accuracy", "secondary", ["bbc-dir0.5"]),
    ):
        lines += [
            f"#### {title}",
            "",
            "| variant | " + " | ".join(settings) + " |",
            "|---" + "|---:" * len(settings) + "|",
        ]
        for variant in VARIANTS:
            lines.append(f"| {variant} | " + " | ".join(cell_text((table, s, variant)) for s in settings) + " |")
        lines.append("")
    lines += [
        f"#### HLoRA-style table ({HLORA_SETTING}): final eval accuracy",
        "",
        "| variant | accuracy |",
        "|---|---:|",
    ]
    hlora_rows = [
        ("naive federated LoRA, zero-padding (heterogeneous ranks)", ("hlora", HLORA_SETTING, "naive-zeropad")),
        ("reconstruction + SVD, homogeneous rank 2", ("hlora", HLORA_SETTING, "hlora-homog-r2")),
        ("reconstruction + SVD, heterogeneous ranks (HLoRA)", ("primary", HLORA_SETTING, "hlora")),
        ("centralised LoRA r=16 on the pooled data", ("hlora", HLORA_SETTING, "central-r16")),
    ]
    lines += [f"| {name} | {cell_text(key)} |" for name, key in hlora_rows]
    lines += ["", *participation_table(results)]
    lines += ["", *flatten_table(results)]
    # A cell of a sitting that ran k at once had the machine 1/k of its time.
    walls = [r["sitting_wall_s"] / r.get("parallel", 1) for r in results.values()]
    # A resumed cell's sitting saw only its last rounds; its rounds' own times are all in its record.
    cell_s = [r["round_s_mean"] * r["curve"][-1][0] / r.get("parallel", 1) for r in results.values()]
    if walls:
        lines += [
            "",
            f"Cells done: {len(results)} of {len(cells)}; the sittings' wall time: {sum(walls) / 3600:.2f} h. "
            f"A cell's rounds took {min(cell_s):.0f} s at the fastest and {statistics.median(cell_s):.0f} s at the "
            f"median (a cell of a sitting that ran k cells at once counts 1/k of its time; cells that ran beside "
            f"other work are slower), so all {len(cells)} cells take "
            f"{min(cell_s) * len(cells) / 3600:.1f} to {statistics.median(cell_s) * len(cells) / 3600:.1f} h "
            "(a sitting adds about 2 s a cell).",
        ]
    return "\n".join(lines)


def interval_tables(results: dict[str, dict], *, reference: str = "fedit-r16") -> str:
    """Markdown: the main tables again with fedray's statistics (``fedray.tracking.comparison``):
    final, best over rounds and mean of the last three evaluations with 95 % t-intervals over
    seeds, and differences to ``reference`` paired by seed; the majority class of each cell's
    evaluation set as the floor."""
    from fedray import inputs
    from fedray.config import load_spec
    from fedray.tracking.comparison import comparison_table, score_record

    records = []
    for cell in all_cells():
        if cell.side or cell.id not in results:
            continue
        spec = load_spec(SETTING_FILE, cell.spec_overrides())
        eval_set = inputs.eval_set(spec, inputs.dataset_split(spec))
        curve = [value for _, value in results[cell.id]["curve"]]
        majority = eval_set.majority_share()
        records.append(score_record(cell.setting, cell.variant, cell.seed, "eval_accuracy", curve, majority))
    return comparison_table(records, variants=tuple(VARIANTS), reference=reference)


def participation_table(results: dict[str, dict]) -> list[str]:
    """Markdown: 5 vs 10 clients a round, over the participation seeds that have both cells (paired by seed)."""
    lines = [
        f"#### Participation ({PARTICIPATION_SETTING}, paired by seed): 5 vs 10 of 50 clients a round, final accuracy",
        "",
        "| variant | 5 a round | 10 a round | 10 minus 5, per seed |",
        "|---|---:|---:|---|",
    ]
    for variant in PARTICIPATION_VARIANTS:
        base = variant.removesuffix("-10")
        pairs = [
            (results[five]["final_accuracy"], results[ten]["final_accuracy"])
            for seed in PARTICIPATION_SEEDS
            if (five := f"{PARTICIPATION_SETTING}/{base}/s{seed}") in results
            and (ten := f"participation-table/{PARTICIPATION_SETTING}/{variant}/s{seed}") in results
        ]
        if not pairs:
            lines.append(f"| {base} | - | - | - |")
            continue
        fives = _mean_spread([five for five, _ in pairs])
        tens = _mean_spread([ten for _, ten in pairs])
        gains = ", ".join(f"{ten - five:+.3f}" for five, ten in pairs)
        lines.append(f"| {base} | {fives} | {tens} | {gains} (n={len(pairs)}) |")
    return lines


def flatten_table(results: dict[str, dict]) -> list[str]:
    """Markdown: per setting, eval accuracy by round averaged over its finished cells (do the curves flatten?)."""
    curves: dict[str, list[dict[int, float]]] = {}
    for record in results.values():
        if record["table"] in MAIN_TABLES:
            curves.setdefault(record["setting"], []).append(dict(map(tuple, record["curve"])))
    if not curves:
        return []
    rounds = sorted({r for per_setting in curves.values() for curve in per_setting for r in curve})
    lines = [
        "#### Mean eval accuracy by round (all variants and seeds finished): do the curves flatten?",
        "",
        "| setting | cells | " + " | ".join(f"r{r}" for r in rounds) + " |",
        "|---|---:" + "|---:" * len(rounds) + "|",
    ]
    for setting in (s for s in SETTINGS if s in curves):
        at_round = [[c[r] for c in curves[setting] if r in c] for r in rounds]
        means = [f"{statistics.fmean(values):.3f}" if values else "-" for values in at_round]
        lines.append(f"| {setting} | {len(curves[setting])} | " + " | ".join(means) + " |")
    return lines


def write_tables(markdown: str, path: Path) -> None:
    text = path.read_text()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise SystemExit(f"{path} has no sweep block; add the lines {TABLE_BEGIN!r} and {TABLE_END!r}")
    head, _, rest = text.partition(TABLE_BEGIN)
    _, _, tail = rest.partition(TABLE_END)
    path.write_text(f"{head}{TABLE_BEGIN}\n{markdown}\n{TABLE_END}{tail}")


def curves(runs_dir: Path, out_dir: Path) -> None:
    """``fedray report`` of every setting's experiment: curves (mean and 95 % interval over seeds) per variant."""
    from fedray.tracking.report import write_report

    tracking_uri = f"sqlite:///{runs_dir / 'mlflow.db'}"
    for experiment in sorted({cell.experiment for cell in all_cells()}):
        try:
            report = write_report(experiment, tracking_uri=tracking_uri, out_dir=out_dir / experiment)
        except Exception as error:  # an experiment with no finished run yet
            print(f"sweep: no report for {experiment}: {error}", file=sys.stderr)
            continue
        print(f"sweep: {experiment}: {report.out_dir}", file=sys.stderr)


# ----------------------------------------------------------------------------- command line


def _selected(only: Sequence[str]) -> list[Cell]:
    cells = all_cells()
    if not only:
        return cells
    chosen = [cell for cell in cells if any(fnmatch.fnmatch(cell.id, pattern) for pattern in only)]
    if not chosen:
        raise SystemExit(f"no cell matches {list(only)}; `sweep.py list` shows the cell ids")
    return chosen


def _smoke() -> None:
    """Two tiny cells end to end in a temporary folder: run, a second sitting is a no-op, --again re-runs, table."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cells = [c for c in all_cells() if c.id in ("rt-iid/fedplora/s0", "rt-iid/fedit-r2/s0")]
        results_file = folder / "results.jsonl"
        # Both cells at once: one experiment created by two runs, one Ray shared by two drivers' threads.
        finished = sitting(
            cells, results_file=results_file, runs_dir=folder / "runs", budget_s=None, extra=SMOKE, parallel=2
        )
        again = sitting(cells, results_file=results_file, runs_dir=folder / "runs", budget_s=None, extra=SMOKE)
        first = read_results(results_file)
        rerun = sitting(
            cells[:1], results_file=results_file, runs_dir=folder / "runs", budget_s=None, extra=SMOKE, again=True
        )
        results = read_results(results_file)
        assert finished == 2 and again == 0 and rerun == 1 and len(results) == 2, (finished, again, rerun, results)
        assert [first[cell.id]["parallel"] for cell in cells] == [2, 2], first
        assert len({first[cell.id]["run_id"] for cell in cells}) == 2
        assert results[cells[0].id]["run_id"] != first[cells[0].id]["run_id"], "--again made no new run"
        from mlflow.tracking import MlflowClient

        replaced = MlflowClient(f"sqlite:///{folder / 'runs' / 'mlflow.db'}").get_run(first[cells[0].id]["run_id"])
        assert replaced.info.lifecycle_stage == "deleted", "--again left the replaced MLflow run in the curves"
        print(tables(results, cells))
        print(json.dumps({"smoke": "ok", "cells": {k: v["final_accuracy"] for k, v in results.items()}}))


def _iter_status(cells: Sequence[Cell], results: dict[str, dict]) -> Iterator[str]:
    for cell in cells:
        result = results.get(cell.id)
        status = f"{result['final_accuracy']:.4f}" if result else "todo"
        yield f"{cell.id:45s} {status}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="two tiny cells in a temporary folder (CI)")
    parser.add_argument("command", nargs="?", choices=("list", "run", "table", "curves"), default="list")
    parser.add_argument("--only", nargs="*", default=(), help="cell ids or glob patterns (e.g. 'rt-iid/*/s0')")
    parser.add_argument("--budget-min", type=float, help="start no new cell after this many minutes")
    parser.add_argument("--again", action="store_true", help="run: re-run the chosen cells from scratch even if done")
    parser.add_argument(
        "--parallel",
        type=int,
        default=DEFAULT_PARALLEL,
        help=f"run: cells at once on the one Ray instance (default {DEFAULT_PARALLEL}: fills both cores of 2)",
    )
    parser.add_argument("--write", action="store_true", help="table: replace the sweep block of RESULTS.md")
    parser.add_argument("--results", type=Path, default=RESULTS_FILE, help="list/run/table: the results file")
    parser.add_argument("--extra", nargs="*", default=(), help="run: overrides added to every cell (trials only)")
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="run/curves: runs and their MLflow store")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A sitting starts Ray itself; a cell thread still running after Ctrl-C's shutdown must not start another.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    if args.smoke:
        _smoke()
        return 0
    cells = _selected(args.only)
    if args.command == "list":
        print("\n".join(_iter_status(cells, read_results(args.results))))
    elif args.command == "run":
        budget = None if args.budget_min is None else args.budget_min * 60
        options = {"budget_s": budget, "again": args.again, "parallel": args.parallel, "extra": args.extra}
        sitting(cells, results_file=args.results, runs_dir=args.runs_dir, **options)
    elif args.command == "table":
        if args.write and args.results.resolve() != RESULTS_FILE:
            raise SystemExit(f"table --write fills RESULTS.md from {RESULTS_FILE} only, not from a trial's results")
        results = read_results(args.results)
        markdown = tables(results, all_cells())
        markdown += "\n\n#### The main tables with 95 % intervals over seeds\n\n" + interval_tables(results)
        print(markdown)
        if args.write:
            write_tables(markdown, RESULTS_MD)
    else:
        curves(args.runs_dir, CURVES_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
