"""What the ``finetune`` stage does, as functions: build a run's model, train it, and on rank 0 write and
log the result.

The stage (stages/finetune.py) only sequences these: setup -> train -> write. Everything comes from the
run's :class:`pipeline.config.runs.RunConfig` and the upstream outputs (the prepared data, the 4-bit base);
the MLflow run's params are the run config's own (:meth:`RunConfig.params`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from bilora import adapters, checkpoint, distributed, layers, methods, scale
from bilora.base import load_for_task, saved_quant
from bilora.io import atomic_write_json
from bilora.methods.method import Method, NonFiniteError
from bilora.train import FineTuner
from pipeline.config.runs import RunConfig
from pipeline.data import formats
from pipeline.data.catalog import prepared_head
from pipeline.data.prepare import load_split
from pipeline.data.formats.base import Format
from pipeline.stage import layout
from pipeline.stage.runner import Stage
from pipeline.terminal.console import info, progress
from pipeline.terminal.user_error import UserError
from pipeline.tracking import logged_models
from pipeline.tracking.tracker import Tracker

BASE_DIR = layout.BASE / "model"


def join_process_group(run: RunConfig) -> bool:
    """Under torchrun (train.distributed.nproc_per_node > 1, see stages/launch.py) join the process group;
    True on the process that writes outputs, checkpoints and MLflow (rank 0, or the only one)."""
    try:
        distributed.init_from_env(run.distributed.backend)
    except RuntimeError as e:
        raise UserError(f"train.distributed: {e}") from None
    return distributed.is_main()


def fingerprint(run: RunConfig) -> str:
    """Identity of a run for checkpoint resume: its run config plus its inputs (data stats, base info)."""
    parts = {
        "settings": run.to_dict(),
        "data": (layout.DATA / "stats.json").read_text() if (layout.DATA / "stats.json").exists() else "",
        "base": (BASE_DIR / "bilora_base.json").read_text() if (BASE_DIR / "bilora_base.json").exists() else "",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaf = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__}
        )
        raise UserError(f"train.lora.target_modules: {missing} not found in the model; linear modules available: {leaf}")


@dataclass
class RunModel:
    """A run's model with its LoRA attached, the method that trains it, and what was decided on the way."""

    model: torch.nn.Module
    method: Method
    spec: adapters.LoraSpec  # the run's primary adapter with the task head its format trains in full
    fmt: Format  # the task's format (pipeline/data/formats): head kind, adapter type, collator
    n_labels: int
    kernel: dict[str, Any]  # the 4-bit layers' kernel (bilora.layers.kernel_info)


def build(run: RunConfig) -> RunModel:
    """Load the 4-bit base with the task's head, attach the run's LoRA, build its method. Call after
    ``torch.manual_seed(run.seed)``: head and LoRA init."""
    fmt_name, n_labels = prepared_head(run.task, layout.DATA)
    fmt = formats.get(fmt_name)
    model = load_for_task(BASE_DIR, fmt.kind, n_labels)
    if fmt.modules_to_save:  # replaces transformers' LOAD REPORT table (pipeline/terminal/quiet.py)
        info(f"{fmt.kind} head freshly initialised ({n_labels} {'output' if n_labels == 1 else 'labels'}, seed {run.seed})")
    spec = dataclasses.replace(run.lora, modules_to_save=fmt.modules_to_save)
    check_targets(model, list(spec.target_modules))
    model = adapters.attach_lora(model, spec, fmt.peft_task_type)
    method = methods.build(run.method_key, run.method_config, seed=run.seed)
    return RunModel(model, method, spec, fmt, n_labels, layers.kernel_info(model))


def run_tags(run: RunConfig) -> dict[str, Any]:
    """The MLflow tags of a run (a variant also names its method key)."""
    return {"task": run.task, "method": run.method, "seed": run.seed} | (
        {"method_key": run.method_key} if run.method_key != run.method else {}
    )


def track(stage: Stage, run: RunConfig, main_rank: bool) -> Tracker:
    """The run's MLflow run (params: the run config; ranks other than 0: disabled, rank 0 logs the mean-over-ranks loss)."""
    return stage.track(run.params(), tags=run_tags(run), run_name=f"finetune@{run.name}", system_metrics=True, enabled=main_rank)


