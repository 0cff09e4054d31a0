"""What the ``evaluate`` stage does, as functions: score the splits, measure sharpness, write the outputs.

The stage (stages/evaluate.py) only sequences these: load the adapted model -> score -> write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import PeftModel

from bilora.io import atomic_write_json
from bilora.sharpness.config import SharpnessConfig
from bilora.sharpness.measure import measure
from bilora.sharpness.objective import Objective, task_eval
from bilora.sharpness.result import SharpnessResult
from pipeline.data import formats
from pipeline.stage import layout
from pipeline.data.catalog import get_task, options
from pipeline.terminal.console import info
from pipeline.data.prepare import load_split
from pipeline.report.precision import rounded
from pipeline.config.sections import to_settings

PREDICTION_SAMPLE = 20  # predictions per split logged to MLflow as a table (all of them are in artifacts/eval)


def params(p, fmt, tags: dict[str, Any]) -> dict[str, Any]:
    """What evaluate uses, as its MLflow params: the eval settings that apply (``max_new_tokens`` for a
    generation head only, the sharpness settings only when sharpness is measured), and ``tags``: the run
    (task, method, seed) and the adapter it scores (``adapter.run``)."""
    used = p.eval.model_dump()
    if fmt.kind != "generation":
        used.pop("max_new_tokens")
    if not p.eval.sharpness.enabled:
        used["sharpness"] = {"enabled": False}
    return {"eval": used, **tags}


def sharpness_config(p) -> SharpnessConfig:
    """The library settings of ``eval.sharpness`` (its enabled/examples fields are this stage's)."""
    return to_settings(p)


def evaluate_generation(model: PeftModel, tokenizer, task_name: str, ds, batch_size: int, max_new_tokens: int) -> tuple[dict, list]:
    """Score a built-in generation task on a prepared split through its format (auxiliary adapter disabled)."""
    task = get_task(task_name)
    return formats.get(task.format).score(model, tokenizer, ds, options(task), task.metrics, batch_size, max_new_tokens)


def prediction_table(rows: list) -> dict[str, list]:
    """Rows of predictions (dicts for generation formats, plain values otherwise) -> table columns."""
    if rows and isinstance(rows[0], dict):
        return {k: [str(r.get(k)) for r in rows] for k in rows[0]}
    return {"index": list(range(len(rows))), "prediction": [str(r) for r in rows]}


def score_splits(model, tokenizer, task, task_name: str, p, tracker, model_id: str | None) -> tuple[dict, dict]:
    """Task metrics and predictions on each split the format scores (the train split: ``eval.train_subset``
    rows, skipped at 0), plus the train-test gap of the main metric; each logged to MLflow as it comes."""
    fmt, opts = formats.get(task.format), options(task)
    metrics: dict[str, dict[str, float]] = {}
    predictions: dict[str, list] = {}
    for split in fmt.eval_splits:  # generation formats: test and the train subset (generation is costly)
        ds = load_split(layout.DATA, task_name, split)
        if split == "train":
            if not p.eval.train_subset:
                continue
            ds = ds.select(range(min(len(ds), p.eval.train_subset)))
        if len(ds) == 0:
            continue
        dataset = tracker.log_split(
            layout.DATA, task_name, split, len(ds), "test" if split == "test" else "evaluation", first=len(ds) if split == "train" else None
        )
        metrics[split], predictions[split] = fmt.score(model, tokenizer, ds, opts, task.metrics, p.eval.batch_size, p.eval.max_new_tokens)
        info(f"{split}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics[split].items()))
        tracker.log_metrics({f"{split}.{k}": v for k, v in metrics[split].items()}, model_id=model_id, dataset=dataset)
    if "train" in metrics:
        main = task.main_metric
        metrics["gap"] = {main: metrics["train"][main] - metrics["test"][main]}
        tracker.log_metrics({f"gap.{main}": metrics["gap"][main]}, model_id=model_id)
    return metrics, predictions


def sharpness(model, task, task_name: str, collate, p) -> SharpnessResult:
    """``eval.sharpness`` on the first test examples. Generation formats: the loss is the LM loss of the
    reference completions and the attack is scored by that loss alone (regenerating per alpha is too costly)."""
    sp, fmt = p.eval.sharpness, formats.get(task.format)
    test = load_split(layout.DATA, task_name, "test")
    objective = Objective.from_dataset(test.select(range(min(len(test), sp.examples))), collate, p.eval.batch_size)
    eval_fn = (
        None
        if not fmt.attack_metric
        else task_eval(test.select(range(min(len(test), sp.metric_examples))), collate, task.metrics, p.eval.batch_size)
    )
    info(
        f"sharpness: spaces {sp.spaces}, radii {sp.radii} x {sp.n_directions} directions, attack alphas {sp.attack_alphas}, {sp.curve_points}-point curve"
    )
    result = measure(model, objective, sharpness_config(sp), eval_fn)
    info(
        f"sharpness measured in {result.cost['total_s']:.1f}s ({result.cost['loss_evals']} loss passes, {result.cost['grad_passes']} gradient passes)"
    )
    return result


def write_outputs(out: Path, metrics: dict, predictions: dict[str, list], sharp: SharpnessResult | None) -> None:
    """``artifacts/eval/<run>``: full-precision metrics, predictions per split, the sharpness result."""
    if sharp is not None:
        atomic_write_json(out / "sharpness.json", sharp.to_dict())
    for split, rows in predictions.items():
        atomic_write_json(out / f"predictions_{split}.json", rows)
    atomic_write_json(out / "metrics.json", metrics)


def commit_metrics(name: str, metrics: dict[str, Any]) -> Path:
    """``metrics/<run>.json``, git-tracked and read by the report: at the committed precision (pipeline/report/precision.py)."""
    path = layout.metrics_path(name)
    atomic_write_json(path, rounded(metrics))
    return path
