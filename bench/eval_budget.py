"""What the default run's sharpness costs inside ``evaluate``, for the inherited and the chosen settings.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.eval_budget --workspace DIR [--run sst2-bilora-0]

``DIR`` is a checkout after ``dvc repro`` of the default pipeline (its ``artifacts/`` are read, nothing is
written there). In one process, on the run's adapted model (as ``evaluate`` loads it): the task scoring
``evaluate`` does besides sharpness (test, validation and the train subset), then ``measure()`` with each
candidate of :data:`CANDIDATES`, the same float64 dense copy and test examples as the stage. Prints and
writes ``reports/eval_budget.md``: seconds, the ratio to the inherited settings, sharpness's share of
evaluate's in-process work (process start-up and MLflow logging, ~10 s, excluded: the share is an upper
bound), and each candidate's headline figures beside the inherited ones.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.machine import describe, load

ROOT = Path(__file__).resolve().parents[1]
# The inherited default (--preset sharpness_detailed), intermediate steps, and the chosen default of
# eval.sharpness in params.yaml (tests/test_eval_budget.py checks both ends against the files).
INHERITED = dict(
    spaces=("full", "lora"), examples=64, metric_examples=128, radii=(0.01, 0.05), n_directions=2, alphas=(0.0, 1.0, 2.5), curve=7
)
CHOSEN = dict(spaces=("full",), examples=64, metric_examples=64, radii=(0.05,), n_directions=2, alphas=(0.0, 1.0), curve=3)
CANDIDATES = {
    "inherited (--preset sharpness_detailed)": INHERITED,
    "full space only": INHERITED | dict(spaces=("full",)),
    "full only, metric 64, curve 5": INHERITED | dict(spaces=("full",), metric_examples=64, curve=5),
    "full, r 0.05, alphas 0/1, metric 64, curve 5": CHOSEN | dict(curve=5),
    "chosen (default)": CHOSEN,
}


def config(c: dict, base):
    return replace(
        base, spaces=c["spaces"], radii=c["radii"], n_directions=c["n_directions"], attack_alphas=c["alphas"], curve_points=c["curve"]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.eval_budget", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--run", default="sst2-bilora-0")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "eval_budget.md")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    os.chdir(args.workspace)
    from pipeline.terminal.quiet import quiet

    quiet()  # transformers' load report and progress bars
    from bilora.base import load_adapted
    from bilora.sharpness.measure import measure
    from bilora.sharpness.objective import Objective, task_eval
    from pipeline.config.load import load_params
    from pipeline.data import formats
    from pipeline.data.catalog import head_labels, options, prepared_task
    from pipeline.data.prepare import collator_for, load_split, tokenizer_for
    from pipeline.stage import layout, scoring

    task_name, method, seed = args.run.rsplit("-", 2)
    p = load_params("params.yaml")
    task = prepared_task(task_name, p.data, layout.DATA)
    fmt, tok = formats.get(task.format), tokenizer_for(layout.BASE / "model")
    t0 = time.perf_counter()
    model = load_adapted(layout.BASE / "model", fmt.kind, head_labels(task, p.data, layout.DATA), layout.finetune_dir(args.run) / "adapter")
    for split in fmt.eval_splits:
        ds = load_split(layout.DATA, task_name, split)
        ds = ds.select(range(min(len(ds), p.eval.train_subset))) if split == "train" else ds
        fmt.score(model, tok, ds, options(task), task.metrics, p.eval.batch_size, p.eval.max_new_tokens)
    scoring_s = time.perf_counter() - t0
    base_cfg = scoring.sharpness_config(p.eval.sharpness)
    test, collate = load_split(layout.DATA, task_name, "test"), collator_for(task, tok)
    rows, figures = [], {}
    for name, c in CANDIDATES.items():
        objective = Objective.from_dataset(test.select(range(c["examples"])), collate, p.eval.batch_size)
        eval_fn = task_eval(test.select(range(c["metric_examples"])), collate, task.metrics, p.eval.batch_size)
        t = time.perf_counter()
        res = measure(model, objective, config(c, base_cfg), eval_fn)
        rows.append((name, c, time.perf_counter() - t, res.cost))
        figures[name] = res.headline(task.main_metric)
        print(f"{name}: {rows[-1][2]:.1f} s", flush=True)
    ref = rows[0][2]
    lines = [
        "# Evaluation budget: the default run's sharpness inside `evaluate`",
        "",
        f"`HF_HUB_OFFLINE=1 .venv/bin/python -m bench.eval_budget --workspace <default pipeline checkout> --run {args.run}` "
        f"on {describe()}, torch threads {torch.get_num_threads()}, load average before the run {load()}.",
        "",
        f"Task scoring besides sharpness (model load, test + validation + {p.eval.train_subset} train examples): **{scoring_s:.1f} s**.",
        "Share = sharpness / (scoring + sharpness): process start-up and MLflow logging (~10 s) are left out, so the share is an upper bound.",
        "",
        "| settings | spaces | loss examples | metric examples | attack alphas | curve points | loss passes | metric passes | sharpness s | vs inherited | share of evaluate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c, s, cost in rows:
        lines.append(
            f"| {name} | {', '.join(c['spaces'])} | {c['examples']} | {c['metric_examples']} | {', '.join(f'{a:g}' for a in c['alphas'])} | "
            f"{c['curve']} | {cost['loss_evals']} | {cost['metric_evals']} | {s:.1f} | {s / ref:.2f} | {s / (s + scoring_s):.0%} |"
        )
    keys = sorted(set().union(*figures.values()))
    lines += [
        "",
        "Headline figures (as committed to `metrics/`, 4 significant digits):",
        "",
        "| figure | " + " | ".join(figures) + " |",
        "|---|" + "---|" * len(figures),
    ]
    lines += [f"| `{k}` | " + " | ".join(f"{figures[n][k]:.4g}" if k in figures[n] else "–" for n in figures) + " |" for k in keys]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
