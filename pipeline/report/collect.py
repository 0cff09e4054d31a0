"""Read every run of the matrix (metrics/, artifacts/finetune, artifacts/eval) at the committed precision."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

from bilora.sharpness.result import SharpnessResult
from pipeline.stage import layout
from pipeline.config.schema import Params
from pipeline.report.precision import rounded

SPACES = ("full", "lora")


@dataclass
class Group:
    """The seeds of one (task, method): per-seed figures in seed order."""

    test: dict[str, list[float]] = field(default_factory=dict)  # test metric -> values ("n" left out)
    gap: dict[str, list[float]] = field(default_factory=dict)  # train - test, per metric
    step_time: list[float] = field(default_factory=list)  # median seconds per optimizer step
    final_loss: list[float] = field(default_factory=list)
    sharpness: list[SharpnessResult] = field(default_factory=list)  # the seeds that were measured
    adapter_from: str | None = None  # eval-only task: scored with this task's adapters (step time and loss are theirs)

    def random(self, space: str) -> dict[float, list[float]]:
        """{radius: [mean random sharpness per measured seed]} in ``space``."""
        out: dict[float, list[float]] = {}
        for res in self.sharpness:
            for r in res.spaces[space].random.radii if space in res.spaces else []:
                out.setdefault(r.radius, []).append(r.mean)
        return out

    def attack(self, space: str, main: str) -> dict[float, list[float]]:
        """{alpha: [main metric after the attack per seed]} in ``space``, where the metric was evaluated."""
        out: dict[float, list[float]] = {}
        for res in self.sharpness:
            attack = res.spaces[space].attack if space in res.spaces else None
            for pt in attack.points if attack else []:
                if main in pt.metrics:
                    out.setdefault(pt.alpha, []).append(pt.metrics[main])
        return out

    def headline(self, kind: str, space: str, main: str = "") -> list[float] | None:
        """Per-seed figure at the largest radius (random) or alpha (attack); None if not measured."""
        by_x = self.random(space) if kind == "random" else self.attack(space, main)
        return by_x[max(by_x)] if by_x else None


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value); (nan, 0) for none."""
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


@dataclass
class Collected:
    groups: dict[tuple[str, str], Group]  # (task, method) -> its seeds, in matrix order
    histories: dict[str, list[dict]]  # run name -> training history
    sharpness: dict[str, SharpnessResult]  # run name -> result, runs that were measured


def _read(path) -> object:
    # everything the report records and plots is read at the committed precision (pipeline/report/precision.py)
    return rounded(json.loads(path.read_text()))


def collect(p: Params) -> Collected:
    groups: dict[tuple[str, str], Group] = {}
    histories: dict[str, list[dict]] = {}
    sharpness: dict[str, SharpnessResult] = {}
    for task in p.data.evaluated:
        adapter_from = p.data.datasets[task].adapter_from if task in p.data.datasets else None
        for method in p.train.methods:
            g = groups.setdefault((task, method), Group(adapter_from=adapter_from))
            for seed in p.train.seeds:
                name = layout.run_name(task, method, seed)
                trained = layout.run_name(adapter_from or task, method, seed)  # the run whose adapter was scored
                metrics = _read(layout.metrics_path(name))
                summary = _read(layout.finetune_dir(trained) / "summary.json")
                if adapter_from is None:  # an eval-only row trained nothing: its adapter's curve is already there
                    histories[name] = _read(layout.finetune_dir(name) / "history.json")
                for k, v in metrics["test"].items():
                    if k != "n":
                        g.test.setdefault(k, []).append(v)
                for k, v in metrics.get("gap", {}).items():
                    g.gap.setdefault(k, []).append(v)
                sharp_file = layout.eval_dir(name) / "sharpness.json"
                if sharp_file.exists():
                    sharpness[name] = SharpnessResult.from_dict(_read(sharp_file))
                    g.sharpness.append(sharpness[name])
                g.step_time.append(summary["median_step_time"])
                g.final_loss.append(summary["final_loss"])
    return Collected(groups, histories, sharpness)
