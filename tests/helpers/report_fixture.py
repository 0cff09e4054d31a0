"""Synthetic, deterministic inputs of the report stage (metrics/, artifacts/finetune, artifacts/eval).

``write_inputs(root, case)`` lays out what evaluate and finetune would have written for a small
matrix, with numbers drawn from a seeded ``random.Random``. tests/data/report/<case>/ holds what
the report wrote for these inputs before the report was split into collect/tables/plots; the
report must keep writing exactly those bytes (tests/test_report.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from pipeline.report.precision import rounded

CASES = {
    # two GLUE tasks, three methods, two seeds; radii given unsorted; attack metrics on one task only
    "sharp": {"tasks": ["sst2", "mrpc"], "methods": ["lora", "bilora", "flat_lora"], "seeds": [0, 1], "sharpness": True},
    # sharpness disabled: no sharpness.json, no sharpness figures, placeholder plots
    "plain": {"tasks": ["mrpc"], "methods": ["lora", "bilora"], "seeds": [0], "sharpness": False},
}
RADII = (0.05, 0.01, 0.02)
ALPHAS = (0.0, 1.0, 2.5)


def _sharpness(rng: random.Random, main: str, with_metric: bool) -> dict:
    spaces = {}
    for space in ("full", "lora"):
        radii = []
        for t in RADII:
            values = [t * rng.uniform(0.05, 0.2) for _ in range(3)]
            mean = sum(values) / 3
            std = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5
            radii.append({"radius": t, "mean": mean, "std": std, "min": min(values), "max": max(values), "values": values})
        points = [
            {
                "alpha": a,
                "loss": 0.3 + a * rng.uniform(0.5, 1.0),
                "metrics": {main: 0.8 - a * rng.uniform(0.05, 0.1)} if with_metric else {},
            }
            for a in ALPHAS
        ]
        curve = [[c * 0.05, 0.3 + c * c * rng.uniform(0.1, 0.3)] for c in (-1.0, -0.5, 0.0, 0.5, 1.0)]
        spaces[space] = {
            "dim": 1000 if space == "full" else 100,
            "random": {"base_loss": 0.3, "radii": radii},
            "attack": {"grad_norm": rng.uniform(0.1, 1.0), "base_loss": 0.3, "points": points},
            "curve": curve,
            "cost": {"random_s": 1.0, "attack_s": 1.0, "curve_s": 1.0, "loss_evals": 10, "grad_passes": 1, "metric_evals": 3},
        }
    return {
        "config": {"radii": list(RADII), "spaces": ["full", "lora"]},
        "spaces": spaces,
        "base": {"loss": 0.3, "metrics": {}},
        "cost": {"total_s": 3.0, "loss_evals": 20, "grad_passes": 2, "metric_evals": 6},
    }


def _flat_headline(result: dict, main: str) -> dict[str, float]:
    """The metrics/ sharpness keys, written out independently of bilora.sharpness."""
    out: dict[str, float] = {}
    for space, res in result["spaces"].items():
        for r in res["random"]["radii"]:
            out[f"{space}.random.r{r['radius']:g}.mean"] = r["mean"]
            out[f"{space}.random.r{r['radius']:g}.std"] = r["std"]
        for pt in res["attack"]["points"]:
            if main in pt["metrics"]:
                out[f"{space}.attack.a{pt['alpha']:g}.{main}"] = pt["metrics"][main]
            out[f"{space}.attack.a{pt['alpha']:g}.loss"] = pt["loss"]
    return out


def write_inputs(root: Path, case: str, repo: Path) -> Path:
    """Write the case's inputs and params file under ``root``; return the params path."""
    from pipeline.data.catalog import get_task

    spec = CASES[case]
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["data"]["tasks"], raw["train"]["methods"], raw["train"]["seeds"] = spec["tasks"], spec["methods"], spec["seeds"]
    raw["eval"]["sharpness"]["enabled"] = spec["sharpness"]
    raw["merge"]["task"] = spec["tasks"][0]
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    rng = random.Random(f"report-fixture:{case}")
    for task in spec["tasks"]:
        main = get_task(task).main_metric
        for method in spec["methods"]:
            for seed in spec["seeds"]:
                name = f"{task}-{method}-{seed}"
                test = {main: rng.uniform(0.7, 0.9), "f1": rng.uniform(0.7, 0.9), "n": 408}
                train = {main: test[main] + rng.uniform(0.0, 0.1), "n": 256}
                metrics = {"test": test, "train": train, "gap": {main: train[main] - test[main]}}
                fin = root / "artifacts" / "finetune" / name
                fin.mkdir(parents=True)
                steps = 30 + 7 * seed
                (fin / "history.json").write_text(
                    json.dumps([{"step": i + 1, "loss": 0.7 / (1 + 0.1 * i) + rng.uniform(0, 0.05), "lr": 1e-3} for i in range(steps)])
                )
                (fin / "summary.json").write_text(
                    json.dumps({"median_step_time": rng.uniform(0.1, 0.3), "final_loss": rng.uniform(0.2, 0.4)})
                )
                if spec["sharpness"]:
                    sharp = _sharpness(rng, main, with_metric=task == "sst2")
                    metrics["sharpness"] = _flat_headline(sharp, main)
                    ev = root / "artifacts" / "eval" / name
                    ev.mkdir(parents=True)
                    (ev / "sharpness.json").write_text(json.dumps(sharp))
                (root / "metrics").mkdir(exist_ok=True)
                (root / "metrics" / f"{name}.json").write_text(json.dumps(rounded(metrics)))
    return params
