"""The science sweep: the preset covers the protocol, hashes decide what is skipped, the report reads summaries alone."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import yaml

from pipeline.config.load import validate_dict
from pipeline.config.presets import load_preset
from pipeline.science import protocol, report, stats, sweep
from pipeline.science.protocol import Run

ROOT = Path(__file__).resolve().parents[1]
CODE = {"commit": "c" * 40, "tree": "t" * 64}


def default_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@functools.cache
def pinned_code() -> dict[str, str]:
    """The pinned revision's code identity: resolutions with it share the sweep's cache with expected()."""
    return sweep.code_identity(protocol.CODE_REV)


def revision_params() -> dict:
    """The pinned revision's params.yaml: what a run's workspace starts from (the preset is merged over it)."""
    return yaml.safe_load(sweep.git("show", f"{protocol.CODE_REV}:params.yaml", cwd=ROOT))


def test_preset_validates_and_covers_every_run_of_the_protocol(monkeypatch):
    monkeypatch.chdir(ROOT)
    _, _, p = load_preset(protocol.PRESET)
    assert tuple(p.data.tasks) == protocol.TASKS and p.data.train_subset is None  # full train sets
    assert p.base.quant.enabled and p.base.quant.quant_type == "nf4" and p.base.quant.compute_dtype == "auto"  # fp32 compute on CPU
    runs = protocol.sweep_runs()
    assert {(r.task, r.method, r.seed) for r in runs} <= {(t, m, s) for t in p.data.tasks for m in p.train.methods for s in p.train.seeds}
    assert len(runs) == len(set(runs)) == 2 * (5 + 5 + 5 + 3 + 3)
    assert p.train.resolve("bilora") == ("bilora", p.train.resolve("bilora")[1]) and p.train.resolve("bilora")[1]["rho"] == 0.05
    assert p.train.resolve("bilora_rho0.5")[1]["rho"] == 0.5
    assert p.train.resolve("lora_sam")[1]["rho"] == 0.01 and p.train.resolve("flat_lora")[1]["sigma"] == 0.05
    sp = p.eval.sharpness
    assert tuple(sp.ball_radii) == protocol.RADII and {0.05, 0.5} <= set(sp.ball_radii) and sp.spaces == ["full"]
    assert sp.ball_restarts >= 1 and sp.ball_steps >= 2 and sp.ball_directions >= 1 and sp.enabled
    # every tuning run validates too, with its own lr and only LoRA seed 0
    for run in protocol.tune_runs():
        tp = validate_dict(sweep.run_params(default_params(), run), "tune")
        assert tp.train.loop.lr == run.lr and tp.train.methods == ["lora"] and tp.train.seeds == [0]
        assert not tp.eval.sharpness.enabled  # tuning looks at validation accuracy only
    assert len({r.name for r in protocol.tune_runs() + runs}) == len(protocol.tune_runs()) + len(runs)


def _hash(run: Run, params: dict, code: dict[str, str] | None = None) -> str:
    return sweep.run_hash(run, params, code or pinned_code())


def _changed(params: dict, path: str, value) -> dict:
    p = json.loads(json.dumps(params))
    node = p
    *parents, leaf = path.split(".")
    for k in parents:
        node = node.setdefault(k, {})
    node[leaf] = value
    return p


def test_every_committed_protocol_run_has_the_hash_the_sweep_computes_now(monkeypatch):
    """The committed summaries are the evidence of PROTOCOL.md: the hash the sweep expects for each run at the pinned
    revision and the current preset must be the one its summary holds, or status/report call it stale and `sweep run`
    reruns it. Fails when the hash starts to depend on anything but the revision, the preset and the run."""
    monkeypatch.chdir(ROOT)
    want = sweep.expected(protocol.CODE_REV)
    runs = protocol.tune_runs() + protocol.sweep_runs()
    summaries = {r.name: json.loads((ROOT / sweep.RUNS / f"{r.name}.json").read_text()) for r in runs}
    stale = [name for name, s in summaries.items() if s["hash"] != want[name]]
    assert not stale, f"{len(stale)} of {len(runs)} committed summaries no longer match: {stale}"
    code = pinned_code()
    with_params = [(r, summaries[r.name]) for r in runs if "params" in summaries[r.name]]  # the early tuning runs lack them
    assert len(with_params) >= len(protocol.sweep_runs())
    resolved = sweep.resolve([(r, s["params"]) for r, s in with_params], code)  # from the params each run really had
    assert [x["hash"] for x in resolved] == [s["hash"] for _, s in with_params]
    assert [x["settings"] for x in resolved] == [s["settings"] for _, s in with_params]


def test_hash_covers_what_determines_a_run_and_nothing_else(monkeypatch):
    monkeypatch.chdir(ROOT)
    run, other = Run("sweep", "mrpc", "bilora", 1), Run("sweep", "mrpc", "bilora", 2)
    base = sweep.run_params(revision_params(), run)
    variants = {
        "flatness setting": ("eval.sharpness.ball_steps", 7),
        "this run's method": ("train.bilora.rho", 0.1),
        "lr": ("train.loop.lr", 1e-3),
        "bookkeeping": ("tracking.experiment", "elsewhere"),
        "another method's setting": ("train.flat_lora.sigma", 0.1),
    }
    items = [(run, base), (run, sweep.run_params(revision_params(), run)), (other, base)]
    items += [(run, _changed(base, *v)) for v in variants.values()]
    hashes = [r["hash"] for r in sweep.resolve(items, pinned_code())]  # one subprocess in the revision's tree for all of them
    h, again, seed2, *rest = hashes
    changed = dict(zip(variants, rest))
    assert h == again and h != seed2  # deterministic; the seed counts
    assert h != _hash(run, base, pinned_code() | {"tree": "u" * 64})  # the code digest counts
    assert changed["flatness setting"] != h and changed["this run's method"] != h and changed["lr"] != h
    assert changed["bookkeeping"] == h and changed["another method's setting"] == h


def test_hash_is_resolved_by_the_pinned_revisions_code_not_this_checkouts(monkeypatch):
    """train.loop.perturbation_every came after the pinned revision (3be0001): its schema rejects the key, and the
    revision's resolved settings do not hold it, whatever this checkout's schema holds (this changed every hash once)."""
    monkeypatch.chdir(ROOT)
    run = Run("sweep", "mrpc", "bilora", 0)
    (resolved,) = sweep.resolve([(run, sweep.run_params(revision_params(), run))], pinned_code())
    assert "perturbation_every" not in resolved["settings"]["loop"]
    with pytest.raises(sweep.UserError, match=f"(?s){protocol.CODE_REV[:10]}.*perturbation_every: unknown key"):
        sweep.run_hash(run, _changed(sweep.run_params(revision_params(), run), "train.loop.perturbation_every", 10), pinned_code())


def test_a_run_whose_hash_is_committed_is_skipped(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    default = revision_params()
    runs = [Run("sweep", "mrpc", "lora", 0), Run("sweep", "mrpc", "bilora", 0), Run("sweep", "stsb", "lora", 0)]
    hashes = [_hash(r, sweep.run_params(default, r)) for r in runs]
    monkeypatch.setattr(sweep, "RUNS", tmp_path / "runs")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / f"{runs[0].name}.json").write_text(json.dumps({"hash": hashes[0]}))  # finished at this code
    (tmp_path / "runs" / f"{runs[1].name}.json").write_text(json.dumps({"hash": "stale"}))  # finished at other settings
    todo = sweep.pending(runs, default, pinned_code())
    assert [r for r, _, _ in todo] == runs[1:]
    assert [h for _, _, h in todo] == hashes[1:]
    assert sweep.pending(runs[:1], default, pinned_code()) == []


def test_code_identity_ignores_the_sweep_and_presets(monkeypatch):
    monkeypatch.chdir(ROOT)
    ident = sweep.code_identity("HEAD")
    assert len(ident["commit"]) == 40 and len(ident["tree"]) == 64 and ident == sweep.code_identity("HEAD")
    listing = sweep.git("ls-tree", "-r", "HEAD", "--", *sweep.CODE)
    assert "bilora/train.py" in listing and "pipeline/science/sweep.py" in listing  # present in git, excluded from the digest
    kept = [l for l in listing.splitlines() if not l.split("\t", 1)[1].startswith(sweep.NOT_CODE)]
    assert not any("pipeline/presets/" in l or "pipeline/science/" in l for l in kept) and any("stages/finetune.py" in l for l in kept)


def test_default_revision_is_the_commit_the_committed_runs_used(monkeypatch):
    """A fresh clone may lack the tag; the default --rev is a commit, and its code digest is the one recorded."""
    monkeypatch.chdir(ROOT)
    ident = sweep.code_identity(protocol.CODE_REV)
    assert ident["commit"] == protocol.CODE_REV
    recorded = [json.loads(f.read_text())["code"] for f in sorted((ROOT / "reports/science/runs").glob("*.json"))]
    assert recorded, "no committed run summaries"
    for code in recorded:
        if code["commit"] == protocol.CODE_REV:
            assert code == ident
    assert any(code["commit"] == protocol.CODE_REV for code in recorded)


def _summary(task: str, method: str, seed: int, test: float, pgd: float, phase: str = "sweep", lr=None, val=None) -> dict:
    radii = [
        {
            "radius": r,
            "one_step": pgd * 0.5 * r,
            "pgd": pgd * r,
            "pgd_restarts": [pgd * r],
            "random": {"mean": pgd * 0.01 * r, "std": 0.0, "min": 0.0, "max": 0.0, "values": [0.0]},
        }
        for r in (0.05, 0.5)
    ]
    name = Run(phase, task, method, seed, lr).name
    return {
        "name": name, "phase": phase, "task": task, "method": method, "seed": seed, "lr": lr, "hash": "h" + name,
        "code": CODE, "cpu": {"model": "test cpu", "class": "avx2", "cores": 2}, "wall_s": 60.0, "load_avg": [2.0, 2.4 if seed else 3.1],
        "metrics": {split: {"accuracy": v, "pearson": v} for split, v in (("test", test), ("train", test + 0.05), ("validation", val if val is not None else test))},
        "sharpness": {"spaces": {"full": {"ball": {"radii": radii}}}},
        "finetune": {"median_step_time": 1.0 if method == "lora" else 1.1},
    }  # fmt: skip


def test_report_pairs_by_seed_and_rebuilds_from_the_summaries_alone(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    lora = [0.80, 0.80, 0.80, 0.80, 0.80]
    bil = [0.81, 0.83, 0.82, 0.80, 0.84]  # differences 1, 3, 2, 0, 4 points: mean 2, CI 2 ± 1.963 (tests/test_science_stats.py)
    for s in range(5):
        for method, acc, pgd in (("lora", lora[s], 0.2), ("bilora", bil[s], 0.1 + 0.01 * s)):
            (runs / f"mrpc-{method}-{s}.json").write_text(json.dumps(_summary("mrpc", method, s, acc, pgd)))
    for lr, val in ((5e-4, 0.7), (1e-3, 0.75)):
        for task in protocol.TASKS:
            (runs / f"tune-lr{lr:g}-{task}-lora-0.json").write_text(json.dumps(_summary(task, "lora", 0, 0.7, 0.1, "tune", lr, val)))
    paths = report.write(runs, tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    vs = res["tasks"]["mrpc"]["methods"]["bilora"]["vs_lora"]
    assert vs["seeds"] == [0, 1, 2, 3, 4]
    assert vs["test"]["mean"] == pytest.approx(0.02) and vs["test"]["high"] - 0.02 == pytest.approx(
        2.776445 * math.sqrt(2.5e-4 / 5), rel=1e-5
    )
    # projected-attack increase at r = 0.5: bilora 0.5·(0.10..0.14) vs lora 0.5·0.2 -> mean difference 0.5·(0.12 − 0.2) = −0.04
    assert vs["ball"]["0.5"]["pgd"]["mean"] == pytest.approx(-0.04) and vs["ball"]["0.5"]["pgd"]["high"] < 0
    assert res["tasks"]["mrpc"]["methods"]["lora"]["gap"][0] == pytest.approx(0.05)
    assert res["tasks"]["mrpc"]["methods"]["bilora"]["step_time"] == {"avx2": [1.1] * 4}  # seed 0 ran at load 3.1 > 2.5
    md = (tmp_path / "report.md").read_text()
    assert "+2.00 [+0.04, +3.96] †" in md and "**H1: " in md
    assert "LoRA's mean test accuracy 80.00 meets the threshold." in md  # 80.00 ≥ 68.38 + 5
    assert "The sweep is incomplete" in md and "| **0.001** (chosen) |" in md and "no verdict" in md
    assert (
        "mrpc: LoRA seed 0 at the chosen lr reaches test accuracy 70.00 (learnability threshold 73.38, majority class + 5 points): it **does not meet** the rule."
        in md
    )
    assert (
        "stsb: LoRA seed 0 at the chosen lr reaches test pearson 70.00 (learnability threshold 70.00, Pearson 0.70): it meets the rule."
        in md
    )
    # the same files give the same bytes (nothing but the summaries is read)
    first = [p.read_bytes() for p in paths]
    assert [p.read_bytes() for p in report.write(runs, tmp_path)] == first
    # with the expected hashes, a summary from another revision is left out and named
    want = {json.loads(f.read_text())["name"]: json.loads(f.read_text())["hash"] for f in runs.glob("*.json")}
    report.write(runs, tmp_path, want | {"mrpc-bilora-4": "other"})
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["tasks"]["mrpc"]["methods"]["bilora"]["seeds"] == [0, 1, 2, 3]
    assert "are the evidence for Revision 3 of PROTOCOL.md): mrpc-bilora-4\n" in (tmp_path / "report.md").read_text()


def test_tuned_lr_is_the_best_mean_validation_score_smaller_on_ties(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "RUNS", tmp_path)
    assert sweep.tuned_lr() is None
    scores = {2e-4: (0.70, 0.60), 5e-4: (0.74, 0.62), 1e-3: (0.76, 0.60), 2e-3: (0.60, 0.50)}  # 5e-4 and 1e-3 tie at 0.68
    for lr, (mrpc, stsb) in scores.items():
        for task, val in (("mrpc", mrpc), ("stsb", stsb)):
            (tmp_path / f"tune-lr{lr:g}-{task}-lora-0.json").write_text(json.dumps(_summary(task, "lora", 0, 0.7, 0.1, "tune", lr, val)))
    assert sweep.tuned_lr() == 5e-4


def test_pre_registered_calls_follow_the_rule_and_the_verdict_is_included_once_complete(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    # bilora (5 seeds): test +1, +3, +2, 0, +4 points; projected increase at r = 0.05: 0.05·(0.1 + 0.01 s) vs LoRA 0.05·0.2,
    # differences 0.05·(−0.1 + 0.01 s) = −5, −4.5, −4, −3.5, −3 (×1e-3): mean −4e-3, s = 0.5e-3·√2.5, half-width
    # t(0.975, 4)·s/√5 = 2.776445 · 7.90569e-4 / 2.236068 = 9.81619e-4 -> supported, narrower than the effect, −40 % of LoRA's 0.01
    # bilora_rho0.5 (3 seeds): test −2, −2.5, −1.5 points: mean −2, s = 0.5, half-width 4.302653·0.5/√3 = 1.242069 -> contradicted;
    # projected increase at r = 0.5: 0.5·(0.1, 0.3, 0.26) vs 0.5·0.2: differences −0.05, +0.05, +0.03, mean 0.01 (+10 %),
    # s = √((36 + 16 + 4)e-4 / 2) = 0.0529150, half-width 4.302653·0.0529150/√3 = 0.131447 -> unresolved, wider than the effect
    lora, bil, rho = [0.80] * 5, [0.81, 0.83, 0.82, 0.80, 0.84], [0.78, 0.775, 0.785]
    for s in range(5):
        (runs / f"mrpc-lora-{s}.json").write_text(json.dumps(_summary("mrpc", "lora", s, lora[s], 0.2)))
        (runs / f"mrpc-bilora-{s}.json").write_text(json.dumps(_summary("mrpc", "bilora", s, bil[s], 0.1 + 0.01 * s)))
    for s, pgd in zip(range(3), (0.1, 0.3, 0.26)):
        (runs / f"mrpc-bilora_rho0.5-{s}.json").write_text(json.dumps(_summary("mrpc", "bilora_rho0.5", s, rho[s], pgd)))
    report.write(runs, tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    got = {(c["hypothesis"], c["method"]): c for c in res["calls"]}
    assert set(got) == {("H1", "bilora"), ("H1", "bilora_rho0.5"), ("H2", "bilora"), ("H2", "bilora_rho0.5")}
    h1 = got["H1", "bilora"]
    assert h1["radius"] == 0.05 and h1["n"] == 5 and h1["mean"] == pytest.approx(-4e-3)
    assert h1["half_width"] == pytest.approx(9.81619e-4, rel=1e-5) and h1["call"] == "supported" and h1["excludes_zero"]
    assert h1["sd"] == pytest.approx(0.5e-3 * math.sqrt(2.5)) and h1["lora"] == pytest.approx(0.01) and h1["paper"] is None
    assert h1["relative"] == pytest.approx(-0.4)
    assert got["H2", "bilora"]["call"] == "supported" and got["H2", "bilora"]["mean"] == pytest.approx(0.02)
    # H2 on MRPC carries the power to detect the paper's +0.82 points with the observed paired std (1.58 points, 5 seeds):
    # noncentrality 0.82·√5/1.5811 = 1.1597 (tests/test_science_stats.py checks the power function itself)
    assert got["H2", "bilora"]["paper"] == 0.0082 and got["H2", "bilora"]["sd"] == pytest.approx(math.sqrt(2.5e-4))
    assert got["H2", "bilora"]["power_paper"] == pytest.approx(stats.power(0.0082, math.sqrt(2.5e-4), 5))
    h2 = got["H2", "bilora_rho0.5"]
    assert h2["call"] == "contradicted" and h2["half_width"] == pytest.approx(1.242069e-2, rel=1e-5)
    u = got["H1", "bilora_rho0.5"]
    assert u["radius"] == 0.5 and u["call"] == "unresolved" and not u["excludes_zero"]
    assert u["half_width"] == pytest.approx(0.131447, rel=1e-5) and u["mean"] == pytest.approx(0.01) and u["relative"] == pytest.approx(0.1)
    # step time against LoRA's run of the same seed: seed 0 ran loaded (load 3.1), so seeds 1.. only, ratio 1.1
    sr = res["tasks"]["mrpc"]["methods"]["bilora"]["vs_lora"]["step_ratio"]
    assert sr["n"] == 4 and sr["mean"] == pytest.approx(1.1)
    md = (tmp_path / "report.md").read_text()
    # columns: Δ [CI] | LoRA mean on the paired seeds | relative | call | paired std | power for the paper's Δ (H2, MRPC only)
    assert "| mrpc | H1: flatter at r = 0.05 | bilora | 5 | -0.4 [-0.498, -0.302] | 1 | -40.0 % | supported | 0.0791 | - |" in md
    pw = f"{stats.power(0.0082, math.sqrt(2.5e-4), 5) * 100:.0f} % for +0.82"
    assert f"| mrpc | H2: higher test metric | bilora | 5 | +2.00 [+0.04, +3.96] | 80.00 | +2.5 % | supported | 1.58 | {pw} |" in md
    assert "| contradicted |" in md and "| +1 [-12.1, +14.1] | 10 | +10.0 % | unresolved | 5.29 | - |" in md and "Provisional" in md
    assert "wider than the effect" not in md and "narrower than |Δ| is the same test" in md
    assert "1.10 (1.10-1.10, n=4)" in md
    assert (tmp_path / "flatness_vs_rho.png").stat().st_size > 0
    # the hand-written verdict appears only once the sweep is complete
    (tmp_path / report.VERDICT).write_text("Bi-LoRA: hand-written verdict.\n")
    report.write(runs, tmp_path)
    assert "hand-written verdict" not in (tmp_path / "report.md").read_text()
    n = len(list(runs.glob("*.json")))
    monkeypatch.setattr(protocol, "sweep_runs", lambda: [None] * n)
    monkeypatch.setattr(protocol, "tune_runs", lambda: [])
    report.write(runs, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Verdict (written by hand" in md and "Bi-LoRA: hand-written verdict." in md and "Provisional" not in md
    (tmp_path / report.VERDICT).unlink()
    report.write(runs, tmp_path)
    assert "the verdict is not written yet" in (tmp_path / "report.md").read_text()


def test_sweep_status_prints_no_third_party_noise():
    """The sweep is an entry point like the stages: pipeline.terminal.quiet filters bitsandbytes' optional-kernel notice
    (printed on import on avx512_bf16 CPUs) before the method registry imports it."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pipeline.science.sweep", "status"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "sweep:" in out.stdout and "of 42 summarised" in out.stdout
    assert "gemm_4bit_forward" not in out.stdout + out.stderr


