"""Where LoRA-SAM's step time goes, next to a LoRA step, on ONE fixed batch (no batch-length spread).

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.sam_cost [--reps 30]

Same base, LoRA spec and loop as ``bench.bench`` (nf4 MiniLM-L6, SST-2, batch 16, 1 thread). Per round,
interleaved in a rotating order: one LoRA optimizer step, one LoRA-SAM optimizer step, and one bare
forward+backward of the LoRA model, all on the longest of the benchmark's batches. SAM is two forward+backward passes by
definition, so its floor is 2 x fwd_bwd; the LoRA step is fwd_bwd + clip + AdamW. Writes
``reports/sam_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.bench import ROOT, Runner, collate_batches, load_examples, machine, prepare_base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sam_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "reports")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from bilora.methods.method import StepContext

    base_dir = prepare_base("nf4", Path("~/.cache/bilora/bench").expanduser())
    examples, tok = load_examples("sst2", base_dir, 16, 64, args.reps + args.warmup)
    batch = max(collate_batches(examples, tok, 16), key=lambda b: b["input_ids"].numel())  # (16, L) fixed
    total = args.reps + args.warmup
    lora = Runner("lora", base_dir, examples, tok, 16, total)
    sam = Runner("lora_sam", base_dir, examples, tok, 16, total)

    def fwd_bwd() -> float:
        ft = lora.ft
        ctx = StepContext(
            model=lora.model,
            optimizer=ft.optimizer,
            scheduler=ft.scheduler,
            micro_batches=[batch],
            step=0,
            max_steps=ft.max_steps,
            max_grad_norm=1.0,
        )
        lora.model.zero_grad(set_to_none=True)  # a fresh backward allocates its gradients, as in a step
        t0 = time.perf_counter()
        ctx.forward_backward()
        dt = time.perf_counter() - t0
        lora.model.zero_grad(set_to_none=True)  # the next LoRA step starts from no gradients, as always
        return dt

    t: dict[str, list[float]] = {"lora_step": [], "lora_sam_step": [], "fwd_bwd": []}
    jobs = [("lora_step", lambda i: lora.step(i, batch)), ("lora_sam_step", lambda i: sam.step(i, batch)), ("fwd_bwd", lambda i: fwd_bwd())]
    for i in range(total):
        k = i % len(jobs)
        for name, job in jobs[k:] + jobs[:k]:  # rotate the order each round
            dt = job(i)
            if i >= args.warmup:
                t[name].append(dt)

    def q(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {"median": statistics.median(xs), "q1": xs[len(xs) // 4], "q3": xs[(3 * len(xs)) // 4]}

    res = {
        "command": f"python -m bench.sam_cost --reps {args.reps} --warmup {args.warmup}",
        "machine": machine(),
        "batch_shape": list(batch["input_ids"].shape),
        "median_ms": {k: statistics.median(v) * 1e3 for k, v in t.items()},
        "sam_over_lora_paired": q([s / l for s, l in zip(t["lora_sam_step"], t["lora_step"])]),
        "sam_over_lora_sum": sum(t["lora_sam_step"]) / sum(t["lora_step"]),
        "sam_over_two_fwd_bwd_paired": q([s / (2 * f) for s, f in zip(t["lora_sam_step"], t["fwd_bwd"])]),
        "lora_step_minus_fwd_bwd_ms": (statistics.median(t["lora_step"]) - statistics.median(t["fwd_bwd"])) * 1e3,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sam_cost.json").write_text(json.dumps(res, indent=2) + "\n")
    p, f = res["sam_over_lora_paired"], res["sam_over_two_fwd_bwd_paired"]
    print(f"batch {res['batch_shape']}: median ms " + ", ".join(f"{k} {v:.1f}" for k, v in res["median_ms"].items()))
    print(f"lora_sam / lora (paired) {p['median']:.3f} (IQR {p['q1']:.3f}-{p['q3']:.3f}); ratio of sums {res['sam_over_lora_sum']:.3f}")
    print(f"lora_sam / (2 x fwd_bwd) {f['median']:.3f}; lora step - fwd_bwd {res['lora_step_minus_fwd_bwd_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
