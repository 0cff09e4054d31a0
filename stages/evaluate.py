"""DVC stage ``evaluate@<task>-<method>-<seed>``: task metrics of the primary adapter on test (GLUE dev), validation and a train subset."""

from __future__ import annotations

from bilora import layers
from bilora.base import load_adapted
from pipeline.stage import scoring, layout
from pipeline.data import formats
from pipeline.tracking import logged_models
from pipeline.data.catalog import adapter_task, head_labels, prepared_task
from pipeline.terminal.console import console
from pipeline.data.prepare import collator_for, tokenizer_for
from pipeline.terminal.user_error import cli
from pipeline.stage.runner import Stage


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
    tags = stage.run_tags | {"adapter.run": trained}
    tracker = stage.track(scoring.params(p, fmt, tags), tags=tags, run_name=f"{stage.name}@{name}")
    kernel = layers.kernel_info(model)
    with tracker:
        tracker.set_tags({f"kernel.{k}": v for k, v in kernel.items()})
        model_id = logged_models.adapter_id(layout.finetune_dir(trained), tracker)  # metrics shown on the adapter's model page
        metrics, predictions = scoring.score_splits(model, tokenizer, task, args.task, p, tracker, model_id)
        sharp = None
        if p.eval.sharpness.enabled:
            sharp = scoring.sharpness(model, task, args.task, collator_for(task, tokenizer), p)
            metrics["sharpness"] = sharp.headline(task.main_metric)  # timings stay in sharpness.json, out of DVC metrics
            tracker.log_metrics({f"sharpness.{k}": v for k, v in metrics["sharpness"].items()}, model_id=model_id)
        with stage.output(layout.eval_dir(name), kernel=kernel) as tmp:
            scoring.write_outputs(tmp, metrics, predictions, sharp)
        tracker.log_artifact(scoring.commit_metrics(name, metrics))
        for split, rows in predictions.items():  # a sample of the predictions as an MLflow table
            tracker.log_table(scoring.prediction_table(rows[: scoring.PREDICTION_SAMPLE]), f"predictions_{split}_sample.json")
        tracker.log_artifact(layout.finetune_dir(trained) / "summary.json")
        if sharp is not None:
            tracker.log_artifact(layout.eval_dir(name) / "sharpness.json")
    console.print(f"[bold]{name}[/] test " + ", ".join(f"{k}={v:.4f}" for k, v in metrics["test"].items() if k != "n"))


if __name__ == "__main__":
    main()
