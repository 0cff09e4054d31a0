"""Where Flat-LoRA's extra step time goes: the weight-noise work per step next to a LoRA step.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.flat_noise [--batch 16 --length 64 --threads 1 --reps 20]

Same base, batches and LoRA spec as ``bench.bench``. Per optimizer step Flat-LoRA does, for every
adapted layer (out × in weights), on top of LoRA's work:

* row norms of W0 + s·BA: one dequantization + one (out, r) @ (r, in) product;
* forward: dequantize again and draw eps (out × in normals) for the one matmul with W0 + eps;
* backward: dequantize and redraw the same eps from its seed (docs/methods.md, "Flat-LoRA": never stored).

This script times each of those components alone, summed over all adapted layers, and the
forward + backward of a LoRA step and of a Flat-LoRA step on one batch (``--reps`` pairs in alternating order: median and IQR of the per-pair ratio),
so the overhead is explained by measurement. Writes ``reports/flat_noise.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from bench.bench import ROOT, collate_batches, fresh_model, load_examples, machine, prepare_base


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def paired_ms(fa: Callable[[], object], fb: Callable[[], object], reps: int) -> tuple[float, float, list[float]]:
    """Medians of ``fa`` and ``fb`` timed in pairs whose order alternates (ab, ba, ab, ...), so machine
    drift and any first-of-the-pair effect hit both, and the per-pair ratios b/a (sorted)."""
    fa(), fb()  # warm-up
    ta, tb = [], []
    for i in range(reps):
        pair = ((fa, ta), (fb, tb))
        for fn, times in pair if i % 2 == 0 else pair[::-1]:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3, sorted(b / a for a, b in zip(ta, tb))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.flat_noise", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "reports")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bilora.methods import flat_lora as fl

    cache = Path("~/.cache/bilora/bench").expanduser()
    base_dir = prepare_base("nf4", cache)
    examples, tok = load_examples("sst2", base_dir, args.batch, args.length, 1)
    (batch,) = collate_batches(examples, tok, args.batch)
    model = fresh_model(base_dir)
    model.train()
    layers = fl.noisy_layers(model)
    bases = [layer.get_base_layer() for layer in layers]
    n_weights = sum(b.in_features * b.out_features for b in bases)
    tokens = int(batch["attention_mask"].numel())

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    def flat_fwd_bwd() -> None:
        with fl.flat_noise(model, 0.05, 0, 1):
            fwd_bwd()

    gen = torch.Generator().manual_seed(0)
    lora_ms, flat_ms, ratios = paired_ms(fwd_bwd, flat_fwd_bwd, args.reps)
    rows = {
        "lora forward+backward": lora_ms,
        "flat_lora forward+backward (noise on)": flat_ms,
        "row norms of W0 + s·BA (all layers, once per step)": median_ms(lambda: [fl.merged_row_norms(l) for l in layers], args.reps),
        "dequantize W0 (all layers, once)": median_ms(lambda: [fl.dequantized_weight(b) for b in bases], args.reps),
        "draw eps ~ N(0, 1) (all layers, once)": median_ms(
            lambda: [torch.randn((b.out_features, b.in_features), generator=gen) for b in bases], args.reps
        ),
        "uniform U(0, 1) of the same size (for scale)": median_ms(
            lambda: [torch.rand((b.out_features, b.in_features), generator=gen) for b in bases], args.reps
        ),
    }
    lora = rows["lora forward+backward"]
    extra = (statistics.median(ratios) - 1.0) * lora
    predicted = rows["row norms of W0 + s·BA (all layers, once per step)"] + 2 * (
        rows["dequantize W0 (all layers, once)"] + rows["draw eps ~ N(0, 1) (all layers, once)"]
    )
    res = {
        "command": "python -m bench.flat_noise " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": machine(),
        "tokens_per_step_padded": tokens,
        "adapted_weights": n_weights,
        "ms": rows,
        "flat_over_lora_fwd_bwd": statistics.median(ratios),  # median of the interleaved pairs
        "flat_over_lora_fwd_bwd_iqr": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]],
        "measured_extra_ms": extra,
        "components_extra_ms": predicted,
        "randn_ns_per_weight": rows["draw eps ~ N(0, 1) (all layers, once)"] * 1e6 / n_weights,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flat_noise.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"{n_weights / 1e6:.1f}M adapted weights, {tokens} padded tokens per step, {args.threads} thread(s)")
    for k, v in rows.items():
        print(f"{v:9.2f} ms  {k}")
    print(
        f"flat_lora / lora forward+backward = {res['flat_over_lora_fwd_bwd']:.3f} (paired, IQR {res['flat_over_lora_fwd_bwd_iqr'][0]:.3f}-{res['flat_over_lora_fwd_bwd_iqr'][1]:.3f}); extra {extra:.1f} ms measured, "
        f"{predicted:.1f} ms from the components (norms + 2 x (dequantize + draw eps)); "
        f"{res['randn_ns_per_weight']:.2f} ns per normal"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
