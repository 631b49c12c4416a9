"""Low-rank helpers against dense torch.linalg on the same matrices."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedray.methods.lowrank import LowRank, LowRankSum, compact, fro_norm, svd


def _factors(d, k, q, seed):
    generator = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(d, q, generator=generator), torch.randn(q, k, generator=generator))


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 30), k=st.integers(1, 30), q=st.integers(0, 12), seed=st.integers(0, 1000))
def test_svd_and_norm_from_factors_match_dense(d, k, q, seed):
    matrix = _factors(d, k, q, seed)
    dense = matrix.left.double() @ matrix.right.double()
    assert fro_norm(matrix) == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-6, abs=1e-9)
    triplets = svd(matrix)
    expected = torch.linalg.svdvals(dense)
    n = min(len(expected), len(triplets.S))
    torch.testing.assert_close(triplets.S[:n], expected[:n], rtol=1e-6, atol=1e-8)
    assert float(triplets.S[n:].abs().sum()) < 1e-8
    torch.testing.assert_close(triplets.dense(), dense, rtol=1e-6, atol=1e-8)


def test_svd_of_factors_never_forms_the_dense_matrix(monkeypatch):
    # A tall-and-wide rank-3 matrix: its SVD must come from the q x q core.
    matrix = _factors(3000, 2000, 3, 0)
    monkeypatch.setattr(LowRank, "dense", lambda self: pytest.fail("formed the dense product"))
    assert svd(matrix).S.shape == (3,)
    fro_norm(matrix)


def test_running_sum_switches_to_dense_and_stays_exact():
    d, k = 12, 10  # factors stop being smaller at rank 6 (6 * 22 > 120)
    running, reference = LowRankSum((d, k)), torch.zeros(d, k, dtype=torch.float64)
    for step in range(8):
        term = _factors(d, k, 1, step)
        running.add(term.left, term.right, weight=0.5 + step)
        reference += (0.5 + step) * term.left.double() @ term.right.double()
        total = running.total()
        assert isinstance(total, LowRank) == (step + 1 < 6)
        dense = total.dense() if isinstance(total, LowRank) else total
        torch.testing.assert_close(dense, reference, rtol=1e-6, atol=1e-6)
    running.add_matrix(reference, -1.0)
    assert fro_norm(running.total()) < 1e-10


def test_compact_picks_the_smaller_form():
    assert isinstance(compact(_factors(100, 100, 3, 0)), LowRank)
    assert isinstance(compact(_factors(4, 4, 3, 0)), torch.Tensor)
