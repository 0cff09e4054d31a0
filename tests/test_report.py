"""Report stage helpers that need no pipeline run (the full report is checked in test_pipeline)."""

from __future__ import annotations

from stages.report import _mean_std, _split_note


def test_split_note_names_each_test_file_and_glue_anchors_only_for_glue():
    gsm = _split_note(["gsm8k"], 20)
    assert "first 20 rows" in gsm and "gsm8k/test.jsonl" in gsm
    assert "GLUE" not in gsm and "T5" not in gsm  # no GLUE wording or T5 anchors on a GSM8K report
    glue = _split_note(["sst2", "mrpc"], None)
    assert "glue/SST-2/dev.tsv" in glue and "glue/MRPC/dev.tsv" in glue and "use dev" in glue and "T5-base" in glue
    assert "first" not in glue


def test_mean_std_is_sample_std():
    mean, std = _mean_std([1.0, 2.0, 4.0])
    # statistics.stdev against the float64 hand formula (inexact mean 7/3, three squares, a sqrt): a few roundings,
    # 1 ulp apart (2.2e-16 at 1.53, observed); 1e-15 ≈ 4.5 ulp, and a population std (1.25) would be far outside
    assert mean == 7 / 3 and abs(std - (((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2) ** 0.5) < 1e-15
    assert _mean_std([0.5]) == (0.5, 0.0)
