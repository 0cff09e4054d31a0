"""Does MLflow's system-metrics sampling (on in every finetune run) slow a training step? Paired, one run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.system_metrics [--pairs 8 --steps 8 --interval 1 --threads 2]

One 4-bit MiniLM-L6 + LoRA training step (forward, backward, AdamW) on SST-2 batches, the default
pipeline's shape (batch 16, length 64). Rounds of ``--steps`` steps alternate between "monitor off"
and "monitor on" (an MLflow run started with ``log_system_metrics=True`` in a temporary sqlite store,
sampling every ``--interval`` s: 10x more often than MLflow's default 10 s, so an upper bound), the
order flipping each pair. Per pair: median step time on / off; reported: the median of those ratios,
their range, and how many ``system/*`` samples the monitor wrote (proof it ran). Writes
``reports/bench_system_metrics.{json,md}`` (``--out``) with the machine and the command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.bench import collate_batches, fresh_model, load_examples, machine, prepare_base

ROOT = Path(__file__).resolve().parents[1]


def _step(model, opt, batch) -> float:
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "bilora-bench"))
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench_system_metrics"))
    args = ap.parse_args(argv)
    import mlflow

    torch.set_num_threads(args.threads)
    base_dir = prepare_base("nf4", Path(args.cache))
    examples, tok = load_examples("sst2", base_dir, args.batch, args.length, args.steps)
    batches = collate_batches(examples, tok, args.batch)
    model = fresh_model(base_dir).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for b in batches[:2]:  # warm-up
        _step(model, opt, b)

    store = tempfile.mkdtemp(prefix="bilora-sysmetrics-")
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    mlflow.set_experiment("bench")
    mlflow.set_system_metrics_sampling_interval(args.interval)
    run_ids: list[str] = []

    def round_(on: bool) -> float:
        ctx = mlflow.start_run(log_system_metrics=True) if on else contextlib.nullcontext()
        with ctx as run:
            if on:
                run_ids.append(run.info.run_id)
            times = [_step(model, opt, b) for b in batches[: args.steps]]
        return statistics.median(times)

    ratios, on_s, off_s = [], [], []
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        got = {on: round_(on) for on in order}
        on_s.append(got[True])
        off_s.append(got[False])
        ratios.append(got[True] / got[False])
    client = mlflow.tracking.MlflowClient()
    samples = sum(len(client.get_metric_history(r, "system/cpu_utilization_percentage")) for r in run_ids)

    cmd = "HF_HUB_OFFLINE=1 .venv/bin/python -m bench.system_metrics " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = {
        "command": cmd.strip(),
        "machine": machine(),
        "pairs": args.pairs,
        "steps_per_round": args.steps,
        "interval_s": args.interval,
        "median_step_s_off": statistics.median(off_s),
        "median_step_s_on": statistics.median(on_s),
        "ratio_on_to_off_median": statistics.median(ratios),
        "ratio_on_to_off_range": [min(ratios), max(ratios)],
        "cpu_samples_written": samples,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    out.with_suffix(".md").write_text(
        "\n".join(
            [
                "# MLflow system-metrics sampling against a training step (4-bit MiniLM-L6 + LoRA)",
                "",
                f"Command: `{result['command']}`",
                "",
                f"Machine: {m['cpu']}, {m['cpus_usable']} usable CPUs; torch {m['torch']}; batch {args.batch} x length {args.length}, {args.threads} threads; "
                f"{args.pairs} pairs of {args.steps}-step rounds, monitor sampling every {args.interval} s (MLflow's default: 10 s).",
                "",
                "| median step, monitor off | median step, monitor on | on / off (median of pairs) | range over pairs | CPU samples written |",
                "|---|---|---|---|---|",
                f"| {result['median_step_s_off']:.3f} s | {result['median_step_s_on']:.3f} s | {result['ratio_on_to_off_median']:.3f} | "
                f"{min(ratios):.3f} – {max(ratios):.3f} | {samples} |",
                "",
            ]
        )
    )
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
