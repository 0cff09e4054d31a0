"""DVC stage ``merge``: fold the chosen run's primary adapter into a full-precision copy of the base and verify it."""

from __future__ import annotations

import json

import torch

from bilora import layers
from bilora.base import load_adapted, load_for_task, task_model_class
from bilora.sources import resolve
from bilora.io import atomic_write_json
from bilora.merge import agreement_drift, check_agreement, dequantize, merge, reload_max_abs_diff
from pipeline.data import formats
from pipeline.stage import layout
from pipeline.tracking import logged_models
from pipeline.data.catalog import get_task, num_labels
from pipeline.terminal.console import console, info, warn
from pipeline.data.prepare import collator_for, load_split, tokenizer_for
from pipeline.terminal.user_error import cli
from pipeline.stage.runner import Stage


@cli
def main(argv: list[str] | None = None) -> None:
    stage = Stage("merge", __doc__, argv)
    p, m = stage.params, stage.params.merge
    name = layout.run_name(m.task, m.method, m.seed)
    stage.header(f"{name} mode={m.mode}")
    tracker = stage.track({"merge": m.model_dump()}, tags={"task": m.task, "method": m.method, "seed": m.seed}, run_name=f"merge@{name}")
    with tracker, stage.output(layout.MERGED) as tmp:
        if m.mode == "none":
            info("merge.mode = none: nothing merged (serve the 4-bit base + adapter)")
            atomic_write_json(tmp / "merge_report.json", {"mode": "none", "run": name})
            return
        task = get_task(m.task, p.data)
        fmt = formats.get(task.format)  # the format names the head kind (bilora.base.task_model_class maps it to a transformers class)
        kind, n_labels = fmt.kind, num_labels(task, layout.DATA)
        extra = {"num_labels": n_labels} if fmt.modules_to_save else {}
        adapter_dir = layout.finetune_dir(name) / "adapter"
        base_info = layout.BASE / "model" / "bilora_base.json"

        stored = json.loads(base_info.read_text())["stored_dtype"]
        dtype = getattr(torch, stored if m.dtype == "auto" else m.dtype)
        torch.manual_seed(0)
        if m.mode == "nf4_roundtrip":
            base = dequantize(load_for_task(layout.BASE / "model", kind, n_labels), torch.float32)
        else:
            src = resolve(p.base.source, p.base.revision).path
            base = task_model_class(kind).from_pretrained(src, dtype=torch.float32, **extra)
        merged = merge(base, adapter_dir).eval()

        # Agreement check: merged (fp32 math) vs adapter on the 4-bit base, on held-out test inputs.
        collate = collator_for(task, tokenizer_for(layout.BASE / "model"))
        ds = load_split(layout.DATA, m.task, "test")
        keep = ("input_ids", "attention_mask", "token_type_ids", "labels")
        batch = collate([{k: v for k, v in ds[i].items() if k in keep} for i in range(min(len(ds), m.check_examples))])
        batch.pop("labels")
        adapted = load_adapted(layout.BASE / "model", kind, n_labels, adapter_dir)
        kernel = layers.kernel_info(adapted)
        tracker.set_tags({f"kernel.{k}": v for k, v in kernel.items()})
        drift = agreement_drift(adapted, merged, batch)
        report = {
            "kernel": kernel,
            "mode": m.mode,
            "run": name,
            "dtype": str(dtype).replace("torch.", ""),
            "relative_logit_drift": drift,
            "tolerance": m.tolerance,
            "check_examples": int(batch["input_ids"].shape[0]),
        }
        tracker.log_metrics({"relative_logit_drift": drift})
        info(f"relative logit drift merged vs adapter-on-4-bit: {drift:.2e} (tolerance {m.tolerance:g}, enforced for nf4_roundtrip)")
        if (warning := check_agreement(m.mode, drift, m.tolerance)) is not None:
            warn(warning)
        merged.to(dtype).save_pretrained(tmp / "model")
        tokenizer = tokenizer_for(layout.BASE / "model")
        tokenizer.save_pretrained(tmp / "model")
        report["reload_max_abs_diff"] = reload_max_abs_diff(
            task_model_class(kind), tmp / "model", merged, batch, dtype
        )  # plain transformers loads it
        atomic_write_json(tmp / "merge_report.json", report)
        tracker.log_dict(report, "merge_report.json")
        tags = {"task": m.task, "method": m.method, "seed": m.seed} | (
            {"adapter_model_id": a} if (a := logged_models.adapter_id(layout.finetune_dir(name), tracker)) else {}
        )
        logged_models.log_merged(
            tracker,
            name,
            merged,
            tokenizer,
            layout.BASE / "model",
            layout.run_settings_path(name),
            kind,
            m.model_dump(),
            tags,
            p.tracking.register_model,
        )
    console.print(f"[green]merged[/] {name} -> {layout.MERGED / 'model'}")


if __name__ == "__main__":
    main()
