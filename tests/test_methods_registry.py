"""One definition per setting: method configs, derived schema, run variants and plugin methods."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from bilora import methods
from bilora.config import DistributedConfig, LoraSpec
from bilora.methods.method import _REGISTRY
from bilora.settings import setting_fields
from bilora.sharpness.config import SharpnessConfig
from bilora.train import FineTuner, LoopConfig
from pipeline.config.load import ConfigError, validate_dict
from pipeline.config.sections import to_settings
from tests.tiny import cls_examples, collate, peft_bert

ROOT = Path(__file__).resolve().parents[1]
# Keys whose params.yaml value deliberately differs from the library default (the light default run).
OVERRIDES = {
    "train.loop.batch_size": 32,
    "train.loop.lr": 1.0e-3,
    "train.bilora.fused": True,
}


def raw_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def library_defaults() -> dict:
    """params.yaml keys of every library-derived section, at the dataclass defaults."""
    sections = {"train.loop": LoopConfig, "eval.sharpness": SharpnessConfig, "train.lora": LoraSpec, "train.distributed": DistributedConfig}
    out = {}
    for key, cls in methods.registry().items():
        for f in dataclasses.fields(cls.config_class):
            out[f"train.{key}.{f.name}"] = f.default
    for prefix, cls in sections.items():
        for f in setting_fields(cls):
            out[f"{prefix}.{f.name}"] = list(f.default) if isinstance(f.default, tuple) else f.default
    return out


def test_params_yaml_agrees_with_library_defaults_except_listed_overrides():
    got = flat(raw_params())
    defaults = library_defaults()
    missing = sorted(set(defaults) - set(got))
    assert not missing, f"params.yaml lacks {missing} (DVC needs every tracked key there)"
    differ = {k: got[k] for k in defaults if got[k] != defaults[k]}
    assert differ == OVERRIDES, "params.yaml overrides of library defaults changed; update OVERRIDES (or the defaults) deliberately"


def test_schema_defaults_and_help_come_from_the_dataclasses():
    p = validate_dict({})
    assert to_settings(p.train.loop) == LoopConfig()
    assert to_settings(p.eval.sharpness) == SharpnessConfig()
    assert p.train.method_config("eflat_lora") == dataclasses.asdict(methods.config_class("eflat_lora")())
    field = type(p.train.bilevel_lora).model_fields["upper_steps"]
    assert "Upper-level" in field.description
    assert p.train.method_config("lora") == {}  # the lora method adds nothing to train.lora


@pytest.mark.parametrize(
    "key, value, path",
    [("bilevel_lora", {"upper_steps": 0}, "train.bilevel_lora.upper_steps"), ("eflat_lora", {"beta": 0.0}, "train.eflat_lora.beta")],
)
def test_bounds_agree_between_constructor_and_schema(key, value, path):
    with pytest.raises(ValueError, match=path):
        methods.build(key, value)
    raw = raw_params()
    raw["train"][key].update(value)
    with pytest.raises(ConfigError) as e:
        validate_dict(raw)
    assert [loc for loc, _ in e.value.problems] == [path]


def test_variant_validates_and_resolves():
    raw = raw_params()
    raw["train"]["variants"] = {"bilora_rho0.2": {"method": "bilora", "rho": 0.2}}
    raw["train"]["methods"] = ["lora", "bilora", "bilora_rho0.2"]
    raw["merge"]["method"] = "bilora_rho0.2"
    p = validate_dict(raw)
    key, cfg = p.train.resolve("bilora_rho0.2")
    assert key == "bilora" and cfg == p.train.method_config("bilora") | {"rho": 0.2}
    assert methods.build(key, cfg).cfg.rho == 0.2


def test_variant_mistakes_reported_together_by_dotted_path():
    raw = raw_params()
    raw["train"]["variants"] = {
        "bilora": {"method": "bilora", "rho": 0.2},  # clashes with a method
        "x1": {"method": "sam", "rho": 0.1},  # unknown method
        "x2": {"method": "bilora", "rhoo": 0.1},  # unknown key
        "x3": {"method": "bilora", "rho": -1.0},  # out of bounds
    }
    raw["train"]["methods"] = ["lora", "x4"]
    raw["train"]["loop"]["lr"] = -1
    with pytest.raises(ConfigError) as e:
        validate_dict(raw)
    locs = [loc for loc, _ in e.value.problems]
    assert set(locs) >= {
        "train.variants.bilora",
        "train.variants.x1.method",
        "train.variants.x2.rhoo",
        "train.variants.x3.rho",
        "train.methods.1",
        "train.loop.lr",
    }, locs


def test_finetune_depends_on_its_run_file_and_configure_on_the_train_section():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "params" not in stages["finetune"]  # no train.* section: a method edit re-runs only its runs
    assert "artifacts/runs/${item.task}-${item.method}-${item.seed}.json" in stages["finetune"]["deps"]
    assert set(stages["configure"]["params"]) == {"train", "data.tasks"} and stages["configure"]["outs"] == ["artifacts/runs"]


def test_run_files_change_only_for_the_runs_a_setting_determines(tmp_path):
    from pipeline.config import runs

    raw = raw_params()
    raw["train"]["methods"] = ["lora", "bilora", "flat_lora", "bilora_rho0.2"]
    raw["train"]["variants"] = {"bilora_rho0.2": {"method": "bilora", "rho": 0.2}}
    raw["train"]["seeds"] = [0, 1]
    names = runs.write_all(validate_dict(raw), tmp_path / "a")
    assert sorted(names) == sorted(f"sst2-{m}-{s}" for m in raw["train"]["methods"] for s in (0, 1))
    variant = json.loads((tmp_path / "a" / "sst2-bilora_rho0.2-1.json").read_text())
    assert variant["method"] == "bilora_rho0.2" and variant["method_key"] == "bilora" and variant["seed"] == 1
    assert variant["method_config"] == {**dataclasses.asdict(methods.config_class("bilora")(fused=True)), "rho": 0.2}
    assert variant["loop"]["lr"] == 1e-3 and variant["lora"]["r"] == 8 and variant["distributed"]["nproc_per_node"] == 1

    def changed(edit) -> set[str]:
        r = yaml.safe_load(yaml.safe_dump(raw))
        edit(r)
        out = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        runs.write_all(validate_dict(r), out)
        return {f.stem for f in out.iterdir() if f.read_bytes() != (tmp_path / "a" / f.name).read_bytes()}

    assert changed(lambda r: r["train"]["flat_lora"].update(sigma=0.1)) == {"sst2-flat_lora-0", "sst2-flat_lora-1"}
    assert changed(lambda r: r["train"]["bilora"].update(aux_rank=4)) == {
        f"sst2-{m}-{s}" for m in ("bilora", "bilora_rho0.2") for s in (0, 1)
    }
    assert changed(lambda r: r["train"]["bilora"].update(rho=0.1)) == {"sst2-bilora-0", "sst2-bilora-1"}  # the variant sets its own rho
    assert changed(lambda r: r["train"]["variants"]["bilora_rho0.2"].update(rho=0.3)) == {"sst2-bilora_rho0.2-0", "sst2-bilora_rho0.2-1"}
    assert changed(lambda r: r["train"]["lora_sam"].update(rho=0.5)) == set()  # not in the matrix
    assert len(changed(lambda r: r["train"]["loop"].update(lr=2e-3))) == 8
    assert changed(lambda r: r["eval"].update(batch_size=8)) == set()


def test_a_run_file_round_trips_to_the_same_run_and_a_missing_one_says_what_configure_wrote(tmp_path, monkeypatch):
    from pipeline.config import runs
    from pipeline.stage import layout
    from pipeline.terminal.user_error import UserError

    monkeypatch.chdir(tmp_path)
    raw = raw_params()
    raw["train"]["variants"] = {"bilora_rho0.5": {"method": "bilora", "rho": 0.5}}
    raw["train"]["methods"] = ["lora", "bilora", "bilora_rho0.5"]
    p = validate_dict(raw)
    with pytest.raises(UserError, match="configure"):
        runs.read("sst2", "lora", 0)
    runs.write_all(p, layout.RUNS)
    run = runs.read("sst2", "bilora_rho0.5", 0)  # typed: the method's settings object, loop, primary adapter, distributed
    assert run == runs.RunConfig.from_params(p, "sst2", "bilora_rho0.5", 0)
    assert isinstance(run.method_config, methods.config_class("bilora")) and run.method_config.rho == 0.5 and run.method_config.fused
    assert isinstance(run.loop, LoopConfig) and run.loop.lr == 1e-3 and run.lora == LoraSpec() and run.distributed == DistributedConfig()
    # finetune trains from the file alone: a params.yaml edit is configure's (DVC re-runs it), not finetune's to detect
    assert runs.read("sst2", "bilora", 0).method_config.rho == 0.05
    for args, needle in (
        (("mnli", "lora", 0), r"--task: no run of task 'mnli'.*tasks there: \['sst2'\]"),
        (("sst2", "sam", 0), r"--method: no run of method 'sam'.*runs there: \['bilora', 'bilora_rho0.5', 'lora'\]"),
        (("sst2", "lora", 7), r"--seed: no run with seed 7.*seeds there: \['0'\]"),
    ):
        with pytest.raises(UserError, match=needle):
            runs.read(*args)


def test_mlflow_params_of_a_run_are_its_own_settings_only():
    from pipeline.config import runs
    from pipeline.tracking.experiment import flatten

    raw = raw_params()
    raw["train"]["variants"] = {"bilora_rho0.5": {"method": "bilora", "rho": 0.5}}
    raw["train"]["methods"] = ["lora", "bilora", "bilora_rho0.5"]
    p = validate_dict(raw)
    lora, bilora, variant = (flatten(runs.RunConfig.from_params(p, "sst2", m, 0).params()) for m in raw["train"]["methods"])
    assert lora["method"] == "lora" and lora["lora.r"] == 8 and lora["loop.lr"] == 1e-3
    assert not any(k.startswith(("bilora.", "lora_sam.", "flat_lora.", "train.", "data.")) for k in lora)
    differ = {k for k in lora.keys() | bilora.keys() if (k in lora, lora.get(k)) != (k in bilora, bilora.get(k))}
    assert differ == {"method", "method_key"} | {f"bilora.{f.name}" for f in dataclasses.fields(methods.config_class("bilora"))}
    assert variant["method"] == "bilora_rho0.5" and variant["method_key"] == "bilora" and variant["bilora.rho"] == 0.5


TOY = '''
"""A toy seventh method: LoRA whose loss is scaled (one file, registered with its config)."""
from dataclasses import dataclass
from typing import ClassVar

from bilora import adapters
from bilora.methods.method import Method, StepContext, register
from bilora.settings import Settings, setting


@dataclass(frozen=True)
class ToyConfig(Settings):
    """Toy settings."""

    section: ClassVar[str] = "train.toy_scaled"
    scale: float = setting(1.0, "Factor on the primary gradient.", gt=0)


@register("toy_scaled", config=ToyConfig)
class ToyScaled(Method):
    def step(self, ctx: StepContext) -> dict:
        loss = ctx.forward_backward()
        for p in adapters.primary_parameters(ctx.model):
            if p.grad is not None:
                p.grad.mul_(self.cfg.scale)
        return {"loss": loss, "grad_norm": ctx.clip_and_step(adapters.primary_parameters(ctx.model), loss)}
'''


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    (tmp_path / "toy_method_mod.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "toy_method_mod"
    _REGISTRY.pop("toy_scaled", None)
    sys.modules.pop("toy_method_mod", None)


def test_plugin_method_validates_and_trains_one_step(toy_module):
    raw = raw_params()
    raw["train"]["plugins"] = [toy_module]
    raw["train"]["methods"] = ["lora", "bilora", "toy_scaled"]
    raw["train"]["toy_scaled"] = {"scale": 3.0}
    bad = yaml.safe_load(yaml.safe_dump(raw))
    bad["train"]["toy_scaled"] = {"scale": -1.0}
    with pytest.raises(ConfigError) as e:
        validate_dict(bad)
    assert [loc for loc, _ in e.value.problems] == ["train.toy_scaled.scale"]
    p = validate_dict(raw)
    key, cfg = p.train.resolve("toy_scaled")
    assert cfg == {"scale": 3.0}
    from pipeline.config.runs import RunConfig

    run = RunConfig.from_params(p, "sst2", "toy_scaled", 0)  # its run file names the module that registers it
    assert run.plugin == toy_module and run.params()["toy_scaled"] == {"scale": 3.0}
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    torch.manual_seed(0)
    model = peft_bert()
    method = methods.build(key, cfg, seed=0)
    before = {n: t.detach().clone() for n, t in model.named_parameters() if t.requires_grad}
    ft = FineTuner(model, method, cls_examples(16), collate, LoopConfig(batch_size=8, max_steps=1, lr=1e-2, warmup_ratio=0.0), seed=0)
    summary = ft.train()
    assert summary["steps"] == 1 and summary["method"] == "toy_scaled"
    assert any(not torch.equal(before[n], t) for n, t in model.named_parameters() if t.requires_grad)


def test_bad_plugin_is_a_params_problem(tmp_path):
    raw = raw_params()
    raw["train"]["plugins"] = ["no_such_module_xyz"]
    with pytest.raises(ConfigError) as e:
        validate_dict(raw)
    assert [loc for loc, _ in e.value.problems] == ["train.plugins.0"]


def test_variant_through_validate_cli_and_one_step(tmp_path):
    raw = raw_params()
    raw["train"]["variants"] = {"bilora_rho0.2": {"method": "bilora", "rho": 0.2, "fused": False}}
    raw["train"]["methods"] = ["lora", "bilora", "bilora_rho0.2"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-m", "pipeline.validate", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 method(s)" in r.stdout
    p = validate_dict(raw)
    key, cfg = p.train.resolve("bilora_rho0.2")
    torch.manual_seed(0)
    model = peft_bert()
    method = methods.build(key, cfg, seed=0)
    ft = FineTuner(model, method, cls_examples(16), collate, LoopConfig(batch_size=8, max_steps=1, lr=1e-2, warmup_ratio=0.0), seed=0)
    ft.train()
    from bilora import adapters
    from bilora.methods.bilora import aux_norm

    assert method.cfg.rho == 0.2 and ft.history[0]["aux_clipped"] == 1.0  # lr 1e-2 ascent leaves the 0.2-ball
    # projected back onto the variant's radius; float32 rescale by sqrt(rho/c) rounds at ~1e-7 relative
    assert float(aux_norm(adapters.lora_factors(model, adapters.AUX))) == pytest.approx(0.2, rel=1e-5)
