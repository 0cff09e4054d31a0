"""params.yaml validation: every problem at once, by dotted path; the run command exits 2 and touches nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, Params, load_params, validate_dict

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_are_valid_and_match_defaults_schema():
    p = load_params(ROOT / "params.yaml")
    assert p.train.methods == ["lora", "bilora"] and p.train.seeds == [0] and len(p.data.tasks) == 1


def test_every_field_is_documented():
    def walk(model):
        for name, f in model.model_fields.items():
            assert f.description or name in {"data", "base", "train", "eval", "merge", "tracking"}, f"{model.__name__}.{name} lacks a description"
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(Params)


def _bad_params() -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["bilora"]["rho"] = -0.1  # negative rho
    raw["train"]["loop"]["learning_rate"] = 1e-3  # typo'd key
    raw["train"]["loop"]["batch_size"] = "sixteen"  # wrong type
    raw["train"]["methods"] = ["lora", "bilora", "sam_lora"]  # unknown method
    raw["train"]["lora"]["r"] = 0  # rank 0
    raw["data"]["tasks"] = ["mnli"]  # unknown task
    return raw


def test_all_mistakes_reported_at_once_by_dotted_path():
    with pytest.raises(ConfigError) as e:
        validate_dict(_bad_params())
    locs = {loc for loc, _ in e.value.problems}
    assert {"train.bilora.rho", "train.loop.learning_rate", "train.loop.batch_size", "train.lora.r", "data.tasks"} <= locs
    assert any(loc.startswith("train.methods") for loc in locs)
    assert "unknown key" in str(e.value)


@pytest.mark.parametrize(
    "mutate, loc",
    [
        (lambda r: r["train"]["loop"].__setitem__("lr", 0), "train.loop.lr"),
        (lambda r: r["train"].__setitem__("methods", []), "train.methods"),
        (lambda r: r["train"]["flat_lora"].__setitem__("sigma", -1), "train.flat_lora.sigma"),
        (lambda r: r["merge"].__setitem__("mode", "bf16"), "merge.mode"),
        (lambda r: r["train"].__setitem__("seeds", [0, 0]), "train.seeds"),
        (lambda r: r["data"].__setitem__("val_fraction", 1.5), "data.val_fraction"),
        (lambda r: r.__setitem__("trian", {}), "trian"),
    ],
)
def test_single_mistakes(mutate, loc):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(raw)
    with pytest.raises(ConfigError) as e:
        validate_dict(raw)
    assert any(l == loc or l.startswith(loc + ".") for l, _ in e.value.problems), e.value.problems


def test_merge_target_must_be_in_matrix():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["merge"]["method"] = "lora_sam"
    with pytest.raises(ConfigError, match="merge.method"):
        validate_dict(raw)


def test_yaml_syntax_error_names_line(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("data:\n  tasks: [sst2\n")
    with pytest.raises(ConfigError, match="line"):
        load_params(f)


def test_run_command_rejects_bad_params_with_exit_2_no_traceback_and_no_side_effects(tmp_path):
    """The README's run command validates before dvc repro: one message, exit 2, outputs untouched."""
    work = tmp_path / "repo"
    work.mkdir()
    (work / ".dvc").mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(_bad_params()))
    sentinel = work / "artifacts" / "finetune" / "x" / "adapter_model.safetensors"
    sentinel.parent.mkdir(parents=True)
    sentinel.write_bytes(b"keep me")
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*")}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "pipeline.run"], cwd=work, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    out = r.stdout + r.stderr
    assert "Traceback" not in out
    for loc in ("train.bilora.rho", "train.loop.learning_rate", "train.loop.batch_size", "train.methods", "train.lora.r", "data.tasks"):
        assert loc in out, loc
    assert out.count("error:") == 1  # ONE message listing every problem
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*")} == before
    assert sentinel.read_bytes() == b"keep me"
