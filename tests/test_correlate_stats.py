"""Signed correlations with bootstrap intervals."""
import math

import numpy as np
import pytest
from scipy import stats

from gradsign.correlate import signed_correlations


def test_signs_are_kept_and_match_scipy():
    rng = np.random.default_rng(0)
    accuracy = rng.normal(size=200)
    score = -accuracy + 0.5 * rng.normal(size=200)
    result = signed_correlations(score, accuracy, n_boot=200, seed=1)
    assert result["spearman"] == pytest.approx(stats.spearmanr(score, accuracy).statistic)
    assert result["kendall"] == pytest.approx(stats.kendalltau(score, accuracy).statistic)
    assert result["spearman"] < -0.7
    lo, hi = result["spearman_ci95"]
    assert lo < result["spearman"] < hi < 0


def test_non_finite_scores_are_excluded_and_counted():
    accuracy = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    score = [1.0, math.nan, 3.0, math.inf, 5.0, 6.0]
    result = signed_correlations(score, accuracy, n_boot=0)
    assert result["n"] == 4 and result["excluded"] == 2
    assert result["spearman"] == pytest.approx(1.0)


def test_bootstrap_is_deterministic_given_seed():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert signed_correlations(a, b, n_boot=100, seed=5) == signed_correlations(a, b, n_boot=100, seed=5)
