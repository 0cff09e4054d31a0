"""Presets (pipeline/presets/*.yaml): complete, valid params files; ``--preset`` validates before copying."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import run
from pipeline.config import ConfigError, load_params
from pipeline.errors import UserError

PRESETS = sorted(run.PRESETS.glob("*.yaml"))


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {"smollm2_gsm8k_cpu", "smollm2_gsm8k_gpu", "glue_comparison"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_valid_and_complete(path: Path):
    import yaml

    p = load_params(path)
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == {"data", "base", "train", "eval", "merge", "tracking"}  # complete: every section spelled out
    assert p.merge.task in p.data.tasks and p.merge.method in p.train.methods and p.merge.seed in p.train.seeds
    if path.stem.startswith("smollm2_gsm8k"):
        assert p.train.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        assert p.data.tasks == ["gsm8k"]


@pytest.mark.parametrize("name", ["smollm2_code_alpaca_cpu", "smollm2_code_alpaca_chat_cpu", "minilm_reviews_csv"])
def test_worked_example_presets_pass_the_data_check(name):
    """The worked examples' declared datasets read cleanly (what pipeline.run checks before dvc repro)."""
    from pipeline.catalog import check, get_task

    p = load_params(run.PRESETS / f"{name}.yaml")
    check(p.data, tracked="data")
    assert all(get_task(t, p.data).declared for t in p.data.tasks)


def test_comparison_preset_covers_the_method_matrix():
    from bilora import methods

    p = load_params(run.PRESETS / "glue_comparison.yaml")
    assert sorted(p.train.methods) == sorted(methods.available())  # every registered method
    assert len(p.train.seeds) >= 3 and len(p.data.tasks) >= 2
    assert p.base.quant.enabled and p.eval.sharpness.enabled and p.eval.sharpness.spaces == ["full", "lora"]


def test_apply_preset_copies_after_validation(tmp_path, monkeypatch):
    target = tmp_path / "params.yaml"
    target.write_text("old: true\n")
    run.apply_preset("smollm2_gsm8k_cpu", str(target))
    assert target.read_text() == (run.PRESETS / "smollm2_gsm8k_cpu.yaml").read_text()

    target.write_text("old: true\n")
    with pytest.raises(UserError, match="available presets"):
        run.apply_preset("no_such_preset", str(target))
    bad = tmp_path / "presets"
    bad.mkdir()
    (bad / "broken.yaml").write_text("data:\n  tasks: [nope]\n")
    monkeypatch.setattr(run, "PRESETS", bad)
    with pytest.raises(ConfigError):
        run.apply_preset("broken", str(target))
    assert target.read_text() == "old: true\n"  # invalid preset: params.yaml untouched
