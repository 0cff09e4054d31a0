"""What the perturbation diagnostics cost (bilora/perturbation.py), as a ratio to the method's own step.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.perturbation_cost [--reps 12] [--batch 32]

Same base as ``bench.bench`` (nf4 MiniLM-L6, SST-2, 1 thread) at the default pipeline's batch size. For each
perturbing method, per round, interleaved: one diagnostic measurement and one optimizer step, on the same
fixed batch. With diagnostics every k steps the share of training time is ratio / (k + ratio), where
ratio = median diagnostic time / median step time. Writes ``reports/perturbation_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.bench import ROOT, Runner, collate_batches, load_examples, machine, prepare_base

METHODS = ("bilora", "lora_sam", "flat_lora", "eflat_lora")
K_CHOICES = (10, 25, 50, 100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.perturbation_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "reports")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from bilora import perturbation
    from bilora.methods.method import StepContext

    base_dir = prepare_base("nf4", Path("~/.cache/bilora/bench").expanduser())
    total = args.reps + args.warmup
    examples, tok = load_examples("sst2", base_dir, args.batch, 64, total)
    batch = max(collate_batches(examples, tok, args.batch), key=lambda b: b["input_ids"].numel())  # (batch, L) fixed
    rows = []
    for name in METHODS:
        run = Runner(name, base_dir, examples, tok, args.batch, 2 * total)
        steps, diags = [], []
        for i in range(total):
            ctx = StepContext(
                model=run.model,
                optimizer=run.ft.optimizer,
                scheduler=run.ft.scheduler,
                micro_batches=[batch],
                step=i + 1,  # Flat-LoRA's noise ramp is > 0 from step 1
                max_steps=run.ft.max_steps,
                max_grad_norm=1.0,
            )
            t0 = time.perf_counter()
            out = perturbation.measure(run.method, ctx)
            dt = time.perf_counter() - t0
            step_dt = run.step(i + 1, batch)
            if i >= args.warmup and out:
                diags.append(dt)
                steps.append(step_dt)
        ratio = statistics.median(diags) / statistics.median(steps)
        rows.append(
            {
                "method": name,
                "median_step_s": statistics.median(steps),
                "median_diagnostic_s": statistics.median(diags),
                "ratio": ratio,
                "share_of_training": {str(k): ratio / (k + ratio) for k in K_CHOICES},
            }
        )
        print(f"{name}: step {statistics.median(steps):.3f} s, diagnostic {statistics.median(diags):.3f} s, ratio {ratio:.2f}")
    info = {
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python -m bench.perturbation_cost",
        "reps": args.reps,
        "batch": args.batch,
        "machine": machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perturbation_cost.json").write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Perturbation diagnostics: cost as a share of training",
        "",
        f"`{info['command']}` (nf4 MiniLM-L6, SST-2 batch {args.batch}, 1 thread, {args.reps} interleaved rounds)",
        f"on {info['machine'].get('cpu', '?')} ({'avx512_bf16' if 'avx512_bf16' in Path('/proc/cpuinfo').read_text() else 'AVX2-only'} class, {info['machine'].get('cpus_usable', '?')} usable cores).",
        "",
        "| method | step (s) | diagnostic (s) | ratio | " + " | ".join(f"share at k={k}" for k in K_CHOICES) + " |",
        "|---|---|---|---|" + "---|" * len(K_CHOICES),
    ]
    for r in rows:
        shares = " | ".join(f"{100 * r['share_of_training'][str(k)]:.1f} %" for k in K_CHOICES)
        lines.append(f"| {r['method']} | {r['median_step_s']:.3f} | {r['median_diagnostic_s']:.3f} | {r['ratio']:.2f} | {shares} |")
    lines += ["", "Share at k = ratio / (k + ratio): one diagnostic every k optimizer steps. Step times compare only within one CPU class."]
    (args.out / "perturbation_cost.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
