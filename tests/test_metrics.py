"""bilora.metrics against values derived by hand on small cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bilora import metrics

# preds / labels shared by the accuracy and F1 cases
P = [1, 0, 1, 1, 0]
Y = [1, 1, 1, 0, 0]

# Tolerances. Every metric is a float64 formula over small integer counts or short float64 vectors: a handful of
# correctly rounded operations (sums of integers or halves are exact; then a few products, a division, a sqrt), so
# results are within a few ulp of the exact value (ulp ≤ 2.2e-16 for values ≤ 1; all observed identical). abs=1e-15
# (≥ 4.5 ulp) where there are ≤ 3 roundings; abs=1e-14 (≥ 45 ulp) for MCC, Pearson and Spearman, which take a dozen
# or so. Neither depends on the CPU.


def test_accuracy():
    # positions 0, 2, 4 agree -> 3 / 5
    assert metrics.accuracy(P, Y) == pytest.approx(0.6, abs=1e-15)
    assert metrics.accuracy(np.array(P), np.array(Y, dtype=np.int64)) == pytest.approx(0.6, abs=1e-15)
    assert metrics.accuracy(["true", "false"], ["true", "true"]) == 0.5
    assert isinstance(metrics.accuracy(P, Y), float)


def test_f1_binary():
    # positive=1: TP = {0, 2}, FP = {3}, FN = {1} -> 2*2 / (2*2 + 1 + 1) = 2/3
    assert metrics.f1_binary(P, Y) == pytest.approx(2 / 3, abs=1e-15)
    # positive=0: TP = {4}, FP = {1}, FN = {3} -> 2 / (2 + 1 + 1) = 1/2
    assert metrics.f1_binary(P, Y, positive=0) == pytest.approx(0.5, abs=1e-15)
    # no predicted and no true positives: defined as 0.0
    assert metrics.f1_binary([0, 0, 0], [0, 0, 0]) == 0.0
    # positives predicted but none true: precision 0 -> 0.0
    assert metrics.f1_binary([1, 1, 0], [0, 0, 0]) == 0.0
    assert metrics.f1_binary([1, 0, 1], [1, 0, 1]) == 1.0


def _from_confusion(cm: list[list[int]]) -> tuple[list[int], list[int]]:
    """preds, labels realising confusion matrix cm (rows = true class, columns = predicted class)."""
    preds, labels = [], []
    for t, row in enumerate(cm):
        for p, count in enumerate(row):
            labels += [t] * count
            preds += [p] * count
    return preds, labels


def test_mcc_binary_hand_computed():
    # TN=3, FP=2, FN=1, TP=6
    preds, labels = _from_confusion([[3, 2], [1, 6]])
    tp, tn, fp, fn = 6, 3, 2, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # 16 / sqrt(1120)
    assert expected == pytest.approx(16 / math.sqrt(1120), abs=1e-15)
    assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(expected, abs=1e-14)
    # shuffling the pairs changes nothing
    rng = np.random.default_rng(0)
    order = rng.permutation(len(preds))
    assert metrics.matthews_corrcoef(np.array(preds)[order], np.array(labels)[order]) == pytest.approx(expected, abs=1e-14)


def test_mcc_multiclass_hand_computed():
    # rows true, columns predicted
    cm = [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    preds, labels = _from_confusion(cm)
    # t = row sums = [4, 3, 3], p = column sums = [4, 3, 3], c = trace = 7, s = 10
    # MCC = (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))
    #     = (70 - 34) / sqrt(66 * 66) = 36 / 66 = 6/11
    assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(6 / 11, abs=1e-14)


def test_mcc_edge_cases():
    # ±1 exactly: the numerator equals sqrt(denominator), the square of an integer (see the note on tolerances above)
    assert metrics.matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0, abs=1e-15)
    assert metrics.matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0, abs=1e-15)
    # a single predicted class: denominator is zero -> 0.0
    assert metrics.matthews_corrcoef([1, 1, 1, 1], [0, 1, 1, 0]) == 0.0
    assert metrics.matthews_corrcoef([1, 1], [1, 1]) == 0.0
    # class values need not be 0..K-1
    preds, labels = _from_confusion([[3, 2], [1, 6]])
    relabel = {0: 5, 1: 9}
    assert metrics.matthews_corrcoef([relabel[v] for v in preds], [relabel[v] for v in labels]) == pytest.approx(
        16 / math.sqrt(1120), abs=1e-14
    )


def test_pearson_hand_computed():
    x, y = [1, 2, 3, 4], [2, 4, 5, 9]
    # centred: x = [-1.5, -0.5, 0.5, 1.5], y = [-3, -1, 0, 4]; sum xy = 11, sum xx = 5, sum yy = 26
    assert metrics.pearson(x, y) == pytest.approx(11 / math.sqrt(130), abs=1e-14)
    assert metrics.pearson(x, [-v for v in y]) == pytest.approx(-11 / math.sqrt(130), abs=1e-14)
    assert metrics.pearson(x, x) == pytest.approx(1.0, abs=1e-15)
    # constant input: undefined -> 0.0
    assert metrics.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    # non-finite predictions -> nan, not an exception
    assert math.isnan(metrics.pearson([1.0, float("nan"), 3.0], [1, 2, 3]))


def test_pearson_float64_precision():
    # large offset, tiny spread: float32 arithmetic would lose this; the result is computed in float64
    x = 1e8 + np.array([0.0, 1.0, 2.0, 3.0])
    y = np.array([2.0, 4.0, 5.0, 9.0])
    r = metrics.pearson(x, y)
    assert isinstance(r, float)
    assert r == pytest.approx(11 / math.sqrt(130), abs=1e-14)


def test_spearman_with_ties():
    x = [10, 20, 20, 30, 40]
    y = [1, 3, 2, 2, 5]
    # average ranks, worked by hand: x -> [1, 2.5, 2.5, 4, 5]; y sorted 1,2,2,3,5 -> [1, 4, 2.5, 2.5, 5]
    rx = [1, 2.5, 2.5, 4, 5]
    ry = [1, 4, 2.5, 2.5, 5]
    assert metrics.spearman(x, y) == pytest.approx(metrics.pearson(rx, ry), abs=1e-15)
    # and by hand: centred ranks [-2,-.5,-.5,1,2] and [-2,1,-.5,-.5,2]: 7.25 / sqrt(9.5 * 9.5) = 29/38
    assert metrics.spearman(x, y) == pytest.approx(29 / 38, abs=1e-14)


def test_spearman_monotone_and_constant():
    x = [0.1, 0.5, 2.0, 3.0, 10.0]
    assert metrics.spearman(x, [v**3 for v in x]) == pytest.approx(1.0, abs=1e-15)
    assert metrics.spearman(x, [-math.exp(v) for v in x]) == pytest.approx(-1.0, abs=1e-15)
    assert metrics.spearman([2, 2, 2], [1, 2, 3]) == 0.0
    assert math.isnan(metrics.spearman([1.0, float("inf"), 3.0], [1, 2, 3]))


def test_rank_average_matches_definition():
    a = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    # sorted: 1,1 -> ranks 1,2 -> 1.5; 2 -> 3; 3,3,3 -> ranks 4,5,6 -> 5
    np.testing.assert_array_equal(metrics._rank_average(a), [5, 1.5, 5, 3, 5, 1.5])


def test_compute():
    # compute() only dispatches by name: the values are the ones checked to a few ulp above, so pytest's default
    # rel 1e-6 suffices to tell which metric ran (0.6 vs 2/3, ...)
    out = metrics.compute(("accuracy", "f1"), P, Y)
    assert list(out) == ["accuracy", "f1"]
    assert out["accuracy"] == pytest.approx(0.6) and out["f1"] == pytest.approx(2 / 3)
    out = metrics.compute(["mcc", "accuracy"], *reversed(_from_confusion([[3, 2], [1, 6]])))
    assert out["mcc"] == pytest.approx(16 / math.sqrt(1120))
    out = metrics.compute(["pearson", "spearman"], [1, 2, 3, 4], [2, 4, 5, 9])
    assert out == {"pearson": pytest.approx(11 / math.sqrt(130)), "spearman": pytest.approx(1.0)}
    assert metrics.compute(["exact_match"], ["72", "1000"], ["72", "100"]) == {"exact_match": 0.5}
    with pytest.raises(ValueError, match="bleu"):
        metrics.compute(["accuracy", "bleu"], P, Y)


@pytest.mark.parametrize("fn", [metrics.accuracy, metrics.f1_binary, metrics.matthews_corrcoef, metrics.pearson, metrics.spearman])
def test_bad_inputs(fn):
    with pytest.raises(ValueError, match="length"):
        fn([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="1-D"):
        fn([[0.1, 0.9], [0.8, 0.2]], [1, 0])


def test_no_forbidden_imports():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(metrics.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert not roots & {"sklearn", "scipy", "pipeline", "stages", "torch"}, roots


def test_committed_figures_are_rounded_to_significant_digits():
    from pipeline.report.precision import rounded

    # hand-derived: 4 significant digits, nested containers, exact types kept
    assert rounded(0.8061926605504587) == 0.8062
    assert rounded(3.805860420533731e-05) == 3.806e-05
    assert rounded(-2.7721405029296875) == -2.772
    assert rounded(1234567.0) == 1235000.0
    assert rounded({"a": [0.33359843, 7], "n": 872, "ok": True, "s": "x", "z": 0.0}) == {
        "a": [0.3336, 7],
        "n": 872,
        "ok": True,
        "s": "x",
        "z": 0.0,
    }
    assert math.isnan(rounded(float("nan"))) and rounded(float("inf")) == float("inf")
    # a spread is written to its mean's decimal place: mean 1.701e-3 -> 1e-6 resolution -> std 7e-6
    flat = {"r0.01.mean": 0.0017014294862747192, "r0.01.std": 7.156e-06, "n": 2}
    assert rounded(flat) == {"r0.01.mean": 0.001701, "r0.01.std": 7e-06, "n": 2}
    assert rounded({"mean": 2.5, "std": 0.01234}) == {"mean": 2.5, "std": 0.012}
    assert rounded({"mean": 0.0, "std": 0.01234}) == {"mean": 0.0, "std": 0.01234}  # no mean scale: significant digits
    # the emulated-AVX2 and AVX-512 runs of the default pipeline gave std 7.153e-6 and 7.156e-6 (same mean)
    assert rounded({"x.mean": 0.001701, "x.std": 7.153e-06}) == rounded({"x.mean": 0.001701, "x.std": 7.156e-06})
    # two float32 runs that differ in the last bits (cross-CPU summation order) record the same figure
    assert rounded(0.6977776885032654) == rounded(0.6977777481079102) == 0.6978


def test_improvement_respects_the_metric_direction():
    # the report's "seeds better" counts: a lower held-out loss is an improvement, a lower accuracy is not
    assert metrics.improvement("accuracy", 0.81, 0.80) == pytest.approx(0.01)
    assert metrics.improvement("loss", 0.9266, 0.9249) == pytest.approx(-0.0017)
    assert metrics.improvement("perplexity", 2.5, 2.6) == pytest.approx(0.1)
    assert metrics.improvement("base_loss", 1.0, 1.0) == 0.0
