"""What the ``finetune`` stage does, as functions: build a run's model, name a stopped run, write its outputs.

The stage (stages/finetune.py) only sequences these: setup -> train -> write.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bilora import adapters, checkpoint, methods
from bilora.base import load_for_task
from bilora.io import atomic_write_json
from bilora.methods.method import Method
from pipeline.data import formats
from pipeline.stage import layout
from pipeline.data.catalog import num_labels
from pipeline.terminal.console import info
from pipeline.terminal.user_error import UserError


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
        leaf = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__}
        )
        raise UserError(f"train.lora.target_modules: {missing} not found in the model; linear modules available: {leaf}")


def check_inputs(task: str) -> None:
    """The upstream stages' outputs this run reads exist (a clear message instead of a load error)."""
    for need, producer in ((layout.BASE / "model" / "config.json", "load_base"), (layout.DATA / task / "dataset_dict.json", "prepare")):
        if not need.is_file():
            raise UserError(
                f"{need}: not found (output of stage '{producer}'); run `dvc repro {producer}` first (task must be in data.tasks)"
            )


@dataclass
class RunModel:
    """A run's model with its LoRA attached, the method that trains it, and what was decided on the way."""

    model: torch.nn.Module
    method: Method
    spec: adapters.LoraSpec
    fmt: Any  # the task's format (pipeline/data/formats): head kind, adapter type, what is saved
    n_labels: int


def build(run: dict[str, Any], task: Any, seed: int) -> RunModel:
    """Load the 4-bit base with the task's head, attach the run's LoRA, build its method (``run``: the
    run's settings file, pipeline/config/runs.py). Call after ``torch.manual_seed(seed)``: head and LoRA init."""
    base_dir = layout.BASE / "model"
    fmt = formats.get(task.format)
    n_labels = num_labels(task, layout.DATA)
    model = load_for_task(base_dir, fmt.kind, n_labels)
    if fmt.modules_to_save:  # replaces transformers' LOAD REPORT table (pipeline/terminal/quiet.py)
        info(f"{fmt.kind} head freshly initialised ({n_labels} {'output' if n_labels == 1 else 'labels'}, seed {seed})")
    lora = run["lora"]
    check_targets(model, lora["target_modules"])
    spec = adapters.LoraSpec(
        r=lora["r"],
        alpha=lora["alpha"],
        dropout=lora["dropout"],
        target_modules=tuple(lora["target_modules"]),
        modules_to_save=fmt.modules_to_save,
    )
    model = adapters.attach_lora(model, spec, fmt.peft_task_type)
    return RunModel(model, methods.build(run["method_key"], run["method_config"], seed=seed), spec, fmt, n_labels)


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


def write_outputs(out: Path, rm: RunModel, run: dict[str, Any], summary: dict, history: list[dict]) -> None:
    """The PEFT adapter (primary only) with ``bilora_config.json`` beside it, the summary and the history."""
    name_fields = {"method": run["method"], **({"method_key": run["method_key"]} if run["method_key"] != run["method"] else {})}
    rm.method.export(rm.model, out / "adapter")
    atomic_write_json(
        out / "adapter" / "bilora_config.json",
        {
            **name_fields,
            "task": run["task"],
            "seed": run["seed"],
            "primary": asdict(rm.spec) | {"scaling": rm.spec.scaling},
            "method_config": rm.method.config(),
        },
    )
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "history.json", history)


def mark_complete(name: str, steps: int) -> None:
    """Training finished: drop the resumable checkpoint, keep a marker (the folder is a persistent DVC out)."""
    ckpt = layout.checkpoint_dir(name)
    ckpt.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ckpt / "last", ignore_errors=True)
    atomic_write_json(ckpt / "status.json", {"state": "complete", "steps": steps})
