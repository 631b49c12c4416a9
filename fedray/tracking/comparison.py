"""The table that compares variants over seeds: per setting and variant, the final, best and
last-three evaluation with 95 % t-intervals, and each variant's paired difference to a
reference variant (seed by seed), starred where its interval excludes zero."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from fedray.tracking.stats import LAST_EVALUATIONS, Interval, curve_scores, paired_difference, t_interval

#: The scores of a run a comparison reads (keys of a cell's record).
SCORES = ("final", "best", "last_mean")
SCORE_TITLES = {"final": "final", "best": "best over rounds", "last_mean": f"mean of last {LAST_EVALUATIONS}"}


def score_record(
    setting: str, variant: str, seed: int, metric: str, curve: Sequence[float], majority_rate: float | None = None
) -> dict[str, Any]:
    """One run's record for ``comparison_table``: its scores of the evaluation ``curve``."""
    scores = curve_scores(list(curve))
    record = {"setting": setting, "variant": variant, "seed": seed, "metric": metric}
    record |= {"final": scores.final, "best": scores.best, "last_mean": scores.last_mean}
    if majority_rate is not None:
        record["majority_rate"] = majority_rate
    return record


def comparison_table(
    records: Iterable[Mapping[str, Any]], *, variants: Sequence[str], reference: str | None = None
) -> str:
    """Markdown, one section per setting. ``records`` hold ``setting``, ``variant``, ``seed``,
    ``metric``, the ``SCORES`` and, for classification, ``majority_rate``."""
    by_setting: dict[str, dict[str, dict[int, Mapping[str, Any]]]] = {}
    for record in records:
        by_setting.setdefault(record["setting"], {}).setdefault(record["variant"], {})[record["seed"]] = record
    lines = [
        "Means over seeds with 95 % t-intervals [low, high]; differences are paired by seed "
        f"against {reference!r}, * where the interval excludes zero."
        if reference
        else "Means over seeds with 95 % t-intervals [low, high].",
    ]
    for setting, per_variant in by_setting.items():
        any_record = next(iter(next(iter(per_variant.values())).values()))
        metric = any_record["metric"]
        lines += ["", f"#### {setting}: {metric}", ""]
        majority = [r["majority_rate"] for runs in per_variant.values() for r in runs.values() if "majority_rate" in r]
        if majority:
            # Each seed splits the data its own way: the mean over the runs' evaluation sets.
            lines += [f"Always answering the majority class scores {np.mean(majority):.3f} (mean over seeds).", ""]
        columns = ["variant", "seeds", *(SCORE_TITLES[score] for score in SCORES)]
        if reference:
            columns += [f"{SCORE_TITLES[score]} − {reference}" for score in ("final", "best")]
        lines += ["| " + " | ".join(columns) + " |", "|---|---:" + "|---:" * (len(columns) - 2) + "|"]
        base = per_variant.get(reference, {}) if reference else {}
        for variant in (v for v in variants if v in per_variant):
            runs = per_variant[variant]
            row = [variant, ", ".join(str(seed) for seed in sorted(runs))]
            row += [t_interval([runs[seed][score] for seed in sorted(runs)]).text() for score in SCORES]
            if reference:
                for score in ("final", "best"):
                    if variant == reference:
                        row.append("—")
                        continue
                    difference = paired_difference(
                        {seed: run[score] for seed, run in runs.items()},
                        {seed: run[score] for seed, run in base.items()},
                    )
                    row.append("-" if difference is None else _signed(difference))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _signed(difference: Interval) -> str:
    text = difference.text()
    if not text.startswith("-"):
        text = "+" + text
    return text + (" *" if difference.excludes_zero else "")


def history_records(runs: pd.DataFrame, history: pd.DataFrame, metric: str, majority_metric: str) -> list[dict]:
    """Records for ``comparison_table`` from a report's MLflow runs (``run_id``, ``method``,
    ``partition``, ``seed``) and their long metric history (``run_id``, ``metric``, ``step``, ``value``)."""
    records = []
    for run in runs.itertuples(index=False):
        mine = history[history.run_id == run.run_id]
        curve = mine[mine.metric == metric].sort_values("step").value.tolist()
        if not curve:
            continue
        majority = mine[mine.metric == majority_metric].value
        rate = float(majority.iloc[-1]) if len(majority) else None
        records.append(score_record(run.partition, run.method, run.seed, metric, curve, rate))
    return records
