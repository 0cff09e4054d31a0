"""The exploratory checks of the science report (pipeline/science/exploratory.py) against hand-computed values."""

from __future__ import annotations

import pytest

from pipeline.science import exploratory, report
from tests.test_science import _summary


def _bilora(seed: int, norms: list[float], clipped: list[float], rho: float = 0.05) -> dict:
    s = _summary("mrpc", "bilora", seed, 0.8, 0.2)
    s["settings"] = {"method_key": "bilora", "method_config": {"rho": rho, "aux_rank": 8}}
    s["history"] = [{"step": i + 1.0, "aux_norm": c, "aux_clipped": k} for i, (c, k) in enumerate(zip(norms, clipped))]
    return s


def test_aux_on_ball_counts_projected_steps_and_the_late_norm_over_rho():
    # seed 0: c = 0, 0.04, 0.06, 0.05 -> projected once (c = rho is not above it): 1/4; second half 0.06, 0.05 -> median 0.055 = 1.1 rho
    # seed 1: c = 0.01, 0.07, 0.052, 0.054 -> projected 3 of 4; second half median 0.053 = 1.06 rho
    runs = [
        _bilora(0, [0.0, 0.04, 0.06, 0.05], [0.0, 0.0, 1.0, 0.0]),
        _bilora(1, [0.01, 0.07, 0.052, 0.054], [0.0, 1.0, 1.0, 1.0]),
        _summary("mrpc", "lora", 0, 0.8, 0.2),  # no auxiliary: not counted
        _bilora(0, [0.1] * 4, [1.0] * 4) | {"phase": "tune", "name": "tune"},  # tuning runs are not compared runs
    ]
    aux = exploratory.aux_on_ball(runs)
    assert list(aux) == ["mrpc"] and list(aux["mrpc"]) == ["bilora"]
    cell = aux["mrpc"]["bilora"]
    assert cell["rho"] == 0.05 and cell["seeds"] == [0, 1]
    assert cell["clipped"] == pytest.approx([0.25, 0.75]) and cell["ratio"] == pytest.approx([1.1, 1.06])
    md = "\n".join(exploratory.markdown(runs, report.ball))
    assert "| mrpc | bilora | 0.05 | 2 | 50 (25-75) % | 1.080 (1.060-1.100) |" in md
    assert "Revision 6" in md and "no claim rests on it" in md


def test_attack_tightness_is_projected_over_one_step_per_seed_and_skips_a_zero_one_step():
    a = _summary("mrpc", "lora", 0, 0.8, 0.2)  # pgd = 0.2 r, one-step = 0.1 r -> 2.0 at every radius
    b = _summary("mrpc", "lora", 1, 0.8, 0.2)
    b["sharpness"]["spaces"]["full"]["ball"]["radii"][1].update(pgd=0.3, one_step=0.1)  # r = 0.5: 3.0
    b["sharpness"]["spaces"]["full"]["ball"]["radii"][0].update(one_step=0.0)  # r = 0.05: no ratio
    tight = exploratory.attack_tightness([a, b], report.ball)
    assert tight["mrpc"]["lora"][0.05] == pytest.approx([2.0])
    assert tight["mrpc"]["lora"][0.5] == pytest.approx([2.0, 3.0])
    md = "\n".join(exploratory.markdown([a, b], report.ball))
    assert "| mrpc | lora | 2.00 (2.00-2.00) | 2.50 (2.00-3.00) |" in md
