"""One-command GPU check of the QLoRA switches (issue 16): speed and memory of every method at LLM scale.

    python -m bench.gpu_check                      # on the GPU machine: writes reports/gpu.md + reports/gpu.json
    python -m bench.gpu_check --device cpu --tiny --out /tmp/x   # CPU rehearsal (tests/test_gpu_check.py runs it)

For each model shape (random init, nf4 double-quant, bf16 compute and bf16 autocast on CUDA;
default: ~1B = Llama-3.2-1B's shape and ~8B = Llama-3.1-8B's) at sequence length 1024, batch 1,
LoRA r 8 on all seven linears, with and without gradient checkpointing, it trains LoRA, Bi-LoRA
(fused), LoRA-SAM, Flat-LoRA and EFlat-LoRA for a few steps through :class:`bilora.train.FineTuner`
(the same loop the pipeline runs) and records the median step time (first step excluded),
tokens/s, the measured peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS
delta, see :mod:`bilora.memory`) and the prediction of :func:`bilora.memory.predict`. Each row is
appended to the JSON and the Markdown table as soon as it is measured, so a run cut short keeps
what it measured.

Needs only torch, transformers, peft and bitsandbytes (no pydantic, dvc, mlflow, datasets or gguf:
tests/test_gpu_check.py checks the import closure). Budget: ~4 minutes on one H100/H200
(the base of each shape is built once on the GPU and reused; adapters are attached per row and
removed with ``unload()``). Until it has run on a GPU, reports/gpu.md does not exist and the
docs/scaling.md says the GPU path is unverified.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bilora import adapters, layers, memory, methods, scale
from bilora.train import FineTuner, LoopConfig

ROOT = Path(__file__).resolve().parents[1]
METHODS = [("lora", {}), ("bilora_fused", {"fused": True}), ("lora_sam", {}), ("flat_lora", {}), ("eflat_lora", {})]
TINY = memory.LlamaShape(vocab=256, hidden=64, inter=128, layers=2, heads=4, kv_heads=2)


def llama_config(shape: memory.LlamaShape) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.inter,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied,
        max_position_embeddings=4096,
        use_cache=False,
    )


@torch.no_grad()
def random_nf4_llama(
    shape: memory.LlamaShape, device: str, compute_dtype: torch.dtype, param_dtype: torch.dtype, seed: int = 0
) -> torch.nn.Module:
    """A randomly initialised Llama of ``shape`` whose decoder linears are nf4 (double quant) ``Linear4bit``.

    Built directly on ``device`` in ``param_dtype`` (no checkpoint on disk), one linear quantized
    at a time; embeddings, norms and lm_head stay in ``param_dtype`` (what a 4-bit load gives).
    """
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(llama_config(shape), dtype=param_dtype)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    lin.in_features,
                    lin.out_features,
                    bias=lin.bias is not None,
                    compute_dtype=compute_dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                w = lin.weight.data
                q.weight = bnb.nn.Params4bit(
                    w.to("cpu") if device == "cpu" else w, requires_grad=False, quant_type="nf4", compress_statistics=True
                )
                setattr(parent, name, q.to(device))  # quantizes
                del lin, w
    model.requires_grad_(False)
    layers.set_cpu_kernel(model, "fp32")
    return model


def random_rows(vocab: int, seq: int, n: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids[i]} for i in range(n)]


def collate_on(device: str):
    def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids = torch.stack([e["input_ids"] for e in examples]).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    return collate


def _reset(device: str) -> int:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    memory.reset_rss_peak()
    return memory.rss_bytes()


def _peak(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return memory.rss_peak_bytes()


def measure(
    base: torch.nn.Module,
    shape: memory.LlamaShape,
    method: str,
    cfg: dict[str, Any],
    *,
    device: str,
    seq: int,
    batch: int,
    steps: int,
    ckpt: bool,
    r: int,
    baseline: int,
    optimizer: str = "adamw",
) -> dict[str, Any]:
    """Train ``steps`` steps of one method on ``base`` and measure; the base is left as it was."""
    key = "bilora" if method.startswith("bilora") else method
    _reset(device)
    torch.manual_seed(0)
    model = adapters.attach_lora(base, adapters.LoraSpec(r=r, alpha=2 * r, target_modules=memory.LLAMA_TARGETS), "CAUSAL_LM")
    loop = LoopConfig(
        batch_size=batch, lr=1e-4, max_steps=steps, checkpoint_every=0, log_every=steps, gradient_checkpointing=ckpt, optimizer=optimizer
    )
    m = methods.build(key, cfg, seed=0)
    auto = scale.autocast_dtype(device, "auto")
    ft = FineTuner(model, m, random_rows(shape.vocab, seq, batch * steps), collate_on(device), loop, seed=0, autocast_dtype=auto)
    error = None
    try:
        ft.train()
    except torch.OutOfMemoryError as e:  # a row that does not fit is a result too
        error = f"OOM: {str(e).splitlines()[0][:120]}"
    peak = _peak(device) - (0 if device == "cuda" else baseline)
    times = [h["step_time"] for h in ft.history[1:]] or [h["step_time"] for h in ft.history]
    run = memory.RunShape(
        seq=seq,
        batch=batch,
        r=r,
        method=key,
        fused=True,
        param_bytes=2 if device == "cuda" else 4,
        act_bytes=2 if auto else 4,
        gradient_checkpointing=ckpt,
        optimizer=optimizer,
    )
    pred = memory.predict(shape, run)
    row = {
        "method": method,
        "checkpointing": ckpt,
        "seq": seq,
        "batch": batch,
        "steps": len(ft.history),
        "step_time_s": statistics.median(times) if times else None,
        "tokens_per_s": (batch * seq / statistics.median(times)) if times else None,
        "peak_gib": peak / memory.GIB,
        "predicted_gib": pred["total"] / memory.GIB,
        "predicted_parts_gib": {k: round(v / memory.GIB, 3) for k, v in pred.items() if k != "total"},
        "autocast": str(auto).replace("torch.", "") if auto else "none",
        "optimizer": optimizer,
        "error": error,
    }
    # leave the base as it was: no adapters, no checkpointing, no hooks
    ft.optimizer.state.clear()
    del ft, m
    model.unload()
    if scale.checkpointing_on(base):
        scale.disable_checkpointing(base)
    del model
    _reset(device)
    return row


def write(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# GPU check (bench/gpu_check.py)",
        "",
        f"Device: {meta['device_name']}; torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}, bitsandbytes {meta['bitsandbytes']}.",
        "Random-init nf4 (double quant) Llama shapes, LoRA r 8 on all 7 linears, AdamW, bf16 compute + autocast on CUDA.",
        "Peak: torch.cuda.max_memory_allocated (CPU: peak RSS delta); predicted: bilora.memory.predict.",
        "",
        "| model | method | ckpt | seq x batch | step (s) | tokens/s | peak (MiB) | predicted (MiB) | pred/meas | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['predicted_gib'] / r['peak_gib']:.2f}" if r["peak_gib"] > 0 else "-"
        st = f"{r['step_time_s']:.3f}" if r["step_time_s"] else "-"
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        lines.append(
            f"| {r['model']} | {r['method']} | {'on' if r['checkpointing'] else 'off'} | {r['seq']}x{r['batch']} | {st} | {tps} | {r['peak_gib'] * 1024:.0f} | {r['predicted_gib'] * 1024:.0f} | {ratio} | {r['error'] or ''} |"
        )
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="rehearsal: a 2-layer toy shape, seq 32, 2 steps")
    ap.add_argument("--shapes", nargs="+", default=["llama-1b", "llama-8b"], choices=sorted(memory.SHAPES))
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--optimizer", default="adamw", choices=scale.OPTIMIZERS)
    ap.add_argument("--out", default=str(ROOT / "reports"), help="folder for gpu.md and gpu.json")
    ap.add_argument("--budget-s", type=float, default=230.0, help="stop starting new rows after this many seconds")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --tiny for the rehearsal", file=sys.stderr)
        return 2
    import bitsandbytes
    import peft
    import transformers

    shapes = {"tiny": TINY} if args.tiny else {n: memory.SHAPES[n] for n in args.shapes}
    seq, steps = (32, 2) if args.tiny else (args.seq, args.steps)
    meta = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "seq": seq,
        "steps": steps,
    }
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    cd = torch.bfloat16 if args.device == "cuda" else torch.float32
    for sname, shape in shapes.items():
        baseline = _reset(args.device)
        base = random_nf4_llama(shape, args.device, cd, cd)
        base.train()
        for ckpt in (False, True):
            for method, cfg in METHODS:
                if time.perf_counter() - t0 > args.budget_s:
                    print(f"budget of {args.budget_s:.0f}s reached: stopping", file=sys.stderr)
                    write(out, meta | {"stopped_early": True}, rows)
                    return 0
                row = {
                    "model": sname,
                    **measure(
                        base,
                        shape,
                        method,
                        cfg,
                        device=args.device,
                        seq=seq,
                        batch=args.batch,
                        steps=steps,
                        ckpt=ckpt,
                        r=8,
                        baseline=baseline,
                        optimizer=args.optimizer,
                    ),
                }
                rows.append(row)
                write(out, meta, rows)
                print(json.dumps(row), flush=True)
        del base
        _reset(args.device)
    write(out, meta | {"wall_s": time.perf_counter() - t0}, rows)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # only effective if set before the process starts (see bilora.memory)
    raise SystemExit(main())
