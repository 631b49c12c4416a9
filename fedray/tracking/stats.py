"""Honest numbers for comparing runs over seeds: means with 95 % t-intervals, scores of a
curve (final, best, mean of the last three evaluations), paired differences by seed.

A t-interval (Student's t on the sample standard error, scipy's ``t.interval``) suits the
3-5 seeds a comparison has; with one seed there is no interval. A paired difference is
taken seed by seed (the same clients each round in both runs), so the seed's own luck
cancels; it is marked where its interval excludes zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

#: The confidence of every interval fedray reports.
CONFIDENCE = 0.95
#: How many of the last evaluations ``last_mean`` averages.
LAST_EVALUATIONS = 3


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values and its confidence interval (NaN bounds for n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def text(self, digits: int = 3) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` with its two-sided Student-t interval."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(array.mean())
    if array.size < 2:
        return Interval(mean, math.nan, math.nan, 1)
    error = float(stats.sem(array))
    if error == 0.0:
        return Interval(mean, mean, mean, int(array.size))
    low, high = stats.t.interval(confidence, array.size - 1, loc=mean, scale=error)
    return Interval(mean, float(low), float(high), int(array.size))


def paired_difference(values: Mapping[int, float], reference: Mapping[int, float]) -> Interval | None:
    """``values - reference`` seed by seed, over the seeds both have; None if they share none."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    return t_interval([values[seed] - reference[seed] for seed in seeds])


@dataclass(frozen=True)
class CurveScores:
    """Three readings of one run's evaluation curve."""

    final: float
    best: float
    #: The mean of the last ``LAST_EVALUATIONS`` evaluations (fewer if the run has fewer).
    last_mean: float


def curve_scores(values: Sequence[float]) -> CurveScores:
    """Scores of a curve of evaluations, in round order."""
    if not values:
        raise ValueError("a run with no evaluation has no scores")
    return CurveScores(
        final=float(values[-1]), best=float(max(values)), last_mean=float(np.mean(values[-LAST_EVALUATIONS:]))
    )
