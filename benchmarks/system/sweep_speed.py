"""``fedray sweep`` against the same cells run one after another with ``fedray run``.

Both sides are the commands a user types, timed from start to exit: the sequential side
runs one ``fedray run`` per cell (a new process, a new local Ray, each cell's spec as
the grid expands it), the sweep side one ``fedray sweep`` of the grid. Both evaluate
the same cells, and since every cell computes the same numbers alone or beside others,
the final evaluations must agree exactly: the script checks that too.

    python benchmarks/system/sweep_speed.py                                 # the 7 x 3 rt-iid grid
    python benchmarks/system/sweep_speed.py rounds=4 --out benchmarks/system/results/sweep_speed.md
    python benchmarks/system/sweep_speed.py --smoke                         # 2 x 1 tiny cells (CI)

Cells are independent, so on a cluster of N such machines a sweep runs about N times as
many cells at once; the report projects that from the measured cell times.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from harness import REPO, add_common_arguments, finish, markdown_table, start

from fedray.driver.grid import load_grid
from fedray.tracking.names import EVAL_METRICS

GRID = REPO / "benchmarks" / "accuracy" / "grids" / "rt-iid.yaml"
SMOKE = (
    "rounds=1",
    "num_clients=4",
    "clients_per_round=2",
    "dataset_options.max_examples=200",
    "train.local_steps=1",
    "train.batch_size=4",
    "train.max_seq_len=16",
)
#: Cluster sizes (machines like this one) the report projects a sweep onto.
PROJECTED_NODES = (1, 2, 4, 8)


def _fedray(*args: str) -> float:
    """Run the ``fedray`` command; its wall seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedray.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"fedray {args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def sequential(grid_file: Path, overrides: list[str], work: Path) -> tuple[float, dict[str, float], dict[str, float]]:
    """Each cell as its own ``fedray run``: total seconds, seconds per cell, final evaluation per cell."""
    grid = load_grid(grid_file, overrides)
    seconds, finals = {}, {}
    for index, cell in enumerate(grid.cells):
        spec_file = work / f"cell-{index}.yaml"
        spec_file.write_text(yaml.safe_dump(cell.spec.model_dump(), sort_keys=False))
        run_dir = work / "sequential" / cell.id
        tracking_uri = f"sqlite:///{work / 'sequential.db'}"
        seconds[cell.id] = _fedray("run", str(spec_file), "--run-dir", str(run_dir), "--tracking-uri", tracking_uri)
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        finals[cell.id] = next(value for key, value in last.items() if key in EVAL_METRICS.values())
        print(f"sequential: {cell.id} {seconds[cell.id]:.1f} s", file=sys.stderr, flush=True)
    return sum(seconds.values()), seconds, finals


def sweep(grid_file: Path, overrides: list[str], work: Path) -> tuple[float, dict[str, float]]:
    """The grid as one ``fedray sweep``: total seconds, final evaluation per cell."""
    sweep_dir = work / "sweep"
    wall = _fedray("sweep", str(grid_file), *overrides, "--sweep-dir", str(sweep_dir),
                   "--tracking-uri", f"sqlite:///{work / 'sweep.db'}")  # fmt: skip
    records = [json.loads(line) for line in (sweep_dir / "results.jsonl").read_text().splitlines()]
    return wall, {record["cell"]: record["final"] for record in records}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every cell (e.g. rounds=4)")
    parser.add_argument("--grid", type=Path, default=GRID, help="the grid file (default: the 7 x 3 rt-iid grid)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + (list(SMOKE) if args.smoke else [])
    grid = load_grid(args.grid, overrides)
    if args.smoke:
        variants = [grid.variants[0], grid.reference or grid.variants[1]]
        smoke_grid = yaml.safe_load(args.grid.read_text())
        smoke_grid |= {"variants": {v: smoke_grid["variants"][v] for v in variants}, "seeds": [0]}
        smoke_grid["base"] = str((args.grid.parent / smoke_grid["base"]).resolve())
    report = start("sweep_speed", argv, args.smoke)
    with tempfile.TemporaryDirectory(prefix="fedray-sweep-speed-") as tmp:
        work = Path(tmp)
        grid_file = args.grid
        if args.smoke:
            grid_file = work / "grid.yaml"
            grid_file.write_text(yaml.safe_dump(smoke_grid, sort_keys=False))
            grid = load_grid(grid_file, overrides)
        sequential_s, cell_s, sequential_finals = sequential(grid_file, overrides, work)
        sweep_s, sweep_finals = sweep(grid_file, overrides, work)
    same = sequential_finals == sweep_finals
    cells = len(grid.cells)
    median_cell_s = sorted(cell_s.values())[cells // 2]
    rows = [["one `fedray run` per cell, one after another", f"{sequential_s:.0f}", "1.00"],
            ["`fedray sweep`", f"{sweep_s:.0f}", f"{sweep_s / sequential_s:.2f}"]]  # fmt: skip
    projection = [[nodes, f"{max(median_cell_s, sweep_s / nodes) / 60:.1f}"] for nodes in PROJECTED_NODES]
    report.sections += [
        f"Grid `{args.grid.relative_to(REPO)}` with overrides `{' '.join(overrides) or '(none)'}`: {cells} cells.",
        markdown_table(["side", "wall s", "ratio to one after another"], rows),
        f"Final evaluations equal cell by cell on both sides: {'yes' if same else 'NO'}. "
        f"A cell alone (sequential side) took {min(cell_s.values()):.0f} s at the fastest and {median_cell_s:.0f} s "
        "at the median, its process's start (imports, a new local Ray, the model) included.",
        "Projected onto N machines like this one: cells are independent, so N machines run N times the cells "
        "at once, and a sweep takes no less than one cell (a projection, not a measurement):",
        markdown_table(["machines", "sweep minutes (projected)"], projection),
    ]
    report.results = {
        "cells": cells,
        "overrides": overrides,
        "sequential_s": sequential_s,
        "sweep_s": sweep_s,
        "ratio": sweep_s / sequential_s,
        "cell_s": cell_s,
        "finals_equal": same,
        "finals": sweep_finals,
    }
    finish(report, args.out)
    if not same:
        raise SystemExit("the sweep's final evaluations differ from the cells run alone")
    return 0 if math.isfinite(sweep_s) else 1


if __name__ == "__main__":
    sys.exit(main())