def log_inputs(tracker: Tracker, run: RunConfig, rm: RunModel, n_train: int) -> None:
    """Inside the open tracker: the kernel tags and the data splits the run reads."""
    tracker.set_tags({f"kernel.{k}": v for k, v in rm.kernel.items()})
    tracker.log_split(layout.DATA, run.task, "train", n_train, "training")
    tracker.log_split(layout.DATA, run.task, "validation", len(load_split(layout.DATA, run.task, "validation")), "validation")


def progress_bar(run: RunConfig, n_train: int, main_rank: bool) -> ContextManager[Callable[..., None]]:
    """The training progress bar on rank 0; a no-op elsewhere."""
    if main_rank:
        return progress(f"train {run.name}", run.loop.total_steps(n_train))
    return contextlib.nullcontext(lambda *a, **k: None)


def fine_tuner(run: RunConfig, rm: RunModel, train_ds: Any, tokenizer: Any, tracker: Tracker, advance: Callable[..., None]) -> FineTuner:
    """The training loop of the run, resumable from its checkpoint folder. Autocast follows the base's
    4-bit compute dtype (CUDA: bf16; CPU: only if base.quant.compute_dtype says bfloat16)."""
    ft = FineTuner(
        rm.model,
        rm.method,
        train_ds,
        rm.fmt.collator(tokenizer),
        run.loop,
        seed=run.seed,
        checkpoint_dir=layout.checkpoint_dir(run.name),
        fingerprint=fingerprint(run),
        on_log=tracker.log_metrics,
        on_step=lambda s, t: advance(s, t, extra=f"loss {ft.history[-1]['loss']:.4f}"),
        autocast_dtype=scale.autocast_dtype(scale.model_device_type(rm.model), saved_quant(BASE_DIR).compute_dtype),
    )
    return ft


def train(ft: FineTuner, run: RunConfig) -> dict[str, Any]:
    """Resume if the checkpoint is this run's, train, and return the summary; a non-finite loss is a UserError."""
    ft.try_resume()
    info(ft.resume_note)
    try:
        return ft.train()
    except NonFiniteError as e:
        raise stopped(run.name, e) from None


def stopped(name: str, error: Exception) -> UserError:
    """The user-facing error for a run whose loss or gradient went non-finite: which checkpoint is kept."""
    kept = checkpoint.read_meta(layout.checkpoint_dir(name) / "last")
    where = (
        f"last good checkpoint (step {kept['step']}) kept in {layout.checkpoint_dir(name) / 'last'}"
        if kept
        else "no checkpoint was written yet"
    )
    return UserError(
        f"finetune@{name}: training stopped: {error}; {where}.\n"
        "  fix: lower train.loop.lr, set train.loop.max_grad_norm, or check the data; rerun resumes from the checkpoint only if the params are unchanged"
    )


def write_outputs(out: Path, rm: RunModel, run: RunConfig, summary: dict, history: list[dict]) -> None:
    """The PEFT adapter (primary only) with ``bilora_config.json`` beside it, the summary and the history."""
    name_fields = {"method": run.method, **({"method_key": run.method_key} if run.method_key != run.method else {})}
    rm.method.export(rm.model, out / "adapter")
    atomic_write_json(
        out / "adapter" / "bilora_config.json",
        {
            **name_fields,
            "task": run.task,
            "seed": run.seed,
            "primary": dataclasses.asdict(rm.spec) | {"scaling": rm.spec.scaling},
            "method_config": rm.method.config(),
        },
    )
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "history.json", history)


def publish(stage: Stage, tracker: Tracker, run: RunConfig, rm: RunModel, tokenizer: Any, summary: dict, history: list[dict]) -> None:
    """Rank 0, once trained: write the run's outputs, log the adapter as an MLflow model (on the base by
    reference; its id goes into run_info.json), the final metrics and artifacts, and mark the run complete."""
    out = layout.finetune_dir(run.name)
    with stage.output(out, kernel=rm.kernel) as tmp:
        write_outputs(tmp, rm, run, summary, history)
        logged_models.log_adapter(
            tracker, run.name, tmp / "adapter", BASE_DIR, run.params(), rm.fmt.kind, rm.n_labels, tokenizer.model_input_names, run_tags(run)
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
    mark_complete(run.name, summary["steps"])
    info(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, median step {summary['median_step_time']:.3f}s -> {out}")


def mark_complete(name: str, steps: int) -> None:
    """Training finished: drop the resumable checkpoint, keep a marker (the folder is a persistent DVC out)."""
    ckpt = layout.checkpoint_dir(name)
    ckpt.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ckpt / "last", ignore_errors=True)
    atomic_write_json(ckpt / "status.json", {"state": "complete", "steps": steps})
