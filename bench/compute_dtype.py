"""fp32 against bf16 on this CPU: 4-bit MiniLM training steps and eval forwards, paired in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.compute_dtype [--rounds 12 --warmup 2 --batch 16 --length 64 --threads 2]

Variants (same nf4 base, same batches, same LoRA init):

* train, ``compute_dtype`` float32 (the default on every CPU) vs bfloat16 (``base.quant.compute_dtype:
  bfloat16``): one LoRA forward + backward + AdamW step; bf16 is set on every ``Linear4bit`` (what
  ``bnb_4bit_compute_dtype`` sets at load), adapters and head stay fp32;
* eval (no grad, eval mode): the fp32 kernel (``base.quant.cpu_kernel: fp32``), the dequantize path
  in bf16 compute, and bitsandbytes' packed AVX512-BF16 kernel (``cpu_kernel: packed_bf16``, only
  where the CPU has it).

Rounds are interleaved in a rotating order; per variant: median step time, the median of the
per-round ratio to the fp32 variant, and the relative logit difference to fp32. Writes
``reports/bench_compute_dtype.{json,md}`` (``--out``) with the machine and the command.
"""

from __future__ import annotations

import argparse
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


def _set_compute(model: torch.nn.Module, dtype: torch.dtype) -> None:
    from bilora import layers

    for m in model.modules():
        if layers.is_4bit(m):
            m.compute_dtype = dtype


def _train_step(model, opt, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> None:
    from bilora import layers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "bilora-bench"))
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench_compute_dtype"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base_dir = prepare_base("nf4", Path(args.cache))
    n = args.rounds + args.warmup
    examples, tok = load_examples("sst2", base_dir, args.batch, args.length, n)
    batches = collate_batches(examples, tok, args.batch)
    has_bf16 = layers.cpu_has_avx512_bf16()

    train = {}
    for label, dtype in (("train_fp32", torch.float32), ("train_bf16", torch.bfloat16)):
        model = fresh_model(base_dir).train()
        _set_compute(model, dtype)
        train[label] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    evals = {}
    for label, dtype, kernel in (
        ("eval_fp32", torch.float32, "fp32"),
        ("eval_bf16_dequant", torch.bfloat16, "fp32"),
        ("eval_packed_bf16", torch.float32, "packed_bf16"),
    ):
        if kernel == "packed_bf16" and not has_bf16:
            continue
        model = fresh_model(base_dir).eval()
        layers.set_cpu_kernel(model, kernel)
        _set_compute(model, dtype)
        evals[label] = model

    times: dict[str, list[float]] = {k: [] for k in [*train, *evals]}
    labels = list(times)
    for r in range(n):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]
        for label in order:
            t0 = time.perf_counter()
            if label in train:
                _train_step(*train[label], batches[r])
            else:
                with torch.no_grad():
                    evals[label](**batches[r])
            if r >= args.warmup:
                times[label].append(time.perf_counter() - t0)

    check = batches[0]
    with torch.no_grad():
        ref = evals["eval_fp32"](**check).logits.double()
        drift = {k: float((m(**check).logits.double() - ref).norm() / ref.norm()) for k, m in evals.items()}

    def ratio(label: str, to: str) -> float:
        return statistics.median(a / b for a, b in zip(times[label], times[to]))

    rows = {}
    for label in labels:
        to = "train_fp32" if label.startswith("train") else "eval_fp32"
        rows[label] = {"median_s": statistics.median(times[label]), "ratio_to_fp32": ratio(label, to), "rounds": len(times[label])}
        if label in drift:
            rows[label]["rel_logit_diff_to_fp32"] = drift[label]
    cmd = "HF_HUB_OFFLINE=1 .venv/bin/python -m bench.compute_dtype " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = {
        "command": cmd.strip(),
        "machine": machine() | {"avx512_bf16": has_bf16},
        "batch": args.batch,
        "length": args.length,
        "threads": args.threads,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    md = [
        "# fp32 vs bf16 on the CPU (4-bit MiniLM-L6, SST-2 batches)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cpus_usable']} usable CPUs, AVX-512 {m['avx512']}, AVX512-BF16 {has_bf16}; torch {m['torch']}, bitsandbytes {m.get('bitsandbytes')}; "
        f"batch {args.batch} x length {args.length}, {args.threads} threads, {args.rounds} timed rounds (interleaved, rotating order) after {args.warmup} warm-up.",
        "",
        "| variant | median s | ratio to fp32 (paired median) | relative logit difference to fp32 |",
        "|---|---|---|---|",
    ]
    for label, row in rows.items():
        diff = f"{row['rel_logit_diff_to_fp32']:.2e}" if "rel_logit_diff_to_fp32" in row else "–"
        md.append(f"| {label} | {row['median_s']:.4f} | {row['ratio_to_fp32']:.3f} | {diff} |")
    if not has_bf16:
        md.append("\nThis CPU has no AVX512-BF16: the packed kernel cannot run here (and bf16 compute is emulated, far slower).")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
