"""Predicted peak training memory (bilora.memory) for the paper's model classes, and a CPU check at ~1B.

    python -m bench.memory_table                 # prints the Markdown table (1B, 8B, 14B shapes), *predicted*
    MALLOC_MMAP_THRESHOLD_=65536 python -m bench.memory_table --measure-1b   # CPU: measured vs predicted, ~1B shape

The table: nf4 double-quant base, bf16 weights/activations (a CUDA run), LoRA r 8 on all seven
linears, seq 1024, batch 1 (--seq/--batch change it), for LoRA and Bi-LoRA (fused; the other
methods' extras are listed in one column), with/without gradient checkpointing, AdamW vs
paged 8-bit AdamW. No framework overhead is included (CUDA context ~0.5 GiB, fragmentation).

``--measure-1b`` builds a random-init Llama-3.2-1B-shaped nf4 model on the CPU (fp32 compute) and
trains LoRA 2 steps at seq 128, batch 1, with and without checkpointing; it prints measured peak
RSS delta against the prediction (a benchmark, not part of the test suite: minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json

from bilora import memory

METHODS = ("lora", "bilora", "lora_sam", "flat_lora", "eflat_lora")


def rows(seq: int, batch: int) -> list[dict]:
    out = []
    for name in ("llama-1b", "llama-8b", "qwen2.5-14b"):
        shape = memory.SHAPES[name]
        for ckpt in (False, True):
            for opt in ("adamw", "paged_adamw_8bit"):
                run = memory.RunShape(seq=seq, batch=batch, gradient_checkpointing=ckpt, optimizer=opt)
                lora = memory.predict(shape, run)
                extras = {m: memory.predict(shape, memory.with_(run, method=m))["total"] - lora["total"] for m in METHODS[1:]}
                out.append(
                    {
                        "model": name,
                        "ckpt": ckpt,
                        "opt": opt,
                        **{k: v / memory.GIB for k, v in lora.items()},
                        **{f"+{m}": v / memory.GIB for m, v in extras.items()},
                    }
                )
    return out


def markdown(seq: int, batch: int) -> str:
    lines = [
        f"*Predicted* peak training memory (GiB, bilora.memory; seq {seq}, batch {batch}, nf4 + bf16, LoRA r 8 on all linears):",
        "",
        "| model | ckpt | optimizer | weights | adapters+grads | optimizer | activations | LoRA total | Bi-LoRA (fused) | LoRA-SAM | Flat-LoRA | EFlat-LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(seq, batch):
        t = r["total"]
        lines.append(
            f"| {r['model']} | {'on' if r['ckpt'] else 'off'} | {r['opt']} | {r['weights']:.2f} | {r['adapters']:.3f} | {r['optimizer']:.3f} | "
            f"{r['activations']:.2f} | {t:.2f} | {t + r['+bilora']:.2f} | {t + r['+lora_sam']:.2f} | {t + r['+flat_lora']:.2f} | {t + r['+eflat_lora']:.2f} |"
        )
    return "\n".join(lines)


def measure_1b() -> None:
    import torch

    from bench import gpu_check as g

    torch.set_num_threads(2)
    shape = memory.SHAPES["llama-1b"]
    baseline = g._reset("cpu")
    base = g.random_nf4_llama(shape, "cpu", torch.float32, torch.float32).train()
    for ckpt in (False, True):
        r = g.measure(base, shape, "lora", {}, device="cpu", seq=128, batch=1, steps=2, ckpt=ckpt, r=8, baseline=baseline)
        r["error_rel"] = (r["predicted_gib"] - r["peak_gib"]) / r["peak_gib"]
        print(json.dumps(r), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--measure-1b", action="store_true")
    args = ap.parse_args(argv)
    if args.measure_1b:
        measure_1b()
    else:
        print(markdown(args.seq, args.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
