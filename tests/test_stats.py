"""Intervals, curve scores, paired differences and the comparison table, on fixed numbers."""

from __future__ import annotations

import math

import pytest

from fedray.tracking.comparison import comparison_table
from fedray.tracking.stats import curve_scores, paired_difference, t_interval


def test_the_t_interval_of_three_values_by_hand():
    # mean 0.79; sample sd sqrt(0.0007); sem sd / sqrt(3); t(0.975, df=2) = 4.302653.
    interval = t_interval([0.78, 0.82, 0.77])
    half = 4.302653 * math.sqrt(0.0007) / math.sqrt(3)
    assert interval.mean == pytest.approx(0.79)
    assert (interval.low, interval.high) == (pytest.approx(0.79 - half, abs=1e-6), pytest.approx(0.79 + half, abs=1e-6))
    assert interval.n == 3 and interval.excludes_zero  # all of it above zero
    assert interval.text() == "0.790 [0.724, 0.856]"


def test_one_value_has_no_interval_and_equal_values_a_point():
    single = t_interval([0.5])
    assert single.n == 1 and math.isnan(single.low) and not single.excludes_zero and single.text() == "0.500 (n=1)"
    same = t_interval([0.25, 0.25, 0.25])
    assert (same.low, same.high) == (0.25, 0.25)
    with pytest.raises(ValueError, match="at least one value"):
        t_interval([])


def test_a_paired_difference_pairs_by_seed_and_skips_unpaired_seeds():
    # Seed 3 has no reference; the differences are 0.02, 0.03, 0.04.
    difference = paired_difference({0: 0.72, 1: 0.83, 2: 0.64, 3: 0.9}, {0: 0.70, 1: 0.80, 2: 0.60})
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert difference.n == 3 and difference.mean == pytest.approx(0.03)
    assert difference.low == pytest.approx(0.03 - half, abs=1e-6) and difference.excludes_zero
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_curve_scores_read_final_best_and_the_last_three():
    scores = curve_scores([0.5, 0.8, 0.6, 0.7, 0.65])
    assert (scores.final, scores.best) == (0.65, 0.8)
    assert scores.last_mean == pytest.approx((0.6 + 0.7 + 0.65) / 3)
    assert curve_scores([0.4]).last_mean == 0.4


def test_the_comparison_table_shows_intervals_and_marks_differences_that_exclude_zero():
    def record(variant, seed, final):
        scores = {"final": final, "best": final + 0.01, "last_mean": final, "majority_rate": 0.5 + seed / 100}
        return {"setting": "iid", "variant": variant, "seed": seed, "metric": "eval_accuracy", **scores}

    records = [record("a", s, 0.70 + s / 100) for s in range(3)] + [record("b", s, 0.60 + s / 50) for s in range(3)]
    table = comparison_table(records, variants=("a", "b"), reference="a")
    assert "#### iid: eval_accuracy" in table
    assert "Always answering the majority class scores 0.510 (mean over seeds)." in table
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["a"].startswith("| a | 0, 1, 2 | 0.710 [") and rows["a"].endswith("| — | — |")
    # b - a per seed: -0.10, -0.09, -0.08: an interval below zero.
    expected = paired_difference({0: 0.60, 1: 0.62, 2: 0.64}, {0: 0.70, 1: 0.71, 2: 0.72})
    assert f"| {expected.text()} *" in rows["b"] and expected.high < 0