def test_relative_effect_is_over_lora_on_the_paired_seeds_only():
    # LoRA seeds 0, 1, 2: 0.70, 0.80, 0.90; Bi-LoRA seeds 0, 1: 0.72, 0.84 -> differences 0.02, 0.04, mean 0.03;
    # LoRA's mean over the paired seeds 0, 1 is 0.75, so relative = 0.03 / 0.75 = 0.04 (not 0.03 / 0.80 over all three)
    runs = [_summary("mrpc", "lora", s, acc, 0.2) for s, acc in enumerate((0.70, 0.80, 0.90))]
    runs += [_summary("mrpc", "bilora", s, acc, 0.2) for s, acc in enumerate((0.72, 0.84))]
    (h2,) = [c for c in report.calls(report.analyse(runs)) if c["hypothesis"] == "H2"]
    assert h2["n"] == 2 and h2["mean"] == pytest.approx(0.03) and h2["lora"] == pytest.approx(0.75)
    assert h2["relative"] == pytest.approx(0.04)


def test_delta_states_the_lora_mean_of_its_own_seeds():
    """Issue 29 item 5: a run with 3 seeds is paired with LoRA's seeds 0-2, whose mean can differ from LoRA's 5-seed mean;
    the table says which LoRA mean each Δ is paired with."""
    # LoRA seeds 0-4: 84, 82, 86, 70, 72 -> mean over all 5 = 78.80, over seeds 0-2 = 84.00.
    # LoRA-SAM seeds 0-2: 83, 81, 84 -> mean 82.67 ± 1.53 (above LoRA's 78.80), yet paired differences −1, −1, −2 points:
    # mean −1.33, std 0.57735, half-width t(0.975, 2)·0.57735/√3 = 4.302653·0.33333 = 1.4342 -> [−2.77, +0.10]
    runs = [_summary("mrpc", "lora", s, acc, 0.2) for s, acc in enumerate((0.84, 0.82, 0.86, 0.70, 0.72))]
    runs += [_summary("mrpc", "lora_sam", s, acc, 0.2) for s, acc in enumerate((0.83, 0.81, 0.84))]
    res = report.analyse(runs)
    vs = res["tasks"]["mrpc"]["methods"]["lora_sam"]["vs_lora"]
    assert vs["seeds"] == [0, 1, 2] and vs["test"]["base"] == pytest.approx(0.84) and vs["test"]["mean"] == pytest.approx(-0.04 / 3)
    assert res["tasks"]["mrpc"]["methods"]["lora"]["test"][0] == pytest.approx(0.788)
    md = report.markdown(res, runs)
    assert "| lora | 5 | 78.80 ± 7.29 | - | - |" in md
    assert "| lora_sam | 3 | 82.67 ± 1.53 | -1.33 [-2.77, +0.10] | 84.00 (seeds 0-2) |" in md
    assert "| run | seeds | test | Δ vs LoRA, same seeds [95 % CI] | LoRA mean, same seeds |" in md


def test_committed_mrpc_adapters_cover_every_seed_fit_10_mib_and_are_bf16_peft():
    """Issue "Where Bi-LoRA should win", item 7: the MRPC adapters of LoRA and both Bi-LoRA runs, all seeds, as PEFT
    safetensors in bf16, ≤ 10 MiB in total, with the data licence note beside them."""
    from safetensors import safe_open

    root = ROOT / "reports/science/adapters"
    want = {f"mrpc-{m}-{s}" for m in protocol.ADAPTERS for s in range(protocol.SEEDS[m])}
    assert {p.name for p in root.iterdir() if p.is_dir()} == want
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) <= 10 * 2**20
    assert "non-commercial" in (root / "README.md").read_text(encoding="utf-8")
    keysets = set()
    for name in want:
        assert json.loads((root / name / "adapter_config.json").read_text())["peft_type"] == "LORA"
        with safe_open(str(root / name / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
            assert keys and all(f.get_slice(k).get_dtype() == "BF16" for k in keys)
            keysets.add(frozenset(keys))
    assert len(keysets) == 1  # Bi-LoRA's files hold LoRA's tensors and nothing more: the auxiliary is dropped
