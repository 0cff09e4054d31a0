"""Step time and activation memory vs sequence length, LoRA rank and model, for every method.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.scaling [--lengths 64 128 256 512 --ranks 4 8 16 32 64
                                                        --models minilm smollm2 --batch 4 --steps 3]

Few steps per point (docs/methods.md, "Benchmarks": scaling curves use few steps and small batches on
CPU; full curves belong on a GPU). Methods: every registered method plus ``bilora_fused``.

* Length and rank sweeps: MiniLM-L6 (nf4), real SST-2 text: the token stream of consecutive training
  sentences cut into fixed-length rows (no padding), the same rows for every method. For the rank
  sweep the auxiliary has the primary's rank (r2 = r, alpha = 2r); the length sweep uses r = r2 = 8.
* Model sweep (``--models``, at ``--model-length`` tokens, r 8): MiniLM-L6 as above, and a RANDOMLY
  initialised Llama with SmolLM2-135M's configuration (speed needs no pretrained weights), quantized
  to nf4 like any base and trained as a causal LM on seeded random token ids.
* Within a point the methods are interleaved (one step each per round, rotating order) and the
  ratio to LoRA is the median of per-round ratios.
* Memory: after the timed rounds, one more step per method with autograd saved-tensor hooks that sum
  the bytes of the distinct tensors saved for backward in each forward pass, parameters excluded, and
  keep the largest pass: the activation memory of the step, the part of training memory
  that grows with length and batch. It is deterministic (no allocator noise) but it is NOT process
  RSS: temporaries freed within an op (e.g. Flat-LoRA's W0 + eps) do not appear.

Writes reports/scaling_length.png, scaling_rank.png, scaling_model.png and scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench.bench import ROOT, prepare_base, sync, variants

#: SmolLM2-135M-Instruct's config.json (HuggingFaceTB), used for a randomly initialised stand-in.
SMOLLM2_CONFIG = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_TARGETS = ("query", "key", "value", "dense")


def method_names() -> list[str]:
    return [n for n in variants() if n != "bilora_naive"]


def token_rows(base_dir: Path, length: int, n_rows: int) -> list[dict[str, torch.Tensor]]:
    """MiniLM rows of real SST-2 text, ``length`` tokens each ([CLS] ... [SEP], no padding)."""
    from pipeline.data.prepare import tokenizer_for
    from pipeline.data.catalog import get_task

    tok = tokenizer_for(base_dir)
    rows = get_task("sst2").read(ROOT / "data" / "raw", "train")
    stream: list[int] = []
    for r in rows:
        stream += tok(r["text_a"], add_special_tokens=False)["input_ids"]
        if len(stream) >= n_rows * (length - 2):
            break
    body = torch.tensor(stream[: n_rows * (length - 2)]).view(n_rows, length - 2)  # (n, L-2)
    ids = torch.cat([torch.full((n_rows, 1), tok.cls_token_id), body, torch.full((n_rows, 1), tok.sep_token_id)], 1)  # (n, L)
    return [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones_like(ids[i]),
            "token_type_ids": torch.zeros_like(ids[i]),
            "labels": torch.tensor(rows[i]["label"]),
        }
        for i in range(n_rows)
    ]


def random_lm_rows(vocab: int, length: int, n_rows: int) -> list[dict[str, torch.Tensor]]:
    """Seeded random token ids for the causal-LM stand-in; labels = inputs (the LM shifts them)."""
    ids = torch.randint(3, vocab, (n_rows, length), generator=torch.Generator().manual_seed(0))  # (n, L)
    return [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": ids[i]} for i in range(n_rows)]


def smollm2_base(cache: Path) -> Path:
    """A randomly initialised SmolLM2-135M-shaped Llama, quantized to nf4 once and cached."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bilora.base import QuantSpec, ResolvedBase, quantize

    out = cache / "smollm2-135m-random-nf4"
    if (out / "config.json").is_file():
        return out
    fp32 = cache / "smollm2-135m-random-fp32"
    if not (fp32 / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SMOLLM2_CONFIG)).save_pretrained(fp32)
    model, _ = quantize(ResolvedBase(str(fp32)), QuantSpec(enabled=True))
    tmp = cache / f".{out.name}.tmp"
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


