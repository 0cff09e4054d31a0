"""Step time vs sequence length and vs LoRA rank, LoRA vs Bi-LoRA (unfused and fused), on MiniLM-L6.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.scaling [--lengths 64 128 256 512 --ranks 4 8 16 32 64
                                                        --batch 4 --steps 3 --warmup 1 --base nf4]

Few steps per point (decisions.md, "Benchmarks": scaling curves use few steps and small batches on
CPU; full curves belong on a GPU). Batches are real SST-2 text: the token stream of consecutive
training sentences cut into fixed-length rows (no padding), the same rows for every method.
Within a point the methods are interleaved (one step each per round). For the rank sweep the
auxiliary has the primary's rank (r2 = r, alpha = 2r); the length sweep uses r = r2 = 8.
Writes reports/scaling_length.png, reports/scaling_rank.png and reports/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.bench import ROOT, prepare_base, sync

METHODS = {"lora": ("lora", {}), "bilora": ("bilora", {}), "bilora_fused": ("bilora", {"fused": True})}


def token_rows(base_dir: Path, length: int, n_rows: int) -> dict[str, torch.Tensor]:
    from pipeline.data import tokenizer_for
    from pipeline.tasks import get_task

    tok = tokenizer_for(base_dir)
    rows = get_task("sst2").read(ROOT / "data" / "raw", "train")
    stream: list[int] = []
    for r in rows:
        stream += tok(r["text_a"], add_special_tokens=False)["input_ids"]
        if len(stream) >= n_rows * (length - 2):
            break
    body = torch.tensor(stream[: n_rows * (length - 2)]).view(n_rows, length - 2)
    ids = torch.cat([torch.full((n_rows, 1), tok.cls_token_id), body, torch.full((n_rows, 1), tok.sep_token_id)], 1)
    labels = torch.tensor([r["label"] for r in rows[:n_rows]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids), "labels": labels}


def build(base_dir: Path, method: str, rank: int, total: int):
    from bilora import adapters, methods
    from bilora.base import load_for_task
    from bilora.methods.base import StepContext
    from transformers import get_cosine_schedule_with_warmup

    name, cfg = METHODS[method]
    torch.manual_seed(0)
    model = load_for_task(base_dir, "classification", 2)
    spec = adapters.LoraSpec(r=rank, alpha=2.0 * rank, target_modules=("query", "key", "value", "dense"), modules_to_save=("classifier",))
    model = adapters.attach_lora(model, spec, "SEQ_CLS")
    if name == "bilora":
        cfg = {**cfg, "aux_rank": rank, "aux_alpha": 2.0 * rank}
    m = methods.build(name, cfg, seed=0)
    m.prepare(model)
    opt = torch.optim.AdamW(m.param_groups(model, 1e-3, 0.0), lr=1e-3)
    sched = get_cosine_schedule_with_warmup(opt, 0, total)
    model.train()

    def step(i: int, batch: dict[str, torch.Tensor]) -> float:
        ctx = StepContext(model=model, optimizer=opt, scheduler=sched, micro_batches=[batch], step=i, max_steps=total, max_grad_norm=1.0)
        sync()
        t0 = time.perf_counter()
        m.step(ctx)
        sync()
        return time.perf_counter() - t0

    return step


def point(base_dir: Path, length: int, rank: int, args: argparse.Namespace) -> dict[str, float]:
    total = args.warmup + args.steps
    data = token_rows(base_dir, length, args.batch * total)
    batches = [{k: v[i * args.batch : (i + 1) * args.batch] for k, v in data.items()} for i in range(total)]
    steppers = {name: build(base_dir, name, rank, total) for name in args.methods}
    times: dict[str, list[float]] = {n: [] for n in steppers}
    names = list(steppers)
    for i in range(total):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t = steppers[n](i, batches[i])
            if i >= args.warmup:
                times[n].append(t)
    out = {n: statistics.median(ts) for n, ts in times.items()}
    out.update({f"{n}_ratio_to_lora": statistics.median([t / l for t, l in zip(times[n], times["lora"])]) for n in names if n != "lora"})
    print(f"  L={length} r={rank}: " + ", ".join(f"{n} {out[n]:.3f}s" for n in names), flush=True)
    return out


def plot(xs: list[int], rows: list[dict[str, float]], names: list[str], xlabel: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for n in names:
        ax1.plot(xs, [r[n] for r in rows], marker="o", label=n)
        if n != "lora":
            ax2.plot(xs, [r[f"{n}_ratio_to_lora"] for r in rows], marker="o", label=n)
    ax1.set(xlabel=xlabel, ylabel="median s / optimizer step", title=title, xscale="log", yscale="log")
    ax1.set_xticks(xs, [str(x) for x in xs])
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set(xlabel=xlabel, ylabel="step time / LoRA (paired median)", title="ratio to LoRA", xscale="log")
    ax2.set_xticks(xs, [str(x) for x in xs])
    from matplotlib.ticker import NullFormatter

    for ax in (ax1, ax2):
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[64, 128, 256, 512])
    ap.add_argument("--ranks", type=int, nargs="*", default=[4, 8, 16, 32, 64])
    ap.add_argument("--rank-length", type=int, default=128, help="sequence length of the rank sweep")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--base", choices=["nf4", "fp32"], default="nf4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("BILORA_MODEL_CACHE", "~/.cache/bilora")).expanduser() / "bench")
    ap.add_argument("--out", type=Path, default=ROOT / "reports")
    ap.add_argument("--plot-from", type=Path, default=None, help="redraw the plots from an existing scaling.json, without measuring")
    args = ap.parse_args(argv)
    if args.plot_from:
        res = json.loads(args.plot_from.read_text())
        names, out = res["args"]["methods"], args.out
        for key, xlabel in (("length", "sequence length (r = 8)"), ("rank", f"rank r = r2 (length {res['args']['rank_length']})")):
            xs = sorted(int(k) for k in res[key])
            if xs:
                plot(xs, [res[key][str(x)] for x in xs], names, xlabel, f"MiniLM-L6 {res['args']['base']}, batch {res['args']['batch']}", out / f"scaling_{key}.png")
        print(f"redrew {out}/scaling_*.png from {args.plot_from}")
        return 0
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    base_dir = prepare_base(args.base, args.cache)
    t0 = time.time()
    res: dict[str, object] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "loadavg_before": os.getloadavg()}
    length_rows = [point(base_dir, L, 8, args) for L in args.lengths]
    rank_rows = [point(base_dir, args.rank_length, r, args) for r in args.ranks]
    res.update(length=dict(zip(map(str, args.lengths), length_rows)), rank=dict(zip(map(str, args.ranks), rank_rows)), wall_s=time.time() - t0, loadavg_after=os.getloadavg(), threads=torch.get_num_threads())
    args.out.mkdir(parents=True, exist_ok=True)
    if args.lengths:
        plot(args.lengths, length_rows, args.methods, "sequence length (r = 8)", f"MiniLM-L6 {args.base}, batch {args.batch}", args.out / "scaling_length.png")
    if args.ranks:
        plot(args.ranks, rank_rows, args.methods, f"rank r = r2 (length {args.rank_length})", f"MiniLM-L6 {args.base}, batch {args.batch}", args.out / "scaling_rank.png")
    (args.out / "scaling.json").write_text(json.dumps(res, indent=2, sort_keys=True))
    print(f"wrote {args.out}/scaling_*.png and scaling.json ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
