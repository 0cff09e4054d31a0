"""DVC stage ``finetune@<task>-<method>-<seed>``: train one method on one task with one seed.

Writes the primary adapter in PEFT format (``adapter/``), ``bilora_config.json`` beside it, the
step history and a summary. Resumes automatically from ``artifacts/checkpoints/<run>`` when the
checkpoint belongs to the same run (same params subset, data and base), otherwise starts fresh.
"""

from __future__ import annotations

import contextlib

import torch

from bilora import distributed, layers, methods, scale
from bilora.methods.method import NonFiniteError
from bilora.train import FineTuner, LoopConfig
from pipeline.stage import layout, training
from pipeline.tracking import logged_models
from pipeline.config import runs
from pipeline.data.catalog import get_task
from pipeline.terminal.console import info, progress
from pipeline.data.prepare import collator_for, load_split, tokenizer_for
from pipeline.terminal.user_error import UserError, cli
from pipeline.stage.runner import Stage


@cli
def main(argv: list[str] | None = None) -> None:
    stage = Stage("finetune", __doc__, argv, per_run=True)
    args, p, name = stage.args, stage.params, stage.run
    try:  # under torchrun (train.distributed.nproc_per_node > 1, see stages/launch.py): join the process group
        distributed.init_from_env(p.train.distributed.backend)
    except RuntimeError as e:
        raise UserError(f"train.distributed: {e}") from None
    main_rank = distributed.is_main()  # only rank 0 writes outputs, checkpoints and MLflow
    try:
        task = get_task(args.task, p.data)
    except KeyError as e:
        raise UserError(f"--task: {e.args[0]}; use a task listed in data.tasks of params.yaml") from None
    if args.method not in methods.available() and args.method not in p.train.variants:
        raise UserError(
            f"--method: unknown method {args.method!r}; use one of {methods.available()} or a name of train.variants (and list it in train.methods of params.yaml)"
        )
    # This run's settings, as the configure stage resolved them (a variant is its method with
    # overrides); its DVC dep is that file, not the train sections (checked against params.yaml).
    run = runs.load(p, args.task, args.method, args.seed)
    method_key = run["method_key"]
    stage.header(name)

    torch.manual_seed(args.seed)  # task head init, LoRA init, dropout
    training.check_inputs(args.task)
    rm = training.build(run, task, args.seed)
    model, method, base_dir = rm.model, rm.method, layout.BASE / "model"

    tokenizer = tokenizer_for(base_dir)
    train_ds = load_split(layout.DATA, args.task, "train")
    loop = LoopConfig(**run["loop"])
    tags = stage.run_tags | ({"method_key": method_key} if method_key != args.method else {})
    # ranks other than 0: a disabled tracker, no MLflow run (rank 0 logs the mean-over-ranks loss)
    tracker = stage.track(
        {"train": p.train.model_dump(), "data": p.data.model_dump(), "base": p.base.model_dump()},
        tags=tags,
        run_name=f"finetune@{name}",
        system_metrics=True,
        enabled=main_rank,
    )
    kernel = layers.kernel_info(model)
    with tracker:
        tracker.set_tags({f"kernel.{k}": v for k, v in kernel.items()})
        tracker.log_split(layout.DATA, args.task, "train", len(train_ds), "training")
        tracker.log_split(layout.DATA, args.task, "validation", len(load_split(layout.DATA, args.task, "validation")), "validation")
        with (
            progress(f"train {name}", loop.total_steps(len(train_ds))) if main_rank else contextlib.nullcontext(lambda *a, **k: None)
        ) as advance:
            ft = FineTuner(
                model,
                method,
                train_ds,
                collator_for(task, tokenizer),
                loop,
                seed=args.seed,
                checkpoint_dir=layout.checkpoint_dir(name),
                fingerprint=training.fingerprint(run),
                on_log=tracker.log_metrics,
                on_step=lambda s, t: advance(s, t, extra=f"loss {ft.history[-1]['loss']:.4f}"),
                autocast_dtype=scale.autocast_dtype(
                    scale.model_device_type(model), p.base.quant.compute_dtype
                ),  # CUDA: bf16; CPU: only if compute_dtype says bfloat16
            )
            ft.try_resume()
            info(ft.resume_note)
            try:
                summary = ft.train()
            except NonFiniteError as e:
                raise training.stopped(name, e) from None
        if not main_rank:  # the other ranks hold identical parameters; rank 0 exports them
            distributed.shutdown()
            return
        out = layout.finetune_dir(name)
        with stage.output(out, kernel=kernel) as tmp:
            training.write_outputs(tmp, rm, run, summary, ft.history)
            # MLflow model of the adapter, on the base by reference; its id goes into run_info.json
            logged_models.log_adapter(
                tracker,
                name,
                tmp / "adapter",
                base_dir,
                layout.run_settings_path(name),
                rm.fmt.kind,
                rm.n_labels,
                tokenizer.model_input_names,
                tags,
            )
        tracker.log_metrics(
            {
                "final_loss": summary["final_loss"],
                "median_step_time": summary["median_step_time"],
                **{f"{k}.second_half_median": v for k, v in summary["perturbation"].items()},
            }
        )
        tracker.log_artifacts(out / "adapter", "adapter")
        tracker.log_artifact(out / "summary.json")
        training.mark_complete(name, summary["steps"])
        info(
            f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, median step {summary['median_step_time']:.3f}s -> {out}"
        )
    distributed.shutdown()


if __name__ == "__main__":
    main()
