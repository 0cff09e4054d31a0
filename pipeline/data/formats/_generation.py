"""What the generation formats share: (prompt, target) tokenisation with a loss mask and truncation
accounting, and scoring by exact match after extraction plus the held-out loss/perplexity.

Prepared columns: ``input_ids``, ``attention_mask``, ``labels`` (-100 on the prompt unless
``train_on_prompt``), ``prompt`` (text generation starts from) and ``reference`` (gold completion).
"""

from __future__ import annotations

import math
import re
from typing import Any

from pipeline.data.formats.base import Format
from pipeline.data.readers import DataError

IGNORE = -100


def sft_rows(pairs: list[tuple[str, str]], tokenizer, max_length: int, train_on_prompt: bool) -> tuple[dict[str, list], dict[str, Any]]:
    """``bilora.causal.tokenize_sft`` over (prompt, target) pairs; counts targets that were cut."""
    from bilora.causal import tokenize_sft

    cols: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "prompt": [], "reference": []}
    cut = 0
    for prompt, target in pairs:
        row = tokenize_sft(tokenizer, prompt, target, max_length)
        full = len(tokenizer(target, add_special_tokens=False)["input_ids"]) + 1  # + EOS
        kept = sum(t != IGNORE for t in row["labels"])
        cut += kept < full
        labels = list(row["input_ids"]) if train_on_prompt else row["labels"]
        for k, v in (
            ("input_ids", row["input_ids"]),
            ("attention_mask", row["attention_mask"]),
            ("labels", labels),
            ("prompt", prompt),
            ("reference", target),
        ):
            cols[k].append(v)
    return cols, {"target_truncated": cut, "truncated": sum(len(x) >= max_length for x in cols["input_ids"])}


def extract(text: str, opts: dict[str, Any]) -> str | None:
    how = opts.get("extraction", "whole")
    if how == "whole":
        return text.strip()
    if how == "final_number":
        from bilora.causal import extract_answer

        return extract_answer(text)
    m = re.search(opts["regex"], text)
    if m is None:
        return None
    return (m.group(1) if m.groups() else m.group(0)).strip()


def heldout_loss(model, ds, collate, batch_size: int) -> float:
    """Mean per-token cross-entropy of the reference completions (the label tokens)."""
    import torch  # here, not at the top: the params schema imports the formats registry, which stays torch-free

    model.eval()
    total, count = 0.0, 0
    dev = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(ds), batch_size):
            batch = collate([ds[i] for i in range(start, min(len(ds), start + batch_size))])
            batch = {k: v.to(dev) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            tgt = batch["labels"][:, 1:]
            lp = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE, reduction="sum"
            )
            total += float(lp)
            count += int((tgt != IGNORE).sum())
    return total / max(1, count)


class Generation(Format):
    """Base of the formats trained as (prompt, target) pairs: subclasses give ``pair(row, opts)``."""

    kind = "generation"

    def default_metrics(self, opts):
        return ("exact_match", "loss", "perplexity")

    def pair(self, row: dict, opts: dict[str, Any]) -> tuple[str, str]:
        raise NotImplementedError

    def render(self, rows, tokenizer, opts, max_length):
        return sft_rows([self.pair(r, opts) for r in rows], tokenizer, max_length, bool(opts.get("train_on_prompt")))

    def score(self, model, tokenizer, ds, opts, metrics, batch_size, max_new_tokens):
        from bilora import adapters
        from bilora.causal import generate_answers

        out: dict[str, Any] = {}
        preds: list = []
        with adapters.primary_only(model):
            if "exact_match" in metrics:
                gens = generate_answers(
                    model,
                    tokenizer,
                    list(ds["prompt"]),
                    opts.get("max_new_tokens") or max_new_tokens,
                    batch_size,
                    stop=tuple(opts.get("stop") or ()),
                )
                got = [extract(g, opts) for g in gens]
                gold = [extract(r, opts) for r in ds["reference"]]
                out["exact_match"] = sum(g is not None and g == y for g, y in zip(got, gold)) / len(gold)
                out["no_answer"] = sum(g is None for g in got)
                preds = [{"generation": g, "prediction": p, "gold": y} for g, p, y in zip(gens, got, gold)]
            if "loss" in metrics or "perplexity" in metrics:
                loss = heldout_loss(model, ds, self.collator(tokenizer), batch_size)
                out["loss"] = loss
                out["perplexity"] = math.exp(min(loss, 50.0))
            if "base_loss" in metrics:  # the untuned base on the same references (adapters off)
                with model.disable_adapter():
                    out["base_loss"] = heldout_loss(model, ds, self.collator(tokenizer), batch_size)
        return out | {"n": len(ds)}, preds


def require_targets(stats: dict[str, Any], n: int, where: str) -> None:
    if n and stats["target_truncated"] == n:
        raise DataError(
            f"{where}: the target of every one of the {n} examples was cut by data.max_length; raise data.max_length or shorten the prompts"
        )
