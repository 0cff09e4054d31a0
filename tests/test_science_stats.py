"""The paired interval of the science report against a hand-computed example."""

from __future__ import annotations

import math

import pytest

from pipeline.science.stats import paired, power


def test_paired_interval_hand_computed():
    # differences 0.01, 0.03, 0.02, 0.00, 0.04 (5 seeds): mean 0.02, sample variance (1+1+0+4+4)e-4/4 = 2.5e-4,
    # s = 0.0158114, s/sqrt(5) = 0.00707107; t(0.975, 4) = 2.776445 (printed t tables: 2.776), half-width 0.0196324
    a = [0.81, 0.83, 0.82, 0.80, 0.84]
    b = [0.80, 0.80, 0.80, 0.80, 0.80]
    p = paired(a, b)
    assert p.n == 5 and p.mean == pytest.approx(0.02, abs=1e-15)
    assert p.std == pytest.approx(math.sqrt(2.5e-4), rel=1e-12)
    assert p.high - p.mean == pytest.approx(2.776445 * 0.00707107, rel=1e-5)
    assert p.mean - p.low == pytest.approx(p.high - p.mean, rel=1e-12)
    assert p.low == pytest.approx(0.0003676, abs=1e-6) and p.excludes_zero
    # the same differences with one sign flipped straddle zero
    q = paired([0.81, 0.83, 0.82, 0.80, 0.76], b)
    assert q.low < 0 < q.high and not q.excludes_zero
    # 3 seeds: t(0.975, 2) = 4.302653
    r = paired([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert r.high == pytest.approx(2.0 + 4.302653 * 1.0 / math.sqrt(3), rel=1e-6)


def test_paired_needs_matching_values_and_one_pair_has_no_interval():
    with pytest.raises(ValueError, match="equally many"):
        paired([1.0, 2.0], [1.0])
    one = paired([0.5], [0.25])
    assert one.mean == 0.25 and math.isnan(one.low) and not one.excludes_zero


def test_power_of_the_paired_t_test_against_an_independent_integral():
    """power(delta, sd, n): P(|T| > t_crit) with T noncentral t. Checked against the definition, integrated without the
    noncentral t: T = (Z + nc)/√(V/df), Z standard normal, V chi-square with df = n − 1 degrees of freedom."""
    from scipy import integrate
    from scipy import stats as st

    def by_integral(delta, sd, n):
        df, nc = n - 1, delta * math.sqrt(n) / sd
        c = st.t.ppf(0.975, df)

        def f(v):
            k = c * math.sqrt(v / df)
            return st.chi2.pdf(v, df) * (st.norm.cdf(-k - nc) + st.norm.sf(k - nc))

        return integrate.quad(f, 0, math.inf, limit=200)[0]

    for delta, sd, n in ((0.82, 1.06, 5), (1.0, 1.0, 10), (0.5, 2.0, 3), (-0.82, 1.06, 5)):
        assert power(delta, sd, n) == pytest.approx(by_integral(delta, sd, n), abs=1e-7)
    assert power(0.0, 1.0, 5) == pytest.approx(0.05, abs=1e-12)  # no effect: the test's own level
    assert power(0.82, 1.06, 5) == pytest.approx(power(-0.82, 1.06, 5))  # two-sided: symmetric in the sign
    assert 0.26 < power(0.82, 1.06, 5) < 0.28  # the science verdict's MRPC figure (paired std ~1.06 points, 5 seeds)
    assert power(1.0, 1.0, 10) == pytest.approx(0.803, abs=1e-3)  # effect size 1, 10 pairs: the textbook ~80 %
    assert math.isnan(power(0.82, 1.06, 1)) and math.isnan(power(0.82, 0.0, 5))
