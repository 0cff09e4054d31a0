"""bench/finetune_order.py: the alternating order and the account of the gap, on hand-made stage rows."""

from __future__ import annotations

from bench import finetune_order


def test_rounds_alternate_which_method_runs_first():
    assert finetune_order.order(3) == [
        "sst2-bilora-0",
        "sst2-lora-0",
        "sst2-lora-0",
        "sst2-bilora-0",
        "sst2-bilora-0",
        "sst2-lora-0",
    ]


def test_report_means_and_the_step_time_account():
    def row(run, wall, med):
        return {"run": run, "wall_s": wall, "steps": 100, "median_step_s": med, "train_process_s": wall - 10}

    rows = [
        row("sst2-bilora-0", 90.0, 0.70),
        row("sst2-lora-0", 104.0, 0.82),
        row("sst2-lora-0", 100.0, 0.80),
        row("sst2-bilora-0", 94.0, 0.72),
    ]
    info = dict(command="c", commit="abc", date="d", machine="m", load_before="0", load_after="0")
    text = finetune_order.report(info, rows)
    # LoRA: wall (104 + 100) / 2 = 102, training (94 + 90) / 2 = 92, median (0.82 + 0.80) / 2 = 0.81; Bi-LoRA: 92, 82, 0.71
    assert "| sst2-lora-0 | 2 | 102.0 | 92.0 | 0.810 |" in text
    assert "| sst2-bilora-0 | 2 | 92.0 | 82.0 | 0.710 |" in text
    # gaps: wall 102 - 92 = 10 s, training 92 - 82 = 10 s, 100 steps x (0.81 - 0.71) = 10 s; mean s/step 94 / 100
    assert "stage wall +10.0 s, training process +10.0 s, 100 steps × median step time +10.0 s" in text
    assert "| 2 | finetune@sst2-lora-0 | 104.0 | 100 | 94.0 | 0.940 | 0.820 |" in text
    assert text.count("| finetune@") == 4
