"""The non-IID tables of RESULTS.md, from the sweeps' records in ``results/<grid>/results.jsonl``.

    .venv/bin/python benchmarks/noniid/tables.py collect   # copy each sweep's record from runs/ into results/
    .venv/bin/python benchmarks/noniid/tables.py           # print the tables (markdown)

Per grid: the sweep statistics (``fedray.tracking.comparison``: mean and 95 % t-interval over
seeds of the final, best and last-three-mean evaluation, paired differences to the grid's
reference), then per variant the issue's two checks: the final accuracy's margin over the
eval set's majority class (mean over seeds), and the largest range of the last four
evaluations over the seeds (a curve that swings less than 0.05 has a range below 0.05).
Last, each variant without the recipe (``off-*``: fedray's defaults) against with it
(``recipe-*``), cell by cell on the same seeds.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from fedray.driver.grid import load_grid
from fedray.tracking.comparison import comparison_table
from fedray.tracking.stats import paired_difference, t_interval

HERE = Path(__file__).resolve().parent
#: The recipe's grids and the same cells without it, in the order RESULTS.md shows them.
RECIPE_GRIDS = ("recipe-rt-dir0.1", "recipe-rt-movie", "off-rt-dir0.1", "off-rt-movie")
#: Partition -> (grid without the recipe, grid with it): the remedy table's pairs.
ON_OFF = {"Dirichlet 0.1": ("off-rt-dir0.1", "recipe-rt-dir0.1"), "by movie": ("off-rt-movie", "recipe-rt-movie")}
#: Evaluations whose range counts as the curve's late swing.
LATE_EVALUATIONS = 4
#: Earlier sweeps of a grid whose cells count where their digest equals the grid's cell's
#: (the first recipe sweep ran the heterogeneous methods at rank 16; its FedIT cells stand).
EARLIER = {"recipe-rt-dir0.1": "recipe-rt-dir0.1-first"}


def collect() -> None:
    """Copy each sweep's ``results.jsonl`` (and ``summary.md``) from ``runs/`` into ``results/``."""
    for folder in sorted((HERE / "runs").glob("*/results.jsonl")):
        target = HERE / "results" / folder.parent.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder, target / "results.jsonl")
        for name in ("summary.md", "sweep.json"):
            if (folder.parent / name).is_file():
                shutil.copy(folder.parent / name, target / name)
        print(f"{folder.parent.name}: {len(folder.read_text().splitlines())} cells")


def checks(records: list[dict], variants: tuple[str, ...]) -> list[str]:
    """Markdown: per variant, margin over the majority class and the late swing."""
    lines = ["| variant | seeds | final − majority (mean) | final (per seed) | largest range of the last 4 |",
             "|---|---:|---:|---|---:|"]  # fmt: skip
    for variant in variants:
        mine = sorted((r for r in records if r["variant"] == variant), key=lambda r: r["seed"])
        if not mine:
            continue
        margins = [r["final"] - r["majority_rate"] for r in mine]
        ranges = [_late_range(r) for r in mine]
        finals = ", ".join(f"{r['final']:.3f}" for r in mine)
        lines.append(f"| {variant} | {len(mine)} | {np.mean(margins):+.3f} | {finals} | {max(ranges):.3f} |")
    return lines


def _earlier(name: str, grid, have: set[str]) -> list[dict]:
    """Records of an earlier sweep of ``name`` whose cells computed exactly what the grid's cells compute."""
    folder = HERE / "results" / EARLIER.get(name, "-")
    if not folder.is_dir():
        return []
    digests = json.loads((folder / "sweep.json").read_text())["cells"]
    mine = grid.digests()
    records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    return [r for r in records if r["cell"] not in have and digests.get(r["cell"]) == mine.get(r["cell"])]


def _late_range(record: dict) -> float:
    late = [value for _, value in record["curve"][-LATE_EVALUATIONS:]]
    return max(late) - min(late)


def records_of(name: str) -> list[dict]:
    """Every cell of grid ``name`` that has a result (an earlier sweep's where it counts)."""
    record_file = HERE / "results" / name / "results.jsonl"
    if not record_file.is_file():
        return []
    grid = load_grid(HERE / "grids" / f"{name}.yaml")
    records = [json.loads(line) for line in record_file.read_text().splitlines()]
    return records + _earlier(name, grid, {record["cell"] for record in records})


def on_off(variants: tuple[str, ...]) -> list[str]:
    """Markdown: per partition and variant, the final accuracy without and with the recipe,
    their paired difference (by seed: the same clients each round), and each side's margin
    over the majority class and largest late range."""
    lines = ["| partition | variant | seeds | without | with the recipe | with − without (paired) "
             "| margin over majority, without / with | largest range of the last 4, without / with |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for partition, (off_name, on_name) in ON_OFF.items():
        off = {(r["variant"], r["seed"]): r for r in records_of(off_name)}
        on = {(r["variant"], r["seed"]): r for r in records_of(on_name)}
        for variant in variants:
            seeds = sorted(seed for v, seed in off.keys() & on.keys() if v == variant)
            if not seeds:
                continue
            without = {seed: off[variant, seed]["final"] for seed in seeds}
            with_ = {seed: on[variant, seed]["final"] for seed in seeds}
            difference = paired_difference(with_, without)
            star = " *" if difference.excludes_zero else ""
            margins = [np.mean([side[variant, seed]["final"] - side[variant, seed]["majority_rate"] for seed in seeds])
                       for side in (off, on)]  # fmt: skip
            ranges = [max(_late_range(side[variant, seed]) for seed in seeds) for side in (off, on)]
            means = [t_interval(list(side.values())).text() for side in (without, with_)]
            lines.append(
                f"| {partition} | {variant} | {', '.join(map(str, seeds))} | {means[0]} | {means[1]} "
                f"| {difference.text()}{star} "
                f"| {margins[0]:+.3f} / {margins[1]:+.3f} | {ranges[0]:.3f} / {ranges[1]:.3f} |"
            )
    return lines


def tables() -> str:
    out = []
    for name in RECIPE_GRIDS:
        records = records_of(name)
        if not records:
            continue
        grid = load_grid(HERE / "grids" / f"{name}.yaml")
        out += [f"### {name} ({len(records)} of {len(grid.cells)} cells)", ""]
        out += [comparison_table(records, variants=grid.variants, reference=grid.reference), ""]
        out += [*checks(records, grid.variants), ""]
    variants = load_grid(HERE / "grids" / f"{RECIPE_GRIDS[0]}.yaml").variants
    out += ["### Without and with the recipe (paired by seed; * where the interval excludes zero)", ""]
    out += [*on_off(variants), ""]
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:] == ["collect"]:
        collect()
    else:
        print(tables())
