"""Grid files: expansion into cells, what each cell's spec holds, one clear error per bad cell."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedray.config import SpecError
from fedray.driver.grid import load_grid

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def _grid(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"base": str(JOBS / "quickstart.yaml"), **fields}, sort_keys=False))
    return path


def test_axes_variants_and_seeds_expand_into_cells(tmp_path):
    path = _grid(
        tmp_path,
        name="g",
        overrides={"rounds": 3},
        axes={"partition_options.alpha": [5.0, 1.0], "train.lr": [0.001]},
        variants={"fedplora": {"method": "fedplora"}, "fedit-r2": {"method": "fedit", "ranks": [2], "max_rank": 2}},
        seeds=[0, 1],
        reference="fedit-r2",
    )
    grid = load_grid(path, ["train.local_steps=3"])
    assert len(grid.cells) == 2 * 2 * 2 and grid.variants == ("fedplora", "fedit-r2") and grid.reference == "fedit-r2"
    cell = grid.cell("partition_options.alpha=1.0,train.lr=0.001/fedit-r2/s1")
    spec = cell.spec
    assert (spec.name, spec.label, spec.seed, spec.method, spec.max_rank, spec.ranks) == (
        "g",
        "fedit-r2",
        1,
        "fedit",
        2,
        [2],
    )
    assert spec.partition_options["alpha"] == 1.0 and spec.train.lr == 0.001 and spec.rounds == 3
    assert spec.train.local_steps == 3  # the command line's override
    assert spec.eval.max_examples is None  # sweeps evaluate on the whole test split by default
    assert cell.axes == {"partition_options.alpha": 1.0, "train.lr": 0.001}
    assert len(set(grid.digests().values())) == len(grid.cells)


def test_an_inline_base_may_extend_a_file_and_a_grid_without_axes_has_one_setting(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"base": {"extends": str(JOBS / "quickstart.yaml"), "rounds": 2}, "seeds": [4]}))
    grid = load_grid(path)
    assert [cell.id for cell in grid.cells] == ["base/base/s4"]
    assert grid.cells[0].spec.rounds == 2 and grid.cells[0].spec.num_clients == 20 and grid.name == "quickstart"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"variants": {"bad": {"ranks": [32]}}},
            "cell base/bad/s0: invalid spec: ranks, rank_proportions or rank_tiers",
        ),
        ({"variants": {"typo": {"roundz": 3}}}, "cell base/typo/s0: unknown spec field 'roundz'"),
        ({"axes": {"rounds": 3}}, "axis 'rounds' must list one or more values"),
        ({"seeds": [0, 0]}, "seeds [0, 0] repeat"),
        ({"reference": "nope"}, "reference 'nope' is not a variant"),
        ({"axis": {}}, "unknown field 'axis'"),
    ],
)
def test_a_bad_grid_is_refused_naming_the_cell_or_field(tmp_path, fields, message):
    with pytest.raises(SpecError) as error:
        load_grid(_grid(tmp_path, **fields))
    assert message in str(error.value)


def test_the_shipped_grid_expands_and_validates():
    grid = load_grid(JOBS / "sweeps" / "quickstart.yaml")
    assert grid.reference in grid.variants and len(grid.cells) == len(grid.variants) * len(grid.seeds) >= 12


def test_cells_get_distinct_safe_names_and_seeds_come_from_the_grid(tmp_path):
    with pytest.raises(SpecError, match=r"axis 'train.lr' repeats a value"):
        load_grid(_grid(tmp_path, axes={"train.lr": [0.001, 0.001]}))
    with pytest.raises(SpecError, match='variant name "it\'s" may hold only'):
        load_grid(_grid(tmp_path, variants={"it's": {"method": "hlora"}}))
    with pytest.raises(SpecError, match=r"override seed=\.\.\. does not apply to a sweep"):
        load_grid(_grid(tmp_path), ["seed=3"])
