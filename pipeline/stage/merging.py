"""What the ``merge`` stage does, as functions: pick the run, merge its adapter, check the merged model
against adapter-on-4-bit, save it and log it.

The stage (stages/merge.py) only sequences these: setup -> merge -> check -> write.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bilora import layers
from bilora.base import load_adapted, load_for_task, task_model_class
from bilora.io import atomic_write_json
from bilora.merge import agreement_drift, check_agreement, dequantize, merge, reload_max_abs_diff
from bilora.sources import resolve
from pipeline.config import runs
from pipeline.data import formats
from pipeline.data.catalog import get_task, num_labels
from pipeline.data.prepare import collator_for, load_split, tokenizer_for
from pipeline.data.task import TaskSpec
from pipeline.stage import layout
from pipeline.terminal.console import info, warn
from pipeline.tracking import logged_models
from pipeline.tracking.tracker import Tracker

BASE_DIR = layout.BASE / "model"
KEEP = ("input_ids", "attention_mask", "token_type_ids", "labels")


@dataclass
class Target:
    """The run whose adapter is merged: its name, task, model head, adapter folder and the merged dtype."""

    name: str
    task: TaskSpec
    kind: str
    n_labels: int
    modules_to_save: tuple[str, ...]
    adapter_dir: Path
    dtype: torch.dtype


def name_of(m: Any) -> str:
    """``<task>-<method>-<seed>`` of the run ``merge`` names."""
    return layout.run_name(m.task, m.method, m.seed)


def params(p: Any) -> dict[str, Any]:
    """What merge uses, as its MLflow params: the merge settings, the adapter it merges (``adapter.run``: the
    finetune run's name), and the base's source where it merges onto the weights as stored (mode original)."""
    m = p.merge
    used = {"merge": m.model_dump(), "adapter": {"run": name_of(m)}}
    return used | ({"base": {"source": p.base.source, "revision": p.base.revision}} if m.mode == "original" else {})


def tags(m: Any) -> dict[str, Any]:
    return {"task": m.task, "method": m.method, "seed": m.seed}


def skip(out: Path, name: str) -> None:
    info("merge.mode = none: nothing merged (serve the 4-bit base + adapter)")
    atomic_write_json(out / "merge_report.json", {"mode": "none", "run": name})


def target(p: Any) -> Target:
    m = p.merge
    task = get_task(m.task, p.data)
    fmt = formats.get(task.format)  # the format names the head kind (bilora.base.task_model_class maps it to a transformers class)
    stored = json.loads((BASE_DIR / "bilora_base.json").read_text())["stored_dtype"]
    dtype = getattr(torch, stored if m.dtype == "auto" else m.dtype)
    name = name_of(m)
    return Target(name, task, fmt.kind, num_labels(task, layout.DATA), fmt.modules_to_save, layout.finetune_dir(name) / "adapter", dtype)


def merged_model(p: Any, t: Target) -> torch.nn.Module:
    """The adapter folded into a float32 base: dequant(quant(W)) (nf4_roundtrip, matches training) or the weights as stored."""
    torch.manual_seed(0)
    if p.merge.mode == "nf4_roundtrip":
        base = dequantize(load_for_task(BASE_DIR, t.kind, t.n_labels), torch.float32)
    else:
        extra = {"num_labels": t.n_labels} if t.modules_to_save else {}
        base = task_model_class(t.kind).from_pretrained(resolve(p.base.source, p.base.revision).path, dtype=torch.float32, **extra)
    return merge(base, t.adapter_dir).eval()


def check_batch(t: Target, tokenizer: Any, n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` held-out test inputs (no labels), collated by the task's format."""
    ds = load_split(layout.DATA, t.task.name, "test")
    batch = collator_for(t.task, tokenizer)([{k: v for k, v in ds[i].items() if k in KEEP} for i in range(min(len(ds), n))])
    batch.pop("labels")
    return batch


def agreement(tracker: Tracker, p: Any, t: Target, merged: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Merged (fp32 math) vs the adapter on the 4-bit base on ``batch``: the report's drift part, logged and warned about."""
    m = p.merge
    adapted = load_adapted(BASE_DIR, t.kind, t.n_labels, t.adapter_dir)
    kernel = layers.kernel_info(adapted)
    tracker.set_tags({f"kernel.{k}": v for k, v in kernel.items()})
    drift = agreement_drift(adapted, merged, batch)
    tracker.log_metrics({"relative_logit_drift": drift})
    info(f"relative logit drift merged vs adapter-on-4-bit: {drift:.2e} (tolerance {m.tolerance:g}, enforced for nf4_roundtrip)")
    if (warning := check_agreement(m.mode, drift, m.tolerance)) is not None:
        warn(warning)
    return {
        "kernel": kernel,
        "mode": m.mode,
        "run": t.name,
        "dtype": str(t.dtype).replace("torch.", ""),
        "relative_logit_drift": drift,
        "tolerance": m.tolerance,
        "check_examples": int(batch["input_ids"].shape[0]),
    }


def save(out: Path, t: Target, merged: torch.nn.Module, tokenizer: Any, batch: dict[str, torch.Tensor], report: dict[str, Any]) -> None:
    """The merged model in its dtype with the tokenizer, and the report with the reload check (plain transformers loads it)."""
    merged.to(t.dtype).save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    report["reload_max_abs_diff"] = reload_max_abs_diff(task_model_class(t.kind), out / "model", merged, batch, t.dtype)
    atomic_write_json(out / "merge_report.json", report)


def log(tracker: Tracker, p: Any, t: Target, merged: torch.nn.Module, tokenizer: Any, report: dict[str, Any]) -> None:
    """The report and the merged model (with the adapter's training run config as its params; registered when
    ``tracking.register_model`` names a model)."""
    m = p.merge
    tracker.log_dict(report, "merge_report.json")
    adapter = logged_models.adapter_id(layout.finetune_dir(t.name), tracker)
    run = runs.read(m.task, m.method, m.seed)
    logged_models.log_merged(
        tracker,
        t.name,
        merged,
        tokenizer,
        BASE_DIR,
        run.params(),
        t.kind,
        m.model_dump(),
        tags(m) | ({"adapter_model_id": adapter} if adapter else {}),
        p.tracking.register_model,
    )


def tokenizer() -> Any:
    return tokenizer_for(BASE_DIR)
