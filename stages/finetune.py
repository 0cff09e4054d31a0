"""DVC stage ``finetune@<task>-<method>-<seed>``: train one method on one task with one seed.

Trains from its run file alone (``artifacts/runs/<run>.json``, the resolved run config that ``configure``
wrote: pipeline/config/runs.py) and the upstream outputs; of params.yaml it reads only ``tracking`` (where
to log). Writes the primary adapter in PEFT format (``adapter/``), ``bilora_config.json`` beside it, the step
history and a summary. Resumes automatically from ``artifacts/checkpoints/<run>`` when the checkpoint
belongs to the same run (same run config, data and base), otherwise starts fresh.
"""

from __future__ import annotations

from pipeline.config import runs
from pipeline.stage import layout
from pipeline.stage.runner import Stage
from pipeline.terminal.user_error import cli


@cli
def main(argv: list[str] | None = None) -> None:
    stage = Stage("finetune", __doc__, argv, per_run=True, params=False)
    run = runs.read(stage.args.task, stage.args.method, stage.args.seed)  # as configure resolved it
    layout.check_inputs(run.task)
    # the training stack, imported once the run file and the inputs are known good (a bad input fails in ~1 s)
    import torch

    from bilora import distributed
    from pipeline.data.prepare import load_split, tokenizer_for
    from pipeline.stage import training

    main_rank = training.join_process_group(run)  # under torchrun only rank 0 writes outputs, checkpoints and MLflow
    stage.header(run.name)

    torch.manual_seed(run.seed)  # task head init, LoRA init, dropout
    rm = training.build(run)
    tokenizer = tokenizer_for(layout.BASE / "model")
    train_ds = load_split(layout.DATA, run.task, "train")
    tracker = training.track(stage, run, main_rank)
    with tracker:
        training.log_inputs(tracker, run, rm, len(train_ds))
        with training.progress_bar(run, len(train_ds), main_rank) as advance:
            ft = training.fine_tuner(run, rm, train_ds, tokenizer, tracker, advance)
            summary = training.train(ft, run)
        if main_rank:  # the other ranks hold identical parameters; rank 0 exports them
            training.publish(stage, tracker, run, rm, tokenizer, summary, ft.history)
    distributed.shutdown()


if __name__ == "__main__":
    main()
