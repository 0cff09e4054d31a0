"""Presets (pipeline/presets/*.yaml): complete, valid params files; ``--preset`` validates before copying."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import run
from pipeline.config import ConfigError, load_params
from pipeline.errors import UserError

PRESETS = sorted(run.PRESETS.glob("*.yaml"))


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {"smollm2_gsm8k_cpu", "smollm2_gsm8k_gpu"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_valid_and_complete(path: Path):
    import yaml

    p = load_params(path)
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == {"data", "base", "train", "eval", "merge", "tracking"}  # complete: every section spelled out
    assert p.train.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert p.data.tasks == ["gsm8k"] and p.merge.task == "gsm8k"


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
