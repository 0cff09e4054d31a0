"""DVC stage ``finetune@<task>-<method>-<seed>``: train one method on one task with one seed.

Writes the primary adapter in PEFT format (``adapter/``), ``bilora_config.json`` beside it, the
step history and a summary. Resumes automatically from ``artifacts/checkpoints/<run>`` when the
checkpoint belongs to the same run (same params subset, data and base), otherwise starts fresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import asdict

import torch

from bilora import adapters, checkpoint, distributed, layers, methods, scale
from bilora.base import load_for_task
from bilora.io import atomic_write_json
from bilora.methods.method import NonFiniteError
from bilora.train import FineTuner, LoopConfig
from pipeline import formats, layout, logged_models, runs
from pipeline.catalog import get_task, num_labels
from pipeline.console import info, progress
from pipeline.data import collator_for, load_split, tokenizer_for
from pipeline.errors import UserError, cli
from pipeline.stage import Stage


def fingerprint(settings: dict) -> str:
    """Identity of a run: its resolved settings (artifacts/runs/) plus its inputs (data stats, base info)."""
    parts = {
        "settings": settings,
        "data": (layout.DATA / "stats.json").read_text() if (layout.DATA / "stats.json").exists() else "",
        "base": (layout.BASE / "model" / "bilora_base.json").read_text() if (layout.BASE / "model" / "bilora_base.json").exists() else "",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaf = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__})
        raise UserError(f"train.lora.target_modules: {missing} not found in the model; linear modules available: {leaf}")


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
        raise UserError(f"--method: unknown method {args.method!r}; use one of {methods.available()} or a name of train.variants (and list it in train.methods of params.yaml)")
    # This run's settings, as the configure stage resolved them (a variant is its method with
    # overrides); its DVC dep is that file, not the train sections (checked against params.yaml).
    run = runs.load(p, args.task, args.method, args.seed)
    method_key, method_cfg, lora = run["method_key"], run["method_config"], run["lora"]
    stage.header(name)

    torch.manual_seed(args.seed)  # task head init, LoRA init, dropout
    base_dir = layout.BASE / "model"
    for need, producer in ((base_dir / "config.json", "load_base"), (layout.DATA / args.task / "dataset_dict.json", "prepare")):
        if not need.is_file():
            raise UserError(f"{need}: not found (output of stage '{producer}'); run `dvc repro {producer}` first (task must be in data.tasks)")
    fmt = formats.get(task.format)  # the format decides the head, the adapter type and what is saved
    n_labels = num_labels(task, layout.DATA)
    model = load_for_task(base_dir, fmt.kind, n_labels)
    if fmt.modules_to_save:  # replaces transformers' LOAD REPORT table (pipeline/quiet.py)
        info(f"{fmt.kind} head freshly initialised ({n_labels} {'output' if n_labels == 1 else 'labels'}, seed {args.seed})")
    check_targets(model, lora["target_modules"])
    spec = adapters.LoraSpec(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], target_modules=tuple(lora["target_modules"]), modules_to_save=fmt.modules_to_save)
    model = adapters.attach_lora(model, spec, fmt.peft_task_type)
    method = methods.build(method_key, method_cfg, seed=args.seed)

    tokenizer = tokenizer_for(base_dir)
    train_ds = load_split(layout.DATA, args.task, "train")
    loop = LoopConfig(**run["loop"])
    tags = stage.run_tags | ({"method_key": method_key} if method_key != args.method else {})
    # ranks other than 0: a disabled tracker, no MLflow run (rank 0 logs the mean-over-ranks loss)
    tracker = stage.track({"train": p.train.model_dump(), "data": p.data.model_dump(), "base": p.base.model_dump()}, tags=tags, run_name=f"finetune@{name}", system_metrics=True, enabled=main_rank)
    kernel = layers.kernel_info(model)
    with tracker:
        tracker.set_tags({f"kernel.{k}": v for k, v in kernel.items()})
        tracker.log_split(layout.DATA, args.task, "train", len(train_ds), "training")
        tracker.log_split(layout.DATA, args.task, "validation", len(load_split(layout.DATA, args.task, "validation")), "validation")
        with (progress(f"train {name}", loop.total_steps(len(train_ds))) if main_rank else contextlib.nullcontext(lambda *a, **k: None)) as advance:
            ft = FineTuner(
                model, method, train_ds, collator_for(task, tokenizer), loop,
                seed=args.seed,
                checkpoint_dir=layout.checkpoint_dir(name),
                fingerprint=fingerprint(run),
                on_log=tracker.log_metrics,
                on_step=lambda s, t: advance(s, t, extra=f"loss {ft.history[-1]['loss']:.4f}"),
                autocast_dtype=scale.autocast_dtype(scale.model_device_type(model), p.base.quant.compute_dtype),  # CUDA: bf16; CPU: only if compute_dtype says bfloat16
            )
            ft.try_resume()
            info(ft.resume_note)
            try:
                summary = ft.train()
            except NonFiniteError as e:
                kept = checkpoint.read_meta(layout.checkpoint_dir(name) / "last")
                where = f"last good checkpoint (step {kept['step']}) kept in {layout.checkpoint_dir(name) / 'last'}" if kept else "no checkpoint was written yet"
                raise UserError(f"finetune@{name}: training stopped: {e}; {where}.\n"
                                "  fix: lower train.loop.lr, set train.loop.max_grad_norm, or check the data; rerun resumes from the checkpoint only if the params are unchanged") from None
        if not main_rank:  # the other ranks hold identical parameters; rank 0 exports them
            distributed.shutdown()
            return
        out = layout.finetune_dir(name)
        with stage.output(out, kernel=kernel) as tmp:
            method.export(model, tmp / "adapter")
            atomic_write_json(tmp / "adapter" / "bilora_config.json", {"method": args.method, **({"method_key": method_key} if method_key != args.method else {}), "task": args.task, "seed": args.seed, "primary": asdict(spec) | {"scaling": spec.scaling}, "method_config": method.config()})
            atomic_write_json(tmp / "summary.json", summary)
            atomic_write_json(tmp / "history.json", ft.history)
            # MLflow model of the adapter, on the base by reference; its id goes into run_info.json
            logged_models.log_adapter(tracker, name, tmp / "adapter", base_dir, layout.run_settings_path(name), fmt.kind, n_labels, tokenizer.model_input_names, tags)
        tracker.log_metrics({"final_loss": summary["final_loss"], "median_step_time": summary["median_step_time"]})
        tracker.log_artifacts(out / "adapter", "adapter")
        tracker.log_artifact(out / "summary.json")
        # Training finished: the checkpoint is no longer needed; leave a marker (the folder is a persistent DVC out).
        ckpt = layout.checkpoint_dir(name)
        ckpt.mkdir(parents=True, exist_ok=True)

        shutil.rmtree(ckpt / "last", ignore_errors=True)
        atomic_write_json(ckpt / "status.json", {"state": "complete", "steps": summary["steps"]})
        info(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, median step {summary['median_step_time']:.3f}s -> {out}")
    distributed.shutdown()



if __name__ == "__main__":
    main()
