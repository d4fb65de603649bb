"""r3f-report's statistics against values worked out independently."""
import math
import statistics

import pytest

from r3f_opt.experiments import stats


@pytest.mark.parametrize("t, df, p", [(2.0, 10, 0.0733880347), (2.228138852, 10, 0.05), (1.0, 1, 0.5),
                                      (0.0, 5, 1.0), (12.706204736, 1, 0.05)])
def test_t_two_sided_p(t, df, p):
    assert stats.t_two_sided_p(t, df) == pytest.approx(p, rel=1e-6)


def test_t_tends_to_the_normal():
    assert stats.t_two_sided_p(1.959963985, 1e7) == pytest.approx(0.05, rel=1e-5)


def test_welch_by_hand():
    a, b = [0.50, 0.52, 0.55, 0.51], [0.56, 0.60, 0.58, 0.61, 0.57]
    va, vb = statistics.variance(a) / 4, statistics.variance(b) / 5
    t = (statistics.fmean(b) - statistics.fmean(a)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 4)
    got = stats.welch(a, b)
    assert got["t"] == pytest.approx(t) and got["df"] == pytest.approx(df)
    assert got["p"] == pytest.approx(stats.t_two_sided_p(t, df)) and 0 < got["p"] < 0.01
    assert stats.welch([0.5], b) is None


def test_welch_without_spread_gives_no_p_value():
    """Every seed the same in both arms: equal means are p = 1; different ones have no test (not p = 0)."""
    assert stats.welch([0.0, 0.0, 0.0], [0.0, 0.0])["p"] == 1.0
    got = stats.welch([0.5, 0.5], [0.6, 0.6])
    assert got["p"] is None and got["t"] == math.inf and got["diff"] == pytest.approx(0.1)
    assert stats.welch([0.6, 0.6], [0.5, 0.5])["t"] == -math.inf
    assert stats.welch([0.5, 0.5], [0.6, 0.7])["p"] > 0  # one arm with spread: a test


def test_holm():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_bootstrap_ci_is_deterministic_and_covers_the_difference():
    a, b = [0.50, 0.52, 0.55, 0.51], [0.56, 0.60, 0.58, 0.61, 0.57]
    lo, hi = stats.bootstrap_ci(a, b)
    assert (lo, hi) == stats.bootstrap_ci(a, b)
    assert lo < statistics.fmean(b) - statistics.fmean(a) < hi and lo > 0


def test_seeds_needed():
    # The two-sample t-test's textbook sample sizes (80 % power, alpha 0.05, two-sided; e.g. G*Power, Cohen's
    # tables): d = 1 needs 17 per arm, d = 0.5 needs 64, d = 2 needs 6; the normal approximation said 16, 63, 4.
    assert stats.seeds_needed(0.01, 0.01) == 17
    assert stats.seeds_needed(0.02, 0.01) == 64
    assert stats.seeds_needed(0.005, 0.01) == 6
    assert stats.seeds_needed(0.0001, 0.01) == 2  # never fewer than two seeds per arm
    # t quantiles against tables: t_{0.975, 10} = 2.228, t_{0.8, 10} = 0.879, t_{0.995, 3} = 5.841
    assert stats.t_quantile(0.025, 10) == pytest.approx(2.2281, abs=1e-4)
    assert stats.t_quantile(0.2, 10) == pytest.approx(0.8791, abs=1e-4)
    assert stats.t_quantile(0.005, 3) == pytest.approx(5.8409, abs=1e-4)
    with pytest.raises(ValueError, match="q must be"):
        stats.t_quantile(0.7, 3)
    assert stats.seeds_needed(0.0, 0.01) is None  # no measured spread (e.g. every seed at MCC 0)
