"""The second science protocol (limited data): its runs, subsets, fit rule, preset and report."""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline.config.load import validate_dict
from pipeline.config.presets import load_preset
from pipeline.data.prepare import split_indices
from pipeline.science import limited, limited_report, limited_sweep, stats
from pipeline.science.limited import Run

ROOT = Path(__file__).resolve().parents[1]


def default_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_preset_validates_and_every_run_resolves_from_it(monkeypatch):
    monkeypatch.chdir(ROOT)
    _, _, p = load_preset(limited.PRESET)
    assert set(p.data.tasks) == set(limited.TASKS) and tuple(p.train.methods) == limited.ARMS
    assert p.base.quant.enabled and p.base.quant.quant_type == "nf4" and p.base.quant.compute_dtype == "auto"
    assert not p.eval.sharpness.enabled and p.train.loop.perturbation_every > 0  # diagnostics on, ball attack off
    name, cfg = p.train.resolve("bilora_rho0.5_auxlr10x")
    assert name == "bilora" and cfg["rho"] == 0.5 and cfg["aux_lr"] == pytest.approx(10 * p.train.loop.lr)
    assert p.train.resolve("bilora")[1]["rho"] == 0.05 and p.train.resolve("bilora")[1]["aux_lr"] is None  # the paper's
    runs = limited.sweep_runs()
    assert len(runs) == len(set(runs)) == 2 * 2 * 3 * 8 == 96
    assert len({r.name for r in runs + limited.fit_runs()}) == 96 + len(limited.fit_runs())
    for run in runs[:12] + limited.fit_runs():  # one whole replicate (every task, size, arm) and the fit phase
        q = validate_dict(limited_sweep.run_params(default_params(), run), run.name)
        assert q.data.tasks == [run.task] and q.train.methods == [run.method] and q.train.seeds == [run.replicate]
        assert q.eval.train_subset == run.size and not q.eval.sharpness.enabled
        assert q.train.loop.lr == 5e-4 and q.train.loop.batch_size == 32 and q.train.loop.perturbation_every == 25  # the preset's loop
        assert q.train.loop.max_steps == (run.steps or 400)  # fit: its own budget; sweep: the fit phase's choice (Revision 2)


def test_subset_is_a_pure_function_of_the_seed_and_shared_by_the_arms():
    default = default_params()
    for task in limited.TASKS:
        for n in limited.SIZES:
            data = [limited_sweep.run_params(default, Run("sweep", task, arm, n, 3))["data"] for arm in limited.ARMS]
            assert data[0] == data[1] == data[2]  # the arms of a replicate read the same subset
            seeds = [limited_sweep.run_params(default, Run("sweep", task, arm, n, 3))["train"]["seeds"] for arm in limited.ARMS]
            assert seeds == [[3]] * 3

    def cfg(n: int, r: int) -> SimpleNamespace:
        return SimpleNamespace(split_seed=limited.split_seed(n, r), train_subset=limited.drawn(n), val_fraction=limited.VAL_FRACTION)

    for n in limited.SIZES:
        train, val = split_indices(3668, cfg(n, 0))
        assert len(train) == n and len(val) == limited.val_rows(n) and not set(train) & set(val)
        assert (train, val) == split_indices(3668, cfg(n, 0))  # pure function of the seed
        assert set(train) != set(split_indices(3668, cfg(n, 1))[0])  # a fresh subset per replicate
    seeds = {limited.split_seed(n, r) for n in limited.SIZES for r in range(limited.REPLICATES)}
    assert len(seeds) == len(limited.SIZES) * limited.REPLICATES  # every (size, replicate) draws its own


def _fit(task: str, steps: int, value: float) -> dict:
    return {
        "name": Run("fit", task, "lora", limited.FIT_SIZE, 0, steps).name,
        "task": task,
        "metrics": {"train": {limited.PRIMARY[task]: value}},
    }


def test_fit_rule_picks_the_smallest_budget_that_fits_both_tasks():
    s0, s1, s2 = limited.FIT_STEPS
    runs = {x["name"]: x for x in [_fit("mrpc", s0, 0.97), _fit("stsb", s0, 0.90)]}
    assert limited_sweep.fitted_steps(runs) is None  # the next budget has not run yet
    runs |= {x["name"]: x for x in [_fit("mrpc", s1, 0.99), _fit("stsb", s1, 0.951)]}
    assert limited_sweep.fitted_steps(runs) == s1
    runs |= {x["name"]: x for x in [_fit("mrpc", s0, 0.95), _fit("stsb", s0, 0.95)]}  # the threshold itself fits
    assert limited_sweep.fitted_steps(runs) == s0
    # a budget one task misses is ruled out without the other task's run
    runs = {x["name"]: x for x in [_fit("stsb", s0, 0.7), _fit("stsb", s1, 0.96), _fit("mrpc", s1, 0.99)]}
    assert limited_sweep.excluded(runs) == {s0} and limited_sweep.fitted_steps(runs) == s1
    bad = {x["name"]: x for s in limited.FIT_STEPS for x in [_fit("mrpc", s, 0.9), _fit("stsb", s, 0.99)]}
    with pytest.raises(limited_sweep.UserError, match="fit rule fails"):
        limited_sweep.fitted_steps(bad)


def _summary(run: Run, labels: list[float], preds: list[float], value: float) -> dict:
    return {
        "name": run.name,
        "task": run.task,
        "size": run.size,
        "cpu": {"class": "avx2"},
        "metrics": {"test": {limited.PRIMARY[run.task]: value}, "train": {limited.PRIMARY[run.task]: 1.0}},
        "finetune": {"median_step_time": 1.0, "perturbation": {"perturbation.relative_increase": 0.01} if run.method != "lora" else {}},
        "test_labels": labels,
        "test_predictions": preds,
    }


