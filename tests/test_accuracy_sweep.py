"""The accuracy sweep's record: its cells, its results file and the tables read from it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedray.config import load_spec

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy" / "sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("accuracy_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_every_cell_is_a_valid_spec_with_a_unique_id(sweep):
    cells = sweep.all_cells()
    assert len({cell.id for cell in cells}) == len(cells)
    # 3 Rotten Tomatoes partitions x 7 variants x 3 seeds, BBC x 7 x 1, the HLoRA table's 3 extra rows x 3 seeds,
    # the participation table's 3 rows x 2 seeds.
    assert len(cells) == 3 * 7 * 3 + 7 + 3 * 3 + 3 * 2
    for cell in cells:
        spec = load_spec(sweep.SETTING_FILE, cell.spec_overrides())
        assert spec.num_clients in (50, 1) and spec.label == cell.variant and spec.seed == cell.seed
        assert spec.sampled_clients == (10 if cell.table == "participation" else 5 if spec.num_clients == 50 else 1)
        if cell.variant in ("fedit-r16", "central-r16"):
            assert (spec.method, spec.ranks, spec.max_rank) == ("fedit", [16], 16)
        if cell.variant == "fedit-r2":
            assert (spec.method, spec.ranks, spec.max_rank) == ("fedit", [2], 2)
        if cell.variant in sweep.HETEROGENEOUS:
            assert spec.ranks == [2, 4, 8, 16]
    # A participation cell differs from its main-table partner of the same seed in the clients sampled only.
    by_id = {cell.id: cell for cell in cells}
    for cell in (c for c in cells if c.table == "participation"):
        partner = by_id[f"{cell.setting}/{cell.variant.removesuffix('-10')}/s{cell.seed}"]
        ten, five = (load_spec(sweep.SETTING_FILE, c.spec_overrides()) for c in (cell, partner))
        same_run_apart_from = {"clients_per_round": five.clients_per_round, "label": five.label, "name": five.name}
        assert ten.model_copy(update=same_run_apart_from) == five
    central = next(cell for cell in cells if cell.variant == "central-r16")
    federated = next(cell for cell in cells if cell.variant == "fedplora")
    central_spec = load_spec(sweep.SETTING_FILE, central.spec_overrides())
    federated_spec = load_spec(sweep.SETTING_FILE, federated.spec_overrides())
    # The centralised ceiling takes as many steps a round as the five federated clients together.
    assert central_spec.train.local_steps == federated_spec.sampled_clients * federated_spec.train.local_steps


def test_results_survive_a_torn_line_and_tables_count_seeds(sweep, tmp_path):
    results_file = tmp_path / "results.jsonl"
    common = {"table": "primary", "setting": "rt-iid", "variant": "fedplora"}
    rows = [
        {**common, "cell": "rt-iid/fedplora/s0", "final_accuracy": 0.7, "curve": [[2, 0.6], [4, 0.7]],
         "round_s_mean": 10.0, "sitting_wall_s": 41.0},
        {**common, "cell": "rt-iid/fedplora/s1", "final_accuracy": 0.8, "curve": [[2, 0.5], [4, 0.8]],
         "round_s_mean": 20.0, "sitting_wall_s": 9.0},  # resumed at its last round
    ]  # fmt: skip
    results_file.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"cell": "rt-iid/hl')
    results = sweep.read_results(results_file)
    assert set(results) == {"rt-iid/fedplora/s0", "rt-iid/fedplora/s1"}
    markdown = sweep.tables(results, sweep.all_cells())
    assert "| fedplora | 0.750 ± 0.071 (n=2/3) | - | - |" in markdown
    assert "| rt-iid | 2 | 0.550 | 0.750 |" in markdown  # the mean curve
    # Cell times come from the rounds (4 x 10 s, 4 x 20 s), not the resumed sitting's 9 s.
    assert "took 40 s at the fastest and 60 s at the median" in markdown

    results_md = tmp_path / "RESULTS.md"
    results_md.write_text(f"intro\n{sweep.TABLE_BEGIN}\nold\n{sweep.TABLE_END}\noutro\n")
    sweep.write_tables("new table", results_md)
    assert results_md.read_text() == f"intro\n{sweep.TABLE_BEGIN}\nnew table\n{sweep.TABLE_END}\noutro\n"


def test_a_cell_of_a_parallel_sitting_counts_its_share_of_the_machine(sweep):
    common = {"table": "primary", "setting": "rt-iid", "final_accuracy": 0.7, "curve": [[2, 0.6], [4, 0.7]]}
    rows = [
        {**common, "cell": "rt-iid/fedplora/s0", "variant": "fedplora", "round_s_mean": 10.0, "sitting_wall_s": 45.0},
        {**common, "cell": "rt-iid/hlora/s0", "variant": "hlora", "round_s_mean": 30.0, "sitting_wall_s": 126.0,
         "parallel": 2},  # ran beside another cell: half of its 4 x 30 s
    ]  # fmt: skip
    markdown = sweep.tables({row["cell"]: row for row in rows}, sweep.all_cells())
    assert "the sittings' wall time: 0.03 h" in markdown  # (45 + 126 / 2) s
    assert "took 40 s at the fastest and 50 s at the median" in markdown


def test_mean_curve_table_takes_settings_of_different_lengths(sweep):
    rows = [
        {"cell": "rt-iid/flora/s0", "table": "primary", "setting": "rt-iid", "curve": [[2, 0.6], [4, 0.7]]},
        {"cell": "bbc-dir0.5/flora/s0", "table": "secondary", "setting": "bbc-dir0.5",
         "curve": [[2, 0.5], [4, 0.8], [6, 0.9]]},
    ]  # fmt: skip
    markdown = "\n".join(sweep.flatten_table({row["cell"]: row for row in rows}))
    assert "| rt-iid | 1 | 0.600 | 0.700 | - |" in markdown
    assert "| bbc-dir0.5 | 1 | 0.500 | 0.800 | 0.900 |" in markdown


def test_participation_table_pairs_cells_by_seed_and_stays_out_of_the_main_curve(sweep):
    def record(cell, table, accuracy):
        variant = cell.split("/")[-2]
        return {
            "cell": cell,
            "table": table,
            "setting": "rt-iid",
            "variant": variant,
            "final_accuracy": accuracy,
            "curve": [[2, accuracy]],
            "round_s_mean": 1.0,
            "sitting_wall_s": 1.0,
        }

    rows = [
        record("rt-iid/fedplora/s0", "primary", 0.70),
        record("rt-iid/fedplora/s1", "primary", 0.66),  # its 10-a-round partner has not run
        record("participation-table/rt-iid/fedplora-10/s0", "participation", 0.78),
        record("rt-iid/hlora/s0", "primary", 0.80),
    ]  # fmt: skip
    results = {row["cell"]: row for row in rows}
    markdown = "\n".join(sweep.participation_table(results))
    assert "| fedplora | 0.700 | 0.780 | +0.080 (n=1) |" in markdown
    assert "| hlora | - | - | - |" in markdown
    # The main grid's mean curve counts the three primary cells only.
    assert "| rt-iid | 3 | 0.720 |" in "\n".join(sweep.flatten_table(results))


def test_a_trials_table_prints_but_never_overwrites_the_record(tmp_path):
    trial = tmp_path / "trial.jsonl"
    row = {"cell": "bbc-dir0.5/flora/s0", "table": "secondary", "setting": "bbc-dir0.5", "variant": "flora",
           "final_accuracy": 0.9, "curve": [[2, 0.5], [24, 0.9]], "round_s_mean": 10.0,
           "sitting_wall_s": 240.0}  # fmt: skip
    trial.write_text(json.dumps(row) + "\n")
    shown = subprocess.run(
        [sys.executable, str(SCRIPT), "table", "--results", str(trial)], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "| bbc-dir0.5 | 1 | 0.500 | 0.900 |" in shown.stdout
    written = subprocess.run(
        [sys.executable, str(SCRIPT), "table", "--results", str(trial), "--write"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert written.returncode != 0 and "not from a trial's results" in written.stderr


def test_interval_tables_pair_each_variant_with_the_reference_by_seed(sweep):
    def result(variant, seed, curve):
        return {"cell": f"rt-iid/{variant}/s{seed}", "curve": curve}

    results = {
        row["cell"]: row
        for row in [
            result("fedit-r16", 0, [[2, 0.70], [4, 0.80]]),
            result("fedit-r16", 1, [[2, 0.72], [4, 0.78]]),
            result("fedit-r2", 0, [[2, 0.71], [4, 0.75]]),
            result("fedit-r2", 1, [[2, 0.60], [4, 0.74]]),
        ]
    }
    markdown = sweep.interval_tables(results)
    from fedray.tracking.stats import paired_difference, t_interval

    rows = {line.split(" | ")[0].strip("| "): line for line in markdown.splitlines() if line.startswith("| fedit")}
    assert f"| {t_interval([0.80, 0.78]).text()} |" in rows["fedit-r16"]
    # best over rounds: r2 has 0.75 and 0.74; paired against 0.80 and 0.78: -0.05, -0.04.
    assert paired_difference({0: 0.75, 1: 0.74}, {0: 0.80, 1: 0.78}).text() in rows["fedit-r2"]
    assert "Always answering the majority class scores" in markdown


def test_the_grid_files_hold_exactly_the_recorded_cells(sweep):
    from fedray.driver.grid import load_grid

    grids = {}
    for cell in sweep.all_cells():
        name = {"hlora": "hlora-rt-movie", "participation": "participation-rt-iid"}.get(cell.table, cell.setting)
        if name not in grids:
            grids[name] = load_grid(SCRIPT.parent / "grids" / f"{name}.yaml")
        grid_cell = grids[name].cell(f"base/{cell.variant}/s{cell.seed}")
        assert grid_cell.spec == load_spec(sweep.SETTING_FILE, cell.spec_overrides()), cell.id
    assert sum(len(grid.cells) for grid in grids.values()) == len(sweep.all_cells())
