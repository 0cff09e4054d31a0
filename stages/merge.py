"""DVC stage ``merge``: fold the chosen run's primary adapter into a full-precision copy of the base and verify it."""

from __future__ import annotations

import argparse
import json

import torch
import transformers

from bilora import layers
from bilora.base import load_adapted, load_for_task, resolve
from bilora.io import atomic_dir, atomic_write_json
from bilora.merge import dequantize, merge, relative_logit_drift
from pipeline import layout
from pipeline.config import flatten, load_params
from pipeline.console import console, header, info, warn
from pipeline.data import collator_for, load_split, tokenizer_for
from pipeline.errors import cli
from pipeline import formats
from pipeline.catalog import get_task, num_labels
from pipeline.tracking import Tracker


class MergeCheckError(RuntimeError):
    pass


@cli
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    m = p.merge
    name = layout.run_name(m.task, m.method, m.seed)
    header("merge", f"{name} mode={m.mode}")
    tracker = Tracker("merge", p.tracking.experiment, flatten({"merge": m.model_dump()}), tags={"task": m.task, "method": m.method, "seed": m.seed}, run_name=f"merge@{name}")
    with tracker, atomic_dir(layout.MERGED) as tmp:
        if m.mode == "none":
            info("merge.mode = none: nothing merged (serve the 4-bit base + adapter)")
            atomic_write_json(tmp / "merge_report.json", {"mode": "none", "run": name})
            atomic_write_json(tmp / "run_info.json", tracker.info())
            return
        task = get_task(m.task, p.data)
        fmt = formats.get(task.format)  # the format names the head kind and the transformers class to reload with
        kind, n_labels = fmt.kind, num_labels(task, layout.DATA)
        auto = getattr(transformers, fmt.auto_class)
        extra = {"num_labels": n_labels} if fmt.modules_to_save else {}
        adapter_dir = layout.finetune_dir(name) / "adapter"
        base_info = (layout.BASE / "model" / "bilora_base.json")

        stored = json.loads(base_info.read_text())["stored_dtype"]
        dtype = getattr(torch, stored if m.dtype == "auto" else m.dtype)
        torch.manual_seed(0)
        if m.mode == "nf4_roundtrip":
            base = dequantize(load_for_task(layout.BASE / "model", kind, n_labels), torch.float32)
        else:
            src = resolve(p.base.source, p.base.revision).path
            base = auto.from_pretrained(src, dtype=torch.float32, **extra)
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
        with torch.no_grad(), layers.fp32_kernel(adapted):  # the merged model computes in fp32: compare like with like
            ref = adapted(**batch).logits
            got = merged(**batch).logits
        drift = relative_logit_drift(ref, got)
        report = {"kernel": kernel, "mode": m.mode, "run": name, "dtype": str(dtype).replace("torch.", ""), "relative_logit_drift": drift, "tolerance": m.tolerance, "check_examples": int(batch["input_ids"].shape[0])}
        tracker.log_metrics({"relative_logit_drift": drift})
        info(f"relative logit drift merged vs adapter-on-4-bit: {drift:.2e} (tolerance {m.tolerance:g}, enforced for nf4_roundtrip)")
        if m.mode == "nf4_roundtrip" and drift > m.tolerance:
            raise MergeCheckError(f"merged model disagrees with the adapter on the 4-bit base: relative logit drift {drift:.3e} > merge.tolerance {m.tolerance:g}")
        if m.mode == "original" and drift > m.tolerance:
            warn(f"mode=original: drift {drift:.3e} exceeds {m.tolerance:g}; expected, the adapter was trained on dequant(quant(W)) (use nf4_roundtrip to match training)")
        merged.to(dtype).save_pretrained(tmp / "model")
        tokenizer_for(layout.BASE / "model").save_pretrained(tmp / "model")
        # Prove plain transformers loads it.
        reloaded = auto.from_pretrained(tmp / "model", dtype=dtype).eval()
        with torch.no_grad():
            report["reload_max_abs_diff"] = float((reloaded(**batch).logits.float() - merged.to(dtype)(**batch).logits.float()).abs().max())
        atomic_write_json(tmp / "merge_report.json", report)
        atomic_write_json(tmp / "run_info.json", tracker.info())
        tracker.log_dict(report, "merge_report.json")
    console.print(f"[green]merged[/] {name} -> {layout.MERGED / 'model'}")


if __name__ == "__main__":
    main()
