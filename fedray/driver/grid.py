"""A sweep's grid file, expanded into cells: every (setting, variant, seed) is one run.

    name: sweep-quickstart          # the MLflow experiment of the cells (default: the base spec's)
    base: quickstart.yaml           # a spec file (relative to this file) or an inline spec
    overrides: {rounds: 8}          # dotted spec keys set in every cell
    axes:                           # dotted spec keys -> values: every combination is a setting
      partition_options.alpha: [5.0, 1.0]
    variants:                       # named rows, each setting several keys at once
      fedplora: {method: fedplora}
      fedit-r2: {method: fedit, ranks: [2], max_rank: 2}
    seeds: [0, 1, 2]
    reference: fedit-r2             # paired differences are taken against this variant
    eval_max_examples: null         # test examples per evaluation; null (default): the whole split

A cell's spec is the base, then ``eval_max_examples``, the grid's ``overrides``, its
setting's axis values, its variant's keys, the command line's overrides, and its seed
and label (the variant). Every cell is validated before any runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedray.config import (
    Spec,
    SpecError,
    apply_override,
    load_spec_file,
    resolve_extends,
    set_dotted,
    validate_spec,
)

#: The setting of a grid without axes.
BASE_SETTING = "base"
#: What a variant may be called: it names folders and MLflow tags.
VARIANT_NAME = re.compile(r"[A-Za-z0-9_.-]+")
#: Fields a grid file may have.
GRID_FIELDS = ("name", "base", "overrides", "axes", "variants", "seeds", "reference", "eval_max_examples")


@dataclass(frozen=True)
class Cell:
    """One run of a sweep."""

    setting: str
    #: The axis values of its setting, by dotted spec key.
    axes: Mapping[str, Any]
    variant: str
    seed: int
    spec: Spec

    @property
    def id(self) -> str:
        return f"{self.setting}/{self.variant}/s{self.seed}"

    def digest(self) -> str:
        """What the cell computes: a changed digest means a changed grid. The resources its
        clients ask for are left out: a later sitting on a bigger machine computes the same."""
        return self.spec.digest(ignore=("resources",))


@dataclass(frozen=True)
class Grid:
    """A grid file, read and expanded."""

    name: str
    path: Path
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    reference: str | None
    cells: tuple[Cell, ...] = field(repr=False)

    def cell(self, cell_id: str) -> Cell:
        for cell in self.cells:
            if cell.id == cell_id:
                return cell
        raise SpecError(f"the grid has no cell {cell_id!r}; its cells are named like {self.cells[0].id!r}")

    def digests(self) -> dict[str, str]:
        return {cell.id: cell.digest() for cell in self.cells}


def load_grid(path: str | Path, overrides: Sequence[str] = ()) -> Grid:
    """Read the grid file at ``path``, expand it into cells and validate every cell's spec."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"grid file {str(path)!r} does not exist; pass a YAML grid such as jobs/sweeps/quickstart.yaml")
    try:
        grid = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise SpecError(f"grid file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(grid, dict):
        raise SpecError(f"grid file {str(path)!r} must hold a mapping of fields ({', '.join(GRID_FIELDS)})")
    unknown = sorted(set(grid) - set(GRID_FIELDS))
    if unknown:
        raise SpecError(f"grid file {str(path)!r} has unknown field {unknown[0]!r}; its fields are {list(GRID_FIELDS)}")
    base = _base_fields(grid.get("base"), path)
    variants = _mapping(grid, "variants", path) or {"base": {}}
    axes = _mapping(grid, "axes", path)
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"grid file {str(path)!r}: axis {key!r} must list one or more values")
    seeds = grid.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise SpecError(f"grid file {str(path)!r}: seeds must list non-negative integers, e.g. seeds: [0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"grid file {str(path)!r}: seeds {seeds} repeat; list each seed once")
    reference = grid.get("reference")
    if reference is not None and reference not in variants:
        raise SpecError(
            f"grid file {str(path)!r}: reference {reference!r} is not a variant; use one of {list(variants)}"
        )
    for variant in variants:
        if not VARIANT_NAME.fullmatch(str(variant)):
            raise SpecError(f"grid file {str(path)!r}: variant name {variant!r} may hold only letters, digits, - _ .")
    for key, values in axes.items():
        if len({_text(value) for value in values}) != len(values):
            raise SpecError(f"grid file {str(path)!r}: axis {key!r} repeats a value ({values}); list each once")
    for reserved in ("seed", "label", "name"):
        if any(override.partition("=")[0] == reserved for override in overrides):
            raise SpecError(
                f"override {reserved}=... does not apply to a sweep; set seeds, variants or name in the grid"
            )
    name = grid.get("name") or base.get("name") or path.stem
    cells = []
    for values in itertools.product(*axes.values()) if axes else [()]:
        setting_axes = dict(zip(axes, values, strict=True))
        setting = ",".join(f"{key}={_text(value)}" for key, value in setting_axes.items()) or BASE_SETTING
        for variant, variant_fields in variants.items():
            if not isinstance(variant_fields, dict):
                raise SpecError(f"grid file {str(path)!r}: variant {variant!r} must map spec keys to values")
            for seed in seeds:
                cells.append(
                    _cell(path, base, grid, setting, setting_axes, variant, variant_fields, seed, name, overrides)
                )
    return Grid(name, path, tuple(variants), tuple(seeds), reference, tuple(cells))


def _cell(
    path: Path,
    base: dict[str, Any],
    grid: dict[str, Any],
    setting: str,
    axes: dict[str, Any],
    variant: str,
    variant_fields: dict[str, Any],
    seed: int,
    name: str,
    overrides: Sequence[str],
) -> Cell:
    cell_id = f"{setting}/{variant}/s{seed}"
    raw = json.loads(json.dumps(base))  # a deep copy
    try:
        set_dotted(raw, "eval.max_examples", grid.get("eval_max_examples"), source="eval_max_examples")
        for source, fields in (("overrides", _mapping(grid, "overrides", path)), ("axes", axes)):
            for key, value in fields.items():
                set_dotted(raw, key, value, source=f"{source}.{key}")
        for key, value in variant_fields.items():
            set_dotted(raw, key, value, source=f"variant {variant!r}")
        for override in overrides:
            apply_override(raw, override)
        for key, value in (("seed", seed), ("label", variant), ("name", name)):
            raw[key] = value
        spec = validate_spec(raw)
    except SpecError as error:
        raise SpecError(f"grid file {str(path)!r}, cell {cell_id}: {error}") from None
    return Cell(setting, axes, variant, seed, spec)


def _base_fields(base: Any, path: Path) -> dict[str, Any]:
    if base is None:
        return {}
    if isinstance(base, str):
        return load_spec_file(path.parent / base)
    if isinstance(base, dict):
        return resolve_extends(dict(base), path)  # an inline spec may extend a file too
    raise SpecError(f"grid file {str(path)!r}: base must be a spec file's path or an inline spec mapping")


def _mapping(grid: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = grid.get(key) or {}
    if not isinstance(value, dict):
        raise SpecError(f"grid file {str(path)!r}: {key} must be a mapping")
    return value


def _text(value: Any) -> str:
    """An axis value as it reads in a cell id (and a folder name): JSON, without slashes."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text.replace("/", "_")


def grid_digest(digests: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(sorted(digests.items()))).encode()).hexdigest()[:16]
