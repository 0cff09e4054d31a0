"""The paired interval of the science report against a hand-computed example; Holm's adjustment, the paired t and TOST
p-values and the paired bootstrap of the second protocol against hand-computed and independent values."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from scipy import stats as st

from pipeline.science.stats import accuracy, holm, paired, paired_bootstrap, paired_t_p, pearson, power, tost


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


def test_holm_hand_computed_ties_single_and_cap():
    # p = 0.01, 0.04, 0.03, 0.005 (m = 4): sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04;
    # running max 0.02, 0.03, 0.06, 0.06; back in the input order 0.03, 0.06, 0.06, 0.02
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    # ties: 0.02, 0.02, 0.5 times 3, 2, 1 = 0.06, 0.04, 0.5; running max 0.06, 0.06, 0.5 (tied p, tied adjusted p)
    assert holm([0.02, 0.5, 0.02]) == pytest.approx([0.06, 0.5, 0.06], abs=1e-15)
    assert holm([0.3, 0.3]) == pytest.approx([0.6, 0.6], abs=1e-15)
    # capped at 1: 0.3, 0.6, 0.9 times 3, 2, 1 = 0.9, 1.2 -> 1, 0.9; running max 0.9, 1, 1
    assert holm([0.9, 0.3, 0.6]) == pytest.approx([1.0, 0.9, 1.0], abs=1e-15)
    assert holm([0.037]) == [0.037] and holm([]) == []  # m = 1: the identity
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, math.nan])


def test_holm_monotone_in_sorted_order_and_not_below_raw():
    rng = np.random.default_rng(3)
    for m in (2, 5, 17):
        p = list(rng.uniform(0, 0.2, size=m) ** 2)
        adj = holm(p)
        order = np.argsort(p)
        assert all(x >= y for x, y in zip(adj, p)) and all(x <= 1 for x in adj)
        assert all(adj[i] <= adj[j] for i, j in zip(order, order[1:]))
        assert adj[order[0]] == pytest.approx(m * p[order[0]])  # the smallest is plain Bonferroni


def test_paired_t_p_is_scipys_one_sample_t_and_is_005_where_the_95_interval_touches_zero():
    d = [0.012, -0.004, 0.021, 0.009, 0.015, -0.002, 0.011]
    assert paired_t_p(d) == pytest.approx(float(st.ttest_1samp(d, 0.0).pvalue), rel=1e-10)
    assert paired_t_p([-x for x in d]) == pytest.approx(paired_t_p(d), rel=1e-12)
    # shift d so that its mean is the 95 % half-width: the interval's lower end is 0, the two-sided p exactly 0.05
    p = paired(d, [0.0] * len(d))
    half = p.high - p.mean
    touching = [x - p.mean + half for x in d]
    assert paired(touching, [0.0] * len(d)).low == pytest.approx(0.0, abs=1e-15)
    assert paired_t_p(touching) == pytest.approx(0.05, rel=1e-9)
    assert paired_t_p([x + 0.01 * half for x in touching]) < 0.05 < paired_t_p([x - 0.01 * half for x in touching])
    assert math.isnan(paired_t_p([0.3])) and math.isnan(paired_t_p([0.2, 0.2]))


def test_tost_is_two_one_sided_tests_and_below_005_exactly_when_the_90_interval_is_inside_the_bounds():
    for d in ([0.004, -0.006, 0.010, 0.001, -0.003], [-0.02, -0.011, -0.015, -0.018, -0.009, -0.013], [0.5, 1.5, 1.0]):
        zeros = [0.0] * len(d)
        p90 = paired(d, zeros, level=0.90)
        edge = max(abs(p90.low), abs(p90.high))  # the smallest bound that holds the 90 % interval
        for bound in (edge * 0.98, edge * 0.9999, edge * 1.0001, edge * 1.05, edge * 2):
            inside = -bound < p90.low and p90.high < bound
            # independent: H0 mean <= -bound against 'greater', H0 mean >= bound against 'less'
            lower = st.ttest_1samp(d, -bound, alternative="greater").pvalue
            upper = st.ttest_1samp(d, bound, alternative="less").pvalue
            assert tost(d, bound) == pytest.approx(max(lower, upper), rel=1e-9)
            assert (tost(d, bound) < 0.05) == inside
        assert tost(d, edge) == pytest.approx(0.05, rel=1e-9)
    assert math.isnan(tost([0.1], 1.0))


def test_accuracy_and_pearson_are_the_plain_definitions():
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 0.5
    x, y = [0.1, 0.5, 0.2, 0.9, 0.4], [1.0, 2.5, 0.5, 4.0, 2.0]
    assert pearson(y, x) == pytest.approx(st.pearsonr(x, y).statistic, rel=1e-12)
    assert math.isnan(pearson(y, [1.0] * 5))


def _replicates(rng, k, m, noise_a, noise_b):
    y = rng.normal(size=m)
    return y, list(y + noise_a * rng.normal(size=(k, m))), list(y + noise_b * rng.normal(size=(k, m)))


def test_bootstrap_of_identical_predictions_is_zero():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=50)
    preds = [rng.integers(0, 3, size=50) for _ in range(4)]
    out = paired_bootstrap(y, preds, [p.copy() for p in preds], accuracy, strata=[8, 8, 16, 16], n_boot=300)
    assert (out["mean"], out["low"], out["high"], out["std"]) == (0.0, 0.0, 0.0, 0.0)


def test_bootstrap_one_replicate_is_the_normal_limit_of_the_per_example_differences():
    # k = 1: T* is the mean of c_a − c_b over resampled examples, std √(var(c_a − c_b)/m)
    rng = np.random.default_rng(7)
    m = 4000
    y = rng.integers(0, 2, size=m)
    right_a, right_b = rng.random(m) < 0.8, rng.random(m) < 0.75
    a, b = np.where(right_a, y, 1 - y), np.where(right_b, y, 1 - y)
    d = right_a.astype(float) - right_b.astype(float)
    se = math.sqrt(d.var(ddof=1) / m)
    out = paired_bootstrap(y, [a], [b], accuracy, strata=["all"], n_boot=2000, seed=1)
    assert out["mean"] == pytest.approx(d.mean(), abs=1e-12)
    assert out["std"] == pytest.approx(se, rel=0.10)
    half = 1.96 * se
    assert out["low"] == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert out["high"] == pytest.approx(d.mean() + half, abs=0.15 * half)


def test_bootstrap_distribution_of_a_tiny_case_enumerated_by_hand():
    # labels y = (1, 0); k = 2 replicates in one stratum, m = 2 examples, accuracy.
    # replicate 0: a = (1, 0) right on both, b = (0, 0) wrong on example 0: per-example c_a − c_b = (1, 0)
    # replicate 1: a = b = (0, 1) wrong on both: per-example differences (0, 0)
    # example resamples (0,0), (0,1), (1,0), (1,1): replicate 0's accuracy difference 1, 1/2, 1/2, 0; replicate 1's 0.
    # replicate resamples (0,0), (0,1), (1,0), (1,1), T* = mean over them:
    #   (0,0): 1, 1/2, 1/2, 0    (0,1) and (1,0): 1/2, 1/4, 1/4, 0 each    (1,1): 0, 0, 0, 0
    # 16 equally likely outcomes; by (replicate multiset, T*): ({0,0},1) 1, ({0,0},1/2) 2, ({0,0},0) 1,
    # ({0,1},1/2) 2, ({0,1},1/4) 4, ({0,1},0) 2, ({1,1},0) 4; T*: 1 ×1, 1/2 ×4, 1/4 ×4, 0 ×7.
    # T on the data: (1/2 + 0)/2 = 1/4. Percentiles: P(T* = 0) = 7/16 > 2.5 %, P(T* = 1) = 1/16 > 2.5 %: low 0, high 1.
    y = [1, 0]
    out = paired_bootstrap(y, [[1, 0], [0, 1]], [[0, 0], [0, 1]], accuracy, strata=["s", "s"], n_boot=20000, return_draws=True)
    assert out["mean"] == 0.25 and (out["low"], out["high"]) == (0.0, 1.0)
    n = len(out["draws"])
    joint = Counter((tuple(sorted(r)), float(t)) for r, t in zip(out["replicates"].tolist(), out["draws"]))
    expected = {
        ((0, 0), 1.0): 1,
        ((0, 0), 0.5): 2,
        ((0, 0), 0.0): 1,
        ((0, 1), 0.5): 2,
        ((0, 1), 0.25): 4,
        ((0, 1), 0.0): 2,
        ((1, 1), 0.0): 4,
    }
    assert set(joint) == set(expected)
    for key, count in expected.items():
        assert joint[key] / n == pytest.approx(count / 16, abs=0.012), key
    assert float(np.mean(out["draws"])) == pytest.approx(0.25, abs=0.01)


def test_bootstrap_resamples_replicates_within_strata_keeping_their_counts():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=6)
    strata = ["s", "t", "s", "t"]
    ones, zeros = np.ones(6), np.zeros(6)
    # a metric that counts: replicate i scores 1 if in stratum s, else 0, so T* = (replicates of s drawn)/4
    a = [ones if s == "s" else zeros for s in strata]
    out = paired_bootstrap(y, a, [zeros] * 4, lambda _, p: float(p.mean()), strata, n_boot=500, return_draws=True)
    assert out["mean"] == 0.5 and np.all(out["draws"] == 0.5)
    reps = out["replicates"]
    assert reps.shape == (500, 4)
    assert np.all(np.isin(reps, [0, 2]).sum(axis=1) == 2) and np.all(np.isin(reps, [1, 3]).sum(axis=1) == 2)
    assert set(np.unique(reps)) == {0, 1, 2, 3} and any(len(set(r)) < 4 for r in reps.tolist())  # with replacement
    # unequal strata: the lone replicate of its stratum is in every draw, exactly once
    lone = paired_bootstrap(y, a, [zeros] * 4, accuracy, [1, 1, 1, 2], n_boot=200, return_draws=True)["replicates"]
    assert np.all((lone == 3).sum(axis=1) == 1)


def test_bootstrap_same_seed_same_result_other_seed_other_draws():
    y, a, b = _replicates(np.random.default_rng(5), k=4, m=80, noise_a=1.0, noise_b=1.3)
    kw = {"strata": [0, 0, 1, 1], "n_boot": 200, "return_draws": True}
    one, two, other = (paired_bootstrap(y, a, b, pearson, seed=s, **kw) for s in (11, 11, 12))
    assert np.array_equal(one["draws"], two["draws"]) and np.array_equal(one["replicates"], two["replicates"])
    assert {k: one[k] for k in ("mean", "low", "high", "std")} == {k: two[k] for k in ("mean", "low", "high", "std")}
    assert not np.array_equal(one["draws"], other["draws"]) and one["mean"] == other["mean"]
    assert (one["n_boot"], one["level"], one["seed"], other["seed"]) == (200, 0.95, 11, 12)


def test_bootstrap_vectorised_metrics_agree_with_the_generic_path_and_scipy():
    y, a, b = _replicates(np.random.default_rng(9), k=5, m=120, noise_a=0.8, noise_b=1.1)
    kw = {"strata": [1, 1, 2, 2, 2], "n_boot": 150, "seed": 4, "return_draws": True}
    fast = paired_bootstrap(y, a, b, pearson, **kw)
    slow = paired_bootstrap(y, a, b, lambda l, p: st.pearsonr(p, l).statistic, **kw)
    assert np.allclose(fast["draws"], slow["draws"], rtol=0, atol=1e-12)
    by_scipy = np.mean([st.pearsonr(ai, y).statistic - st.pearsonr(bi, y).statistic for ai, bi in zip(a, b)])
    assert fast["mean"] == pytest.approx(by_scipy, abs=1e-12)
    classes = [np.round(x).astype(int) for x in (y, *a, *b)]
    ya, ab = classes[0], classes[1:]
    fast = paired_bootstrap(ya, ab[:5], ab[5:], accuracy, **kw)
    slow = paired_bootstrap(ya, ab[:5], ab[5:], lambda l, p: float(np.mean(l == p)), **kw)
    assert np.array_equal(fast["draws"], slow["draws"])
    with pytest.raises(ValueError, match="k strata"):
        paired_bootstrap(y, a, b, pearson, strata=[1, 2])
