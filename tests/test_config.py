"""params.yaml validation: every problem at once, by dotted path; the run command exits 2 and touches nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config.load import ConfigError, load_params, validate_dict
from pipeline.config.schema import params_model

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_are_valid_and_match_defaults_schema():
    p = load_params(ROOT / "params.yaml")
    assert p.train.methods == ["lora", "bilora"] and p.train.seeds == [0] and len(p.data.tasks) == 1


def test_every_field_is_documented():
    def walk(model):
        for name, f in model.model_fields.items():
            assert f.description or name in {"data", "base", "train", "eval", "merge", "tracking"}, (
                f"{model.__name__}.{name} lacks a description"
            )
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(params_model())


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
        (lambda r: r["tracking"].__setitem__("register_model", ""), "tracking.register_model"),
        (lambda r: r["tracking"].__setitem__("register_model", 3), "tracking.register_model"),
    ],
)
def test_single_mistakes(mutate, loc):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(raw)
    with pytest.raises(ConfigError) as e:
        validate_dict(raw)
    assert any(l == loc or l.startswith(loc + ".") for l, _ in e.value.problems), e.value.problems


def test_register_model_is_off_by_default_and_takes_a_name():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert load_params(ROOT / "params.yaml").tracking.register_model is None
    del raw["tracking"]["register_model"]
    assert validate_dict(raw).tracking.register_model is None  # the schema's default, not only params.yaml's
    raw["tracking"]["register_model"] = "bilora-sst2"
    assert validate_dict(raw).tracking.register_model == "bilora-sst2"


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


@pytest.mark.parametrize(
    "data, where, char",
    [(b"\x00\x01\x02", "line 1, column 1", "U+0000"), (b"data:\n  tasks: [sst2]\n  x: a\x07b\n", "line 3, column 7", "U+0007")],
)
def test_control_characters_are_one_config_error_with_their_line(tmp_path, data, where, char):
    f = tmp_path / "params.yaml"
    f.write_bytes(data)
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert e.value.problems == [(where, f"not valid YAML: character {char} is not allowed (special characters are not allowed); remove it")]


def test_validate_command_rejects_control_characters_with_exit_2_no_traceback(tmp_path):
    (tmp_path / "params.yaml").write_bytes(b"\x00\x01\x02")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "pipeline.validate"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out and "ReaderError" not in out, out
    assert out.count("error:") == 1 and "line 1, column 1" in out and "U+0000" in out


# -- non-finite numbers, cross-field constraints, duplicate keys -----------------------------------
def _params_text() -> str:
    return (ROOT / "params.yaml").read_text()


def _line_of(text: str, line: str) -> int:
    return text.splitlines().index(line) + 1


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_numbers_are_rejected_by_dotted_path(value):
    raw = yaml.safe_load(_params_text())
    raw["train"]["bilora"]["rho"] = value
    raw["train"]["loop"]["epochs"] = value
    raw["train"]["loop"]["max_grad_norm"] = value  # float | None
    raw["data"]["split_seed"] = value  # int field
    raw["eval"]["sharpness"]["radii"] = [0.01, value]
    raw["eval"]["sharpness"]["attack_alphas"] = [value, 1.0]
    with pytest.raises(ConfigError) as e:
        validate_dict(raw)
    locs = {loc for loc, _ in e.value.problems}
    assert locs == {
        "train.bilora.rho",
        "train.loop.epochs",
        "train.loop.max_grad_norm",
        "data.split_seed",
        "eval.sharpness.radii.1",
        "eval.sharpness.attack_alphas.0",
    }
    assert all("finite" in msg for _, msg in e.value.problems), e.value.problems


def _non_finite_text() -> str:
    return (
        _params_text().replace("    rho: 0.05\n    aux_rank", "    rho: .inf\n    aux_rank").replace("radii: [0.05]", "radii: [0.05, .NaN]")
    )


def test_non_finite_yaml_spellings_are_rejected(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text(_non_finite_text())
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert {loc for loc, _ in e.value.problems} == {"train.bilora.rho", "eval.sharpness.radii.1"}


def test_batch_size_must_divide_by_nproc_per_node():
    raw = yaml.safe_load(_params_text())
    raw["train"]["distributed"]["nproc_per_node"] = 3
    assert raw["train"]["loop"]["batch_size"] == 32
    with pytest.raises(ConfigError) as e:
        validate_dict(raw)
    assert [loc for loc, _ in e.value.problems] == ["train.distributed.nproc_per_node"]
    assert "divisible" in e.value.problems[0][1]
    raw["train"]["distributed"]["nproc_per_node"] = 4
    assert validate_dict(raw).train.distributed.nproc_per_node == 4


def test_cross_field_problems_are_reported_together_by_dotted_path():
    raw = yaml.safe_load(_params_text())
    raw["train"]["distributed"]["nproc_per_node"] = 3  # 32 % 3
    raw["data"].update(train_subset=4, val_fraction=0.9)  # round(3.6) = 4 held out: no training rows
    with pytest.raises(ConfigError) as e:
        validate_dict(raw)
    assert {loc for loc, _ in e.value.problems} == {"train.distributed.nproc_per_node", "data.val_fraction"}
    raw["data"].update(train_subset=4, val_fraction=0.5)
    raw["train"]["distributed"]["nproc_per_node"] = 2
    raw["merge"].update(task="cola", seed=7)  # merge target outside the matrix: one problem per key
    with pytest.raises(ConfigError) as e:
        validate_dict(raw)
    assert {loc for loc, _ in e.value.problems} == {"merge.task", "merge.seed"}


def test_duplicate_keys_name_the_dotted_key_and_both_lines(tmp_path):
    text = _params_text()
    lr, exp, tasks = _line_of(text, "    lr: 1.0e-3"), _line_of(text, "  experiment: bilora"), _line_of(text, "  tasks: [sst2]")
    text = text.replace("    lr: 1.0e-3\n", "    lr: 1.0e-3\n    lr: 2.0e-3\n")  # nested, adjacent
    text = text.replace("  experiment: bilora\n", "  experiment: bilora\n  experiment: other\n")
    text += "data:\n  tasks: [rte]\n"  # a whole section, far from the first
    f = tmp_path / "params.yaml"
    f.write_text(text)
    lines = text.splitlines()
    with pytest.raises(ConfigError) as e:
        load_params(f)
    problems = dict(e.value.problems)
    assert set(problems) == {"train.loop.lr", "tracking.experiment", "data"}  # all at once, nothing else
    assert f"line {lr}," in problems["train.loop.lr"] and f"line {lr + 1}" in problems["train.loop.lr"]
    exp += 1  # the inserted lr line shifted it
    assert f"line {exp}," in problems["tracking.experiment"] and f"line {exp + 1}" in problems["tracking.experiment"]
    assert f"line {tasks - 1}," in problems["data"] and f"line {len(lines) - 1}" in problems["data"]
    assert lines[len(lines) - 2] == "data:" and lines[tasks - 2] == "data:"


def test_duplicate_keys_in_flow_mappings_and_list_entries(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("data: {tasks: [sst2], tasks: [rte]}\nx:\n  - a: 1\n    a: 2\n")
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert e.value.problems == [
        ("data.tasks", "duplicate key: first on line 1, again on line 1 (YAML would keep only the last; remove one)"),
        ("x.0.a", "duplicate key: first on line 3, again on line 4 (YAML would keep only the last; remove one)"),
    ]


# -- the README run command: exit 2, one message, no traceback, outputs untouched ----------------
def _dup_key_text() -> str:
    return _params_text().replace("    rho: 0.05\n    aux_rank", "    rho: 0.05\n    rho: 0.1\n    aux_rank")


RUN_CASES = [
    (
        "mixed-mistakes",
        lambda: yaml.safe_dump(_bad_params()),
        ["train.bilora.rho", "train.loop.learning_rate", "train.loop.batch_size", "train.methods", "train.lora.r", "data.tasks"],
    ),
    ("non-finite", _non_finite_text, ["train.bilora.rho", "eval.sharpness.radii.1", "finite"]),
    (
        "batch-vs-nproc",
        lambda: _params_text().replace("nproc_per_node: 1 ", "nproc_per_node: 3 "),
        ["train.distributed.nproc_per_node", "divisible"],
    ),
    ("control-characters", lambda: "\x00\x01\x02", ["line 1, column 1", "U+0000", "not valid YAML"]),
    (
        "duplicate-key",
        _dup_key_text,
        [
            "train.bilora.rho",
            f"line {_line_of(_params_text(), '    rho: 0.05')},",
            f"line {_line_of(_params_text(), '    rho: 0.05') + 1}",
            "duplicate key",
        ],
    ),
]


@pytest.mark.parametrize("case", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_command_rejects_bad_params_with_exit_2_no_traceback_and_no_side_effects(tmp_path, case):
    """The README's run command validates before dvc repro: one message, exit 2, outputs untouched."""
    _, params_text, needles = case
    text = params_text()
    assert text != _params_text()
    work = tmp_path / "repo"
    work.mkdir()
    (work / ".dvc").mkdir()
    (work / "params.yaml").write_text(text)
    sentinel = work / "artifacts" / "finetune" / "x" / "adapter_model.safetensors"
    sentinel.parent.mkdir(parents=True)
    sentinel.write_bytes(b"keep me")
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*")}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "pipeline.run"], cwd=work, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    out = r.stdout + r.stderr
    assert "Traceback" not in out
    for needle in needles:
        assert needle in out, needle
    assert out.count("error:") == 1  # ONE message listing every problem
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*")} == before
    assert sentinel.read_bytes() == b"keep me"
    assert (work / "params.yaml").read_text() == text
