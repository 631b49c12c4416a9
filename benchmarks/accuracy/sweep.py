"""The accuracy sweep's record: its cells, its results and the tables made from them.

A cell is one fedray run (setting x variant x seed) of ``setting.yaml`` plus overrides;
``results.jsonl`` holds one JSON line per finished cell (final accuracy, curve, seconds,
MB moved, MLflow run id, the exact overrides). The cells ran in sittings of an earlier
runner of this script; ``fedray sweep`` now runs the same cells from ``grids/`` (a test
checks that their specs are the recorded cells' specs), and this script reads the record:

    python benchmarks/accuracy/sweep.py list                       # cells, done or not
    python benchmarks/accuracy/sweep.py table                      # tables from results.jsonl
    python benchmarks/accuracy/sweep.py table --write              # ... into benchmarks/RESULTS.md
    python benchmarks/accuracy/sweep.py table --results trials/bbc-24-rounds.jsonl   # a trial's tables
    python benchmarks/accuracy/sweep.py curves                     # fedray report per setting

Runs and their MLflow store live under ``benchmarks/accuracy/runs/`` (not in git); the
results file and the tables are the record.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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


def _iter_status(cells: Sequence[Cell], results: dict[str, dict]) -> Iterator[str]:
    for cell in cells:
        result = results.get(cell.id)
        status = f"{result['final_accuracy']:.4f}" if result else "todo"
        yield f"{cell.id:45s} {status}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=("list", "table", "curves"), default="list")
    parser.add_argument("--only", nargs="*", default=(), help="list: cell ids or glob patterns (e.g. 'rt-iid/*/s0')")
    parser.add_argument("--write", action="store_true", help="table: replace the sweep block of RESULTS.md")
    parser.add_argument("--results", type=Path, default=RESULTS_FILE, help="list/table: the results file")
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="curves: the runs and their MLflow store")
    args = parser.parse_args(argv)
    cells = _selected(args.only)
    if args.command == "list":
        print("\n".join(_iter_status(cells, read_results(args.results))))
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
