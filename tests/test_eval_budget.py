"""bench/eval_budget.py measures the settings the files hold: its "chosen" is params.yaml's default and its
"inherited" is what --preset sharpness_detailed gives."""

from __future__ import annotations

from pathlib import Path

from bench import eval_budget
from pipeline.config.load import load_params
from pipeline.config.presets import load_preset

ROOT = Path(__file__).resolve().parents[1]


def as_candidate(sp) -> dict:
    return dict(
        spaces=tuple(sp.spaces),
        examples=sp.examples,
        metric_examples=sp.metric_examples,
        radii=tuple(sp.radii),
        n_directions=sp.n_directions,
        alphas=tuple(sp.attack_alphas),
        curve=sp.curve_points,
    )


def test_chosen_is_the_default_and_inherited_is_the_detailed_preset(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert as_candidate(load_params(ROOT / "params.yaml").eval.sharpness) == eval_budget.CHOSEN
    assert as_candidate(load_preset("sharpness_detailed")[2].eval.sharpness) == eval_budget.INHERITED
    assert (
        list(eval_budget.CANDIDATES.values())[0] == eval_budget.INHERITED
        and list(eval_budget.CANDIDATES.values())[-1] == eval_budget.CHOSEN
    )
