"""DVC stage ``evaluate@<task>-<method>-<seed>``: task metrics of the primary adapter on test (GLUE dev), validation and a train subset."""

from __future__ import annotations


from peft import PeftModel

from bilora import layers
from bilora.base import load_adapted
from bilora.io import atomic_write_json
from bilora.sharpness import Objective, SharpnessConfig, measure, task_eval
from pipeline import formats, layout
from pipeline.catalog import adapter_task, get_task, head_labels, options, prepared_task
from pipeline.console import console, info
from pipeline.data import collator_for, load_split, tokenizer_for
from pipeline.errors import cli
from pipeline.figures import rounded
from pipeline.sections import to_settings
from pipeline.stage import Stage


def sharpness_config(p) -> SharpnessConfig:
    """The library settings of ``eval.sharpness`` (its enabled/examples fields are this stage's)."""
    return to_settings(p)


def evaluate_generation(model: PeftModel, tokenizer, task_name: str, ds, batch_size: int, max_new_tokens: int) -> tuple[dict, list]:
    """Score a built-in generation task on a prepared split through its format (auxiliary adapter disabled)."""
    task = get_task(task_name)
    return formats.get(task.format).score(model, tokenizer, ds, options(task), task.metrics, batch_size, max_new_tokens)


PREDICTION_SAMPLE = 20  # predictions per split logged to MLflow as a table (all of them are in artifacts/eval)


def prediction_table(rows: list) -> dict[str, list]:
    """Rows of predictions (dicts for generation formats, plain values otherwise) -> table columns."""
    if rows and isinstance(rows[0], dict):
        return {k: [str(r.get(k)) for r in rows] for k in rows[0]}
    return {"index": list(range(len(rows))), "prediction": [str(r) for r in rows]}


@cli
def main(argv: list[str] | None = None) -> None:
    stage = Stage("evaluate", __doc__, argv, per_run=True)
    args, p, name = stage.args, stage.params, stage.run
    task = prepared_task(args.task, p.data, layout.DATA)  # labels inferred by prepare, metrics resolved from them
    fmt = formats.get(task.format)  # the format scores the model; nothing here depends on the task's name
    # an eval-only dataset (stage evaluate_only) is scored with the adapter of its adapter_from task's run
    trained = layout.run_name(adapter_task(task), args.method, args.seed)
    stage.header(name + (f" (adapter of finetune@{trained})" if trained != name else ""))
    model = load_adapted(layout.BASE / "model", fmt.kind, head_labels(task, p.data, layout.DATA), layout.finetune_dir(trained) / "adapter")
    tokenizer = tokenizer_for(layout.BASE / "model")
    collate = collator_for(task, tokenizer)
    opts = options(task)
    tags = stage.run_tags | {"adapter.run": trained}
    tracker = stage.track({"eval": p.eval.model_dump(), **tags}, tags=tags, run_name=f"{stage.name}@{name}")
    metrics: dict[str, dict[str, float]] = {}
    predictions: dict[str, list] = {}
    kernel = layers.kernel_info(model)
    with tracker:
        tracker.set_tags({f"kernel.{k}": v for k, v in kernel.items()})
        for split in fmt.eval_splits:  # generation formats: test and the train subset (generation is costly)
            ds = load_split(layout.DATA, args.task, split)
            if split == "train":
                if not p.eval.train_subset:
                    continue
                ds = ds.select(range(min(len(ds), p.eval.train_subset)))
            if len(ds) == 0:
                continue
            tracker.log_split(layout.DATA, args.task, split, len(ds), "test" if split == "test" else "evaluation", first=len(ds) if split == "train" else None)
            metrics[split], predictions[split] = fmt.score(model, tokenizer, ds, opts, task.metrics, p.eval.batch_size, p.eval.max_new_tokens)
            info(f"{split}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics[split].items()))
            tracker.log_metrics({f"{split}.{k}": v for k, v in metrics[split].items()})
        main_metric = task.main_metric
        if "train" in metrics:
            metrics["gap"] = {main_metric: metrics["train"][main_metric] - metrics["test"][main_metric]}
            tracker.log_metrics({f"gap.{main_metric}": metrics["gap"][main_metric]})
        sharp = None
        if p.eval.sharpness.enabled:
            sp = p.eval.sharpness
            test = load_split(layout.DATA, args.task, "test")
            objective = Objective.from_dataset(test.select(range(min(len(test), sp.examples))), collate, p.eval.batch_size)
            # Generation tasks: the loss is the LM loss on the SFT test examples (target tokens only);
            # the attack is scored by that loss alone (eval_fn=None), regenerating answers per alpha being too costly.
            eval_fn = None if not fmt.attack_metric else task_eval(test.select(range(min(len(test), sp.metric_examples))), collate, task.metrics, p.eval.batch_size)
            info(f"sharpness: spaces {sp.spaces}, radii {sp.radii} x {sp.n_directions} directions, attack alphas {sp.attack_alphas}, {sp.curve_points}-point curve")
            sharp = measure(model, objective, sharpness_config(sp), eval_fn)
            metrics["sharpness"] = sharp.headline(task.main_metric)  # timings stay in sharpness.json, out of DVC metrics
            tracker.log_metrics({f"sharpness.{k}": v for k, v in metrics["sharpness"].items()})
            info(f"sharpness measured in {sharp.cost['total_s']:.1f}s ({sharp.cost['loss_evals']} loss passes, {sharp.cost['grad_passes']} gradient passes)")
        summary = layout.finetune_dir(trained) / "summary.json"
        with stage.output(layout.eval_dir(name), kernel=kernel) as tmp:
            if sharp is not None:
                atomic_write_json(tmp / "sharpness.json", sharp.to_dict())
            for split, rows in predictions.items():
                atomic_write_json(tmp / f"predictions_{split}.json", rows)
            atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_json(layout.metrics_path(name), rounded(metrics))  # committed: pipeline/figures.py precision
        tracker.log_artifact(layout.metrics_path(name))
        for split, rows in predictions.items():  # a sample of the predictions as an MLflow table
            tracker.log_table(prediction_table(rows[:PREDICTION_SAMPLE]), f"predictions_{split}_sample.json")
        tracker.log_artifact(summary)
        if sharp is not None:
            tracker.log_artifact(layout.eval_dir(name) / "sharpness.json")
    console.print(f"[bold]{name}[/] test " + ", ".join(f"{k}={v:.4f}" for k, v in metrics["test"].items() if k != "n"))


if __name__ == "__main__":
    main()