def _sums(gain: dict[tuple[str, str], float], replicates: int = limited.REPLICATES) -> dict[str, dict]:
    """Synthetic summaries: the test value of an arm is LoRA's + gain + a replicate-specific wobble."""
    rng = random.Random(0)
    labels = {t: [float(i % 2) for i in range(40)] for t in limited.TASKS}
    out = {}
    for run in limited.sweep_runs():
        if run.replicate >= replicates:
            continue
        base = 0.8 + 0.01 * run.replicate
        v = base + gain.get((run.task, run.method), 0.0) + (0.002 * rng.uniform(-1, 1) if run.method != "lora" else 0.0)
        preds = [y if i >= 4 else 1 - y for i, y in enumerate(labels[run.task])]
        out[run.name] = _summary(run, labels[run.task], preds, v)
    return out


def test_primary_analysis_pools_both_sizes_and_holm_corrects_the_four_contrasts():
    gain = {("stsb", "bilora"): 0.02, ("mrpc", "bilora"): -0.02}
    sums = _sums(gain)
    res = limited_report.analyse(sums, boot=False)
    rows = {(r["task"], r["arm"]): r for r in res["contrasts"]}
    assert len(rows) == 4 and res["runs_done"] == 96
    r = rows[("stsb", "bilora")]
    a = [sums[Run("sweep", "stsb", "bilora", n, k).name]["metrics"]["test"]["pearson"] for n in limited.SIZES for k in range(8)]
    b = [sums[Run("sweep", "stsb", "lora", n, k).name]["metrics"]["test"]["pearson"] for n in limited.SIZES for k in range(8)]
    assert r["n"] == 16 and r["t"] == stats.paired(a, b).to_dict()  # the pooled paired interval over 16 pairs
    assert r["holm_p"] == pytest.approx(stats.holm([x["p"] for x in res["contrasts"]])[list(rows).index(("stsb", "bilora"))])
    assert r["call"] == "Bi-LoRA better" and rows[("mrpc", "bilora")]["call"] == "Bi-LoRA worse"
    # a wobble of ±0.002 around 0 is well inside the SESOIs (0.005, 0.008): equivalence is called
    assert rows[("stsb", "bilora_rho0.5_auxlr10x")]["call"].startswith("equivalent")
    assert set(r["per_size"]) == set(limited.SIZES)


def test_calls_wait_for_a_complete_sweep_and_the_report_renders():
    res = limited_report.analyse(_sums({}, replicates=3), boot=False)
    assert res["runs_done"] == 36 and all(r["call"].startswith("pending") and "holm_p" not in r for r in res["contrasts"])
    text = limited_report.render(res, Path("/nonexistent"))
    assert "36 of 96" in text and "Not written" in text


def test_bootstrap_of_the_primary_analysis_matches_the_predictions():
    sums = _sums({})
    res = limited_report.analyse(sums, boot=True)
    for r in res["contrasts"]:
        b = r["bootstrap"]  # every arm predicts the same: the difference on any resample is exactly 0
        assert b["mean"] == b["low"] == b["high"] == 0.0 and b["n_boot"] == 2000 and not math.isnan(b["std"])


@pytest.mark.slow  # extracts the revision and imports its pipeline in a subprocess
def test_runs_resolve_with_the_pinned_revisions_own_code(monkeypatch):
    """The hash and settings come from the code of limited.CODE_REV (its RunConfig layout), and differ per replicate."""
    from pipeline.science import sweep

    monkeypatch.chdir(ROOT)
    code = sweep.code_identity(limited.CODE_REV)
    default = yaml.safe_load(sweep.git("show", f"{limited.CODE_REV}:params.yaml", cwd=ROOT))
    runs = [Run("sweep", "mrpc", "bilora_rho0.5_auxlr10x", 256, r) for r in (0, 1)]
    got = sweep.resolve([(r, limited_sweep.run_params(default, r)) for r in runs], code, limited.PRESET)
    assert [g["settings"]["seed"] for g in got] == [0, 1] and got[0]["hash"] != got[1]["hash"]
    assert got[0]["settings"]["method_key"] == "bilora" and got[0]["settings"]["method_config"]["aux_lr"] == pytest.approx(5e-3)


def test_mrpc_adapter_is_saved_in_bf16_with_its_subset(tmp_path):
    """What the sweep keeps per MRPC run: the primary adapter cast to bf16 and subset.json naming its rows."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.science import sweep

    run = Run("sweep", "mrpc", "bilora", 256, 3)
    src = tmp_path / "ws" / "artifacts" / "finetune" / f"{run.task}-{run.method}-{run.seed}" / "adapter"
    src.mkdir(parents=True)
    weights = {"lora_A": torch.randn(8, 16), "lora_B": torch.randn(16, 8)}
    save_file(weights, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text('{"r": 8}')
    out = sweep.save_adapter(run, tmp_path / "ws", tmp_path / "adapters")
    assert out == tmp_path / "adapters" / run.name
    got = load_file(out / "adapter_model.safetensors")
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], weights[k].to(torch.bfloat16)) for k in weights)
    sub = limited_sweep.subset(run, 3668)
    (out / "subset.json").write_text(json.dumps(sub))
    cfg = SimpleNamespace(split_seed=limited.split_seed(256, 3), train_subset=limited.drawn(256), val_fraction=limited.VAL_FRACTION)
    assert (sub["train_rows"], sub["validation_rows"]) == split_indices(3668, cfg) and len(sub["train_rows"]) == 256
    assert sub["split_seed"] == 256003
