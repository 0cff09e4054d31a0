"""The pilot's rule for the smallest rho whose auxiliary bites (pipeline/science/pilot.py), on hand-made rows."""

from __future__ import annotations

from pipeline.science import pilot


def _row(setting: str, rel: float) -> dict:
    return {"setting": setting, "method": "bilora", "second_half_median": {"perturbation.relative_increase": rel}}


def test_smallest_rho_per_aux_lr_by_hand():
    rows = [
        _row("bilora_rho0.05", 0.01),
        _row("bilora_rho0.2", 0.05),  # exactly 5 %: counts
        _row("bilora_rho0.5", 0.20),
        _row("bilora_rho0.05_auxlr10x", 0.049),  # just under
        _row("bilora_rho0.2_auxlr10x", -0.3),
        _row("bilora_rho0.5_auxlr10x", 0.09),
        _row("lora_sam_rho0.05", 0.5) | {"method": "lora_sam"},  # not Bi-LoRA: never counts
    ]
    text = pilot.smallest_rho(rows)
    assert "aux lr = eta: rho = 0.2;" in text and "aux lr = 10 eta: rho = 0.5." in text
    assert "no rho" in pilot.smallest_rho([_row("bilora_rho0.5", 0.0499)])


def test_settings_cover_the_issue_grid():
    bilora = {(cfg["rho"], cfg["aux_lr"] / pilot.LR) for name, cfg in pilot.SETTINGS.values() if name == "bilora"}
    assert bilora == {(rho, k) for rho in (0.05, 0.2, 0.5) for k in (1.0, 10.0)}
    assert {s for s, (name, _) in pilot.SETTINGS.items() if name != "bilora"} == {"lora_sam_rho0.01", "lora_sam_rho0.05", "flat_lora"}