class Data:
    """One model's rows, collate function and adapter setup."""

    def __init__(self, model: str, base_dir: Path, length: int, n_rows: int) -> None:
        self.model, self.base_dir = model, base_dir
        if model == "minilm":
            self.rows = token_rows(base_dir, length, n_rows)
            self.kind, self.targets, self.task_type, self.save = "classification", BERT_TARGETS, "SEQ_CLS", ("classifier",)
        else:
            self.rows = random_lm_rows(SMOLLM2_CONFIG["vocab_size"], length, n_rows)
            self.kind, self.targets, self.task_type, self.save = "generation", LLAMA_TARGETS, "CAUSAL_LM", ()

    @staticmethod
    def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def activation_bytes(model: torch.nn.Module, run: Callable[[], Any]) -> int:
    """Activation memory of ``run()``: the bytes of the distinct tensors autograd saves for backward in
    one forward pass of ``model`` (parameters excluded), the largest over the passes ``run()`` makes.

    A pass starts at each call of ``model`` (forward pre-hook). Passes are counted separately because
    each pass's graph is freed by its backward before the next pass: LoRA-SAM's two passes need the
    memory of one, not two (and a freed pass's addresses may be reused by the next, so one set of
    storages across passes would undercount).
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    passes: list[int] = []
    seen: set[int] = set()

    def new_pass(*_: Any) -> None:
        seen.clear()
        passes.append(0)

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not passes:  # saved outside any call of ``model``: count it as one pass
            new_pass()
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            passes[-1] += s.nbytes()
        return t

    handle = model.register_forward_pre_hook(new_pass)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        handle.remove()
    return max(passes, default=0)


def build(data: Data, label: str, rank: int, batch: int, total: int) -> tuple[Callable[[int], float], Callable[[], int]]:
    from bilora import adapters, methods
    from bilora.base import load_for_task
    from bilora.methods.method import StepContext
    from bilora.train import FineTuner, LoopConfig

    name, cfg = variants()[label]
    torch.manual_seed(0)
    model = load_for_task(data.base_dir, data.kind, 2)
    spec = adapters.LoraSpec(r=rank, alpha=2.0 * rank, target_modules=data.targets, modules_to_save=data.save)
    model = adapters.attach_lora(model, spec, data.task_type)
    if name == "bilora":
        cfg = {**cfg, "aux_rank": rank, "aux_alpha": 2.0 * rank}
    method = methods.build(name, cfg, seed=0)
    ft = FineTuner(
        model,
        method,
        data.rows,
        data.collate,
        LoopConfig(batch_size=batch, lr=1e-3, max_steps=total + 1, warmup_ratio=0.0, max_grad_norm=1.0),
        seed=0,
    )
    model.train()
    batches = [data.collate(data.rows[i * batch : (i + 1) * batch]) for i in range(total + 1)]

    def step(i: int) -> float:
        ctx = StepContext(
            model=model,
            optimizer=ft.optimizer,
            scheduler=ft.scheduler,
            micro_batches=[batches[i]],
            step=i,
            max_steps=ft.max_steps,
            max_grad_norm=1.0,
        )
        sync()
        t0 = time.perf_counter()
        method.step(ctx)
        sync()
        return time.perf_counter() - t0

    def memory() -> int:
        # Step index 0: the method's ordinary step (bi-level BiLoRA's index 4 = total would be its
        # cheaper Lambda-only upper step); the batch is the first one, the same for every method.
        return activation_bytes(model, lambda: step(0))

    return step, memory


def point(model: str, base_dir: Path, length: int, rank: int, args: argparse.Namespace) -> dict[str, float]:
    total = args.warmup + args.steps
    data = Data(model, base_dir, length, args.batch * (total + 1))
    steppers = {n: build(data, n, rank, args.batch, total) for n in args.methods}
    times: dict[str, list[float]] = {n: [] for n in steppers}
    names = list(steppers)
    for i in range(total):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t = steppers[n][0](i)
            if i >= args.warmup:
                times[n].append(t)
    out: dict[str, float] = {n: statistics.median(ts) for n, ts in times.items()}
    out.update({f"{n}_ratio_to_lora": statistics.median([t / l for t, l in zip(times[n], times["lora"])]) for n in names if n != "lora"})
    out.update({f"{n}_act_mib": steppers[n][1]() / 2**20 for n in names})
    print(f"  {model} L={length} r={rank}: " + ", ".join(f"{n} {out[n]:.3f}s {out[n + '_act_mib']:.0f}MiB" for n in names), flush=True)
    return out


def plot(xs: list[Any], rows: list[dict[str, float]], names: list[str], xlabel: str, title: str, path: Path, log_x: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    pos = xs if log_x else list(range(len(xs)))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    colour = {n: f"C{i}" for i, n in enumerate(names)}  # one colour per method in every panel
    for n in names:
        ax1.plot(pos, [r[n] for r in rows], marker="o", label=n, color=colour[n])
        ax3.plot(pos, [r[f"{n}_act_mib"] for r in rows], marker="o", label=n, color=colour[n])
        if n != "lora":
            ax2.plot(pos, [r[f"{n}_ratio_to_lora"] for r in rows], marker="o", label=n, color=colour[n])
    ax1.set(xlabel=xlabel, ylabel="median s / optimizer step", title=title, yscale="log")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set(xlabel=xlabel, ylabel="step time / LoRA (paired median)", title="ratio to LoRA")
    ax3.set(xlabel=xlabel, ylabel="MiB saved for backward (largest pass)", title="activation memory", yscale="log")
    for ax in (ax1, ax2, ax3):
        if log_x:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(pos, [str(x) for x in xs])
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plots(res: dict[str, Any], out: Path) -> None:
    a, names = res["args"], res["args"]["methods"]
    title = f"nf4, batch {a['batch']}"
    if res.get("length"):
        xs = sorted(int(k) for k in res["length"])
        plot(xs, [res["length"][str(x)] for x in xs], names, "sequence length (r = 8)", f"MiniLM-L6 {title}", out / "scaling_length.png")
    if res.get("rank"):
        xs = sorted(int(k) for k in res["rank"])
        plot(
            xs,
            [res["rank"][str(x)] for x in xs],
            names,
            f"rank r = r2 (length {a['rank_length']})",
            f"MiniLM-L6 {title}",
            out / "scaling_rank.png",
        )
    if res.get("model"):
        xs = list(res["model"])
        plot(
            xs,
            [res["model"][m] for m in xs],
            names,
            f"model (length {a['model_length']}, r = 8)",
            title,
            out / "scaling_model.png",
            log_x=False,
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[64, 128, 256, 512])
    ap.add_argument("--ranks", type=int, nargs="*", default=[4, 8, 16, 32, 64])
    ap.add_argument("--rank-length", type=int, default=128, help="sequence length of the rank sweep")
    ap.add_argument("--models", nargs="*", choices=["minilm", "smollm2"], default=["minilm", "smollm2"])
    ap.add_argument("--model-length", type=int, default=128, help="sequence length of the model sweep")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="*", default=None, help="default: every registered method + bilora_fused")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("BILORA_MODEL_CACHE", "~/.cache/bilora")).expanduser() / "bench")
    ap.add_argument("--out", type=Path, default=ROOT / "reports")
    ap.add_argument("--plot-from", type=Path, default=None, help="redraw the plots from an existing scaling.json, without measuring")
    args = ap.parse_args(argv)
    if args.plot_from:
        plots(json.loads(args.plot_from.read_text()), args.out)
        print(f"redrew {args.out}/scaling_*.png from {args.plot_from}")
        return 0
    args.methods = args.methods or method_names()
    if "lora" not in args.methods:
        args.methods.insert(0, "lora")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    minilm = prepare_base("nf4", args.cache)
    bases = {"minilm": minilm, **({"smollm2": smollm2_base(args.cache)} if "smollm2" in args.models else {})}
    t0 = time.time()
    res: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "loadavg_before": os.getloadavg(),
    }
    res["length"] = {str(L): point("minilm", minilm, L, 8, args) for L in args.lengths}
    res["rank"] = {str(r): point("minilm", minilm, args.rank_length, r, args) for r in args.ranks}
    res["model"] = {m: point(m, bases[m], args.model_length, 8, args) for m in args.models}
    res.update(wall_s=time.time() - t0, loadavg_after=os.getloadavg(), threads=torch.get_num_threads())
    args.out.mkdir(parents=True, exist_ok=True)
    plots(res, args.out)
    (args.out / "scaling.json").write_text(json.dumps(res, indent=2, sort_keys=True))
    print(f"wrote {args.out}/scaling_*.png and scaling.json ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
